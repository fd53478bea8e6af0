//! hivemind's `DHTNode` (`hivemind/dht/node.py`): a running DHT node over an Apiary p2p host.
//!
//! One task (the *owner*) holds the [`ProtocolState`] (routing table, storage, cache) and the blacklist.
//! Everything else reaches it through a bounded channel with `oneshot` replies: the three served RPCs
//! (`DHTProtocol.rpc_ping|rpc_store|rpc_find`), routing-table updates after outgoing calls, and local
//! storage access. The owner never awaits the network itself: follow-ups (pinging a sender back, key
//! hand-off to a new node, pinging a least-recently-seen node) run in spawned tasks that report back.
//!
//! The search and store algorithms (`store_many`, `get_many`, `find_nearest_nodes`) run in the
//! caller's task on a cloneable [`DhtHandle`], sending their outgoing RPCs through [`DhtRpc`].

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use apiary_p2p::{CallError, InvalidName, Multiaddr, OpenError, P2pHandle, UnaryHandler};
use apiary_wire::dhtid::DhtId;
use apiary_wire::msgpack::{self, Value};
use apiary_wire::proto::dht::{
    FindRequest, FindResponse, NodeInfo, PingRequest, PingResponse, StoreRequest, StoreResponse,
};
use apiary_wire::signature::{DhtRecord, IS_REGULAR_VALUE};
use bytes::Bytes;
use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use futures::{FutureExt, StreamExt};
use libp2p_identity::PeerId;
use prost::Message;
use tokio::sync::{mpsc, oneshot};

use crate::DhtConfig;
use crate::DhtExpiration;
use crate::protocol::{
    FindOutcome, IncomingPeer, PingFollowUp, ProtocolState, RequestError, StoreItem, build_find_request,
    build_ping_request, build_store_request, parse_find_response, parse_store_response, responder_node_id,
};
use crate::storage::{StoredValue, ValueWithExpiration};
use crate::traverse::{NeighborsReply, TraverseParams, traverse_dht};
use crate::validation::{CompositeValidator, ValidatorError};

/// Handler name of `rpc_ping`.
pub const RPC_PING: &str = "DHTProtocol.rpc_ping";
/// Handler name of `rpc_store`.
pub const RPC_STORE: &str = "DHTProtocol.rpc_store";
/// Handler name of `rpc_find`.
pub const RPC_FIND: &str = "DHTProtocol.rpc_find";

/// hivemind's `MAX_DHT_TIME_DISCREPANCY_SECONDS`.
pub const MAX_DHT_TIME_DISCREPANCY_SECONDS: f64 = 3.0;

/// Capacity of the owner task's command channel.
const COMMAND_CAPACITY: usize = 1024;

/// hivemind's `get_dht_time`: UNIX time in seconds as a float.
pub fn get_dht_time() -> DhtExpiration {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// Why a DHT operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DhtError {
    /// No initial peer answered the bootstrap ping (`ensure_bootstrap_success`).
    #[error("DHT bootstrap failed: none of the {tried} initial peers responded to the ping ({reasons})")]
    BootstrapFailed {
        /// How many initial peers were tried.
        tried: usize,
        /// Why each failed, `; `-separated.
        reasons: String,
    },
    /// A handler name was refused by the host (never for the built-in names).
    #[error(transparent)]
    Handler(#[from] InvalidName),
    /// The node has shut down.
    #[error("the DHT node has shut down")]
    Shutdown,
    /// A validator failed while signing or checking a record.
    #[error(transparent)]
    Validator(#[from] ValidatorError),
    /// A value found in the DHT is not msgpack.
    #[error("a value found in the DHT could not be decoded: {0}")]
    Decode(String),
}

/// Why an outgoing DHT RPC failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RpcError {
    /// The call itself failed (timeout, unreachable, remote error).
    #[error(transparent)]
    Call(#[from] CallError),
    /// The response is not the expected protobuf.
    #[error("malformed response: {0}")]
    Decode(#[from] prost::DecodeError),
    /// Any other transport failure (custom [`DhtRpc`] implementations).
    #[error("{0}")]
    Other(String),
}

/// How a node sends its outgoing `DHTProtocol` calls.
pub trait DhtRpc: Send + Sync + 'static {
    /// `rpc_ping` on `peer`.
    fn call_ping(
        &self,
        peer: PeerId,
        request: PingRequest,
        timeout: Duration,
    ) -> BoxFuture<'static, Result<PingResponse, RpcError>>;
    /// `rpc_store` on `peer`.
    fn call_store(
        &self,
        peer: PeerId,
        request: StoreRequest,
        timeout: Duration,
    ) -> BoxFuture<'static, Result<StoreResponse, RpcError>>;
    /// `rpc_find` on `peer`.
    fn call_find(
        &self,
        peer: PeerId,
        request: FindRequest,
        timeout: Duration,
    ) -> BoxFuture<'static, Result<FindResponse, RpcError>>;
}

/// [`DhtRpc`] over an Apiary host: protobuf-encoded unary calls to `DHTProtocol.rpc_*`.
///
/// hivemind's DHT names peers by id only. For each peer named in an `rpc_find` answer this remembers
/// who named it; calling a peer with no known address first asks that node for it on the peer-routing
/// protocol ([`P2pHandle::find_peer_via`]), as it certainly knew where the peer was.
#[derive(Debug, Clone)]
pub struct P2pRpc {
    p2p: P2pHandle,
    named_by: Arc<Mutex<HashMap<PeerId, PeerId>>>,
}

/// Peers whose namer is remembered; the memory is cleared when it fills up.
const NAMED_BY_CAPACITY: usize = 16_384;

impl P2pRpc {
    /// Calls through `p2p`.
    pub fn new(p2p: P2pHandle) -> Self {
        P2pRpc {
            p2p,
            named_by: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    fn remember_namers(&self, responder: PeerId, response: &FindResponse) {
        let mut map = lock(&self.named_by);
        for result in &response.results {
            for id in &result.nearest_peer_ids {
                if let Ok(named) = PeerId::from_bytes(id) {
                    if map.len() >= NAMED_BY_CAPACITY {
                        map.clear();
                    }
                    map.insert(named, responder);
                }
            }
        }
    }

    fn call<Req: Message, Resp: Message + Default>(
        &self,
        peer: PeerId,
        name: &'static str,
        request: Req,
        timeout: Duration,
    ) -> BoxFuture<'static, Result<Resp, RpcError>> {
        let p2p = self.p2p.clone();
        let named_by = self.named_by.clone();
        let bytes = Bytes::from(request.encode_to_vec());
        async move {
            let started = tokio::time::Instant::now();
            let reply = match p2p.call_unary(peer, name, bytes.clone(), timeout).await {
                // a peer known only by id (from a FindResponse): look it up like a routed host, retry once.
                // A peer whose known addresses refuse us is down: no lookup, the caller blacklists it.
                Err(CallError::Open(OpenError::NoAddresses)) => {
                    let left = timeout.saturating_sub(started.elapsed());
                    let hints: Vec<PeerId> = lock(&named_by).get(&peer).copied().into_iter().collect();
                    match tokio::time::timeout(left, p2p.find_peer_via(peer, hints)).await {
                        Ok(Ok(_)) => {
                            let left = timeout.saturating_sub(started.elapsed());
                            p2p.call_unary(peer, name, bytes, left).await?
                        }
                        Ok(Err(_)) => {
                            return Err(RpcError::Other(format!("peer {peer} has no known address")));
                        }
                        Err(_) => return Err(RpcError::Call(CallError::Timeout)),
                    }
                }
                other => other?,
            };
            Ok(Resp::decode(reply)?)
        }
        .boxed()
    }
}

impl DhtRpc for P2pRpc {
    fn call_ping(
        &self,
        peer: PeerId,
        request: PingRequest,
        timeout: Duration,
    ) -> BoxFuture<'static, Result<PingResponse, RpcError>> {
        self.call(peer, RPC_PING, request, timeout)
    }

    fn call_store(
        &self,
        peer: PeerId,
        request: StoreRequest,
        timeout: Duration,
    ) -> BoxFuture<'static, Result<StoreResponse, RpcError>> {
        self.call(peer, RPC_STORE, request, timeout)
    }

    fn call_find(
        &self,
        peer: PeerId,
        request: FindRequest,
        timeout: Duration,
    ) -> BoxFuture<'static, Result<FindResponse, RpcError>> {
        let this = self.clone();
        let call = self.call::<_, FindResponse>(peer, RPC_FIND, request, timeout);
        async move {
            let response = call.await?;
            this.remember_namers(peer, &response);
            Ok(response)
        }
        .boxed()
    }
}

