//! Apiary's libp2p host and hivemind's RPC protocol.
//!
//! [`Host::spawn`] builds a swarm (TCP and QUIC-v1; Noise and TLS; yamux; identify, ping, Kademlia's
//! `/ipfs/kad/1.0.0` for peer routing only ([`routing`]); optional relay v2 client and service with auto
//! relay, DCUtR, AutoNAT, UPnP; the
//! hivemind RPC behaviour) and runs it in one task; everything else talks to it through a cloneable
//! [`P2pHandle`]. hivemind handlers are served and called by name
//! (`Class.rpc_method`, optionally `namespace::`-prefixed) with hivemind's unary envelope or stream
//! framing, byte-compatible with hivemind 1.1.12's p2pd.
//!
//! [`P2pConfig`] switches the optional parts: QUIC-v1 and Noise-then-TLS are on by default (they cost
//! nothing until used); the relay v2 client and service ([`RelayLimits`], p2pd's limits), DCUtR, AutoNAT
//! and UPnP are off. [`P2pHandle::visible_addrs`], [`P2pHandle::reachability`] and
//! [`P2pHandle::connectivity`] publish how peers can reach the host ([`connectivity`]: direct, relayed,
//! unreachable or offline, why, and the round trips); trusted relays are reserved and kept with a backoff;
//! a peer that reached the host through a relay is dialed back directly when it can be (connection
//! reversal); a connection whose pings time out is closed.

pub mod behaviour;
mod config;
pub mod connectivity;
mod host;
pub mod identity;
pub mod routing;
pub mod rpc;
mod transport;

pub use behaviour::OpenError;
pub use config::{P2pConfig, RELAY_RETRY_MAX, RELAY_RETRY_MIN, RelayLimits, Security};
pub use connectivity::{Connectivity, Link, NetPath};
pub use host::{CallError, Host, HostError, P2pHandle, Reachability};
pub use libp2p::{Multiaddr, PeerId, identity::Keypair, multiaddr::Protocol};
pub use rpc::{Handler, InvalidName, StreamHandler, UnaryHandler, validate_name};
