//! The catalog's DHT records, by hivemind's conventions: msgpack string keys, one dictionary sub-key per
//! entry, and hivemind's `[owner:…]` RSA marker in the sub-keys that only one key may write.
//!
//! | key | sub-key | value | written by |
//! |---|---|---|---|
//! | [`CATALOG_KEY`] | `"{id}[owner:ssh-rsa …]"` | the [`SignedManifest`] as JSON text (msgpack `str`) | the publisher |
//! | [`STATUS_KEY`] | `"{id}[owner:ssh-rsa …]"` | a [`StatusRecord`] as JSON text | the trainer, with the publisher's key |
//! | [`roster_key`]`(id, publisher)` | the volunteer's peer id (base58) | the uids it hosts (msgpack list of `str`) | each volunteer |
//!
//! The owner marker makes every DHT node that runs an RSA validator (Apiary's, or hivemind's
//! `RSASignatureValidator`) refuse a catalog or status entry that the marked key did not sign, so nobody
//! else can overwrite an experiment's entry. Readers check on top that the marker's key is the manifest's
//! publisher and that the manifest's own signature holds ([`SignedManifest::verify`]). Values are JSON
//! text so that any hivemind peer can read them with `json.loads`.
//!
//! Roster entries are not protected (a volunteer's libp2p identity is not an RSA key): they are hints
//! for coverage and join planning, bounded and validated against the manifest's grid, never trusted for
//! anything that runs code.

use apiary_wire::msgpack::Value;
use apiary_wire::signature::{OWNER_PREFIX, RsaPublicKey};
use serde::{Deserialize, Serialize};

use crate::manifest::{MAX_SIGNED_MANIFEST_BYTES, Manifest, Rejection, SignedManifest};

/// The catalog: one sub-key per experiment.
pub const CATALOG_KEY: &str = "apiary.catalog.v1";
/// The trainers' live status: one sub-key per experiment.
pub const STATUS_KEY: &str = "apiary.status.v1";
/// The largest status record read, bytes.
pub const MAX_STATUS_BYTES: usize = 4096;
/// The most uids one roster entry may list.
pub const MAX_ROSTER_UIDS: usize = 4096;

/// The roster of experiment `id` published by `publisher`: one sub-key per volunteer. The publisher's
/// [`fingerprint`] keeps two experiments that claim the same id apart.
pub fn roster_key(id: &str, publisher: &RsaPublicKey) -> String {
    format!("apiary.roster.v1.{id}.{}", fingerprint(publisher))
}

/// A short, stable name of a publisher key for cards and logs: the first 8 bytes of the SHA-256 of its
/// OpenSSH line, in hex (16 characters).
pub fn fingerprint(key: &RsaPublicKey) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(key.to_openssh().as_bytes());
    digest.iter().take(8).map(|b| format!("{b:02x}")).collect()
}

/// `"{id}[owner:ssh-rsa …]"`: a sub-key only `owner` may write.
pub fn owned_subkey(id: &str, owner: &RsaPublicKey) -> String {
    let mut s = String::with_capacity(id.len() + 400);
    s.push_str(id);
    s.push_str(&String::from_utf8_lossy(&owner.owner_marker()));
    s
}

/// Splits an [`owned_subkey`] into the id and the owner's key; `None` for anything else.
pub fn parse_owned_subkey(subkey: &Value) -> Option<(String, RsaPublicKey)> {
    let s = subkey.as_str()?;
    let prefix = std::str::from_utf8(OWNER_PREFIX).ok()?;
    let at = s.find(prefix)?;
    let rest = s[at + prefix.len()..].strip_suffix(']')?;
    if rest.contains(']') {
        return None;
    }
    let key = RsaPublicKey::from_openssh(rest.as_bytes()).ok()?;
    Some((s[..at].to_owned(), key))
}

