//! Joining an experiment: creating its experts from the manifest (seeded init, or the last checkpoint
//! on disk), handing them to the node's [`ExpertServer`], declaring them in the DHT and announcing them in
//! the experiment's roster; leaving withdraws all of it.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use apiary_dht::DhtHandle;
use apiary_expert::checkpoints::{load_or_init, save_all};
use apiary_expert::runtime::{Runtime, RuntimeConfig, RuntimeHandle};
use apiary_expert::schema::ExpertSchema;
use apiary_expert::server::{Declarer, ExpertServer};
use apiary_expert::{BackendConfig, ExpertError, Gate, RuntimeStats};
use apiary_wire::proto::runtime::CompressionType;
use serde::Serialize;

use crate::manifest::{Manifest, Rejection, Status};
use crate::records::in_grid;
use crate::swarm::RosterEntry;

/// How a node hosts an experiment's experts.
#[derive(Debug, Clone)]
pub struct HostingConfig {
    /// How often declarations and the roster entry are refreshed (and checkpoints saved); default 30 s,
    /// hivemind's `update_period`.
    pub update_period: Duration,
    /// How long a declaration lives; default 60 s (two periods, as hivemind).
    pub expiration: Duration,
    /// Where checkpoints live: `<dir>/<experiment id>-<spec digest>/<uid>/`; default none (experts start
    /// from their seeded init every time and nothing is saved).
    pub checkpoint_dir: Option<PathBuf>,
    /// The compute runtime's settings; `max_batch_size` is always the manifest's.
    pub runtime: RuntimeConfig,
    /// The compression the experts' schemas declare for inputs; default none.
    pub compression: CompressionType,
}

impl Default for HostingConfig {
    fn default() -> Self {
        Self {
            update_period: Duration::from_secs(30),
            expiration: Duration::from_secs(60),
            checkpoint_dir: None,
            runtime: RuntimeConfig::default(),
            compression: CompressionType::None,
        }
    }
}

/// Why joining failed. Nothing is left behind when it does.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum JoinError {
    /// The manifest's expert cannot be built.
    #[error("the experiment cannot be hosted: {0}")]
    Manifest(#[from] Rejection),
    /// The experiment is finished.
    #[error("the experiment `{0}` is finished: there is nothing to join")]
    Finished(String),
    /// A planned uid is not in the experiment's grid.
    #[error("`{0}` is not an expert of this experiment's grid")]
    NotInGrid(String),
    /// Nothing to host.
    #[error("no experts were planned")]
    NoExperts,
    /// This node already hosts the uid (the experiment was joined twice).
    #[error("this node already hosts `{0}`: the experiment is already joined")]
    AlreadyHosted(String),
    /// An expert could not be created, or this node already hosts one of the uids (joined twice).
    #[error(transparent)]
    Expert(#[from] ExpertError),
}

/// Whether the experiment changed in a way that matters to a volunteer hosting it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "change", rename_all = "snake_case")]
pub enum Change {
    /// Same experiment, same experts.
    Unchanged,
    /// Texts, status or expiry changed; the experts are the same.
    Updated,
    /// The experts changed (kind, dimensions, dtype, training settings, uid prefix or grid): the hosted
    /// ones no longer belong to it.
    SpecChanged {
        /// Which parts changed, for the user.
        what: Vec<String>,
    },
    /// The publisher marked it finished.
    Finished,
}

/// Compares the manifest a volunteer joined with the latest one published.
pub fn compare(joined: &Manifest, latest: &Manifest) -> Change {
    let mut what = Vec::new();
    let (a, b) = (&joined.expert, &latest.expert);
    if a.kind != b.kind || a.hidden_dim != b.hidden_dim || a.dtype != b.dtype || a.init_seed != b.init_seed {
        what.push("the expert".to_owned());
    }
    if a.max_batch_size != b.max_batch_size {
        what.push("the batch size".to_owned());
    }
    if a.optimizer != b.optimizer || a.schedule != b.schedule || a.clip_grad_norm != b.clip_grad_norm {
        what.push("the training settings".to_owned());
    }
    if joined.uid_prefix != latest.uid_prefix || joined.grid != latest.grid {
        what.push("the expert grid".to_owned());
    }
    if !what.is_empty() {
        Change::SpecChanged { what }
    } else if latest.status == Status::Finished {
        Change::Finished
    } else if joined == latest {
        Change::Unchanged
    } else {
        Change::Updated
    }
}

/// What a volunteer does about a joined experiment after reading the catalog again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Keep hosting.
    Keep,
    /// The catalog entry is gone (its publisher may be offline): keep hosting until the joined
    /// manifest expires. `first` is true on the first check that misses it (tell the user once).
    Vanished {
        /// Whether the previous check still saw it.
        first: bool,
    },
    /// Stop hosting, for this reason (in words, for the user).
    Leave(String),
}