/// hivemind's `Blacklist`: non-responding peers are skipped for `blacklist_time · backoff_rate^n`.
#[derive(Debug)]
struct Blacklist {
    base_time: f64,
    backoff: f64,
    banned_until: HashMap<PeerId, DhtExpiration>,
    ban_counter: HashMap<PeerId, i32>,
}

impl Blacklist {
    fn contains(&self, peer: &PeerId, now: DhtExpiration) -> bool {
        self.banned_until.get(peer).is_some_and(|until| *until > now)
    }

    fn register_failure(&mut self, peer: PeerId, now: DhtExpiration) {
        if !self.contains(&peer, now) && self.base_time > 0.0 {
            let counter = self.ban_counter.entry(peer).or_insert(0);
            let duration = self.base_time * self.backoff.powi(*counter);
            self.banned_until.insert(peer, now + duration);
            *counter += 1;
        }
    }

    fn register_success(&mut self, peer: &PeerId) {
        self.banned_until.remove(peer);
        self.ban_counter.remove(peer);
    }
}

type Access = Box<dyn FnOnce(&mut Owner) + Send>;

enum Command {
    Ping {
        sender: PeerId,
        request: PingRequest,
        reply: oneshot::Sender<Result<PingResponse, String>>,
    },
    Store {
        sender: PeerId,
        request: StoreRequest,
        reply: oneshot::Sender<Result<StoreResponse, String>>,
    },
    Find {
        sender: PeerId,
        request: FindRequest,
        reply: oneshot::Sender<Result<FindResponse, String>>,
    },
    /// After an outgoing call: `update_routing_table(node_id, peer, responded)`.
    Routing {
        node_id: Option<DhtId>,
        peer: PeerId,
        responded: bool,
    },
    Access(Access),
    Shutdown(oneshot::Sender<()>),
}

/// The task that owns the node's state.
struct Owner {
    protocol: ProtocolState,
    blacklist: Blacklist,
    rpc: Arc<dyn DhtRpc>,
    me: mpsc::WeakSender<Command>,
    wait_timeout: Duration,
    refresh: RefreshQueue,
}

/// hivemind's `cache_refresh_queue`: cached keys to fetch again, each at a DHT time. The refresher task
/// ([`DhtHandle::refresh_cache`]) sleeps until the earliest one and is woken when an earlier one comes.
#[derive(Debug, Default)]
struct RefreshQueue {
    /// Whether a refresher runs (`cache_refresh_before_expiry > 0`); otherwise nothing is queued.
    enabled: bool,
    at: HashMap<DhtId, DhtExpiration>,
    wake: Arc<tokio::sync::Notify>,
}

impl RefreshQueue {
    /// Refresh `key` at `time` or later (the earlier time wins when it is queued already).
    fn schedule(&mut self, key: DhtId, time: DhtExpiration) {
        if !self.enabled {
            return;
        }
        let earliest = self.earliest();
        let slot = self.at.entry(key).or_insert(time);
        *slot = slot.min(time);
        if earliest.is_none_or(|e| time < e) {
            self.wake.notify_one();
        }
    }

    fn earliest(&self) -> Option<DhtExpiration> {
        self.at.values().copied().reduce(f64::min)
    }

    /// Takes up to `n` keys due at `now`, earliest first.
    fn take_due(&mut self, now: DhtExpiration, n: usize) -> Vec<(DhtId, DhtExpiration)> {
        let mut due: Vec<(DhtId, DhtExpiration)> = self
            .at
            .iter()
            .filter(|(_, t)| **t <= now)
            .map(|(k, t)| (*k, *t))
            .collect();
        due.sort_by(|a, b| a.1.total_cmp(&b.1));
        due.truncate(n.max(1));
        for (k, _) in &due {
            self.at.remove(k);
        }
        due
    }
}

impl Owner {
    async fn run(mut self, mut commands: mpsc::Receiver<Command>) {
        while let Some(command) = commands.recv().await {
            match command {
                Command::Ping {
                    sender,
                    request,
                    reply,
                } => self.serve_ping(sender, &request, reply),
                Command::Store {
                    sender,
                    request,
                    reply,
                } => {
                    let result = self.protocol.rpc_store(sender, &request, get_dht_time());
                    self.answer(result, reply);
                }
                Command::Find {
                    sender,
                    request,
                    reply,
                } => {
                    let result = self.protocol.rpc_find(sender, &request, get_dht_time());
                    self.answer(result, reply);
                }
                Command::Routing {
                    node_id,
                    peer,
                    responded,
                } => self.update_routing(node_id, peer, responded),
                Command::Access(f) => f(&mut self),
                Command::Shutdown(done) => {
                    let _ = done.send(());
                    break;
                }
            }
        }
        // let the refresher see that the node is gone
        self.refresh.wake.notify_one();
    }

    /// Sends `command` to this task from a spawned follow-up.
    fn report(&self) -> impl Fn(Command) -> BoxFuture<'static, ()> + Send + 'static {
        let me = self.me.clone();
        move |command| {
            let me = me.clone();
            async move {
                if let Some(tx) = me.upgrade() {
                    let _ = tx.send(command).await;
                }
            }
            .boxed()
        }
    }

    /// Replies to a served `rpc_store`/`rpc_find` and adds a sender that named its node id to the
    /// routing table (hivemind's `update_routing_table` for incoming requests).
    fn answer<R>(
        &mut self,
        result: Result<(R, Option<IncomingPeer>), RequestError>,
        reply: oneshot::Sender<Result<R, String>>,
    ) {
        match result {
            Ok((response, incoming)) => {
                let _ = reply.send(Ok(response));
                if let Some(p) = incoming {
                    self.update_routing(Some(p.node_id), p.peer_id, true);
                }
            }
            Err(e) => {
                let _ = reply.send(Err(e.to_string()));
            }
        }
    }

    fn serve_ping(
        &mut self,
        sender: PeerId,
        request: &PingRequest,
        reply: oneshot::Sender<Result<PingResponse, String>>,
    ) {
        let (mut response, follow_up) = match self.protocol.rpc_ping(sender, request, get_dht_time()) {
            Ok(r) => r,
            Err(e) => {
                let _ = reply.send(Err(e.to_string()));
                return;
            }
        };
        match follow_up {
            PingFollowUp::None => {
                let _ = reply.send(Ok(response));
            }
            PingFollowUp::AddToRoutingTable(p) => {
                let _ = reply.send(Ok(response));
                self.update_routing(Some(p.node_id), p.peer_id, true);
            }
            PingFollowUp::PingBack(p) => {
                let rpc = self.rpc.clone();
                let report = self.report();
                let request = build_ping_request(self.protocol.node_info(), false);
                let timeout = self.wait_timeout;
                tokio::spawn(async move {
                    let answer = rpc.call_ping(p.peer_id, request, timeout).await;
                    let responder = answer
                        .ok()
                        .and_then(|r| responder_node_id(r.peer.as_ref()).ok().flatten());
                    response.available = responder == Some(p.node_id);
                    let available = response.available;
                    let _ = reply.send(Ok(response));
                    report(Command::Routing {
                        node_id: Some(p.node_id),
                        peer: p.peer_id,
                        responded: available,
                    })
                    .await;
                });
            }
        }
    }

