//! [`NodeError`].

use crate::config::ConfigError;

/// Why a node operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NodeError {
    /// The settings could not be read or written.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A file in the data folder could not be read or written.
    #[error("cannot {what} {}: {source}", path.display())]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file or folder.
        path: std::path::PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A multiaddr in the settings does not parse.
    #[error("`{addr}` in {field} is not a multiaddr: {reason}")]
    BadAddress {
        /// `listen_maddrs` or `initial_peers`.
        field: &'static str,
        /// The text.
        addr: String,
        /// The parser's message.
        reason: String,
    },
    /// The `network` settings are invalid (an address, a trusted relay without `/p2p/`).
    #[error("network settings: {0}")]
    Network(String),
    /// The p2p host failed.
    #[error("p2p host: {0}")]
    P2p(#[from] apiary_p2p::HostError),
    /// The node's identity file exists but cannot be read; it is never replaced silently (its peer id is
    /// how the swarm knows this volunteer).
    #[error("the node's identity {path} is unreadable ({source}); move it away to start with a new identity")]
    Identity {
        /// The file.
        path: std::path::PathBuf,
        /// Why.
        #[source]
        source: apiary_p2p::identity::IdentityError,
    },
    /// The expert RPCs could not be registered.
    #[error("registering the expert RPCs: {0}")]
    Register(#[from] apiary_p2p::InvalidName),
    /// The DHT failed.
    #[error("DHT: {0}")]
    Dht(#[from] apiary_dht::DhtError),
    /// The record-signing key could not be made.
    #[error("record validator key: {0}")]
    Key(#[from] apiary_wire::signature::KeyError),
    /// The ledger failed.
    #[error("ledger: {0}")]
    Ledger(#[from] apiary_ledger::LedgerError),
    /// The governor failed.
    #[error("governor: {0}")]
    Governor(#[from] apiary_governor::GovernorError),
    /// The experiment is not in the catalog this node can see.
    #[error("{0}")]
    NotListed(String),
    /// Several publishers use the id.
    #[error(
        "{count} publishers use the experiment id `{id}` (keys {keys}): choose one by its key fingerprint"
    )]
    AmbiguousPublisher {
        /// The id.
        id: String,
        /// How many.
        count: usize,
        /// Their fingerprints, comma separated.
        keys: String,
    },
    /// The experiment is already joined (or being joined) by this node.
    #[error("`{0}` is already joined by this node: leave it first")]
    AlreadyJoined(String),
    /// The experiment is not joined by this node.
    #[error("`{0}` is not joined by this node")]
    NotJoined(String),
    /// Planning which experts to host failed (does not fit, finished, `max_experts = 0`).
    #[error("cannot plan joining `{id}`: {source}")]
    Plan {
        /// The experiment.
        id: String,
        /// Why.
        #[source]
        source: apiary_catalog::PlanError,
    },
    /// Starting the experts failed.
    #[error("cannot join `{id}`: {source}")]
    Join {
        /// The experiment.
        id: String,
        /// Why.
        #[source]
        source: apiary_catalog::JoinError,
    },
    /// The manifest's publisher key is unusable.
    #[error("the manifest of `{id}` is unusable: {reason}")]
    Manifest {
        /// The experiment.
        id: String,
        /// Why.
        reason: String,
    },
    /// The `device` setting names a device this build or this computer cannot compute on (`cuda:N`
    /// without CUDA support, or a GPU that cannot be opened).
    #[error("cannot compute on `{device}`: {reason}")]
    DeviceUnavailable {
        /// The setting.
        device: crate::config::DeviceChoice,
        /// Why, in words.
        reason: String,
    },
    /// A `device` setting was refused (not `auto`, `cpu` or `cuda:N`, or `cuda:N` in a build
    /// without CUDA support).
    #[error("{0}")]
    BadDevice(String),
    /// The node has shut down.
    #[error("the node has stopped")]
    Stopped,
}

impl NodeError {
    /// A stable, machine-readable name of the failure for UIs (`{code, message}` errors of the local
    /// API and the desktop app's commands): `not_found`, `already_joined`, `not_joined`,
    /// `ambiguous_publisher`, `cannot_plan`, `bad_manifest`, `device_unavailable`, `bad_device`,
    /// `stopped`, `busy`, or `internal`.
    pub fn code(&self) -> &'static str {
        use apiary_governor::GovernorError;
        match self {
            NodeError::NotListed(_) => "not_found",
            NodeError::AlreadyJoined(_) => "already_joined",
            NodeError::NotJoined(_) => "not_joined",
            NodeError::AmbiguousPublisher { .. } => "ambiguous_publisher",
            NodeError::Plan { .. } => "cannot_plan",
            NodeError::Manifest { .. } => "bad_manifest",
            NodeError::DeviceUnavailable { .. } => "device_unavailable",
            NodeError::BadDevice(_) => "bad_device",
            NodeError::Stopped | NodeError::Governor(GovernorError::Stopped | GovernorError::Panicked) => {
                "stopped"
            }
            NodeError::Governor(GovernorError::Busy) => "busy",
            _ => "internal",
        }
    }
}
