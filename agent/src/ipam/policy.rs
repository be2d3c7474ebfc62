//! The safety-critical decisions of IPAM, as pure functions of what the shell
//! observed: when a gone peer's space is taken over automatically
//! ([`Reclaimer`]), whose space `weft rmpeer` may take ([`rmpeer_target`]), and
//! who inherits this peer's space on `weft reset` ([`heir`]).
//!
//! Time, reachability, ownership and the discovery view are passed in: nothing
//! here reads a clock, takes a lock or talks to the mesh, so the tests below
//! drive partitions, flapping peers and disagreeing views directly.
//!
//! Owns: these rules. Must not touch: the ring (the shell applies a decision
//! through [`super::core::Ipam`]), the mesh, the clock, the state file.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use super::IpamError;
use crate::mesh::PeerName;

/// What this peer sees at one moment, as the automatic reclaim rule needs it.
#[derive(Debug, Clone, Copy)]
pub struct View<'a> {
    /// When this look was taken.
    pub now: Instant,
    /// This peer.
    pub me: PeerName,
    /// The peers owning space in the ring (as this peer's ring says).
    pub owners: &'a BTreeSet<PeerName>,
    /// The peers this one can reach now (itself is always counted as reachable).
    pub reachable: &'a BTreeSet<PeerName>,
    /// The underlay addresses the discovery source lists; `None` when no
    /// discovery source runs (a gone peer is then judged by the mesh alone).
    pub discovered: Option<&'a BTreeSet<Ipv4Addr>>,
}

impl View<'_> {
    fn reaches(&self, peer: PeerName) -> bool {
        peer == self.me || self.reachable.contains(&peer)
    }
}

/// Whether a peer that reaches `reachable` (and itself, `me`) may act for the
/// cluster: it reaches a strict majority of the peers owning space. At most one
/// side of a partition can, as long as both sides count the same owners; a tie
/// never acts.
pub fn reaches_majority(me: PeerName, owners: &BTreeSet<PeerName>, reachable: &BTreeSet<PeerName>) -> bool {
    let live = owners.iter().filter(|p| **p == me || reachable.contains(p)).count();
    live * 2 > owners.len()
}

/// Whether `me` has the smallest name among the peers it reaches, so that one
/// peer of the majority side acts (the others would only duplicate its work).
pub fn is_smallest_reachable(me: PeerName, reachable: &BTreeSet<PeerName>) -> bool {
    reachable.iter().next().is_none_or(|first| me <= *first)
}

/// The automatic reclaim rule (`--ipalloc-reclaim-after`), with the clocks it
/// keeps. A peer owning space is reclaimed when all of these hold:
///
/// 1. it has been unreachable, without a break, for longer than the grace
///    period (one sighting restarts its clock);
/// 2. with discovery running, discovery no longer lists the address this peer
///    last saw it announce; a peer whose address was never seen is left to
///    `weft rmpeer`, since whether it was terminated cannot be told;
/// 3. this peer reaches a strict majority of the peers owning space
///    ([`reaches_majority`]) — not counting owners that are unreachable and
///    that discovery says are gone (terminated instances are on no side of a
///    partition, so an Auto Scaling group scaled in from 5 to 2 still
///    reclaims; a side that discovery still lists is counted in full);
/// 4. this peer has the smallest name among those it reaches
///    ([`is_smallest_reachable`]).
///
/// Views can briefly disagree (two peers each the smallest in their own view),
/// so the core does not allocate from reclaimed ranges until they settle.
#[derive(Debug, Clone)]
pub struct Reclaimer {
    grace: Duration,
    /// Owners not reachable, since when (continuously).
    unreachable_since: BTreeMap<PeerName, Instant>,
    /// The last data-plane address each peer was seen announcing.
    last_addr: BTreeMap<PeerName, Ipv4Addr>,
}

impl Reclaimer {
    /// A reclaimer with no history: every clock starts at the first
    /// [`Reclaimer::due`] that sees a peer unreachable.
    pub fn new(grace: Duration) -> Self {
        Reclaimer { grace, unreachable_since: BTreeMap::new(), last_addr: BTreeMap::new() }
    }

    /// The grace period.
    pub fn grace(&self) -> Duration {
        self.grace
    }