    /// `update_routing_table`, then its follow-ups in spawned tasks: the key hand-off to a new node and
    /// the least-recently-seen ping.
    fn update_routing(&mut self, node_id: Option<DhtId>, peer: PeerId, responded: bool) {
        let update = self
            .protocol
            .update_routing_table(node_id, peer, responded, get_dht_time());
        if let Some((to, request)) = update.hand_off {
            let rpc = self.rpc.clone();
            let report = self.report();
            let timeout = self.wait_timeout;
            tokio::spawn(async move {
                let answer = rpc.call_store(to, request, timeout).await;
                let (node_id, responded) = match answer {
                    Ok(r) => (responder_node_id(r.peer.as_ref()).ok().flatten(), true),
                    Err(_) => (None, false),
                };
                if node_id.is_some() || !responded {
                    report(Command::Routing {
                        node_id,
                        peer: to,
                        responded,
                    })
                    .await;
                }
            });
        }
        if let Some((_, ping_peer)) = update.ping {
            let rpc = self.rpc.clone();
            let report = self.report();
            let timeout = self.wait_timeout;
            let request = build_ping_request(self.protocol.node_info(), false);
            tokio::spawn(async move {
                let answer = rpc.call_ping(ping_peer, request, timeout).await;
                let node_id = answer
                    .ok()
                    .and_then(|r| responder_node_id(r.peer.as_ref()).ok().flatten());
                report(Command::Routing {
                    node_id,
                    peer: ping_peer,
                    responded: node_id.is_some(),
                })
                .await;
            });
        }
    }
}

/// What `get` found.
#[derive(Debug, Clone, PartialEq)]
pub enum Found {
    /// A regular value.
    Regular {
        /// The value (signature stripped, deserialized).
        value: Value,
        /// Its expiration (DHT time).
        expiration: DhtExpiration,
    },
    /// A dictionary of sub-keys.
    Dictionary {
        /// `(subkey, value, expiration)` in the dictionary's order.
        entries: Vec<(Value, Value, DhtExpiration)>,
        /// The dictionary's latest expiration.
        expiration: DhtExpiration,
    },
}

impl Found {
    /// The expiration of the whole value.
    pub fn expiration(&self) -> DhtExpiration {
        match self {
            Found::Regular { expiration, .. } | Found::Dictionary { expiration, .. } => *expiration,
        }
    }
}

/// One item for [`DhtHandle::store_many`].
#[derive(Debug, Clone, PartialEq)]
pub struct StoreEntry {
    /// The key (hashed to a [`DhtId`] with `DHTID.generate`).
    pub key: Value,
    /// A sub-key, or `None` for a regular value.
    pub subkey: Option<Value>,
    /// The value.
    pub value: Value,
    /// Expiration (DHT time).
    pub expiration: DhtExpiration,
}

/// hivemind's `_SearchState` for one key.
#[derive(Debug)]
struct SearchState {
    sufficient_expiration_time: DhtExpiration,
    value: Option<StoredValue>,
    expiration_time: Option<DhtExpiration>,
    source: Option<DhtId>,
    finished: bool,
}

impl SearchState {
    fn new(sufficient_expiration_time: DhtExpiration) -> Self {
        SearchState {
            sufficient_expiration_time,
            value: None,
            expiration_time: None,
            source: None,
            finished: false,
        }
    }

    fn add_candidate(&mut self, candidate: Option<ValueWithExpiration<StoredValue>>, source: DhtId) {
        let Some(candidate) = candidate else { return };
        if self.finished {
            return;
        }
        let best = self.expiration_time.unwrap_or(f64::NEG_INFINITY);
        match (&mut self.value, &candidate.value) {
            (Some(StoredValue::Dictionary(mine)), StoredValue::Dictionary(theirs)) => {
                for e in theirs.iter() {
                    mine.store(e.subkey.clone(), e.value.clone(), e.expiration_time);
                }
            }
            _ if candidate.expiration_time > best => self.value = Some(candidate.value),
            _ => {}
        }
        if candidate.expiration_time > best {
            self.expiration_time = Some(candidate.expiration_time);
            self.source = Some(source);
            if candidate.expiration_time >= self.sufficient_expiration_time {
                self.finished = true;
            }
        }
    }
}

struct Inner {
    commands: mpsc::Sender<Command>,
    rpc: Arc<dyn DhtRpc>,
    config: DhtConfig,
    node_id: DhtId,
    peer_id: PeerId,
    node_info: NodeInfo,
    p2p: Option<P2pHandle>,
    /// Gets in flight by key, for `reuse_get_requests`: a finished get hands what it found to the
    /// others (hivemind's `pending_get_requests`).
    pending_gets: Mutex<HashMap<DhtId, Vec<PendingGet>>>,
    /// The task that re-bootstraps after the host lost every peer ([`DhtConfig::rebootstrap`]).
    watchdog: Mutex<Option<tokio::task::AbortHandle>>,
}

/// The searches of one `get_many` call, by key.
type Searches = Mutex<HashMap<DhtId, SearchState>>;
/// A get in flight: its call number and its searches.
type PendingGet = (u64, std::sync::Weak<Searches>);

/// A cloneable handle to a running DHT node (hivemind's `DHTNode`).
#[derive(Clone)]
pub struct DhtHandle {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for DhtHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DhtHandle")
            .field("node_id", &self.inner.node_id)
            .field("peer_id", &self.inner.peer_id)
            .finish()
    }
}

/// Starts DHT nodes.
#[derive(Debug)]
pub struct Dht;

impl Dht {
    /// Starts a DHT node on `p2p` (serving `DHTProtocol` unless `config.client_mode`) with no record
    /// validators, and bootstraps it from `initial_peers` (full multiaddrs with `/p2p/`).
    pub async fn spawn(
        p2p: P2pHandle,
        config: DhtConfig,
        initial_peers: Vec<Multiaddr>,
    ) -> Result<DhtHandle, DhtError> {
        Self::spawn_with_validator(p2p, config, initial_peers, CompositeValidator::default()).await
    }

    /// [`Dht::spawn`] with record validators (e.g. [`crate::validation::RsaOwnerValidator`]).
    pub async fn spawn_with_validator(
        p2p: P2pHandle,
        config: DhtConfig,
        initial_peers: Vec<Multiaddr>,
        validator: CompositeValidator,
    ) -> Result<DhtHandle, DhtError> {
        let rpc: Arc<dyn DhtRpc> = Arc::new(P2pRpc::new(p2p.clone()));
        let handle = DhtHandle::start(
            rpc,
            p2p.local_peer_id(),
            config.clone(),
            validator,
            Some(p2p.clone()),
        );
        if !config.client_mode {
            handle.register_handlers(&p2p)?;
        }
        let timeout = config.bootstrap_timeout.unwrap_or(config.wait_timeout);
        for addr in &initial_peers {
            if let Some(apiary_p2p::Protocol::P2p(peer)) = addr.iter().last() {
                // a quiet node keeps its way into the swarm (and an outage shows as no peers)
                p2p.keep_alive(peer);
            }
        }
        let dials = initial_peers.iter().map(|addr| {
            let p2p = p2p.clone();
            let addr = addr.clone();
            async move {
                match tokio::time::timeout(timeout, p2p.dial(addr.clone())).await {
                    Ok(Ok(peer)) => Ok(peer),
                    Ok(Err(e)) => Err(e.to_string()),
                    Err(_) => Err(format!("dialing {addr} timed out")),
                }
            }
        });
        let mut peers = Vec::new();
        let mut reasons = Vec::new();
        for result in futures::future::join_all(dials).await {
            match result {
                Ok(peer) => peers.push(peer),
                Err(e) => reasons.push(e),
            }
        }
        if let Err(e) = handle.bootstrap(&peers, initial_peers.len(), reasons).await {
            handle.shutdown().await;
            return Err(e);
        }
        if config.rebootstrap && !initial_peers.is_empty() {
            let task = tokio::spawn(rebootstrap(Arc::downgrade(&handle.inner), p2p, initial_peers));
            *handle
                .inner
                .watchdog
                .lock()
                .unwrap_or_else(PoisonError::into_inner) = Some(task.abort_handle());
        }
        Ok(handle)
    }
}

