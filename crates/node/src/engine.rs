//! The engine task: the one owner of the joined experiments, the governor handle and the node's
//! status. Commands arrive through a bounded channel with `oneshot` replies; directives through the
//! governor's `watch`.
//!
//! Slow work stays out of this task so directives are applied at once: the catalog read, planning
//! and [`Hosting::start`] of a join run in the caller's task (the engine only reserves the id and
//! adopts the started hosting), and [`Hosting::leave`] runs in the caller's task after the engine
//! hands the hosting over.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use apiary_catalog::{Hosting, Manifest};
use apiary_dht::DhtHandle;
use apiary_expert::server::ExpertServer;
use apiary_expert::{Gate, RuntimeStats};
use apiary_governor::{Directive, GovernorHandle, Mode, PolicyConfig, PolicyState, Sample};
use apiary_ledger::{Device, Event, LedgerHandle, Pass, estimate_flops, unix_now};
use apiary_p2p::{P2pHandle, Protocol};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot, watch};

use crate::config::{DeviceChoice, NodeConfig, write_atomic};
use crate::error::NodeError;
use crate::status::{Events, ExpertLoad, HostedStatus, NodeEvent, NodeStatus, RunState};

/// Capacity of the engine's command channel.
pub(crate) const COMMAND_CAPACITY: usize = 32;
/// How often the engine looks at the runtimes (drain progress, queued rows, status) while working.
const TICK: Duration = Duration::from_millis(100);
/// The same while paused with nothing in flight: an idle node wakes once a second, not ten times.
const IDLE_TICK: Duration = Duration::from_secs(1);
/// How often the ledger is fed and the routing table counted.
const FEED_PERIOD: Duration = Duration::from_secs(1);
/// The file listing the joined experiments, in the data folder.
pub(crate) const JOINED_FILE: &str = "joined.json";
/// The file keeping the governor's state (a snooze, a pause), in the data folder.
pub(crate) const POLICY_STATE_FILE: &str = "policy-state.json";

/// A joined experiment as `joined.json` records it (re-joined on the next start).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct JoinedRecord {
    /// The experiment's id.
    pub id: String,
    /// The publisher's key fingerprint.
    pub publisher: Option<String>,
    /// The join's `max_experts`.
    pub max_experts: Option<usize>,
}

/// A user command for the governor.
#[derive(Debug)]
pub(crate) enum GovernorCommand {
    Pause,
    Snooze(f64),
    Resume,
    Finish,
    CancelAwayStart,
    SetMode(Mode),
    SetPolicy(Box<PolicyConfig>),
    SetDevice(DeviceChoice),
}

/// What a `leave` gets back from the engine: the hosting to leave, and the counters already
/// recorded in the ledger.
#[derive(Debug)]
pub(crate) struct Taken {
    pub hosting: Hosting,
    pub recorded: RuntimeStats,
    /// Where its experts compute (for the ledger).
    pub device: Device,
}

/// Requests to the engine.
#[derive(Debug)]
pub(crate) enum Command {
    /// Marks `id` as being joined; fails if it is joined or being joined.
    Reserve {
        id: String,
        reply: oneshot::Sender<Result<(), NodeError>>,
    },
    /// Undoes `Reserve` after a failed join.
    Unreserve { id: String },
    /// Takes a started hosting into the map (paused at once if the node is paused).
    Adopt {
        record: JoinedRecord,
        hosting: Box<Hosting>,
        /// Where its experts compute (for the ledger).
        device: Device,
        reply: oneshot::Sender<()>,
    },
    /// Removes a hosting from the map and hands it over for leaving.
    Take {
        id: String,
        reply: oneshot::Sender<Result<Taken, NodeError>>,
    },
    /// Forwards a user command to the governor (and settings to the config file).
    Governor {
        command: GovernorCommand,
        reply: oneshot::Sender<Result<(), NodeError>>,
    },
    /// The manifests of the joined experiments.
    Manifests { reply: oneshot::Sender<Vec<Manifest>> },
    /// Leaves everything and stops.
    Shutdown { reply: oneshot::Sender<()> },
}

/// One joined experiment.
struct Joined {
    hosting: Hosting,
    record: JoinedRecord,
    /// The counters last recorded in the ledger.
    recorded: RuntimeStats,
    /// Whether `Hosting::pause` is in effect (declarations withdrawn).
    withdrawn: bool,
    /// Where the experts compute (for the ledger).
    device: Device,
    /// Each expert's rates over the last load period (the feed period), by uid.
    rates: BTreeMap<String, Rate>,
    /// When the current load period started (the last feed, or the adoption).
    rates_since: Instant,
}

