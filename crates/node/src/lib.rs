//! The volunteer node: the engine facade the desktop app and the headless daemon use.
//!
//! [`Node::spawn`] starts, in one process:
//!
//! - a libp2p host ([`apiary_p2p::Host`]) listening on [`NodeConfig::listen_maddrs`];
//! - a DHT node with the catalog's record validator ([`apiary_catalog::swarm::validator`]),
//!   bootstrapped from [`NodeConfig::initial_peers`] (none: alone; unreachable peers are logged);
//! - an [`ExpertServer`] serving the expert RPCs of every joined experiment;
//! - the contribution ledger at `<data_dir>/ledger.sqlite`;
//! - the governor (its state restored from `<data_dir>/policy-state.json`, so a snooze or a pause
//!   survives restarts; the file is rewritten whenever the state changes);
//! - the engine task, the one owner of the joined experiments.
//!
//! and returns a [`NodeHandle`] (cheap clones) to drive it: status and events for the UI, pause /
//! snooze / resume / finish / mode / settings, the catalog (list, show, join, leave), the ledger's
//! reports, and `shutdown`.
//!
//! # Directives
//!
//! | governor | gates | declarations + roster | status |
//! |---|---|---|---|
//! | `Run { level ≥ 0.999 }` | `Run` | declared | `Running` |
//! | `Run { level }` / `Pace { duty > 0 }` | `Pace { duty }` | declared | `Running` / `Throttled` |
//! | `Pace { duty: 0 }` | `Stop` (weights stay loaded) | declared | `Throttled` |
//! | `Drain` | `Stop`: queued work refused, the running batch finishes | withdrawn at once | `Draining` |
//! | `Paused` | `Stop` | withdrawn at once | `Paused` |
//!
//! The engine sets the gates of every experiment before anything else (no network in between), then
//! publishes the status, then withdraws or re-declares. Every 100 ms it counts the work still in
//! flight (queued rows, plus a batch still running after a stop) and reports it to the governor
//! (always while draining, otherwise when it changes), which ends a "finish then pause" drain.
//! The test `join_serve_pause_resume_leave` measures these on loopback (see the crate README).
//!
//! # Ledger feed
//!
//! Every second the engine records each experiment's runtime counters since the last feed as
//! `Event::Work` per uid and pass (calls = batches, samples = rows, optimizer steps on backward,
//! compute seconds = the busy time split between the passes by rows, flops estimated), and
//! `Event::Uptime` for the node and each declared experiment while working.
//!
//! # Files in the data folder
//!
//! `ledger.sqlite` (the ledger), `policy-state.json` (the governor's state), `joined.json` (the
//! joined experiments, re-joined at the next start once the catalog lists them: the node retries
//! for [`REJOIN_PATIENCE`]), `checkpoints/` (the experts' weights, saved every update period and
//! on leave), `api-token` (the local API's token, see [`api`]).
//!
//! # Local API
//!
//! [`api::serve`] serves the node's local HTTP/WebSocket API (loopback only by default, behind a
//! token): what the dashboard in a browser uses for a headless node.
#![deny(missing_docs)]

pub mod api;
mod config;
mod device;
mod engine;
mod error;
mod machine;
mod status;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use apiary_catalog::swarm::{DhtCatalog, Listing, fetch, validator};
use apiary_catalog::{
    Coverage, Hosting, HostingConfig, ManifestWatch, Verdict, bundled, cards, fingerprint, plan, tie_break_of,
};
use apiary_dht::{Dht, DhtConfig, DhtHandle};
use apiary_expert::server::ExpertServer;
use apiary_governor::{Control, Governor, GovernorOptions, PolicyState};
use apiary_ledger::{Ledger, LedgerConfig, LedgerHandle};
use apiary_p2p::{Host, Multiaddr, P2pConfig, P2pHandle};
use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, mpsc, oneshot, watch};

