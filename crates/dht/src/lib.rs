//! hivemind's DHT (`hivemind/dht`), as pure logic that a libp2p host drives.
//!
//! - [`routing`]: the k-bucket [`routing::RoutingTable`] (`bucket_size` 20, `depth_modulo` 5), with
//!   replacement caches, least-recently-seen pings and nearest-neighbour queries.
//! - [`storage`]: [`storage::TimedStorage`] and [`storage::DhtLocalStorage`], hivemind's acceptance
//!   rules by expiration and its sub-key dictionaries; the same type serves as storage and cache.
//! - [`validation`]: [`validation::RecordValidator`], [`validation::CompositeValidator`], the RSA owner
//!   signature adapter and a schema hook.
//! - [`protocol`]: the server side of `DHTProtocol` (`rpc_ping` / `rpc_store` / `rpc_find`) as a
//!   function of (sender, request, now), and client-side request builders and response readers.
//! - [`traverse`]: hivemind's multi-query beam search `traverse_dht`, generic over how neighbours
//!   are fetched.
//! - [`refresh`]: [`Refresher`] keeps records alive (store every `period` with `now + ttl`) and withdraws
//!   them so that readers see them gone at once.
//! - [`node`]: hivemind's `DHTNode` over an Apiary p2p host: [`Dht::spawn`] serves `DHTProtocol`,
//!   bootstraps, and returns a cloneable [`DhtHandle`] (`store`/`store_many`/`get`/`get_many`); one task
//!   owns the [`protocol::ProtocolState`] and the blacklist, outgoing RPCs go through [`DhtRpc`].
//!
//! Outside [`node`], time is always passed in (`now`, DHT time in UNIX seconds, as hivemind's `get_dht_time`), so
//! everything here is deterministic and testable without clocks.

pub mod node;
pub mod protocol;
pub mod refresh;
pub mod routing;
pub mod storage;
pub mod traverse;
pub mod validation;

mod config;
pub use config::DhtConfig;
pub use node::{Dht, DhtError, DhtHandle, DhtRpc, Found, P2pRpc, StoreEntry, get_dht_time};
pub use refresh::{KeptRecord, Refresher};

pub use apiary_wire::dhtid::DhtId;
pub use libp2p_identity::PeerId;

/// DHT time: UNIX seconds as a float (hivemind's `DHTExpiration`).
pub type DhtExpiration = f64;
