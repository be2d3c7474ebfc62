//! The control connection's wire format (TCP 6783).
//!
//! 1. Both sides send an 8-byte preamble in the clear: `weft`, the lowest and
//!    highest protocol version they speak, and whether they require encryption.
//!    Mismatches end the connection with a message saying which.
//! 2. With a password: a Noise `XXpsk3_25519_ChaChaPoly_BLAKE2s` handshake (the
//!    dialer initiates; the preambles are the prologue, so they cannot be
//!    altered), the pre-shared key derived from the password. A peer with
//!    another password fails the handshake: it never sees a byte of gossip.
//! 3. Frames: a 4-byte big-endian length and a postcard-encoded [`Frame`]. When
//!    encrypted, a frame (length included) is cut into chunks of at most
//!    [`CHUNK`] bytes, each sent as a Noise transport message with a 2-byte length.
//!
//! The first frame each way is a [`Hello`]. Every decoder here returns an error
//! for any input it does not understand; none panics.
//!
//! Owns the byte format and the handshake. Must not touch the mesh's state or
//! decide what a failure means for the connection (see `close`).

use std::io;
use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::node::Gossip;
use super::peer::PeerName;

/// Protocol versions this build speaks.
pub const VERSION_MIN: u8 = 1;
pub const VERSION_MAX: u8 = 1;

const MAGIC: &[u8; 4] = b"weft";
const FLAG_ENCRYPTED: u8 = 1;

/// The largest frame accepted: a topology of a thousand well-connected peers fits.
pub const MAX_FRAME: usize = 32 << 20;

/// The largest frame accepted before the peer's [`Hello`] has arrived (the
/// peer is not authenticated yet): a hello is a few dozen bytes, and a stranger
/// must not make us buffer [`MAX_FRAME`] bytes per connection.
pub const MAX_FIRST_FRAME: usize = 64 << 10;

/// Plaintext bytes per Noise transport message (65535 minus the 16-byte tag).
pub const CHUNK: usize = 65535 - 16;

/// The Noise pattern.
pub const NOISE_PATTERN: &str = "Noise_XXpsk3_25519_ChaChaPoly_BLAKE2s";