/// The first wait between re-bootstrap tries (it doubles up to [`REBOOTSTRAP_MAX_WAIT`]).
const REBOOTSTRAP_FIRST_WAIT: Duration = Duration::from_secs(1);
/// The longest wait between re-bootstrap tries.
const REBOOTSTRAP_MAX_WAIT: Duration = Duration::from_secs(30);
/// How often a connected node pings one of its bootstrap peers (within libp2p's and Apiary's idle
/// connection timeouts).
const KEEPALIVE_PERIOD: Duration = Duration::from_secs(20);

/// Watches the host's connected peers; whenever none is left, dials `initial_peers` again (backoff
/// [`REBOOTSTRAP_FIRST_WAIT`] doubling to [`REBOOTSTRAP_MAX_WAIT`]) until one answers or a peer connects,
/// then bootstraps. Ends when the node is gone.
async fn rebootstrap(node: Weak<Inner>, p2p: P2pHandle, initial_peers: Vec<Multiaddr>) {
    let mut peers = p2p.connected_peers();
    let bootstrap_ids: Vec<PeerId> = initial_peers
        .iter()
        .filter_map(|a| match a.iter().last() {
            Some(apiary_p2p::Protocol::P2p(peer)) => Some(peer),
            _ => None,
        })
        .collect();
    let mut keepalive = tokio::time::interval(KEEPALIVE_PERIOD);
    loop {
        // while connected: ping one bootstrap peer now and then, so that neither side finds the
        // connection idle and closes it (a quiet node would otherwise look offline)
        loop {
            tokio::select! {
                closed = async { peers.wait_for(|p| p.is_empty()).await.is_err() } => {
                    if closed {
                        return;
                    }
                    break;
                }
                _ = keepalive.tick() => {
                    let connected = p2p.connected_peers().borrow().clone();
                    let Some(peer) = bootstrap_ids.iter().find(|p| connected.contains(p)).copied() else {
                        continue;
                    };
                    let Some(inner) = node.upgrade() else { return };
                    let handle = DhtHandle { inner };
                    let _ = handle.call_ping(peer, false, false).await;
                }
            }
        }
        // a moment for a connection to come back by itself
        tokio::time::sleep(REBOOTSTRAP_FIRST_WAIT).await;
        if !peers.borrow_and_update().is_empty() {
            continue;
        }
        tracing::warn!("re-bootstrapping: no peers connected");
        let mut wait = REBOOTSTRAP_FIRST_WAIT;
        loop {
            let Some(inner) = node.upgrade() else { return };
            let handle = DhtHandle { inner };
            let timeout = handle.inner.config.wait_timeout;
            let dials = initial_peers.iter().map(|addr| {
                let p2p = p2p.clone();
                let addr = addr.clone();
                async move { tokio::time::timeout(timeout, p2p.dial(addr)).await.ok()?.ok() }
            });
            let answered: Vec<PeerId> = futures::future::join_all(dials)
                .await
                .into_iter()
                .flatten()
                .collect();
            if !answered.is_empty() {
                let _ = handle.bootstrap(&answered, initial_peers.len(), Vec::new()).await;
                tracing::info!(peers = answered.len(), "re-bootstrapped");
                break;
            }
            drop(handle);
            if !peers.borrow_and_update().is_empty() {
                tracing::info!("a peer connected; re-bootstrap done");
                break;
            }
            tracing::debug!(
                wait_s = wait.as_secs_f64(),
                "no initial peer answered; trying again"
            );
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = peers.wait_for(|p| !p.is_empty()) => {}
            }
            wait = (wait * 2).min(REBOOTSTRAP_MAX_WAIT);
        }
    }
}

impl DhtHandle {
    /// Starts the owner task with a custom [`DhtRpc`] (no handlers are registered and nothing is
    /// bootstrapped; see [`DhtHandle::bootstrap`]).
    pub fn start(
        rpc: Arc<dyn DhtRpc>,
        peer_id: PeerId,
        config: DhtConfig,
        validator: CompositeValidator,
        p2p: Option<P2pHandle>,
    ) -> DhtHandle {
        let node_id = DhtId::random();
        let protocol = ProtocolState::new(
            node_id,
            config.bucket_size,
            config.depth_modulo,
            config.num_replicas,
            config.cache_size,
            config.client_mode,
            Some(validator),
        );
        let node_info = protocol.node_info();
        let (commands, rx) = mpsc::channel(COMMAND_CAPACITY);
        let owner = Owner {
            protocol,
            blacklist: Blacklist {
                base_time: config.blacklist_time.as_secs_f64(),
                backoff: config.backoff_rate,
                banned_until: HashMap::new(),
                ban_counter: HashMap::new(),
            },
            rpc: rpc.clone(),
            me: commands.downgrade(),
            wait_timeout: config.wait_timeout,
            refresh: RefreshQueue {
                enabled: config.cache_refresh_before_expiry > Duration::ZERO,
                ..RefreshQueue::default()
            },
        };
        let wake = owner.refresh.wake.clone();
        let config_refresh = owner.refresh.enabled;
        tokio::spawn(owner.run(rx));
        let handle = DhtHandle {
            inner: Arc::new(Inner {
                commands,
                rpc,
                config,
                node_id,
                peer_id,
                node_info,
                p2p,
                pending_gets: Mutex::new(HashMap::new()),
                watchdog: Mutex::new(None),
            }),
        };
        if config_refresh {
            tokio::spawn(Self::refresh_cache(Arc::downgrade(&handle.inner), wake));
        }
        handle
    }

    /// hivemind's `_refresh_stale_cache_entries`: fetches cached keys again shortly before they expire
    /// (those used since they were cached), a batch of up to `chunk_size` due keys at a time. Holds
    /// the node only weakly, so it ends with the node.
    async fn refresh_cache(inner: std::sync::Weak<Inner>, wake: Arc<tokio::sync::Notify>) {
        loop {
            let Some(inner) = inner.upgrade() else { return };
            let handle = DhtHandle { inner };
            let chunk = handle.inner.config.chunk_size;
            let before = handle.inner.config.cache_refresh_before_expiry.as_secs_f64();
            let due = handle
                .with(move |o, now| {
                    let due = o.refresh.take_due(now, chunk);
                    let next = o.refresh.earliest();
                    let latest_cached = due
                        .iter()
                        .filter_map(|(k, _)| o.protocol.cache.get(k, now).map(|v| v.expiration_time))
                        .fold(f64::NEG_INFINITY, f64::max);
                    (due, next, latest_cached, now)
                })
                .await;
            let Ok((due, next, latest_cached, now)) = due else {
                return;
            };
            if due.is_empty() {
                drop(handle);
                let wait = next.map(|t| Duration::from_secs_f64((t - now).clamp(0.0, 3600.0)));
                match wait {
                    Some(wait) => {
                        let _ = tokio::time::timeout(wait, wake.notified()).await;
                    }
                    None => wake.notified().await,
                }
                continue;
            }
            let keys: Vec<DhtId> = due.iter().map(|(k, _)| *k).collect();
            let scheduled = due.iter().map(|(_, t)| *t).fold(f64::NEG_INFINITY, f64::max);
            let sufficient = scheduled.max(latest_cached) + before + 1.0;
            tracing::debug!(keys = keys.len(), "refreshing cached keys");
            let _ = handle.get_many_by_id(&keys, sufficient, true).await;
        }
    }

    /// Serves `DHTProtocol.rpc_ping|rpc_store|rpc_find` on `p2p`. Malformed requests are answered with
    /// an error text.
    pub fn register_handlers(&self, p2p: &P2pHandle) -> Result<(), DhtError> {
        fn handler<Req: Message + Default + 'static, Resp: Message + 'static>(
            commands: mpsc::Sender<Command>,
            make: fn(PeerId, Req, oneshot::Sender<Result<Resp, String>>) -> Command,
        ) -> UnaryHandler {
            Arc::new(move |sender: PeerId, bytes: Bytes| {
                let commands = commands.clone();
                async move {
                    let request = Req::decode(bytes).map_err(|e| format!("malformed request: {e}"))?;
                    let (tx, rx) = oneshot::channel();
                    commands
                        .send(make(sender, request, tx))
                        .await
                        .map_err(|_| "the DHT node has shut down".to_owned())?;
                    let response = rx.await.map_err(|_| "the DHT node has shut down".to_owned())??;
                    Ok(Bytes::from(response.encode_to_vec()))
                }
                .boxed()
            })
        }
        let c = &self.inner.commands;
        p2p.add_unary_handler(
            RPC_PING,
            handler::<PingRequest, PingResponse>(c.clone(), |sender, request, reply| Command::Ping {
                sender,
                request,
                reply,
            }),
        )?;
        p2p.add_unary_handler(
            RPC_STORE,
            handler::<StoreRequest, StoreResponse>(c.clone(), |sender, request, reply| Command::Store {
                sender,
                request,
                reply,
            }),
        )?;
        p2p.add_unary_handler(
            RPC_FIND,
            handler::<FindRequest, FindResponse>(c.clone(), |sender, request, reply| Command::Find {
                sender,
                request,
                reply,
            }),
        )?;
        Ok(())
    }

