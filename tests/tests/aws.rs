//! AWS discovery against moto (a real implementation of the AWS APIs) with an
//! IMDSv2 stand-in, and the ECS deployment scripts. `cargo xtask test aws`
//! runs these alone.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::time::Duration;

use weft_tests::agent::Agent;
use weft_tests::aws::{FakeAws, Group};
use weft_tests::{Underlay, root_or_skip, wait_until};

const DISCOVER: &[&str] = &["--discovery", "aws-asg", "--discovery-interval", "0.3"];

/// The mesh targets of an agent (`weft status targets`), as addresses.
fn targets(a: &Agent) -> BTreeSet<Ipv4Addr> {
    a.cli(&["status", "targets"])
        .lines()
        .filter_map(|l| l.trim().split(':').next().and_then(|h| h.parse().ok()))
        .collect()
}

fn ips(list: &[(String, Ipv4Addr)], except: &str) -> BTreeSet<Ipv4Addr> {
    list.iter().filter(|(id, _)| id != except).map(|(_, ip)| *ip).collect()
}

#[test]
fn aws_discovery_follows_the_auto_scaling_group() {
    if !root_or_skip("aws_discovery_follows_the_auto_scaling_group") {
        return;
    }
    let mut lan = Underlay::new();
    let aws = FakeAws::start(&mut lan);
    let group = Group::create(&aws, "weft-asg", 3, &[]);
    let inst = group.instances(&aws);
    assert_eq!(inst.len(), 3);
    // The agents' own instances survive the scale-in.
    group.protect(&aws, &[&inst[0].0, &inst[1].0]);
    let (h1, h2) = (lan.host("h1"), lan.host("h2"));
    aws.imds_says(h1.ip, &inst[0].0, inst[0].1);
    aws.imds_says(h2.ip, &inst[1].0, inst[1].1);
    // a1 was also given a peer on the command line: discovery never drops it.
    let a1 = Agent::launch_with_env(&h1, &[h2.ip], DISCOVER, &aws.env());
    let a2 = Agent::launch_with_env(&h2, &[], DISCOVER, &aws.env());
    let follows = |n: u32| {
        let now = group.instances(&aws);
        assert_eq!(now.len(), n as usize, "moto has {n} InService");
        let (want1, want2) = (ips(&now, &inst[0].0), ips(&now, &inst[1].0));
        let ok = wait_until(Duration::from_secs(20), || {
            targets(&a1) == want1.iter().copied().chain([h2.ip]).collect() && targets(&a2) == want2
        });
        assert!(ok, "{n} instances: a1 {:?} (want {want1:?} + {}), a2 {:?} (want {want2:?})\n{}", targets(&a1), h2.ip, targets(&a2), a1.log());
    };
    follows(3);
    group.scale(&aws, 5);
    follows(5);
    group.scale(&aws, 2);
    follows(2);
    assert!(a1.log().contains("discovery: peers left the group"), "scale-in is logged");
}

#[test]
fn aws_discovery_groups_by_tag_and_by_ecs_cluster() {
    if !root_or_skip("aws_discovery_groups_by_tag_and_by_ecs_cluster") {
        return;
    }
    let mut lan = Underlay::new();
    let aws = FakeAws::start(&mut lan);
    // Two groups of one ECS cluster, and a third group of the same VPC that is not ours.
    let web = Group::create(&aws, "web", 2, &[("weft:ecs-cluster", "demo")]);
    let batch = Group::create(&aws, "batch", 1, &[("weft:ecs-cluster", "demo")]);
    let other = Group::create(&aws, "other", 2, &[]);
    let (web_i, batch_i, other_i) = (web.instances(&aws), batch.instances(&aws), other.instances(&aws));
    let h = lan.host("h");
    aws.imds_says(h.ip, &web_i[0].0, web_i[0].1);
    let mut args = DISCOVER.to_vec();
    args.extend(["--aws-ecs-cluster", "demo"]);
    let a = Agent::launch_with_env(&h, &[], &args, &aws.env());
    let want: BTreeSet<Ipv4Addr> = web_i.iter().skip(1).chain(&batch_i).map(|(_, ip)| *ip).collect();
    assert!(wait_until(Duration::from_secs(20), || targets(&a) == want), "cluster: {:?} want {want:?}\n{}", targets(&a), a.log());
    assert!(a.log().contains("ECS cluster demo"), "{}", a.log());
    drop(a);
    // Weave's weave:peerGroupName: instances with the same value, across groups.
    let tag = |id: &str, v: &str| aws.aws(&["ec2", "create-tags", "--resources", id, "--tags", &format!("Key=weave:peerGroupName,Value={v}")]);
    tag(&other_i[0].0, "blue");
    tag(&batch_i[0].0, "blue");
    tag(&other_i[1].0, "green");
    aws.imds_says(h.ip, &other_i[0].0, other_i[0].1);
    let a = Agent::launch_with_env(&h, &[], DISCOVER, &aws.env());
    let want: BTreeSet<Ipv4Addr> = [batch_i[0].1].into();
    assert!(wait_until(Duration::from_secs(20), || targets(&a) == want), "tag: {:?} want {want:?}\n{}", targets(&a), a.log());
}