/// One expert's load over a period.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub(crate) struct Rate {
    /// The share of the period spent computing, 0–1.
    pub busy_fraction: f64,
    /// Forward and backward batches per second.
    pub requests_per_s: f64,
}

/// Each expert's load between two snapshots `seconds` apart: the busy time's share of the period
/// (clamped to 0–1: a batch is counted when it ends, so a long one may exceed its period) and the
/// batches per second. An expert missing from `before` counts from zero; a period of no length
/// gives zeros.
pub(crate) fn rates(before: &RuntimeStats, now: &RuntimeStats, seconds: f64) -> BTreeMap<String, Rate> {
    let zero = apiary_expert::ExpertStats::default();
    now.experts
        .iter()
        .map(|e| {
            let p = before.experts.iter().find(|p| p.uid == e.uid).unwrap_or(&zero);
            let rate = if seconds.is_finite() && seconds > 0.0 {
                let busy = e.busy.saturating_sub(p.busy).as_secs_f64();
                let batches = e.forward_batches.saturating_sub(p.forward_batches)
                    + e.backward_batches.saturating_sub(p.backward_batches);
                Rate {
                    busy_fraction: (busy / seconds).clamp(0.0, 1.0),
                    requests_per_s: batches as f64 / seconds,
                }
            } else {
                Rate::default()
            };
            (e.uid.clone(), rate)
        })
        .collect()
}

/// Everything the engine owns.
pub(crate) struct Engine {
    pub rx: mpsc::Receiver<Command>,
    pub governor: GovernorHandle,
    pub ledger: LedgerHandle,
    pub dht: DhtHandle,
    pub p2p: P2pHandle,
    pub status: watch::Sender<NodeStatus>,
    pub events: Arc<Events>,
    pub config: watch::Sender<NodeConfig>,
    pub config_path: Option<PathBuf>,
    pub data_dir: PathBuf,
}

struct State {
    joined: BTreeMap<String, Joined>,
    reserved: BTreeSet<String>,
    directive: Directive,
    last_in_flight: Option<u32>,
    peers: usize,
    last_feed: Instant,
}

impl Engine {
    /// Runs until `Shutdown` (or until every handle is dropped, which shuts down the same way).
    pub async fn run(mut self) {
        let mut directives = self.governor.directive();
        let mut states = self.governor.state();
        let samples = self.governor.sample();
        let mut st = State {
            joined: BTreeMap::new(),
            reserved: BTreeSet::new(),
            directive: directives.borrow().clone(),
            last_in_flight: None,
            peers: 0,
            last_feed: Instant::now(),
        };
        let tick = tokio::time::sleep(TICK);
        tokio::pin!(tick);
        let mut next_feed = Instant::now() + FEED_PERIOD;
        let mut directives_open = true;
        let mut states_open = true;
        self.publish(&st, &samples);
        let shutdown_reply = loop {
            tokio::select! {
                biased;
                changed = directives.changed(), if directives_open => {
                    if changed.is_err() {
                        directives_open = false;
                        continue;
                    }
                    let d = directives.borrow_and_update().clone();
                    self.apply(&mut st, d, &samples).await;
                }
                command = self.rx.recv() => match command {
                    None => break None,
                    Some(Command::Shutdown { reply }) => break Some(reply),
                    Some(c) => self.command(&mut st, c, &samples).await,
                },
                changed = states.changed(), if states_open => {
                    if changed.is_err() {
                        states_open = false;
                        continue;
                    }
                    let s = *states.borrow_and_update();
                    self.persist_state(s);
                }
                () = &mut tick => {
                    if Instant::now() >= next_feed {
                        next_feed = Instant::now() + FEED_PERIOD;
                        self.feed(&mut st);
                        st.peers = match tokio::time::timeout(
                            Duration::from_millis(500),
                            self.dht.routing_table_len(),
                        ).await {
                            Ok(Ok(n)) => n,
                            _ => st.peers,
                        };
                    }
                    self.report_in_flight(&mut st);
                    self.publish(&st, &samples);
                    let idle = RunState::of(&st.directive) == RunState::Paused && st.last_in_flight == Some(0);
                    tick.as_mut().reset(tokio::time::Instant::now() + if idle { IDLE_TICK } else { TICK });
                }
            }
        };
        self.stop(st).await;
        if let Some(reply) = shutdown_reply {
            let _ = reply.send(());
        }
    }

