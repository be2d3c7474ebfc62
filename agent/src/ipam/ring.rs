//! The ring: who owns which part of the address range, as a state-based CRDT.
//!
//! The range is cut at tokens (start addresses); token `t` owns `[t, next token)`
//! and carries `{owner, version, free}`. Only a range's owner changes its token:
//! to give the range to another peer (a donation) it writes the new owner with a
//! higher version, and to give part of it away it first cuts it with new tokens.
//! Merging keeps, per token, the entry with the highest `(version, owner, free)`:
//! a join (commutative, associative, idempotent) over every ring that followed the
//! rules. [`Ring::check`] refuses an update that breaks them — one that changes or
//! cuts a range *we* own — which is what differently seeded rings look like.
//!
//! The one sanctioned exception is [`Ring::reclaim`]: taking over a dead peer's
//! ranges (see [`super::policy`] for when that is allowed), and a range just
//! reclaimed yields to a second reclaimer ([`Ring::merge_yielding`]).
//!
//! Owns: the ring's data and its merge rules. Must not touch: allocations,
//! I/O, policy.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

use crate::mesh::PeerName;

/// One token's entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Entry {
    pub owner: PeerName,
    pub version: u32,
    /// Free addresses in this token's range, as its owner last said.
    pub free: u32,
}

impl Entry {
    fn key(&self) -> (u32, PeerName, u32) {
        (self.version, self.owner, self.free)
    }
}

/// Why an update to the ring was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RingError {
    #[error("the peer's address range is {theirs}, ours is {ours}; all peers need the same --ipalloc-range")]
    RangeMismatch { ours: Ipv4Net, theirs: Ipv4Net },
    #[error("the peer's ring changes our range at {token} (it says {owner} owns it); peers launched with a different --ipalloc-init (seed or consensus group) or a different history cannot share addresses — reset one side")]
    Conflict { token: std::net::Ipv4Addr, owner: PeerName },
    #[error("the peer's ring does not cover the address range {range} from its start (a bug or a damaged state file on that peer): `weft reset` it")]
    Malformed { range: Ipv4Net },
}

/// The ring over one address range.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ring {
    pub range: Ipv4Net,
    entries: BTreeMap<u32, Entry>,
}

fn start(range: Ipv4Net) -> u32 {
    u32::from(range.network())
}

fn end(range: Ipv4Net) -> u64 {
    u64::from(u32::from(range.network())) + (1u64 << (32 - range.prefix_len()))
}

impl Ring {
    /// An empty ring (nobody owns anything yet).
    pub fn new(range: Ipv4Net) -> Self {
        Ring { range: range.trunc(), entries: BTreeMap::new() }
    }

    /// True until initial ownership has been decided.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The tokens.
    pub fn entries(&self) -> impl Iterator<Item = (u32, &Entry)> {
        self.entries.iter().map(|(t, e)| (*t, e))
    }

    /// Every range with its entry: `(start, end exclusive, entry)`.
    pub fn ranges(&self) -> Vec<(u32, u64, Entry)> {
        let mut out = Vec::with_capacity(self.entries.len());
        let mut it = self.entries.iter().peekable();
        while let Some((t, e)) = it.next() {
            let next = it.peek().map_or(end(self.range), |(n, _)| u64::from(**n));
            out.push((*t, next, *e));
        }
        out
    }

    /// The owner of `addr`, if decided.
    pub fn owner_of(&self, addr: u32) -> Option<PeerName> {
        self.entries.range(..=addr).next_back().map(|(_, e)| e.owner)
    }

    /// The token whose range holds `addr`, if decided.
    pub fn token_of(&self, addr: u32) -> Option<u32> {
        self.entries.range(..=addr).next_back().map(|(t, _)| *t)
    }

    /// The ranges `peer` owns.
    pub fn owned_by(&self, peer: PeerName) -> Vec<(u32, u64)> {
        self.ranges().into_iter().filter(|(_, _, e)| e.owner == peer).map(|(s, e, _)| (s, e)).collect()
    }