/// Follows one joined experiment's catalog entry from check to check (see [`ManifestWatch::check`]).
#[derive(Debug, Clone, Default)]
pub struct ManifestWatch {
    vanished: bool,
}

impl ManifestWatch {
    /// Judges the joined manifest against the `latest` one the catalog lists under the same id and
    /// publisher (`None`: not listed) at `now` (unix seconds): an expired manifest, a finished
    /// experiment or changed experts end the hosting; a missing entry does not, until expiry.
    pub fn check(&mut self, joined: &Manifest, latest: Option<&Manifest>, now: u64) -> Verdict {
        if now >= joined.expires {
            return Verdict::Leave("its manifest expired".into());
        }
        let Some(latest) = latest else {
            let first = !self.vanished;
            self.vanished = true;
            return Verdict::Vanished { first };
        };
        self.vanished = false;
        match compare(joined, latest) {
            Change::Unchanged | Change::Updated => Verdict::Keep,
            Change::Finished => Verdict::Leave("the publisher marked the experiment finished".into()),
            Change::SpecChanged { what } => Verdict::Leave(format!(
                "the publisher changed {} (the hosted experts no longer belong to it; their checkpoints \
                 are kept)",
                what.join(", ")
            )),
        }
    }
}

/// A short digest of what the experts are (kind, dims, dtype, seed, training, prefix, grid): checkpoints
/// of one spec never load into another.
pub fn spec_digest(manifest: &Manifest) -> String {
    use sha2::Digest;
    let spec = serde_json::json!({
        "expert": manifest.expert,
        "uid_prefix": manifest.uid_prefix,
        "grid": manifest.grid,
    });
    let digest = sha2::Sha256::digest(spec.to_string().as_bytes());
    digest.iter().take(4).map(|b| format!("{b:02x}")).collect()
}

/// The initial-weights seed of `uid` in an experiment seeded with `init_seed`: the same on every
/// volunteer, so replicas of a uid start equal.
pub fn uid_seed(init_seed: u64, uid: &str) -> u64 {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    h.update(init_seed.to_le_bytes());
    h.update(uid.as_bytes());
    let d = h.finalize();
    let mut bytes = [0u8; 8];
    bytes.copy_from_slice(&d[..8]);
    u64::from_le_bytes(bytes)
}

/// An experiment this node hosts experts of.
#[derive(Debug)]
pub struct Hosting {
    manifest: Manifest,
    uids: Vec<String>,
    runtime: RuntimeHandle,
    server: Arc<ExpertServer>,
    declarer: Declarer,
    roster: RosterEntry,
    checkpoints: Option<PathBuf>,
    saver: Option<AbortOnDrop>,
}

