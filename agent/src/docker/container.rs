//! What to do with one container, decided from what Docker says about it
//! (pure: unit-tested without Docker).

use std::collections::HashMap;
use std::net::Ipv4Addr;

use crate::attach::{Want, parse_wants};

/// The facts about a container that matter here (from `docker inspect`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Facts {
    /// The full id (64 hex digits).
    pub id: String,
    /// Without Docker's leading `/`.
    pub name: String,
    pub running: bool,
    /// Of its init process; 0 once it exited (a `start` event may be inspected
    /// after a short-lived container ended).
    pub pid: i64,
    pub env: Vec<String>,
    pub network_mode: String,
    pub hostname: String,
    pub domainname: String,
    pub labels: HashMap<String, String>,
    /// The host file Docker bind-mounts as the container's /etc/hosts.
    pub hosts_path: Option<String>,
}

impl Facts {
    /// From `docker inspect`'s answer.
    pub fn from_inspect(c: &bollard::models::ContainerInspectResponse) -> Facts {
        let state = c.state.as_ref();
        let config = c.config.as_ref();
        Facts {
            id: c.id.clone().unwrap_or_default(),
            name: c.name.as_deref().unwrap_or_default().trim_start_matches('/').to_string(),
            running: state.and_then(|s| s.running).unwrap_or(false),
            pid: state.and_then(|s| s.pid).unwrap_or(0),
            env: config.and_then(|c| c.env.clone()).unwrap_or_default(),
            network_mode: c.host_config.as_ref().and_then(|h| h.network_mode.clone()).unwrap_or_default(),
            hostname: config.and_then(|c| c.hostname.clone()).unwrap_or_default(),
            domainname: config.and_then(|c| c.domainname.clone()).unwrap_or_default(),
            labels: config.and_then(|c| c.labels.clone()).unwrap_or_default(),
            hosts_path: c.hosts_path.clone().filter(|p| !p.is_empty()),
        }
    }

    /// `WEFT_CIDR`, else `WEAVE_CIDR` (Weave's name), from the environment.
    pub fn cidr_env(&self) -> Option<&str> {
        let get = |key: &str| {
            self.env.iter().rev().find_map(|kv| kv.strip_prefix(key).and_then(|v| v.strip_prefix('=')))
        };
        get("WEFT_CIDR").or_else(|| get("WEAVE_CIDR")).map(str::trim)
    }
}

/// How names are made (launch flags).
#[derive(Debug, Clone, Default)]
pub struct Naming {
    /// The DNS domain, e.g. `weave.local.`.
    pub domain: String,
    /// Take the DNS name from this label when the container has it (ECS names
    /// containers `ecs-FAMILY-REV-NAME-UUID` and labels them with the plain
    /// name: `com.amazonaws.ecs.container-name`).
    pub hostname_from_label: Option<String>,
}

impl Naming {
    fn domain_bare(&self) -> &str {
        self.domain.trim_end_matches('.')
    }

    /// The name a container is known by: the label's value, else its own name.
    pub fn base_name(&self, labels: &HashMap<String, String>, name: &str) -> String {
        self.hostname_from_label
            .as_ref()
            .and_then(|l| labels.get(l))
            .map(|v| v.trim())
            .filter(|v| !v.is_empty())
            .unwrap_or(name)
            .to_string()
    }

    /// The DNS names of a container: its base name in the domain, and its
    /// hostname if that is in the domain too.
    pub fn names(&self, f: &Facts) -> Vec<String> {
        let mut names = Vec::new();
        let base = self.base_name(&f.labels, &f.name);
        if valid_dns_name(&base) {
            names.push(base.to_ascii_lowercase());
        }
        let full = match (f.hostname.as_str(), f.domainname.as_str()) {
            ("", _) => None,
            (h, "") => Some(h.to_string()),
            (h, d) => Some(format!("{h}.{}", d.trim_end_matches('.'))),
        };
        let domain = self.domain_bare().to_ascii_lowercase();
        if let Some(full) = full.map(|f| f.to_ascii_lowercase())
            && let Some(host) = full.strip_suffix(&domain).and_then(|h| h.strip_suffix('.'))
                && valid_dns_name(host) && !names.iter().any(|n| n == host) {
                    names.push(host.to_string());
                }
        names
    }
}

