//! The sans-IO dial plan: the addresses this peer keeps connected to, and the
//! rules that decide which connections to make and which to keep.
//!
//! Owns the target table (given and discovered targets; each idle, dialing,
//! connected, or found to be ourselves; failed attempts and backoff with
//! jitter), which targets are due for a dial under the connection limit, and
//! [`admit`]: what to do with a connection whose handshake just finished,
//! including the duplicate-connection rule that both ends of a pair apply.
//!
//! Must not touch sockets, tasks, the clock or global randomness: the time and
//! a random source are passed in, so the actor and the simulation drive the
//! same code, and the tests run in microseconds. Connections are known here
//! only by id and direction; the actor keeps them.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::ops::Range;
use std::time::{Duration, Instant};

use rand::RngExt;

use super::peer::PeerName;
use super::{BACKOFF_MAX, BACKOFF_START};

/// A connection's id, unique within one run of the mesh.
pub type ConnId = u64;

/// Each retry waits its backoff times a factor drawn from this range, so
/// peers that failed together do not all retry together.
pub const JITTER: Range<f64> = 0.75..1.25;

/// Failures after which the backoff stops doubling: well past the cap with
/// the defaults, and it keeps the shift in range.
const MAX_DOUBLINGS: u32 = 8;

/// How long to wait before dialing a target again after failures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// The unit: the first retry waits twice this.
    pub start: Duration,
    /// The longest wait, before jitter.
    pub max: Duration,
}

impl Backoff {
    /// [`BACKOFF_START`] doubling up to [`BACKOFF_MAX`].
    pub const DEFAULT: Backoff = Backoff { start: BACKOFF_START, max: BACKOFF_MAX };

    /// The wait after `failures` failed dials in a row, before jitter: `start`
    /// doubled once per failure, capped at `max`.
    pub fn delay(&self, failures: u32) -> Duration {
        self.start.saturating_mul(1 << failures.min(MAX_DOUBLINGS)).min(self.max)
    }

    /// [`Backoff::delay`] times a factor drawn from [`JITTER`].
    pub fn jittered<R: rand::Rng + ?Sized>(&self, failures: u32, rng: &mut R) -> Duration {
        self.delay(failures).mul_f64(rng.random_range(JITTER))
    }
}

/// `host` → `host:port`; `host:port` (and `ip:port`, `[ipv6]:port`) stays.
pub fn with_port(addr: &str, port: u16) -> String {
    if addr.parse::<SocketAddr>().is_ok() || addr.rsplit_once(':').is_some_and(|(_, p)| p.parse::<u16>().is_ok()) {
        addr.to_string()
    } else {
        format!("{addr}:{port}")
    }
}

/// Where a target came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TargetSource {
    /// The user named it (`weft launch PEER`, `weft connect`): kept until
    /// forgotten.
    Given,
    /// Learnt from the topology: dropped once no peer lists it.
    Discovered,
}

/// Where a target is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TargetState {
    /// Waiting for its next try.
    Idle,
    /// A dial (connection id) is in flight.
    Dialing(ConnId),
    /// Connected, over this connection (maybe one the peer dialed).
    Connected(ConnId),
    /// It turned out to be this peer: never dialed again.
    Myself,
}

/// An address this peer keeps connected to.
#[derive(Debug, Clone, PartialEq)]
pub struct Target {
    pub source: TargetSource,
    pub state: TargetState,
    /// Failed dials since the last success.
    pub attempts: u32,
    /// Not dialed before this.
    pub next_try: Instant,
    /// Why the last dial or connection failed (for status).
    pub last_error: Option<String>,
}

/// A dial to start: the target is marked dialing with `id`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dial {
    pub id: ConnId,
    /// The target as written (the status key).
    pub target: String,
    /// Its address, or `None` for a name to resolve first.
    pub addr: Option<SocketAddr>,
}

/// The target table.
#[derive(Debug)]
pub struct Targets {
    targets: BTreeMap<String, Target>,
    backoff: Backoff,
    default_port: u16,
}

impl Targets {
    /// An empty table; targets without a port get `default_port`.
    pub fn new(backoff: Backoff, default_port: u16) -> Self {
        Targets { targets: BTreeMap::new(), backoff, default_port }
    }