/// Why a connection's protocol failed.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("connection closed")]
    Closed,
    #[error("I/O: {0}")]
    Io(#[from] io::Error),
    #[error("not a weft peer (it sent {0:02x?} instead of the weft preamble)")]
    NotWeft([u8; 4]),
    #[error("no common protocol version: we speak {ours_min}..={ours_max}, the peer {theirs_min}..={theirs_max}")]
    Version { ours_min: u8, ours_max: u8, theirs_min: u8, theirs_max: u8 },
    #[error("the peer requires a password but none is set here (set --password / WEFT_PASSWORD)")]
    PeerWantsPassword,
    #[error("a password is set here but the peer has none (give it the same --password)")]
    PeerHasNoPassword,
    #[error("authentication failed: the peer's password differs from ours")]
    BadPassword,
    #[error("the peer closed the connection during authentication: its password probably differs from ours")]
    ClosedDuringAuth,
    #[error("encryption: {0}")]
    Noise(String),
    #[error("frame of {len} bytes is larger than the {limit}-byte limit{}", if *.limit < MAX_FRAME { " for a frame before the handshake completes" } else { "" })]
    FrameTooLarge { len: usize, limit: usize },
    #[error("{trailing} trailing bytes after a {what} frame: not a weft peer, or a corrupt stream")]
    Trailing { what: &'static str, trailing: usize },
    #[error("malformed frame: {0}")]
    Malformed(String),
    #[error("cannot encode a frame: {0}")]
    Encode(#[source] postcard::Error),
    #[error("timed out: {0}")]
    Timeout(&'static str),
}

/// What a peer says about itself when a connection starts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    pub name: PeerName,
    pub nickname: String,
    pub uid: u64,
    /// The port it listens on (so the other side can dial it back later).
    pub listen_port: u16,
    /// Its data-plane address.
    pub data_addr: Option<Ipv4Addr>,
}

/// Everything after the preamble and handshake.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Frame {
    Hello(Hello),
    Heartbeat,
    Gossip(Gossip),
}

impl Frame {
    /// Encodes to bytes.
    pub fn encode(&self) -> Result<Vec<u8>, WireError> {
        postcard::to_stdvec(self).map_err(WireError::Encode)
    }

    /// Decodes; any byte string that is not exactly one frame is an error
    /// (bytes left after it too: the sender is not speaking this protocol).
    pub fn decode(bytes: &[u8]) -> Result<Frame, WireError> {
        let (frame, rest) =
            postcard::take_from_bytes::<Frame>(bytes).map_err(|e| WireError::Malformed(e.to_string()))?;
        if !rest.is_empty() {
            let what = match frame {
                Frame::Hello(_) => "hello",
                Frame::Heartbeat => "heartbeat",
                Frame::Gossip(_) => "gossip",
            };
            return Err(WireError::Trailing { what, trailing: rest.len() });
        }
        Ok(frame)
    }
}

/// The 8-byte preamble.
pub fn preamble(encrypted: bool) -> [u8; 8] {
    let mut p = [0u8; 8];
    p[..4].copy_from_slice(MAGIC);
    p[4] = VERSION_MIN;
    p[5] = VERSION_MAX;
    p[6] = if encrypted { FLAG_ENCRYPTED } else { 0 };
    p
}

/// Checks the peer's preamble against ours; returns the version to speak.
pub fn check_preamble(theirs: &[u8; 8], encrypted: bool) -> Result<u8, WireError> {
    let [m0, m1, m2, m3, tmin, tmax, flags, _] = *theirs;
    let magic = [m0, m1, m2, m3];
    if &magic != MAGIC {
        return Err(WireError::NotWeft(magic));
    }
    let version = VERSION_MAX.min(tmax);
    if tmin > tmax || version < VERSION_MIN.max(tmin) {
        return Err(WireError::Version {
            ours_min: VERSION_MIN,
            ours_max: VERSION_MAX,
            theirs_min: tmin,
            theirs_max: tmax,
        });
    }
    let theirs_encrypted = flags & FLAG_ENCRYPTED != 0;
    match (encrypted, theirs_encrypted) {
        (false, true) => Err(WireError::PeerWantsPassword),
        (true, false) => Err(WireError::PeerHasNoPassword),
        _ => Ok(version),
    }
}

/// The pre-shared key for a password.
pub fn psk(password: &str) -> [u8; 32] {
    use blake2::Digest;
    let mut h = blake2::Blake2s256::new();
    h.update(b"weft control-plane psk v1\0");
    h.update(password.as_bytes());
    h.finalize().into()
}

fn noise_err(e: snow::Error) -> WireError {
    WireError::Noise(e.to_string())
}

/// The cipher both halves of a connection share.
type SharedCipher = std::sync::Arc<std::sync::Mutex<snow::TransportState>>;

/// Locks the cipher. It is poisoned only if a panic struck while it was held,
/// leaving its nonces unknown: the connection cannot go on.
fn lock(cipher: &SharedCipher) -> Result<std::sync::MutexGuard<'_, snow::TransportState>, WireError> {
    cipher.lock().map_err(|_| WireError::Noise("the cipher state was lost to a panic".into()))
}

async fn read_exact_or_closed<R: AsyncRead + Unpin>(r: &mut R, buf: &mut [u8]) -> Result<(), WireError> {
    match r.read_exact(buf).await {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Err(WireError::Closed),
        Err(e) => Err(e.into()),
    }
}

async fn read_u16_message<R: AsyncRead + Unpin>(r: &mut R) -> Result<Vec<u8>, WireError> {
    let mut len = [0u8; 2];
    read_exact_or_closed(r, &mut len).await?;
    let mut msg = vec![0u8; usize::from(u16::from_be_bytes(len))];
    read_exact_or_closed(r, &mut msg).await?;
    Ok(msg)
}

async fn write_u16_message<W: AsyncWrite + Unpin>(w: &mut W, msg: &[u8]) -> Result<(), WireError> {
    let len = u16::try_from(msg.len()).map_err(|_| WireError::Malformed("handshake message too long".into()))?;
    w.write_all(&len.to_be_bytes()).await?;
    w.write_all(msg).await?;
    Ok(())
}

