//! AWS for the tests: moto (from PyPI, in a venv `cargo xtask test` makes)
//! with a fault-injecting front and an IMDSv2 stand-in (tests/aws/fake_aws.py),
//! all inside a simulated host of the test's own underlay, so agents reach it
//! over the underlay and nothing leaves the test's namespaces.

use std::io::{BufRead, BufReader};
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use crate::cleanup::Proc;
use crate::{Host, Underlay};

pub const REGION: &str = "us-east-1";
const MOTO_PORT: u16 = 5000;
const API_PORT: u16 = 8080;
const IMDS_PORT: u16 = 8081;

/// The Python venv with moto, awscli and cfn-lint (`WEFT_AWS_VENV`, default
/// /var/cache/weft/aws-venv; `cargo xtask test` creates it).
pub fn venv() -> PathBuf {
    let dir = std::env::var_os("WEFT_AWS_VENV").map_or_else(|| PathBuf::from("/var/cache/weft/aws-venv"), PathBuf::from);
    assert!(
        dir.join("bin/moto_server").exists(),
        "no moto in {} (cargo xtask test installs it: python3 -m venv DIR && DIR/bin/pip install 'moto[server]' awscli cfn-lint)",
        dir.display()
    );
    dir
}

/// The repository's root.
pub fn repo() -> PathBuf {
    // The run-time value first (cargo and nextest set it): a test binary reused
    // from another checkout through a shared target directory names that one.
    let dir = std::env::var_os("CARGO_MANIFEST_DIR").map_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")), PathBuf::from);
    dir.parent().expect("repo root").to_path_buf()
}

/// moto + front + IMDS on their own simulated host.
pub struct FakeAws {
    /// Dropped first: the processes before their host.
    _child: Proc,
    pub host: Host,
}

impl FakeAws {
    pub fn start(lan: &mut Underlay) -> FakeAws {
        let host = lan.host("aws");
        // moto listens on loopback inside this host.
        host.ns.ip(&["link", "set", "lo", "up"]);
        let child = Proc::spawn_killed(
            format!("stopping fake AWS in {}", host.name),
            host.ns
                .cmd(venv().join("bin/python").to_str().expect("utf-8"))
                .arg(repo().join("tests/aws/fake_aws.py"))
                .args([MOTO_PORT.to_string(), API_PORT.to_string(), IMDS_PORT.to_string(), REGION.to_string()])
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit()),
        )
        .expect("start fake_aws.py");
        let mut line = String::new();
        let mut out = BufReader::new(child.take_stdout().expect("stdout"));
        let _ = out.read_line(&mut line);
        assert_eq!(line.trim(), "ready", "fake_aws.py did not start");
        FakeAws { host, _child: child }
    }

    /// Environment for an agent (or the AWS CLI) on another host: endpoints on
    /// this host, static credentials, a region.
    pub fn env(&self) -> Vec<(String, String)> {
        vec![
            ("AWS_ENDPOINT_URL".into(), format!("http://{}:{API_PORT}", self.host.ip)),
            ("AWS_EC2_METADATA_SERVICE_ENDPOINT".into(), format!("http://{}:{IMDS_PORT}", self.host.ip)),
            ("AWS_ACCESS_KEY_ID".into(), "testing".into()),
            ("AWS_SECRET_ACCESS_KEY".into(), "testing".into()),
            ("AWS_REGION".into(), REGION.into()),
            ("AWS_DEFAULT_REGION".into(), REGION.into()),
            // No stray profile or config from the machine.
            ("AWS_CONFIG_FILE".into(), "/nonexistent".into()),
            ("AWS_SHARED_CREDENTIALS_FILE".into(), "/nonexistent".into()),
        ]
    }

    /// The AWS CLI against moto (in this host's namespace); its JSON output.
    pub fn aws(&self, args: &[&str]) -> serde_json::Value {
        let out = self.cli(args).output().expect("run aws");
        assert!(out.status.success(), "aws {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null)
    }

    /// An AWS CLI command (awscli v1 needs `--endpoint-url`).
    pub fn cli(&self, args: &[&str]) -> Command {
        let mut cmd = self.host.ns.cmd(venv().join("bin/aws").to_str().expect("utf-8"));
        cmd.args(["--endpoint-url", &self.moto_url(), "--output", "json"]).args(args);
        cmd.envs(self.env()).env_remove("AWS_ENDPOINT_URL");
        cmd
    }

    /// moto's own endpoint (no faults), as seen from this host.
    pub fn moto_url(&self) -> String {
        format!("http://127.0.0.1:{MOTO_PORT}")
    }

    /// The next `count` API requests through the front fail with `status` and `code`.
    pub fn inject_faults(&self, count: usize, status: u16, code: &str) {
        let faults: Vec<serde_json::Value> = (0..count).map(|_| serde_json::json!({"status": status, "code": code})).collect();
        self.post(API_PORT, "/_weft/faults", &serde_json::json!({ "faults": faults }));
    }

    /// Requests the front served, and how many of them it failed on purpose.
    pub fn stats(&self) -> (u64, u64) {
        let v = self.request(API_PORT, "GET", "/_weft/stats", "");
        let v: serde_json::Value = serde_json::from_str(&v).unwrap_or_default();
        (v["api"].as_u64().unwrap_or(0), v["faults"].as_u64().unwrap_or(0))
    }

    /// The metadata service tells the host at `client` it is instance `id` with `ip`.
    pub fn imds_says(&self, client: Ipv4Addr, id: &str, ip: Ipv4Addr) {
        self.post(IMDS_PORT, "/_weft/imds", &serde_json::json!({ client.to_string(): {"id": id, "ip": ip.to_string()} }));
    }

    fn post(&self, port: u16, path: &str, body: &serde_json::Value) {
        self.request(port, "POST", path, &body.to_string());
    }

    fn request(&self, port: u16, method: &str, path: &str, body: &str) -> String {
        crate::http_request(&self.host.ns, ([127, 0, 0, 1], port).into(), method, path, body).expect("fake_aws control").1
    }
}

