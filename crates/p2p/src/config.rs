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
    /// Answer peer-routing queries on `/ipfs/kad/1.0.0` (default true, as p2pd's `-dhtServer`).
    pub kad_server_mode: bool,
    /// Peers whose addresses are remembered for dialing and peer routing (default 10,000; the least
    /// recently seen disconnected peer is forgotten first).
    pub address_book_capacity: usize,
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
    /// The QUIC-v1 transport, for dialing and listening on `/udp/<port>/quic-v1` addresses (default on; it
    /// costs nothing until such an address is listened on or dialed).
    pub quic: bool,
    /// The security protocols offered on TCP and relayed connections (default Noise, then TLS, as p2pd).
    pub security: Security,
    /// Addresses to announce as this host's external addresses from the start (default none), like
    /// hivemind's `announce_maddrs`; a relay service needs at least one before it serves reservations.
    pub external_addrs: Vec<Multiaddr>,
    /// The circuit-relay v2 client: dial `/p2p-circuit` addresses and listen through a relay with
    /// `<relay addr>/p2p/<relay id>/p2p-circuit` (default off).
    pub relay_client: bool,
    /// Auto relay (as p2pd's `-autoRelay`): reserve circuits on up to this many connected peers that
    /// offer the relay v2 service (seen through identify), unless AutoNAT finds this host public. Needs
    /// [`P2pConfig::relay_client`]. Default 0: off.
    pub auto_relay_reservations: usize,
    /// The circuit-relay v2 service (hop) for other peers, with these limits (default `None`: off). It only
    /// serves once the host has a confirmed external address ([`P2pConfig::external_addrs`], AutoNAT).
    pub relay_service: Option<RelayLimits>,
    /// Direct connection upgrade through relay (hole punching) with DCUtR (default off; useful with
    /// [`P2pConfig::relay_client`]).
    pub dcutr: bool,
    /// AutoNAT (v1, as p2pd's `-autonat`): probes this host's reachability through its peers and answers
    /// their probes; the result comes out on [`crate::P2pHandle::reachability`] (default off: `Unknown`).
    pub autonat: bool,
    /// How long after start AutoNAT sends its first probe (default 15 s, libp2p's).
    pub autonat_boot_delay: Duration,
    /// Whether AutoNAT probes and dials back only global IP addresses (default true; false for swarms
    /// on one LAN, where private addresses are the reachable ones).
    pub autonat_only_global_ips: bool,
    /// UPnP port mapping on the local gateway (default off).
    pub upnp: bool,
    /// Relays (full multiaddrs with `/p2p/<id>`) to hold circuit reservations on from the start, as p2pd's
    /// `-trustedRelays` (default none). Needs [`P2pConfig::relay_client`]; skipped when
    /// [`P2pConfig::force_reachability`] is public. A reservation that ends (the relay left, the network
    /// dropped) is retried with a backoff from [`RELAY_RETRY_MIN`] to [`RELAY_RETRY_MAX`].
    pub trusted_relays: Vec<Multiaddr>,
    /// Reachability decided by the user instead of AutoNAT (default `None`: AutoNAT decides), as p2pd's
    /// `-forceReachabilityPublic/Private`. `Some(Private)` makes auto relay reserve at once.
    pub force_reachability: Option<crate::Reachability>,
    /// Longest time an inbound unary call's handler may run before the caller gets an error reply
    /// (default `None`: no limit beyond the caller's own timeout).
    pub handler_timeout: Option<Duration>,
}

/// The first wait before a relay reservation that ended or failed is tried again (it doubles up to
/// [`RELAY_RETRY_MAX`]).
pub const RELAY_RETRY_MIN: Duration = Duration::from_secs(1);
/// The longest wait between tries of a relay reservation.
pub const RELAY_RETRY_MAX: Duration = Duration::from_secs(30);

/// Which security protocols connections offer and accept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Security {
    /// Noise first, then TLS 1.3 (default; as p2pd with hivemind's default `tls=True`).
    #[default]
    NoiseAndTls,
    /// Noise only.
    Noise,
    /// TLS 1.3 only.
    Tls,
}

/// Limits of the circuit-relay v2 service. The defaults follow hivemind's p2pd relay service
/// (maxReservations 128, maxCircuits 16 per peer, 4 GiB each way and 30 min per relayed connection), not
/// libp2p's 128 KiB / 2 min, which reset ordinary hivemind calls. p2pd's 16 MiB buffer has no rust-libp2p
/// counterpart.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelayLimits {
    /// Reservations held at once (default 128).
    pub max_reservations: usize,
    /// Reservations one peer may hold (default 4).
    pub max_reservations_per_peer: usize,
    /// How long a reservation lasts before the client renews it (default 1 h).
    pub reservation_duration: Duration,
    /// Relayed connections at once, all peers together (default 256; p2pd has no total).
    pub max_circuits: usize,
    /// Relayed connections per peer (default 16, p2pd's maxCircuits, which go-libp2p counts per peer).
    pub max_circuits_per_peer: usize,
    /// Longest life of one relayed connection (default 30 min).
    pub max_circuit_duration: Duration,
    /// Bytes one relayed connection may carry, both directions together as rust-libp2p counts them
    /// (default 8 GiB: p2pd's 4 GiB in each direction; 0 means no limit).
    pub max_circuit_bytes: u64,
}

impl Default for RelayLimits {
    fn default() -> Self {
        Self {
            max_reservations: 128,
            max_reservations_per_peer: 4,
            reservation_duration: Duration::from_secs(60 * 60),
            max_circuits: 256,
            max_circuits_per_peer: 16,
            max_circuit_duration: Duration::from_secs(30 * 60),
            max_circuit_bytes: 8 * 1024 * 1024 * 1024,
        }
    }
}

impl RelayLimits {
    /// The rust-libp2p relay configuration with these limits and libp2p's default rate limiters.
    pub(crate) fn to_relay_config(&self) -> libp2p::relay::Config {
        libp2p::relay::Config {
            max_reservations: self.max_reservations,
            max_reservations_per_peer: self.max_reservations_per_peer,
            reservation_duration: self.reservation_duration,
            max_circuits: self.max_circuits,
            max_circuits_per_peer: self.max_circuits_per_peer,
            max_circuit_duration: self.max_circuit_duration,
            max_circuit_bytes: self.max_circuit_bytes,
            ..libp2p::relay::Config::default()
        }
    }
}

impl Default for P2pConfig {
    fn default() -> Self {
        Self {
            keypair: None,
            listen_addrs: Vec::new(),
            agent_version: format!("apiary/{}", env!("CARGO_PKG_VERSION")),
            idle_connection_timeout: Duration::from_secs(60),
            kad_server_mode: true,
            address_book_capacity: 10_000,
            max_outbound_calls: 1024,
            max_outbound_calls_per_peer: 128,
            max_inbound_calls: 1024,
            max_stream_frame: 16 * 1024 * 1024,
            command_capacity: 256,
            quic: true,
            security: Security::NoiseAndTls,
            external_addrs: Vec::new(),
            relay_client: false,
            auto_relay_reservations: 0,
            relay_service: None,
            dcutr: false,
            autonat: false,
            autonat_boot_delay: Duration::from_secs(15),
            autonat_only_global_ips: true,
            upnp: false,
            trusted_relays: Vec::new(),
            force_reachability: None,
            handler_timeout: None,
        }
    }
}
