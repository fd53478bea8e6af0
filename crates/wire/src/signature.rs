//! hivemind's DHT record signatures: `RSASignatureValidator` (`hivemind/dht/crypto.py`) with the RSA keys
//! of `hivemind/utils/crypto.py`.
//!
//! A record is *protected* when its key or sub-key contains `[owner:<public key>]`, the owner's RSA
//! public key in OpenSSH form (`ssh-rsa AAAA…`). Changes to a protected record must carry exactly one
//! `[signature:<base64>]` in the value: RSA-PSS (MGF1-SHA256, maximum salt length) over SHA-256 of
//! `msgpack((key, subkey, value_without_signature, expiration_time))`, the tuple being ext `0x40` and
//! `key` the 20-byte DHTID. Since DHT keys travel hashed, only sub-keys can carry an owner in practice
//! (hivemind's `ProgressTracker` uses its public-key marker as sub-key).
//!
//! ```no_run
//! use apiary_wire::dhtid::DhtId;
//! use apiary_wire::msgpack::{self, Value};
//! use apiary_wire::signature::{DhtRecord, RsaPrivateKey, RsaSignatureValidator};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let validator = RsaSignatureValidator::new(RsaPrivateKey::generate()?);
//! let subkey = msgpack::encode(&Value::bin(validator.local_public_key().to_vec()));
//! let key = DhtId::from_key(&Value::from("run_progress"));
//! let mut record = DhtRecord::new(key, subkey, msgpack::encode(&Value::from(42)), 1.7e9);
//! record.value = validator.sign_value(&record)?;
//! assert!(validator.validate(&record).is_ok());
//! assert_eq!(validator.strip_value(&record), msgpack::encode(&Value::from(42)));
//! # Ok(())
//! # }
//! ```

use std::fmt;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use prost::Message as _;
use rsa::pkcs1::{DecodeRsaPrivateKey as _, EncodeRsaPrivateKey as _};
use rsa::pkcs8::DecodePrivateKey as _;
use rsa::pss::{SigningKey, VerifyingKey};
use rsa::sha2::Sha256;
use rsa::signature::{RandomizedSigner as _, SignatureEncoding as _, Verifier as _};
use rsa::traits::PublicKeyParts as _;
use rsa::{BoxedUint, PrivateKey, PublicKey};

use crate::dhtid::DhtId;
use crate::msgpack::{self, Value};
use crate::proto::crypto as libp2p_crypto;

/// `RSAPrivateKey()` generates keys of this many bits.
pub const RSA_KEY_BITS: usize = 2048;
/// Bytes of a SHA-256 digest.
const HASH_LEN: usize = 32;
/// `[owner:` … `]`
pub const OWNER_PREFIX: &[u8] = b"[owner:";
/// `[signature:` … `]`
pub const SIGNATURE_PREFIX: &[u8] = b"[signature:";
/// The sub-key bytes of a regular (non-dictionary) value: `msgpack(None)`.
pub const IS_REGULAR_VALUE: &[u8] = &[0xc0];
/// The sub-key bytes that store a whole `DictionaryDHTValue`: empty.
pub const IS_DICTIONARY: &[u8] = b"";

// ------------------------------------------------------------------------------------------------
// Errors