#[test]
fn aws_failures_are_logged_retried_and_keep_the_peers() {
    if !root_or_skip("aws_failures_are_logged_retried_and_keep_the_peers") {
        return;
    }
    let mut lan = Underlay::new();
    let aws = FakeAws::start(&mut lan);
    let group = Group::create(&aws, "weft-asg", 3, &[]);
    let inst = group.instances(&aws);
    let h = lan.host("h");
    let want = ips(&inst, &inst[0].0);

    // No metadata service at all (not an EC2 instance): the agent runs, says why, retries.
    let mut env = aws.env();
    env.retain(|(k, _)| k != "AWS_EC2_METADATA_SERVICE_ENDPOINT");
    env.push(("AWS_EC2_METADATA_SERVICE_ENDPOINT".into(), format!("http://{}:9", aws.host.ip)));
    let mut a = Agent::launch_with_env(&h, &[], DISCOVER, &env);
    assert!(
        wait_until(Duration::from_secs(20), || a.log().matches("instance metadata service").count() >= 2),
        "no IMDS: logged and retried\n{}",
        a.log()
    );
    assert!(a.exited().is_none() && a.try_cli(&["status"]).status.success(), "the agent keeps running");
    drop(a);

    // No credentials: the metadata service answers, but there is no role and no keys.
    aws.imds_says(h.ip, &inst[0].0, inst[0].1);
    let mut env = aws.env();
    env.retain(|(k, _)| !k.starts_with("AWS_ACCESS_KEY_ID") && !k.starts_with("AWS_SECRET_ACCESS_KEY"));
    let mut a = Agent::launch_with_env(&h, &[], DISCOVER, &env);
    assert!(
        wait_until(Duration::from_secs(30), || a.log().matches("discovery failed").count() >= 2),
        "no credentials: logged and retried\n{}",
        a.log()
    );
    assert!(a.log().to_lowercase().contains("credentials"), "the log says what is missing:\n{}", a.log());
    assert!(a.exited().is_none(), "the agent keeps running");
    drop(a);

    // No CA certificates (a minimal image): said, retried, no panic.
    let mut env = aws.env();
    env.extend([("SSL_CERT_FILE".to_string(), "/nonexistent".to_string()), ("SSL_CERT_DIR".to_string(), "/nonexistent".to_string())]);
    let mut a = Agent::launch_with_env(&h, &[], DISCOVER, &env);
    assert!(
        wait_until(Duration::from_secs(20), || a.log().matches("no CA certificates found").count() >= 2),
        "no certificates: logged and retried\n{}",
        a.log()
    );
    assert!(a.exited().is_none() && !a.log().contains("panicked"), "the agent keeps running:\n{}", a.log());
    drop(a);

    // Throttling and 5xx from the API: first before the agent has any peer...
    aws.inject_faults(12, 400, "Throttling");
    let a = Agent::launch_with_env(&h, &[], DISCOVER, &aws.env());
    assert!(wait_until(Duration::from_secs(60), || targets(&a) == want), "recovers after throttling\n{}", a.log());
    assert_eq!(aws.stats().1, 12, "every injected fault was met");
    assert!(a.log().contains("Throttling"), "throttling is logged:\n{}", a.log());
    // ...then with peers: 5xx changes nothing, even while the group shrinks.
    aws.inject_faults(30, 503, "ServiceUnavailable");
    group.protect(&aws, &[&inst[0].0]);
    group.scale(&aws, 1);
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(targets(&a), want, "the peers it had stay while AWS fails\n{}", a.log());
    assert!(a.log().contains("503"), "5xx is logged:\n{}", a.log());
    // When AWS answers again, the scale-in is followed.
    assert!(wait_until(Duration::from_secs(90), || targets(&a).is_empty()), "follows once AWS is back\n{}", a.log());
}