pub use api::{ApiConfig, ApiServer};
/// The types the node's API takes and returns, re-exported so that a UI shell (the desktop app) needs
/// no other Apiary crate.
pub use apiary_catalog::{Card, GpuProfile, JoinPlan, MachineProfile};
pub use apiary_governor::{Directive, Mode, PauseCause, PolicyConfig, Probes, Reading, Sample};
pub use apiary_ledger::{Bucket, Filter, Row, Totals};
pub use config::{
    AUTO_RELAYS, BadDevice, CONFIG_FILE, ConfigError, DeviceChoice, ForceReachability, MAX_GPU_INDEX,
    MAX_SNOOZE_S, NetworkConfig, NodeConfig, TEMPERATURE_TARGET_C, check_experiment_id, check_policy,
    check_snooze, planning_mode,
};
pub use device::{APPLIES_NOTE, DeviceSetting};
pub use error::NodeError;
pub use machine::local_profile;
use status::Events;
pub use status::{
    ConnectionCounts, ExpertLoad, HolePunchCounts, HostedStatus, LoggedEvent, NetPath, NetworkStatus,
    NodeEvent, NodeStatus, Reachability, RelayInfo, RunState,
};

use engine::{Command, Engine, GovernorCommand, JOINED_FILE, JoinedRecord, ManifestRef, POLICY_STATE_FILE};

/// Capacity of the event broadcast: a receiver that falls further behind loses the oldest events
/// (`RecvError::Lagged`).
pub const EVENT_CAPACITY: usize = 256;
/// How long a node keeps trying to re-join the experiments of `joined.json` after a start.
pub const REJOIN_PATIENCE: Duration = Duration::from_secs(120);

/// How to join an experiment.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinOptions {
    /// Host at most this many experts (default: [`NodeConfig::max_experts`], then the hardware fit).
    pub max_experts: Option<usize>,
    /// The publisher's key fingerprint (or its start), when several publishers use the id.
    pub publisher: Option<String>,
}

/// One experiment in detail: its card, and what joining it now would host.
#[derive(Debug, Clone, Serialize)]
pub struct Preview {
    /// The card, as `experiments` lists it.
    pub card: Card,
    /// The experts joining now would host (`None` for a bundled experiment not running in the swarm,
    /// or when planning fails: see `why_not`).
    pub plan: Option<JoinPlan>,
    /// Why joining now would fail, if it would.
    pub why_not: Option<String>,
}

/// Starts nodes.
#[derive(Debug)]
pub struct Node;

impl Node {
    /// Starts a node with `config` (never written back) and the governor's `probes`.
    pub async fn spawn(config: NodeConfig, probes: Probes) -> Result<NodeHandle, NodeError> {
        Self::spawn_inner(config, None, probes).await
    }

    /// Loads the settings from `path` (missing: defaults) and starts a node; settings changed through
    /// the handle ([`NodeHandle::set_policy`], [`NodeHandle::set_mode`]) are written back to `path`.
    pub async fn spawn_from(path: &Path, probes: Probes) -> Result<NodeHandle, NodeError> {
        let config = NodeConfig::load(path)?;
        Self::spawn_inner(config, Some(path.to_owned()), probes).await
    }

    /// Starts a node with `config`, which may differ from the settings file at `path` (command-line
    /// overrides); the settings changed through the handle (the policy and mode) are written to `path`,
    /// the rest of the file is left as it is.
    pub async fn spawn_with_file(
        config: NodeConfig,
        path: &Path,
        probes: Probes,
    ) -> Result<NodeHandle, NodeError> {
        Self::spawn_inner(config, Some(path.to_owned()), probes).await
    }

