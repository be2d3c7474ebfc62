//! The eBPF data path programmed through the library, hosts as namespaces.

use std::net::Ipv4Addr;
use std::time::Duration;

use ipnet::Ipv4Net;
use weft::datapath::ebpf::{EbpfDatapath, EbpfOptions, Encap};
use weft::datapath::{Datapath, LocalEndpoint, RemoteEndpoint, mac_for};
use weft_tests::{Host, Netns, Underlay, in_ns, root_or_skip, tcp_transfer};

struct Container {
    ns: Netns,
    addr: Ipv4Net,
    host: usize,
}

fn options(host: &Host, encap: Encap) -> EbpfOptions {
    let mut opts = EbpfOptions::new(host.name.clone());
    opts.underlay = Some(host.iface.clone());
    opts.encap = encap;
    opts
}

/// Attaches each container on its host and tells every host about the others.
fn program(hosts: &[Host], containers: &[Container], encap: Encap) {
    for (h, host) in hosts.iter().enumerate() {
        let opts = options(host, encap);
        let locals: Vec<(String, std::path::PathBuf, Ipv4Net)> = containers
            .iter()
            .filter(|c| c.host == h)
            .map(|c| (c.ns.name().to_string(), c.ns.path(), c.addr))
            .collect();
        let peers: Vec<Ipv4Addr> = hosts.iter().enumerate().filter(|(i, _)| *i != h).map(|(_, o)| o.ip).collect();
        let remotes: Vec<RemoteEndpoint> = containers
            .iter()
            .filter(|c| c.host != h)
            .map(|c| RemoteEndpoint { addr: c.addr.addr(), mac: mac_for(c.addr.addr()), host: hosts[c.host].ip })
            .collect();
        in_ns(&host.ns, move || async move {
            let dp = EbpfDatapath::start(opts).await.expect("start data path");
            for (id, netns, addr) in locals {
                dp.attach_endpoint(&LocalEndpoint::new(id, netns, vec![addr])).await.expect("attach");
            }
            for peer in peers {
                dp.add_peer_host(peer).await.expect("peer");
            }
            for remote in remotes {
                dp.set_remote_endpoint(&remote).await.expect("remote endpoint");
            }
        });
    }
}

fn cluster(encap: Encap) -> (Underlay, Vec<Host>, Vec<Container>) {
    let mut underlay = Underlay::new();
    let hosts: Vec<Host> = (0..3).map(|i| underlay.host(&format!("h{i}"))).collect();
    let mut containers = Vec::new();
    for h in 0..3 {
        for c in 0..2 {
            let addr = Ipv4Net::new(Ipv4Addr::new(10, 32, h as u8 + 1, c as u8 + 1), 12).unwrap();
            containers.push(Container { ns: Netns::new(&format!("c{h}{c}")), addr, host: h });
        }
    }
    program(&hosts, &containers, encap);
    (underlay, hosts, containers)
}

fn all_pairs(encap: Encap) {
    let (_underlay, _hosts, containers) = cluster(encap);
    let mut port = 5000;
    for a in &containers {
        for b in &containers {
            if a.addr == b.addr {
                continue;
            }
            assert!(a.ns.ping_within(b.addr.addr(), Duration::from_secs(3)), "{} -> {} ping", a.addr, b.addr);
            port += 1;
            assert!(tcp_transfer(&b.ns, b.addr.addr(), &a.ns, port, 4 << 20), "{} -> {} TCP", a.addr, b.addr);
        }
    }
}

#[test]
fn all_pairs_direct() {
    if !root_or_skip("all_pairs_direct") {
        return;
    }
    all_pairs(Encap::Direct);
}

#[test]
fn all_pairs_device() {
    if !root_or_skip("all_pairs_device") {
        return;
    }
    all_pairs(Encap::Device);
}