#[test]
fn aws_discovery_builds_the_mesh_and_gates_ipam_reclaim() {
    if !root_or_skip("aws_discovery_builds_the_mesh_and_gates_ipam_reclaim") {
        return;
    }
    let mut lan = Underlay::new();
    let aws = FakeAws::start(&mut lan);
    // Instances whose private addresses are the simulated hosts' own.
    let (_group, inst, hosts) = Group::on_lan(&aws, &mut lan, "weft-asg", 3, "i");
    let mut args = DISCOVER.to_vec();
    args.extend(["--ipalloc-init", "consensus=3", "--ipalloc-range", "10.32.0.0/16", "--ipalloc-reclaim-after", "2s"]);
    // No peer on any command line: the group is the only way they meet.
    let mut agents: Vec<Agent> = hosts.iter().map(|h| Agent::launch_with_env(h, &[], &args, &aws.env())).collect();
    assert!(
        wait_until(Duration::from_secs(30), || agents.iter().all(|a| a.established() == 2)),
        "a full mesh from discovery alone:\n{}",
        agents[0].log()
    );
    // Agreement on the ring, then one peer stops answering (its instance runs on).
    let (code, body) = agents[0].http("POST", "/ip/x");
    assert_eq!(code, 200, "{body}");
    assert!(wait_until(Duration::from_secs(10), || agents.iter().all(|a| a.ownership().len() == 3)));
    // IPAM notes where each peer lives on its 1 s tick: give it two.
    std::thread::sleep(Duration::from_secs(2));
    let gone = agents[2].name.clone();
    agents[2].kill9();
    std::thread::sleep(Duration::from_secs(5));
    assert!(
        agents[..2].iter().all(|a| a.ownership().get(&gone).copied().unwrap_or(0) > 0),
        "unreachable but still in the group: its space stays its own"
    );
    // Terminated: discovery no longer lists it, and its space is taken over.
    aws.aws(&["autoscaling", "terminate-instance-in-auto-scaling-group", "--instance-id", &inst[2].0, "--should-decrement-desired-capacity"]);
    assert!(
        wait_until(Duration::from_secs(30), || agents[..2].iter().all(|a| !a.ownership().contains_key(&gone))),
        "terminated and unreachable: reclaimed\n{}",
        agents[0].log()
    );
    assert_eq!(agents[0].ownership().values().sum::<u64>(), 65536, "the whole range is still owned");
}

/// IPAM's view as one agent reports it: (voters, quorum) while undecided, and
/// what allocations wait for.
fn consensus(a: &Agent) -> (Option<(u64, u64)>, String) {
    let r = a.report();
    let c = r["ipam"]["consensus"].as_array().and_then(|c| Some((c.first()?.as_u64()?, c.get(1)?.as_u64()?)));
    (c, r["ipam"]["waiting_for"].as_str().unwrap_or_default().to_string())
}

/// `POST /ip/ID` on `a`: the address handed out.
fn allocate(a: &Agent, id: &str) -> Ipv4Addr {
    let (code, body) = a.http("POST", &format!("/ip/{id}"));
    assert_eq!(code, 200, "allocate {id} on {}: {body}\n{}", a.nickname, a.log());
    body.trim().split('/').next().and_then(|x| x.parse().ok()).unwrap_or_else(|| panic!("an address: {body}"))
}