    async fn spawn_inner(
        config: NodeConfig,
        config_path: Option<PathBuf>,
        probes: Probes,
    ) -> Result<NodeHandle, NodeError> {
        let data_dir = config.data_dir.clone();
        std::fs::create_dir_all(&data_dir).map_err(|source| NodeError::Io {
            what: "create",
            path: data_dir.clone(),
            source,
        })?;
        let listen = parse_addrs("listen_maddrs", &config.listen_maddrs)?;
        let peers = parse_addrs("initial_peers", &config.initial_peers)?;
        let initial_state = read_policy_state(&data_dir, config.start_paused)?;
        let ledger = Ledger::open(LedgerConfig::new(data_dir.join(apiary_ledger::FILE_NAME)))?;

        let keypair = identity(&data_dir)?;
        let p2p_config = config
            .network
            .apply(P2pConfig {
                keypair: Some(keypair),
                listen_addrs: listen,
                ..P2pConfig::default()
            })
            .map_err(NodeError::Network)?;
        let (p2p, _host_task) = Host::spawn(p2p_config)?;
        let mut dht_config = DhtConfig::default();
        dht_config.client_mode = config.client_mode;
        // offline or unreachable bootstrap peers must not keep the app from starting
        dht_config.ensure_bootstrap_success = false;
        let record_validator = match validator(None) {
            Ok(v) => v,
            Err(e) => {
                p2p.shutdown().await;
                return Err(e.into());
            }
        };
        let dht = match Dht::spawn_with_validator(p2p.clone(), dht_config, peers, record_validator).await {
            Ok(d) => d,
            Err(e) => {
                p2p.shutdown().await;
                return Err(e.into());
            }
        };
        let server = ExpertServer::empty();
        let governor = server.register(&p2p).map_err(NodeError::from).and_then(|()| {
            Governor::spawn_with(
                config.policy.clone(),
                probes,
                GovernorOptions {
                    initial_state,
                    // the GPU rules watch the GPU the experts compute on
                    gpu: config.device.gpu(),
                    ..GovernorOptions::default()
                },
            )
            .map_err(NodeError::from)
        });
        let governor = match governor {
            Ok(g) => g,
            Err(e) => {
                ExpertServer::unregister(&p2p);
                dht.shutdown().await;
                p2p.shutdown().await;
                return Err(e);
            }
        };
        let rejoin = read_joined(&data_dir);

        let (tx, rx) = mpsc::channel(engine::COMMAND_CAPACITY);
        let events = Arc::new(Events::new(EVENT_CAPACITY));
        let directive = governor.directive().borrow().clone();
        let status = watch::channel(NodeStatus {
            state: RunState::of(&directive),
            reason: directive.reason().to_owned(),
            until: directive.until(),
            directive,
            mode: config.policy.mode,
            experiments: Vec::new(),
            peer_id: p2p.local_peer_id().to_base58(),
            maddrs: Vec::new(),
            peers: 0,
            reachability: Reachability::Unknown,
            network: (&*p2p.connectivity().borrow()).into(),
            telemetry: None,
        });
        let (config_tx, config_rx) = watch::channel(config);
        let engine = Engine {
            rx,
            governor,
            ledger: ledger.clone(),
            dht: dht.clone(),
            p2p: p2p.clone(),
            status: status.0,
            events: events.clone(),
            config: config_tx,
            config_path,
            data_dir: data_dir.clone(),
        };
        let done = tokio::spawn(engine.run());
        let handle = NodeHandle {
            inner: Arc::new(Inner {
                tx,
                status: status.1,
                events,
                config: config_rx,
                ledger,
                dht,
                p2p,
                server,
                data_dir,
                done: tokio::sync::Mutex::new(Some(done)),
            }),
        };
        if !rejoin.is_empty() {
            tokio::spawn(rejoin_all(handle.clone(), rejoin));
        }
        tokio::spawn(watch_catalog(Arc::downgrade(&handle.inner)));
        Ok(handle)
    }
}

fn parse_addrs(field: &'static str, addrs: &[String]) -> Result<Vec<Multiaddr>, NodeError> {
    addrs
        .iter()
        .map(|a| {
            a.parse::<Multiaddr>().map_err(|e| NodeError::BadAddress {
                field,
                addr: a.clone(),
                reason: e.to_string(),
            })
        })
        .collect()
}

/// The saved governor state; without one, paused by hand when `start_paused` (the first run).
fn read_policy_state(data_dir: &Path, start_paused: bool) -> Result<PolicyState, NodeError> {
    let path = data_dir.join(POLICY_STATE_FILE);
    match std::fs::read(&path) {
        Ok(bytes) => match serde_json::from_slice(&bytes) {
            Ok(state) => Ok(state),
            Err(e) => {
                // a damaged state file must not keep the node from starting: pause to be safe
                tracing::warn!(path = %path.display(), "ignoring an unreadable policy state: {e}");
                Ok(paused_state())
            }
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(if start_paused {
            paused_state()
        } else {
            PolicyState::default()
        }),
        Err(source) => Err(NodeError::Io {
            what: "read",
            path,
            source,
        }),
    }
}

fn paused_state() -> PolicyState {
    PolicyState {
        control: Control::Paused {
            until: None,
            finished: false,
        },
    }
}

fn read_joined(data_dir: &Path) -> Vec<JoinedRecord> {
    let path = data_dir.join(JOINED_FILE);
    match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
            tracing::warn!(path = %path.display(), "ignoring an unreadable list of joined experiments: {e}");
            Vec::new()
        }),
        Err(_) => Vec::new(),
    }
}