    fn emit(&self, event: NodeEvent) {
        self.events.emit(event);
    }

    /// Applies a directive: the gates first (no awaits, so compute stops at once), then the
    /// declarations.
    async fn apply(&self, st: &mut State, d: Directive, samples: &watch::Receiver<Option<Arc<Sample>>>) {
        let before = RunState::of(&st.directive);
        let after = RunState::of(&d);
        st.directive = d.clone();
        // the gates now, the status now, the DHT after
        for j in st.joined.values() {
            j.hosting.set_gate(gate_for(&d));
        }
        self.publish(st, samples);
        if before.is_working() && !after.is_working() {
            self.emit(NodeEvent::Paused {
                reason: d.reason().to_owned(),
            });
        } else if !before.is_working() && after.is_working() {
            self.emit(NodeEvent::Resumed {
                reason: d.reason().to_owned(),
            });
        }
        self.settle(st).await;
        self.report_in_flight(st);
        self.publish(st, samples);
    }

    /// Brings every hosting's declarations in line with the directive.
    async fn settle(&self, st: &mut State) {
        let d = st.directive.clone();
        let withdraw = !RunState::of(&d).is_working();
        for j in st.joined.values_mut() {
            if withdraw && !j.withdrawn {
                j.hosting.pause().await;
                j.withdrawn = true;
            } else if !withdraw && j.withdrawn {
                j.hosting.resume(gate_for(&d)).await;
                j.withdrawn = false;
            }
        }
    }

    async fn command(
        &mut self,
        st: &mut State,
        command: Command,
        samples: &watch::Receiver<Option<Arc<Sample>>>,
    ) {
        match command {
            Command::Reserve { id, reply } => {
                let result = if st.joined.contains_key(&id) || !st.reserved.insert(id.clone()) {
                    Err(NodeError::AlreadyJoined(id))
                } else {
                    Ok(())
                };
                let _ = reply.send(result);
            }
            Command::Unreserve { id } => {
                st.reserved.remove(&id);
            }
            Command::Adopt {
                record,
                hosting,
                device,
                reply,
            } => {
                st.reserved.remove(&record.id);
                let id = record.id.clone();
                let uids = hosting.uids().to_vec();
                hosting.set_gate(gate_for(&st.directive));
                let recorded = zeroed(&hosting.stats());
                st.joined.insert(
                    id.clone(),
                    Joined {
                        hosting: *hosting,
                        record,
                        recorded,
                        withdrawn: false,
                        device,
                        rates: BTreeMap::new(),
                        rates_since: Instant::now(),
                    },
                );
                self.settle(st).await;
                self.save_joined(st);
                self.publish(st, samples);
                self.emit(NodeEvent::Joined { id, uids });
                let _ = reply.send(());
            }
            Command::Take { id, reply } => {
                let result = match st.joined.remove(&id) {
                    Some(mut j) => {
                        let now = j.hosting.stats();
                        record_work(
                            &self.ledger,
                            &j.hosting.manifest().into(),
                            j.device,
                            &j.recorded,
                            &now,
                            unix_now(),
                        );
                        j.recorded = now;
                        self.save_joined(st);
                        self.publish(st, samples);
                        Ok(Taken {
                            hosting: j.hosting,
                            recorded: j.recorded,
                            device: j.device,
                        })
                    }
                    None => Err(NodeError::NotJoined(id)),
                };
                let _ = reply.send(result);
            }
            Command::Manifests { reply } => {
                let _ = reply.send(st.joined.values().map(|j| j.hosting.manifest().clone()).collect());
            }
            Command::Governor { command, reply } => {
                let _ = reply.send(self.governor_command(command));
            }
            Command::Shutdown { reply } => {
                // handled by the loop
                let _ = reply.send(());
            }
        }
    }

    fn governor_command(&self, command: GovernorCommand) -> Result<(), NodeError> {
        let g = &self.governor;
        match command {
            GovernorCommand::Pause => g.pause()?,
            GovernorCommand::Snooze(until) => g.snooze(until)?,
            GovernorCommand::Resume => g.resume_manual(None)?,
            GovernorCommand::Finish => g.finish_then_pause()?,
            GovernorCommand::CancelAwayStart => g.cancel_away_start()?,
            GovernorCommand::SetMode(mode) => {
                g.set_mode(mode)?;
                self.config.send_modify(|c| c.policy.mode = mode);
                self.save_config(|file, now| file.policy = now.policy.clone())?;
            }
            GovernorCommand::SetPolicy(policy) => {
                g.set_config((*policy).clone())?;
                self.config.send_modify(|c| c.policy = *policy);
                self.save_config(|file, now| file.policy = now.policy.clone())?;
            }
            GovernorCommand::SetDevice(device) => {
                // the GPU rules watch the GPU the next experts compute on
                g.set_gpu(device.gpu())?;
                self.config.send_modify(|c| c.device = device);
                self.save_config(|file, now| file.device = now.device)?;
            }
        }
        Ok(())
    }