/// An Auto Scaling group in moto: a launch template, `desired` instances in
/// the default VPC's first subnet.
pub struct Group {
    pub name: String,
}

impl Group {
    pub fn create(aws: &FakeAws, name: &str, desired: u32, tags: &[(&str, &str)]) -> Group {
        let subnets = aws.aws(&["ec2", "describe-subnets"]);
        let subnet = subnets["Subnets"][0]["SubnetId"].as_str().expect("a default subnet").to_string();
        Group::create_in(aws, name, desired, tags, &subnet)
    }

    /// A subnet of a new VPC: the simulated LAN (192.168.0.0/24), so instances
    /// get addresses simulated hosts can have ([`crate::Underlay::host_at`]).
    pub fn lan_subnet(aws: &FakeAws) -> String {
        let vpc = aws.aws(&["ec2", "create-vpc", "--cidr-block", "192.168.0.0/16"]);
        let vpc = vpc["Vpc"]["VpcId"].as_str().expect("vpc id").to_string();
        let subnet = aws.aws(&["ec2", "create-subnet", "--vpc-id", &vpc, "--cidr-block", "192.168.0.0/24"]);
        subnet["Subnet"]["SubnetId"].as_str().expect("subnet id").to_string()
    }

    /// A group whose instances live in `subnet`.
    pub fn create_in(aws: &FakeAws, name: &str, desired: u32, tags: &[(&str, &str)], subnet: &str) -> Group {
        let data = r#"{"ImageId": "ami-12c6146b", "InstanceType": "t3.micro"}"#;
        aws.aws(&["ec2", "create-launch-template", "--launch-template-name", name, "--launch-template-data", data]);
        let mut args: Vec<String> = [
            "autoscaling",
            "create-auto-scaling-group",
            "--auto-scaling-group-name",
            name,
            "--launch-template",
            &format!("LaunchTemplateName={name}"),
            "--min-size",
            "0",
            "--max-size",
            "10",
            "--desired-capacity",
            &desired.to_string(),
            "--vpc-zone-identifier",
            subnet,
        ]
        .iter()
        .map(ToString::to_string)
        .collect();
        if !tags.is_empty() {
            args.push("--tags".into());
            for (k, v) in tags {
                args.push(format!("Key={k},Value={v},PropagateAtLaunch=true,ResourceId={name},ResourceType=auto-scaling-group"));
            }
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        aws.aws(&args);
        Group { name: name.to_string() }
    }

    /// The InService instances, oldest first: (id, private address).
    pub fn instances(&self, aws: &FakeAws) -> Vec<(String, Ipv4Addr)> {
        let g = aws.aws(&["autoscaling", "describe-auto-scaling-groups", "--auto-scaling-group-names", &self.name]);
        let ids: Vec<String> = g["AutoScalingGroups"][0]["Instances"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter(|i| i["LifecycleState"] == "InService")
                    .filter_map(|i| i["InstanceId"].as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        if ids.is_empty() {
            return Vec::new();
        }
        let mut args = vec!["ec2", "describe-instances", "--instance-ids"];
        args.extend(ids.iter().map(String::as_str));
        let r = aws.aws(&args);
        let mut found: Vec<(String, Ipv4Addr)> = Vec::new();
        for res in r["Reservations"].as_array().into_iter().flatten() {
            for i in res["Instances"].as_array().into_iter().flatten() {
                if let (Some(id), Some(ip)) = (i["InstanceId"].as_str(), i["PrivateIpAddress"].as_str().and_then(|a| a.parse().ok())) {
                    found.push((id.to_string(), ip));
                }
            }
        }
        found.sort_by_key(|(id, _)| ids.iter().position(|x| x == id));
        found
    }

    /// A group of `desired` instances on the simulated LAN, a simulated host
    /// at each instance's address (named `LABEL0`, `LABEL1`, ...), and the
    /// metadata service telling each host which instance it is.
    pub fn on_lan(aws: &FakeAws, lan: &mut crate::Underlay, name: &str, desired: u32, label: &str) -> (Group, Vec<(String, Ipv4Addr)>, Vec<Host>) {
        let subnet = Group::lan_subnet(aws);
        let group = Group::create_in(aws, name, desired, &[], &subnet);
        let inst = group.instances(aws);
        assert_eq!(inst.len(), desired as usize, "moto has {desired} InService");
        let hosts: Vec<Host> = inst.iter().enumerate().map(|(i, (_, ip))| lan.host_at(&format!("{label}{i}"), *ip)).collect();
        for ((id, ip), h) in inst.iter().zip(&hosts) {
            aws.imds_says(h.ip, id, *ip);
        }
        (group, inst, hosts)
    }

    pub fn scale(&self, aws: &FakeAws, desired: u32) {
        aws.aws(&["autoscaling", "set-desired-capacity", "--auto-scaling-group-name", &self.name, "--desired-capacity", &desired.to_string()]);
    }

    /// Scale-in leaves these instances alone.
    pub fn protect(&self, aws: &FakeAws, ids: &[&str]) {
        let mut args = vec!["autoscaling", "set-instance-protection", "--auto-scaling-group-name", &self.name, "--protected-from-scale-in", "--instance-ids"];
        args.extend(ids);
        aws.aws(&args);
    }
}
