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
//!
//! Time is always passed in (`now`, DHT time in UNIX seconds, as hivemind's `get_dht_time`), so
//! everything here is deterministic and testable without clocks.

pub mod protocol;
pub mod routing;
pub mod storage;
pub mod traverse;
pub mod validation;

mod config;
pub use config::DhtConfig;

pub use apiary_wire::dhtid::DhtId;
pub use libp2p_identity::PeerId;

/// DHT time: UNIX seconds as a float (hivemind's `DHTExpiration`).
pub type DhtExpiration = f64;
