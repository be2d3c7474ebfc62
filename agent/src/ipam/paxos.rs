//! Initial ownership by agreement (`--ipalloc-init consensus=N`): single-decree
//! Paxos whose messages are the peers' gossiped state, as Weave did it.
//!
//! Every peer publishes its [`Claims`]: the highest proposal it promised and the
//! value it accepted. A proposer picks a round above any it has seen; acceptors
//! promise the highest proposal they see; once a quorum (N/2+1) promised its
//! proposal, the proposer accepts a value — the highest already accepted among
//! them, else the set of voting peers it knows — and acceptors follow. A value
//! accepted under one proposal by a quorum is chosen, and every peer cuts the
//! ring the same way for it. Observers may propose (trigger an election) but
//! never vote and are never in the value.
//!
//! Safety needs every peer to use the same N: quorums must intersect.
//!
//! Owns: the agreement on initial ownership. Must not touch: the ring (the
//! core cuts it once a value is chosen), I/O.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::mesh::PeerName;

/// A proposal number: ordered by round, then proposer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Proposal {
    pub round: u64,
    pub proposer: Option<PeerName>,
}

/// One peer's Paxos state, as gossiped. Only that peer changes it.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Claims {
    /// Increases with every change (the merge keeps the highest).
    pub version: u64,
    pub observer: bool,
    /// The highest proposal promised (or, for its proposer, made).
    pub promise: Proposal,
    /// The value accepted, under which proposal.
    pub accepted: Option<(Proposal, Vec<PeerName>)>,
}

/// Every peer's claims as known here.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Paxos {
    me: PeerName,
    quorum: usize,
    pub claims: BTreeMap<PeerName, Claims>,
}

impl Paxos {
    /// Paxos for `me` among `n` initial voters.
    pub fn new(me: PeerName, n: usize, observer: bool) -> Self {
        let own = Claims { observer, ..Claims::default() };
        Paxos { me, quorum: n / 2 + 1, claims: BTreeMap::from([(me, own)]) }
    }

    /// Whether this is `me`'s state, with `me`'s own claims (the invariant
    /// [`Paxos::new`] sets up and every method relies on): a saved state is
    /// restored only if it is.
    pub fn is_for(&self, me: PeerName) -> bool {
        self.me == me && self.claims.contains_key(&me)
    }

    /// How many votes make a quorum.
    pub fn quorum(&self) -> usize {
        self.quorum
    }

    /// Raises the quorum to a majority of `n` voters if that is more than it
    /// is; never lowers it (a smaller quorum could miss one already counted).
    /// Returns whether it changed.
    pub fn raise_quorum(&mut self, n: usize) -> bool {
        let q = n / 2 + 1;
        if q > self.quorum {
            self.quorum = q;
            true
        } else {
            false
        }
    }

    fn own(&mut self) -> &mut Claims {
        // Paxos::new puts them there, merge never replaces them, and a saved
        // state is restored only if is_for(me).
        self.claims.get_mut(&self.me).expect("own claims")
    }

    fn bump(&mut self) {
        self.own().version += 1;
    }

    /// Merges another peer's view; returns whether anything changed.
    pub fn merge(&mut self, other: &BTreeMap<PeerName, Claims>) -> bool {
        let mut changed = false;
        for (p, c) in other {
            if *p == self.me {
                continue;
            }
            let newer = self.claims.get(p).is_none_or(|cur| (cur.version, cur) < (c.version, c));
            if newer {
                self.claims.insert(*p, c.clone());
                changed = true;
            }
        }
        changed
    }

    fn highest_seen(&self) -> Proposal {
        self.claims
            .values()
            .flat_map(|c| [Some(c.promise), c.accepted.as_ref().map(|(p, _)| *p)])
            .flatten()
            .max()
            .unwrap_or_default()
    }

    /// Starts (or restarts) an election with a round above any seen.
    pub fn propose(&mut self) {
        let round = self.highest_seen().round + 1;
        let me = self.me;
        self.own().promise = Proposal { round, proposer: Some(me) };
        self.bump();
    }

    /// Whether anyone has proposed yet.
    pub fn any_proposal(&self) -> bool {
        self.highest_seen() != Proposal::default()
    }

    /// The voting peers known.
    pub fn voters(&self) -> Vec<PeerName> {
        self.claims.iter().filter(|(_, c)| !c.observer).map(|(p, _)| *p).collect()
    }

