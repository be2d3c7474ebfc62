//! The hickory-server request handler: answers the weft domain from the name
//! table and forwards the rest — for the sources [`Recursion`] allows, when
//! the query asks for recursion (RD), within the per-source [`RateLimit`] and
//! the upstream's limit of forwards in flight; otherwise REFUSED (SERVFAIL when
//! the forwards in flight are at their limit), each counted.

use std::net::{Ipv4Addr, SocketAddr};
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use hickory_proto::op::{Edns, Header, HeaderCounts, Message, MessageType, Metadata, OpCode, ResponseCode};
use hickory_proto::rr::rdata::PTR;
use hickory_proto::rr::{LowerName, Name, RData, Record, RecordType};
use hickory_proto::serialize::binary::{BinEncodable, BinEncoder};
use hickory_server::net::runtime::Time;
use hickory_server::net::xfer::Protocol;
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo, Server};
use hickory_server::zone_handler::{MessageResponse, MessageResponseBuilder};
use rand::seq::SliceRandom;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::policy::{RateLimit, Recursion};
use super::table::NameTable;
use super::upstream::Upstream;

/// Queries answered, by outcome.
#[derive(Debug, Default)]
pub struct Counters {
    pub answered: AtomicU64,
    pub nxdomain: AtomicU64,
    pub forwarded: AtomicU64,
    pub failed: AtomicU64,
    /// Not forwarded: a stranger's query, or RD clear (REFUSED).
    pub refused: AtomicU64,
    /// Not forwarded: the source's rate limit (REFUSED).
    pub rate_limited: AtomicU64,
    /// Not forwarded: the forwards in flight were at their limit (SERVFAIL).
    pub overloaded: AtomicU64,
    /// Forwards running now (a gauge, kept by the upstream).
    pub in_flight: AtomicU64,
}

struct Inner {
    table: Arc<NameTable>,
    /// The domain, lowercase, fully qualified (`weave.local.`).
    domain: Name,
    ttl: u32,
    upstream: Upstream,
    counters: Arc<Counters>,
    recursion: Recursion,
    rate: RateLimit,
}

/// Why a query that is not ours is not forwarded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum NoForward {
    /// RD clear: the client asked us not to recurse.
    NotDesired,
    /// The source is not one we forward for.
    Stranger,
    RateLimited,
    Overloaded,
}

impl NoForward {
    fn code(self) -> ResponseCode {
        match self {
            NoForward::NotDesired | NoForward::Stranger | NoForward::RateLimited => ResponseCode::Refused,
            NoForward::Overloaded => ResponseCode::ServFail,
        }
    }
}

/// A place among the forwards in flight; the gauge follows it.
struct Forwarding {
    _permit: tokio::sync::OwnedSemaphorePermit,
    counters: Arc<Counters>,
}

