//! The mesh side of IPAM: the `ipam` channel's [`Gossiper`], which the mesh's
//! task calls. It merges the peers' rings and votes into the shared state,
//! hands unicasts to the actor and wakes it when there is something to persist
//! or pass on.
//!
//! Owns: [`Shared`] (the state both sides lock) and the encoding of IPAM's
//! wire types. Must not touch: the state file, request answers, anything sent
//! in our own name — those wait for the actor, which persists first.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use serde::Serialize;
use tokio::sync::{Notify, mpsc, watch};
use tracing::warn;

use super::CHANNEL;
use super::core::{Effect, GossipState, Ipam, Msg};
use crate::mesh::{GossipError, Gossiper, PeerName};

/// What the mesh's callbacks share with the actor.
pub(super) struct Shared {
    ipam: Mutex<Ipam>,
    /// The gossip handler found something to persist or pass on.
    dirty: Notify,
    /// ... and our own state changed in a way the peers must hear (Paxos).
    gossip_due: AtomicBool,
    unicasts: mpsc::UnboundedSender<(PeerName, Msg)>,
    /// The last ring refused (a peer seeded differently), for the status.
    conflict: watch::Sender<Option<String>>,
}

impl Shared {
    /// Shares `ipam`; the receiver gets the unicasts the peers send.
    pub(super) fn new(ipam: Ipam) -> (Arc<Shared>, mpsc::UnboundedReceiver<(PeerName, Msg)>) {
        let (unicasts, rx) = mpsc::unbounded_channel();
        let shared = Shared {
            ipam: Mutex::new(ipam),
            dirty: Notify::new(),
            gossip_due: AtomicBool::new(false),
            unicasts,
            conflict: watch::Sender::new(None),
        };
        (Arc::new(shared), rx)
    }

    /// The IPAM state. Whoever holds this lock runs the pure core, which does
    /// not panic on any input; a poisoned lock therefore means a bug, and going
    /// on with a state left half-changed could hand out an address twice.
    pub(super) fn lock(&self) -> MutexGuard<'_, Ipam> {
        self.ipam.lock().expect("the ipam lock is poisoned: code holding it panicked, a bug (see the panic in the log)")
    }

    /// Resolves when the gossip handler changed something.
    pub(super) async fn dirtied(&self) {
        self.dirty.notified().await;
    }

    /// Whether our own state changed in a way the peers must hear (and clears it).
    pub(super) fn take_gossip_due(&self) -> bool {
        self.gossip_due.swap(false, Ordering::Relaxed)
    }

    /// The last conflicting ring refused, if any.
    pub(super) fn conflict(&self) -> Option<String> {
        self.conflict.borrow().clone()
    }
}

/// Encodes one of IPAM's own wire types. Postcard fails only for what serde
/// cannot describe to it (sequences of unknown length, `serialize_any`), which
/// the derived structs, enums, vectors and maps here never are, and writing to
/// a `Vec` cannot fail: an error is a bug in these types.
pub(super) fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    postcard::to_stdvec(value).expect("postcard encodes IPAM's own derived types (a bug otherwise)")
}

/// The `ipam` channel's handler.
pub(super) struct IpamGossiper(pub(super) Arc<Shared>);

impl Gossiper for IpamGossiper {
    fn full_state(&self) -> Vec<u8> {
        encode(&self.0.lock().gossip_state())
    }

    fn on_gossip(&self, from: PeerName, update: &[u8]) -> Result<Option<Vec<u8>>, GossipError> {
        let state: GossipState = postcard::from_bytes(update)
            .map_err(|e| GossipError::Decode { channel: CHANNEL.into(), detail: e.to_string() })?;
        let mut ipam = self.0.lock();
        let mut effects = Vec::new();
        match ipam.on_gossip(&state, &mut effects) {
            Ok(changed) => {
                // Passing the merged state on at once is fine for what other
                // peers said, but not once our own state changed with it (a
                // Paxos promise): that is said only after it is on disk, by
                // the actor, which gossips the whole state after its write.
                let own_change = effects.contains(&Effect::Persist);
                let forward = (changed && !own_change).then(|| encode(&ipam.gossip_state()));
                drop(ipam);
                if effects.contains(&Effect::Gossip) {
                    self.0.gossip_due.store(true, Ordering::Relaxed);
                }
                if changed || !effects.is_empty() {
                    self.0.dirty.notify_one();
                }
                Ok(forward)
            }
            Err(e) => {
                drop(ipam);
                let msg = format!("refusing the address space of peer {from}: {e}");
                warn!("{msg}");
                self.0.conflict.send_replace(Some(msg));
                Err(GossipError::Rejected { channel: CHANNEL.into(), detail: e.to_string() })
            }
        }
    }

    fn on_unicast(&self, src: PeerName, msg: &[u8]) -> Result<(), GossipError> {
        let msg: Msg = postcard::from_bytes(msg)
            .map_err(|e| GossipError::Decode { channel: CHANNEL.into(), detail: e.to_string() })?;
        // The actor is gone only when IPAM stopped: nobody is left to answer.
        let _ = self.0.unicasts.send((src, msg));
        Ok(())
    }

    fn on_peers_gone(&self, _peers: &[PeerName]) {
        self.0.dirty.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;
    use crate::ipam::core::Init;

    fn p(i: u64) -> PeerName {
        PeerName::new(0x0200_0000_0000 + i)
    }

    #[test]
    fn our_own_promise_is_not_forwarded_before_it_is_on_disk() {
        let range = "10.32.0.0/24".parse().unwrap();
        // p(0) proposes (an allocation wants a ring).
        let mut proposer = Ipam::new(p(0), range, range, Init::Consensus(2));
        let mut out = Vec::new();
        let waits = proposer.allocate("c", None, &BTreeSet::from([p(0), p(1)]), &mut out).unwrap();
        assert!(matches!(waits, crate::ipam::core::Outcome::Wait(_)));
        let proposal = encode(&proposer.gossip_state());
        // A voter hears it and promises: that must reach the disk before any peer.
        let (voter, _unicasts) = Shared::new(Ipam::new(p(1), range, range, Init::Consensus(2)));
        let forward = IpamGossiper(voter.clone()).on_gossip(p(0), &proposal).unwrap();
        assert_eq!(forward, None, "not passed on by the mesh");
        assert!(voter.take_gossip_due(), "the actor gossips it after its write");
        // An observer merges it without promising anything: passed on at once.
        let (observer, _unicasts) = Shared::new(Ipam::new(p(2), range, range, Init::Observer));
        let forward = IpamGossiper(observer.clone()).on_gossip(p(0), &proposal).unwrap();
        assert!(forward.is_some(), "others' news travels at once");
        assert!(!observer.take_gossip_due());
    }
}