    /// The target `addr` (as written, with its port).
    pub fn get(&self, addr: &str) -> Option<&Target> {
        self.targets.get(addr)
    }

    /// Every target, by address.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Target)> {
        self.targets.iter().map(|(a, t)| (a.as_str(), t))
    }

    /// Adds `addr` (due at once); a given target stays given, and a
    /// discovered one the user names becomes given.
    pub fn add(&mut self, addr: &str, source: TargetSource, now: Instant) {
        let entry = self.targets.entry(with_port(addr, self.default_port)).or_insert(Target {
            source,
            state: TargetState::Idle,
            attempts: 0,
            next_try: now,
            last_error: None,
        });
        if source == TargetSource::Given {
            entry.source = TargetSource::Given;
        }
    }

    /// `weft connect`: adds given targets; `replace` drops the given ones
    /// first (discovered ones stay).
    pub fn connect(&mut self, addrs: impl IntoIterator<Item = String>, replace: bool, now: Instant) {
        if replace {
            self.targets.retain(|_, t| t.source != TargetSource::Given);
        }
        for a in addrs {
            self.add(&a, TargetSource::Given, now);
        }
    }

    /// `weft forget`: drops targets (their connections stay up).
    pub fn forget(&mut self, addrs: impl IntoIterator<Item = String>) {
        for a in addrs {
            self.targets.remove(&with_port(&a, self.default_port));
        }
    }

    /// Learns peers of peers: `seen` is every connection the topology lists,
    /// as (peer, the address it was reached at). Addresses of peers other than
    /// `me` and not in `connected` become discovered targets; discovered
    /// targets no peer lists any more go, unless connected. Given targets are
    /// never dropped here.
    pub fn learn(
        &mut self,
        me: PeerName,
        seen: impl IntoIterator<Item = (PeerName, SocketAddr)>,
        connected: &BTreeSet<PeerName>,
        now: Instant,
    ) {
        let mut known = BTreeSet::new();
        for (peer, addr) in seen {
            let addr = addr.to_string();
            if peer != me && !connected.contains(&peer) && !self.targets.contains_key(&addr) {
                self.add(&addr, TargetSource::Discovered, now);
            }
            known.insert(addr);
        }
        self.targets.retain(|a, t| {
            t.source == TargetSource::Given || matches!(t.state, TargetState::Connected(_)) || known.contains(a)
        });
    }

    /// The targets to dial now, marked dialing with ids from `next_id`: idle
    /// ones whose time has come, whose address is not one of the `connected`
    /// addresses, in address order, while `open` established connections plus
    /// dials in flight stay under `limit`.
    pub fn due(
        &mut self,
        now: Instant,
        open: usize,
        limit: usize,
        connected: &BTreeSet<SocketAddr>,
        mut next_id: impl FnMut() -> ConnId,
    ) -> Vec<Dial> {
        let dialing = self.targets.values().filter(|t| matches!(t.state, TargetState::Dialing(_))).count();
        let mut budget = limit.saturating_sub(open + dialing);
        let mut dials = Vec::new();
        for (target, t) in &mut self.targets {
            if budget == 0 {
                break;
            }
            if t.state != TargetState::Idle || t.next_try > now {
                continue;
            }
            let addr = target.parse::<SocketAddr>().ok();
            // A name may resolve to a connected address: it is dialed, and the
            // handshake tells (a duplicate costs one connection, briefly).
            if addr.is_some_and(|a| connected.contains(&a)) {
                continue;
            }
            let id = next_id();
            t.state = TargetState::Dialing(id);
            dials.push(Dial { id, target: target.clone(), addr });
            budget -= 1;
        }
        dials
    }

    /// The dial `id` of `target` failed: it waits its backoff (with jitter).
    pub fn dial_failed<R: rand::Rng + ?Sized>(&mut self, target: &str, id: ConnId, error: String, now: Instant, rng: &mut R) {
        let backoff = self.backoff;
        let Some(t) = self.dialing(target, id) else { return };
        t.state = TargetState::Idle;
        t.attempts = t.attempts.saturating_add(1);
        t.next_try = now + backoff.jittered(t.attempts, rng);
        t.last_error = Some(error);
    }

    /// The dial `id` of `target` reached the peer, which is connected over
    /// `conn` (`id` itself, or the connection a duplicate gave way to).
    pub fn dial_connected(&mut self, target: &str, id: ConnId, conn: ConnId) {
        let Some(t) = self.dialing(target, id) else { return };
        t.state = TargetState::Connected(conn);
        t.attempts = 0;
        t.last_error = None;
    }

    /// The dial `id` of `target` reached this very peer.
    pub fn dial_reached_myself(&mut self, target: &str, id: ConnId) {
        if let Some(t) = self.dialing(target, id) {
            t.state = TargetState::Myself;
        }
    }

    fn dialing(&mut self, target: &str, id: ConnId) -> Option<&mut Target> {
        // A result for a dial the table no longer waits for (the target was
        // forgotten, or forgotten and added again) changes nothing.
        self.targets.get_mut(target).filter(|t| t.state == TargetState::Dialing(id))
    }

    /// Connection `id` closed: every target connected over it is dialed again
    /// after [`Backoff::start`].
    pub fn connection_closed(&mut self, id: ConnId, error: &str, now: Instant) {
        for t in self.targets.values_mut().filter(|t| t.state == TargetState::Connected(id)) {
            t.state = TargetState::Idle;
            t.next_try = now + self.backoff.start;
            t.last_error = Some(error.to_string());
        }
    }

    /// Connection `new` replaced `old` under the same peer: targets connected
    /// over `old` are connected over `new`.
    pub fn connection_replaced(&mut self, old: ConnId, new: ConnId) {
        for t in self.targets.values_mut().filter(|t| t.state == TargetState::Connected(old)) {
            t.state = TargetState::Connected(new);
        }
    }
}

