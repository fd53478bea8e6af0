//! Apiary's libp2p host and hivemind's RPC protocol.
//!
//! [`Host::spawn`] builds a swarm (TCP; Noise; yamux; identify, ping, Kademlia on
//! `/ipfs/kad/1.0.0` for peer routing; the hivemind RPC behaviour) and runs it in one task; everything
//! else talks to it through a cloneable [`P2pHandle`]. hivemind handlers are served and called by name
//! (`Class.rpc_method`, optionally `namespace::`-prefixed) with hivemind's unary envelope or stream
//! framing, byte-compatible with hivemind 1.1.12's p2pd.

pub mod behaviour;
mod config;
mod host;
pub mod identity;
pub mod rpc;

pub use behaviour::OpenError;
pub use config::P2pConfig;
pub use host::{CallError, Host, HostError, P2pHandle};
pub use libp2p::{Multiaddr, PeerId, identity::Keypair};
pub use rpc::{Handler, InvalidName, StreamHandler, UnaryHandler, validate_name};