    /// Decides initial ownership: the range cut into equal parts, one per peer in
    /// name order. Every peer that agrees on `peers` computes the same ring.
    pub fn claim_for_peers(&mut self, peers: &[PeerName]) {
        let mut peers = peers.to_vec();
        peers.sort();
        peers.dedup();
        if peers.is_empty() || !self.entries.is_empty() {
            return;
        }
        let (s, e) = (u64::from(start(self.range)), end(self.range));
        let n = peers.len() as u64;
        for (i, p) in peers.iter().enumerate() {
            let from = s + (e - s) * i as u64 / n;
            let to = s + (e - s) * (i as u64 + 1) / n;
            self.entries.insert(from as u32, Entry { owner: *p, version: 1, free: (to - from) as u32 });
        }
    }

    /// The join with `other` (no rule checks); returns whether anything changed.
    pub fn join(&mut self, other: &Ring) -> bool {
        let mut changed = false;
        for (t, oe) in &other.entries {
            match self.entries.get(t) {
                Some(se) if se.key() >= oe.key() => {}
                _ => {
                    self.entries.insert(*t, *oe);
                    changed = true;
                }
            }
        }
        changed
    }

    /// Checks that merging `other` follows the rules from `me`'s point of view:
    /// nobody else changes or cuts a range `me` owns.
    pub fn check(&self, other: &Ring, me: PeerName) -> Result<(), RingError> {
        self.check_yielding(other, me, &BTreeSet::new())
    }

    /// [`Ring::check`], except that on the `yielding` tokens — ranges `me` has
    /// only just reclaimed and not used yet — a higher entry is no conflict:
    /// it is a second reclaimer of the same peer (or the peer itself, back),
    /// and the join lets it win. A cut of such a range still is a conflict.
    pub fn check_yielding(&self, other: &Ring, me: PeerName, yielding: &BTreeSet<u32>) -> Result<(), RingError> {
        if other.range != self.range {
            return Err(RingError::RangeMismatch { ours: self.range, theirs: other.range });
        }
        // Every address must have an owner once the ring is decided.
        if !other.covers_range() {
            return Err(RingError::Malformed { range: self.range });
        }
        if self.entries.is_empty() {
            return Ok(());
        }
        for (t, oe) in &other.entries {
            let conflict = match self.entries.get(t) {
                // A newer entry that still names us is our own later state,
                // which we lost (a rolled-back state file, a VM snapshot):
                // adopting it gives nothing away.
                Some(se) => se.owner == me && oe.owner != me && oe.key() > se.key() && !yielding.contains(t),
                None => self.owner_of(*t) == Some(me),
            };
            if conflict {
                return Err(RingError::Conflict { token: (*t).into(), owner: oe.owner });
            }
        }
        Ok(())
    }

    /// Checks, then joins.
    pub fn merge(&mut self, other: &Ring, me: PeerName) -> Result<bool, RingError> {
        self.merge_yielding(other, me, &BTreeSet::new())
    }

    /// [`Ring::check_yielding`], then joins.
    pub fn merge_yielding(&mut self, other: &Ring, me: PeerName, yielding: &BTreeSet<u32>) -> Result<bool, RingError> {
        self.check_yielding(other, me, yielding)?;
        Ok(self.join(other))
    }

    fn split_at(&mut self, at: u32) {
        if self.entries.contains_key(&at) || u64::from(at) >= end(self.range) {
            return;
        }
        if let Some((_, e)) = self.entries.range(..at).next_back() {
            // The new token inherits the range's owner; the owner's free count is
            // recomputed by the caller.
            self.entries.insert(at, Entry { owner: e.owner, version: 1, free: 0 });
        }
    }

    /// `me` gives `[from, to)` (which it owns entirely) to `to_peer`.
    pub fn give(&mut self, me: PeerName, from: u32, to: u64, to_peer: PeerName) -> bool {
        if self.owned_by(me).iter().all(|(s, e)| !(u64::from(*s) <= u64::from(from) && to <= *e)) {
            return false;
        }
        self.split_at(from);
        if to < end(self.range) {
            self.split_at(to as u32);
        }
        let mut changed = false;
        for (t, e) in self.entries.range_mut(from..) {
            if u64::from(*t) >= to {
                break;
            }
            if e.owner == me {
                e.owner = to_peer;
                e.version += 1;
                e.free = 0;
                changed = true;
            }
        }
        changed
    }