/// Which of two connections to one peer survives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Keep {
    Existing,
    New,
}

/// The duplicate-connection rule. Two connections to one peer: keep the one
/// dialed by the peer with the smaller name. Both ends apply it and, since
/// each sees the other's dial as inbound, both keep the same connection
/// whichever handshake each finished first. Two connections of the same
/// direction (one side dialed twice, say a name and an address of one host):
/// the existing one stays.
pub fn keep_on_duplicate(me: PeerName, peer: PeerName, existing_outbound: bool, new_outbound: bool) -> Keep {
    let smaller_dialed_new = if me < peer { new_outbound } else { !new_outbound };
    if existing_outbound != new_outbound && smaller_dialed_new { Keep::New } else { Keep::Existing }
}

/// What to do with a connection whose handshake just finished.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// A new peer: register the connection.
    Accept,
    /// It reached this very peer: close it.
    Myself,
    /// A duplicate, and the existing connection stays: close the new one.
    KeepExisting(ConnId),
    /// A duplicate, and the new one wins: swap it in under the same peer (no
    /// topology change) and close `old`.
    Replace { old: ConnId },
    /// `open` connections reached the limit: refuse it.
    OverLimit,
}

/// The decision for a connection to `peer` (`outbound` if we dialed it), given
/// our established connection to that peer, if any, and the count of
/// established connections. Duplicates are decided before the limit: a swap
/// does not add a connection.
pub fn admit(
    me: PeerName,
    peer: PeerName,
    outbound: bool,
    existing: Option<(ConnId, bool)>,
    open: usize,
    limit: usize,
) -> Admission {
    if peer == me {
        return Admission::Myself;
    }
    if let Some((id, existing_outbound)) = existing {
        return match keep_on_duplicate(me, peer, existing_outbound, outbound) {
            Keep::Existing => Admission::KeepExisting(id),
            Keep::New => Admission::Replace { old: id },
        };
    }
    if open >= limit { Admission::OverLimit } else { Admission::Accept }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    const A: PeerName = PeerName::new(0x0200_0000_0001);
    const B: PeerName = PeerName::new(0x0200_0000_0002);

    fn table() -> (Targets, Instant) {
        (Targets::new(Backoff::DEFAULT, 6783), Instant::now())
    }

    fn sock(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn state(t: &Targets, addr: &str) -> TargetState {
        t.get(addr).unwrap_or_else(|| panic!("no target {addr}")).state
    }

    fn ids() -> impl FnMut() -> ConnId {
        let mut next = 0;
        move || {
            next += 1;
            next
        }
    }

    /// A connection between A and B: who dialed it.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    struct Link {
        dialer: PeerName,
    }

    /// The connection `end` keeps after seeing `first` and then `second`.
    fn kept_at(end: PeerName, first: Link, second: Link) -> Link {
        let other = if end == A { B } else { A };
        match keep_on_duplicate(end, other, first.dialer == end, second.dialer == end) {
            Keep::Existing => first,
            Keep::New => second,
        }
    }

    #[test]
    fn both_ends_keep_the_connection_the_smaller_name_dialed_whatever_the_order() {
        let (by_a, by_b) = (Link { dialer: A }, Link { dialer: B });
        for (x, y) in [(by_a, by_b), (by_b, by_a)] {
            for (p, q) in [(by_a, by_b), (by_b, by_a)] {
                let at_a = kept_at(A, x, y);
                let at_b = kept_at(B, p, q);
                assert_eq!(at_a, at_b, "A saw {x:?} then {y:?}, B saw {p:?} then {q:?}");
                assert_eq!(at_a.dialer, A.min(B), "the smaller name's dial survives");
            }
        }
    }

    #[test]
    fn the_rule_is_the_same_seen_from_either_name() {
        // Every combination: our name smaller or larger, each direction of the
        // existing and the new connection.
        for (me, peer) in [(A, B), (B, A)] {
            for existing_out in [false, true] {
                for new_out in [false, true] {
                    let here = keep_on_duplicate(me, peer, existing_out, new_out);
                    // The other end sees both connections the other way round.
                    let there = keep_on_duplicate(peer, me, !existing_out, !new_out);
                    assert_eq!(here, there, "me {me} existing out {existing_out} new out {new_out}");
                    if existing_out == new_out {
                        assert_eq!(here, Keep::Existing, "same direction: the existing one stays");
                    } else {
                        let new_dialer = if new_out { me } else { peer };
                        let expect = if new_dialer == me.min(peer) { Keep::New } else { Keep::Existing };
                        assert_eq!(here, expect);
                    }
                }
            }
        }
    }

    #[test]
    fn admit_handles_ourselves_duplicates_and_the_limit() {
        assert_eq!(admit(A, A, true, None, 0, 10), Admission::Myself);
        assert_eq!(admit(A, B, true, None, 3, 10), Admission::Accept);
        assert_eq!(admit(A, B, true, None, 10, 10), Admission::OverLimit);
        // A is smaller: its outbound replaces B's dial, not the other way.
        assert_eq!(admit(A, B, true, Some((7, false)), 1, 10), Admission::Replace { old: 7 });
        assert_eq!(admit(A, B, false, Some((7, true)), 1, 10), Admission::KeepExisting(7));
        assert_eq!(admit(B, A, false, Some((7, true)), 1, 10), Admission::Replace { old: 7 });
        assert_eq!(admit(A, B, true, Some((7, true)), 1, 10), Admission::KeepExisting(7));
        // A duplicate is decided at the limit too (a swap adds nothing).
        assert_eq!(admit(A, B, true, Some((7, false)), 10, 10), Admission::Replace { old: 7 });
        assert_eq!(admit(A, B, false, Some((7, true)), 10, 10), Admission::KeepExisting(7));
    }

    #[test]
    fn backoff_doubles_up_to_the_cap_and_jitter_stays_in_bounds() {
        let b = Backoff::DEFAULT;
        assert_eq!(b.delay(0), BACKOFF_START);
        assert_eq!(b.delay(1), BACKOFF_START * 2);
        assert_eq!(b.delay(2), BACKOFF_START * 4);
        let mut previous = Duration::ZERO;
        for n in 0..100 {
            let d = b.delay(n);
            assert!(d >= previous && d <= BACKOFF_MAX, "failure {n}: {d:?}");
            previous = d;
        }
        assert_eq!(b.delay(u32::MAX), BACKOFF_MAX, "no overflow");
        let mut rng = StdRng::seed_from_u64(1);
        let (mut low, mut high) = (Duration::MAX, Duration::ZERO);
        for n in [1, 3, 10, 1000] {
            for _ in 0..1000 {
                let d = b.jittered(n, &mut rng);
                assert!(d >= b.delay(n).mul_f64(JITTER.start) && d < b.delay(n).mul_f64(JITTER.end), "{d:?}");
                if n == 1000 {
                    (low, high) = (low.min(d), high.max(d));
                }
            }
        }
        // The jitter spreads retries: over a thousand draws it covers most of the range.
        assert!(low < BACKOFF_MAX.mul_f64(0.8) && high > BACKOFF_MAX.mul_f64(1.2), "{low:?}..{high:?}");
    }

    #[test]
    fn failed_dials_back_off_and_success_resets() {
        let (mut t, now) = table();
        let mut rng = StdRng::seed_from_u64(7);
        t.add("10.0.0.1", TargetSource::Given, now);
        let mut next = ids();
        let mut when = now;
        for attempt in 1..=10u32 {
            let dials = t.due(when, 0, 100, &BTreeSet::new(), &mut next);
            assert_eq!(dials.len(), 1, "attempt {attempt}");
            assert_eq!(dials[0].target, "10.0.0.1:6783");
            assert_eq!(dials[0].addr, Some(sock("10.0.0.1:6783")));
            t.dial_failed(&dials[0].target, dials[0].id, "refused".into(), when, &mut rng);
            let target = t.get("10.0.0.1:6783").unwrap();
            assert_eq!((target.state, target.attempts), (TargetState::Idle, attempt));
            let next_try = target.next_try;
            let wait = next_try - when;
            let expected = Backoff::DEFAULT.delay(attempt);
            assert!(wait >= expected.mul_f64(JITTER.start) && wait < expected.mul_f64(JITTER.end), "{wait:?}");
            let early = t.due(next_try - Duration::from_millis(1), 0, 100, &BTreeSet::new(), &mut next);
            assert!(early.is_empty(), "not before its time");
            when = next_try;
        }
        let dial = t.due(when, 0, 100, &BTreeSet::new(), &mut next).remove(0);
        t.dial_connected(&dial.target, dial.id, dial.id);
        let target = t.get("10.0.0.1:6783").unwrap();
        assert_eq!((target.state, target.attempts, &target.last_error), (TargetState::Connected(dial.id), 0, &None));
        // Its connection closes: it is dialed again soon, not after the backoff it had.
        t.connection_closed(dial.id, "closed by the peer", when);
        let target = t.get("10.0.0.1:6783").unwrap();
        assert_eq!(target.state, TargetState::Idle);
        assert_eq!(target.next_try, when + BACKOFF_START);
        assert_eq!(target.last_error.as_deref(), Some("closed by the peer"));
    }

    #[test]
    fn the_budget_counts_established_connections_and_dials_in_flight() {
        let (mut t, now) = table();
        for i in 1..=5 {
            t.add(&format!("10.0.0.{i}"), TargetSource::Given, now);
        }
        let mut next = ids();
        // Limit 4 with 1 established: 3 dials.
        let first = t.due(now, 1, 4, &BTreeSet::new(), &mut next);
        assert_eq!(first.iter().map(|d| d.target.as_str()).collect::<Vec<_>>(), ["10.0.0.1:6783", "10.0.0.2:6783", "10.0.0.3:6783"]);
        // Those three are in flight: nothing more.
        assert!(t.due(now, 1, 4, &BTreeSet::new(), &mut next).is_empty());
        // One fails (it waits), one connects (now 2 established, 1 in flight): one more.
        let mut rng = StdRng::seed_from_u64(1);
        t.dial_failed(&first[0].target, first[0].id, "refused".into(), now, &mut rng);
        t.dial_connected(&first[1].target, first[1].id, first[1].id);
        let more = t.due(now, 2, 4, &BTreeSet::new(), &mut next);
        assert_eq!(more.iter().map(|d| d.target.as_str()).collect::<Vec<_>>(), ["10.0.0.4:6783"]);
        // Over the limit (connections the peers dialed count too): none, and no underflow.
        t.add("10.0.0.9", TargetSource::Given, now);
        assert!(t.due(now, 10, 4, &BTreeSet::new(), &mut next).is_empty());
        // Ids are distinct.
        let all: BTreeSet<ConnId> = first.iter().chain(&more).map(|d| d.id).collect();
        assert_eq!(all.len(), 4);
    }

    #[test]
    fn connected_addresses_names_and_ourselves_are_not_dialed() {
        let (mut t, now) = table();
        t.add("10.0.0.1:7000", TargetSource::Given, now);
        t.add("10.0.0.2", TargetSource::Given, now);
        t.add("peer.example", TargetSource::Given, now);
        let connected = BTreeSet::from([sock("10.0.0.1:7000")]);
        let dials = t.due(now, 1, 100, &connected, ids());
        let got: Vec<(&str, Option<SocketAddr>)> = dials.iter().map(|d| (d.target.as_str(), d.addr)).collect();
        assert_eq!(got, [("10.0.0.2:6783", Some(sock("10.0.0.2:6783"))), ("peer.example:6783", None)], "a name is resolved by the dialer");
        assert_eq!(state(&t, "10.0.0.1:7000"), TargetState::Idle);
        // The address turns out to be ours: never dialed again, even when due.
        let ours = &dials[0];
        t.dial_reached_myself(&ours.target, ours.id);
        assert_eq!(state(&t, "10.0.0.2:6783"), TargetState::Myself);
        let later = now + Duration::from_secs(3600);
        let again = t.due(later, 1, 100, &BTreeSet::new(), ids());
        assert!(again.iter().all(|d| d.target != "10.0.0.2:6783"), "{again:?}");
        // Naming it again does not make it dialable; replacing the given targets does.
        t.connect(["10.0.0.2".to_string()], false, later);
        assert_eq!(state(&t, "10.0.0.2:6783"), TargetState::Myself);
        t.connect(["10.0.0.2".to_string()], true, later);
        assert_eq!(state(&t, "10.0.0.2:6783"), TargetState::Idle);
    }

    #[test]
    fn results_of_dials_the_table_no_longer_waits_for_change_nothing() {
        let (mut t, now) = table();
        let mut rng = StdRng::seed_from_u64(1);
        t.add("10.0.0.1", TargetSource::Given, now);
        let old = t.due(now, 0, 10, &BTreeSet::new(), ids()).remove(0);
        // Forgotten and named again while the dial is in flight; dialed anew.
        t.forget(["10.0.0.1".to_string()]);
        t.add("10.0.0.1", TargetSource::Given, now);
        let new = t.due(now, 0, 10, &BTreeSet::new(), || 99).remove(0);
        t.dial_failed(&old.target, old.id, "late".into(), now, &mut rng);
        t.dial_connected(&old.target, old.id, old.id);
        assert_eq!(state(&t, "10.0.0.1:6783"), TargetState::Dialing(new.id));
        t.dial_connected(&new.target, new.id, new.id);
        assert_eq!(state(&t, "10.0.0.1:6783"), TargetState::Connected(99));
    }

    #[test]
    fn a_duplicate_or_a_swap_keeps_the_target_connected_and_its_close_releases_it() {
        let (mut t, now) = table();
        t.add("10.0.0.1", TargetSource::Given, now);
        t.add("10.0.0.2", TargetSource::Given, now);
        let dials = t.due(now, 0, 10, &BTreeSet::new(), ids());
        // Dial 1 was a duplicate of inbound connection 50 (kept); dial 2 won
        // and connection 60 was swapped for it, then it was swapped again.
        t.dial_connected(&dials[0].target, dials[0].id, 50);
        t.dial_connected(&dials[1].target, dials[1].id, dials[1].id);
        t.connection_replaced(dials[1].id, 61);
        assert_eq!(state(&t, "10.0.0.1:6783"), TargetState::Connected(50));
        assert_eq!(state(&t, "10.0.0.2:6783"), TargetState::Connected(61));
        // When those connections go, the targets are dialed again.
        t.connection_closed(50, "closed by the peer", now);
        t.connection_closed(61, "no heartbeat", now);
        let again = t.due(now + BACKOFF_START, 0, 10, &BTreeSet::new(), ids());
        assert_eq!(again.len(), 2, "{again:?}");
    }

    #[test]
    fn forget_and_replace_touch_only_what_they_name() {
        let (mut t, now) = table();
        t.connect(["a.example".to_string(), "10.0.0.1:7000".to_string()], false, now);
        t.add("10.0.0.5:6783", TargetSource::Discovered, now);
        let addrs = |t: &Targets| t.iter().map(|(a, _)| a.to_string()).collect::<Vec<_>>();
        assert_eq!(addrs(&t), ["10.0.0.1:7000", "10.0.0.5:6783", "a.example:6783"]);
        t.forget(["a.example".to_string()]);
        assert_eq!(addrs(&t), ["10.0.0.1:7000", "10.0.0.5:6783"]);
        t.connect(["10.0.0.9".to_string()], true, now);
        assert_eq!(addrs(&t), ["10.0.0.5:6783", "10.0.0.9:6783"], "replace drops the given ones only");
        // A discovered target the user names becomes given (and survives discovery).
        t.connect(["10.0.0.5".to_string()], false, now);
        assert_eq!(t.get("10.0.0.5:6783").unwrap().source, TargetSource::Given);
        // A given target named as discovered stays given.
        t.add("10.0.0.9:6783", TargetSource::Discovered, now);
        assert_eq!(t.get("10.0.0.9:6783").unwrap().source, TargetSource::Given);
        t.forget(["10.0.0.9:6783".to_string(), "nothing.example".to_string()]);
        assert_eq!(addrs(&t), ["10.0.0.5:6783"]);
    }

    #[test]
    fn discovery_adds_peers_of_peers_and_drops_those_gone_but_never_given_ones() {
        let (mut t, now) = table();
        let (c, d) = (PeerName::new(0x0200_0000_0003), PeerName::new(0x0200_0000_0004));
        t.add("10.0.0.2", TargetSource::Given, now);
        // The topology lists: B (connected to us), C, D, and us (as others reach us).
        let seen = [(B, sock("10.0.0.2:6783")), (c, sock("10.0.0.3:6783")), (d, sock("10.0.0.4:6783")), (A, sock("10.0.0.1:6783"))];
        t.learn(A, seen, &BTreeSet::from([B]), now);
        let addrs = |t: &Targets| t.iter().map(|(a, t)| (a.to_string(), t.source)).collect::<Vec<_>>();
        assert_eq!(
            addrs(&t),
            [
                ("10.0.0.2:6783".into(), TargetSource::Given),
                ("10.0.0.3:6783".into(), TargetSource::Discovered),
                ("10.0.0.4:6783".into(), TargetSource::Discovered),
            ],
            "not ourselves, not a connected peer"
        );
        // D connects; then C, D and B leave the topology.
        let dials = t.due(now, 0, 10, &BTreeSet::new(), ids());
        let to_d = dials.iter().find(|x| x.target == "10.0.0.4:6783").unwrap();
        t.dial_connected(&to_d.target, to_d.id, to_d.id);
        t.learn(A, [], &BTreeSet::from([d]), now);
        assert_eq!(
            addrs(&t),
            [("10.0.0.2:6783".into(), TargetSource::Given), ("10.0.0.4:6783".into(), TargetSource::Discovered)],
            "the given target and the connected one stay"
        );
        // Once D's connection is gone, so is its discovered target.
        t.connection_closed(to_d.id, "closed", now);
        t.learn(A, [], &BTreeSet::new(), now);
        assert_eq!(addrs(&t), [("10.0.0.2:6783".into(), TargetSource::Given)]);
    }

    #[test]
    fn addresses_get_the_default_port_only_when_they_have_none() {
        assert_eq!(with_port("10.0.0.1", 6783), "10.0.0.1:6783");
        assert_eq!(with_port("10.0.0.1:7000", 6783), "10.0.0.1:7000");
        assert_eq!(with_port("host.example", 6783), "host.example:6783");
        assert_eq!(with_port("host.example:1", 6783), "host.example:1");
        assert_eq!(with_port("[::1]:7000", 6783), "[::1]:7000");
    }
}
