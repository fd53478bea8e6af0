//! The catalog in the DHT: publishing a manifest and its status, announcing what a volunteer hosts, and
//! reading it all back (see [`crate::records`] for the keys and values).

use std::time::Duration;

use apiary_dht::validation::{CompositeValidator, RecordValidator, RsaOwnerValidator};
use apiary_dht::{DhtError, DhtHandle, Found, KeptRecord, Refresher};
use apiary_wire::msgpack::Value;
use apiary_wire::signature::{KeyError, RsaPrivateKey, RsaPublicKey, RsaSignatureValidator};

use crate::manifest::{Manifest, Rejection, SignedManifest};
use crate::records::{
    CATALOG_KEY, STATUS_KEY, StatusRecord, catalog_value, fingerprint, owned_subkey, parse_catalog_entry,
    parse_owned_subkey, parse_roster_entry, roster_key, roster_value,
};

/// How often a publisher refreshes its entry by default (hivemind's `update_period`), seconds.
pub const DEFAULT_PERIOD: Duration = Duration::from_secs(30);
/// How long an entry lives by default: two periods, as hivemind's declarations.
pub const DEFAULT_TTL: Duration = Duration::from_secs(60);
/// The most catalog entries read from the DHT; the rest are ignored.
pub const MAX_ENTRIES: usize = 1024;

/// The record validators an Apiary node runs: hivemind's RSA owner validator, signing with `key` (the
/// publisher's key on a publishing node) or with a fresh key (as hivemind does when given none). Every
/// node with it refuses protected records their owner did not sign.
pub fn validator(key: Option<RsaPrivateKey>) -> Result<CompositeValidator, KeyError> {
    let key = match key {
        Some(k) => k,
        None => RsaPrivateKey::generate()?,
    };
    Ok(CompositeValidator::new([
        Box::new(RsaOwnerValidator(RsaSignatureValidator::new(key))) as Box<dyn RecordValidator>,
    ]))
}

/// Why publishing failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PublishError {
    /// The manifest would be refused by readers.
    #[error("the manifest would be refused: {0}")]
    Rejected(#[from] Rejection),
    /// No DHT node took the entry (alone, or the node's validator does not hold the publisher's key).
    #[error(
        "no DHT node stored the catalog entry: check the bootstrap peers, and that this node signs with \
         the publisher's key"
    )]
    NotStored,
    /// An update names another experiment or another publisher than the publication.
    #[error("an update must keep the experiment's id and publisher key")]
    NotTheSameExperiment,
}

/// A published experiment: its catalog entry (and status, once set) refreshed until withdrawn.
///
/// The DHT node must sign with the publisher's key: spawn it with [`validator`]`(Some(key))`.
#[derive(Debug)]
pub struct Publication {
    id: String,
    owner: RsaPublicKey,
    dht: DhtHandle,
    period: Duration,
    ttl: Duration,
    /// Keeps the catalog entry alive.
    entry: Refresher,
    /// Keeps the status record alive, once one is set: a status update stores (and signs) only the
    /// status, never the manifest again.
    status: tokio::sync::Mutex<Option<Refresher>>,
}

impl Publication {
    /// Verifies `signed` (readers would refuse what fails here) and publishes it, refreshed every
    /// `period` with `ttl`. [`PublishError::NotStored`] when no node took it.
    pub async fn start(
        dht: DhtHandle,
        signed: &SignedManifest,
        now: u64,
        period: Duration,
        ttl: Duration,
    ) -> Result<Self, PublishError> {
        let manifest = signed.verify(now)?;
        let owner = manifest.publisher_key()?;
        let entry = KeptRecord {
            key: Value::str(CATALOG_KEY),
            subkey: Some(Value::Str(owned_subkey(&manifest.id, &owner))),
            value: catalog_value(signed)?,
        };
        let (refresher, stored) = Refresher::start(dht.clone(), vec![entry], period, ttl).await;
        if stored == 0 {
            drop(refresher);
            return Err(PublishError::NotStored);
        }
        Ok(Self {
            id: manifest.id.clone(),
            owner,
            dht,
            period,
            ttl,
            entry: refresher,
            status: tokio::sync::Mutex::new(None),
        })
    }