/// A background task that stops with its owner.
#[derive(Debug)]
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl Hosting {
    /// Joins: builds the experts `uids` of `manifest` (from their checkpoints when there are), serves them
    /// through `server` (registered on the node's p2p host), declares them and announces them in the
    /// roster. On error nothing stays behind.
    pub async fn start(
        dht: &DhtHandle,
        server: &Arc<ExpertServer>,
        manifest: &Manifest,
        uids: Vec<String>,
        config: &HostingConfig,
    ) -> Result<Self, JoinError> {
        if manifest.status == Status::Finished {
            return Err(JoinError::Finished(manifest.id.clone()));
        }
        if uids.is_empty() {
            return Err(JoinError::NoExperts);
        }
        if let Some(bad) = uids
            .iter()
            .find(|u| !in_grid(u, &manifest.uid_prefix, &manifest.grid))
        {
            return Err(JoinError::NotInGrid(bad.chars().take(64).collect()));
        }
        if let Some(taken) = uids.iter().find(|u| server.uids().contains(u)) {
            return Err(JoinError::AlreadyHosted(taken.clone()));
        }
        let spec = &manifest.expert;
        let expert_config = spec.expert_config()?;
        let backend = BackendConfig {
            optimizer: spec.optimizer.to_config()?,
            schedule: spec.schedule.to_config()?,
            clip_grad_norm: spec.clip_grad_norm,
        };
        let checkpoints = config
            .checkpoint_dir
            .as_ref()
            .map(|d| d.join(format!("{}-{}", manifest.id, spec_digest(manifest))));
        let init_seed = spec.init_seed;
        let (dir, list) = (checkpoints.clone(), uids.clone());
        let backends = tokio::task::spawn_blocking(move || {
            list.iter()
                .map(|uid| {
                    let seed = uid_seed(init_seed, uid);
                    load_or_init(expert_config, backend, uid, dir.as_deref(), seed).map(|b| (uid.clone(), b))
                })
                .collect::<Result<Vec<_>, _>>()
        })
        .await
        .map_err(|e| ExpertError::BadTask(format!("creating the experts: {e}")))??;
        let runtime_config = RuntimeConfig {
            max_batch_size: spec.max_batch_size,
            ..config.runtime.clone()
        };
        let runtime = Runtime::spawn(backends, runtime_config)?;
        let schemas: HashMap<String, ExpertSchema> = uids
            .iter()
            .map(|uid| {
                let schema = ExpertSchema::server_create(
                    expert_config.kind,
                    spec.hidden_dim,
                    config.compression,
                    spec.max_batch_size,
                );
                (uid.clone(), schema)
            })
            .collect();
        if let Err(e) = server.attach(runtime.clone(), schemas) {
            runtime.shutdown().await;
            return Err(e.into());
        }
        let (declarer, stored) =
            Declarer::start(dht.clone(), uids.clone(), config.update_period, config.expiration).await;
        tracing::info!(experiment = %manifest.id, experts = uids.len(), stored, "joined");
        let roster = match RosterEntry::start(
            dht.clone(),
            manifest,
            &uids,
            config.update_period,
            config.expiration,
        )
        .await
        {
            Ok(r) => r,
            Err(e) => {
                declarer.withdraw().await;
                server.detach(&uids);
                runtime.shutdown().await;
                return Err(e.into());
            }
        };
        let saver = checkpoints.clone().map(|dir| {
            let (runtime, uids, period) = (runtime.clone(), uids.clone(), config.update_period);
            AbortOnDrop(tokio::spawn(async move {
                // only when something trained since the last save: a paused volunteer writes nothing
                let mut saved_at: Option<u64> = None;
                loop {
                    tokio::time::sleep(period).await;
                    let steps = runtime.stats().experts.iter().map(|e| e.optimizer_steps).sum();
                    if saved_at != Some(steps) {
                        save_all(&runtime, &uids, &dir).await;
                        saved_at = Some(steps);
                    }
                }
            }))
        });
        Ok(Self {
            manifest: manifest.clone(),
            uids,
            runtime,
            server: server.clone(),
            declarer,
            roster,
            checkpoints,
            saver,
        })
    }

    /// The manifest joined.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// The hosted uids.
    pub fn uids(&self) -> &[String] {
        &self.uids
    }

    /// The compute runtime's counters (requests, samples, optimizer steps).
    pub fn stats(&self) -> RuntimeStats {
        self.runtime.stats()
    }

    /// Where this experiment's checkpoints are saved, if anywhere.
    pub fn checkpoint_dir(&self) -> Option<&std::path::Path> {
        self.checkpoints.as_deref()
    }

    /// Sets the compute runtime's gate (the governor's directive): [`Gate::Stop`] refuses new and queued
    /// work at once and lets the running batch finish; [`Gate::Pace`] limits the duty cycle.
    pub fn set_gate(&self, gate: Gate) {
        self.runtime.set_gate(gate);
    }

    /// Yields: the gate closes ([`Gate::Stop`]) and the declarations and roster entry are withdrawn at once,
    /// so trainers stop routing here; the experts stay loaded for a quick resume.
    pub async fn pause(&self) {
        self.runtime.set_gate(Gate::Stop);
        self.declarer.pause().await;
        self.roster.pause().await;
    }

    /// Undoes [`Hosting::pause`]: the gate opens (`gate`, e.g. [`Gate::Run`]) and the experts are declared
    /// and announced again at once.
    pub async fn resume(&self, gate: Gate) {
        self.runtime.set_gate(gate);
        self.declarer.resume().await;
        self.roster.resume().await;
    }

    /// Stops at once without a goodbye, as a crash or a pulled plug would: nothing is withdrawn (the
    /// declarations and the roster entry stay in the DHT until they expire), nothing is saved, in-flight
    /// requests fail. For demos and tests of what trainers live through. Returns the final counters.
    pub async fn abandon(self) -> RuntimeStats {
        drop(self.saver);
        self.server.detach(&self.uids);
        let stats = self.runtime.stats();
        self.runtime.shutdown().await;
        stats
    }

    /// Leaves: the roster entry and the declarations are withdrawn first (trainers stop routing here at
    /// once), the experts stop being served, in-flight work finishes, checkpoints are saved, and the
    /// compute runtime stops. Returns the final counters.
    pub async fn leave(self) -> RuntimeStats {
        drop(self.saver);
        self.roster.withdraw().await;
        self.declarer.withdraw().await;
        self.server.detach(&self.uids);
        if let Some(dir) = &self.checkpoints {
            let saved = save_all(&self.runtime, &self.uids, dir).await;
            tracing::info!(saved, dir = %dir.display(), "checkpoints saved");
        }
        let stats = self.runtime.stats();
        self.runtime.shutdown().await;
        tracing::info!(experiment = %self.manifest.id, "left");
        stats
    }
}