    /// Sets the free count of `me`'s token `t` (a version bump if it changed).
    pub fn set_free(&mut self, me: PeerName, t: u32, free: u32) -> bool {
        match self.entries.get_mut(&t) {
            Some(e) if e.owner == me && e.free != free => {
                e.free = free;
                e.version += 1;
                true
            }
            _ => false,
        }
    }

    /// Takes every range of `dead` over for `by` (the one exception to the owner
    /// rule); returns how many addresses moved.
    pub fn reclaim(&mut self, dead: PeerName, by: PeerName) -> u64 {
        let sizes: BTreeMap<u32, u64> = self.ranges().into_iter().map(|(s, e, _)| (s, e - u64::from(s))).collect();
        let mut moved = 0;
        for (t, e) in self.entries.iter_mut() {
            if e.owner == dead {
                e.owner = by;
                e.version += 1;
                moved += sizes[t];
            }
        }
        moved
    }

    /// Addresses owned per peer.
    pub fn ownership(&self) -> BTreeMap<PeerName, u64> {
        let mut out = BTreeMap::new();
        for (s, e, entry) in self.ranges() {
            *out.entry(entry.owner).or_default() += e - u64::from(s);
        }
        out
    }

    /// Free addresses per peer, as their owners last said.
    pub fn free_by_peer(&self) -> BTreeMap<PeerName, u64> {
        let mut out = BTreeMap::new();
        for e in self.entries.values() {
            *out.entry(e.owner).or_default() += u64::from(e.free);
        }
        out
    }

    /// Checks the invariants: tokens inside the range, the first at its start.
    pub fn covers_range(&self) -> bool {
        self.entries.is_empty()
            || (self.entries.keys().next() == Some(&start(self.range))
                && self.entries.keys().all(|t| u64::from(*t) < end(self.range)))
    }
}