/// Re-joins the experiments joined before the last shutdown, retrying while the catalog does not
/// list them yet (the DHT fills in after the bootstrap), for at most [`REJOIN_PATIENCE`].
/// Reads the joined experiments' catalog entries again every `catalog_check_period` and leaves those
/// whose publisher finished them or changed their experts, or whose manifest expired. Holds the node
/// weakly: it ends when the node stops or every handle is gone.
async fn watch_catalog(node: std::sync::Weak<Inner>) {
    let mut watches: BTreeMap<String, ManifestWatch> = BTreeMap::new();
    loop {
        let Some(period) = node
            .upgrade()
            .map(|inner| inner.config.borrow().catalog_check_period)
        else {
            return;
        };
        tokio::time::sleep(period).await;
        let Some(inner) = node.upgrade() else {
            return;
        };
        let handle = NodeHandle { inner };
        let Ok(joined) = handle.request(|reply| Command::Manifests { reply }).await else {
            return;
        };
        watches.retain(|id, _| joined.iter().any(|m| &m.id == id));
        if joined.is_empty() {
            continue;
        }
        let now = unix_seconds();
        let catalog = match fetch(&handle.inner.dht, now).await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!("cannot read the catalog to check the joined experiments: {e}");
                continue;
            }
        };
        for manifest in joined {
            let latest = catalog
                .listings
                .iter()
                .map(Listing::manifest)
                .find(|m| m.id == manifest.id && m.publisher == manifest.publisher);
            let verdict = watches
                .entry(manifest.id.clone())
                .or_default()
                .check(&manifest, latest, now);
            match verdict {
                Verdict::Keep | Verdict::Vanished { first: false } => {}
                Verdict::Vanished { first: true } => handle.emit(NodeEvent::Notice {
                    message: format!(
                        "the catalog entry of `{}` is gone from the DHT (its publisher may be offline); \
                         hosting it until its manifest expires",
                        manifest.id
                    ),
                }),
                Verdict::Leave(why) => {
                    tracing::info!(experiment = %manifest.id, reason = %why, "leaving");
                    match handle.leave_because(&manifest.id, why).await {
                        Ok(()) | Err(NodeError::NotJoined(_)) => {}
                        Err(e) => handle.emit(NodeEvent::Error {
                            message: format!("could not leave `{}`: {e}", manifest.id),
                        }),
                    }
                }
            }
        }
    }
}