/// Production's launch: `--discovery aws-asg` and nothing about peers or
/// consensus. The group's size sizes the agreement: a lone host waits for a
/// majority of its group, hosts booting in any order with delays agree on one
/// ring, 200 allocations spread over them never repeat, hosts added by a
/// scale-out take the ring over and get space, and after a scale-in from 5 to
/// 2 the terminated hosts' space is reclaimed while the survivors keep theirs.
#[test]
fn aws_hosts_that_meet_only_through_the_group_agree_on_addresses() {
    use rand::{RngExt, SeedableRng, seq::SliceRandom};
    if !root_or_skip("aws_hosts_that_meet_only_through_the_group_agree_on_addresses") {
        return;
    }
    let seed: u64 = std::env::var("WEFT_TEST_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(rand::random);
    eprintln!("seed {seed} (WEFT_TEST_SEED={seed} repeats this order and these delays)");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut lan = Underlay::new();
    let aws = FakeAws::start(&mut lan);
    let (group, inst, mut hosts) = Group::on_lan(&aws, &mut lan, "weft-asg", 3, "i");
    // hosts[i] is instance ids[i].
    let mut ids: Vec<String> = inst.iter().map(|(id, _)| id.clone()).collect();
    let mut args = DISCOVER.to_vec();
    // Only what the test needs to be quick: a small range, a short grace period.
    args.extend(["--ipalloc-range", "10.32.0.0/22", "--ipalloc-reclaim-after", "2s"]);
    let mut order: Vec<usize> = (0..3).collect();
    order.shuffle(&mut rng);

    // The first host boots while the others do not run weft yet: it must not
    // decide alone (a group of 3 needs 2).
    let first = Agent::launch_with_env(&hosts[order[0]], &[], &args, &aws.env());
    assert!(
        wait_until(Duration::from_secs(20), || consensus(&first).0.is_some_and(|(_, q)| q == 2)),
        "the group of 3 sizes the quorum: {:?}\n{}",
        consensus(&first),
        first.log()
    );
    std::thread::sleep(Duration::from_secs(2));
    assert!(first.ownership().is_empty(), "alone, nothing is decided: {:?}", first.ownership());
    assert!(consensus(&first).1.contains("majority"), "status says what it waits for: {:?}", consensus(&first));

    // The two others, in random order, each after a random delay up to 3 s.
    let delays: Vec<u64> = (0..2).map(|_| rng.random_range(0..3000)).collect();
    let (hosts_ref, args_ref, env) = (&hosts, &args, aws.env());
    let mut agents: Vec<Option<Agent>> = (0..3).map(|_| None).collect();
    let later: Vec<(usize, Agent)> = std::thread::scope(|s| {
        let handles: Vec<_> = order[1..]
            .iter()
            .zip(&delays)
            .map(|(&i, &ms)| {
                let env = env.clone();
                s.spawn(move || {
                    std::thread::sleep(Duration::from_millis(ms));
                    (i, Agent::launch_with_env(&hosts_ref[i], &[], args_ref, &env))
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("launch")).collect()
    });
    agents[order[0]] = Some(first);
    for (i, a) in later {
        agents[i] = Some(a);
    }
    let mut agents: Vec<Agent> = agents.into_iter().map(|a| a.expect("launched")).collect();
    assert!(
        wait_until(Duration::from_secs(30), || agents.iter().all(|a| a.established() == 2)),
        "a full mesh from the group alone:\n{}",
        agents[0].log()
    );
    let total = 1024u64;
    assert!(
        wait_until(Duration::from_secs(30), || agents.iter().all(|a| a.ownership().values().sum::<u64>() == total)),
        "one ring, the whole range owned: {:?}\n{}",
        agents.iter().map(Agent::ownership).collect::<Vec<_>>(),
        agents[0].log()
    );
    let ring = agents[0].ownership();
    assert!(agents.iter().all(|a| a.ownership() == ring), "every host holds the same ring");

    // 200 allocations spread over the hosts: none twice.
    let mut held: std::collections::BTreeMap<Ipv4Addr, String> = std::collections::BTreeMap::new();
    for k in 0..200 {
        let i = rng.random_range(0..agents.len());
        let id = format!("c{k}-on{i}");
        let a = allocate(&agents[i], &id);
        if let Some(prev) = held.insert(a, id.clone()) {
            panic!("{a} handed out twice: {prev} and {id}");
        }
    }

    // Scale out 3 -> 5: the new hosts take the ring over and get space.
    group.scale(&aws, 5);
    let now = group.instances(&aws);
    assert_eq!(now.len(), 5, "moto has 5 InService");
    for (id, ip) in now.iter().filter(|(id, _)| !inst.iter().any(|(x, _)| x == id)) {
        let h = lan.host_at(&format!("i{}", hosts.len()), *ip);
        aws.imds_says(h.ip, id, *ip);
        agents.push(Agent::launch_with_env(&h, &[], &args, &aws.env()));
        hosts.push(h);
        ids.push(id.clone());
    }
    assert!(
        wait_until(Duration::from_secs(30), || agents.iter().all(|a| a.established() == 4)),
        "the new hosts join the mesh:\n{}",
        agents[4].log()
    );
    for (i, a) in agents.iter().enumerate().skip(3) {
        for k in 0..10 {
            let id = format!("new{k}-on{i}");
            let addr = allocate(a, &id);
            if let Some(prev) = held.insert(addr, id.clone()) {
                panic!("{addr} handed out twice: {prev} and {id}");
            }
        }
    }
    assert!(
        wait_until(Duration::from_secs(10), || agents.iter().all(|a| a.ownership().len() == 5)),
        "every host owns space: {:?}",
        agents[0].ownership()
    );

    // Scale in 5 -> 2: three hosts are terminated (their agents die with them).
    // The survivors (2 of 5: no majority of the owners) still reclaim, because
    // discovery says the others are gone, not partitioned away.
    std::thread::sleep(Duration::from_secs(2)); // IPAM notes every peer's address on its 1 s tick
    let keep = [order[0], 4];
    let before: Vec<_> = keep.iter().map(|&i| (agents[i].name.clone(), agents[keep[0]].ownership()[&agents[i].name])).collect();
    let mut gone = Vec::new();
    for i in (0..agents.len()).filter(|i| !keep.contains(i)) {
        agents[i].kill9();
        aws.aws(&["autoscaling", "terminate-instance-in-auto-scaling-group", "--instance-id", &ids[i], "--should-decrement-desired-capacity"]);
        gone.push(agents[i].name.clone());
    }
    assert_eq!(group.instances(&aws).len(), 2);
    assert!(
        wait_until(Duration::from_secs(40), || keep.iter().all(|&i| {
            let o = agents[i].ownership();
            gone.iter().all(|g| !o.contains_key(g)) && o.values().sum::<u64>() == total
        })),
        "terminated hosts' space reclaimed by the survivors: {:?}\n{}",
        agents[keep[0]].ownership(),
        agents[keep[0]].log()
    );
    for (name, owned) in before {
        assert!(agents[keep[0]].ownership()[&name] >= owned, "{name} keeps its own space ({owned} before)");
    }
    // The survivors' allocations are still theirs; new ones never repeat one.
    for &i in &keep {
        for (addr, id) in held.iter().filter(|(_, id)| id.ends_with(&format!("-on{i}"))) {
            let (code, body) = agents[i].http("GET", &format!("/ip/{id}"));
            assert_eq!((code, body.trim().split('/').next()), (200, Some(addr.to_string().as_str())), "{id} kept {addr}");
        }
        for k in 0..10 {
            let id = format!("after{k}-on{i}");
            let addr = allocate(&agents[i], &id);
            // An address of a terminated host's container may come back; a
            // survivor's never.
            if let Some(prev) = held.insert(addr, id.clone()) {
                assert!(!keep.iter().any(|s| prev.ends_with(&format!("-on{s}"))), "{addr} handed out twice: {prev} and {id}");
            }
        }
    }
}

/// Runs a deploy/ecs script in the AWS host's namespace against moto.
fn ecs_script(aws: &FakeAws, script: &str, args: &[&str], dir: &std::path::Path) -> std::process::Output {
    let path = format!("{}/bin:{}", weft_tests::aws::venv().display(), std::env::var("PATH").unwrap_or_default());
    aws.host
        .ns
        .cmd("bash")
        .arg(weft_tests::aws::repo().join("deploy/ecs").join(script))
        .args(["--endpoint-url", &aws.moto_url()])
        .args(args)
        .envs(aws.env())
        .env_remove("AWS_ENDPOINT_URL")
        .env("PATH", path)
        .env("WEFT_ECS_STATE", dir.join("demo.state"))
        .current_dir(dir)
        .output()
        .expect("run script")
}

#[test]
fn aws_ecs_setup_then_cleanup_leaves_nothing_behind() {
    if !root_or_skip("aws_ecs_setup_then_cleanup_leaves_nothing_behind") {
        return;
    }
    let mut lan = Underlay::new();
    let aws = std::sync::Arc::new(FakeAws::start(&mut lan));
    // Removed however the test ends.
    let tmp = weft_tests::cleanup::TempPath::dir(&weft_tests::unique("ecs")).expect("temp dir");
    let dir = tmp.path().to_path_buf();
    // What gets uploaded for the instances to download (moto runs no
    // instance): a stand-in that answers --version as weft does.
    let fake = |name: &str, features: &str| {
        let path = dir.join(name);
        std::fs::write(&path, format!("#!/bin/sh\necho weft 0.1.0\necho 'features: {features}'\n")).unwrap();
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        path
    };
    let binary = fake("weft", "aws");
    let key = dir.join("key.pem");
    // A build without the aws feature is refused before anything is created.
    let plain = fake("weft-plain", "none (no --discovery aws-asg: build with `cargo build --release --features aws`)");
    let refused = ecs_script(&aws, "setup.sh", &["--weft-binary", plain.to_str().unwrap(), "--key-file", key.to_str().unwrap()], &dir);
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success() && err.contains("without the aws feature") && err.contains("--features aws"), "refused with what to do: {err}");
    assert_eq!(aws.aws(&["ecs", "list-clusters"])["clusterArns"].as_array().map_or(0, Vec::len), 0, "nothing created");
    // The real binary says so too.
    let version = std::process::Command::new(weft_tests::agent::weft_bin()).arg("--version").output().expect("weft --version");
    assert!(String::from_utf8_lossy(&version.stdout).contains("features: aws"), "the test build has aws: {version:?}");

    // moto starts no ECS agent: this thread registers each InService instance with
    // the cluster, as the agent the user data starts would.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let agent = {
        let (aws, stop) = (aws.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut registered = BTreeSet::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) && registered.len() < 3 {
                std::thread::sleep(Duration::from_millis(500));
                let g = Group { name: "weft-ecs-demo-group".into() };
                let out = aws.cli(&["autoscaling", "describe-auto-scaling-groups", "--auto-scaling-group-names", &g.name]).output().unwrap();
                if !out.status.success() {
                    continue;
                }
                for (id, _) in g.instances(&aws) {
                    if registered.insert(id.clone()) {
                        let doc = format!("{{\"instanceId\": \"{id}\"}}");
                        aws.aws(&["ecs", "register-container-instance", "--cluster", "weft-ecs-demo-cluster", "--instance-identity-document", &doc]);
                    }
                }
            }
        })
    };
    let setup = ecs_script(&aws, "setup.sh", &["--weft-binary", binary.to_str().unwrap(), "--wait-timeout", "60", "--key-file", key.to_str().unwrap()], &dir);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    agent.join().unwrap();
    let out = String::from_utf8_lossy(&setup.stdout).into_owned();
    assert!(setup.status.success(), "setup.sh:\n{out}\n{}", String::from_utf8_lossy(&setup.stderr));
    assert!(out.contains("Setup is ready!") && out.matches("  http://").count() == 3, "{out}");
    assert!(std::fs::read_to_string(&key).unwrap().contains("PRIVATE KEY"), "the key pair's file");
    // What it built.
    let c = aws.aws(&["ecs", "describe-clusters", "--clusters", "weft-ecs-demo-cluster"]);
    assert_eq!(c["clusters"][0]["registeredContainerInstancesCount"], 3);
    let services = aws.aws(&["ecs", "list-services", "--cluster", "weft-ecs-demo-cluster"]);
    assert_eq!(services["serviceArns"].as_array().map(Vec::len), Some(2), "hit-counter and redis");
    let lt = aws.aws(&["ec2", "describe-launch-template-versions", "--launch-template-name", "weft-ecs-demo-launch-template"]);
    let user_data = lt["LaunchTemplateVersions"][0]["LaunchTemplateData"]["UserData"].as_str().unwrap_or_default().to_string();
    let decoded = String::from_utf8(
        std::process::Command::new("base64").arg("-d").stdin(std::process::Stdio::piped()).stdout(std::process::Stdio::piped()).spawn().and_then(|mut c| {
            use std::io::Write;
            c.stdin.take().unwrap().write_all(user_data.as_bytes())?;
            c.wait_with_output()
        }).unwrap().stdout,
    )
    .unwrap();
    let sha = String::from_utf8_lossy(&std::process::Command::new("sha256sum").arg(&binary).output().unwrap().stdout).split(' ').next().unwrap_or_default().to_string();
    assert!(decoded.contains("ECS_CLUSTER=weft-ecs-demo-cluster") && decoded.contains("weft launch") && !decoded.contains('@'), "filled in: {decoded}");
    assert!(decoded.contains(&format!("WEFT_SHA256='{sha}'")) && decoded.contains("sha256sum -c"), "the binary is checked: {decoded}");
    assert!(decoded.contains("WEFT_SOURCE='s3://weft-ecs-demo-") && !decoded.contains("Signature="), "an S3 object, not a URL that expires: {decoded}");
    let code: String = decoded.lines().filter(|l| !l.trim_start().starts_with('#')).collect::<Vec<_>>().join("\n");
    assert!(!code.contains("consensus") && !code.contains("--ipalloc-init") && !code.contains("WEFT_PEERS=") && code.contains("WEFT_DISCOVERY=aws-asg"), "discovery only: {code}");
    assert!(decoded.contains("Restart=always") && decoded.contains("Wants=network-online.target docker.service") && decoded.contains("--no-block"), "boots: {decoded}");
    let policy = aws.aws(&["iam", "get-role-policy", "--role-name", "weft-ecs-demo-role", "--policy-name", "weft-ecs-demo-policy-binary"]);
    assert!(policy.to_string().contains("s3:GetObject"), "the role may read the binary: {policy}");
    // Its own VPC (accounts without a default VPC work), the group's instances in it.
    let vpc = aws.aws(&["ec2", "describe-vpcs", "--filters", "Name=tag:Name,Values=weft-ecs-demo"]);
    assert_eq!(vpc["Vpcs"][0]["CidrBlock"], "10.0.0.0/16", "{vpc}");
    let routes = aws.aws(&["ec2", "describe-route-tables", "--filters", &format!("Name=vpc-id,Values={}", vpc["Vpcs"][0]["VpcId"].as_str().unwrap_or_default())]);
    assert!(routes.to_string().contains("0.0.0.0/0") && routes.to_string().contains("igw-"), "a default route through the gateway: {routes}");
    let sg = aws.aws(&["ec2", "describe-security-groups", "--filters", "Name=group-name,Values=weft-ecs-demo"]);
    let perms = sg["SecurityGroups"][0]["IpPermissions"].to_string();
    assert!(perms.contains("6783") && perms.contains("6784") && perms.contains("\"FromPort\":22") && perms.contains("\"FromPort\":80"), "{perms}");

    let cleanup = ecs_script(&aws, "cleanup.sh", &["--key-file", key.to_str().unwrap()], &dir);
    let out = String::from_utf8_lossy(&cleanup.stdout).into_owned();
    assert!(cleanup.status.success(), "cleanup.sh:\n{out}\n{}", String::from_utf8_lossy(&cleanup.stderr));
    assert!(!key.exists(), "the key file went too");
    // Nothing left.
    let empty = |v: serde_json::Value, what: &str| {
        let n = v.as_array().map_or(0, Vec::len);
        assert_eq!(n, 0, "{what} left behind: {v}");
    };
    empty(aws.aws(&["autoscaling", "describe-auto-scaling-groups"])["AutoScalingGroups"].clone(), "Auto Scaling groups");
    empty(aws.aws(&["ec2", "describe-instances", "--filters", "Name=instance-state-name,Values=pending,running,stopping,stopped"])["Reservations"].clone(), "instances");
    empty(aws.aws(&["ec2", "describe-launch-templates"])["LaunchTemplates"].clone(), "launch templates");
    empty(aws.aws(&["ec2", "describe-security-groups", "--filters", "Name=group-name,Values=weft-ecs-demo"])["SecurityGroups"].clone(), "security groups");
    empty(aws.aws(&["ec2", "describe-key-pairs"])["KeyPairs"].clone(), "key pairs");
    empty(aws.aws(&["ec2", "describe-vpcs", "--filters", "Name=tag:Name,Values=weft-ecs-demo"])["Vpcs"].clone(), "VPCs");
    empty(aws.aws(&["ec2", "describe-internet-gateways", "--filters", "Name=tag:Name,Values=weft-ecs-demo"])["InternetGateways"].clone(), "internet gateways");
    let vpcs = aws.aws(&["ec2", "describe-vpcs"])["Vpcs"].clone();
    assert_eq!(vpcs.as_array().map_or(0, Vec::len), 1, "only moto's default VPC is left: {vpcs}");
    empty(aws.aws(&["s3api", "list-buckets"])["Buckets"].clone(), "S3 buckets");
    let roles = aws.aws(&["iam", "list-roles"])["Roles"].clone();
    assert!(!roles.to_string().contains("weft-ecs-demo"), "IAM roles left: {roles}");
    empty(aws.aws(&["iam", "list-instance-profiles"])["InstanceProfiles"].clone(), "instance profiles");
    // A deleted cluster stays visible as INACTIVE for a while (AWS and moto alike).
    let clusters = aws.aws(&["ecs", "describe-clusters", "--clusters", "weft-ecs-demo-cluster"])["clusters"].clone();
    assert!(clusters.as_array().into_iter().flatten().all(|c| c["status"] == "INACTIVE"), "clusters left: {clusters}");
    empty(aws.aws(&["ecs", "list-task-definitions", "--status", "ACTIVE"])["taskDefinitionArns"].clone(), "task definitions");
}