/// Runs the preamble exchange and, with a password, the Noise handshake. Returns
/// the negotiated version and the transport cipher (None when unencrypted).
pub async fn handshake<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    password: Option<&str>,
    initiator: bool,
) -> Result<(u8, Option<snow::TransportState>), WireError> {
    let ours = preamble(password.is_some());
    stream.write_all(&ours).await?;
    let mut theirs = [0u8; 8];
    read_exact_or_closed(stream, &mut theirs).await?;
    let version = check_preamble(&theirs, password.is_some())?;
    let Some(password) = password else {
        return Ok((version, None));
    };
    let mut prologue = Vec::with_capacity(16);
    let (first, second) = if initiator { (&ours, &theirs) } else { (&theirs, &ours) };
    prologue.extend_from_slice(first);
    prologue.extend_from_slice(second);
    let key = psk(password);
    let params = NOISE_PATTERN.parse().map_err(noise_err)?;
    let builder = snow::Builder::new(params);
    let keypair = builder.generate_keypair().map_err(noise_err)?;
    let builder = snow::Builder::new(NOISE_PATTERN.parse().map_err(noise_err)?)
        .local_private_key(&keypair.private)
        .map_err(noise_err)?
        .psk(3, &key)
        .map_err(noise_err)?
        .prologue(&prologue)
        .map_err(noise_err)?;
    let mut hs = if initiator { builder.build_initiator() } else { builder.build_responder() }.map_err(noise_err)?;
    let mut buf = vec![0u8; 65535];
    let mut payload = vec![0u8; 65535];
    // XX: -> e; <- e, ee, s, es; -> s, se (+ psk). Only the third message
    // depends on the password, so the responder is the one that can tell.
    let mut message = 0;
    while !hs.is_handshake_finished() {
        message += 1;
        if hs.is_my_turn() {
            let n = hs.write_message(&[], &mut buf).map_err(noise_err)?;
            write_u16_message(stream, &buf[..n]).await?;
        } else {
            let msg = read_u16_message(stream).await?;
            if let Err(e) = hs.read_message(&msg, &mut payload) {
                return Err(if message == 3 { WireError::BadPassword } else { noise_err(e) });
            }
        }
    }
    let mut transport = hs.into_transport_mode().map_err(noise_err)?;
    // The responder confirms under the final keys; the dialer waits for it, so a
    // wrong password fails on both sides before any frame is exchanged.
    if initiator {
        let msg = match read_u16_message(stream).await {
            Ok(m) => m,
            Err(WireError::Closed) => return Err(WireError::ClosedDuringAuth),
            Err(e) => return Err(e),
        };
        let n = transport.read_message(&msg, &mut payload).map_err(|_| WireError::BadPassword)?;
        if &payload[..n] != CONFIRM {
            return Err(WireError::Malformed("bad handshake confirmation".into()));
        }
    } else {
        let n = transport.write_message(CONFIRM, &mut buf).map_err(noise_err)?;
        write_u16_message(stream, &buf[..n]).await?;
    }
    Ok((version, Some(transport)))
}

/// What the responder sends under the final keys to end the handshake.
const CONFIRM: &[u8] = b"weft-ok";

/// Reads frames from one side of a connection.
pub struct FrameReader<R> {
    inner: R,
    cipher: Option<SharedCipher>,
    plain: Vec<u8>,
    chunk: Vec<u8>,
    /// The largest frame accepted now: [`MAX_FIRST_FRAME`] until
    /// [`FrameReader::authenticated`], then [`MAX_FRAME`].
    limit: usize,
}

/// Writes frames to one side of a connection.
pub struct FrameWriter<W> {
    inner: W,
    cipher: Option<SharedCipher>,
    out: Vec<u8>,
}