impl Drop for Forwarding {
    fn drop(&mut self) {
        self.counters.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Inner {
    /// Whether (and with which permit) a query that is not ours is forwarded;
    /// counts a refusal.
    fn gate(&self, request: &Request) -> Result<Forwarding, NoForward> {
        let src = request.src().ip();
        let verdict = if !request.metadata.recursion_desired {
            Err(NoForward::NotDesired)
        } else if !self.recursion.allows(src) {
            Err(NoForward::Stranger)
        } else if !self.rate.allow(src, std::time::Instant::now()) {
            Err(NoForward::RateLimited)
        } else {
            self.upstream.permit().ok_or(NoForward::Overloaded)
        };
        match verdict {
            Ok(permit) => {
                self.counters.in_flight.fetch_add(1, Ordering::Relaxed);
                Ok(Forwarding { _permit: permit, counters: self.counters.clone() })
            }
            Err(why) => {
                let counter = match why {
                    NoForward::NotDesired | NoForward::Stranger => &self.counters.refused,
                    NoForward::RateLimited => &self.counters.rate_limited,
                    NoForward::Overloaded => &self.counters.overloaded,
                };
                counter.fetch_add(1, Ordering::Relaxed);
                Err(why)
            }
        }
    }
}

/// The handler (cheap to clone: one per listener).
#[derive(Clone)]
pub struct Handler(Arc<Inner>);

impl Handler {
    /// A handler for `domain` answering from `table`, forwarding through `upstream`.
    pub fn new(
        table: Arc<NameTable>,
        domain: &Name,
        ttl: u32,
        upstream: Upstream,
        counters: Arc<Counters>,
        recursion: Recursion,
    ) -> Self {
        table.set_ttl(ttl);
        let rate = RateLimit::default();
        Handler(Arc::new(Inner { table, domain: domain.to_lowercase(), ttl, upstream, counters, recursion, rate }))
    }

    /// Forwards for the subnet of `addr` too (a listen address added later).
    pub fn allow_subnet_of(&self, addr: std::net::IpAddr) {
        self.0.recursion.allow_subnet_of(addr);
    }
}

/// `d.c.b.a.in-addr.arpa.` → `a.b.c.d`.
fn reverse_v4(name: &Name) -> Option<Ipv4Addr> {
    let text = name.to_ascii().to_ascii_lowercase();
    let rest = text.trim_end_matches('.').strip_suffix(".in-addr.arpa")?;
    let octets: Vec<u8> = rest.split('.').map(|o| o.parse().ok()).collect::<Option<Vec<u8>>>()?;
    if octets.len() != 4 {
        return None;
    }
    Some(Ipv4Addr::new(octets[3], octets[2], octets[1], octets[0]))
}

/// The EDNS to answer with: the client's buffer size (at least 512), so large
/// UDP answers are cut at what it can take and flagged TC.
fn response_edns(request: &Request) -> Option<Edns> {
    request.edns.as_ref().map(|e| {
        let mut r = Edns::new();
        r.set_max_payload(e.max_payload().max(512));
        r
    })
}

/// Sends a response; a failure to send (the client went away) is only logged.
async fn send<'q, 'a, R, A, N, S, D>(response: &mut R, msg: MessageResponse<'q, 'a, A, N, S, D>) -> ResponseInfo
where
    R: ResponseHandler,
    A: Iterator<Item = &'a Record> + Send + 'a,
    N: Iterator<Item = &'a Record> + Send + 'a,
    S: Iterator<Item = &'a Record> + Send + 'a,
    D: Iterator<Item = &'a Record> + Send + 'a,
{
    let metadata = *msg.metadata();
    match response.send_response(msg).await {
        Ok(info) => info,
        Err(e) => {
            debug!(error = %e, "cannot send a DNS response");
            ResponseInfo::from(Header { metadata, counts: HeaderCounts::default() })
        }
    }
}

enum Answer<'a> {
    /// Our own records (references into the index), shuffled.
    Ours(Vec<&'a Record>),
    Records(ResponseCode, Vec<Record>),
    Forward,
}

/// An answer that does not borrow the index (cheap: records are small and few).
enum Owned {
    Ours(Vec<Record>),
    Records(ResponseCode, Vec<Record>),
    Forward,
}

impl Answer<'_> {
    fn owned(self) -> Owned {
        match self {
            Answer::Ours(refs) => Owned::Ours(refs.into_iter().cloned().collect()),
            Answer::Records(c, r) => Owned::Records(c, r),
            Answer::Forward => Owned::Forward,
        }
    }
}

impl Inner {
    fn local<'a>(&self, index: &'a super::table::Index, name: &LowerName, qtype: RecordType) -> Answer<'a> {
        // The common case first: a full name of ours, found as asked.
        let found = index.records.get(name).or_else(|| {
            // A single label is a name in our domain.
            (name.num_labels() == 1)
                .then(|| Name::from(name).append_domain(&self.domain).ok())
                .flatten()
                .and_then(|n| index.records.get(&LowerName::from(&n)))
        });
        match found {
            Some(records) if matches!(qtype, RecordType::A | RecordType::ANY) => {
                let mut refs: Vec<&Record> = records.iter().collect();
                refs.shuffle(&mut rand::rng());
                return Answer::Ours(refs);
            }
            // The name exists, just not with that type.
            Some(_) => return Answer::Records(ResponseCode::NoError, Vec::new()),
            None => {}
        }
        let lower_domain = LowerName::from(&self.domain);
        if lower_domain.zone_of(name) || name.num_labels() == 1 {
            return Answer::Records(ResponseCode::NXDomain, Vec::new());
        }
        if qtype == RecordType::PTR {
            let full = Name::from(name);
            if let Some(addr) = reverse_v4(&full)
                && let Some(names) = index.by_addr.get(&addr) {
                    let records = names
                        .iter()
                        .filter_map(|n| Name::from_str(n).ok())
                        .map(|n| Record::from_rdata(full.clone(), self.ttl, RData::PTR(PTR(n))))
                        .collect();
                    return Answer::Records(ResponseCode::NoError, records);
                }
        }
        Answer::Forward
    }
}