/// Letters, digits, `-`, `_` and dots between labels; at most 253 characters.
pub fn valid_dns_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|l| {
            !l.is_empty() && l.len() <= 63 && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        })
}

/// What the watcher does with a container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    /// Put it on the overlay.
    Attach { wants: Vec<Want>, names: Vec<String> },
    /// Leave it alone, for this reason.
    Skip(String),
    /// It ended (or never ran): take it off.
    Gone,
}

/// Decides what to do with a container. `addrs` overrides its `WEFT_CIDR`
/// (`weft attach ADDR... CONTAINER`).
///
/// Addresses given by the user (`weft attach ADDR... CONTAINER`) that cannot be
/// read are an error; a container's own unusable `WEFT_CIDR` skips it.
pub fn plan(f: &Facts, naming: &Naming, addrs: Option<&[String]>) -> Result<Plan, crate::attach::WantsError> {
    if let Some(a) = addrs {
        parse_wants(a)?;
    }
    Ok(plan_checked(f, naming, addrs))
}

fn plan_checked(f: &Facts, naming: &Naming, addrs: Option<&[String]>) -> Plan {
    if !f.running || f.pid <= 0 {
        return Plan::Gone;
    }
    let mode = f.network_mode.as_str();
    match mode {
        "" | "default" | "bridge" => {}
        "host" => return Plan::Skip("it uses the host's network (--network host)".into()),
        "none" if addrs.is_none() => return Plan::Skip("it asked for no network (--network none)".into()),
        "none" => {}
        m if m.starts_with("container:") => {
            return Plan::Skip(format!("it shares the network of another container ({m})"));
        }
        m => return Plan::Skip(format!("it is on the Docker network {m:?}")),
    }
    let wants = match addrs {
        Some(a) => parse_wants(a),
        None => match f.cidr_env() {
            Some("none") => return Plan::Skip("WEFT_CIDR=none".into()),
            Some(v) => parse_wants(&v.split_whitespace().collect::<Vec<_>>()),
            None => parse_wants::<&str>(&[]),
        },
    };
    match wants {
        Ok(wants) => Plan::Attach { wants, names: naming.names(f) },
        Err(e) => Plan::Skip(format!("its WEFT_CIDR is not usable: {e}")),
    }
}

/// A Docker container id: 64 hex digits. Endpoints, addresses and names under
/// such ids are the Docker integration's to clean up.
pub fn is_container_id(id: &str) -> bool {
    id.len() == 64 && id.bytes().all(|b| b.is_ascii_hexdigit())
}