    /// Bootstraps from `peers` (already connected or dialable): pings each (validated if
    /// `ensure_bootstrap_success`), fails with [`DhtError::BootstrapFailed`] if none answers, then
    /// searches for this node's own id to fill the routing table (bounded by the bootstrap timeout).
    pub async fn bootstrap(
        &self,
        peers: &[PeerId],
        tried: usize,
        mut reasons: Vec<String>,
    ) -> Result<(), DhtError> {
        let config = &self.inner.config;
        if tried == 0 && peers.is_empty() {
            return Ok(());
        }
        let timeout = config.bootstrap_timeout.unwrap_or(config.wait_timeout);
        let started = tokio::time::Instant::now();
        let pings = peers
            .iter()
            .map(|p| self.call_ping(*p, config.ensure_bootstrap_success, config.strict));
        let results = futures::future::join_all(pings).await;
        let answered = results.iter().filter(|r| r.is_ok()).count();
        for r in results {
            if let Err(e) = r {
                reasons.push(e);
            }
        }
        if answered == 0 && config.ensure_bootstrap_success {
            return Err(DhtError::BootstrapFailed {
                tried: tried.max(peers.len()),
                reasons: reasons.join("; "),
            });
        }
        let left = timeout.saturating_sub(started.elapsed());
        let _ = tokio::time::timeout(
            left.max(Duration::from_millis(100)),
            self.find_nearest_nodes(&[self.inner.node_id], config.bucket_size, false),
        )
        .await;
        Ok(())
    }

    /// This node's DHT id.
    pub fn node_id(&self) -> DhtId {
        self.inner.node_id
    }

    /// This node's libp2p peer id.
    pub fn peer_id(&self) -> PeerId {
        self.inner.peer_id
    }

    /// The configuration the node runs with.
    pub fn config(&self) -> &DhtConfig {
        &self.inner.config
    }

    /// Stops the node: unregisters its handlers (the p2p host keeps running) and ends the owner task.
    pub async fn shutdown(&self) {
        if let Some(task) = self
            .inner
            .watchdog
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
        {
            task.abort();
        }
        if let Some(p2p) = &self.inner.p2p
            && !self.inner.config.client_mode
        {
            for name in [RPC_PING, RPC_STORE, RPC_FIND] {
                p2p.remove_handler(name);
            }
        }
        let (tx, rx) = oneshot::channel();
        if self.inner.commands.send(Command::Shutdown(tx)).await.is_ok() {
            let _ = rx.await;
        }
    }