    /// Does this peer's part after a merge; returns whether its claims changed.
    pub fn step(&mut self) -> bool {
        let me = self.me;
        let observer = self.claims[&me].observer;
        let mut changed = false;
        // Acceptor: promise the highest proposal anyone made.
        if !observer {
            let made = self
                .claims
                .iter()
                .filter(|(p, c)| c.promise.proposer == Some(**p))
                .map(|(_, c)| c.promise)
                .max()
                .unwrap_or_default();
            if made > self.claims[&me].promise {
                self.own().promise = made;
                changed = true;
            }
            // Accept the value its proposer accepted, if not promised higher.
            let offer = self
                .claims
                .iter()
                .filter_map(|(p, c)| c.accepted.as_ref().filter(|(n, _)| n.proposer == Some(*p)).cloned())
                .max_by_key(|(n, _)| *n);
            if let Some((n, v)) = offer {
                let mine = self.claims[&me].clone();
                if n >= mine.promise && mine.accepted.as_ref().is_none_or(|(m, _)| *m < n) {
                    let own = self.own();
                    own.promise = n;
                    own.accepted = Some((n, v));
                    changed = true;
                }
            }
        }
        // Proposer: with a quorum of promises for our proposal, accept a value.
        let mine = self.claims[&me].clone();
        if mine.promise.proposer == Some(me) && mine.accepted.as_ref().is_none_or(|(n, _)| *n != mine.promise) {
            let promisers: Vec<&Claims> =
                self.claims.values().filter(|c| !c.observer && c.promise == mine.promise).collect();
            if promisers.len() >= self.quorum {
                let value = promisers
                    .iter()
                    .filter_map(|c| c.accepted.clone())
                    .max_by_key(|(n, _)| *n)
                    .map(|(_, v)| v)
                    .unwrap_or_else(|| self.voters());
                self.own().accepted = Some((mine.promise, value));
                changed = true;
            }
        }
        if changed {
            self.bump();
        }
        changed
    }

    /// The chosen value, once a quorum accepted one value under one proposal.
    pub fn chosen(&self) -> Option<Vec<PeerName>> {
        let mut votes: BTreeMap<&(Proposal, Vec<PeerName>), usize> = BTreeMap::new();
        for c in self.claims.values().filter(|c| !c.observer) {
            if let Some(a) = &c.accepted {
                *votes.entry(a).or_default() += 1;
            }
        }
        votes.into_iter().find(|(_, n)| *n >= self.quorum).map(|((_, v), _)| v.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn name(i: u64) -> PeerName {
        PeerName::new(100 + i)
    }

    /// Gossip between random pairs, with random proposers, until quiet.
    fn run(nodes: &mut [Paxos], schedule: &[(usize, usize, bool)]) {
        for &(a, b, propose) in schedule {
            let (a, b) = (a % nodes.len(), b % nodes.len());
            if propose && nodes[a].chosen().is_none() {
                nodes[a].propose();
            }
            let from_b = nodes[b].claims.clone();
            nodes[a].merge(&from_b);
            nodes[a].step();
        }
    }

    proptest! {
        /// Whatever the interleaving of proposals and gossip, no two peers ever
        /// learn different values.
        #[test]
        fn at_most_one_value_is_chosen(
            schedule in proptest::collection::vec((0usize..5, 0usize..5, proptest::bool::weighted(0.2)), 1..300)
        ) {
            let mut nodes: Vec<Paxos> = (0..5).map(|i| Paxos::new(name(i), 5, i == 4)).collect();
            run(&mut nodes, &schedule);
            // Then everyone hears everyone, a few times over.
            for _ in 0..4 {
                for a in 0..5 {
                    for b in 0..5 {
                        let c = nodes[b].claims.clone();
                        nodes[a].merge(&c);
                        nodes[a].step();
                    }
                }
            }
            let chosen: Vec<Option<Vec<PeerName>>> = nodes.iter().map(Paxos::chosen).collect();
            let values: std::collections::BTreeSet<&Vec<PeerName>> = chosen.iter().flatten().collect();
            prop_assert!(values.len() <= 1, "two values chosen: {:?}", values);
            if let Some(v) = values.iter().next() {
                prop_assert!(!v.contains(&name(4)), "an observer is never given space");
            }
            // Liveness: once proposals stop and everyone hears everyone, the
            // highest proposal wins and every peer learns the value.
            if schedule.iter().any(|(_, _, propose)| *propose) {
                prop_assert!(chosen.iter().all(Option::is_some), "someone proposed, so all must learn a value: {:?}", chosen);
            }
        }
    }

    #[test]
    fn an_observer_can_trigger_but_not_vote() {
        // Two voters (N=2, quorum 2) and an observer that proposes.
        let mut nodes = [Paxos::new(name(0), 2, false), Paxos::new(name(1), 2, false), Paxos::new(name(9), 2, true)];
        nodes[2].propose();
        for _ in 0..6 {
            for a in 0..3 {
                for b in 0..3 {
                    let c = nodes[b].claims.clone();
                    nodes[a].merge(&c);
                    nodes[a].step();
                }
            }
        }
        let chosen = nodes[2].chosen().expect("the observer's election succeeded");
        assert_eq!(chosen, vec![name(0), name(1)]);
        // One voter alone cannot decide for two.
        let mut lonely = Paxos::new(name(0), 2, false);
        lonely.propose();
        lonely.step();
        assert!(lonely.chosen().is_none(), "no quorum, no decision");
    }
}