    /// Writes what `copy` copies from the settings in effect into the settings file (when the node
    /// has one). Only what the handle changes (the policy, the device) goes into the file: the rest of
    /// the node's settings may be overrides of this run (command-line flags).
    fn save_config(&self, copy: impl FnOnce(&mut NodeConfig, &NodeConfig)) -> Result<(), NodeError> {
        if let Some(path) = &self.config_path {
            let mut file = NodeConfig::load(path)?;
            copy(&mut file, &self.config.borrow());
            file.save(path)?;
        }
        Ok(())
    }

    fn persist_state(&self, state: PolicyState) {
        let path = self.data_dir.join(POLICY_STATE_FILE);
        let result = serde_json::to_vec_pretty(&state)
            .map_err(std::io::Error::other)
            .and_then(|bytes| write_atomic(&path, &bytes));
        if let Err(e) = result {
            tracing::warn!(path = %path.display(), "cannot save the policy state: {e}");
            self.emit(NodeEvent::Error {
                message: format!("cannot save {}: {e}", path.display()),
            });
        }
    }

    fn save_joined(&self, st: &State) {
        let path = self.data_dir.join(JOINED_FILE);
        let records: Vec<&JoinedRecord> = st.joined.values().map(|j| &j.record).collect();
        let result = serde_json::to_vec_pretty(&records)
            .map_err(std::io::Error::other)
            .and_then(|bytes| write_atomic(&path, &bytes));
        if let Err(e) = result {
            tracing::warn!(path = %path.display(), "cannot save the joined experiments: {e}");
        }
    }

    /// Work items in flight: queued rows, plus one per runtime whose last stop still waits for its
    /// running batch. Reported while draining, and whenever it changes.
    fn report_in_flight(&self, st: &mut State) {
        let mut n = 0usize;
        for j in st.joined.values() {
            let s = j.hosting.stats();
            n += s.queued_rows;
            if s.gate == Gate::Stop && s.last_stop_latency.is_none() {
                n += 1;
            }
        }
        let n = u32::try_from(n).unwrap_or(u32::MAX);
        let draining = matches!(st.directive, Directive::Drain { .. });
        if draining || st.last_in_flight != Some(n) {
            match self.governor.report_in_flight(n) {
                Ok(()) => st.last_in_flight = Some(n),
                Err(e) => tracing::debug!("cannot report in-flight work: {e}"),
            }
        }
    }

    /// Records the work since the last feed in the ledger, and the uptime while working.
    fn feed(&self, st: &mut State) {
        let now = unix_now();
        let seconds = st
            .last_feed
            .elapsed()
            .as_secs_f64()
            .min(apiary_ledger::MAX_INTERVAL_SECONDS);
        st.last_feed = Instant::now();
        let working = RunState::of(&st.directive).is_working();
        if working && seconds > 0.0 {
            self.record(Event::Uptime {
                at: now,
                experiment: None,
                seconds,
            });
        }
        for (id, j) in &mut st.joined {
            let stats = j.hosting.stats();
            record_work(
                &self.ledger,
                &j.hosting.manifest().into(),
                j.device,
                &j.recorded,
                &stats,
                now,
            );
            j.rates = rates(&j.recorded, &stats, j.rates_since.elapsed().as_secs_f64());
            j.rates_since = Instant::now();
            j.recorded = stats;
            if working && !j.withdrawn && seconds > 0.0 {
                self.record(Event::Uptime {
                    at: now,
                    experiment: Some(id.clone()),
                    seconds,
                });
            }
        }
    }

    fn record(&self, event: Event) {
        if let Err(e) = self.ledger.record(event) {
            tracing::warn!("ledger: {e}");
        }
    }

