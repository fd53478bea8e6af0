//! What the node tells its UI: [`NodeStatus`] (a `watch`) and [`NodeEvent`]s (a `broadcast`).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use apiary_governor::{Directive, Sample};
use serde::{Serialize, Serializer};
use tokio::sync::broadcast;

/// What the node is doing, in one word.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RunState {
    /// Computing (the governor's `Run`, at its level).
    Running,
    /// Computing at a reduced duty cycle (the governor's `Pace`: the temperature controller).
    Throttled,
    /// Finishing in-flight work, starting nothing new (the governor's `Drain`).
    Draining,
    /// Not computing; declarations withdrawn (the governor's `Paused`).
    Paused,
}

impl RunState {
    /// The state a directive puts the node in.
    pub fn of(directive: &Directive) -> Self {
        match directive {
            Directive::Run { .. } => RunState::Running,
            Directive::Pace { .. } => RunState::Throttled,
            Directive::Drain { .. } => RunState::Draining,
            Directive::Paused { .. } => RunState::Paused,
        }
    }

    /// Whether experts compute in this state.
    pub fn is_working(self) -> bool {
        matches!(self, RunState::Running | RunState::Throttled)
    }
}

/// One joined experiment, as the status shows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct HostedStatus {
    /// The experiment's id.
    pub id: String,
    /// Its title.
    pub title: String,
    /// The publisher's key fingerprint.
    pub publisher: Option<String>,
    /// The hosted experts' uids.
    pub uids: Vec<String>,
    /// Forward rows computed since joined (this run of the node).
    pub forward_samples: u64,
    /// Backward rows computed since joined.
    pub backward_samples: u64,
    /// Optimizer steps the experts have taken (including those restored from checkpoints).
    pub optimizer_steps: u64,
    /// Rows waiting in the runtime's queues now.
    pub queued_rows: usize,
    /// Whether the runtime accepts new work (its gate is not `Stop`).
    pub accepting: bool,
    /// Whether the declarations and the roster entry are withdrawn (paused).
    pub withdrawn: bool,
    /// Each hosted expert's counters and load, in the order of `uids`.
    pub experts: Vec<ExpertLoad>,
}

/// One hosted expert's work and load, as the status shows it. The counters are read at every
/// status update; the rates (`busy_fraction`, `requests_per_s`) cover the last load period (about
/// a second: the ledger feed's period) and are 0 until one has passed.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ExpertLoad {
    /// The expert's uid.
    pub uid: String,
    /// Forward rows computed since joined (this run of the node).
    pub forward_rows: u64,
    /// Backward rows computed since joined.
    pub backward_rows: u64,
    /// Optimizer steps the expert has taken (including those restored from its checkpoint).
    pub optimizer_steps: u64,
    /// Rows waiting in the expert's forward and backward queues now.
    pub queued_rows: usize,
    /// The share of the last load period's wall time spent computing this expert's batches, 0–1
    /// (the experts of one experiment share a compute thread, so their sum is at most about 1).
    pub busy_fraction: f64,
    /// Forward and backward batches computed per second over the last load period.
    pub requests_per_s: f64,
}

/// The node's state for the UI (serializable as JSON for the app and the daemon's API).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct NodeStatus {
    /// What the node does.
    pub state: RunState,
    /// Why, in words (the governor's reason).
    pub reason: String,
    /// When this is expected to change on its own (unix seconds), if known.
    pub until: Option<f64>,
    /// The governor's directive in full.
    pub directive: Directive,
    /// The mode in effect (the settings' `policy.mode`), so that every UI follows a change made
    /// elsewhere (the tray, `apiary node mode`).
    pub mode: apiary_governor::Mode,
    /// The joined experiments.
    pub experiments: Vec<HostedStatus>,
    /// This node's peer id (base58).
    pub peer_id: String,
    /// Its listening multiaddrs, with `/p2p/`.
    pub maddrs: Vec<String>,
    /// DHT peers in the routing table.
    pub peers: usize,
    /// Whether other peers can dial this node, as AutoNAT finds it through its peers.
    pub reachability: Reachability,
    /// How peers reach this node (direct, relayed, unreachable), why, and the round trip.
    pub network: NetworkStatus,
    /// The governor's latest readings.
    #[serde(serialize_with = "serialize_sample")]
    pub telemetry: Option<Arc<Sample>>,
}

fn serialize_sample<S: Serializer>(sample: &Option<Arc<Sample>>, s: S) -> Result<S::Ok, S::Error> {
    sample.as_deref().serialize(s)
}

/// Something that happened, for notifications and logs.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum NodeEvent {
    /// An experiment was joined.
    Joined {
        /// The experiment's id.
        id: String,
        /// The hosted uids.
        uids: Vec<String>,
    },
    /// An experiment was left.
    Left {
        /// The experiment's id.
        id: String,
        /// Why.
        reason: String,
    },
    /// Work stopped (paused or draining).
    Paused {
        /// Why, in words.
        reason: String,
    },
    /// Work started again.
    Resumed {
        /// Why, in words.
        reason: String,
    },
    /// Something failed in the background.
    Error {
        /// What, in words.
        message: String,
    },
    /// Something worth telling the user.
    Notice {
        /// What, in words.
        message: String,
    },
}

/// Whether other peers can reach this node directly.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Reachability {
    /// Not known yet (AutoNAT asks peers that offer the service, from 15 s after start).
    Unknown,
    /// Peers dialed this node back: it is reachable directly.
    Public,
    /// Peers could not dial it back: behind NAT or a firewall (it can still call out and serve
    /// on connections it opened).
    Private,
}