#[async_trait::async_trait]
impl RequestHandler for Handler {
    async fn handle_request<R: ResponseHandler, T: Time>(&self, request: &Request, response: R) -> ResponseInfo {
        self.respond(request, response, None).await
    }
}

impl Handler {
    /// Answers `request` (TCP, and UDP queries that are forwarded, which come
    /// with their place among the forwards in flight).
    async fn respond<R: ResponseHandler>(&self, request: &Request, mut response: R, forwarding: Option<Forwarding>) -> ResponseInfo {
        let inner = &self.0;
        let edns = response_edns(request);
        let mut builder = MessageResponseBuilder::from_message_request(request);
        if let Some(e) = &edns {
            builder.edns(e);
        }
        let mut meta = Metadata::response_from_request(&request.metadata);
        meta.recursion_available = inner.recursion.allows(request.src().ip());
        let fail = |meta: Metadata, code| {
            let mut meta = meta;
            meta.response_code = code;
            meta
        };
        if request.metadata.message_type != MessageType::Query || request.metadata.op_code != OpCode::Query {
            inner.counters.failed.fetch_add(1, Ordering::Relaxed);
            let resp = builder.build_no_records(fail(meta, ResponseCode::NotImp));
            return send(&mut response, resp).await;
        }
        let info = match request.request_info() {
            Ok(info) => info,
            Err(_) => {
                inner.counters.failed.fetch_add(1, Ordering::Relaxed);
                let resp = builder.build_no_records(fail(meta, ResponseCode::FormErr));
                return send(&mut response, resp).await;
            }
        };
        let name = info.query.name();
        let qtype = info.query.query_type();
        // A guard is for short reads: not held across the upstream's await.
        let answer = inner.local(&inner.table.index_guard(), name, qtype).owned();
        match answer {
            Owned::Ours(records) => {
                inner.counters.answered.fetch_add(1, Ordering::Relaxed);
                meta.authoritative = true;
                let resp = builder.build(meta, records.iter(), [].iter(), [].iter(), [].iter());
                send(&mut response, resp).await
            }
            Owned::Records(code, records) => {
                if code == ResponseCode::NXDomain {
                    inner.counters.nxdomain.fetch_add(1, Ordering::Relaxed);
                } else {
                    inner.counters.answered.fetch_add(1, Ordering::Relaxed);
                }
                meta.authoritative = true;
                meta.response_code = code;
                let resp = builder.build(meta, records.iter(), [].iter(), [].iter(), [].iter());
                send(&mut response, resp).await
            }
            Owned::Forward => {
                let _forwarding = match forwarding.map_or_else(|| inner.gate(request), Ok) {
                    Ok(f) => f,
                    Err(why) => {
                        let resp = builder.build_no_records(fail(meta, why.code()));
                        return send(&mut response, resp).await;
                    }
                };
                let tcp = request.protocol() == Protocol::Tcp;
                match inner.upstream.forward(request.as_slice(), tcp).await.map(|b| Message::from_vec(&b)) {
                    Ok(Ok(up)) => {
                        inner.counters.forwarded.fetch_add(1, Ordering::Relaxed);
                        meta.response_code = up.metadata.response_code;
                        meta.authoritative = up.metadata.authoritative;
                        let resp = builder.build(meta, up.answers.iter(), up.authorities.iter(), [].iter(), up.additionals.iter());
                        send(&mut response, resp).await
                    }
                    Ok(Err(e)) => {
                        inner.counters.failed.fetch_add(1, Ordering::Relaxed);
                        debug!(error = %e, "upstream answered garbage");
                        let resp = builder.build_no_records(fail(meta, ResponseCode::ServFail));
                        send(&mut response, resp).await
                    }
                    Err(e) => {
                        inner.counters.failed.fetch_add(1, Ordering::Relaxed);
                        debug!(%name, error = %e, "cannot forward");
                        let resp = builder.build_no_records(fail(meta, ResponseCode::ServFail));
                        send(&mut response, resp).await
                    }
                }
            }
        }
    }
}