    /// `peer` was seen announcing `addr` (from the mesh's topology).
    pub fn saw_address(&mut self, peer: PeerName, addr: Ipv4Addr) {
        self.last_addr.insert(peer, addr);
    }

    /// Since when `peer` has been unreachable, as far as this reclaimer knows.
    pub fn unreachable_since(&self, peer: PeerName) -> Option<Instant> {
        self.unreachable_since.get(&peer).copied()
    }

    /// Updates the clocks from `view` and returns the peers whose space this
    /// peer must take over now (their clocks are then forgotten). Call it on
    /// every tick, whether or not this peer may act: the clocks measure
    /// unreachability as seen from here, majority or not.
    pub fn due(&mut self, view: &View<'_>) -> Vec<PeerName> {
        for p in view.owners {
            if view.reaches(*p) {
                self.unreachable_since.remove(p);
            } else {
                self.unreachable_since.entry(*p).or_insert(view.now);
            }
        }
        // A peer that no longer owns space (reclaimed by another, or gave it
        // away) needs no clock; if it owns space again later, its clock starts then.
        self.unreachable_since.retain(|p, _| view.owners.contains(p));
        let counted: BTreeSet<PeerName> = view
            .owners
            .iter()
            .copied()
            .filter(|p| view.reaches(*p) || !self.confirmed_gone(*p, view.discovered))
            .collect();
        if !reaches_majority(view.me, &counted, view.reachable) {
            return Vec::new();
        }
        if !is_smallest_reachable(view.me, view.reachable) {
            return Vec::new();
        }
        let dead: Vec<PeerName> = self
            .unreachable_since
            .iter()
            .filter(|(_, since)| view.now.saturating_duration_since(**since) > self.grace)
            .filter(|(p, _)| self.gone_from_discovery(**p, view.discovered))
            .map(|(p, _)| *p)
            .collect();
        for p in &dead {
            self.unreachable_since.remove(p);
        }
        dead
    }

    /// Discovery runs and no longer lists the address `peer` was last seen at.
    fn confirmed_gone(&self, peer: PeerName, discovered: Option<&BTreeSet<Ipv4Addr>>) -> bool {
        discovered.is_some() && self.gone_from_discovery(peer, discovered)
    }

    fn gone_from_discovery(&self, peer: PeerName, discovered: Option<&BTreeSet<Ipv4Addr>>) -> bool {
        match (discovered, self.last_addr.get(&peer)) {
            // No discovery source: the mesh's view is all there is.
            (None, _) => true,
            // Discovery still lists its address: it may be coming back.
            (Some(found), Some(addr)) => !found.contains(addr),
            // Discovery runs, but this peer's address was never seen.
            (Some(_), None) => false,
        }
    }
}

/// Whose space `weft rmpeer GIVEN` takes: `given` is a peer name, or the
/// nickname of a peer in `nicknames` (the topology). Refused for this peer
/// itself, for a peer it can reach, and for a peer stopped on purpose
/// (`held`: its data path still forwards, its containers keep their
/// addresses; the caller leaves it empty for `--force`): taking such a peer's
/// space would let two peers hand out the same addresses. A name that is
/// neither in the topology nor an owner is unknown. `owners` name the peers
/// that could be meant, for the error message.
pub fn rmpeer_target<'a>(
    given: &str,
    me: PeerName,
    reachable: &BTreeSet<PeerName>,
    held: &BTreeSet<PeerName>,
    nicknames: impl IntoIterator<Item = (PeerName, &'a str)>,
    owners: impl IntoIterator<Item = PeerName>,
) -> Result<PeerName, IpamError> {
    let known: Vec<(PeerName, &str)> = nicknames.into_iter().collect();
    let owners: Vec<PeerName> = owners.into_iter().collect();
    let unknown = || IpamError::UnknownPeer { given: given.to_string(), known: owners.clone() };
    let peer = match given.parse::<PeerName>() {
        Ok(name) if known.iter().any(|(p, _)| *p == name) || owners.contains(&name) || name == me => name,
        Ok(_) => return Err(unknown()),
        Err(_) => match known.iter().find(|(_, nick)| *nick == given) {
            Some((name, _)) => *name,
            None => return Err(unknown()),
        },
    };
    if peer == me {
        return Err(IpamError::RmpeerSelf);
    }
    if reachable.contains(&peer) {
        return Err(IpamError::PeerReachable { peer });
    }
    if held.contains(&peer) {
        return Err(IpamError::PeerStopped { peer });
    }
    Ok(peer)
}

