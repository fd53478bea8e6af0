//! hivemind's `DHTID` (`hivemind/dht/routing.py`): the 160-bit identifier of DHT nodes and keys, compared
//! with the XOR metric.
//!
//! A key's id is `sha1(MSGPackSerializer.dumps(key))`, or `sha1(key)` when the key is already `bytes`;
//! a node's id is random and unrelated to its libp2p PeerID. On the wire (`NodeInfo.node_id`,
//! `StoreRequest.keys`, …) an id is 20 big-endian bytes. Ids order as the 160-bit numbers they are.
//!
//! ```
//! use apiary_wire::dhtid::DhtId;
//! use apiary_wire::msgpack::Value;
//!
//! let id = DhtId::from_key(&Value::from("ffn.0.5"));
//! assert_eq!(id.to_string(), "fb166bc637dbb6bf8e27460f94bbf41e1e69c6a4");
//! assert_eq!(DhtId::from_bytes(&id.to_bytes())?, id);
//! # Ok::<(), apiary_wire::dhtid::DhtIdError>(())
//! ```

use std::fmt;
use std::str::FromStr;

use sha1::{Digest, Sha1};

use crate::msgpack::{self, Value};

/// A 160-bit DHT identifier (20 bytes, big-endian), hivemind's `DHTID`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct DhtId([u8; DhtId::LEN]);

/// A byte string or hex text is not a DHT id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DhtIdError {
    /// Not 20 bytes long.
    #[error("a DHTID is {expected} bytes, got {got}", expected = DhtId::LEN)]
    WrongLength {
        /// The length given.
        got: usize,
    },
    /// Not 40 hex digits.
    #[error("a DHTID in hex is 40 hex digits")]
    BadHex,
}

impl DhtId {
    /// Bytes in an id (`DHTID.HASH_NBYTES`).
    pub const LEN: usize = 20;
    /// Bits in an id.
    pub const BITS: u32 = 160;
    /// The smallest id, `0` (`DHTID.MIN`).
    pub const MIN: DhtId = DhtId([0; DhtId::LEN]);
    /// The largest id, `2^160 - 1` (hivemind's `DHTID.MAX` is the exclusive bound `2^160`).
    pub const MAX: DhtId = DhtId([0xff; DhtId::LEN]);

    /// The id of a DHT key, as `DHTID.generate(source=key)` computes it: `sha1(key)` for `bytes` keys,
    /// `sha1(MSGPackSerializer.dumps(key))` for every other value. (hivemind draws a random id for a
    /// `None` source, so `None` is never a usable key; this hashes `msgpack(None)` like any value.)
    pub fn from_key(key: &Value) -> DhtId {
        match key {
            Value::Bin(raw) => DhtId::from_raw_bytes(raw),
            other => DhtId::from_raw_bytes(&msgpack::encode(other)),
        }
    }

    /// `sha1(raw)`: `DHTID.generate` of a `bytes` source (also how msgpack-encoded keys are hashed).
    pub fn from_raw_bytes(raw: &[u8]) -> DhtId {
        DhtId(Sha1::digest(raw).into())
    }

    /// A uniformly random id, as hivemind gives each new node (`DHTID.generate()`).
    ///
    /// # Panics
    /// If the operating system's random number generator fails (as `rand::rng()` would).
    pub fn random() -> DhtId {
        let mut id = [0u8; DhtId::LEN];
        #[allow(clippy::expect_used)]
        getrandom::fill(&mut id).expect("the OS random number generator failed");
        DhtId(id)
    }

    /// The id in the 20 given big-endian bytes (`DHTID.from_bytes`).
    pub fn from_bytes(bytes: &[u8]) -> Result<DhtId, DhtIdError> {
        <[u8; DhtId::LEN]>::try_from(bytes)
            .map(DhtId)
            .map_err(|_| DhtIdError::WrongLength { got: bytes.len() })
    }

    /// The 20 big-endian bytes (`DHTID.to_bytes()`), as sent in `NodeInfo.node_id` and DHT keys.
    pub fn to_bytes(self) -> [u8; DhtId::LEN] {
        self.0
    }

    /// The 20 big-endian bytes, borrowed.
    pub fn as_bytes(&self) -> &[u8; DhtId::LEN] {
        &self.0
    }

    /// `self XOR other`, the Kademlia distance, as a number in an id (`DHTID.xor_distance`); distances
    /// compare with `Ord`.
    pub fn xor_distance(&self, other: &DhtId) -> DhtId {
        let mut out = [0u8; DhtId::LEN];
        for (o, (a, b)) in out.iter_mut().zip(self.0.iter().zip(other.0.iter())) {
            *o = a ^ b;
        }
        DhtId(out)
    }