/// Idle TCP connections are closed after this long.
pub const TCP_TIMEOUT: Duration = Duration::from_secs(10);

/// A UDP socket on `addr` that other sockets may share (SO_REUSEPORT): the
/// kernel spreads queries over them, one receive thread per core.
fn shared_udp(addr: SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    use socket2::{Domain, Protocol as SockProtocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(SockProtocol::UDP))?;
    socket.set_reuse_port(true)?;
    socket.set_read_timeout(Some(Duration::from_millis(500)))?;
    socket.bind(&addr.into())?;
    Ok(socket.into())
}

/// Encodes a response as UDP wants it: cut at the client's buffer size (and
/// flagged TC) — or a bare SERVFAIL if it cannot be encoded at all.
fn encode_udp<'a>(
    response: MessageResponse<
        '_,
        'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
    >,
) -> (ResponseInfo, Vec<u8>) {
    let max = response.edns().map_or(512, |e| e.max_payload().max(512));
    let id = response.metadata().id;
    let mut bytes = Vec::with_capacity(512);
    let mut encoder = BinEncoder::new(&mut bytes);
    encoder.set_max_size(max);
    match response.destructive_emit(&mut encoder) {
        Ok(info) => (info, bytes),
        Err(e) => {
            debug!(error = %e, "cannot encode a DNS answer");
            bytes.clear();
            let mut encoder = BinEncoder::new(&mut bytes);
            let mut metadata = Metadata::new(id, MessageType::Response, OpCode::Query);
            metadata.response_code = ResponseCode::ServFail;
            let header = Header { metadata, counts: HeaderCounts::default() };
            let _ = header.emit(&mut encoder);
            (ResponseInfo::from(header), bytes)
        }
    }
}

/// Answers a forwarded UDP query on the socket it came in on.
#[derive(Clone)]
struct DirectUdp {
    socket: Arc<std::net::UdpSocket>,
    dst: SocketAddr,
}

#[async_trait::async_trait]
impl ResponseHandler for DirectUdp {
    async fn send_response<'a>(
        &mut self,
        response: MessageResponse<
            '_,
            'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
        >,
    ) -> Result<ResponseInfo, hickory_server::net::NetError> {
        let (info, bytes) = encode_udp(response);
        // A UDP send does not block for long; this keeps one socket for both paths.
        self.socket.send_to(&bytes, self.dst).map_err(hickory_server::net::NetError::from)?;
        Ok(info)
    }
}

impl Handler {
    /// The whole answer to a local query, encoded for UDP (no await: for the
    /// receive threads, which hold the index while they encode, so our own
    /// records are written straight from it).
    fn answer_udp(&self, request: &Request, answer: Answer<'_>) -> Vec<u8> {
        let inner = &self.0;
        let edns = response_edns(request);
        let mut builder = MessageResponseBuilder::from_message_request(request);
        if let Some(e) = &edns {
            builder.edns(e);
        }
        let mut meta = Metadata::response_from_request(&request.metadata);
        meta.recursion_available = inner.recursion.allows(request.src().ip());
        meta.authoritative = true;
        match answer {
            Answer::Ours(refs) => {
                inner.counters.answered.fetch_add(1, Ordering::Relaxed);
                encode_udp(builder.build(meta, refs, [].iter(), [].iter(), [].iter())).1
            }
            Answer::Records(code, records) => {
                match code {
                    ResponseCode::NXDomain => inner.counters.nxdomain.fetch_add(1, Ordering::Relaxed),
                    ResponseCode::NoError => inner.counters.answered.fetch_add(1, Ordering::Relaxed),
                    // Refusals were counted by the gate.
                    ResponseCode::Refused | ResponseCode::ServFail => 0,
                    _ => inner.counters.failed.fetch_add(1, Ordering::Relaxed),
                };
                meta.response_code = code;
                meta.authoritative = code == ResponseCode::NoError || code == ResponseCode::NXDomain;
                encode_udp(builder.build(meta, records.iter(), [].iter(), [].iter(), [].iter())).1
            }
            Answer::Forward => unreachable!("forwarded queries go to the async path"),
        }
    }
}