async fn rejoin_all(node: NodeHandle, mut pending: Vec<JoinedRecord>) {
    let deadline = tokio::time::Instant::now() + REJOIN_PATIENCE;
    while !pending.is_empty() {
        let mut still = Vec::new();
        for r in pending {
            let options = JoinOptions {
                max_experts: r.max_experts,
                publisher: r.publisher.clone(),
            };
            match node.join(&r.id, options).await {
                Ok(_) | Err(NodeError::AlreadyJoined(_)) => {}
                Err(NodeError::Stopped) => return,
                Err(NodeError::NotListed(_)) => still.push(r),
                Err(e) => node.emit(NodeEvent::Error {
                    message: format!("could not re-join `{}`: {e}", r.id),
                }),
            }
        }
        pending = still;
        if pending.is_empty() || tokio::time::Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
    for r in pending {
        node.emit(NodeEvent::Notice {
            message: format!(
                "`{}` was joined before the restart but the catalog does not list it: it will be tried again at the next start",
                r.id
            ),
        });
    }
}

#[derive(Debug)]
struct Inner {
    tx: mpsc::Sender<Command>,
    status: watch::Receiver<NodeStatus>,
    events: Arc<Events>,
    config: watch::Receiver<NodeConfig>,
    ledger: LedgerHandle,
    dht: DhtHandle,
    p2p: P2pHandle,
    server: Arc<ExpertServer>,
    data_dir: PathBuf,
    done: tokio::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
}

/// Drives a running node (cheap to clone; every clone talks to the same engine).
#[derive(Debug, Clone)]
pub struct NodeHandle {
    inner: Arc<Inner>,
}

impl NodeHandle {
    /// The node's status; `changed().await` wakes on every change (directive, counters, peers,
    /// telemetry).
    pub fn status(&self) -> watch::Receiver<NodeStatus> {
        self.inner.status.clone()
    }

    /// Events from now on.
    pub fn events(&self) -> broadcast::Receiver<NodeEvent> {
        self.inner.events.subscribe()
    }

    /// The last events (at most 500, or the newest `limit`), oldest first, with when they happened:
    /// the node's log for the app's activity list.
    pub fn recent_events(&self, limit: Option<usize>) -> Vec<LoggedEvent> {
        let mut events = self.inner.events.recent();
        let skip = limit.map_or(0, |n| events.len().saturating_sub(n));
        events.drain(..skip);
        events
    }

    /// The settings in effect (mode and policy follow `set_mode` / `set_policy`).
    pub fn config(&self) -> NodeConfig {
        self.inner.config.borrow().clone()
    }

    /// The data folder.
    pub fn data_dir(&self) -> &Path {
        &self.inner.data_dir
    }

    /// The p2p host (for callers that add protocols, and for tests).
    pub fn p2p(&self) -> &P2pHandle {
        &self.inner.p2p
    }

    /// The DHT node.
    pub fn dht(&self) -> &DhtHandle {
        &self.inner.dht
    }

    fn emit(&self, event: NodeEvent) {
        self.inner.events.emit(event);
    }

    async fn request<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> Command) -> Result<T, NodeError> {
        let (reply, rx) = oneshot::channel();
        self.inner
            .tx
            .send(make(reply))
            .await
            .map_err(|_| NodeError::Stopped)?;
        rx.await.map_err(|_| NodeError::Stopped)
    }

    async fn governor(&self, command: GovernorCommand) -> Result<(), NodeError> {
        self.request(|reply| Command::Governor { command, reply }).await?
    }

    /// Pauses until [`NodeHandle::resume`] (survives restarts).
    pub async fn pause(&self) -> Result<(), NodeError> {
        self.governor(GovernorCommand::Pause).await
    }

    /// Pauses for `duration` (survives restarts; ends by itself).
    pub async fn snooze(&self, duration: Duration) -> Result<(), NodeError> {
        let until = apiary_ledger::unix_now() + duration.as_secs_f64();
        self.governor(GovernorCommand::Snooze(until)).await
    }

    /// Starts work by hand: ends a pause or snooze; the availability rules (in use, schedule) no
    /// longer stop it, the protection rules (battery, fullscreen, other GPU use) still do.
    pub async fn resume(&self) -> Result<(), NodeError> {
        self.governor(GovernorCommand::Resume).await
    }

    /// Finishes the work in flight, then pauses.
    pub async fn finish(&self) -> Result<(), NodeError> {
        self.governor(GovernorCommand::Finish).await
    }

    /// Cancels a start that is due because you are away (the status shows the `starting_soon`
    /// pause, "Starting in 10 s because you are away"), or stops work such a start began: work then
    /// waits until you are back at the PC and away again. Nothing happens when no such start is due.
    pub async fn cancel_start(&self) -> Result<(), NodeError> {
        self.governor(GovernorCommand::CancelAwayStart).await
    }

    /// Changes the mode (also the memory budget of later joins), written back to the config file.
    pub async fn set_mode(&self, mode: Mode) -> Result<(), NodeError> {
        self.governor(GovernorCommand::SetMode(mode)).await
    }

    /// Replaces the governor's settings, written back to the config file the node was loaded from.
    pub async fn set_policy(&self, policy: PolicyConfig) -> Result<(), NodeError> {
        self.governor(GovernorCommand::SetPolicy(Box::new(policy))).await
    }

    /// The `device` setting: where experts joined from now on compute.
    pub fn device(&self) -> DeviceSetting {
        DeviceSetting::of(self.config().device)
    }

    /// Changes where experts compute (`auto`, `cpu` or `cuda:N`), written back to the config file
    /// the node was loaded from. Applies to experts joined after the change; the governor's GPU rules
    /// watch the selected GPU from now on. `cuda:N` in a build without CUDA support is refused
    /// ([`NodeError::BadDevice`]); a GPU that cannot be opened fails at join time.
    pub async fn set_device(&self, device: DeviceChoice) -> Result<DeviceSetting, NodeError> {
        let device = device.check_supported().map_err(NodeError::BadDevice)?;
        self.governor(GovernorCommand::SetDevice(device)).await?;
        Ok(self.device())
    }

    async fn catalog(&self) -> DhtCatalog {
        match fetch(&self.inner.dht, unix_seconds()).await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!("cannot read the catalog from the DHT: {e}");
                DhtCatalog::default()
            }
        }
    }

    /// This computer (cores, RAM, free disk where the data lives) with every GPU the governor's NVML
    /// probe finds, in NVML index order (`gpus[i]` is the `device` setting `cuda:i`; empty without an
    /// NVIDIA driver): the first-run wizard's hardware check and the settings' device choice.
    pub async fn machine_profile(&self) -> MachineProfile {
        let mut profile = self.local().await;
        profile.gpus = self.gpus();
        profile
    }

    /// The GPUs the governor's latest sample lists.
    fn gpus(&self) -> Vec<GpuProfile> {
        let sample = self.inner.status.borrow().telemetry.clone();
        device::gpus(sample.as_deref())
    }

    async fn local(&self) -> MachineProfile {
        let dir = self.inner.data_dir.clone();
        match tokio::task::spawn_blocking(move || local_profile(&dir)).await {
            Ok(p) => p,
            Err(_) => local_profile(&self.inner.data_dir),
        }
    }

    /// This computer as join planning sees it: the GPUs are those the `device` setting allows (none
    /// for the CPU, GPU N alone for `cuda:N`).
    async fn machine(&self) -> apiary_catalog::MachineProfile {
        let mut profile = self.local().await;
        profile.gpus = device::for_planning(self.gpus(), self.config().device);
        profile
    }

    /// The experiments this node can join: the bundled catalog and what the DHT lists (a DHT listing
    /// replaces the bundled card of the same id), with volunteers, coverage and the fit for this
    /// computer in the current mode. A DHT that cannot be read lists the bundled catalog only.
    pub async fn experiments(&self) -> Result<Vec<Card>, NodeError> {
        let catalog = self.catalog().await;
        let machine = self.machine().await;
        Ok(cards(
            &bundled::bundled(),
            &catalog,
            &machine,
            self.config().planning_mode(),
        ))
    }

    /// One experiment in detail, with the plan joining it now would follow.
    pub async fn show(&self, id: &str, publisher: Option<&str>) -> Result<Preview, NodeError> {
        let catalog = self.catalog().await;
        let machine = self.machine().await;
        let mode = self.config().planning_mode();
        let all = cards(&bundled::bundled(), &catalog, &machine, mode);
        let listing = pick(&catalog, id, publisher)?;
        let card = match listing {
            Some(l) => {
                let fp = l.manifest().publisher_key().ok().map(|k| fingerprint(&k));
                all.into_iter().find(|c| c.id == id && c.fingerprint == fp)
            }
            None => all.into_iter().find(|c| c.id == id),
        }
        .ok_or_else(|| not_listed(id))?;
        let (plan, why_not) = match listing {
            Some(l) => {
                let coverage = Coverage::from_rosters(l.manifest(), l.rosters.iter().cloned());
                let tie = tie_break_of(&self.inner.p2p.local_peer_id().to_base58());
                match plan(
                    l.manifest(),
                    &coverage,
                    &machine,
                    mode,
                    self.config().max_experts,
                    tie,
                ) {
                    Ok(p) => (Some(p), None),
                    Err(e) => (None, Some(e.to_string())),
                }
            }
            None => (None, Some(not_listed(id).to_string())),
        };
        Ok(Preview { card, plan, why_not })
    }

    /// Joins `id`: reads the catalog, plans which experts to host from the rosters (uncovered first,
    /// within the hardware fit and `max_experts`), starts them (from their checkpoints when there
    /// are), declares them and announces them in the roster. Joined while the node is paused, the
    /// experiment starts paused. Recorded in `joined.json` (re-joined after a restart). Emits
    /// [`NodeEvent::Joined`].
    pub async fn join(&self, id: &str, options: JoinOptions) -> Result<JoinPlan, NodeError> {
        // in a task of its own: a caller that gives up does not leave a half-done join behind
        let node = self.clone();
        let id = id.to_owned();
        tokio::spawn(async move { node.join_inner(id, options).await })
            .await
            .map_err(|_| NodeError::Stopped)?
    }

    async fn join_inner(&self, id: String, options: JoinOptions) -> Result<JoinPlan, NodeError> {
        let reserve = id.clone();
        self.request(|reply| Command::Reserve { id: reserve, reply })
            .await??;
        match self.start_hosting(&id, &options).await {
            Ok((hosting, plan, publisher, device)) => {
                let record = JoinedRecord {
                    id: id.clone(),
                    publisher,
                    max_experts: options.max_experts,
                };
                let hosting = Box::new(hosting);
                self.request(|reply| Command::Adopt {
                    record,
                    hosting,
                    device,
                    reply,
                })
                .await?;
                Ok(plan)
            }
            Err(e) => {
                let _ = self.inner.tx.send(Command::Unreserve { id }).await;
                Err(e)
            }
        }
    }

    async fn start_hosting(
        &self,
        id: &str,
        options: &JoinOptions,
    ) -> Result<(Hosting, JoinPlan, Option<String>, apiary_ledger::Device), NodeError> {
        // a device this build cannot compute on is refused before anything else
        let choice = self.config().device;
        device::require_supported(choice)?;
        let catalog = self.catalog().await;
        let listing = pick(&catalog, id, options.publisher.as_deref())?.ok_or_else(|| not_listed(id))?;
        let manifest = listing.manifest().clone();
        let publisher =
            manifest
                .publisher_key()
                .map(|k| fingerprint(&k))
                .map_err(|e| NodeError::Manifest {
                    id: id.to_owned(),
                    reason: e.to_string(),
                })?;
        let machine = self.machine().await;
        let config = self.config();
        let coverage = Coverage::from_rosters(&manifest, listing.rosters.iter().cloned());
        let tie = tie_break_of(&self.inner.p2p.local_peer_id().to_base58());
        let max_experts = options.max_experts.or(config.max_experts);
        let plan = plan(
            &manifest,
            &coverage,
            &machine,
            config.planning_mode(),
            max_experts,
            tie,
        )
        .map_err(|source| NodeError::Plan {
            id: id.to_owned(),
            source,
        })?;
        // the device the experts compute on (opening a GPU may take a while: off the async workers)
        let found = self.gpus().len();
        let (device, counted_as) = tokio::task::spawn_blocking(move || device::open(choice, found))
            .await
            .map_err(|_| NodeError::DeviceUnavailable {
                device: choice,
                reason: "opening the device failed".to_owned(),
            })??;
        let period = config.update_period;
        let hosting_config = HostingConfig {
            update_period: period,
            expiration: (2 * period).max(Duration::from_secs(3)),
            checkpoint_dir: Some(self.inner.data_dir.join("checkpoints")),
            runtime: apiary_expert::RuntimeConfig {
                device,
                ..apiary_expert::RuntimeConfig::default()
            },
            ..HostingConfig::default()
        };
        let hosting = Hosting::start(
            &self.inner.dht,
            &self.inner.server,
            &manifest,
            plan.uids.clone(),
            &hosting_config,
        )
        .await
        .map_err(|source| match source {
            apiary_catalog::JoinError::AlreadyHosted(_) => NodeError::AlreadyJoined(id.to_owned()),
            source => NodeError::Join {
                id: id.to_owned(),
                source,
            },
        })?;
        Ok((hosting, plan, Some(publisher), counted_as))
    }

    /// Leaves `id`: the roster entry and the declarations are withdrawn first, in-flight work
    /// finishes, checkpoints are saved, the experts stop. Emits [`NodeEvent::Left`].
    pub async fn leave(&self, id: &str) -> Result<(), NodeError> {
        self.leave_because(id, "you left".into()).await
    }

    /// Leaves `id` as [`NodeHandle::leave`] does; the `Left` event carries `reason`.
    async fn leave_because(&self, id: &str, reason: String) -> Result<(), NodeError> {
        let node = self.clone();
        let id = id.to_owned();
        tokio::spawn(async move {
            let key = id.clone();
            let taken = node.request(|reply| Command::Take { id: key, reply }).await??;
            let manifest = ManifestRef::from(taken.hosting.manifest());
            let last = taken.hosting.leave().await;
            engine::record_work(
                &node.inner.ledger,
                &manifest,
                taken.device,
                &taken.recorded,
                &last,
                apiary_ledger::unix_now(),
            );
            node.emit(NodeEvent::Left { id, reason });
            Ok(())
        })
        .await
        .map_err(|_| NodeError::Stopped)?
    }

    /// The ledger's totals over `filter`.
    pub async fn contributions(&self, filter: Filter) -> Result<Totals, NodeError> {
        Ok(self.inner.ledger.totals(filter).await?)
    }

    /// The ledger's history over `filter`, per `bucket`.
    pub async fn history(&self, filter: Filter, bucket: Bucket) -> Result<Vec<Row>, NodeError> {
        Ok(self.inner.ledger.history(filter, bucket).await?)
    }

    /// The ledger as CSV.
    pub async fn export_csv(&self, filter: Filter, bucket: Bucket) -> Result<String, NodeError> {
        Ok(self.inner.ledger.export_csv(filter, bucket).await?)
    }

    /// Commits what the ledger holds in memory (returns after `COMMIT`).
    pub async fn flush_ledger(&self) -> Result<u64, NodeError> {
        Ok(self.inner.ledger.flush().await?)
    }

    /// Leaves every experiment cleanly (withdrawn, checkpointed; `joined.json` keeps them for the
    /// next start), then stops the governor, the ledger, the DHT and the host. Later calls on any
    /// clone fail with [`NodeError::Stopped`]; a second `shutdown` returns at once.
    pub async fn shutdown(&self) -> Result<(), NodeError> {
        let mut done = self.inner.done.lock().await;
        let Some(task) = done.take() else {
            return Ok(());
        };
        let _ = self.request(|reply| Command::Shutdown { reply }).await;
        let _ = task.await;
        Ok(())
    }
}