impl From<apiary_p2p::Reachability> for Reachability {
    fn from(r: apiary_p2p::Reachability) -> Self {
        match r {
            apiary_p2p::Reachability::Unknown => Reachability::Unknown,
            apiary_p2p::Reachability::Public => Reachability::Public,
            apiary_p2p::Reachability::Private => Reachability::Private,
        }
    }
}

/// How peers reach this node, for people: [`apiary_p2p::Connectivity`] in the status's terms.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct NetworkStatus {
    /// AutoNAT's finding, or the forced setting.
    pub reachability: Reachability,
    /// Whether `reachability` was set by hand (`network.force_reachability`).
    pub forced: bool,
    /// `checking`, `direct`, `relayed`, `unreachable` or `offline`.
    pub path: NetPath,
    /// Why, in words.
    pub reason: String,
    /// The round trip that matters for the path, in milliseconds: to the nearest relay when relayed,
    /// else the median to connected peers; none before the first ping.
    pub rtt_ms: Option<f64>,
    /// The relays holding a reservation for this node.
    pub relays: Vec<RelayInfo>,
    /// The node's `/p2p-circuit` addresses (what trainers dial through the relays).
    pub relayed_addrs: Vec<String>,
    /// Its addresses as peers see them.
    pub observed_addrs: Vec<String>,
    /// The address a UPnP gateway mapped, if any.
    pub port_mapping: Option<String>,
    /// Open connections by kind.
    pub connections: ConnectionCounts,
    /// Relayed connections upgraded to direct ones by hole punching, and failed tries, since start.
    pub hole_punches: HolePunchCounts,
}

/// How peers get to the node, in one word.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum NetPath {
    /// Not known yet.
    Checking,
    /// Peers dial it directly.
    Direct,
    /// Through a relay.
    Relayed,
    /// Peers cannot call in.
    Unreachable,
    /// No peer connected.
    Offline,
}

/// A relay holding a reservation for the node.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RelayInfo {
    /// The relay's peer id (base58).
    pub peer_id: String,
    /// The latest round trip to it, in milliseconds.
    pub rtt_ms: Option<f64>,
}

/// Open connections by kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct ConnectionCounts {
    /// Direct ones.
    pub direct: usize,
    /// Through relays.
    pub relayed: usize,
}

/// Hole punching since start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct HolePunchCounts {
    /// Relayed connections made direct.
    pub succeeded: u64,
    /// Failed tries.
    pub failed: u64,
}

fn ms(d: std::time::Duration) -> f64 {
    (d.as_secs_f64() * 1e4).round() / 10.0
}

impl Default for NetworkStatus {
    /// A node that has not started its network: offline, nothing known.
    fn default() -> Self {
        (&apiary_p2p::Connectivity::default()).into()
    }
}

impl From<&apiary_p2p::Connectivity> for NetworkStatus {
    fn from(c: &apiary_p2p::Connectivity) -> Self {
        let strings = |addrs: &[apiary_p2p::Multiaddr]| addrs.iter().map(ToString::to_string).collect();
        NetworkStatus {
            reachability: c.reachability.into(),
            forced: c.forced,
            path: match c.path() {
                apiary_p2p::NetPath::Checking => NetPath::Checking,
                apiary_p2p::NetPath::Direct => NetPath::Direct,
                apiary_p2p::NetPath::Relayed => NetPath::Relayed,
                apiary_p2p::NetPath::Unreachable => NetPath::Unreachable,
                apiary_p2p::NetPath::Offline => NetPath::Offline,
            },
            reason: c.reason(),
            rtt_ms: c.rtt().map(ms),
            relays: c
                .relays
                .iter()
                .map(|r| RelayInfo {
                    peer_id: r.peer.to_base58(),
                    rtt_ms: r.rtt.map(ms),
                })
                .collect(),
            relayed_addrs: strings(&c.relayed_addrs),
            observed_addrs: strings(&c.observed_addrs),
            port_mapping: c.port_mapping.as_ref().map(ToString::to_string),
            connections: ConnectionCounts {
                direct: c.direct_connections,
                relayed: c.relayed_connections,
            },
            hole_punches: HolePunchCounts {
                succeeded: c.hole_punches.succeeded,
                failed: c.hole_punches.failed,
            },
        }
    }
}

/// An event as the node's log keeps it: when (unix seconds) and what.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LoggedEvent {
    /// When it happened (unix seconds).
    pub at: f64,
    /// What happened.
    #[serde(flatten)]
    pub event: NodeEvent,
}

/// The node's events: broadcast to whoever listens now, and the last [`Events::LOG_CAPACITY`] kept for
/// whoever asks later (the app's activity list, `GET /api/log`).
#[derive(Debug)]
pub(crate) struct Events {
    tx: broadcast::Sender<NodeEvent>,
    log: Mutex<VecDeque<LoggedEvent>>,
}

impl Events {
    /// How many events the log keeps.
    pub const LOG_CAPACITY: usize = 500;

    pub fn new(capacity: usize) -> Self {
        Events {
            tx: broadcast::channel(capacity).0,
            log: Mutex::new(VecDeque::with_capacity(Self::LOG_CAPACITY)),
        }
    }

    pub fn emit(&self, event: NodeEvent) {
        {
            let mut log = self.log.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            if log.len() == Self::LOG_CAPACITY {
                log.pop_front();
            }
            log.push_back(LoggedEvent {
                at: apiary_ledger::unix_now(),
                event: event.clone(),
            });
        }
        let _ = self.tx.send(event);
    }

    pub fn subscribe(&self) -> broadcast::Receiver<NodeEvent> {
        self.tx.subscribe()
    }

    /// The logged events, oldest first.
    pub fn recent(&self) -> Vec<LoggedEvent> {
        let log = self.log.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        log.iter().cloned().collect()
    }
}