/// An RSA key could not be read, made or used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    /// The bytes are neither a PKCS#1 nor a PKCS#8 DER RSA private key.
    #[error("not a PKCS#1 or PKCS#8 DER RSA private key")]
    PrivateKeyDer,
    /// A libp2p `PrivateKey` protobuf could not be decoded.
    #[error("bad libp2p PrivateKey protobuf: {0}")]
    Protobuf(#[from] prost::DecodeError),
    /// A libp2p key is of another type than RSA.
    #[error("libp2p key type {key_type} is not RSA (0)")]
    NotRsa {
        /// The `KeyType` number found.
        key_type: i32,
    },
    /// An OpenSSH public key line is malformed (what `load_ssh_public_key` rejects).
    #[error("bad OpenSSH public key: {0}")]
    OpenSsh(&'static str),
    /// The RSA numbers are unusable (`RSAPublicNumbers.public_key()` rejects them, or the `rsa` crate
    /// does).
    #[error("invalid RSA public key: {0}")]
    InvalidPublicKey(&'static str),
    /// The `rsa` crate failed (key generation, encoding).
    #[error("RSA: {0}")]
    Rsa(#[from] rsa::Error),
}

/// Signing failed (in practice only when the OS random number generator does).
#[derive(Debug, thiserror::Error)]
#[error("RSA-PSS signing failed: {0}")]
pub struct SignError(#[from] rsa::signature::Error);

/// Why [`validate_record`] rejects a protected record. Every variant is a record hivemind rejects too.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ValidationError {
    /// The key and sub-key name different owners.
    #[error("key and subkey contain different public keys")]
    DifferentOwners,
    /// The owner's public key does not parse. hivemind *raises* here instead of returning `False`, which
    /// fails the whole `rpc_store` call that carried the record.
    #[error("the owner's public key is malformed: {0}")]
    MalformedOwnerKey(#[source] KeyError),
    /// The value carries no signature, or more than one.
    #[error("a protected record needs exactly one signature, found {found}")]
    SignatureCount {
        /// How many `[signature:…]` markers the value has.
        found: usize,
    },
    /// The signature does not verify under the owner's key.
    #[error("the signature is invalid")]
    InvalidSignature,
}

// ------------------------------------------------------------------------------------------------
// Keys

/// An RSA private key as hivemind's `RSAPrivateKey` holds it (2048 bits, exponent 65537 when generated).
#[derive(Clone)]
pub struct RsaPrivateKey {
    key: PrivateKey,
}

impl fmt::Debug for RsaPrivateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RsaPrivateKey({})", self.public_key())
    }
}

impl RsaPrivateKey {
    /// A fresh 2048-bit key with public exponent 65537, as `RSAPrivateKey()` makes.
    pub fn generate() -> Result<Self, KeyError> {
        Ok(RsaPrivateKey {
            key: PrivateKey::new(&mut getrandom::SysRng, RSA_KEY_BITS)?,
        })
    }

    /// Reads a DER private key, PKCS#1 (`RSAPrivateKey.to_bytes()`, `TraditionalOpenSSL`) or PKCS#8, as
    /// `serialization.load_der_private_key(der, password=None)` does for RSA keys.
    pub fn from_der(der: &[u8]) -> Result<Self, KeyError> {
        let key = PrivateKey::from_pkcs1_der(der)
            .or_else(|_| PrivateKey::from_pkcs8_der(der))
            .map_err(|_| KeyError::PrivateKeyDer)?;
        Ok(RsaPrivateKey { key })
    }

    /// The PKCS#1 DER bytes, exactly what `RSAPrivateKey.to_bytes()` writes (and what a pickled
    /// `RSAPrivateKey` carries).
    pub fn to_der(&self) -> Result<Vec<u8>, KeyError> {
        Ok(self
            .key
            .to_pkcs1_der()
            .map_err(|e| KeyError::Rsa(e.into()))?
            .as_bytes()
            .to_vec())
    }

    /// Reads a libp2p `PrivateKey` protobuf with an RSA key (`key_type = RSA`, `data` = DER): the
    /// identity file format of `P2P.generate_identity(identity_path)`.
    pub fn from_libp2p_protobuf(bytes: &[u8]) -> Result<Self, KeyError> {
        let pb = libp2p_crypto::PrivateKey::decode(bytes)?;
        if pb.key_type != libp2p_crypto::KeyType::Rsa as i32 {
            return Err(KeyError::NotRsa {
                key_type: pb.key_type,
            });
        }
        Self::from_der(&pb.data)
    }

    /// The libp2p `PrivateKey` protobuf of this key, as `P2P.generate_identity` writes identity files.
    pub fn to_libp2p_protobuf(&self) -> Result<Vec<u8>, KeyError> {
        let pb = libp2p_crypto::PrivateKey {
            key_type: libp2p_crypto::KeyType::Rsa as i32,
            data: self.to_der()?.into(),
        };
        Ok(pb.encode_to_vec())
    }

    /// The public half.
    pub fn public_key(&self) -> RsaPublicKey {
        RsaPublicKey {
            key: self.key.to_public_key(),
        }
    }

    /// `RSAPrivateKey.sign(data)`: base64 (standard alphabet, padded) of the RSA-PSS signature (MGF1-SHA256,
    /// maximum salt length) over SHA-256 of `data`. Salts are random: two signatures of the same data
    /// differ, and both verify.
    pub fn sign(&self, data: &[u8]) -> Result<Vec<u8>, SignError> {
        let salt_len = max_pss_salt_len(self.key.n().bit_width_vartime() as usize).unwrap_or(0);
        let signer = SigningKey::<Sha256>::new_with_salt_len(self.key.clone(), salt_len);
        let signature = signer.try_sign_with_rng(&mut getrandom::SysRng, data)?;
        Ok(BASE64.encode(signature.to_bytes()).into_bytes())
    }
}

/// `calculate_max_pss_salt_length`: `(key_size + 6) // 8 - digest_size - 2`, or `None` when the key is
/// too small for PSS with SHA-256.
fn max_pss_salt_len(key_bits: usize) -> Option<usize> {
    ((key_bits + 6) / 8).checked_sub(HASH_LEN + 2)
}

/// An RSA public key as hivemind's `RSAPublicKey` holds it; written in OpenSSH form in owner markers.
#[derive(Clone, PartialEq, Eq)]
pub struct RsaPublicKey {
    key: PublicKey,
}

impl fmt::Debug for RsaPublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RsaPublicKey({self})")
    }
}

