//! The IPAM state machine, without I/O: the ring, the Paxos state (until the
//! ring exists), the allocations, and the space requests in flight. Operations
//! return [`Effect`]s for the shell: persist, gossip, send a unicast — in that
//! order, so nothing is said before it is on disk.
//!
//! Owns: which addresses are whose, and the messages between peers. Must not
//! touch: clocks, locks, the mesh, the state file (the shell passes time and
//! reachability in, and does what the effects say); whose space may be taken
//! over is [`super::policy`]'s to decide.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

use super::paxos::{Claims, Paxos};
use super::ring::{Ring, RingError};
use crate::mesh::PeerName;

/// How initial ownership is decided.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Init {
    /// Agreement among the first N voting peers.
    Consensus(usize),
    /// These peers own the range from the start, in equal parts.
    Seed(Vec<PeerName>),
    /// Never owns space at first; asks others when it needs some.
    Observer,
    /// Agreement among the members of the discovery source's group
    /// (`--discovery` without `--ipalloc-init`): the quorum waits for the
    /// group's size ([`Ipam::size_from_discovery`]), as Weave's ECS images
    /// passed the Auto Scaling group's size as `consensus=N`.
    Discovery,
}

/// An `--ipalloc-init` value that is none of the three forms.
#[derive(Debug, thiserror::Error)]
#[error("invalid --ipalloc-init {given:?}: use consensus=N, seed=PEER,PEER... or observer{}", .peer.as_ref().map(|e| format!(" ({e})")).unwrap_or_default())]
pub struct BadInit {
    pub given: String,
    /// A seed peer that is not a peer name.
    pub peer: Option<crate::mesh::peer::BadPeerName>,
}

impl std::str::FromStr for Init {
    type Err = BadInit;
    fn from_str(s: &str) -> Result<Self, BadInit> {
        let bad = |peer| BadInit { given: s.to_string(), peer };
        if s == "observer" {
            return Ok(Init::Observer);
        }
        match s.split_once('=') {
            Some(("consensus", n)) => n.parse().ok().filter(|n| *n > 0).map(Init::Consensus).ok_or_else(|| bad(None)),
            Some(("seed", peers)) => {
                let names: Result<Vec<PeerName>, _> = peers.split(',').map(str::parse).collect();
                names.map(Init::Seed).map_err(|e| bad(Some(e)))
            }
            _ => Err(bad(None)),
        }
    }
}

/// What the shell must do after an operation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// Write the state to disk (before anything below).
    Persist,
    /// Send our state to the peers.
    Gossip,
    /// Send a message to one peer.
    Unicast(PeerName, Msg),
}

/// Peer-to-peer IPAM messages (unicast over the mesh).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Msg {
    /// "Please give me some of your free space in this subnet."
    SpaceRequest { subnet: Ipv4Net },
    /// "I gave you some (the ring says what)" or "I have none".
    SpaceReply { subnet: Ipv4Net, granted: bool },
    /// "Please give me this one address (I was asked to claim it)."
    ClaimRequest { addr: Ipv4Addr },
    /// The answer to a claim request.
    ClaimReply { addr: Ipv4Addr, granted: bool, reason: String },
}

/// What is gossiped on the `ipam` channel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GossipState {
    pub ring: Ring,
    /// Only while the ring is undecided.
    pub paxos: Option<BTreeMap<PeerName, Claims>>,
}

/// What is written to the state directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Persisted {
    pub ring: Ring,
    pub allocations: BTreeMap<String, Vec<Ipv4Addr>>,
    pub paxos: Option<Paxos>,
}

/// Why a request failed (each says what to do).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AllocError {
    #[error("{subnet} is not inside the address range {range}")]
    OutsideRange { subnet: Ipv4Net, range: Ipv4Net },
    #[error("no free address left in {0}: release some, or give weft a bigger --ipalloc-range")]
    Exhausted(Ipv4Net),
    #[error("{addr} is in use by {by}")]
    InUse { addr: Ipv4Addr, by: String },
    #[error("{addr} is the network or broadcast address of {subnet}")]
    Reserved { addr: Ipv4Addr, subnet: Ipv4Net },
    #[error("{addr} belongs to peer {peer}, which is not reachable now; try again when it is back, or run `weft rmpeer {peer}` if it is gone for good")]
    OwnerUnreachable { addr: Ipv4Addr, peer: PeerName },
    #[error("peer {peer} refused to give {addr}: {reason}")]
    ClaimRefused { addr: Ipv4Addr, peer: PeerName, reason: String },
    #[error("this peer is an observer and no one has decided the address space yet")]
    NoRing,
    #[error("no peer owns {addr} in this peer's ring (its state file was damaged or edited): `weft reset` this peer")]
    Unowned { addr: Ipv4Addr },
}

/// An operation's result: done, or wait (for space, or for agreement).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome<T> {
    Done(T),
    Wait(&'static str),
}

impl<T> Outcome<T> {
    /// The same outcome with `f` applied to what is done.
    pub fn map<U>(self, f: impl FnOnce(T) -> U) -> Outcome<U> {
        match self {
            Outcome::Done(t) => Outcome::Done(f(t)),
            Outcome::Wait(why) => Outcome::Wait(why),
        }
    }
}

/// A request for an address that may have to wait (for agreement, for space,
/// for another peer's answer): the shell tries it with [`Ipam::try_request`]
/// when it arrives and again whenever something changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AddrRequest {
    /// Any free address in `subnet` (the default subnet if `None`).
    Allocate { id: String, subnet: Option<Ipv4Net> },
    /// This address (e.g. a container restarted with its old one).
    Claim { id: String, addr: Ipv4Addr },
}

impl AddrRequest {
    /// The subnet whose space the request may wait for (claims wait for an
    /// owner's answer; they count against the default subnet).
    pub fn subnet(&self) -> Option<Ipv4Net> {
        match self {
            AddrRequest::Allocate { subnet, .. } => *subnet,
            AddrRequest::Claim { .. } => None,
        }
    }
}