    /// Runs `f` on the owner task with the current DHT time.
    async fn with<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Owner, DhtExpiration) -> R + Send + 'static,
    ) -> Result<R, DhtError> {
        let (tx, rx) = oneshot::channel();
        let access: Access = Box::new(move |owner| {
            let _ = tx.send(f(owner, get_dht_time()));
        });
        self.inner
            .commands
            .send(Command::Access(access))
            .await
            .map_err(|_| DhtError::Shutdown)?;
        rx.await.map_err(|_| DhtError::Shutdown)
    }

    async fn report_routing(&self, node_id: Option<DhtId>, peer: PeerId, responded: bool) {
        let _ = self
            .inner
            .commands
            .send(Command::Routing {
                node_id,
                peer,
                responded,
            })
            .await;
    }

    /// `call_ping`: the peer's node id if it answered (and passed validation when `validate`).
    async fn call_ping(&self, peer: PeerId, validate: bool, strict: bool) -> Result<DhtId, String> {
        let request = build_ping_request(self.inner.node_info.clone(), validate);
        let requested = get_dht_time();
        let answer = self
            .inner
            .rpc
            .call_ping(peer, request, self.inner.config.wait_timeout)
            .await;
        let responded_at = get_dht_time();
        let result = match answer {
            Err(e) => Err(format!("{peer}: {e}")),
            Ok(response) => match responder_node_id(response.peer.as_ref()) {
                Ok(Some(id)) => {
                    let mut problem = None;
                    if validate {
                        if !self.inner.config.client_mode && !response.available {
                            problem = Some(format!("{peer} can't access this node"));
                        } else if response.dht_time != 0.0
                            && (response.dht_time < requested - MAX_DHT_TIME_DISCREPANCY_SECONDS
                                || response.dht_time > responded_at + MAX_DHT_TIME_DISCREPANCY_SECONDS)
                        {
                            problem = Some(format!(
                                "local time must be within {MAX_DHT_TIME_DISCREPANCY_SECONDS} seconds of {peer}'s"
                            ));
                        }
                    }
                    match problem {
                        Some(p) if strict => Err(p),
                        Some(p) => {
                            tracing::warn!("{p}");
                            Ok(id)
                        }
                        None => Ok(id),
                    }
                }
                Ok(None) => Err(format!("{peer} sent no node id")),
                Err(e) => Err(format!("{peer}: {e}")),
            },
        };
        self.report_routing(result.as_ref().ok().copied(), peer, result.is_ok())
            .await;
        result
    }

    /// `call_store`: one flag per item, or `None` if the peer did not answer properly.
    async fn call_store(&self, peer: PeerId, items: Vec<StoreItem>) -> Option<Vec<bool>> {
        let request = build_store_request(self.inner.node_info.clone(), &items);
        let answer = self
            .inner
            .rpc
            .call_store(peer, request, self.inner.config.wait_timeout)
            .await;
        match answer {
            Ok(response) => {
                let node_id = responder_node_id(response.peer.as_ref()).ok().flatten();
                if node_id.is_some() {
                    self.report_routing(node_id, peer, true).await;
                }
                parse_store_response(&response, items.len()).ok()
            }
            Err(e) => {
                tracing::debug!(%peer, error = %e, "call_store failed");
                self.report_routing(None, peer, false).await;
                None
            }
        }
    }

    /// `_call_find_with_blacklist`: skips blacklisted peers; drops blacklisted neighbours.
    async fn call_find(&self, peer: PeerId, keys: Vec<DhtId>) -> Option<Vec<FindOutcome>> {
        let banned = self
            .with(move |o, now| o.blacklist.contains(&peer, now))
            .await
            .ok()?;
        if banned {
            return None;
        }
        let request = build_find_request(self.inner.node_info.clone(), &keys);
        let answer = self
            .inner
            .rpc
            .call_find(peer, request, self.inner.config.wait_timeout)
            .await;
        self.with(move |o, now| match answer {
            Ok(response) => {
                let node_id = responder_node_id(response.peer.as_ref()).ok().flatten();
                if node_id.is_some() {
                    o.update_routing(node_id, peer, true);
                }
                match parse_find_response(&keys, &response, o.protocol.validator.as_ref()) {
                    Ok(mut outcomes) => {
                        o.blacklist.register_success(&peer);
                        for outcome in &mut outcomes {
                            outcome.nearest.retain(|(_, p)| !o.blacklist.contains(p, now));
                        }
                        Some(outcomes)
                    }
                    Err(e) => {
                        tracing::debug!(%peer, error = %e, "bad find response");
                        o.blacklist.register_failure(peer, now);
                        None
                    }
                }
            }
            Err(e) => {
                tracing::debug!(%peer, error = %e, "call_find failed");
                o.update_routing(None, peer, false);
                o.blacklist.register_failure(peer, now);
                None
            }
        })
        .await
        .ok()
        .flatten()
    }

    /// Nearest non-blacklisted known nodes for each query, from the routing table.
    async fn initial_nodes(&self, queries: Vec<DhtId>, k: usize) -> HashMap<DhtId, PeerId> {
        let own = self.inner.node_id;
        self.with(move |o, now| {
            let mut out = HashMap::new();
            for q in &queries {
                for (n, p) in o.protocol.routing_table.get_nearest_neighbors(q, k, Some(&own)) {
                    if !o.blacklist.contains(&p, now) {
                        out.insert(n, p);
                    }
                }
            }
            out
        })
        .await
        .unwrap_or_default()
    }

    /// hivemind's `find_nearest_nodes`: up to `k_nearest` nearest nodes per query (this node included
    /// unless `exclude_self`), nearest first.
    pub async fn find_nearest_nodes(
        &self,
        queries: &[DhtId],
        k_nearest: usize,
        exclude_self: bool,
    ) -> HashMap<DhtId, Vec<(DhtId, PeerId)>> {
        let config = &self.inner.config;
        let beam_size = config.bucket_size.max(k_nearest);
        let node_to_peer = Arc::new(Mutex::new(self.initial_nodes(queries.to_vec(), beam_size).await));
        let initial: Vec<DhtId> = lock(&node_to_peer).keys().copied().collect();
        let own = self.inner.node_id;
        let params = TraverseParams {
            beam_size,
            num_workers: config.num_workers,
            queries_per_call: ((queries.len() as f64).sqrt() as usize).max(1),
        };
        let get_neighbors = |peer: DhtId, qs: Vec<DhtId>| {
            let this = self.clone();
            let map = node_to_peer.clone();
            async move { Ok::<_, std::convert::Infallible>(this.neighbors(&map, peer, qs, None).await) }
        };
        let visited = queries.iter().map(|q| (*q, HashSet::from([own]))).collect();
        let result = traverse_dht(queries, &initial, params, get_neighbors, |_, _, _| {}, visited).await;
        let map = lock(&node_to_peer);
        let mut out = HashMap::new();
        for q in queries {
            let mut nearest: Vec<DhtId> = result.nearest.get(q).cloned().unwrap_or_default();
            nearest.retain(|n| *n != own);
            if !exclude_self {
                nearest.push(own);
                nearest.sort_by_key(|n| q.xor_distance(n));
            }
            let with_peers = nearest
                .into_iter()
                .filter_map(|n| {
                    if n == own {
                        Some((n, self.inner.peer_id))
                    } else {
                        map.get(&n).map(|p| (n, *p))
                    }
                })
                .take(k_nearest)
                .collect();
            out.insert(*q, with_peers);
        }
        out
    }

    /// One `get_neighbors` call of a traversal: `call_find` to `peer`, learning the peers it names and
    /// feeding found values to `searches` (whose `finished` flags stop the search).
    async fn neighbors(
        &self,
        map: &Mutex<HashMap<DhtId, PeerId>>,
        peer: DhtId,
        queries: Vec<DhtId>,
        searches: Option<&Mutex<HashMap<DhtId, SearchState>>>,
    ) -> NeighborsReply {
        let peer_id = lock(map).get(&peer).copied();
        let outcomes = match peer_id {
            Some(p) => self.call_find(p, queries.clone()).await,
            None => None,
        };
        let Some(outcomes) = outcomes else {
            return queries.into_iter().map(|q| (q, (Vec::new(), false))).collect();
        };
        let mut map = lock(map);
        let mut searches = searches.map(lock);
        let mut out = NeighborsReply::new();
        for (q, outcome) in queries.into_iter().zip(outcomes) {
            map.extend(outcome.nearest.iter().copied());
            let finished = match searches.as_mut().and_then(|s| s.get_mut(&q)) {
                Some(search) => {
                    search.add_candidate(outcome.value, peer);
                    search.finished
                }
                None => false,
            };
            out.insert(
                q,
                (outcome.nearest.into_iter().map(|(n, _)| n).collect(), finished),
            );
        }
        out
    }

    /// `store`: `key` (and `subkey`) ← `value` until `expiration`, on the `num_replicas` nearest
    /// nodes. As in hivemind, the flag is the answer of the last replica that replied: `Ok(false)` when
    /// none was reachable, or the last one refused (it holds a newer value, or its validator rejected the
    /// record).
    pub async fn store(
        &self,
        key: Value,
        value: Value,
        expiration: DhtExpiration,
        subkey: Option<Value>,
    ) -> Result<bool, DhtError> {
        let ok = self
            .store_many(
                vec![StoreEntry {
                    key,
                    subkey,
                    value,
                    expiration,
                }],
                false,
            )
            .await?;
        Ok(ok.first().copied().unwrap_or(false))
    }

    /// hivemind's `store_many`: one flag per entry, in order.
    pub async fn store_many(
        &self,
        entries: Vec<StoreEntry>,
        exclude_self: bool,
    ) -> Result<Vec<bool>, DhtError> {
        // group by key id, keeping the first-seen order
        let mut groups: Vec<(DhtId, Vec<usize>)> = Vec::new();
        let mut records = Vec::with_capacity(entries.len());
        for (i, e) in entries.iter().enumerate() {
            let key_id = DhtId::from_key(&e.key);
            match groups.iter_mut().find(|(k, _)| *k == key_id) {
                Some((_, v)) => v.push(i),
                None => groups.push((key_id, vec![i])),
            }
            let subkey_bytes = match &e.subkey {
                Some(s) => msgpack::encode(s),
                None => IS_REGULAR_VALUE.to_vec(),
            };
            records.push(DhtRecord::new(
                key_id,
                subkey_bytes,
                msgpack::encode(&e.value),
                e.expiration,
            ));
        }
        // sign on the owner task, where the validator lives
        let records = self
            .with(move |o, _| {
                records
                    .into_iter()
                    .map(|r| match o.protocol.validator.as_ref() {
                        Some(v) => v.sign_value(&r).map(|value| r.with_value(value)),
                        None => Ok(r),
                    })
                    .collect::<Result<Vec<_>, _>>()
            })
            .await??;
        let key_ids: Vec<DhtId> = groups.iter().map(|(k, _)| *k).collect();
        let nearest = self
            .find_nearest_nodes(&key_ids, self.inner.config.num_replicas, exclude_self)
            .await;
        let records = Arc::new(records);
        let entries = Arc::new(entries);
        let per_key = groups.into_iter().map(|(key_id, idx)| {
            let candidates = nearest.get(&key_id).cloned().unwrap_or_default();
            let (records, entries) = (records.clone(), entries.clone());
            async move {
                let oks = self.store_key(key_id, &idx, &records, &entries, candidates).await;
                idx.into_iter().zip(oks).collect::<Vec<_>>()
            }
        });
        let mut store_ok = vec![false; entries.len()];
        for group in futures::future::join_all(per_key).await {
            for (i, ok) in group {
                store_ok[i] = ok;
            }
        }
        Ok(store_ok)
    }

    /// `on_found` of `store_many` for one key: store on the nearest untried candidates until
    /// `num_replicas` succeed, then update the local cache.
    async fn store_key(
        &self,
        key_id: DhtId,
        idx: &[usize],
        records: &[DhtRecord],
        entries: &[StoreEntry],
        candidates: Vec<(DhtId, PeerId)>,
    ) -> Vec<bool> {
        let replicas = self.inner.config.num_replicas;
        let mut candidates = std::collections::VecDeque::from(candidates);
        let mut store_ok = vec![false; idx.len()];
        let mut successes = 0;
        let mut pending = FuturesUnordered::new();
        let items: Vec<StoreItem> = idx
            .iter()
            .map(|&i| StoreItem {
                key: key_id,
                subkey: entries[i].subkey.clone(),
                value: StoredValue::Regular(records[i].value.clone()),
                expiration_time: records[i].expiration_time,
                in_cache: false,
            })
            .collect();
        while successes < replicas && (!candidates.is_empty() || !pending.is_empty()) {
            while successes + pending.len() < replicas {
                let Some((node_id, peer)) = candidates.pop_front() else {
                    break;
                };
                if node_id == self.inner.node_id {
                    successes += 1;
                    let items = items.clone();
                    let recs: Vec<DhtRecord> = idx.iter().map(|&i| records[i].clone()).collect();
                    if let Ok(oks) = self
                        .with(move |o, now| {
                            items
                                .into_iter()
                                .zip(recs)
                                .map(|(item, record)| {
                                    let valid = o
                                        .protocol
                                        .validator
                                        .as_ref()
                                        .is_none_or(|v| v.validate(&record).unwrap_or(false));
                                    valid
                                        && o.protocol.storage.store(
                                            key_id,
                                            record.value,
                                            record.expiration_time,
                                            item.subkey,
                                            now,
                                        )
                                })
                                .collect::<Vec<bool>>()
                        })
                        .await
                    {
                        store_ok = oks;
                    }
                } else {
                    pending.push(self.call_store(peer, items.clone()));
                }
            }
            if let Some(result) = pending.next().await
                && let Some(oks) = result
            {
                successes += 1;
                store_ok = oks;
            }
        }
        if self.inner.config.cache_on_store {
            let oks = store_ok.clone();
            let _ = self
                .with(move |o, now| update_cache_on_store(o, key_id, items, &oks, now))
                .await;
        }
        store_ok
    }

    /// `get`: the value of `key` if any node holds a live one; with `latest`, the freshest in the beam.
    pub async fn get(&self, key: Value, latest: bool) -> Result<Option<Found>, DhtError> {
        Ok(self.get_many(vec![key], latest).await?.pop().flatten())
    }

    /// `get_many`: one result per key, in order.
    pub async fn get_many(&self, keys: Vec<Value>, latest: bool) -> Result<Vec<Option<Found>>, DhtError> {
        let key_ids: Vec<DhtId> = keys.iter().map(DhtId::from_key).collect();
        let sufficient = if latest { f64::INFINITY } else { get_dht_time() };
        let found = self.get_many_by_id(&key_ids, sufficient, false).await?;
        let mut out = Vec::with_capacity(keys.len());
        for id in key_ids {
            out.push(match found.get(&id).cloned().flatten() {
                None => None,
                Some(v) => Some(self.decode(id, v).await?),
            });
        }
        Ok(out)
    }

    async fn decode(
        &self,
        key_id: DhtId,
        found: ValueWithExpiration<StoredValue>,
    ) -> Result<Found, DhtError> {
        self.with(move |o, _| {
            let strip = |record: DhtRecord| match o.protocol.validator.as_ref() {
                Some(v) => v.strip_value(&record),
                None => record.value,
            };
            let decode =
                |bytes: Vec<u8>| msgpack::decode(&bytes).map_err(|e| DhtError::Decode(e.to_string()));
            match found.value {
                StoredValue::Regular(bytes) => Ok(Found::Regular {
                    value: decode(strip(DhtRecord::regular(key_id, bytes, found.expiration_time)))?,
                    expiration: found.expiration_time,
                }),
                StoredValue::Dictionary(d) => {
                    let mut entries = Vec::with_capacity(d.len());
                    for e in d.into_entries() {
                        let exp = e.expiration_time.as_f64();
                        let record = DhtRecord::new(key_id, msgpack::encode(&e.subkey), e.value, exp);
                        // one undecodable sub-entry (e.g. signed for a validator this node does not
                        // run) must not hide the others
                        match decode(strip(record)) {
                            Ok(value) => entries.push((e.subkey, value, exp)),
                            Err(err) => tracing::debug!(%err, "skipping an undecodable dictionary entry"),
                        }
                    }
                    Ok(Found::Dictionary {
                        entries,
                        expiration: found.expiration_time,
                    })
                }
            }
        })
        .await?
    }

    /// hivemind's `get_many_by_id` (without background cache refresh and request reuse).
    ///
    /// A `refresh` (from the cache refresher) ignores the cache, caches what it finds even without
    /// `cache_locally`, and schedules no further refresh.
    async fn get_many_by_id(
        &self,
        key_ids: &[DhtId],
        sufficient: DhtExpiration,
        refresh: bool,
    ) -> Result<HashMap<DhtId, Option<ValueWithExpiration<StoredValue>>>, DhtError> {
        let own = self.inner.node_id;
        let ids = key_ids.to_vec();
        let local = self
            .with(move |o, now| {
                ids.iter()
                    .map(|k| (*k, o.protocol.storage.get(k, now), o.protocol.cache.get(k, now)))
                    .collect::<Vec<_>>()
            })
            .await?;
        let mut searches = HashMap::new();
        for (k, stored, cached) in local {
            let search = searches.entry(k).or_insert_with(|| SearchState::new(sufficient));
            search.add_candidate(stored, own);
            if !refresh {
                search.add_candidate(cached, own);
            }
        }
        let unfinished: Vec<DhtId> = searches
            .iter()
            .filter(|(_, s)| !s.finished)
            .map(|(k, _)| *k)
            .collect();
        let searches: Arc<Searches> = Arc::new(Mutex::new(searches));
        let reuse = self.inner.config.reuse_get_requests && !refresh;
        static CALLS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let call_id = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if reuse {
            let mut pending = lock(&self.inner.pending_gets);
            for k in &unfinished {
                pending
                    .entry(*k)
                    .or_default()
                    .push((call_id, Arc::downgrade(&searches)));
            }
        }
        let mut nearest_found: HashMap<DhtId, Vec<DhtId>> = HashMap::new();
        let node_to_peer = Arc::new(Mutex::new(HashMap::new()));
        if !unfinished.is_empty() {
            let config = &self.inner.config;
            *lock(&node_to_peer) = self.initial_nodes(unfinished.clone(), config.bucket_size).await;
            let initial: Vec<DhtId> = lock(&node_to_peer).keys().copied().collect();
            let params = TraverseParams {
                beam_size: config.bucket_size,
                num_workers: config.num_workers,
                queries_per_call: ((unfinished.len() as f64).sqrt() as usize)
                    .clamp(1, config.chunk_size.max(1)),
            };
            let get_neighbors = |peer: DhtId, qs: Vec<DhtId>| {
                let this = self.clone();
                let map = node_to_peer.clone();
                let searches = searches.clone();
                async move {
                    Ok::<_, std::convert::Infallible>(this.neighbors(&map, peer, qs, Some(&searches)).await)
                }
            };
            let visited = unfinished.iter().map(|q| (*q, HashSet::from([own]))).collect();
            traverse_dht(
                &unfinished,
                &initial,
                params,
                get_neighbors,
                |q, nearest, _| {
                    nearest_found.insert(q, nearest.to_vec());
                },
                visited,
            )
            .await;
        }
        let searches = std::mem::take(&mut *lock(&searches));
        if reuse {
            self.share_results(call_id, &unfinished, &searches);
        }
        let sources: HashMap<DhtId, Option<DhtId>> = searches.iter().map(|(k, s)| (*k, s.source)).collect();
        let mut out = HashMap::new();
        for (k, search) in searches {
            let result = match (search.value, search.expiration_time) {
                (Some(value), Some(expiration_time)) => Some(ValueWithExpiration {
                    value,
                    expiration_time,
                }),
                _ => None,
            };
            if let Some(found) = &result
                && let Some(nearest) = nearest_found.get(&k)
            {
                let peers: Vec<(DhtId, PeerId)> = {
                    let map = lock(&node_to_peer);
                    nearest
                        .iter()
                        .filter(|n| **n != own && Some(**n) != search.source)
                        .filter_map(|n| map.get(n).map(|p| (*n, *p)))
                        .take(self.inner.config.cache_nearest)
                        .collect()
                };
                self.cache_new_result(k, found.clone(), peers, refresh).await;
            }
            out.insert(k, result);
        }
        let before = self.inner.config.cache_refresh_before_expiry.as_secs_f64();
        if !refresh && before > 0.0 {
            // `_trigger_cache_refresh`: a value this node served itself from its cache is fetched again
            // shortly before it expires, so that a key in use stays fresh.
            let served: Vec<(DhtId, DhtExpiration)> = out
                .iter()
                .filter_map(|(k, v)| Some((*k, v.as_ref()?.expiration_time)))
                .filter(|(k, _)| sources.get(k) == Some(&Some(own)))
                .collect();
            if !served.is_empty() {
                let _ = self
                    .with(move |o, now| {
                        for (k, exp) in served {
                            if o.protocol.cache.get(&k, now).is_some() {
                                o.refresh.schedule(k, exp - before);
                            }
                        }
                    })
                    .await;
            }
        }
        Ok(out)
    }

    /// `_reuse_finished_search_result`: this get is over; every other get of the same keys still in
    /// flight takes what it found as a candidate (and stops early when that suffices).
    fn share_results(&self, call_id: u64, keys: &[DhtId], searches: &HashMap<DhtId, SearchState>) {
        let mut others: Vec<(DhtId, Arc<Searches>)> = Vec::new();
        {
            let mut pending = lock(&self.inner.pending_gets);
            for k in keys {
                if let Some(list) = pending.get_mut(k) {
                    list.retain(|(id, weak)| *id != call_id && weak.strong_count() > 0);
                    others.extend(list.iter().filter_map(|(_, w)| w.upgrade()).map(|s| (*k, s)));
                    if list.is_empty() {
                        pending.remove(k);
                    }
                }
            }
        }
        for (k, other) in others {
            let Some(found) = searches.get(&k) else { continue };
            let (Some(value), Some(expiration_time), Some(source)) =
                (found.value.clone(), found.expiration_time, found.source)
            else {
                continue;
            };
            if let Some(search) = lock(&other).get_mut(&k) {
                search.add_candidate(
                    Some(ValueWithExpiration {
                        value,
                        expiration_time,
                    }),
                    source,
                );
            }
        }
    }

    /// `_cache_new_result`: cache a found value locally and push it (`in_cache`) to nearby nodes, when
    /// it is newer than what this node holds.
    async fn cache_new_result(
        &self,
        key_id: DhtId,
        found: ValueWithExpiration<StoredValue>,
        push_to: Vec<(DhtId, PeerId)>,
        refresh: bool,
    ) {
        let cache_locally = self.inner.config.cache_locally || refresh;
        let value = found.clone();
        let newer = self
            .with(move |o, now| {
                let held = [
                    o.protocol.storage.get(&key_id, now),
                    o.protocol.cache.get(&key_id, now),
                ]
                .into_iter()
                .flatten()
                .map(|v| v.expiration_time)
                .fold(f64::NEG_INFINITY, f64::max);
                let newer = value.expiration_time > held;
                if newer && cache_locally {
                    o.protocol
                        .cache
                        .timed()
                        .store(key_id, value.value, value.expiration_time, now);
                }
                newer
            })
            .await
            .unwrap_or(false);
        if !newer {
            return;
        }
        for (_, peer) in push_to {
            let this = self.clone();
            let item = StoreItem {
                key: key_id,
                subkey: None,
                value: found.value.clone(),
                expiration_time: found.expiration_time,
                in_cache: true,
            };
            tokio::spawn(async move {
                this.call_store(peer, vec![item]).await;
            });
        }
    }

    /// Whether this node's own storage (not its cache) holds a live value for `key`.
    pub async fn holds(&self, key: &Value) -> Result<bool, DhtError> {
        let id = DhtId::from_key(key);
        self.with(move |o, now| o.protocol.storage.get(&id, now).is_some())
            .await
    }

    /// How many nodes this node's routing table holds.
    pub async fn routing_table_len(&self) -> Result<usize, DhtError> {
        self.with(|o, _| o.protocol.routing_table.len()).await
    }
}