impl fmt::Display for RsaPublicKey {
    /// The OpenSSH form, `ssh-rsa AAAA…`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_openssh())
    }
}

/// Appends an SSH `string` (u32 big-endian length, bytes).
fn put_ssh_string(out: &mut Vec<u8>, s: &[u8]) {
    out.extend_from_slice(&(s.len() as u32).to_be_bytes());
    out.extend_from_slice(s);
}

/// Appends an SSH `mpint` of a non-negative big-endian magnitude: minimal, with a `0x00` in front
/// when the top bit is set; zero is the empty string.
fn put_ssh_mpint(out: &mut Vec<u8>, magnitude: &[u8]) {
    let trimmed = &magnitude[magnitude.iter().position(|&b| b != 0).unwrap_or(magnitude.len())..];
    if trimmed.first().is_some_and(|&b| b & 0x80 != 0) {
        out.extend_from_slice(&((trimmed.len() + 1) as u32).to_be_bytes());
        out.push(0);
        out.extend_from_slice(trimmed);
    } else {
        put_ssh_string(out, trimmed);
    }
}

/// Reads an SSH `string` (cryptography's `_get_sshstr`).
fn get_ssh_string<'a>(data: &mut &'a [u8]) -> Result<&'a [u8], KeyError> {
    let bad = KeyError::OpenSsh("truncated key data");
    let (len, rest) = data.split_first_chunk::<4>().ok_or(bad)?;
    let len = u32::from_be_bytes(*len) as usize;
    if len > rest.len() {
        return Err(KeyError::OpenSsh("truncated key data"));
    }
    let (s, rest) = rest.split_at(len);
    *data = rest;
    Ok(s)
}

/// Reads an SSH `mpint` (cryptography's `_get_mpint`: negative numbers are refused, extra leading zeros
/// are fine).
fn get_ssh_mpint<'a>(data: &mut &'a [u8]) -> Result<&'a [u8], KeyError> {
    let v = get_ssh_string(data)?;
    if v.first().is_some_and(|&b| b > 0x7f) {
        return Err(KeyError::OpenSsh("negative mpint"));
    }
    Ok(&v[v.iter().position(|&b| b != 0).unwrap_or(v.len())..])
}

fn is_ascii_whitespace_re(b: u8) -> bool {
    // `\s` of a Python bytes pattern: [ \t\n\r\f\v]
    matches!(b, b' ' | b'\t' | b'\n' | b'\r' | 0x0c | 0x0b)
}

impl RsaPublicKey {
    /// The OpenSSH public key line without comment, `ssh-rsa <base64>`: `RSAPublicKey.to_bytes()`.
    pub fn to_openssh(&self) -> String {
        let mut blob = Vec::with_capacity(300);
        put_ssh_string(&mut blob, b"ssh-rsa");
        put_ssh_mpint(&mut blob, &self.key.e_bytes());
        put_ssh_mpint(&mut blob, &self.key.n_bytes());
        format!("ssh-rsa {}", BASE64.encode(blob))
    }