/// The one listing `id` names (and `publisher`, when several publishers use it).
fn pick<'a>(
    catalog: &'a DhtCatalog,
    id: &str,
    publisher: Option<&str>,
) -> Result<Option<&'a Listing>, NodeError> {
    catalog
        .pick(id, publisher)
        .map_err(|e| NodeError::AmbiguousPublisher {
            id: e.id,
            count: e.keys.len(),
            keys: e.keys.join(", "),
        })
}

fn not_listed(id: &str) -> NodeError {
    NodeError::NotListed(if id == bundled::LOCAL_DEMO_ID {
        format!(
            "`{id}` is the local demo: it can be joined only while `apiary demo` runs and this node \
             bootstraps from it"
        )
    } else {
        format!(
            "no experiment `{id}` in the catalog: it may have ended, its publisher may be offline, or \
             this node has no bootstrap peers"
        )
    })
}

fn unix_seconds() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The node's libp2p identity, `<data_dir>/identity.key` (libp2p's protobuf format): loaded, or made
/// (ed25519) and saved on the first start, so the peer id — how trainers and rosters know this
/// volunteer — survives restarts. An unreadable file is an error, never replaced.
fn identity(data_dir: &Path) -> Result<apiary_p2p::Keypair, NodeError> {
    let path = data_dir.join(IDENTITY_FILE);
    if path.exists() {
        return apiary_p2p::identity::load(&path).map_err(|source| NodeError::Identity { path, source });
    }
    let keypair = apiary_p2p::Keypair::generate_ed25519();
    apiary_p2p::identity::save(&keypair, &path).map_err(|source| NodeError::Identity {
        path: path.clone(),
        source,
    })?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600));
    }
    Ok(keypair)
}

/// The identity file's name in the data folder.
pub const IDENTITY_FILE: &str = "identity.key";