    fn publish(&self, st: &State, samples: &watch::Receiver<Option<Arc<Sample>>>) {
        let experiments = st.joined.iter().map(|(id, j)| hosted(id, j)).collect();
        let peer_id = self.p2p.local_peer_id();
        let maddrs = self
            .p2p
            .listen_addrs()
            .borrow()
            .iter()
            .map(|a| a.clone().with(Protocol::P2p(peer_id)).to_string())
            .collect();
        let d = &st.directive;
        let status = NodeStatus {
            state: RunState::of(d),
            reason: d.reason().to_owned(),
            until: d.until(),
            directive: d.clone(),
            mode: self.config.borrow().policy.mode,
            experiments,
            peer_id: peer_id.to_base58(),
            maddrs,
            peers: st.peers,
            reachability: (*self.p2p.reachability().borrow()).into(),
            network: (&*self.p2p.connectivity().borrow()).into(),
            telemetry: samples.borrow().clone(),
        };
        self.status.send_if_modified(|s| {
            if *s == status {
                false
            } else {
                *s = status;
                true
            }
        });
    }

    /// Leaves every experiment (withdrawn, checkpointed), then stops the governor, the ledger, the
    /// DHT and the host. `joined.json` keeps the experiments, so the next start re-joins them.
    async fn stop(self, mut st: State) {
        self.feed(&mut st);
        for (_, j) in std::mem::take(&mut st.joined) {
            let manifest = ManifestRef::from(j.hosting.manifest());
            let last = j.hosting.leave().await;
            record_work(&self.ledger, &manifest, j.device, &j.recorded, &last, unix_now());
        }
        let state = *self.governor.state().borrow();
        self.persist_state(state);
        let governor = self.governor;
        match tokio::task::spawn_blocking(move || governor.shutdown()).await {
            Ok(Err(e)) => tracing::warn!("governor: {e}"),
            Err(e) => tracing::warn!("governor shutdown task: {e}"),
            Ok(Ok(())) => {}
        }
        if let Err(e) = self.ledger.close().await {
            tracing::warn!("ledger: {e}");
        }
        ExpertServer::unregister(&self.p2p);
        self.dht.shutdown().await;
        self.p2p.shutdown().await;
        tracing::info!("node stopped");
    }
}

/// The gate a directive sets: `Run` at full level, `Pace` below it, `Stop` for `Drain`, `Paused`
/// and a `Pace` of duty 0 (weights stay loaded, nothing is computed).
pub(crate) fn gate_for(d: &Directive) -> Gate {
    match d {
        Directive::Run { level, .. } if *level >= 0.999 => Gate::Run,
        Directive::Run { level: duty, .. } | Directive::Pace { duty, .. } => {
            if *duty > 0.0 {
                Gate::Pace { duty: *duty }
            } else {
                Gate::Stop
            }
        }
        Directive::Drain { .. } | Directive::Paused { .. } => Gate::Stop,
    }
}

fn hosted(id: &str, j: &Joined) -> HostedStatus {
    let s = j.hosting.stats();
    let m = j.hosting.manifest();
    HostedStatus {
        id: id.to_owned(),
        title: m.title.clone(),
        publisher: j.record.publisher.clone(),
        uids: j.hosting.uids().to_vec(),
        forward_samples: s.experts.iter().map(|e| e.forward_rows).sum(),
        backward_samples: s.experts.iter().map(|e| e.backward_rows).sum(),
        optimizer_steps: s.experts.iter().map(|e| e.optimizer_steps).sum(),
        queued_rows: s.queued_rows,
        accepting: s.gate != Gate::Stop,
        withdrawn: j.withdrawn,
        experts: s
            .experts
            .iter()
            .map(|e| {
                let rate = j.rates.get(&e.uid).copied().unwrap_or_default();
                ExpertLoad {
                    uid: e.uid.clone(),
                    forward_rows: e.forward_rows,
                    backward_rows: e.backward_rows,
                    optimizer_steps: e.optimizer_steps,
                    queued_rows: e.queued_forward_rows + e.queued_backward_rows,
                    busy_fraction: rate.busy_fraction,
                    requests_per_s: rate.requests_per_s,
                }
            })
            .collect(),
    }
}

/// The counters a fresh hosting starts from: zero work, but the optimizer steps restored from a
/// checkpoint (not this node's work in this run).
fn zeroed(stats: &RuntimeStats) -> RuntimeStats {
    let mut s = stats.clone();
    for e in &mut s.experts {
        let steps = e.optimizer_steps;
        *e = apiary_expert::ExpertStats {
            uid: e.uid.clone(),
            optimizer_steps: steps,
            ..Default::default()
        };
    }
    s
}