    /// Parses an OpenSSH public key line (`ssh-rsa <base64> [comment]`) the way
    /// `RSAPublicKey.from_bytes` (cryptography's `load_ssh_public_key`) does: lenient base64, the inner key
    /// type must match, no trailing data. Certificates (`…-cert-v01@openssh.com`) are not accepted.
    pub fn from_openssh(line: &[u8]) -> Result<Self, KeyError> {
        // \A(\S+)[ \t]+(\S+)
        let type_end = line
            .iter()
            .position(|&b| is_ascii_whitespace_re(b))
            .unwrap_or(line.len());
        let (key_type, rest) = line.split_at(type_end);
        let body_start = rest
            .iter()
            .position(|&b| b != b' ' && b != b'\t')
            .unwrap_or(rest.len());
        if key_type.is_empty() || body_start == 0 {
            return Err(KeyError::OpenSsh("invalid line format"));
        }
        let rest = &rest[body_start..];
        let body = &rest[..rest
            .iter()
            .position(|&b| is_ascii_whitespace_re(b))
            .unwrap_or(rest.len())];
        if body.is_empty() {
            return Err(KeyError::OpenSsh("invalid line format"));
        }
        if key_type != b"ssh-rsa" {
            return Err(KeyError::OpenSsh("not an ssh-rsa key"));
        }
        let blob = python_b64decode(body).ok_or(KeyError::OpenSsh("invalid base64"))?;
        let mut data = blob.as_slice();
        if get_ssh_string(&mut data)? != key_type {
            return Err(KeyError::OpenSsh("inner key type differs"));
        }
        let e = get_ssh_mpint(&mut data)?;
        let n = get_ssh_mpint(&mut data)?;
        if !data.is_empty() {
            return Err(KeyError::OpenSsh("unexpected trailing data"));
        }
        Self::from_components(n, e)
    }

    /// A key from its big-endian modulus and public exponent, with `RSAPublicNumbers.public_key()`'s checks
    /// (`n >= 3`, `3 <= e < n`, `e` odd) and the `rsa` crate's (odd modulus of at most 16384 bits,
    /// exponent below 2^33).
    pub fn from_components(n: &[u8], e: &[u8]) -> Result<Self, KeyError> {
        let n_trim = &n[n.iter().position(|&b| b != 0).unwrap_or(n.len())..];
        let e_trim = &e[e.iter().position(|&b| b != 0).unwrap_or(e.len())..];
        if n_trim.len() > 16384 / 8 {
            return Err(KeyError::InvalidPublicKey("modulus over 16384 bits"));
        }
        let n_big = BoxedUint::from_be_slice_vartime(n_trim);
        let e_big = BoxedUint::from_be_slice_vartime(e_trim);
        let three = BoxedUint::from_be_slice_vartime(&[3]);
        if n_big < three {
            return Err(KeyError::InvalidPublicKey("n must be >= 3"));
        }
        if e_big < three || e_trim.len() > n_trim.len() || (e_trim.len() == n_trim.len() && e_trim >= n_trim)
        {
            return Err(KeyError::InvalidPublicKey("e must be >= 3 and < n"));
        }
        if e_trim.last().is_some_and(|b| b & 1 == 0) {
            return Err(KeyError::InvalidPublicKey("e must be odd"));
        }
        let key = PublicKey::new_with_size_limits(n_big, e_big, 2..=16384).map_err(KeyError::Rsa)?;
        Ok(RsaPublicKey { key })
    }

    /// The modulus, big-endian, without leading zeros.
    pub fn modulus(&self) -> Vec<u8> {
        self.key.n_bytes().into_vec()
    }

    /// The public exponent, big-endian, without leading zeros.
    pub fn exponent(&self) -> Vec<u8> {
        self.key.e_bytes().into_vec()
    }

    /// The modulus size in bits (`key_size`).
    pub fn bits(&self) -> usize {
        self.key.n().bit_width_vartime() as usize
    }