/// `addr` with `subnet`'s prefix length. `Ipv4Net::new` refuses only a prefix
/// longer than 32, which the prefix of an `Ipv4Net` never is: the fallback
/// (the address alone) is never taken, and keeps this function total.
pub fn with_prefix(addr: Ipv4Addr, subnet: Ipv4Net) -> Ipv4Net {
    Ipv4Net::new(addr, subnet.prefix_len()).unwrap_or_else(|_| Ipv4Net::from(addr))
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Asking {
    /// Peer asked last, not answered yet.
    pending: Option<PeerName>,
    /// Peers that said no.
    refused: BTreeSet<PeerName>,
}

/// The IPAM state of one peer.
#[derive(Debug, Clone)]
pub struct Ipam {
    me: PeerName,
    init: Init,
    default_subnet: Ipv4Net,
    ring: Ring,
    paxos: Option<Paxos>,
    by_id: BTreeMap<String, BTreeSet<u32>>,
    by_addr: BTreeMap<u32, String>,
    asking: BTreeMap<Ipv4Net, Asking>,
    /// Claims waiting for their owner's answer: address → id; answers land here.
    claims: BTreeMap<u32, (String, Option<Result<(), AllocError>>)>,
    /// Subnets nobody had space for (the waiting requests should fail).
    exhausted: BTreeSet<Ipv4Net>,
    /// Tokens just reclaimed: not allocated from until [`Ipam::settle`], so that
    /// a second reclaimer (possible only while views disagree) loses the tie in
    /// the ring before either hands out an address from them.
    settling: BTreeSet<u32>,
}

fn net_range(n: Ipv4Net) -> (u64, u64) {
    let s = u64::from(u32::from(n.network()));
    (s, s + (1u64 << (32 - n.prefix_len())))
}

impl Ipam {
    /// A fresh IPAM for `me` over `range` (nothing decided yet, unless seeded).
    pub fn new(me: PeerName, range: Ipv4Net, default_subnet: Ipv4Net, init: Init) -> Self {
        let mut ring = Ring::new(range);
        let paxos = match &init {
            Init::Seed(peers) => {
                ring.claim_for_peers(peers);
                None
            }
            Init::Consensus(n) => Some(Paxos::new(me, *n, false)),
            Init::Observer => Some(Paxos::new(me, 1, true)),
            // No quorum before the group's size is known: no vote, no proposal.
            Init::Discovery => None,
        };
        Ipam {
            me,
            init,
            default_subnet: default_subnet.trunc(),
            ring,
            paxos,
            by_id: BTreeMap::new(),
            by_addr: BTreeMap::new(),
            asking: BTreeMap::new(),
            claims: BTreeMap::new(),
            exhausted: BTreeSet::new(),
            settling: BTreeSet::new(),
        }
    }

    /// Restores from disk (`range` and `init` must match the saved ring's range).
    pub fn restore(me: PeerName, default_subnet: Ipv4Net, init: Init, saved: Persisted) -> Self {
        let range = saved.ring.range;
        let mut ipam = Ipam::new(me, range, default_subnet, init);
        if !saved.ring.is_empty() {
            ipam.ring = saved.ring;
            ipam.paxos = None;
        } else if let Some(saved) = saved.paxos
            && saved.is_for(me)
            && (ipam.paxos.is_some() || ipam.init == Init::Discovery)
        {
            // Promises must survive a restart: an acceptor never votes twice.
            // (Votes saved under another name, or without this peer's own
            // claims, are not this acceptor's: it starts afresh.) A quorum
            // sized from discovery is kept with them.
            ipam.paxos = Some(saved);
        }
        for (id, addrs) in saved.allocations {
            for a in addrs {
                let a = u32::from(a);
                ipam.by_id.entry(id.clone()).or_default().insert(a);
                ipam.by_addr.insert(a, id.clone());
            }
        }
        ipam
    }

    /// This peer's name.
    pub fn me(&self) -> PeerName {
        self.me
    }

    /// The ring.
    pub fn ring(&self) -> &Ring {
        &self.ring
    }

    /// The address range.
    pub fn range(&self) -> Ipv4Net {
        self.ring.range
    }

    /// The default subnet.
    pub fn default_subnet(&self) -> Ipv4Net {
        self.default_subnet
    }

    /// What to save.
    pub fn persisted(&self) -> Persisted {
        Persisted {
            ring: self.ring.clone(),
            allocations: self.by_id.iter().map(|(id, a)| (id.clone(), a.iter().map(|x| Ipv4Addr::from(*x)).collect())).collect(),
            paxos: self.paxos.clone(),
        }
    }

    /// What to gossip.
    pub fn gossip_state(&self) -> GossipState {
        GossipState { ring: self.ring.clone(), paxos: self.paxos.as_ref().map(|p| p.claims.clone()) }
    }

    /// Every allocation: id → addresses.
    pub fn allocations(&self) -> BTreeMap<String, Vec<Ipv4Addr>> {
        self.persisted().allocations
    }

    /// The addresses of `id`.
    pub fn lookup(&self, id: &str) -> Vec<Ipv4Addr> {
        self.by_id.get(id).map(|a| a.iter().map(|x| Ipv4Addr::from(*x)).collect()).unwrap_or_default()
    }

    /// The addresses of `id`, with the default subnet's prefix.
    pub fn lookup_nets(&self, id: &str) -> Vec<Ipv4Net> {
        self.lookup(id).into_iter().map(|a| with_prefix(a, self.default_subnet)).collect()
    }

    /// The subnet a claimed address is given in: the default subnet if it is
    /// inside it, else the whole range.
    fn claim_subnet(&self, addr: Ipv4Addr) -> Ipv4Net {
        if self.default_subnet.contains(&addr) { self.default_subnet } else { self.ring.range }
    }

    /// Addresses allocated here.
    pub fn used(&self) -> usize {
        self.by_addr.len()
    }

    /// Why allocations wait, if they do: "" when they do not.
    pub fn waiting_for(&self) -> &'static str {
        if !self.ring.is_empty() {
            return "";
        }
        match &self.init {
            Init::Observer => "an election among the voting peers (this peer is an observer)",
            Init::Consensus(_) => "agreement among the initial peers (--ipalloc-init consensus)",
            Init::Discovery if self.paxos.is_none() => "the discovery source's first answer (the group's size sets the quorum)",
            Init::Discovery => "agreement among a majority of the discovery group's members",
            Init::Seed(_) => "",
        }
    }

    /// Sizes the agreement from the discovery group (`Init::Discovery` only,
    /// while the ring is undecided): the quorum is a majority of `group_size`.
    /// It only ever grows — a larger group seen before agreement raises it, a
    /// smaller one never lowers it — so that a quorum this peer counts always
    /// meets any quorum a peer that saw the larger group counts. Returns
    /// whether anything changed (then persist and gossip).
    pub fn size_from_discovery(&mut self, group_size: usize, out: &mut Vec<Effect>) -> bool {
        if self.init != Init::Discovery || !self.ring.is_empty() || group_size == 0 {
            return false;
        }
        let changed = match &mut self.paxos {
            None => {
                self.paxos = Some(Paxos::new(self.me, group_size, false));
                true
            }
            Some(p) => p.raise_quorum(group_size),
        };
        if changed {
            out.push(Effect::Persist);
            out.push(Effect::Gossip);
        }
        changed
    }

    /// The Paxos quorum while undecided.
    pub fn consensus(&self) -> Option<(usize, usize)> {
        self.paxos.as_ref().map(|p| (p.voters().len(), p.quorum()))
    }

    fn reserved(subnet: Ipv4Net, a: u32) -> bool {
        subnet.prefix_len() < 31 && (a == u32::from(subnet.network()) || a == u32::from(subnet.broadcast()))
    }

    /// Free addresses in `[s, e)` (a span we own), as runs `(start, len)`.
    fn free_runs(&self, s: u64, e: u64, subnet: Ipv4Net) -> Vec<(u64, u64)> {
        let mut gaps = Vec::new();
        let mut cursor = s;
        for &x in self.by_addr.range((s as u32)..).map(|(x, _)| x) {
            let x = u64::from(x);
            if x >= e {
                break;
            }
            if x > cursor {
                gaps.push((cursor, x));
            }
            cursor = x + 1;
        }
        if cursor < e {
            gaps.push((cursor, e));
        }
        // The subnet's network and broadcast addresses are never handed out,
        // nor those of the network it lies in (a /32 or /31 asked for inside
        // the default subnet must not yield that subnet's network address).
        let enclosing = if self.default_subnet.contains(&subnet) { self.default_subnet } else { self.ring.range };
        let mut reserved: Vec<u64> = [subnet, enclosing]
            .into_iter()
            .filter(|n| n.prefix_len() < 31)
            .flat_map(|n| [u64::from(u32::from(n.network())), u64::from(u32::from(n.broadcast()))])
            .collect();
        reserved.sort_unstable();
        reserved.dedup();
        let mut runs = Vec::new();
        for (a, b) in gaps {
            let mut start = a;
            for &r in &reserved {
                if r >= start && r < b {
                    if r > start {
                        runs.push((start, r - start));
                    }
                    start = r + 1;
                }
            }
            if start < b {
                runs.push((start, b - start));
            }
        }
        runs
    }

    /// Our ranges inside `subnet` (except those still settling after a reclaim).
    fn my_spans(&self, subnet: Ipv4Net) -> Vec<(u64, u64)> {
        let (ss, se) = net_range(subnet);
        self.ring
            .ranges()
            .into_iter()
            .filter(|(t, _, e)| e.owner == self.me && !self.settling.contains(t))
            .map(|(s, e, _)| (u64::from(s).max(ss), e.min(se)))
            .filter(|(s, e)| s < e)
            .collect()
    }

    /// Whether `a` lies in a range still settling after a reclaim.
    fn is_settling(&self, a: u32) -> bool {
        self.ring.token_of(a).is_some_and(|t| self.settling.contains(&t))
    }

    /// Ends the settle period of reclaimed ranges: they can be allocated from.
    pub fn settle(&mut self) -> bool {
        let had = !self.settling.is_empty();
        self.settling.clear();
        had
    }

    fn check_subnet(&self, subnet: Ipv4Net) -> Result<Ipv4Net, AllocError> {
        let subnet = subnet.trunc();
        if !self.ring.range.contains(&subnet) {
            return Err(AllocError::OutsideRange { subnet, range: self.ring.range });
        }
        Ok(subnet)
    }

    fn record(&mut self, id: &str, a: u32) {
        self.by_id.entry(id.to_string()).or_default().insert(a);
        self.by_addr.insert(a, id.to_string());
    }

    /// Starts an election if nobody has: proposing on every request would make
    /// proposers pre-empt each other forever. A stalled election is restarted by
    /// [`Ipam::repropose`] on a timer.
    fn want_ring(&mut self, out: &mut Vec<Effect>) {
        if let Some(p) = &mut self.paxos
            && p.chosen().is_none() && !p.any_proposal() {
                p.propose();
                p.step();
                out.push(Effect::Persist);
                out.push(Effect::Gossip);
            }
        self.take_chosen(out);
    }

    /// Proposes again with a higher round (the shell's timer calls this while the
    /// ring is undecided and allocations wait, e.g. the proposer went away).
    pub fn repropose(&mut self, out: &mut Vec<Effect>) {
        if let Some(p) = &mut self.paxos
            && p.chosen().is_none() {
                p.propose();
                p.step();
                out.push(Effect::Persist);
                out.push(Effect::Gossip);
            }
        self.take_chosen(out);
    }

    /// Once agreement is reached (by gossip, or at once with `consensus=1`), the
    /// chosen peers divide the range. Returns whether it happened now.
    fn take_chosen(&mut self, out: &mut Vec<Effect>) -> bool {
        let Some(value) = self.paxos.as_ref().and_then(Paxos::chosen) else { return false };
        self.ring.claim_for_peers(&value);
        self.paxos = None;
        out.push(Effect::Persist);
        out.push(Effect::Gossip);
        true
    }

    /// Tries `req` once: its address with the subnet's prefix, a reason to
    /// wait, or why it fails. The one path for allocations and claims, whether
    /// they just arrived or are waiting; a request whose deadline passes is
    /// dropped with [`Ipam::give_up`].
    pub fn try_request(
        &mut self,
        req: &AddrRequest,
        reachable: &BTreeSet<PeerName>,
        out: &mut Vec<Effect>,
    ) -> Result<Outcome<Ipv4Net>, AllocError> {
        match req {
            AddrRequest::Allocate { id, subnet } => {
                let prefix_of = subnet.unwrap_or(self.default_subnet);
                Ok(self.allocate(id, *subnet, reachable, out)?.map(|a| with_prefix(a, prefix_of)))
            }
            AddrRequest::Claim { id, addr } => {
                let subnet = self.claim_subnet(*addr);
                Ok(self.claim(id, *addr, reachable, out)?.map(|()| with_prefix(*addr, subnet)))
            }
        }
    }

    /// Drops what a request that waited too long left behind (a claim's
    /// question to the owner).
    pub fn give_up(&mut self, req: &AddrRequest) {
        if let AddrRequest::Claim { addr, .. } = req {
            self.cancel_claim(*addr);
        }
    }

    /// Allocates an address for `id` in `subnet` (the default subnet if `None`).
    /// `reachable` are the peers that can be asked for space.
    pub fn allocate(
        &mut self,
        id: &str,
        subnet: Option<Ipv4Net>,
        reachable: &BTreeSet<PeerName>,
        out: &mut Vec<Effect>,
    ) -> Result<Outcome<Ipv4Addr>, AllocError> {
        let subnet = self.check_subnet(subnet.unwrap_or(self.default_subnet))?;
        // One address per id and subnet, whoever asks again (Weave's semantics).
        if let Some(a) = self.by_id.get(id).and_then(|a| a.iter().find(|x| subnet.contains(&Ipv4Addr::from(**x)))) {
            return Ok(Outcome::Done(Ipv4Addr::from(*a)));
        }
        if self.ring.is_empty() {
            self.want_ring(out);
        }
        if self.ring.is_empty() {
            return Ok(Outcome::Wait("agreement on the address space"));
        }
        for (s, e) in self.my_spans(subnet) {
            if let Some((a, _)) = self.free_runs(s, e, subnet).first() {
                let a = *a as u32;
                self.record(id, a);
                self.exhausted.remove(&subnet);
                out.push(Effect::Persist);
                return Ok(Outcome::Done(Ipv4Addr::from(a)));
            }
        }
        self.ask_for_space(subnet, reachable, out)
    }

    fn ask_for_space(
        &mut self,
        subnet: Ipv4Net,
        reachable: &BTreeSet<PeerName>,
        out: &mut Vec<Effect>,
    ) -> Result<Outcome<Ipv4Addr>, AllocError> {
        let asking = self.asking.entry(subnet).or_default();
        if asking.pending.is_some() {
            return Ok(Outcome::Wait("space from another peer"));
        }
        // The reachable peer advertising the most free space in the subnet.
        let (ss, se) = net_range(subnet);
        let mut free: BTreeMap<PeerName, u64> = BTreeMap::new();
        for (s, e, entry) in self.ring.ranges() {
            if entry.owner != self.me && u64::from(s) < se && e > ss && entry.free > 0 {
                *free.entry(entry.owner).or_default() += u64::from(entry.free);
            }
        }
        let best = free
            .into_iter()
            .filter(|(p, _)| reachable.contains(p) && !asking.refused.contains(p))
            .max_by_key(|(p, f)| (*f, std::cmp::Reverse(*p)));
        match best {
            Some((peer, _)) => {
                asking.pending = Some(peer);
                out.push(Effect::Unicast(peer, Msg::SpaceRequest { subnet }));
                Ok(Outcome::Wait("space from another peer"))
            }
            None => {
                self.asking.remove(&subnet);
                self.exhausted.insert(subnet);
                Err(AllocError::Exhausted(subnet))
            }
        }
    }

    /// Whether waiting allocations in `subnet` should give up.
    pub fn is_exhausted(&self, subnet: Ipv4Net) -> bool {
        self.exhausted.contains(&subnet.trunc())
    }

    /// Claims `addr` for `id` (e.g. a container restarted with its old address).
    pub fn claim(
        &mut self,
        id: &str,
        addr: Ipv4Addr,
        reachable: &BTreeSet<PeerName>,
        out: &mut Vec<Effect>,
    ) -> Result<Outcome<()>, AllocError> {
        let a = u32::from(addr);
        if !self.ring.range.contains(&addr) {
            return Err(AllocError::OutsideRange { subnet: Ipv4Net::from(addr), range: self.ring.range });
        }
        let subnet = self.default_subnet;
        if subnet.contains(&addr) && Self::reserved(subnet, a) {
            return Err(AllocError::Reserved { addr, subnet });
        }
        if let Some(by) = self.by_addr.get(&a) {
            return if by == id { Ok(Outcome::Done(())) } else { Err(AllocError::InUse { addr, by: by.clone() }) };
        }
        if self.ring.is_empty() {
            self.want_ring(out);
        }
        if self.ring.is_empty() {
            return Ok(Outcome::Wait("agreement on the address space"));
        }
        // A decided ring covers its range (gossip that does not is refused);
        // only a damaged state file can leave an address without an owner.
        let Some(owner) = self.ring.owner_of(a) else { return Err(AllocError::Unowned { addr }) };
        if owner == self.me && self.is_settling(a) {
            return Ok(Outcome::Wait("reclaimed space to settle"));
        }
        if owner == self.me {
            self.record(id, a);
            out.push(Effect::Persist);
            return Ok(Outcome::Done(()));
        }
        if let Some((who, answer)) = self.claims.get(&a)
            && who == id {
                if let Some(answer) = answer.clone() {
                    self.claims.remove(&a);
                    answer?;
                    // Granted, but the ring has not arrived yet: wait for it.
                }
                return Ok(Outcome::Wait("the owner's answer"));
            }
        if !reachable.contains(&owner) {
            return Err(AllocError::OwnerUnreachable { addr, peer: owner });
        }
        self.claims.insert(a, (id.to_string(), None));
        out.push(Effect::Unicast(owner, Msg::ClaimRequest { addr }));
        Ok(Outcome::Wait("the owner's answer"))
    }

    /// Drops a claim that waited too long.
    pub fn cancel_claim(&mut self, addr: Ipv4Addr) {
        self.claims.remove(&u32::from(addr));
    }

    /// Forgets a space request whose peer never answered (it may be gone).
    pub fn cancel_ask(&mut self, subnet: Ipv4Net) {
        if let Some(a) = self.asking.get_mut(&subnet.trunc())
            && let Some(p) = a.pending.take() {
                a.refused.insert(p);
            }
    }

    /// Releases every address of `id`.
    pub fn release(&mut self, id: &str, out: &mut Vec<Effect>) -> Vec<Ipv4Addr> {
        let Some(addrs) = self.by_id.remove(id) else { return Vec::new() };
        for a in &addrs {
            self.by_addr.remove(a);
        }
        self.exhausted.clear();
        out.push(Effect::Persist);
        addrs.into_iter().map(Ipv4Addr::from).collect()
    }

    /// Releases one address.
    pub fn release_addr(&mut self, addr: Ipv4Addr, out: &mut Vec<Effect>) -> Option<String> {
        let a = u32::from(addr);
        let id = self.by_addr.remove(&a)?;
        if let Some(set) = self.by_id.get_mut(&id) {
            set.remove(&a);
            if set.is_empty() {
                self.by_id.remove(&id);
            }
        }
        self.exhausted.clear();
        out.push(Effect::Persist);
        Some(id)
    }

    /// Updates our tokens' free counts; true if the ring changed (then gossip).
    pub fn refresh_free(&mut self) -> bool {
        let subnet = self.default_subnet;
        let mine: Vec<(u32, u64)> = self
            .ring
            .ranges()
            .into_iter()
            .filter(|(_, _, e)| e.owner == self.me)
            .map(|(s, e, _)| (s, e))
            .collect();
        let mut changed = false;
        for (s, e) in mine {
            let free: u64 = self.free_runs(u64::from(s), e, subnet).iter().map(|(_, n)| n).sum();
            changed |= self.ring.set_free(self.me, s, free.min(u64::from(u32::MAX)) as u32);
        }
        changed
    }

    /// Merges a peer's gossip; returns whether our state changed. A ring that
    /// breaks the rules is refused (the caller closes that connection).
    pub fn on_gossip(&mut self, state: &GossipState, out: &mut Vec<Effect>) -> Result<bool, RingError> {
        // Ranges still settling after a reclaim yield to a second reclaimer.
        let mut changed = self.ring.merge_yielding(&state.ring, self.me, &self.settling)?;
        if !self.ring.is_empty() {
            if self.paxos.take().is_some() {
                changed = true;
            }
        } else if let (Some(p), Some(claims)) = (&mut self.paxos, &state.paxos) {
            let merged = p.merge(claims);
            let stepped = p.step();
            if stepped {
                out.push(Effect::Persist);
                out.push(Effect::Gossip);
            }
            changed |= merged || stepped;
            changed |= self.take_chosen(out);
        }
        if changed {
            self.asking.retain(|_, a| a.pending.is_some());
            self.exhausted.clear();
        }
        Ok(changed)
    }

    /// A peer's message to us.
    pub fn on_unicast(&mut self, src: PeerName, msg: Msg, out: &mut Vec<Effect>) {
        match msg {
            Msg::SpaceRequest { subnet } => {
                let granted = match self.check_subnet(subnet) {
                    Ok(subnet) => self.donate(src, subnet),
                    Err(_) => false,
                };
                if granted {
                    out.push(Effect::Persist);
                    out.push(Effect::Gossip);
                }
                out.push(Effect::Unicast(src, Msg::SpaceReply { subnet, granted }));
            }
            Msg::SpaceReply { subnet, granted } => {
                if let Some(a) = self.asking.get_mut(&subnet.trunc())
                    && a.pending == Some(src) {
                        a.pending = None;
                        if !granted {
                            a.refused.insert(src);
                        }
                    }
            }
            Msg::ClaimRequest { addr } => {
                let a = u32::from(addr);
                let (granted, reason) = if self.ring.owner_of(a) != Some(self.me) {
                    (false, format!("it is not {}'s to give", self.me))
                } else if self.is_settling(a) {
                    (false, "it was just reclaimed and is settling; try again in a few seconds".to_string())
                } else if let Some(by) = self.by_addr.get(&a) {
                    (false, format!("it is in use by {by}"))
                } else {
                    self.refresh_free();
                    (self.ring.give(self.me, a, u64::from(a) + 1, src), String::new())
                };
                if granted {
                    self.refresh_free();
                    out.push(Effect::Persist);
                    out.push(Effect::Gossip);
                }
                out.push(Effect::Unicast(src, Msg::ClaimReply { addr, granted, reason }));
            }
            Msg::ClaimReply { addr, granted, reason } => {
                if let Some((_, answer)) = self.claims.get_mut(&u32::from(addr)) {
                    *answer = Some(if granted {
                        Ok(())
                    } else {
                        Err(AllocError::ClaimRefused { addr, peer: src, reason })
                    });
                }
            }
        }
    }

    /// Gives `to` half of our largest free run in `subnet`; true if we did.
    fn donate(&mut self, to: PeerName, subnet: Ipv4Net) -> bool {
        let runs: Vec<(u64, u64)> =
            self.my_spans(subnet).into_iter().flat_map(|(s, e)| self.free_runs(s, e, subnet)).collect();
        let Some(&(start, len)) = runs.iter().max_by_key(|(s, l)| (*l, std::cmp::Reverse(*s))) else { return false };
        // Keep the lower half (where our own allocations are packed), give the upper.
        let keep = len / 2;
        let from = start + keep;
        let given = self.ring.give(self.me, from as u32, start + len, to);
        if given {
            self.refresh_free();
        }
        given
    }

    /// Takes `dead`'s ranges over (`weft rmpeer`, or the automatic reclaim).
    pub fn reclaim(&mut self, dead: PeerName, out: &mut Vec<Effect>) -> u64 {
        if dead == self.me {
            return 0;
        }
        let tokens: Vec<u32> = self.ring.ranges().iter().filter(|(_, _, e)| e.owner == dead).map(|(t, _, _)| *t).collect();
        let moved = self.ring.reclaim(dead, self.me);
        if moved > 0 {
            self.settling.extend(tokens);
            self.refresh_free();
            self.exhausted.clear();
            out.push(Effect::Persist);
            out.push(Effect::Gossip);
        }
        moved
    }

    /// Gives all our ranges away before leaving (`weft reset`): to `to` (the live
    /// peer with the least space, chosen by the caller). Our allocations must be
    /// released first.
    pub fn give_all(&mut self, to: PeerName, out: &mut Vec<Effect>) -> u64 {
        let mut moved = 0;
        for (s, e) in self.ring.owned_by(self.me) {
            if self.ring.give(self.me, s, e, to) {
                moved += e - u64::from(s);
            }
        }
        if moved > 0 {
            out.push(Effect::Persist);
            out.push(Effect::Gossip);
        }
        moved
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::{RngExt, SeedableRng};

    fn p(i: u64) -> PeerName {
        PeerName::new(0x0200_0000_0000 + i)
    }

    fn net(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }

    /// Delivers unicasts between `peers` until none is left; `up(i, j)` says
    /// whether i can reach j (messages to unreachable peers are lost).
    fn deliver(peers: &mut [Ipam], mut msgs: Vec<(usize, usize, Msg)>, up: &dyn Fn(usize, usize) -> bool) {
        while let Some((from, to, msg)) = msgs.pop() {
            if !up(from, to) {
                continue;
            }
            let mut out = Vec::new();
            let src = peers[from].me;
            peers[to].on_unicast(src, msg, &mut out);
            for e in out {
                if let Effect::Unicast(dst, m) = e {
                    let j = peers.iter().position(|x| x.me == dst).unwrap();
                    msgs.push((to, j, m));
                }
            }
        }
    }

    fn gossip(peers: &mut [Ipam], a: usize, b: usize) {
        for (x, y) in [(a, b), (b, a)] {
            peers[y].refresh_free();
            let state = peers[y].gossip_state();
            let mut out = Vec::new();
            peers[x].on_gossip(&state, &mut out).expect("no conflicts in a valid history");
        }
    }

    fn unicasts(peers: &[Ipam], from: usize, out: Vec<Effect>) -> Vec<(usize, usize, Msg)> {
        out.into_iter()
            .filter_map(|e| match e {
                Effect::Unicast(dst, m) => Some((from, peers.iter().position(|x| x.me == dst).unwrap(), m)),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_lone_peer_with_consensus_one_decides_alone() {
        let range = net("10.32.0.0/28");
        let mut ipam = Ipam::new(p(0), range, range, Init::Consensus(1));
        let mut out = Vec::new();
        let got = ipam.allocate("c0", None, &BTreeSet::from([p(0)]), &mut out).unwrap();
        assert_eq!(got, Outcome::Done(Ipv4Addr::new(10, 32, 0, 1)), "no one to gossip with: decided at once");
    }

    #[test]
    fn allocate_exhaust_and_get_space_from_a_peer() {
        let range = net("10.32.0.0/28"); // 16 addresses, 14 usable
        let mut peers = vec![
            Ipam::new(p(0), range, range, Init::Seed(vec![p(0), p(1)])),
            Ipam::new(p(1), range, range, Init::Seed(vec![p(0), p(1)])),
        ];
        let all: BTreeSet<PeerName> = [p(0), p(1)].into();
        let mut got = BTreeSet::new();
        let mut out = Vec::new();
        // p(0) owns .0-.7: .0 is the network address, so 7 usable.
        for i in 0..7 {
            match peers[0].allocate(&format!("c{i}"), None, &all, &mut out).unwrap() {
                Outcome::Done(a) => assert!(got.insert(a), "duplicate {a}"),
                w => panic!("expected an address, got {w:?}"),
            }
        }
        assert!(!got.contains(&Ipv4Addr::new(10, 32, 0, 0)), "never the network address");
        assert_eq!(peers[0].allocate("c0", None, &all, &mut out).unwrap(), Outcome::Done(Ipv4Addr::new(10, 32, 0, 1)), "same id, same address");
        gossip(&mut peers, 0, 1);
        // Full: the next one asks p(1), the peer with free space.
        let mut out = Vec::new();
        assert!(matches!(peers[0].allocate("c7", None, &all, &mut out).unwrap(), Outcome::Wait(_)));
        let msgs = unicasts(&peers, 0, out);
        assert_eq!(msgs.len(), 1);
        deliver(&mut peers, msgs, &|_, _| true);
        gossip(&mut peers, 0, 1);
        let mut out = Vec::new();
        let Outcome::Done(a) = peers[0].allocate("c7", None, &all, &mut out).unwrap() else { panic!("space arrived") };
        assert!(got.insert(a));
        assert_ne!(a, Ipv4Addr::new(10, 32, 0, 15), "never the broadcast address");
        // p(1) still allocates from what it kept, never what it gave.
        for i in 0..3 {
            let Outcome::Done(b) = peers[1].allocate(&format!("d{i}"), None, &all, &mut out).unwrap() else { panic!() };
            assert!(got.insert(b), "duplicate {b}");
        }
    }

    #[test]
    fn claims_go_through_the_owner_and_never_hang_on_an_unreachable_one() {
        let range = net("10.32.0.0/24");
        let seed = Init::Seed(vec![p(0), p(1)]);
        let mut peers = vec![Ipam::new(p(0), range, range, seed.clone()), Ipam::new(p(1), range, range, seed)];
        let all: BTreeSet<PeerName> = [p(0), p(1)].into();
        let theirs = Ipv4Addr::new(10, 32, 0, 200);
        let mut out = Vec::new();
        assert!(matches!(peers[0].claim("x", theirs, &all, &mut out).unwrap(), Outcome::Wait(_)));
        let msgs = unicasts(&peers, 0, out);
        deliver(&mut peers, msgs, &|_, _| true);
        gossip(&mut peers, 0, 1);
        let mut out = Vec::new();
        assert_eq!(peers[0].claim("x", theirs, &all, &mut out).unwrap(), Outcome::Done(()));
        assert_eq!(peers[0].ring().owner_of(u32::from(theirs)), Some(p(0)));
        // Someone else's address, its owner gone: an answer at once.
        let only_me: BTreeSet<PeerName> = [p(0)].into();
        let err = peers[0].claim("y", Ipv4Addr::new(10, 32, 0, 201), &only_me, &mut Vec::new()).unwrap_err();
        assert!(matches!(err, AllocError::OwnerUnreachable { .. }), "{err}");
        // An address in use is refused by its owner.
        let mut out = Vec::new();
        assert!(matches!(peers[1].allocate("z", None, &all, &mut out).unwrap(), Outcome::Done(_)));
        let zaddr = peers[1].lookup("z")[0];
        let mut out = Vec::new();
        assert!(matches!(peers[0].claim("w", zaddr, &all, &mut out).unwrap(), Outcome::Wait(_)));
        let msgs = unicasts(&peers, 0, out);
        deliver(&mut peers, msgs, &|_, _| true);
        let err = peers[0].claim("w", zaddr, &all, &mut Vec::new()).unwrap_err();
        assert!(err.to_string().contains("in use by z"), "{err}");
    }

    #[test]
    fn one_path_for_allocations_and_claims_with_their_subnets_prefix() {
        let range = net("10.32.0.0/16");
        let default = net("10.32.0.0/24");
        let seed = Init::Seed(vec![p(0), p(1)]);
        let mut peers = vec![Ipam::new(p(0), range, default, seed.clone()), Ipam::new(p(1), range, default, seed)];
        let all: BTreeSet<PeerName> = [p(0), p(1)].into();
        let mut out = Vec::new();
        let alloc = |id: &str, subnet: Option<&str>| AddrRequest::Allocate { id: id.into(), subnet: subnet.map(net) };
        let claim = |id: &str, addr: [u8; 4]| AddrRequest::Claim { id: id.into(), addr: addr.into() };
        // Allocations: the prefix of the subnet asked for, else the default's.
        assert_eq!(peers[0].try_request(&alloc("a", None), &all, &mut out).unwrap(), Outcome::Done(net("10.32.0.1/24")));
        assert_eq!(
            peers[0].try_request(&alloc("b", Some("10.32.8.0/22")), &all, &mut out).unwrap(),
            Outcome::Done(net("10.32.8.1/22"))
        );
        assert_eq!(peers[0].lookup_nets("b"), vec![net("10.32.8.1/24")], "lookups give the default subnet's prefix");
        // Claims: the default subnet's prefix inside it, the range's outside.
        let inside = peers[0].try_request(&claim("c", [10, 32, 0, 9]), &all, &mut out).unwrap();
        assert_eq!(inside, Outcome::Done(net("10.32.0.9/24")));
        let outside = peers[0].try_request(&claim("d", [10, 32, 9, 9]), &all, &mut out).unwrap();
        assert_eq!(outside, Outcome::Done(net("10.32.9.9/16")));
        // Failures are the core's errors, whichever kind of request.
        let err = peers[0].try_request(&alloc("e", Some("10.99.0.0/24")), &all, &mut out).unwrap_err();
        assert!(matches!(err, AllocError::OutsideRange { .. }), "{err}");
        let err = peers[0].try_request(&claim("e", [10, 32, 0, 9]), &all, &mut out).unwrap_err();
        assert!(matches!(err, AllocError::InUse { .. }), "{err}");
        // A claim of the other peer's address waits for its answer; giving up
        // forgets the question, so a later try asks again.
        let theirs = claim("f", [10, 32, 200, 1]);
        let mut out = Vec::new();
        assert!(matches!(peers[0].try_request(&theirs, &all, &mut out).unwrap(), Outcome::Wait(_)));
        assert_eq!(unicasts(&peers, 0, out).len(), 1, "one question to the owner");
        let mut out = Vec::new();
        assert!(matches!(peers[0].try_request(&theirs, &all, &mut out).unwrap(), Outcome::Wait(_)));
        assert!(out.is_empty(), "waiting: not asked twice");
        peers[0].give_up(&theirs);
        let mut out = Vec::new();
        assert!(matches!(peers[0].try_request(&theirs, &all, &mut out).unwrap(), Outcome::Wait(_)));
        assert_eq!(unicasts(&peers, 0, out).len(), 1, "after giving up, a new question");
        // Its answer arrives: done, with the range's prefix.
        let mut out = Vec::new();
        peers[0].try_request(&theirs, &all, &mut out).unwrap();
        let msgs = vec![(0, 1, Msg::ClaimRequest { addr: Ipv4Addr::new(10, 32, 200, 1) })];
        deliver(&mut peers, msgs, &|_, _| true);
        gossip(&mut peers, 0, 1);
        assert_eq!(peers[0].try_request(&theirs, &all, &mut Vec::new()).unwrap(), Outcome::Done(net("10.32.200.1/16")));
    }

    #[test]
    fn with_prefix_keeps_the_address_and_takes_the_subnets_length() {
        assert_eq!(with_prefix(Ipv4Addr::new(10, 32, 5, 7), net("10.32.0.0/12")), net("10.32.5.7/12"));
        assert_eq!(with_prefix(Ipv4Addr::new(10, 32, 5, 7), net("10.32.5.7/32")), net("10.32.5.7/32"));
        assert_eq!(with_prefix(Ipv4Addr::new(10, 32, 5, 7), net("0.0.0.0/0")), net("10.32.5.7/0"));
    }

    #[test]
    fn restore_keeps_its_own_votes_but_not_another_peers() {
        let range = net("10.32.0.0/24");
        let theirs = Ipam::new(p(1), range, range, Init::Consensus(3)).persisted();
        let own = Ipam::restore(p(1), range, Init::Consensus(5), theirs.clone());
        assert_eq!(own.consensus(), Some((1, 2)), "its own votes, quorum and all");
        let other = Ipam::restore(p(0), range, Init::Consensus(5), theirs);
        assert_eq!(other.consensus(), Some((1, 3)), "another name's votes are not this acceptor's");
    }

    #[test]
    fn a_claim_in_a_ring_with_a_hole_is_refused_not_a_panic() {
        let range = net("10.32.0.0/24");
        let mut ring = Ring::new(range);
        ring.claim_for_peers(&[p(0), p(1)]);
        // A hand-edited state file: the first token is gone.
        let mut json = serde_json::to_value(&ring).unwrap();
        json["entries"].as_object_mut().unwrap().remove(&u32::from(range.network()).to_string());
        let ring: Ring = serde_json::from_value(json).unwrap();
        let saved = Persisted { ring, allocations: BTreeMap::new(), paxos: None };
        let mut ipam = Ipam::restore(p(0), range, Init::Consensus(2), saved);
        let err = ipam.claim("x", Ipv4Addr::new(10, 32, 0, 3), &[p(0)].into(), &mut Vec::new()).unwrap_err();
        assert!(matches!(err, AllocError::Unowned { .. }), "{err}");
    }

    #[test]
    fn reclaim_takes_over_a_dead_peers_space() {
        let range = net("10.32.0.0/24");
        let seed = Init::Seed(vec![p(0), p(1), p(2)]);
        let mut a = Ipam::new(p(0), range, range, seed);
        let mut out = Vec::new();
        assert!(a.reclaim(p(2), &mut out) > 80);
        assert!(a.ring().owned_by(p(2)).is_empty());
        assert!(out.contains(&Effect::Persist) && out.contains(&Effect::Gossip));
        assert_eq!(a.reclaim(p(0), &mut Vec::new()), 0, "never from ourselves");
    }

    /// Views can briefly disagree, so two peers may both reclaim the same dead
    /// peer (the policy test `only_the_smallest_reachable_name_acts_even_when_views_disagree`).
    /// Their entries then tie in version; the loser must take the winner's
    /// gossip rather than refuse it as a conflict, and neither may hand out an
    /// address from the ranges before they settle.
    #[test]
    fn two_reclaimers_of_one_peer_settle_before_allocating() {
        let range = net("10.32.0.0/24");
        let seed = Init::Seed(vec![p(0), p(1), p(2)]);
        let mut peers = vec![Ipam::new(p(0), range, range, seed.clone()), Ipam::new(p(1), range, range, seed)];
        gossip(&mut peers, 0, 1);
        let theirs = Ipv4Addr::new(10, 32, 0, 200); // p(2)'s third of the range
        let both: BTreeSet<PeerName> = [p(0), p(1)].into();
        assert!(peers[0].reclaim(p(2), &mut Vec::new()) > 0);
        assert!(peers[1].reclaim(p(2), &mut Vec::new()) > 0);
        // While settling, neither allocates from the reclaimed ranges: not by
        // claiming, not by granting a peer's claim, not by donating.
        for ipam in peers.iter_mut() {
            let got = ipam.claim("c", theirs, &both, &mut Vec::new()).unwrap();
            assert!(matches!(got, Outcome::Wait(_)), "{got:?}");
        }
        let mut out = Vec::new();
        peers[1].on_unicast(p(0), Msg::ClaimRequest { addr: theirs }, &mut out);
        assert!(
            matches!(&out[..], [Effect::Unicast(_, Msg::ClaimReply { granted: false, .. })]),
            "a settling range is not given away: {out:?}"
        );
        // Their gossip meets: both accept it (no conflict) and agree on one owner.
        for (x, y) in [(0, 1), (1, 0)] {
            let state = peers[y].gossip_state();
            peers[x].on_gossip(&state, &mut Vec::new()).expect("a second reclaimer is no conflict while settling");
        }
        assert_eq!(peers[0].ring(), peers[1].ring(), "one ring");
        let winner = peers[0].ring().owner_of(u32::from(theirs)).unwrap();
        assert!(winner == p(0) || winner == p(1));
        let (w, l) = if winner == p(0) { (0, 1) } else { (1, 0) };
        for ipam in peers.iter_mut() {
            ipam.settle();
        }
        assert_eq!(peers[w].claim("c", theirs, &both, &mut Vec::new()).unwrap(), Outcome::Done(()), "the winner's now");
        let mut out = Vec::new();
        assert!(matches!(peers[l].claim("d", theirs, &both, &mut out).unwrap(), Outcome::Wait(_)));
        assert!(
            matches!(unicasts(&peers, l, out)[..], [(_, _, Msg::ClaimRequest { .. })]),
            "the loser asks the winner, never takes it"
        );
        // Once settled, a changed entry on those ranges is a conflict again.
        let mut late = peers[w].clone();
        late.reclaim(p(l as u64), &mut Vec::new());
        let state = late.gossip_state();
        assert!(peers[l].on_gossip(&state, &mut Vec::new()).is_err(), "after settling, its own ranges are its own");
    }

    /// 50 peers: consensus, then random partitions and heals with allocations on
    /// every side. No address is ever handed out twice, and once healed every
    /// peer holds the same ring.
    #[test]
    fn fifty_peers_through_partitions_never_duplicate() {
        for seed in [7u64, 8] {
            let n = 50;
            let range = net("10.32.0.0/20");
            let mut rng = StdRng::seed_from_u64(seed);
            let mut peers: Vec<Ipam> = (0..n).map(|i| Ipam::new(p(i as u64), range, range, Init::Consensus(n))).collect();
            let mut group = vec![0usize; n];
            let mut held: BTreeMap<Ipv4Addr, (usize, String)> = BTreeMap::new();
            let mut waiting: Vec<(usize, String)> = Vec::new();
            let mut next = 0;
            for round in 0..400 {
                // Now and then: a new partition (2-3 sides) or a heal.
                if round % 60 == 30 {
                    let sides = rng.random_range(2..4);
                    for g in group.iter_mut() {
                        *g = rng.random_range(0..sides);
                    }
                } else if round % 60 == 0 {
                    group.fill(0);
                }
                let reach = |i: usize, group: &[usize]| -> BTreeSet<PeerName> {
                    (0..n).filter(|j| group[*j] == group[i]).map(|j| p(j as u64)).collect()
                };
                // Allocations on random peers (and retries of waiting ones).
                let mut todo = std::mem::take(&mut waiting);
                for _ in 0..5 {
                    next += 1;
                    todo.push((rng.random_range(0..n), format!("c{next}")));
                }
                let mut msgs = Vec::new();
                for (i, id) in todo {
                    let mut out = Vec::new();
                    match peers[i].allocate(&id, None, &reach(i, &group), &mut out) {
                        Ok(Outcome::Done(a)) => {
                            if let Some(prev) = held.insert(a, (i, id.clone())) {
                                assert_eq!(prev, (i, id.clone()), "seed {seed}: {a} handed out twice");
                            }
                        }
                        Ok(Outcome::Wait(_)) => waiting.push((i, id)),
                        Err(AllocError::Exhausted(_)) => {}
                        Err(e) => panic!("{e}"),
                    }
                    msgs.extend(unicasts(&peers, i, out));
                }
                let g = group.clone();
                deliver(&mut peers, msgs, &|a, b| g[a] == g[b]);
                // Unanswered requests (their peer is across the partition) give up.
                for ipam in peers.iter_mut() {
                    ipam.cancel_ask(range);
                }
                // A stalled election is restarted by someone now and then.
                if round % 20 == 10 {
                    let i = rng.random_range(0..n);
                    let mut out = Vec::new();
                    peers[i].repropose(&mut out);
                }
                // Some gossip inside each side.
                for _ in 0..n {
                    let a = rng.random_range(0..n);
                    let b = rng.random_range(0..n);
                    if group[a] == group[b] && a != b {
                        gossip(&mut peers, a, b);
                    }
                }
            }
            // Heal and gossip until quiet.
            for _ in 0..6 {
                for a in 0..n {
                    gossip(&mut peers, a, (a + 1) % n);
                    gossip(&mut peers, a, rng.random_range(0..n));
                }
            }
            let first = peers[0].ring().clone();
            assert!(!first.is_empty(), "seed {seed}: consensus decided the ring");
            for ipam in &peers {
                assert_eq!(ipam.ring(), &first, "seed {seed}: every ring identical after healing");
            }
            // Every allocation lies in its peer's own ranges.
            for (a, (i, _)) in &held {
                assert_eq!(first.owner_of(u32::from(*a)), Some(p(*i as u64)), "seed {seed}: {a} outside its owner's space");
            }
            assert!(held.len() > 1000, "seed {seed}: allocations happened ({})", held.len());
        }
    }

    /// Peers launched with discovery and nothing else: nobody decides before
    /// the group's size is known; then a majority of the group decides, and
    /// every peer ends with the same ring, allocations on every peer, no
    /// address twice. A late peer adopts the decided ring without ever voting.
    #[test]
    fn peers_sized_by_discovery_agree_once_a_majority_of_the_group_talks() {
        let range = net("10.32.0.0/24");
        let n = 3;
        let mut peers: Vec<Ipam> = (0..n + 1).map(|i| Ipam::new(p(i as u64), range, range, Init::Discovery)).collect();
        let all: BTreeSet<PeerName> = (0..n + 1).map(|i| p(i as u64)).collect();
        // Before discovery answers: allocations wait, nothing is proposed.
        let mut out = Vec::new();
        assert!(matches!(peers[0].allocate("a", None, &all, &mut out).unwrap(), Outcome::Wait(_)));
        assert!(out.is_empty(), "no proposal without a quorum: {out:?}");
        assert!(peers[0].waiting_for().contains("discovery"), "{}", peers[0].waiting_for());
        assert_eq!(peers[0].consensus(), None);
        // Discovery: a group of 3 (peers 0..3). Quorum 2.
        for ipam in peers.iter_mut().take(n) {
            assert!(ipam.size_from_discovery(n, &mut Vec::new()));
            assert_eq!(ipam.consensus().map(|(_, q)| q), Some(2));
        }
        // Peer 0 proposes; alone it cannot decide.
        let mut out = Vec::new();
        assert!(matches!(peers[0].allocate("a", None, &all, &mut out).unwrap(), Outcome::Wait(_)));
        assert!(out.contains(&Effect::Gossip), "proposes once sized");
        assert!(peers[0].ring().is_empty(), "one vote of two");
        // With peer 1 it does; peer 2 learns the ring by gossip.
        for _ in 0..4 {
            gossip(&mut peers, 0, 1);
        }
        assert!(!peers[0].ring().is_empty() && peers[0].ring() == peers[1].ring(), "a majority decided");
        gossip(&mut peers, 1, 2);
        assert_eq!(peers[2].ring(), peers[0].ring());
        // Peer 3 booted later and discovery has not answered it yet: it takes
        // the decided ring over, and sizing afterwards changes nothing.
        gossip(&mut peers, 3, 2);
        assert_eq!(peers[3].ring(), peers[0].ring());
        assert!(!peers[3].size_from_discovery(4, &mut Vec::new()), "nothing left to size");
        assert_eq!(peers[3].waiting_for(), "");
        // Allocations on every peer, none twice.
        let mut held = BTreeSet::new();
        for (i, ipam) in peers.iter_mut().enumerate() {
            for k in 0..5 {
                let mut out = Vec::new();
                match ipam.allocate(&format!("c{i}-{k}"), None, &all, &mut out).unwrap() {
                    Outcome::Done(a) => assert!(held.insert(a), "{a} twice"),
                    Outcome::Wait(_) => {} // owns nothing yet: asks a peer
                }
            }
        }
        // The value is the voters the proposer heard: 0 and 1 own the range,
        // 2 and 3 ask them for space.
        assert_eq!(held.len(), 10, "the deciding peers allocate at once");
    }

    #[test]
    fn a_discovery_quorum_grows_but_never_shrinks_and_survives_a_restart() {
        let range = net("10.32.0.0/24");
        let mut ipam = Ipam::new(p(0), range, range, Init::Discovery);
        assert!(!ipam.size_from_discovery(0, &mut Vec::new()), "an empty answer sizes nothing");
        assert!(ipam.size_from_discovery(3, &mut Vec::new()));
        assert!(ipam.size_from_discovery(5, &mut Vec::new()), "a larger group raises the quorum");
        assert_eq!(ipam.consensus().map(|(_, q)| q), Some(3));
        assert!(!ipam.size_from_discovery(2, &mut Vec::new()), "a smaller one never lowers it");
        assert_eq!(ipam.consensus().map(|(_, q)| q), Some(3));
        // A vote given, then a restart: the votes and the quorum are kept.
        let all: BTreeSet<PeerName> = [p(0)].into();
        let _ = ipam.allocate("a", None, &all, &mut Vec::new());
        let restored = Ipam::restore(p(0), range, Init::Discovery, ipam.persisted());
        assert_eq!(restored.consensus(), ipam.consensus());
        assert_eq!(restored.gossip_state(), ipam.gossip_state(), "the promise survives");
        // Other inits ignore discovery.
        let mut fixed = Ipam::new(p(0), range, range, Init::Consensus(1));
        assert!(!fixed.size_from_discovery(7, &mut Vec::new()));
    }


    /// A peer restored from an old state file (a VM snapshot) sees its own
    /// entries newer in its peers' gossip: it takes them back instead of
    /// refusing the peers for good.
    #[test]
    fn a_peer_restored_from_an_old_state_adopts_its_own_newer_entries() {
        let range = net("10.32.0.0/24");
        let mut peers: Vec<Ipam> = (0..2).map(|i| Ipam::new(p(i), range, range, Init::Consensus(2))).collect();
        let both: BTreeSet<PeerName> = [p(0), p(1)].into();
        let _ = peers[0].allocate("a", None, &both, &mut Vec::new());
        for _ in 0..4 {
            gossip(&mut peers, 0, 1);
        }
        assert!(!peers[0].ring().is_empty());
        let snapshot = peers[0].persisted();
        // Later: allocations bump peer 0's entries; peer 1 hears of them.
        for k in 0..5 {
            let _ = peers[0].allocate(&format!("later{k}"), None, &both, &mut Vec::new());
        }
        gossip(&mut peers, 0, 1);
        // Peer 0 is rolled back to the snapshot.
        let mut restored = Ipam::restore(p(0), range, Init::Consensus(2), snapshot);
        let theirs = peers[1].gossip_state();
        assert!(restored.on_gossip(&theirs, &mut Vec::new()).is_ok(), "its own newer entries are no conflict");
        assert_eq!(restored.ring(), peers[1].ring(), "and are adopted");
        // A peer with another history is still refused.
        let mut stranger = Ipam::new(p(7), range, range, Init::Seed(vec![p(7)]));
        stranger.refresh_free();
        for _ in 0..3 {
            let _ = stranger.allocate("s", None, &[p(7)].into(), &mut Vec::new());
            stranger.refresh_free();
        }
        assert!(restored.on_gossip(&stranger.gossip_state(), &mut Vec::new()).is_err(), "another history conflicts");
    }


    #[test]
    fn a_slash_32_at_the_subnets_edge_is_not_handed_out() {
        let range = net("10.32.0.0/24");
        let mut ipam = Ipam::new(p(0), range, range, Init::Consensus(1));
        let me: BTreeSet<PeerName> = [p(0)].into();
        let _ = ipam.allocate("first", None, &me, &mut Vec::new());
        for edge in ["10.32.0.0/32", "10.32.0.255/32"] {
            let got = ipam.allocate("x", Some(net(edge)), &me, &mut Vec::new());
            assert!(!matches!(got, Ok(Outcome::Done(_))), "{edge}: the subnet's network/broadcast address: {got:?}");
        }
        let inner = ipam.allocate("y", Some(net("10.32.0.7/32")), &me, &mut Vec::new());
        assert!(matches!(inner, Ok(Outcome::Done(a)) if a == Ipv4Addr::new(10, 32, 0, 7)), "{inner:?}");
    }

}