/// The container's /etc/hosts with its overlay address first: what Weave's
/// proxy did, so `hostname -i` and lookups of its own name give the overlay
/// address. Lines naming the hostname otherwise are dropped; the rest (Docker's
/// localhost entries, `--add-host`) stays.
pub fn hosts_file(existing: &str, addr: Ipv4Addr, hostname: &str, domainname: &str) -> String {
    let short = hostname.split('.').next().unwrap_or(hostname);
    let fqdn = match domainname.trim_end_matches('.') {
        "" => hostname.to_string(),
        d => format!("{hostname}.{d}"),
    };
    let mut out = String::from("# weft: this container's overlay address\n");
    if fqdn == short {
        out.push_str(&format!("{addr}\t{short}\n"));
    } else {
        out.push_str(&format!("{addr}\t{fqdn} {short}\n"));
    }
    for line in existing.lines() {
        if line.starts_with("# weft:") {
            continue;
        }
        let names: Vec<&str> = line.split('#').next().unwrap_or("").split_whitespace().skip(1).collect();
        if names.iter().any(|n| *n == short || *n == fqdn) {
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts() -> Facts {
        Facts {
            id: "a".repeat(64),
            name: "web".into(),
            running: true,
            pid: 42,
            network_mode: "default".into(),
            hostname: "0123456789ab".into(),
            ..Facts::default()
        }
    }

    fn naming() -> Naming {
        Naming { domain: "weave.local.".into(), hostname_from_label: Some("com.amazonaws.ecs.container-name".into()) }
    }

    #[test]
    fn a_plain_container_gets_one_address_and_its_name() {
        assert_eq!(plan(&facts(), &naming(), None).unwrap(), Plan::Attach { wants: vec![Want::In(None)], names: vec!["web".into()] });
    }

    #[test]
    fn exited_or_pid_zero_is_gone() {
        let mut f = facts();
        f.pid = 0;
        assert_eq!(plan(&f, &naming(), None).unwrap(), Plan::Gone);
        let mut f = facts();
        f.running = false;
        assert_eq!(plan(&f, &naming(), None).unwrap(), Plan::Gone);
    }

    #[test]
    fn network_modes() {
        for (mode, attach) in [("", true), ("bridge", true), ("host", false), ("none", false), ("container:abc", false), ("mynet", false)] {
            let mut f = facts();
            f.network_mode = mode.into();
            assert_eq!(matches!(plan(&f, &naming(), None).unwrap(), Plan::Attach { .. }), attach, "{mode}");
        }
        // Asked for by hand, a --network none container is attached.
        let mut f = facts();
        f.network_mode = "none".into();
        assert!(matches!(plan(&f, &naming(), Some(&[])).unwrap(), Plan::Attach { .. }));
    }

    #[test]
    fn weft_cidr_and_weave_cidr() {
        let mut f = facts();
        f.env = vec!["WEAVE_CIDR=net:10.40.0.0/16 ip:10.32.9.9/12".into()];
        let Plan::Attach { wants, .. } = plan(&f, &naming(), None).unwrap() else { panic!() };
        assert_eq!(wants.len(), 2);
        f.env.push("WEFT_CIDR=none".into());
        assert!(matches!(plan(&f, &naming(), None).unwrap(), Plan::Skip(_)), "WEFT_CIDR wins");
        f.env = vec!["WEFT_CIDR=bogus".into()];
        let Plan::Skip(why) = plan(&f, &naming(), None).unwrap() else { panic!() };
        assert!(why.contains("bogus"), "{why}");
    }

    #[test]
    fn names_from_label_and_hostname() {
        let mut f = facts();
        f.name = "ecs-weave-ecs-demo-task-1-dataproducer-b8ecddb78a8fecfc3900".into();
        f.labels.insert("com.amazonaws.ecs.container-name".into(), "dataproducer".into());
        assert_eq!(naming().names(&f), vec!["dataproducer".to_string()]);
        let mut f = facts();
        f.hostname = "api".into();
        f.domainname = "weave.local".into();
        assert_eq!(naming().names(&f), vec!["web".to_string(), "api".to_string()]);
        f.hostname = "web".into();
        assert_eq!(naming().names(&f), vec!["web".to_string()], "no duplicate");
        f.hostname = "db.weave.local".into();
        f.domainname = String::new();
        assert_eq!(naming().names(&f), vec!["web".to_string(), "db".to_string()]);
        f.hostname = "db".into();
        f.domainname = "example.com".into();
        assert_eq!(naming().names(&f), vec!["web".to_string()], "other domains are not ours");
        f.name = "Web_1".into();
        assert_eq!(naming().names(&f), vec!["web_1".to_string()]);
    }

    #[test]
    fn hosts_file_puts_the_overlay_address_first() {
        let docker = "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost\n172.17.0.2\tdb\n10.0.0.9 other\n";
        let out = hosts_file(docker, Ipv4Addr::new(10, 32, 0, 5), "db", "weave.local");
        assert_eq!(
            out,
            "# weft: this container's overlay address\n10.32.0.5\tdb.weave.local db\n127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost\n10.0.0.9 other\n"
        );
        // Again (a re-attach): still one line of ours.
        let again = hosts_file(&out, Ipv4Addr::new(10, 32, 0, 6), "db", "weave.local");
        assert_eq!(again.matches("# weft:").count(), 1);
        assert!(again.contains("10.32.0.6\tdb.weave.local db\n") && !again.contains("10.32.0.5"));
        assert!(hosts_file("", Ipv4Addr::new(10, 32, 0, 5), "0123456789ab", "").contains("10.32.0.5\t0123456789ab\n"));
    }

    #[test]
    fn container_ids() {
        assert!(is_container_id(&"0a".repeat(32)));
        assert!(!is_container_id("web") && !is_container_id(&"g".repeat(64)));
    }
}