/// Splits a connection into a frame reader and writer sharing the cipher.
pub fn framed<R, W>(reader: R, writer: W, cipher: Option<snow::TransportState>) -> (FrameReader<R>, FrameWriter<W>) {
    let cipher = cipher.map(|c| std::sync::Arc::new(std::sync::Mutex::new(c)));
    (
        FrameReader { inner: reader, cipher: cipher.clone(), plain: Vec::new(), chunk: vec![0u8; 65535], limit: MAX_FIRST_FRAME },
        FrameWriter { inner: writer, cipher, out: vec![0u8; 65535] },
    )
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    /// The peer's hello has arrived: frames up to [`MAX_FRAME`] are accepted.
    pub fn authenticated(&mut self) {
        self.limit = MAX_FRAME;
    }

    async fn fill(&mut self, want: usize) -> Result<(), WireError> {
        while self.plain.len() < want {
            match &self.cipher {
                None => {
                    let mut buf = vec![0u8; (want - self.plain.len()).min(1 << 20)];
                    let n = self.inner.read(&mut buf).await?;
                    if n == 0 {
                        return Err(WireError::Closed);
                    }
                    self.plain.extend_from_slice(&buf[..n]);
                }
                Some(cipher) => {
                    let msg = read_u16_message(&mut self.inner).await?;
                    let n = lock(cipher)?
                        .read_message(&msg, &mut self.chunk)
                        .map_err(|e| WireError::Noise(format!("cannot decrypt: {e}")))?;
                    self.plain.extend_from_slice(&self.chunk[..n]);
                }
            }
        }
        Ok(())
    }

    /// The next frame.
    pub async fn read(&mut self) -> Result<Frame, WireError> {
        self.fill(4).await?;
        // `fill` returned, so the bytes are there; the checks keep it so.
        let short = || WireError::Malformed("short read".into());
        let len = u32::from_be_bytes(*self.plain.first_chunk::<4>().ok_or_else(short)?) as usize;
        if len > self.limit {
            return Err(WireError::FrameTooLarge { len, limit: self.limit });
        }
        self.fill(4 + len).await?;
        let frame = Frame::decode(self.plain.get(4..4 + len).ok_or_else(short)?);
        self.plain.drain(..4 + len);
        frame
    }
}

