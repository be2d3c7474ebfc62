//! Who may make the DNS server forward (recurse): the overlay (containers),
//! this host (loopback and its own addresses) and the subnets of the listen
//! addresses the user gave. Everyone the server reaches is answered for the
//! weft domain; a stranger asking for anything else is REFUSED, so the server
//! is neither an open resolver nor an amplifier. Forwards are also limited per
//! source by a token bucket ([`RateLimit`]).
//!
//! Owns the decision and the buckets. Must not touch sockets: the server asks.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Mutex, RwLock};
use std::time::{Duration, Instant};

use ipnet::{IpNet, Ipv4Net};

/// Forwards one source may start per second, sustained...
pub const RATE_PER_SOURCE: f64 = 500.0;
/// ...and in a burst.
pub const BURST_PER_SOURCE: f64 = 1000.0;
/// Sources with a bucket at most: past this, full buckets are forgotten (a
/// full bucket is the state a new source starts in anyway).
const MAX_BUCKETS: usize = 16_384;
/// How often this host's own addresses are read again (interfaces come and go).
const HOST_ADDRS_REFRESH: Duration = Duration::from_secs(5);

/// The sources forwarded for.
#[derive(Debug)]
pub struct Recursion {
    overlay: Ipv4Net,
    /// Subnets of the listen addresses (and the host's overlay address).
    subnets: RwLock<Vec<IpNet>>,
    host: RwLock<(Option<Instant>, Vec<IpAddr>)>,
}

/// The subnet of the interface holding `addr`, if it is a local address.
pub fn subnet_of(addr: IpAddr) -> Option<IpNet> {
    let ifaddrs = nix::ifaddrs::getifaddrs().ok()?;
    for ifa in ifaddrs {
        let (Some(a), Some(mask)) = (ifa.address, ifa.netmask) else { continue };
        let (ip, prefix): (IpAddr, u32) = match (a.as_sockaddr_in(), mask.as_sockaddr_in(), a.as_sockaddr_in6(), mask.as_sockaddr_in6()) {
            (Some(a), Some(m), _, _) => (IpAddr::V4(a.ip()), m.ip().to_bits().count_ones()),
            (_, _, Some(a), Some(m)) => (IpAddr::V6(a.ip()), m.ip().to_bits().count_ones()),
            _ => continue,
        };
        if ip == addr {
            return IpNet::new(ip, u8::try_from(prefix).ok()?).ok().map(|n| n.trunc());
        }
    }
    None
}

fn host_addrs() -> Vec<IpAddr> {
    let Ok(ifaddrs) = nix::ifaddrs::getifaddrs() else { return Vec::new() };
    ifaddrs
        .filter_map(|ifa| {
            let a = ifa.address?;
            a.as_sockaddr_in().map(|s| IpAddr::V4(s.ip())).or_else(|| a.as_sockaddr_in6().map(|s| IpAddr::V6(s.ip())))
        })
        .collect()
}

impl Recursion {
    /// Forwards for `overlay`, this host, and the subnets of `listen`.
    pub fn new(overlay: Ipv4Net, listen: &[IpAddr]) -> Self {
        let r = Recursion { overlay, subnets: RwLock::new(Vec::new()), host: RwLock::new((None, Vec::new())) };
        for a in listen {
            r.allow_subnet_of(*a);
        }
        r
    }

    /// Forwards for the subnet of `addr` too (a listen address added later).
    pub fn allow_subnet_of(&self, addr: IpAddr) {
        if addr.is_unspecified() || addr.is_loopback() {
            return;
        }
        if let Some(net) = subnet_of(addr)
            && let Ok(mut s) = self.subnets.write()
            && !s.contains(&net)
        {
            s.push(net);
        }
    }

    /// Whether `src` may have names outside the domain forwarded.
    pub fn allows(&self, src: IpAddr) -> bool {
        let src = match src {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(src, IpAddr::V4),
            v4 => v4,
        };
        if src.is_loopback() {
            return true;
        }
        if let IpAddr::V4(v4) = src
            && self.overlay.contains(&v4)
        {
            return true;
        }
        if self.subnets.read().is_ok_and(|s| s.iter().any(|n| n.contains(&src))) {
            return true;
        }
        self.is_host(src)
    }

    fn is_host(&self, src: IpAddr) -> bool {
        let fresh = |h: &(Option<Instant>, Vec<IpAddr>)| h.0.is_some_and(|at| at.elapsed() < HOST_ADDRS_REFRESH);
        if let Ok(h) = self.host.read()
            && fresh(&h)
        {
            return h.1.contains(&src);
        }
        let addrs = host_addrs();
        let found = addrs.contains(&src);
        if let Ok(mut h) = self.host.write() {
            *h = (Some(Instant::now()), addrs);
        }
        found
    }
}

/// A token bucket per source address.
#[derive(Debug)]
pub struct RateLimit {
    rate: f64,
    burst: f64,
    buckets: Mutex<HashMap<IpAddr, (f64, Instant)>>,
}

impl Default for RateLimit {
    fn default() -> Self {
        RateLimit::new(RATE_PER_SOURCE, BURST_PER_SOURCE)
    }
}

impl RateLimit {
    pub fn new(rate: f64, burst: f64) -> Self {
        RateLimit { rate, burst, buckets: Mutex::new(HashMap::new()) }
    }

    /// Takes a token for `src` at `now`; false when its bucket is empty.
    pub fn allow(&self, src: IpAddr, now: Instant) -> bool {
        let Ok(mut buckets) = self.buckets.lock() else { return false };
        if buckets.len() >= MAX_BUCKETS && !buckets.contains_key(&src) {
            let (rate, burst) = (self.rate, self.burst);
            buckets.retain(|_, (tokens, at)| *tokens + now.saturating_duration_since(*at).as_secs_f64() * rate < burst);
            if buckets.len() >= MAX_BUCKETS {
                return false;
            }
        }
        let (tokens, at) = buckets.entry(src).or_insert((self.burst, now));
        *tokens = (*tokens + now.saturating_duration_since(*at).as_secs_f64() * self.rate).min(self.burst);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlay_loopback_and_this_host_recurse_strangers_do_not() {
        let r = Recursion::new("10.32.0.0/12".parse().unwrap(), &[]);
        assert!(r.allows("10.40.1.2".parse().unwrap()));
        assert!(r.allows("127.0.0.1".parse().unwrap()));
        assert!(r.allows("::1".parse().unwrap()));
        assert!(r.allows("::ffff:10.32.0.1".parse().unwrap()));
        assert!(!r.allows("198.51.100.7".parse().unwrap()), "a stranger");
        assert!(!r.allows("10.48.0.1".parse().unwrap()), "just outside the range");
    }

    #[test]
    fn a_source_gets_its_burst_then_the_rate() {
        let l = RateLimit::new(10.0, 20.0);
        let (a, b): (IpAddr, IpAddr) = ("10.32.0.1".parse().unwrap(), "10.32.0.2".parse().unwrap());
        let t0 = Instant::now();
        assert_eq!((0..100).filter(|_| l.allow(a, t0)).count(), 20, "the burst");
        assert!(l.allow(b, t0), "another source has its own bucket");
        assert!(!l.allow(a, t0));
        assert_eq!((0..100).filter(|_| l.allow(a, t0 + Duration::from_secs(1))).count(), 10, "a second's worth");
    }
}