#[test]
fn aws_ecs_cloudformation_template_passes_cfn_lint() {
    let template = weft_tests::aws::repo().join("deploy/ecs/weft-ecs.yaml");
    let out = std::process::Command::new(weft_tests::aws::venv().join("bin/cfn-lint")).arg(&template).output().expect("run cfn-lint");
    assert!(out.status.success(), "cfn-lint {}:\n{}{}", template.display(), String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
}

/// The CloudFormation template cannot include files, so it carries its own
/// copy of the user data: it must be deploy/ecs/data/user-data.sh (with the
/// unit deploy/weft.service) exactly, with the template's references filled in.
#[test]
fn aws_ecs_cloudformation_user_data_is_the_scripts_own() {
    let repo = weft_tests::aws::repo();
    let read = |p: &str| std::fs::read_to_string(repo.join(p)).unwrap_or_else(|e| panic!("{p}: {e}"));
    let unit = read("deploy/weft.service");
    let script = read("deploy/ecs/data/user-data.sh")
        .replace("@CLUSTER@", "${Cluster}")
        .replace("@WEFT_SOURCE@", "s3://${WeftBucket}/weft")
        .replace("@WEFT_SHA256@", "${WeftSha256}")
        .replace("@WEFT_UNIT@", unit.trim_end());
    let want: String = script.trim_end().lines().map(|l| if l.is_empty() { "\n".to_string() } else { format!("            {l}\n") }).collect();
    let yaml = read("deploy/ecs/weft-ecs.yaml");
    let start = yaml.find("Fn::Base64: !Sub |\n").map(|i| i + "Fn::Base64: !Sub |\n".len()).expect("the user data block");
    let end = yaml.find("\n  AutoScalingGroup:").expect("the group after it");
    let got = format!("{}\n", yaml[start..end].trim_end());
    assert_eq!(got, want, "deploy/ecs/weft-ecs.yaml's UserData differs from deploy/ecs/data/user-data.sh: copy it over");
}

/// What an instance of the group does at boot, under a real systemd (booted
/// with systemd-nspawn in the instance's simulated host): the user data
/// setup.sh makes fetches the binary, checks its SHA-256, writes ecs.config,
/// the unit and the ECS agent's drop-in, and starts weft with --no-block;
/// weft runs under systemd with discovery only, serves DNS on 172.17.0.1 once
/// docker0 has that address, and comes back after a crash (Restart=always).
/// (The binary comes over HTTP here: moto's S3 would have to hold 300 MB of
/// debug build; the S3 path is setup.sh's, checked in the test above.)
#[test]
fn aws_ecs_user_data_boots_weft_under_systemd() {
    use weft_tests::systemd::Machine;
    if !root_or_skip("aws_ecs_user_data_boots_weft_under_systemd") {
        return;
    }
    let mut lan = Underlay::new();
    let aws = FakeAws::start(&mut lan);
    let (_group, _inst, mut hosts) = Group::on_lan(&aws, &mut lan, "weft-boot", 1, "boot");
    let host = hosts.remove(0);
    host.ns.ip(&["route", "add", "default", "dev", "eth0"]);

    // The binary, served from the AWS host.
    let bin = weft_tests::agent::weft_bin();
    let www = weft_tests::cleanup::TempPath::dir(&weft_tests::unique("www")).expect("temp dir");
    std::os::unix::fs::symlink(&bin, www.path().join("weft")).unwrap();
    let _server = weft_tests::cleanup::Proc::spawn_killed(
        "stopping the download server",
        aws.host.ns.cmd("python3").args(["-m", "http.server", "8099", "--bind", &aws.host.ip.to_string()]).arg("--directory").arg(www.path()).stdout(std::process::Stdio::null()).stderr(std::process::Stdio::null()),
    )
    .expect("http.server");
    let url = format!("http://{}:8099/weft", aws.host.ip);
    assert!(wait_until(Duration::from_secs(10), || host.ns.succeeds("curl", &["-fsI", &url])), "the download server answers");
    let sha = String::from_utf8_lossy(&std::process::Command::new("sha256sum").arg(&bin).output().unwrap().stdout).split(' ').next().unwrap_or_default().to_string();

    // The user data exactly as setup.sh renders it.
    let lib = weft_tests::aws::repo().join("deploy/ecs/lib.sh");
    let out = std::process::Command::new("bash").arg("-c").arg(r#". "$0" && user_data "$1" "$2" "$3""#).arg(&lib).args(["weft-boot-cluster", &url, &sha]).output().unwrap();
    assert!(out.status.success(), "render: {}", String::from_utf8_lossy(&out.stderr));
    let root = Machine::prepare("boot");
    std::fs::create_dir_all(root.join("var/lib/cloud")).unwrap();
    std::fs::write(root.join("var/lib/cloud/user-data.sh"), &out.stdout).unwrap();
    std::fs::set_permissions(root.join("var/lib/cloud/user-data.sh"), std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    // cloud-init's final stage runs the user data once; the instance role's
    // credentials and the metadata service come from the environment here.
    Machine::install_unit(&root, "user-data.service", "[Unit]\nAfter=network.target\n[Service]\nType=oneshot\nExecStartPre=/bin/mkdir -p /usr/local/bin\nExecStart=/var/lib/cloud/user-data.sh\nRemainAfterExit=yes\nStandardOutput=journal+console\nStandardError=journal+console\n[Install]\nWantedBy=multi-user.target\n");
    let mut env: String = aws.env().iter().map(|(k, v)| format!("Environment={k}={v}\n")).collect();
    env.push_str(&format!("Environment=WEFT_PIN_NAME={}\nEnvironment=WEFT_DISCOVERY_INTERVAL=0.5\nStandardOutput=journal+console\nStandardError=journal+console\n", host.name));
    Machine::install_unit(&root, "weft.service.d/test.conf", &format!("[Service]\n{env}"));
    // An instance has CA certificates (the SDK needs them for HTTPS).
    let machine = Machine::boot(root, &host.ns, &["/etc/ssl".to_string()]);

    let weft = |args: &[&str]| host.ns.cmd(bin.to_str().unwrap()).args(args).output().expect("weft");
    assert!(
        wait_until(Duration::from_secs(120), || weft(&["status"]).status.success()),
        "weft answers under systemd:\n{}\n{}",
        machine.systemctl(&["status", "--no-pager", "user-data.service", "weft.service"]),
        machine.journal()
    );
    let root = machine.root.clone();
    let ecs = std::fs::read_to_string(root.join("etc/ecs/ecs.config")).unwrap_or_default();
    assert!(ecs.contains("ECS_CLUSTER=weft-boot-cluster") && ecs.contains("DOCKER_HOST=unix:///var/run/weft/weft.sock"), "{ecs}");
    assert!(root.join("etc/systemd/system/ecs.service.d/weft.conf").exists(), "the ECS agent follows weft");
    assert_eq!(std::fs::read(root.join("usr/local/bin/weft")).ok().map(|b| b.len()), None, "/usr/local is the container's own tmpfs");
    assert_eq!(machine.systemctl(&["is-active", "weft.service"]).trim(), "active");
    let pids = machine.pids_of("weft");
    assert_eq!(pids.len(), 1, "one agent: {pids:?}");
    let ppid = std::fs::read_to_string(format!("/proc/{}/status", pids[0])).unwrap_or_default().lines().find_map(|l| l.strip_prefix("PPid:").map(|p| p.trim().to_string()));
    assert_eq!(ppid, machine.init_pid().map(|p| p.to_string()), "started by the container's systemd");
    // Discovery only: the group of one decides the ring alone.
    let report = || -> serde_json::Value { serde_json::from_slice(&weft(&["report"]).stdout).unwrap_or_default() };
    assert!(
        wait_until(Duration::from_secs(30), || report()["ipam"]["peers"].as_array().is_some_and(|p| p.len() == 1)),
        "a group of one decides alone: {}\n{}",
        report()["ipam"],
        machine.inside("journalctl", &["--no-pager", "-u", "weft.service", "-n", "60"])
    );
    // docker0 comes up: DNS on 172.17.0.1 answers.
    assert!(weft(&["dns-add", "10.32.0.9", "-h", "late.weave.local"]).status.success());
    host.ns.ip(&["link", "add", "docker0", "type", "bridge"]);
    host.ns.ip(&["addr", "add", "172.17.0.1/16", "dev", "docker0"]);
    host.ns.ip(&["link", "set", "docker0", "up"]);
    let dig = || {
        let out = host.ns.cmd("dig").args(["@172.17.0.1", "+time=1", "+tries=1", "+short", "late.weave.local"]).output().expect("dig");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    assert!(wait_until(Duration::from_secs(10), || dig() == "10.32.0.9"), "DNS on docker0: {:?}", dig());
    // A crash: systemd starts it again (RestartSec=5).
    let _ = std::process::Command::new("kill").args(["-KILL", &pids[0].to_string()]).status();
    assert!(
        wait_until(Duration::from_secs(30), || machine.pids_of("weft").iter().any(|p| *p != pids[0]) && weft(&["status"]).status.success()),
        "restarted after kill -9:\n{}",
        machine.systemctl(&["status", "weft.service"])
    );
}
