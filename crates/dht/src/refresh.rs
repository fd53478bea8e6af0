//! Keeping records alive: hivemind's pattern of storing a record with `expiration = now + ttl` and
//! storing it again every `period` (its `DHTHandlerThread` does this for expert declarations), with a
//! withdrawal that actually removes the records from readers' view.

use std::sync::Arc;
use std::time::Duration;

use apiary_wire::msgpack::Value;

use crate::node::{DhtHandle, Found, StoreEntry, get_dht_time};

/// How long a withdrawal waits to learn which records are still ours (see `Shared::still_ours`).
const OWNERSHIP_CHECK: Duration = Duration::from_secs(2);

/// One record a [`Refresher`] keeps alive: `key` (and `subkey`) ← `value`.
#[derive(Debug, Clone, PartialEq)]
pub struct KeptRecord {
    /// The key.
    pub key: Value,
    /// The dictionary sub-key, or `None` for a regular value.
    pub subkey: Option<Value>,
    /// The value.
    pub value: Value,
}

/// Stores a set of records now and every `period` with `expiration = now + ttl`, until withdrawn.
///
/// A withdrawal overwrites every record with an empty value (`None`) that outlives the last store: DHT
/// nodes refuse a store whose expiration is earlier than the one they hold, so "expire it now" has to be
/// a newer record. Readers that look after a withdrawal see the records gone at once. Dropping a
/// `Refresher` stops the refreshing without a withdrawal (the records live until they expire), as a
/// killed process would.
#[derive(Debug)]
pub struct Refresher {
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

#[derive(Debug)]
struct Shared {
    dht: DhtHandle,
    ttl: Duration,
    /// Serializes storing and withdrawing, so a late refresh never lands after a withdrawal.
    state: tokio::sync::Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    records: Vec<KeptRecord>,
    /// The expiration of the newest store (records or withdrawal).
    until: f64,
    withdrawn: bool,
}

impl Shared {
    /// Stores the records now (unless withdrawn and not forced); returns how many were stored.
    async fn store(&self, force: bool) -> usize {
        let mut state = self.state.lock().await;
        if state.withdrawn && !force {
            return 0;
        }
        // never below a withdrawal's expiration, or nodes would refuse the new records
        let exp = (get_dht_time() + self.ttl.as_secs_f64()).max(state.until + 1.0);
        let entries = entries(&state.records, exp, false);
        let ok = self.dht.store_many(entries, false).await.unwrap_or_default();
        state.until = exp;
        state.withdrawn = false;
        ok.iter().filter(|o| **o).count()
    }

    async fn withdraw(&self) {
        let mut state = self.state.lock().await;
        if state.withdrawn {
            return;
        }
        let exp = state.until + 1.0;
        let ours = self.still_ours(&state.records).await;
        if !ours.is_empty()
            && let Err(e) = self.dht.store_many(entries(&ours, exp, true), false).await
        {
            tracing::warn!(error = %e, "could not withdraw records");
        }
        state.until = exp;
        state.withdrawn = true;
    }

    /// The records readers still see with our value: a withdrawal erases only those. A key several
    /// peers write (hivemind's `uid → peer` declaration of a replicated expert) holds the newest writer's
    /// value, and erasing it would hide another replica until its next refresh. When the DHT cannot
    /// tell within [`OWNERSHIP_CHECK`], every record is withdrawn (yielding matters more).
    async fn still_ours(&self, records: &[KeptRecord]) -> Vec<KeptRecord> {
        let mut keys: Vec<Value> = Vec::new();
        for r in records {
            if !keys.contains(&r.key) {
                keys.push(r.key.clone());
            }
        }
        let found = match tokio::time::timeout(OWNERSHIP_CHECK, self.dht.get_many(keys.clone(), true)).await {
            Ok(Ok(found)) => found,
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "cannot read the records before withdrawing: withdrawing all");
                return records.to_vec();
            }
            Err(_) => {
                tracing::debug!("reading the records before withdrawing timed out: withdrawing all");
                return records.to_vec();
            }
        };
        records
            .iter()
            .filter(|r| {
                let at = keys.iter().position(|k| *k == r.key);
                match (at.and_then(|i| found.get(i)).cloned().flatten(), &r.subkey) {
                    (Some(Found::Regular { value, .. }), None) => value == r.value,
                    (Some(Found::Dictionary { entries, .. }), Some(subkey)) => {
                        entries.iter().any(|(k, v, _)| k == subkey && *v == r.value)
                    }
                    _ => false,
                }
            })
            .cloned()
            .collect()
    }

    /// Replaces the records: those that left the set are withdrawn, the new set is stored (unless
    /// withdrawn).
    async fn replace(&self, records: Vec<KeptRecord>) -> usize {
        {
            let mut state = self.state.lock().await;
            let gone: Vec<KeptRecord> = state
                .records
                .iter()
                .filter(|old| {
                    !records
                        .iter()
                        .any(|new| new.key == old.key && new.subkey == old.subkey)
                })
                .cloned()
                .collect();
            if !gone.is_empty() && !state.withdrawn {
                let exp = state.until + 1.0;
                let ours = self.still_ours(&gone).await;
                if !ours.is_empty()
                    && let Err(e) = self.dht.store_many(entries(&ours, exp, true), false).await
                {
                    tracing::warn!(error = %e, "could not withdraw records");
                }
                state.until = exp;
            }
            state.records = records;
        }
        self.store(false).await
    }
}

fn entries(records: &[KeptRecord], expiration: f64, empty: bool) -> Vec<StoreEntry> {
    records
        .iter()
        .map(|r| StoreEntry {
            key: r.key.clone(),
            subkey: r.subkey.clone(),
            value: if empty { Value::Nil } else { r.value.clone() },
            expiration,
        })
        .collect()
}

impl Refresher {
    /// Starts refreshing `records`; the first store happens before this returns (its success count is
    /// returned too: 0 means no DHT node took them, e.g. when alone).
    pub async fn start(
        dht: DhtHandle,
        records: Vec<KeptRecord>,
        period: Duration,
        ttl: Duration,
    ) -> (Self, usize) {
        let shared = Arc::new(Shared {
            dht,
            ttl,
            state: tokio::sync::Mutex::new(State {
                records,
                ..State::default()
            }),
        });
        let stored = shared.store(true).await;
        let weak = Arc::downgrade(&shared);
        let task = tokio::spawn(async move {
            loop {
                tokio::time::sleep(period).await;
                let Some(shared) = weak.upgrade() else { return };
                let stored = shared.store(false).await;
                tracing::trace!(stored, "refreshed records");
            }
        });
        (Self { shared, task }, stored)
    }

    /// Replaces the records and stores them at once (unless paused); records that left the set are
    /// withdrawn. Returns how many were stored.
    pub async fn set(&self, records: Vec<KeptRecord>) -> usize {
        self.shared.replace(records).await
    }

    /// Withdraws the records and stops refreshing them until [`Refresher::resume`].
    pub async fn pause(&self) {
        self.shared.withdraw().await;
    }

    /// Stores the records again at once and goes on refreshing.
    pub async fn resume(&self) -> usize {
        self.shared.store(true).await
    }

    /// Stops refreshing and withdraws the records for good.
    pub async fn withdraw(self) {
        self.task.abort();
        self.shared.withdraw().await;
    }
}