/// Who inherits this peer's space on `weft reset`: the reachable peer owning
/// the least (the likeliest to need it), ties broken by the smaller name.
/// `Ok(None)` when no other peer is reachable (nothing is given). Refused while
/// `allocated` addresses are still in use here: their containers would keep
/// addresses that then belong to the heir.
pub fn heir(
    me: PeerName,
    reachable: &BTreeSet<PeerName>,
    ownership: &BTreeMap<PeerName, u64>,
    allocated: usize,
) -> Result<Option<PeerName>, IpamError> {
    let heir = reachable
        .iter()
        .filter(|p| **p != me)
        .min_by_key(|p| (ownership.get(p).copied().unwrap_or(0), **p))
        .copied();
    match heir {
        Some(_) if allocated > 0 => Err(IpamError::StillAllocated { count: allocated }),
        heir => Ok(heir),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(i: u64) -> PeerName {
        PeerName::new(0x0200_0000_0000 + i)
    }

    fn set(ps: &[u64]) -> BTreeSet<PeerName> {
        ps.iter().map(|i| p(*i)).collect()
    }

    fn addr(i: u8) -> Ipv4Addr {
        Ipv4Addr::new(192, 168, 0, i)
    }

    const GRACE: Duration = Duration::from_secs(60);

    /// A cluster driven tick by tick: `t(secs)` is the time of a tick.
    struct Clock(Instant);

    impl Clock {
        fn new() -> Self {
            Clock(Instant::now())
        }
        fn t(&self, secs: u64) -> Instant {
            self.0 + Duration::from_secs(secs)
        }
    }

    fn due(
        r: &mut Reclaimer,
        now: Instant,
        me: u64,
        owners: &[u64],
        reachable: &[u64],
        discovered: Option<&BTreeSet<Ipv4Addr>>,
    ) -> Vec<PeerName> {
        let (owners, reachable) = (set(owners), set(reachable));
        r.due(&View { now, me: p(me), owners: &owners, reachable: &reachable, discovered })
    }

    #[test]
    fn majority_is_strict_and_counts_only_owners() {
        let owners = set(&[0, 1, 2, 3]);
        assert!(reaches_majority(p(0), &owners, &set(&[0, 1, 2])), "3 of 4");
        assert!(!reaches_majority(p(0), &owners, &set(&[0, 1])), "2 of 4 is a tie: no majority");
        assert!(!reaches_majority(p(0), &owners, &set(&[0])), "1 of 4");
        // Peers that own nothing (new, observers) do not make a majority.
        assert!(!reaches_majority(p(0), &owners, &set(&[0, 1, 7, 8, 9])));
        // This peer counts even if the caller left it out of `reachable`.
        assert!(reaches_majority(p(0), &owners, &set(&[1, 2])));
        assert!(!reaches_majority(p(0), &BTreeSet::new(), &set(&[0])), "an undecided ring: nobody acts");
    }

    #[test]
    fn exactly_at_grace_waits_and_just_after_reclaims() {
        let c = Clock::new();
        let mut r = Reclaimer::new(GRACE);
        let owners = [0, 1, 2];
        assert!(due(&mut r, c.t(0), 0, &owners, &[0, 1], None).is_empty(), "its clock starts");
        assert!(due(&mut r, c.t(59), 0, &owners, &[0, 1], None).is_empty(), "just before the grace period");
        assert!(due(&mut r, c.t(60), 0, &owners, &[0, 1], None).is_empty(), "exactly the grace period: not longer");
        let later = c.t(60) + Duration::from_millis(1);
        let (o, rc) = (set(&owners), set(&[0, 1]));
        assert_eq!(r.due(&View { now: later, me: p(0), owners: &o, reachable: &rc, discovered: None }), vec![p(2)]);
        assert_eq!(r.unreachable_since(p(2)), None, "its clock is forgotten once reclaimed");
        assert!(due(&mut r, c.t(61), 0, &[0, 1], &[0, 1], None).is_empty(), "it owns nothing now: nothing more to do");
    }

    #[test]
    fn a_peer_that_comes_back_briefly_restarts_its_clock() {
        let c = Clock::new();
        let mut r = Reclaimer::new(GRACE);
        let owners = [0, 1, 2];
        due(&mut r, c.t(0), 0, &owners, &[0, 1], None);
        assert!(due(&mut r, c.t(50), 0, &owners, &[0, 1, 2], None).is_empty(), "seen for one tick");
        assert_eq!(r.unreachable_since(p(2)), None);
        assert!(due(&mut r, c.t(51), 0, &owners, &[0, 1], None).is_empty(), "gone again: a new clock");
        assert!(due(&mut r, c.t(100), 0, &owners, &[0, 1], None).is_empty(), "100 s since it first went, 49 since it last went");
        assert!(due(&mut r, c.t(111), 0, &owners, &[0, 1], None).is_empty(), "exactly 60 s since it last went");
        assert_eq!(due(&mut r, c.t(112), 0, &owners, &[0, 1], None), vec![p(2)]);
    }

    #[test]
    fn a_flapping_peer_is_never_reclaimed() {
        let c = Clock::new();
        let mut r = Reclaimer::new(GRACE);
        let owners = [0, 1, 2];
        // Away 50 s, back 1 s, for ten minutes: never away longer than the grace period.
        for cycle in 0..12 {
            let start = cycle * 51;
            for s in (start..start + 50).step_by(5) {
                assert!(due(&mut r, c.t(s), 0, &owners, &[0, 1], None).is_empty(), "cycle {cycle}, {s} s");
            }
            assert!(due(&mut r, c.t(start + 50), 0, &owners, &[0, 1, 2], None).is_empty());
        }
    }

    #[test]
    fn a_minority_never_reclaims_and_a_tie_never_reclaims() {
        let c = Clock::new();
        // 5 owners, split 2 | 3: the side of 2 never acts, however long.
        let owners = [0, 1, 2, 3, 4];
        let mut minority = Reclaimer::new(GRACE);
        for s in (0..3600).step_by(10) {
            assert!(due(&mut minority, c.t(s), 0, &owners, &[0, 1], None).is_empty(), "minority at {s} s");
        }
        // 4 owners, split 2 | 2: neither side acts.
        let owners = [0, 1, 2, 3];
        let mut left = Reclaimer::new(GRACE);
        let mut right = Reclaimer::new(GRACE);
        for s in (0..3600).step_by(10) {
            assert!(due(&mut left, c.t(s), 0, &owners, &[0, 1], None).is_empty(), "tie, left, at {s} s");
            assert!(due(&mut right, c.t(s), 2, &owners, &[2, 3], None).is_empty(), "tie, right, at {s} s");
        }
    }

    #[test]
    fn two_sides_of_a_split_never_both_reclaim_the_same_peer() {
        // 5 owners; every way to cut them in two, every peer of each side
        // running the rule: only one side ever acts, and on it only one peer.
        let owners: Vec<u64> = (0..5).collect();
        for mask in 1u32..(1 << 5) - 1 {
            let c = Clock::new();
            let side_a: Vec<u64> = owners.iter().copied().filter(|i| mask & (1 << i) != 0).collect();
            let side_b: Vec<u64> = owners.iter().copied().filter(|i| mask & (1 << i) == 0).collect();
            let mut actors: BTreeMap<PeerName, Vec<PeerName>> = BTreeMap::new();
            for side in [&side_a, &side_b] {
                for me in side {
                    let mut r = Reclaimer::new(GRACE);
                    due(&mut r, c.t(0), *me, &owners, side, None);
                    let got = due(&mut r, c.t(61), *me, &owners, side, None);
                    if !got.is_empty() {
                        actors.insert(p(*me), got);
                    }
                }
            }
            let (big, small) = if side_a.len() > side_b.len() { (&side_a, &side_b) } else { (&side_b, &side_a) };
            assert_eq!(actors.len(), 1, "split {side_a:?} | {side_b:?}: exactly one peer acts: {actors:?}");
            let (actor, took) = actors.iter().next().unwrap();
            assert_eq!(*actor, p(big[0]), "the smallest name of the majority side");
            assert_eq!(took, &set(small).into_iter().collect::<Vec<_>>(), "it takes exactly the other side");
        }
    }

    #[test]
    fn only_the_smallest_reachable_name_acts_even_when_views_disagree() {
        let c = Clock::new();
        let owners = [1, 2, 3, 4, 5];
        // Peer 5 is gone. Peers 1..4 agree: only peer 1 acts.
        for me in 1..=4 {
            let mut r = Reclaimer::new(GRACE);
            due(&mut r, c.t(0), me, &owners, &[1, 2, 3, 4], None);
            let got = due(&mut r, c.t(61), me, &owners, &[1, 2, 3, 4], None);
            assert_eq!(got, if me == 1 { vec![p(5)] } else { vec![] }, "peer {me}");
        }
        // A non-owner with a smaller name (an observer, a new peer) is the one that acts.
        let mut r = Reclaimer::new(GRACE);
        due(&mut r, c.t(0), 1, &owners, &[0, 1, 2, 3, 4], None);
        assert!(due(&mut r, c.t(61), 1, &owners, &[0, 1, 2, 3, 4], None).is_empty(), "peer 0 is smaller");
        // Views disagree: peer 2 momentarily misses peer 1 (its routes are
        // being recomputed) and is the smallest in its own view; it still
        // reaches 3 of 5 owners, so it acts too. This is the case the core's
        // settle period covers: neither allocates from the ranges until the
        // ring's order has picked one owner (see core's
        // `two_reclaimers_of_one_peer_settle_before_allocating`).
        let mut one = Reclaimer::new(GRACE);
        let mut two = Reclaimer::new(GRACE);
        due(&mut one, c.t(0), 1, &owners, &[1, 2, 3, 4], None);
        due(&mut two, c.t(0), 2, &owners, &[1, 2, 3, 4], None);
        assert_eq!(due(&mut one, c.t(61), 1, &owners, &[1, 2, 3, 4], None), vec![p(5)]);
        assert_eq!(due(&mut two, c.t(61), 2, &owners, &[2, 3, 4], None), vec![p(5)]);
        // But a peer that misses the smaller one *and* so falls to a tie does not act.
        let mut two = Reclaimer::new(GRACE);
        let owners = [1, 2, 3, 4];
        due(&mut two, c.t(0), 2, &owners, &[2, 3], None);
        assert!(due(&mut two, c.t(61), 2, &owners, &[2, 3], None).is_empty());
    }

    #[test]
    fn discovery_decides_when_it_runs() {
        let c = Clock::new();
        let owners = [0, 1, 2];
        let still = BTreeSet::from([addr(0), addr(1), addr(2)]);
        let gone = BTreeSet::from([addr(0), addr(1)]);
        // Discovery still lists its address: it may be coming back, however long.
        let mut r = Reclaimer::new(GRACE);
        r.saw_address(p(2), addr(2));
        due(&mut r, c.t(0), 0, &owners, &[0, 1], Some(&still));
        assert!(due(&mut r, c.t(3600), 0, &owners, &[0, 1], Some(&still)).is_empty(), "still listed");
        // ... until it no longer does: its clock ran all along.
        assert_eq!(due(&mut r, c.t(3601), 0, &owners, &[0, 1], Some(&gone)), vec![p(2)]);
        // Never saw its address: `weft rmpeer` decides, however long.
        let mut r = Reclaimer::new(GRACE);
        due(&mut r, c.t(0), 0, &owners, &[0, 1], Some(&gone));
        assert!(due(&mut r, c.t(3600), 0, &owners, &[0, 1], Some(&gone)).is_empty(), "address never seen");
        // Without discovery, the mesh's view is enough.
        assert_eq!(due(&mut r, c.t(3601), 0, &owners, &[0, 1], None), vec![p(2)]);
        // The last address seen counts: it moved, and discovery lists only the old one.
        let mut r = Reclaimer::new(GRACE);
        r.saw_address(p(2), addr(2));
        r.saw_address(p(2), addr(9));
        due(&mut r, c.t(0), 0, &owners, &[0, 1], Some(&still));
        assert_eq!(due(&mut r, c.t(61), 0, &owners, &[0, 1], Some(&still)), vec![p(2)], "its last address is gone");
    }

    #[test]
    fn owners_that_change_while_a_peer_is_unreachable() {
        let c = Clock::new();
        // Owners 0..3; 2 and 3 gone: a tie, nobody acts.
        let mut r = Reclaimer::new(GRACE);
        due(&mut r, c.t(0), 0, &[0, 1, 2, 3], &[0, 1], None);
        assert!(due(&mut r, c.t(120), 0, &[0, 1, 2, 3], &[0, 1], None).is_empty(), "a tie");
        // Someone `weft rmpeer`s 3 (its space goes to 1): 2 of 3 owners reached,
        // and 2's clock has run since t=0.
        assert_eq!(due(&mut r, c.t(121), 0, &[0, 1, 2], &[0, 1], None), vec![p(2)]);
        // Another peer reclaimed a gone owner first: its clock is dropped, and
        // if it owns space again (donated while we could not see it) the clock
        // starts afresh.
        let mut r = Reclaimer::new(GRACE);
        due(&mut r, c.t(0), 0, &[0, 1, 2, 4], &[0, 1, 2], None);
        due(&mut r, c.t(30), 0, &[0, 1, 2], &[0, 1, 2], None);
        assert_eq!(r.unreachable_since(p(4)), None);
        due(&mut r, c.t(40), 0, &[0, 1, 2, 4], &[0, 1, 2], None);
        assert_eq!(r.unreachable_since(p(4)), Some(c.t(40)));
        assert!(due(&mut r, c.t(90), 0, &[0, 1, 2, 4], &[0, 1, 2], None).is_empty(), "50 s on the new clock");
        assert_eq!(due(&mut r, c.t(101), 0, &[0, 1, 2, 4], &[0, 1, 2], None), vec![p(4)]);
        // New owners joining on the other side turn a majority into a tie: no action.
        let mut r = Reclaimer::new(GRACE);
        due(&mut r, c.t(0), 0, &[0, 1, 2], &[0, 1], None);
        assert!(due(&mut r, c.t(61), 0, &[0, 1, 2, 3], &[0, 1], None).is_empty());
        // A clock kept while in the minority counts once the majority is back.
        let mut r = Reclaimer::new(GRACE);
        due(&mut r, c.t(0), 0, &[0, 1, 2, 3, 4], &[0, 1], None);
        assert!(due(&mut r, c.t(100), 0, &[0, 1, 2, 3, 4], &[0, 1], None).is_empty(), "minority");
        assert_eq!(due(&mut r, c.t(101), 0, &[0, 1, 2, 3, 4], &[0, 1, 2], None), vec![p(3), p(4)]);
    }

    #[test]
    fn rmpeer_refuses_itself_and_reachable_peers_and_resolves_nicknames() {
        let me = p(0);
        let reach = set(&[0, 1]);
        let none = BTreeSet::new();
        let nicks = [(p(0), "host-a"), (p(1), "host-b"), (p(2), "host-c")];
        let owners = [p(0), p(1), p(2)];
        assert_eq!(rmpeer_target(&p(2).to_string(), me, &reach, &none, nicks, owners).unwrap(), p(2));
        assert_eq!(rmpeer_target("host-c", me, &reach, &none, nicks, owners).unwrap(), p(2), "by nickname");
        let err = rmpeer_target("host-b", me, &reach, &none, nicks, owners).unwrap_err();
        assert!(matches!(err, IpamError::PeerReachable { peer } if peer == p(1)), "{err}");
        assert!(err.to_string().contains("reachable") && err.to_string().contains("stop it"), "{err}");
        let err = rmpeer_target(&p(0).to_string(), me, &reach, &none, nicks, owners).unwrap_err();
        assert!(matches!(err, IpamError::RmpeerSelf), "{err}");
        assert!(err.to_string().contains("weft reset"), "{err}");
        assert!(matches!(rmpeer_target("host-a", me, &reach, &none, nicks, owners), Err(IpamError::RmpeerSelf)));
        let err = rmpeer_target("nobody", me, &reach, &none, nicks, owners).unwrap_err();
        let IpamError::UnknownPeer { given, known } = &err else { panic!("{err}") };
        assert_eq!((given.as_str(), known.as_slice()), ("nobody", owners.as_slice()));
        let msg = err.to_string();
        assert!(owners.iter().all(|o| msg.contains(&o.to_string())) && msg.contains("nickname"), "{msg}");
        // A well-formed name nobody knows is unknown too (not a silent "0 taken over").
        let err = rmpeer_target(&p(9).to_string(), me, &reach, &none, nicks, owners).unwrap_err();
        assert!(matches!(err, IpamError::UnknownPeer { .. }), "{err}");
        // A peer stopped on purpose (held): refused, unless forced (the caller
        // then passes no held peers).
        let held = set(&[2]);
        let err = rmpeer_target("host-c", me, &reach, &held, nicks, owners).unwrap_err();
        assert!(matches!(err, IpamError::PeerStopped { peer } if peer == p(2)), "{err}");
        assert!(err.to_string().contains("--force") && err.to_string().contains("twice"), "{err}");
        assert_eq!(rmpeer_target("host-c", me, &reach, &none, nicks, owners).unwrap(), p(2), "forced");
    }

    #[test]
    fn the_heir_is_the_reachable_peer_owning_least() {
        let me = p(0);
        let owned = BTreeMap::from([(p(0), 100), (p(1), 50), (p(2), 10), (p(3), 10), (p(4), 1)]);
        // p(4) owns least but is unreachable; p(2) and p(3) tie: the smaller name.
        assert_eq!(heir(me, &set(&[0, 1, 2, 3]), &owned, 0).unwrap(), Some(p(2)));
        // A reachable peer owning nothing (not in the ring) is the likeliest to need it.
        assert_eq!(heir(me, &set(&[0, 1, 2, 7]), &owned, 0).unwrap(), Some(p(7)));
        assert_eq!(heir(me, &set(&[0]), &owned, 0).unwrap(), None, "alone: nobody to give to");
        assert_eq!(heir(me, &set(&[0]), &owned, 3).unwrap(), None, "alone, nothing is given, so nothing is refused");
        let err = heir(me, &set(&[0, 1]), &owned, 3).unwrap_err();
        assert!(matches!(err, IpamError::StillAllocated { count: 3 }), "{err}");
        assert!(err.to_string().contains("detach"), "{err}");
    }

    #[test]
    fn a_group_scaled_in_past_half_still_reclaims_what_discovery_says_is_gone() {
        let c = Clock::new();
        let owners = [0, 1, 2, 3, 4];
        let saw_all = |r: &mut Reclaimer| {
            for i in 0..5u64 {
                r.saw_address(p(i), addr(i as u8 + 1));
            }
        };
        // 5 -> 2: peers 2, 3, 4 terminated (gone from discovery), 0 and 1 remain.
        let left: BTreeSet<Ipv4Addr> = [addr(1), addr(2)].into();
        let mut r = Reclaimer::new(GRACE);
        saw_all(&mut r);
        assert!(due(&mut r, c.t(0), 0, &owners, &[0, 1], Some(&left)).is_empty(), "clocks start");
        assert_eq!(due(&mut r, c.t(61), 0, &owners, &[0, 1], Some(&left)), set(&[2, 3, 4]).into_iter().collect::<Vec<_>>());
        // The same split while discovery still lists them (a partition, not a
        // scale-in): 2 of 5 never acts.
        let all: BTreeSet<Ipv4Addr> = (1..=5).map(addr).collect();
        let mut r = Reclaimer::new(GRACE);
        saw_all(&mut r);
        for s in (0..3600).step_by(60) {
            assert!(due(&mut r, c.t(s), 0, &owners, &[0, 1], Some(&all)).is_empty(), "a minority at {s} s");
        }
        // The other side of that partition sees 0 and 1 listed too: only one
        // side can ever count a majority. Here 2, 3, 4 reach each other and
        // discovery lists everyone: they may act, 0 and 1 may not.
        let mut big = Reclaimer::new(GRACE);
        saw_all(&mut big);
        due(&mut big, c.t(0), 2, &owners, &[2, 3, 4], Some(&all));
        assert!(due(&mut big, c.t(61), 2, &owners, &[2, 3, 4], Some(&all)).is_empty(), "listed: not reclaimed, majority or not");
        // A terminated peer whose address was never seen still counts.
        let mut blind = Reclaimer::new(GRACE);
        due(&mut blind, c.t(0), 0, &owners, &[0, 1], Some(&left));
        assert!(due(&mut blind, c.t(61), 0, &owners, &[0, 1], Some(&left)).is_empty(), "never seen: left to rmpeer");
    }

}