    /// How many leading bits two ids share (`DHTID.longest_common_prefix_length` of two ids): 160 when
    /// equal.
    pub fn common_prefix_len(&self, other: &DhtId) -> u32 {
        self.xor_distance(other).leading_zeros()
    }

    /// Leading zero bits of the 160-bit number (160 for [`DhtId::MIN`]).
    pub fn leading_zeros(&self) -> u32 {
        let mut n = 0;
        for &b in &self.0 {
            if b == 0 {
                n += 8;
            } else {
                return n + b.leading_zeros();
            }
        }
        n
    }

    /// Bit `i` of the id, counting from the most significant (`i < 160`; `false` beyond).
    pub fn bit(&self, i: u32) -> bool {
        let (byte, bit) = ((i / 8) as usize, i % 8);
        self.0.get(byte).is_some_and(|b| b & (0x80 >> bit) != 0)
    }
}

impl From<[u8; DhtId::LEN]> for DhtId {
    fn from(bytes: [u8; DhtId::LEN]) -> Self {
        DhtId(bytes)
    }
}

impl From<DhtId> for [u8; DhtId::LEN] {
    fn from(id: DhtId) -> Self {
        id.0
    }
}

impl TryFrom<&[u8]> for DhtId {
    type Error = DhtIdError;
    fn try_from(bytes: &[u8]) -> Result<Self, Self::Error> {
        DhtId::from_bytes(bytes)
    }
}

impl AsRef<[u8]> for DhtId {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Display for DhtId {
    /// 40 lowercase hex digits.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in &self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for DhtId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DhtId({self})")
    }
}

impl fmt::LowerHex for DhtId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl FromStr for DhtId {
    type Err = DhtIdError;
    /// Parses 40 hex digits (an optional `0x` prefix allowed).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.strip_prefix("0x").unwrap_or(s);
        if s.len() != 2 * DhtId::LEN || !s.is_ascii() {
            return Err(DhtIdError::BadHex);
        }
        let mut out = [0u8; DhtId::LEN];
        for (i, o) in out.iter_mut().enumerate() {
            *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).map_err(|_| DhtIdError::BadHex)?;
        }
        Ok(DhtId(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_ids() {
        assert_eq!(
            DhtId::from_key(&Value::from("ffn.0.5")).to_string(),
            "fb166bc637dbb6bf8e27460f94bbf41e1e69c6a4"
        );
        // bytes keys are hashed raw, other keys as msgpack
        let raw = DhtId::from_key(&Value::bin(b"ffn.0.5".to_vec()));
        assert_eq!(raw, DhtId::from_raw_bytes(b"ffn.0.5"));
        assert_ne!(raw, DhtId::from_key(&Value::from("ffn.0.5")));
        assert_eq!(
            DhtId::from_key(&Value::from("ffn.0.5")),
            DhtId::from_raw_bytes(b"\xa7ffn.0.5")
        );
    }

    #[test]
    fn bytes_and_hex() {
        let id = DhtId::random();
        assert_eq!(DhtId::from_bytes(&id.to_bytes()).unwrap(), id);
        assert_eq!(id.to_string().parse::<DhtId>().unwrap(), id);
        assert_eq!(
            DhtId::from_bytes(&[0; 19]),
            Err(DhtIdError::WrongLength { got: 19 })
        );
        assert_eq!(
            DhtId::from_bytes(&[0; 21]),
            Err(DhtIdError::WrongLength { got: 21 })
        );
        assert_eq!("zz".parse::<DhtId>(), Err(DhtIdError::BadHex));
        assert_eq!("é".repeat(20).parse::<DhtId>(), Err(DhtIdError::BadHex));
        assert_eq!(format!("{:?}", DhtId::MIN), format!("DhtId({})", "0".repeat(40)));
    }

    #[test]
    fn xor_metric() {
        let a = DhtId::from_key(&Value::from("a"));
        let b = DhtId::from_key(&Value::from("b"));
        assert_eq!(a.xor_distance(&a), DhtId::MIN);
        assert_eq!(a.xor_distance(&b), b.xor_distance(&a));
        assert_eq!(a.xor_distance(&DhtId::MAX).xor_distance(&DhtId::MAX), a);
        assert_eq!(a.common_prefix_len(&a), 160);
        assert_eq!(DhtId::MIN.common_prefix_len(&DhtId::MAX), 0);
        let mut one = [0u8; 20];
        one[19] = 1;
        assert_eq!(DhtId::MIN.common_prefix_len(&DhtId::from(one)), 159);
        assert!(DhtId::MIN < DhtId::from(one) && DhtId::from(one) < DhtId::MAX);
        assert!(DhtId::MAX.bit(0) && !DhtId::MIN.bit(159) && !DhtId::MAX.bit(160));
    }
}