/// One receive thread per socket, blocking in `recv_from`: our names are
/// answered right there (no task, no wakeup, no channel — as a classic DNS
/// server loop does); what must be forwarded goes to the runtime so a slow
/// upstream never holds the loop up.
fn udp_thread(socket: Arc<std::net::UdpSocket>, handler: Handler, runtime: tokio::runtime::Handle, cancel: CancellationToken) {
    let mut buf = vec![0u8; 65535];
    while !cancel.is_cancelled() {
        let (n, src) = match socket.recv_from(&mut buf) {
            Ok(x) => x,
            // The read timeout lets the thread notice a shutdown.
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => continue,
            Err(e) => {
                debug!(error = %e, "DNS receive error");
                continue;
            }
        };
        // Nothing can be answered to port 0; garbage is dropped.
        if src.port() == 0 {
            continue;
        }
        let Ok(request) = Request::from_bytes(buf[..n].to_vec(), src, Protocol::Udp) else { continue };
        let local = {
            let index = handler.0.table.index_guard();
            let answer = match request.request_info() {
                Ok(info) => handler.0.local(&index, info.query.name(), info.query.query_type()),
                Err(_) => Answer::Records(ResponseCode::FormErr, Vec::new()),
            };
            match answer {
                // Decided here, before any task: a refused query costs no more
                // than one of our own names.
                Answer::Forward => match handler.0.gate(&request) {
                    Ok(forwarding) => Err(forwarding),
                    Err(why) => Ok(handler.answer_udp(&request, Answer::Records(why.code(), Vec::new()))),
                },
                answer => Ok(handler.answer_udp(&request, answer)),
            }
        };
        match local {
            Ok(bytes) => {
                if let Err(e) = socket.send_to(&bytes, src) {
                    debug!(%src, error = %e, "cannot send a DNS answer");
                }
            }
            Err(forwarding) => {
                let (handler, responder) = (handler.clone(), DirectUdp { socket: socket.clone(), dst: src });
                runtime.spawn(async move {
                    handler.respond(&request, responder, Some(forwarding)).await;
                });
            }
        }
    }
}

/// The sockets of one DNS listen address, bound but not served yet (a launch
/// binds everything before it touches the kernel).
#[derive(Debug)]
pub struct Bound {
    udp: Vec<std::net::UdpSocket>,
    tcp: std::net::TcpListener,
    local: SocketAddr,
}

impl Bound {
    /// The bound address (port 0 picks one).
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }
}

/// Binds UDP and TCP at `addr`: one SO_REUSEPORT UDP socket per core.
pub fn bind(addr: SocketAddr) -> std::io::Result<Bound> {
    let first = shared_udp(addr)?;
    let local = first.local_addr()?;
    let tcp = std::net::TcpListener::bind(local)?;
    tcp.set_nonblocking(true)?;
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    let mut udp = vec![first];
    for _ in 1..cores {
        udp.push(shared_udp(local)?);
    }
    Ok(Bound { udp, tcp, local })
}

/// Serves `handler` on `bound` until `cancel`; returns the address. UDP: one
/// thread per socket; TCP: hickory-server's.
pub fn serve(bound: Bound, handler: Handler, cancel: CancellationToken) -> std::io::Result<SocketAddr> {
    let Bound { udp, tcp, local } = bound;
    let tcp = tokio::net::TcpListener::from_std(tcp)?;
    let runtime = tokio::runtime::Handle::current();
    for socket in udp {
        let (handler, runtime, cancel) = (handler.clone(), runtime.clone(), cancel.clone());
        std::thread::Builder::new()
            .name("weft-dns".into())
            .spawn(move || udp_thread(Arc::new(socket), handler, runtime, cancel))?;
    }
    let mut server = Server::new(handler);
    server.register_listener(tcp, TCP_TIMEOUT, 65535);
    tokio::spawn(async move {
        cancel.cancelled().await;
        if let Err(e) = server.shutdown_gracefully().await {
            warn!(%local, error = %e, "DNS server stopped with an error");
        }
    });
    Ok(local)
}

/// [`bind`] then [`serve`].
pub fn listen(addr: SocketAddr, handler: Handler, cancel: CancellationToken) -> std::io::Result<SocketAddr> {
    serve(bind(addr)?, handler, cancel)
}
