//! Peer identity: a stable 48-bit name shown like a MAC address (as Weave did), a
//! short id for display, and a nickname (the hostname).
//!
//! Owns how names are made, shown and parsed. Must not touch I/O: the machine
//! id is read by the caller.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A peer's stable name: 48 bits, written `aa:bb:cc:dd:ee:ff`. JSON (and any
/// human-readable format) carries that text; the wire format the number.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PeerName(u64);

impl Serialize for PeerName {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if s.is_human_readable() { s.collect_str(self) } else { s.serialize_u64(self.0) }
    }
}

impl<'de> Deserialize<'de> for PeerName {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        if d.is_human_readable() {
            let s = String::deserialize(d)?;
            s.parse().map_err(serde::de::Error::custom)
        } else {
            Ok(PeerName::new(u64::deserialize(d)?))
        }
    }
}

const NAME_MASK: u64 = 0xffff_ffff_ffff;

impl PeerName {
    /// The name made of the low 48 bits of `v`.
    pub const fn new(v: u64) -> Self {
        PeerName(v & NAME_MASK)
    }

    /// The 48-bit value.
    pub const fn value(self) -> u64 {
        self.0
    }

    /// A name derived from a machine id (`/etc/machine-id`): stable across
    /// reinstalls of weft, different between machines.
    pub fn from_machine_id(machine_id: &str) -> Self {
        let digest = blake2_64(format!("weft peer name\0{}", machine_id.trim()).as_bytes());
        // Locally administered, unicast, like a generated MAC.
        PeerName::new((digest & NAME_MASK & !(1 << 40)) | (1 << 41))
    }

    /// A random name (when there is no machine id, or for tests).
    pub fn random() -> Self {
        PeerName::new((rand::random::<u64>() & !(1 << 40)) | (1 << 41))
    }

    /// A short id for display and logs.
    pub fn short_id(self) -> u16 {
        (blake2_64(&self.0.to_be_bytes()) & 0xfff) as u16
    }
}

fn blake2_64(bytes: &[u8]) -> u64 {
    use blake2::Digest;
    let digest = blake2::Blake2s256::digest(bytes);
    // The first eight bytes, big-endian.
    digest.iter().take(8).fold(0, |v, b| (v << 8) | u64::from(*b))
}

impl fmt::Display for PeerName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0.to_be_bytes();
        write!(f, "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}", b[2], b[3], b[4], b[5], b[6], b[7])
    }
}

impl fmt::Debug for PeerName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// A peer name that is not `aa:bb:cc:dd:ee:ff`.
#[derive(Debug, thiserror::Error)]
#[error("invalid peer name {0:?}: expected six hex bytes like 8e:3a:01:c2:55:10")]
pub struct BadPeerName(String);

impl FromStr for PeerName {
    type Err = BadPeerName;
    fn from_str(s: &str) -> Result<Self, BadPeerName> {
        let parts: Vec<&str> = s.split(':').collect();
        if parts.len() != 6 || parts.iter().any(|p| p.len() != 2) {
            return Err(BadPeerName(s.into()));
        }
        let mut v = 0u64;
        for p in parts {
            let byte = u8::from_str_radix(p, 16).map_err(|_| BadPeerName(s.into()))?;
            v = (v << 8) | u64::from(byte);
        }
        Ok(PeerName(v))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_short_hash_is_the_digests_first_eight_bytes_big_endian() {
        use blake2::Digest;
        // Names derived from machine ids must not change across versions.
        for input in [&b""[..], b"weft peer name\0abc", &[0xff; 100]] {
            let digest = blake2::Blake2s256::digest(input);
            assert_eq!(blake2_64(input), u64::from_be_bytes(digest[..8].try_into().unwrap()));
        }
    }

    #[test]
    fn names_round_trip_and_are_stable() {
        let a = PeerName::from_machine_id("0123456789abcdef0123456789abcdef\n");
        assert_eq!(a, PeerName::from_machine_id("0123456789abcdef0123456789abcdef"));
        assert_ne!(a, PeerName::from_machine_id("another machine"));
        let text = a.to_string();
        assert_eq!(text.len(), 17);
        assert_eq!(text.parse::<PeerName>().unwrap(), a);
        assert!("zz:00:00:00:00:00".parse::<PeerName>().is_err());
        assert!("00:00:00:00:00".parse::<PeerName>().is_err());
        assert!(a.short_id() < 4096);
        assert_eq!(serde_json::to_string(&a).unwrap(), format!("\"{a}\""));
        assert_eq!(serde_json::from_str::<PeerName>(&format!("\"{a}\"")).unwrap(), a);
        let wire = postcard::to_stdvec(&a).unwrap();
        assert!(wire.len() <= 7, "compact on the wire");
        assert_eq!(postcard::from_bytes::<PeerName>(&wire).unwrap(), a);
    }
}
