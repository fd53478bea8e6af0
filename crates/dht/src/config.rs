//! Typed configuration with hivemind's defaults (`DHTNode.create`).

use std::time::Duration;

/// DHT parameters; [`Default`] gives hivemind 1.1.12's values.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct DhtConfig {
    /// `k`: nodes per bucket and nearest peers returned by `rpc_find`. Default 20.
    pub bucket_size: usize,
    /// Nodes that store each key. Default 5.
    pub num_replicas: usize,
    /// `b`: buckets not holding our id split only at depths not divisible by this. Default 5.
    pub depth_modulo: u32,
    /// Timeout of one RPC. Default 3 s.
    pub wait_timeout: Duration,
    /// Bootstrap timeout; `None` means `wait_timeout` (hivemind's default).
    pub bootstrap_timeout: Option<Duration>,
    /// Concurrent traversal workers (`HIVEMIND_DHT_NUM_WORKERS`). Default 4.
    pub num_workers: usize,
    /// Keys per find/store call. Default 16.
    pub chunk_size: usize,
    /// First blacklist period of a peer that did not answer. Default 5 s.
    pub blacklist_time: Duration,
    /// Blacklist growth per repeated failure. Default 2.
    pub backoff_rate: f64,
    /// Cache values found by `get` locally. Default true.
    pub cache_locally: bool,
    /// Push found values to this many nearest nodes that lacked them. Default 1.
    pub cache_nearest: usize,
    /// Cache size bound; `None` is unbounded (default).
    pub cache_size: Option<usize>,
    /// Fetch a cached key again this long before it expires, when it was used from the cache since it was
    /// cached (hivemind's cache refresh). Zero turns refreshing off. Default 5 s.
    pub cache_refresh_before_expiry: Duration,
    /// Cache stored values locally too. Default true.
    pub cache_on_store: bool,
    /// De-duplicate concurrent gets of one key. Default true.
    pub reuse_get_requests: bool,
    /// Client mode: serve nothing, send empty `NodeInfo`. Default false.
    pub client_mode: bool,
    /// Fail creation when no initial peer answers. Default true.
    pub ensure_bootstrap_success: bool,
    /// Reject peers whose validated ping fails (clock skew > 3 s, unreachable). Default true.
    pub strict: bool,
    /// When the host has no connected peer at all (the network dropped, the computer woke up), dial the
    /// initial peers again with a backoff from 1 s to 30 s and bootstrap once one answers. hivemind does
    /// not (its nodes stay silently alone: the dropout Petals users report). Default true.
    pub rebootstrap: bool,
}

impl Default for DhtConfig {
    fn default() -> Self {
        DhtConfig {
            bucket_size: 20,
            num_replicas: 5,
            depth_modulo: 5,
            wait_timeout: Duration::from_secs(3),
            bootstrap_timeout: None,
            num_workers: 4,
            chunk_size: 16,
            blacklist_time: Duration::from_secs(5),
            backoff_rate: 2.0,
            cache_locally: true,
            cache_nearest: 1,
            cache_size: None,
            cache_refresh_before_expiry: Duration::from_secs(5),
            cache_on_store: true,
            reuse_get_requests: true,
            client_mode: false,
            ensure_bootstrap_success: true,
            strict: true,
            rebootstrap: true,
        }
    }
}