/// `_update_cache_on_store`: cache a stored regular value; refresh a cached key at once when the store
/// showed the cache is stale, or when a dictionary key's cached copy misses sub-keys stored elsewhere.
fn update_cache_on_store(
    o: &mut Owner,
    key_id: DhtId,
    items: Vec<StoreItem>,
    oks: &[bool],
    now: DhtExpiration,
) {
    let succeeded = oks.iter().any(|ok| *ok);
    let is_dictionary = items.iter().any(|i| i.subkey.is_some());
    if succeeded && !is_dictionary {
        let best = items
            .into_iter()
            .filter_map(|i| match i.value {
                StoredValue::Regular(v) => Some((i.expiration_time, v)),
                StoredValue::Dictionary(_) => None,
            })
            .max_by(|a, b| a.0.total_cmp(&b.0).then_with(|| a.1.cmp(&b.1)));
        if let Some((exp, value)) = best {
            o.protocol.cache.store(key_id, value, exp, None, now);
        }
    } else if !succeeded && !is_dictionary {
        // every replica refused: if the cached copy is no newer than what they refused, it is stale
        let rejected = items
            .iter()
            .map(|i| i.expiration_time)
            .fold(f64::NEG_INFINITY, f64::max);
        if o.protocol
            .cache
            .get(&key_id, now)
            .is_some_and(|cached| cached.expiration_time <= rejected)
        {
            o.refresh.schedule(key_id, now);
        }
    } else if is_dictionary && o.protocol.cache.get(&key_id, now).is_some() {
        for (item, ok) in items.into_iter().zip(oks) {
            if let (true, StoredValue::Regular(v)) = (*ok, item.value) {
                o.protocol
                    .cache
                    .store(key_id, v, item.expiration_time, item.subkey, now);
            }
        }
        o.refresh.schedule(key_id, now);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;
    use apiary_wire::msgpack::DictionaryDhtValue;

    #[test]
    fn blacklist_backs_off_exponentially_and_forgives_on_success() {
        let mut b = Blacklist {
            base_time: 5.0,
            backoff: 2.0,
            banned_until: HashMap::new(),
            ban_counter: HashMap::new(),
        };
        let p = PeerId::random();
        assert!(!b.contains(&p, 0.0));
        b.register_failure(p, 0.0);
        assert!(b.contains(&p, 4.9) && !b.contains(&p, 5.1));
        // failures while banned do not extend the ban
        b.register_failure(p, 1.0);
        assert!(!b.contains(&p, 5.1));
        b.register_failure(p, 10.0);
        assert!(b.contains(&p, 19.9) && !b.contains(&p, 20.1));
        b.register_failure(p, 30.0);
        assert!(b.contains(&p, 49.9) && !b.contains(&p, 50.1));
        b.register_success(&p);
        b.register_failure(p, 100.0);
        assert!(!b.contains(&p, 105.1));
    }

    #[test]
    fn search_merges_dictionaries_and_stops_when_sufficient() {
        let (n1, n2) = (DhtId::random(), DhtId::random());
        let dict = |entries: &[(&str, f64)]| {
            let mut d = DictionaryDhtValue::new();
            for (k, e) in entries {
                d.store(Value::str(*k), vec![1], *e);
            }
            let latest = entries.iter().map(|(_, e)| *e).fold(f64::NEG_INFINITY, f64::max);
            Some(ValueWithExpiration {
                value: StoredValue::Dictionary(d),
                expiration_time: latest,
            })
        };
        let mut s = SearchState::new(f64::INFINITY);
        s.add_candidate(dict(&[("a", 10.0)]), n1);
        s.add_candidate(dict(&[("b", 20.0)]), n2);
        s.add_candidate(dict(&[("a", 5.0)]), n2);
        let Some(StoredValue::Dictionary(d)) = &s.value else {
            panic!()
        };
        assert_eq!(d.len(), 2);
        assert_eq!(
            (s.expiration_time, s.source, s.finished),
            (Some(20.0), Some(n2), false)
        );

        let mut s = SearchState::new(15.0);
        let regular = |e: f64| {
            Some(ValueWithExpiration {
                value: StoredValue::Regular(vec![e as u8]),
                expiration_time: e,
            })
        };
        s.add_candidate(regular(10.0), n1);
        assert!(!s.finished);
        s.add_candidate(regular(16.0), n2);
        assert!(s.finished);
        s.add_candidate(regular(30.0), n1);
        assert_eq!(
            s.expiration_time,
            Some(16.0),
            "a finished search takes nothing more"
        );
    }
}