    /// `RSAPublicKey.verify(data, signature)`: `signature` is base64 (decoded leniently, as Python's
    /// `base64.b64decode` does: characters outside the alphabet are skipped) of an RSA-PSS signature
    /// (MGF1-SHA256) over SHA-256 of `data`. Any failure is `false`.
    ///
    /// Any salt length is accepted, as hivemind with a current `cryptography` (50.x) does for
    /// `PSS.MAX_LENGTH` when verifying; [`RsaPrivateKey::sign`] always uses the maximum length, which
    /// peers with older `cryptography` versions (that insist on it) accept too.
    pub fn verify(&self, data: &[u8], signature_b64: &[u8]) -> bool {
        let Some(raw) = python_b64decode(signature_b64) else {
            return false;
        };
        if max_pss_salt_len(self.bits()).is_none() {
            return false; // too small for PSS with SHA-256
        }
        let Ok(signature) = rsa::pss::Signature::try_from(raw.as_slice()) else {
            return false;
        };
        let verifier = VerifyingKey::<Sha256>::new_with_auto_salt_len(self.key.clone());
        verifier.verify(data, &signature).is_ok()
    }

    /// `[owner:ssh-rsa AAAA…]`: what marks a key or sub-key as owned by this key
    /// (`RSASignatureValidator.local_public_key` of its private half).
    pub fn owner_marker(&self) -> Vec<u8> {
        let mut out = OWNER_PREFIX.to_vec();
        out.extend_from_slice(self.to_openssh().as_bytes());
        out.push(b']');
        out
    }
}

/// Python's `base64.b64decode(s)` (CPython's `binascii.a2b_base64` in non-strict mode): bytes outside the
/// base64 alphabet are skipped, decoding stops at the first complete padding, and a dangling partial
/// quad is an error (`None`).
pub fn python_b64decode(input: &[u8]) -> Option<Vec<u8>> {
    fn sextet(c: u8) -> Option<u32> {
        Some(u32::from(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        }))
    }
    let mut out = Vec::with_capacity(input.len() / 4 * 3 + 3);
    let mut quad_pos = 0u32;
    let mut left = 0u32;
    let mut pads = 0u32;
    for &c in input {
        if c == b'=' {
            if quad_pos >= 2 {
                pads += 1;
                if quad_pos + pads >= 4 {
                    return Some(out);
                }
            }
            continue;
        }
        let Some(v) = sextet(c) else { continue };
        pads = 0;
        match quad_pos {
            0 => {
                left = v;
                quad_pos = 1;
            }
            1 => {
                out.push(((left << 2) | (v >> 4)) as u8);
                left = v & 0x0f;
                quad_pos = 2;
            }
            2 => {
                out.push(((left << 4) | (v >> 2)) as u8);
                left = v & 0x03;
                quad_pos = 3;
            }
            _ => {
                out.push(((left << 6) | v) as u8);
                left = 0;
                quad_pos = 0;
            }
        }
    }
    (quad_pos == 0).then_some(out)
}

// ------------------------------------------------------------------------------------------------
// Markers

/// One match of `\[<prefix>(.+?)\]` (a Python bytes regex: `.` is any byte but `\n`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Marker {
    /// Where `[` is.
    start: usize,
    /// One past the closing `]`.
    end: usize,
    /// The captured group.
    group: (usize, usize),
}

/// All non-overlapping matches, left to right, as `re.findall`/`re.sub` find them. Linear time.
fn find_markers(hay: &[u8], prefix: &[u8]) -> Vec<Marker> {
    let mut out = Vec::new();
    let mut pos = 0;
    // cached "next ']' at or after" / "next '\n' at or after" positions (searches only move forward)
    let mut close: Option<(usize, Option<usize>)> = None;
    let mut newline: Option<(usize, Option<usize>)> = None;
    let find_from = |cache: &mut Option<(usize, Option<usize>)>, from: usize, byte: u8| -> Option<usize> {
        match *cache {
            Some((searched_from, found)) if searched_from <= from && found.is_none_or(|f| f >= from) => found,
            _ => {
                let found = hay
                    .get(from..)
                    .and_then(|s| s.iter().position(|&b| b == byte))
                    .map(|i| i + from);
                *cache = Some((from, found));
                found
            }
        }
    };
    while pos + prefix.len() <= hay.len() {
        let Some(off) = hay[pos..].windows(prefix.len()).position(|w| w == prefix) else {
            break;
        };
        let start = pos + off;
        let g = start + prefix.len();
        // `.+?`: at least one byte (not '\n'), then the first ']' with no '\n' before it
        let matched = match hay.get(g) {
            Some(&b) if b != b'\n' => match find_from(&mut close, g + 1, b']') {
                Some(c) => match find_from(&mut newline, g, b'\n') {
                    Some(nl) if nl < c => None,
                    _ => Some(c),
                },
                None => None,
            },
            _ => None,
        };
        match matched {
            Some(c) => {
                out.push(Marker {
                    start,
                    end: c + 1,
                    group: (g, c),
                });
                pos = c + 1;
            }
            None => pos = start + 1,
        }
    }
    out
}