    /// The experiment's id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Replaces the published manifest with `signed`, a newer version of the same experiment (same
    /// id, same publisher): for example marked finished, or with a new summary. Returns how many
    /// records were stored.
    pub async fn update(&self, signed: &SignedManifest, now: u64) -> Result<usize, PublishError> {
        let manifest = signed.verify(now)?;
        let owner = manifest.publisher_key()?;
        if manifest.id != self.id || owner != self.owner {
            return Err(PublishError::NotTheSameExperiment);
        }
        let entry = KeptRecord {
            key: Value::str(CATALOG_KEY),
            subkey: Some(Value::Str(owned_subkey(&manifest.id, &owner))),
            value: catalog_value(signed)?,
        };
        Ok(self.entry.set(vec![entry]).await)
    }

    /// Publishes `status` beside the entry (refreshed like it); returns how many records were stored.
    pub async fn set_status(&self, status: &StatusRecord) -> usize {
        let record = KeptRecord {
            key: Value::str(STATUS_KEY),
            subkey: Some(Value::Str(owned_subkey(&self.id, &self.owner))),
            value: status.to_value(),
        };
        let mut slot = self.status.lock().await;
        match slot.as_ref() {
            Some(refresher) => refresher.set(vec![record]).await,
            None => {
                let (refresher, stored) =
                    Refresher::start(self.dht.clone(), vec![record], self.period, self.ttl).await;
                *slot = Some(refresher);
                stored
            }
        }
    }

    /// Removes the entry (and status) from the catalog.
    pub async fn withdraw(self) {
        if let Some(status) = self.status.into_inner() {
            status.withdraw().await;
        }
        self.entry.withdraw().await;
    }
}

/// A volunteer's roster entry for one experiment: which uids it hosts, refreshed until withdrawn.
#[derive(Debug)]
pub struct RosterEntry {
    refresher: Refresher,
}

impl RosterEntry {
    /// Announces that this node (`dht`'s peer) hosts `uids` of experiment `id`.
    pub async fn start(
        dht: DhtHandle,
        manifest: &Manifest,
        uids: &[String],
        period: Duration,
        ttl: Duration,
    ) -> Result<Self, Rejection> {
        let id = manifest.id.as_str();
        let record = KeptRecord {
            key: Value::Str(roster_key(id, &manifest.publisher_key()?)),
            subkey: Some(Value::Str(dht.peer_id().to_base58())),
            value: roster_value(uids),
        };
        let (refresher, stored) = Refresher::start(dht, vec![record], period, ttl).await;
        tracing::debug!(experiment = id, stored, "roster entry stored");
        Ok(Self { refresher })
    }

    /// Withdraws the entry until [`RosterEntry::resume`] (while the node is paused).
    pub async fn pause(&self) {
        self.refresher.pause().await;
    }

    /// Announces the entry again at once and goes on refreshing it.
    pub async fn resume(&self) {
        self.refresher.resume().await;
    }

    /// Withdraws the entry for good.
    pub async fn withdraw(self) {
        self.refresher.withdraw().await;
    }
}

/// An experiment as the DHT holds it.
#[derive(Debug, Clone)]
pub struct Listing {
    /// The verified manifest.
    pub signed: SignedManifest,
    /// The trainer's status record, if one is published (signed by the same publisher).
    pub status: Option<StatusRecord>,
    /// `(peer id, uids)` of every volunteer announcing experts of the grid.
    pub rosters: Vec<(String, Vec<String>)>,
}

impl Listing {
    /// The manifest (verified when the listing was read).
    pub fn manifest(&self) -> &Manifest {
        &self.signed.manifest
    }
}

/// An entry that was not listed, and why (for logs and a "hidden entries" view).
#[derive(Debug, Clone, PartialEq)]
pub struct Refused {
    /// The entry's id as its sub-key names it (cut to 64 characters), or `?`.
    pub entry: String,
    /// Why.
    pub reason: String,
}

/// What the DHT's catalog holds.
#[derive(Debug, Clone, Default)]
pub struct DhtCatalog {
    /// Valid experiments, sorted by id then publisher.
    pub listings: Vec<Listing>,
    /// Entries refused, with the reason.
    pub refused: Vec<Refused>,
}

/// Two or more publishers list experiments under the same id, and none was chosen.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{} publishers use the experiment id `{id}` (keys {}): choose one by its key", keys.len(), keys.join(", "))]
pub struct AmbiguousId {
    /// The id.
    pub id: String,
    /// The publishers' key [`fingerprint`]s.
    pub keys: Vec<String>,
}