/// Records the difference between two snapshots of one hosting as `Event::Work`, per uid and pass:
/// calls = batches, samples = rows, optimizer steps (on backward), compute seconds = the busy time
/// split between the passes by rows (wall seconds of the runtime thread: a lower bound of the
/// core-seconds), flops by [`estimate_flops`].
pub(crate) fn record_work(
    ledger: &LedgerHandle,
    manifest: &ManifestRef,
    device: Device,
    before: &RuntimeStats,
    now: &RuntimeStats,
    at: f64,
) {
    for e in &now.experts {
        let zero = apiary_expert::ExpertStats::default();
        let p = before.experts.iter().find(|p| p.uid == e.uid).unwrap_or(&zero);
        let f_calls = e.forward_batches.saturating_sub(p.forward_batches);
        let f_rows = e.forward_rows.saturating_sub(p.forward_rows);
        let b_calls = e.backward_batches.saturating_sub(p.backward_batches);
        let b_rows = e.backward_rows.saturating_sub(p.backward_rows);
        let steps = e.optimizer_steps.saturating_sub(p.optimizer_steps);
        let errors = e.failed_batches.saturating_sub(p.failed_batches);
        let busy = e.busy.saturating_sub(p.busy).as_secs_f64();
        let rows = f_rows + b_rows;
        let f_share = if rows > 0 {
            f_rows as f64 / rows as f64
        } else if b_calls > 0 {
            0.0
        } else {
            1.0
        };
        let (experiment, kind, hidden) = (&manifest.id, &manifest.kind, manifest.hidden);
        let work = |pass, calls, samples, optimizer_steps, compute_seconds: f64, errors| {
            let event = Event::Work {
                at,
                experiment: experiment.clone(),
                uid: e.uid.clone(),
                pass,
                device,
                calls,
                samples,
                optimizer_steps,
                compute_seconds,
                flops: estimate_flops(kind, hidden, samples, pass),
                bytes_in: 0,
                bytes_out: 0,
                errors,
            };
            if let Err(err) = ledger.record(event) {
                tracing::warn!("ledger: {err}");
            }
        };
        if f_calls > 0 || f_rows > 0 || errors > 0 || (busy > 0.0 && f_share > 0.0) {
            work(Pass::Forward, f_calls, f_rows, 0, busy * f_share, errors);
        }
        if b_calls > 0 || b_rows > 0 || steps > 0 {
            work(Pass::Backward, b_calls, b_rows, steps, busy * (1.0 - f_share), 0);
        }
    }
}

/// What the ledger feed needs of a manifest.
#[derive(Debug, Clone)]
pub(crate) struct ManifestRef {
    pub id: String,
    pub kind: String,
    pub hidden: usize,
}

impl From<&Manifest> for ManifestRef {
    fn from(m: &Manifest) -> Self {
        ManifestRef {
            id: m.id.clone(),
            kind: m.expert.kind.clone(),
            hidden: m.expert.hidden_dim,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats(uid: &str, fwd: u64, bwd: u64, busy_ms: u64) -> apiary_expert::ExpertStats {
        apiary_expert::ExpertStats {
            uid: uid.to_owned(),
            forward_batches: fwd,
            backward_batches: bwd,
            busy: Duration::from_millis(busy_ms),
            ..Default::default()
        }
    }

    fn runtime(experts: Vec<apiary_expert::ExpertStats>) -> RuntimeStats {
        RuntimeStats {
            experts,
            queued_rows: 0,
            gate: Gate::Run,
            last_stop_latency: None,
            stopped: false,
        }
    }

    #[test]
    fn rates_are_deltas_over_the_period_and_busy_stays_within_0_and_1() {
        let before = runtime(vec![stats("a", 10, 5, 100), stats("b", 0, 0, 0)]);
        let now = runtime(vec![
            stats("a", 14, 7, 600),
            stats("b", 1, 0, 5_000),
            stats("c", 2, 0, 250),
        ]);
        let r = rates(&before, &now, 2.0);
        assert_eq!(r["a"].requests_per_s, 3.0);
        assert!((r["a"].busy_fraction - 0.25).abs() < 1e-9);
        // a batch counted at its end may exceed the period: clamped
        assert_eq!(r["b"].busy_fraction, 1.0);
        // a new expert counts from zero
        assert_eq!(r["c"].requests_per_s, 1.0);
        assert!((r["c"].busy_fraction - 0.125).abs() < 1e-9);
        // counters that went back (a restart) and an empty period give zeros, never negatives or NaN
        let r = rates(&now, &before, 1.0);
        assert_eq!(r["a"], Rate::default());
        let r = rates(&before, &now, 0.0);
        assert!(r.values().all(|v| *v == Rate::default()));
    }
}