/// The public keys in `[owner:…]` markers, in order (`_PUBLIC_KEY_RE.findall`).
pub fn find_owner_keys(bytes: &[u8]) -> Vec<&[u8]> {
    find_markers(bytes, OWNER_PREFIX)
        .into_iter()
        .map(|m| &bytes[m.group.0..m.group.1])
        .collect()
}

/// The signatures in `[signature:…]` markers, in order (`_SIGNATURE_RE.findall`).
pub fn find_signatures(bytes: &[u8]) -> Vec<&[u8]> {
    find_markers(bytes, SIGNATURE_PREFIX)
        .into_iter()
        .map(|m| &bytes[m.group.0..m.group.1])
        .collect()
}

/// `value` with every `[signature:…]` marker removed (`RSASignatureValidator.strip_value`).
pub fn strip_signatures(value: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(value.len());
    let mut pos = 0;
    for m in find_markers(value, SIGNATURE_PREFIX) {
        out.extend_from_slice(&value[pos..m.start]);
        pos = m.end;
    }
    out.extend_from_slice(&value[pos..]);
    out
}

// ------------------------------------------------------------------------------------------------
// Records and the validator

/// A DHT record as validators see it: hivemind's `DHTRecord`.
#[derive(Clone, Debug, PartialEq)]
pub struct DhtRecord {
    /// The key's 20-byte DHTID.
    pub key: Vec<u8>,
    /// `msgpack(subkey)`; [`IS_REGULAR_VALUE`] (`msgpack(None)`) for a regular value.
    pub subkey: Vec<u8>,
    /// The serialized value (msgpack), signature included once signed.
    pub value: Vec<u8>,
    /// DHT expiration time (UNIX seconds); always a float on the wire.
    pub expiration_time: f64,
}

impl DhtRecord {
    /// A record of `key`'s sub-key `subkey` (msgpack bytes).
    pub fn new(
        key: DhtId,
        subkey: impl Into<Vec<u8>>,
        value: impl Into<Vec<u8>>,
        expiration_time: f64,
    ) -> Self {
        DhtRecord {
            key: key.to_bytes().to_vec(),
            subkey: subkey.into(),
            value: value.into(),
            expiration_time,
        }
    }

    /// A record of a regular value (no sub-key).
    pub fn regular(key: DhtId, value: impl Into<Vec<u8>>, expiration_time: f64) -> Self {
        Self::new(key, IS_REGULAR_VALUE, value, expiration_time)
    }

    /// The bytes a signature covers: `MSGPackSerializer.dumps(dataclasses.astuple(record))`, i.e. the
    /// msgpack tuple `(key, subkey, value, expiration_time)` (three `bin`s and a `float64`).
    pub fn signed_message(&self) -> Vec<u8> {
        msgpack::encode(&Value::Tuple(vec![
            Value::Bin(self.key.clone()),
            Value::Bin(self.subkey.clone()),
            Value::Bin(self.value.clone()),
            Value::Float(self.expiration_time),
        ]))
    }

    /// This record with its value replaced.
    pub fn with_value(&self, value: impl Into<Vec<u8>>) -> Self {
        DhtRecord {
            value: value.into(),
            ..self.clone()
        }
    }
}