/// Why a DHT entry was not taken into the catalog.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum EntryError {
    /// The sub-key is not `"{id}[owner:…]"`.
    #[error("the entry's sub-key does not name an experiment and its owner")]
    BadSubkey,
    /// The value is not a string, or too long.
    #[error("the entry's value is not a manifest text of at most {MAX_SIGNED_MANIFEST_BYTES} bytes")]
    BadValue,
    /// The DHT owner is not the manifest's publisher.
    #[error("the entry was written by another key than the manifest's publisher")]
    OwnerMismatch,
    /// The sub-key's id is not the manifest's.
    #[error("the entry's id `{subkey}` is not the manifest's `{manifest}`")]
    IdMismatch {
        /// The id in the sub-key.
        subkey: String,
        /// The id in the manifest.
        manifest: String,
    },
    /// The manifest itself was refused.
    #[error(transparent)]
    Manifest(#[from] Rejection),
}

/// The catalog value of `signed`: its JSON text as a msgpack string.
pub fn catalog_value(signed: &SignedManifest) -> Result<Value, Rejection> {
    let bytes = signed.to_json_vec()?;
    String::from_utf8(bytes)
        .map(Value::Str)
        .map_err(|e| Rejection::Malformed {
            reason: e.to_string(),
        })
}

/// Reads one catalog entry at `now` (unix seconds): the sub-key's owner must be the manifest's publisher,
/// the ids must agree, and the manifest must pass [`SignedManifest::verify`].
pub fn parse_catalog_entry(subkey: &Value, value: &Value, now: u64) -> Result<SignedManifest, EntryError> {
    let (id, owner) = parse_owned_subkey(subkey).ok_or(EntryError::BadSubkey)?;
    let text = value
        .as_str()
        .filter(|t| t.len() <= MAX_SIGNED_MANIFEST_BYTES)
        .ok_or(EntryError::BadValue)?;
    let signed = SignedManifest::from_json_slice(text.as_bytes())?;
    let manifest = signed.verify(now)?;
    if manifest.publisher_key()? != owner {
        return Err(EntryError::OwnerMismatch);
    }
    if manifest.id != id {
        return Err(EntryError::IdMismatch {
            subkey: cut(&id),
            manifest: manifest.id.clone(),
        });
    }
    Ok(signed)
}

/// A trainer's live view of its experiment, refreshed beside the manifest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StatusRecord {
    /// The experiment's id.
    pub experiment: String,
    /// Volunteers the trainer sees (distinct peers hosting experts of the grid).
    pub volunteers: u32,
    /// Experts of the grid hosted by at least one volunteer.
    pub experts_covered: u32,
    /// Experts in the grid.
    pub grid_experts: u32,
    /// Training samples per second, recent average.
    pub samples_per_s: f64,
    /// The latest training loss, if any step ran.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss: Option<f64>,
    /// Training steps done.
    pub step: u64,
    /// When this record was made, DHT time (unix seconds).
    pub updated_at: f64,
}

impl StatusRecord {
    /// The record as a msgpack string value (JSON text).
    pub fn to_value(&self) -> Value {
        Value::Str(serde_json::to_string(self).unwrap_or_default())
    }

    /// Reads a status value for experiment `id`, checked: bounded, finite, consistent.
    pub fn from_value(id: &str, value: &Value) -> Option<Self> {
        let text = value.as_str().filter(|t| t.len() <= MAX_STATUS_BYTES)?;
        let record: StatusRecord = serde_json::from_str(text).ok()?;
        let finite = record.samples_per_s.is_finite()
            && record.samples_per_s >= 0.0
            && record.updated_at.is_finite()
            && record.loss.is_none_or(f64::is_finite);
        (record.experiment == id && finite && record.experts_covered <= record.grid_experts).then_some(record)
    }
}

/// The roster value of a volunteer hosting `uids`.
pub fn roster_value(uids: &[String]) -> Value {
    Value::list(uids.iter().map(|u| Value::str(u.as_str())))
}