impl DhtCatalog {
    /// The one listing `id` names; `publisher` (a key [`fingerprint`] or its start) picks one when
    /// several publishers use the id.
    pub fn pick(&self, id: &str, publisher: Option<&str>) -> Result<Option<&Listing>, AmbiguousId> {
        let matches: Vec<&Listing> = self
            .listings
            .iter()
            .filter(|l| l.manifest().id == id)
            .filter(|l| {
                publisher.is_none_or(|p| {
                    l.manifest()
                        .publisher_key()
                        .is_ok_and(|k| fingerprint(&k).starts_with(&p.to_ascii_lowercase()))
                })
            })
            .collect();
        match matches.as_slice() {
            [] => Ok(None),
            [one] => Ok(Some(one)),
            many => Err(AmbiguousId {
                id: id.to_owned(),
                keys: many
                    .iter()
                    .filter_map(|l| l.manifest().publisher_key().ok().map(|k| fingerprint(&k)))
                    .collect(),
            }),
        }
    }
}

fn dictionary(found: Option<Found>) -> Vec<(Value, Value)> {
    match found {
        Some(Found::Dictionary { entries, .. }) => entries
            .into_iter()
            .take(MAX_ENTRIES)
            .filter(|(_, v, _)| !v.is_nil())
            .map(|(k, v, _)| (k, v))
            .collect(),
        _ => Vec::new(),
    }
}

/// Reads the catalog, the status records and the rosters at `now` (unix seconds).
pub async fn fetch(dht: &DhtHandle, now: u64) -> Result<DhtCatalog, DhtError> {
    let mut found = dht
        .get_many(vec![Value::str(CATALOG_KEY), Value::str(STATUS_KEY)], true)
        .await?
        .into_iter();
    let entries = dictionary(found.next().flatten());
    let statuses = dictionary(found.next().flatten());
    let mut out = DhtCatalog::default();
    for (subkey, value) in entries {
        match parse_catalog_entry(&subkey, &value, now) {
            Ok(signed) => out.listings.push(Listing {
                signed,
                status: None,
                rosters: Vec::new(),
            }),
            Err(e) => out.refused.push(Refused {
                entry: parse_owned_subkey(&subkey)
                    .map(|(id, _)| id.chars().take(64).collect())
                    .unwrap_or_else(|| "?".into()),
                reason: e.to_string(),
            }),
        }
    }
    out.listings.sort_by(|a, b| {
        (&a.manifest().id, &a.manifest().publisher.public_key)
            .cmp(&(&b.manifest().id, &b.manifest().publisher.public_key))
    });
    for listing in &mut out.listings {
        let m = listing.manifest();
        let Ok(owner) = m.publisher_key() else { continue };
        let wanted = Value::Str(owned_subkey(&m.id, &owner));
        listing.status = statuses
            .iter()
            .find(|(k, _)| *k == wanted)
            .and_then(|(_, v)| StatusRecord::from_value(&m.id, v));
    }
    let keys: Vec<Value> = out.listings.iter().map(|l| roster_key_of(l.manifest())).collect();
    if !keys.is_empty() {
        let rosters = dht.get_many(keys, true).await?;
        for (listing, found) in out.listings.iter_mut().zip(rosters) {
            listing.rosters = parse_rosters(&listing.signed.manifest, found);
        }
    }
    Ok(out)
}

fn roster_key_of(manifest: &Manifest) -> Value {
    match manifest.publisher_key() {
        Ok(key) => Value::Str(roster_key(&manifest.id, &key)),
        // unreachable for a verified manifest; a key nobody writes
        Err(_) => Value::Str(format!("apiary.roster.v1.{}.invalid", manifest.id)),
    }
}

fn parse_rosters(manifest: &Manifest, found: Option<Found>) -> Vec<(String, Vec<String>)> {
    dictionary(found)
        .iter()
        .filter_map(|(k, v)| parse_roster_entry(manifest, k, v))
        .collect()
}

/// The roster of `manifest`'s experiment: `(peer id, uids)` of every volunteer announcing experts of its
/// grid.
pub async fn rosters(dht: &DhtHandle, manifest: &Manifest) -> Result<Vec<(String, Vec<String>)>, DhtError> {
    let found = dht.get(roster_key_of(manifest), true).await?;
    Ok(parse_rosters(manifest, found))
}
