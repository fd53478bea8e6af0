//! The host's typed configuration.

use std::time::Duration;

use libp2p::{Multiaddr, identity::Keypair};

/// How the host is built. Every field has a documented default ([`P2pConfig::default`]).
#[derive(Debug, Clone)]
pub struct P2pConfig {
    /// The identity; `None` (default) generates a fresh Ed25519 key.
    pub keypair: Option<Keypair>,
    /// Addresses to listen on at start (default none; e.g. `/ip4/0.0.0.0/tcp/0`).
    pub listen_addrs: Vec<Multiaddr>,
    /// Identify's agent string (default `apiary/<crate version>`).
    pub agent_version: String,
    /// Connections with no open streams close after this long (default 60 s; libp2p's 10 s drops quiet
    /// hivemind connections).
    pub idle_connection_timeout: Duration,
    /// Run Kademlia in server mode, answering peer-routing queries (default true, as p2pd's `-dhtServer`).
    pub kad_server_mode: bool,
    /// Outgoing calls in flight to all peers together (default 1024).
    pub max_outbound_calls: usize,
    /// Outgoing calls in flight to one peer (default 128).
    pub max_outbound_calls_per_peer: usize,
    /// Incoming calls being served at once; more are reset (default 1024).
    pub max_inbound_calls: usize,
    /// Largest stream-call frame read (default 16 MiB; hivemind's MoE chunks are ≤ 4 MiB).
    pub max_stream_frame: u64,
    /// Capacity of the handle's command channel (default 256).
    pub command_capacity: usize,
}

impl Default for P2pConfig {
    fn default() -> Self {
        Self {
            keypair: None,
            listen_addrs: Vec::new(),
            agent_version: format!("apiary/{}", env!("CARGO_PKG_VERSION")),
            idle_connection_timeout: Duration::from_secs(60),
            kad_server_mode: true,
            max_outbound_calls: 1024,
            max_outbound_calls_per_peer: 128,
            max_inbound_calls: 1024,
            max_stream_frame: 16 * 1024 * 1024,
            command_capacity: 256,
        }
    }
}