impl<W: AsyncWrite + Unpin> FrameWriter<W> {
    /// Sends a frame.
    pub async fn write(&mut self, frame: &Frame) -> Result<(), WireError> {
        let body = frame.encode()?;
        if body.len() > MAX_FRAME {
            return Err(WireError::FrameTooLarge { len: body.len(), limit: MAX_FRAME });
        }
        let mut plain = Vec::with_capacity(4 + body.len());
        plain.extend_from_slice(&(body.len() as u32).to_be_bytes());
        plain.extend_from_slice(&body);
        match &self.cipher {
            None => self.inner.write_all(&plain).await?,
            Some(cipher) => {
                for chunk in plain.chunks(CHUNK) {
                    let n = lock(cipher)?
                        .write_message(chunk, &mut self.out)
                        .map_err(|e| WireError::Noise(format!("cannot encrypt: {e}")))?;
                    self.inner.write_all(&(n as u16).to_be_bytes()).await?;
                    self.inner.write_all(&self.out[..n]).await?;
                }
            }
        }
        self.inner.flush().await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    async fn pair(
        a: Option<&'static str>,
        b: Option<&'static str>,
    ) -> (Result<(u8, Option<snow::TransportState>), WireError>, Result<(u8, Option<snow::TransportState>), WireError>)
    {
        let (mut x, mut y) = tokio::io::duplex(1 << 20);
        let ta = tokio::spawn(async move {
            let r = handshake(&mut x, a, true).await;
            drop(x);
            r
        });
        let tb = tokio::spawn(async move {
            let r = handshake(&mut y, b, false).await;
            drop(y);
            r
        });
        (ta.await.unwrap(), tb.await.unwrap())
    }

    #[tokio::test]
    async fn same_password_connects_and_frames_round_trip_encrypted() {
        let (mut x, mut y) = tokio::io::duplex(1 << 16);
        let a = tokio::spawn(async move {
            let (_, cipher) = handshake(&mut x, Some("s3cret"), true).await.unwrap();
            let (r, w) = tokio::io::split(x);
            framed(r, w, cipher)
        });
        let (_, cipher) = handshake(&mut y, Some("s3cret"), false).await.unwrap();
        let (r, w) = tokio::io::split(y);
        let (mut yr, _yw) = framed(r, w, cipher);
        yr.authenticated();
        let (_xr, mut xw) = a.await.unwrap();
        // A frame larger than one Noise message, cut into chunks.
        let big = Frame::Gossip(Gossip::Channel { channel: "dns".into(), payload: vec![7u8; 200_000] });
        let writer = tokio::spawn(async move {
            xw.write(&Frame::Heartbeat).await.unwrap();
            xw.write(&big).await.unwrap();
            big
        });
        assert_eq!(yr.read().await.unwrap(), Frame::Heartbeat);
        let got = yr.read().await.unwrap();
        assert_eq!(got, writer.await.unwrap());
    }

    #[tokio::test]
    async fn before_the_hello_a_frame_may_not_exceed_the_small_limit() {
        let (mut x, y) = tokio::io::duplex(1 << 20);
        let (r, w) = tokio::io::split(y);
        let (mut reader, _w) = framed(r, w, None);
        // A 32 MiB length: refused on the length alone, nothing buffered.
        x.write_all(&((32u32 << 20) - 1).to_be_bytes()).await.unwrap();
        let err = reader.read().await.unwrap_err();
        assert!(matches!(err, WireError::FrameTooLarge { limit: MAX_FIRST_FRAME, .. }), "{err:?}");
        assert!(err.to_string().contains("65536-byte limit for a frame before the handshake completes"), "{err}");
        assert!(reader.plain.capacity() < MAX_FIRST_FRAME, "nothing was buffered");
    }

    #[test]
    fn bytes_after_a_frame_are_refused() {
        let hello = Frame::Hello(Hello { name: PeerName::new(5), nickname: "x".into(), uid: 1, listen_port: 6783, data_addr: None });
        let mut bytes = hello.encode().unwrap();
        assert_eq!(Frame::decode(&bytes).unwrap(), hello);
        bytes.extend_from_slice(b"xyz");
        let err = Frame::decode(&bytes).unwrap_err();
        assert!(matches!(err, WireError::Trailing { what: "hello", trailing: 3 }), "{err:?}");
    }

    #[tokio::test]
    async fn different_passwords_fail_on_both_sides() {
        let (a, b) = pair(Some("one"), Some("two")).await;
        assert!(matches!(a, Err(WireError::ClosedDuringAuth)), "{a:?}");
        assert!(matches!(b, Err(WireError::BadPassword)), "{b:?}");
    }

    #[tokio::test]
    async fn password_on_one_side_only_fails_with_a_clear_message() {
        let (a, b) = pair(Some("one"), None).await;
        assert!(matches!(a, Err(WireError::PeerHasNoPassword)), "{a:?}");
        assert!(matches!(b, Err(WireError::PeerWantsPassword)), "{b:?}");
    }

    #[test]
    fn preamble_checks() {
        assert_eq!(check_preamble(&preamble(false), false).unwrap(), VERSION_MAX);
        assert!(matches!(check_preamble(b"GET / HT", false), Err(WireError::NotWeft(_))));
        let mut future = preamble(false);
        future[4] = VERSION_MAX + 1;
        future[5] = VERSION_MAX + 3;
        assert!(matches!(check_preamble(&future, false), Err(WireError::Version { .. })));
    }

    proptest! {
        #[test]
        fn random_bytes_never_decode_into_a_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = Frame::decode(&bytes);
        }

        #[test]
        fn truncated_frames_are_errors(n in 0usize..64) {
            let frame = Frame::Hello(Hello {
                name: PeerName::new(5), nickname: "x".repeat(40), uid: 1, listen_port: 6783, data_addr: None,
            });
            let bytes = frame.encode().unwrap();
            if n < bytes.len() {
                prop_assert!(Frame::decode(&bytes[..n]).is_err());
            }
        }

        #[test]
        fn random_streams_end_in_an_error_not_a_hang(bytes in proptest::collection::vec(any::<u8>(), 0..300), encrypted in any::<bool>()) {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async {
                let (mut x, mut y) = tokio::io::duplex(1 << 16);
                let mut stream = preamble(encrypted).to_vec();
                stream.extend_from_slice(&bytes);
                let feeder = tokio::spawn(async move {
                    let _ = x.write_all(&stream).await;
                    // Read (and drop) what the other side writes, then hang up.
                    let mut sink = vec![0u8; 4096];
                    let _ = tokio::time::timeout(std::time::Duration::from_millis(50), x.read(&mut sink)).await;
                });
                let password = if encrypted { Some("pw") } else { None };
                let result = tokio::time::timeout(std::time::Duration::from_secs(5), async {
                    let (_, cipher) = handshake(&mut y, password, false).await?;
                    let (r, w) = tokio::io::split(y);
                    let (mut reader, _w) = framed(r, w, cipher);
                    loop {
                        reader.read().await?;
                    }
                    #[expect(unreachable_code, reason = "the loop ends only with an error; this gives the block its type")]
                    Ok::<(), WireError>(())
                })
                .await;
                feeder.await.unwrap();
                assert!(matches!(result, Ok(Err(_))), "random input must end in an error: {result:?}");
            });
        }
    }
}