impl fmt::Display for Ring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (s, e, entry) in self.ranges() {
            writeln!(
                f,
                "{}-{} {} v{} free {}",
                std::net::Ipv4Addr::from(s),
                std::net::Ipv4Addr::from((e - 1) as u32),
                entry.owner,
                entry.version,
                entry.free
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn p(i: u64) -> PeerName {
        PeerName::new(i + 1)
    }

    fn range() -> Ipv4Net {
        "10.32.0.0/24".parse().unwrap()
    }

    /// The address `offset` into the test range (tokens are absolute addresses).
    fn at(offset: u32) -> u32 {
        u32::from(std::net::Ipv4Addr::new(10, 32, 0, 0)) + offset
    }

    /// Rings that followed the rules: one seeded ring, then random owner-only
    /// steps on copies, so the copies are states of one valid history.
    fn histories() -> impl Strategy<Value = Vec<Ring>> {
        proptest::collection::vec((0u64..4, 0u64..4, 0u32..256, 1u32..64, 0usize..3), 0..24).prop_map(|steps| {
            let mut base = Ring::new(range());
            base.claim_for_peers(&[p(0), p(1), p(2), p(3)]);
            // Three replicas, each seeing a prefix of the others' changes.
            let mut replicas = vec![base.clone(), base.clone(), base];
            for (from, to, offset, len, replica) in steps {
                let r = &mut replicas[replica];
                let addr = at(offset);
                let owned = r.owned_by(p(from));
                if let Some((_, e)) = owned.iter().find(|(s, e)| *s <= addr && u64::from(addr) < *e) {
                    let stop = (u64::from(addr) + u64::from(len)).min(*e);
                    assert!(r.give(p(from), addr, stop, p(to)), "a peer can give what it owns");
                }
                // Occasionally a replica hears from another.
                if offset % 3 == 0 {
                    let other = replicas[(replica + 1) % 3].clone();
                    replicas[replica].join(&other);
                }
            }
            replicas
        })
    }

    proptest! {
        #[test]
        fn join_is_commutative_associative_idempotent(rs in histories()) {
            let (a, b, c) = (&rs[0], &rs[1], &rs[2]);
            let j = |x: &Ring, y: &Ring| { let mut z = x.clone(); z.join(y); z };
            prop_assert_eq!(j(a, b), j(b, a));
            prop_assert_eq!(j(&j(a, b), c), j(a, &j(b, c)));
            prop_assert_eq!(j(a, a), a.clone());
            prop_assert_eq!(j(&j(a, b), b), j(a, b));
        }

        #[test]
        fn joined_rings_cover_the_range_with_disjoint_ranges(rs in histories()) {
            let mut all = rs[0].clone();
            all.join(&rs[1]);
            all.join(&rs[2]);
            prop_assert!(all.covers_range());
            let total: u64 = all.ranges().iter().map(|(s, e, _)| e - u64::from(*s)).sum();
            prop_assert_eq!(total, 256, "every address owned exactly once");
        }
    }

    #[test]
    fn differently_seeded_rings_are_refused() {
        let mut a = Ring::new(range());
        a.claim_for_peers(&[p(0), p(1)]);
        let mut c = Ring::new(range());
        c.claim_for_peers(&[p(2)]);
        assert!(matches!(a.check(&c, p(0)), Err(RingError::Conflict { .. })));
        assert!(matches!(c.check(&a, p(2)), Err(RingError::Conflict { .. })));
        let mut other_range = Ring::new("10.40.0.0/24".parse().unwrap());
        other_range.claim_for_peers(&[p(0)]);
        assert!(matches!(a.check(&other_range, p(0)), Err(RingError::RangeMismatch { .. })));
    }

    #[test]
    fn a_just_reclaimed_range_yields_to_a_higher_entry_and_only_it() {
        let mut base = Ring::new(range());
        base.claim_for_peers(&[p(0), p(1), p(2)]);
        let (mut a, mut b) = (base.clone(), base);
        a.reclaim(p(2), p(0));
        b.reclaim(p(2), p(1));
        let taken: BTreeSet<u32> =
            a.ranges().iter().filter(|(_, _, e)| e.owner == p(0) && e.version == 2).map(|(t, _, _)| *t).collect();
        assert_eq!(taken.len(), 1);
        // p(1)'s entry ties in version and wins on the name.
        assert!(matches!(a.check(&b, p(0)), Err(RingError::Conflict { .. })), "without yielding: refused");
        assert!(a.merge_yielding(&b, p(0), &taken).unwrap());
        assert_eq!(a, b, "the join picked p(1)'s entry");
        // Yielding covers only those tokens: a change to p(0)'s own range is still refused.
        let mut c = a.clone();
        c.reclaim(p(0), p(1));
        assert!(matches!(a.check_yielding(&c, p(0), &taken), Err(RingError::Conflict { .. })));
    }

    #[test]
    fn a_ring_that_leaves_addresses_unowned_is_refused() {
        let mut good = Ring::new(range());
        good.claim_for_peers(&[p(0), p(1)]);
        let mut holes = good.clone();
        holes.entries.remove(&at(0));
        assert!(!holes.covers_range());
        let empty = Ring::new(range());
        assert!(matches!(empty.check(&holes, p(2)), Err(RingError::Malformed { .. })), "even into an undecided ring");
        assert!(matches!(good.check(&holes, p(0)), Err(RingError::Malformed { .. })));
        assert!(empty.check(&good, p(2)).is_ok());
    }

    #[test]
    fn a_donation_merges_cleanly_everywhere() {
        let mut a = Ring::new(range());
        a.claim_for_peers(&[p(0), p(1)]);
        let mut b = a.clone();
        assert!(a.give(p(0), at(10), u64::from(at(20)), p(1)));
        assert_eq!(a.owner_of(at(15)), Some(p(1)));
        assert_eq!(a.owner_of(at(20)), Some(p(0)));
        assert_eq!(a.owner_of(at(9)), Some(p(0)));
        assert!(b.merge(&a, p(1)).unwrap());
        assert_eq!(b, a);
        assert!(b.check(&a, p(0)).is_ok(), "p(0)'s own donation is no conflict for p(0)");
        assert!(!a.give(p(1), at(0), u64::from(at(5)), p(0)), "not p(1)'s to give");
        let moved = a.reclaim(p(1), p(0));
        assert_eq!(moved, 128 + 10);
        assert!(a.owned_by(p(1)).is_empty());
    }
}