/// Reads one roster entry against `manifest`: `(peer id, uids of the grid it hosts)`; `None` when the
/// entry is malformed or withdrawn (an empty value). Uids outside the grid are dropped.
pub fn parse_roster_entry(
    manifest: &Manifest,
    subkey: &Value,
    value: &Value,
) -> Option<(String, Vec<String>)> {
    let peer = subkey.as_str().filter(|p| !p.is_empty() && p.len() <= 128)?;
    let items = value
        .as_list()
        .filter(|l| !l.is_empty() && l.len() <= MAX_ROSTER_UIDS)?;
    let prefix = &manifest.uid_prefix;
    let grid = &manifest.grid;
    let uids: Vec<String> = items
        .iter()
        .filter_map(Value::as_str)
        .filter(|u| in_grid(u, prefix, grid))
        .map(str::to_owned)
        .collect();
    (!uids.is_empty()).then(|| (peer.to_owned(), uids))
}

/// Whether `uid` is `prefix` followed by coordinates inside `grid`.
pub fn in_grid(uid: &str, prefix: &str, grid: &[usize]) -> bool {
    let Some(rest) = uid.strip_prefix(prefix) else {
        return false;
    };
    let coords: Vec<&str> = rest.split('.').collect();
    coords.len() == grid.len()
        && coords.iter().zip(grid).all(|(c, &size)| {
            // canonical decimal only: "07" is another uid
            (c == &"0" || !c.starts_with('0')) && c.parse::<usize>().is_ok_and(|v| v < size)
        })
}

fn cut(s: &str) -> String {
    s.chars().take(64).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use apiary_wire::signature::RsaPrivateKey;

    #[test]
    fn owned_subkeys_round_trip() {
        let key = RsaPrivateKey::generate().unwrap().public_key();
        let sub = owned_subkey("tiny-lm", &key);
        assert!(sub.starts_with("tiny-lm[owner:ssh-rsa "));
        let (id, owner) = parse_owned_subkey(&Value::str(sub.clone())).unwrap();
        assert_eq!((id.as_str(), owner), ("tiny-lm", key));
        assert!(parse_owned_subkey(&Value::str("tiny-lm")).is_none());
        assert!(parse_owned_subkey(&Value::str(format!("{sub}]"))).is_none());
        assert!(parse_owned_subkey(&Value::str("x[owner:ssh-rsa AAAA]")).is_none());
        assert!(parse_owned_subkey(&Value::bin(sub.into_bytes())).is_none());
    }

    #[test]
    fn grid_membership_is_exact() {
        let grid = [4, 8];
        assert!(in_grid("ffn.3.7", "ffn.", &grid));
        assert!(in_grid("ffn.0.0", "ffn.", &grid));
        for bad in [
            "ffn.4.0",
            "ffn.3.8",
            "ffn.3",
            "ffn.3.7.1",
            "ffn.03.1",
            "ffn.-1.2",
            "moe.1.1",
            "ffn.1.x",
        ] {
            assert!(!in_grid(bad, "ffn.", &grid), "{bad}");
        }
    }

    #[test]
    fn status_records_are_checked() {
        let record = StatusRecord {
            experiment: "tiny-lm".into(),
            volunteers: 3,
            experts_covered: 30,
            grid_experts: 32,
            samples_per_s: 120.5,
            loss: Some(2.3),
            step: 40,
            updated_at: 1.8e9,
        };
        let v = record.to_value();
        assert_eq!(StatusRecord::from_value("tiny-lm", &v), Some(record.clone()));
        assert_eq!(StatusRecord::from_value("other", &v), None);
        let mut bad = record.clone();
        bad.experts_covered = 33;
        assert_eq!(StatusRecord::from_value("tiny-lm", &bad.to_value()), None);
        let text = serde_json::to_string(&record).unwrap().replace("120.5", "1e999");
        assert_eq!(StatusRecord::from_value("tiny-lm", &Value::str(text)), None);
        assert_eq!(
            StatusRecord::from_value("tiny-lm", &Value::str("x".repeat(5000))),
            None
        );
        assert_eq!(StatusRecord::from_value("tiny-lm", &Value::from(3i64)), None);
    }
}