/// `RSASignatureValidator.validate(record)`: `Ok` exactly when hivemind returns `True`.
///
/// Unprotected records (no `[owner:…]` in key or sub-key, or only markers that `\n` interrupts) are always
/// valid. A protected record needs all its owner markers to name the same key, exactly one
/// `[signature:…]` in its value, and that signature to verify over [`DhtRecord::signed_message`] of the
/// record with every signature marker stripped from the value.
pub fn validate_record(record: &DhtRecord) -> Result<(), ValidationError> {
    let mut owners = find_owner_keys(&record.key);
    owners.extend(find_owner_keys(&record.subkey));
    let Some(&owner) = owners.first() else {
        return Ok(());
    };
    if owners.iter().any(|o| *o != owner) {
        return Err(ValidationError::DifferentOwners);
    }
    let public_key = RsaPublicKey::from_openssh(owner).map_err(ValidationError::MalformedOwnerKey)?;
    let signatures = find_signatures(&record.value);
    let [signature] = signatures.as_slice() else {
        return Err(ValidationError::SignatureCount {
            found: signatures.len(),
        });
    };
    let stripped = record.with_value(strip_signatures(&record.value));
    if public_key.verify(&stripped.signed_message(), signature) {
        Ok(())
    } else {
        Err(ValidationError::InvalidSignature)
    }
}

/// hivemind's `RSASignatureValidator`: signs the records this node owns and validates everyone's.
#[derive(Clone, Debug)]
pub struct RsaSignatureValidator {
    private_key: RsaPrivateKey,
    local_public_key: Vec<u8>,
}

impl RsaSignatureValidator {
    /// `priority`: in a `CompositeValidator` it signs before and validates after lower priorities
    /// (schema validators have 0 and see the stripped value).
    pub const PRIORITY: i32 = 10;

    /// A validator signing with `private_key`.
    pub fn new(private_key: RsaPrivateKey) -> Self {
        let local_public_key = private_key.public_key().owner_marker();
        RsaSignatureValidator {
            private_key,
            local_public_key,
        }
    }

    /// The key this validator signs with.
    pub fn private_key(&self) -> &RsaPrivateKey {
        &self.private_key
    }

    /// `[owner:ssh-rsa …]` of this validator's key: put it in a sub-key to protect the record.
    pub fn local_public_key(&self) -> &[u8] {
        &self.local_public_key
    }

    /// `RSASignatureValidator.validate` (see [`validate_record`]).
    pub fn validate(&self, record: &DhtRecord) -> Result<(), ValidationError> {
        validate_record(record)
    }

    /// `RSASignatureValidator.sign_value`: the value with `[signature:<base64>]` appended when the key or
    /// sub-key contains this validator's [`local_public_key`](Self::local_public_key), else the value as
    /// it is. The signature covers the record exactly as given.
    pub fn sign_value(&self, record: &DhtRecord) -> Result<Vec<u8>, SignError> {
        let marker = self.local_public_key.as_slice();
        if !contains(&record.key, marker) && !contains(&record.subkey, marker) {
            return Ok(record.value.clone());
        }
        let signature = self.private_key.sign(&record.signed_message())?;
        let mut value = record.value.clone();
        value.extend_from_slice(SIGNATURE_PREFIX);
        value.extend_from_slice(&signature);
        value.push(b']');
        Ok(value)
    }

    /// `RSASignatureValidator.strip_value`: the value without its signature markers.
    pub fn strip_value(&self, record: &DhtRecord) -> Vec<u8> {
        strip_signatures(&record.value)
    }
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    needle.is_empty() || hay.windows(needle.len()).any(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spans<'a>(hay: &'a [u8], prefix: &[u8]) -> Vec<&'a [u8]> {
        find_markers(hay, prefix)
            .into_iter()
            .map(|m| &hay[m.group.0..m.group.1])
            .collect()
    }

    #[test]
    fn marker_regex_semantics() {
        let p = OWNER_PREFIX;
        assert_eq!(spans(b"[owner:abc]", p), vec![b"abc".as_slice()]);
        assert_eq!(spans(b"[owner:]]", p), vec![b"]".as_slice()]); // `.+?` takes the first `]`
        assert!(spans(b"[owner:]", p).is_empty());
        assert!(spans(b"[owner:a\nb]", p).is_empty());
        assert_eq!(spans(b"[owner:\n[owner:x]", p), vec![b"x".as_slice()]);
        assert_eq!(
            spans(b"x[owner:a][owner:b]y[owner:c", p),
            vec![b"a".as_slice(), b"b"]
        );
        assert_eq!(spans(b"[owner:[owner:a]", p), vec![b"[owner:a".as_slice()]);
        assert_eq!(strip_signatures(b"a[signature:x]b[signature:y]c"), b"abc");
        assert_eq!(strip_signatures(b"[signature:]"), b"[signature:]");
        // pathological input stays fast
        let big = b"[owner:".repeat(100_000);
        assert!(spans(&big, p).is_empty());
    }

    /// xorshift64*: a tiny deterministic generator for the garbage loops.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }
        fn bytes(&mut self, n: usize, alphabet: &[u8]) -> Vec<u8> {
            (0..n)
                .map(|_| alphabet[(self.next() % alphabet.len() as u64) as usize])
                .collect()
        }
    }

    #[test]
    fn garbage_keys_and_records_never_panic() {
        let mut rng = Rng(0x0dd_ba11_5eed);
        let b64: Vec<u8> = (b'A'..=b'Z')
            .chain(b'a'..=b'z')
            .chain(b'0'..=b'9')
            .chain(*b"+/= \t\n]")
            .collect();
        let all: Vec<u8> = (0..=255).collect();
        for i in 0..20_000 {
            let n = (rng.next() % 64) as usize;
            let body = rng.bytes(n, if i % 2 == 0 { &b64 } else { &all });
            let line = [b"ssh-rsa ".as_slice(), &body].concat();
            assert!(RsaPublicKey::from_openssh(&line).is_err());
            // well-formed SSH framing around random numbers
            let mut blob = Vec::new();
            put_ssh_string(&mut blob, b"ssh-rsa");
            let (e_len, n_len) = ((rng.next() % 5) as usize, (rng.next() % 40) as usize);
            put_ssh_string(&mut blob, &rng.bytes(e_len, &all));
            put_ssh_string(&mut blob, &rng.bytes(n_len, &all));
            let line = format!("ssh-rsa {}", BASE64.encode(&blob));
            if let Ok(key) = RsaPublicKey::from_openssh(line.as_bytes()) {
                assert!(!key.verify(b"x", &body));
            }
            assert!(RsaPrivateKey::from_der(&body).is_err());
            let record = DhtRecord {
                key: [b"[owner:".as_slice(), &body].concat(),
                subkey: [b"[owner:ssh-rsa ".as_slice(), &body, b"]"].concat(),
                value: [body.as_slice(), b"[signature:", &body, b"]"].concat(),
                expiration_time: 1.0,
            };
            let _ = validate_record(&record);
            let _ = strip_signatures(&record.value);
        }
    }

    #[test]
    fn openssh_encoding_round_trips_components() {
        // e = 65537, n = 0x80…01 (high bit set: mpint gets a leading zero)
        let mut n = vec![0x80u8; 1];
        n.extend_from_slice(&[0x11; 62]);
        n.push(0x01);
        let key = RsaPublicKey::from_components(&n, &[1, 0, 1]).unwrap();
        let line = key.to_openssh();
        assert!(line.starts_with("ssh-rsa AAAAB3NzaC1yc2EAAAADAQAB"));
        let again = RsaPublicKey::from_openssh(format!("{line} comment here").as_bytes()).unwrap();
        assert_eq!(again, key);
        assert_eq!(again.modulus(), n);
        assert!(RsaPublicKey::from_components(&n, &[2]).is_err()); // even e
        assert!(RsaPublicKey::from_components(&[1, 0, 1], &[1, 0, 1]).is_err()); // e >= n
        assert!(RsaPublicKey::from_components(&n, &[1]).is_err()); // e < 3
    }

    #[test]
    fn lenient_base64() {
        assert_eq!(python_b64decode(b"aGk=").unwrap(), b"hi");
        assert_eq!(python_b64decode(b"aG!k=").unwrap(), b"hi");
        assert_eq!(python_b64decode(b"aGk=trailing").unwrap(), b"hi");
        assert!(python_b64decode(b"aGk").is_none()); // "Incorrect padding"
        assert_eq!(python_b64decode(b"aG=k=").unwrap(), b"hi"); // a lone '=' at quad_pos 2 is skipped
        assert!(python_b64decode(b"a").is_none());
        assert_eq!(python_b64decode(b"").unwrap(), b"");
        assert_eq!(python_b64decode(b"=aGk=").unwrap(), b"hi");
    }
}
