//! The host: one task owning the `Swarm`, reached through a cloneable [`P2pHandle`].

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

use apiary_wire::rpc::{self as wire, END_OF_STREAM, RpcError};
use bytes::Bytes;
use futures::stream::BoxStream;
use futures::{AsyncReadExt, AsyncWriteExt, StreamExt};
use libp2p::core::transport::ListenerId;
use libp2p::multiaddr::Protocol;
use libp2p::swarm::behaviour::toggle::Toggle;
use libp2p::swarm::dial_opts::DialOpts;
use libp2p::swarm::{ConnectionId, NetworkBehaviour, SwarmEvent};
use libp2p::{Multiaddr, PeerId, Stream, Swarm, autonat, dcutr, identify, ping, relay, upnp};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, TryAcquireError, mpsc, oneshot, watch};

use crate::behaviour::{self, Names, OpenError, Pinned};
use crate::config::{P2pConfig, RELAY_RETRY_MAX, RELAY_RETRY_MIN};
use crate::connectivity::{Connectivity, HolePunches, Link, Links, RelayStatus};
use crate::routing::{self, AddressBook, KadKey, PeerRecord};
use crate::rpc::{self, Frame, Handler, InvalidName, ReadError, StreamHandler, UnaryHandler};

#[derive(NetworkBehaviour)]
struct Behaviour {
    rpc: behaviour::Behaviour,
    identify: identify::Behaviour,
    ping: ping::Behaviour,
    relay_client: Toggle<relay::client::Behaviour>,
    relay: Toggle<relay::Behaviour>,
    dcutr: Toggle<dcutr::Behaviour>,
    autonat: Toggle<autonat::Behaviour>,
    upnp: Toggle<upnp::tokio::Behaviour>,
}

/// Whether other peers can dial this host, as AutoNAT finds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Reachability {
    /// Not known (always so with AutoNAT off).
    #[default]
    Unknown,
    /// Peers dialed this host back on one of its addresses.
    Public,
    /// Peers could not dial this host back: behind NAT or a firewall.
    Private,
}

/// Why the host could not start or do what it was asked.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    /// Building the transports failed.
    #[error("could not build the libp2p transport: {0}")]
    Transport(String),
    /// Listening failed.
    #[error("could not listen on {addr}: {reason}")]
    Listen { addr: Multiaddr, reason: String },
    /// Dialing failed.
    #[error("could not dial {addr}: {reason}")]
    Dial { addr: Multiaddr, reason: String },
    /// No peer asked on `/ipfs/kad/1.0.0` knew an address of the peer.
    #[error("peer {0} not found")]
    PeerNotFound(PeerId),
    /// The host's event loop has stopped.
    #[error("the p2p host has shut down")]
    Shutdown,
}

/// Why an RPC call failed.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// The handler name is not a hivemind handler name.
    #[error(transparent)]
    InvalidName(#[from] InvalidName),
    /// The request was refused before sending (e.g. an envelope over 4 MiB, which p2pd never reads).
    #[error("request refused before sending: {0}")]
    Refused(RpcError),
    /// Too many calls in flight.
    #[error("too many calls in flight ({scope} limit of {limit})")]
    TooManyInFlight { scope: &'static str, limit: usize },
    /// The stream could not be opened (unknown handler, unreachable peer).
    #[error(transparent)]
    Open(#[from] OpenError),
    /// The call took longer than its timeout.
    #[error("call timed out")]
    Timeout,
    /// The remote handler failed; its error text.
    #[error("remote handler error: {0}")]
    Remote(String),
    /// The reply could not be read or was malformed.
    #[error("bad reply: {0}")]
    Reply(#[from] ReadError),
    /// The reply answered another call.
    #[error("reply carries another call id")]
    CallIdMismatch,
    /// The host has shut down.
    #[error("the p2p host has shut down")]
    Shutdown,
}

impl From<std::io::Error> for CallError {
    fn from(e: std::io::Error) -> Self {
        Self::Reply(ReadError::Io(e))
    }
}

#[derive(Debug)]
enum Command {
    Listen {
        addr: Multiaddr,
        reply: oneshot::Sender<Result<Multiaddr, HostError>>,
    },
    Dial {
        addr: Multiaddr,
        reply: oneshot::Sender<Result<PeerId, HostError>>,
    },
    AddAddresses {
        peer: PeerId,
        addrs: Vec<Multiaddr>,
    },
    Closest {
        key: KadKey,
        exclude: Option<PeerId>,
        reply: oneshot::Sender<Vec<PeerRecord>>,
    },
    AddExternalAddress {
        addr: Multiaddr,
    },
    /// Try a trusted relay's reservation again (after its backoff).
    RetryRelay {
        index: usize,
    },
    OpenStream {
        peer: PeerId,
        name: String,
        reply: oneshot::Sender<Result<Stream, OpenError>>,
    },
    Shutdown {
        reply: oneshot::Sender<()>,
    },
}

#[derive(Debug)]
struct Limits {
    total: Arc<Semaphore>,
    total_max: usize,
    per_peer: Mutex<HashMap<PeerId, Arc<Semaphore>>>,
    per_peer_max: usize,
}

/// Permits held for the duration of one outgoing call.
#[derive(Debug)]
struct CallPermit {
    _total: OwnedSemaphorePermit,
    _peer: OwnedSemaphorePermit,
}

impl Limits {
    fn acquire(&self, peer: PeerId) -> Result<CallPermit, CallError> {
        let full = |scope, limit| {
            move |e: TryAcquireError| match e {
                TryAcquireError::Closed => CallError::Shutdown,
                TryAcquireError::NoPermits => CallError::TooManyInFlight { scope, limit },
            }
        };
        let peer_sem = {
            let mut map = self.per_peer.lock().unwrap_or_else(PoisonError::into_inner);
            if map.len() > 4096 {
                let max = self.per_peer_max;
                map.retain(|_, s| s.available_permits() < max);
            }
            map.entry(peer)
                .or_insert_with(|| Arc::new(Semaphore::new(self.per_peer_max)))
                .clone()
        };
        let peer_permit = peer_sem
            .try_acquire_owned()
            .map_err(full("per-peer", self.per_peer_max))?;
        let total = self
            .total
            .clone()
            .try_acquire_owned()
            .map_err(full("total", self.total_max))?;
        Ok(CallPermit {
            _total: total,
            _peer: peer_permit,
        })
    }
}

/// The circuit relay v2 service's protocol, as identify lists it.
const RELAY_HOP_PROTOCOL: &str = "/libp2p/circuit/relay/0.2.0/hop";

/// Peers asked at once by a lookup.
const LOOKUP_PARALLELISM: usize = 3;
/// Peers asked at most by one lookup before it gives up.
const LOOKUP_MAX_ASKED: usize = 3 * routing::K;
/// How long one `FIND_NODE` answer may take.
const LOOKUP_QUERY_TIMEOUT: Duration = Duration::from_secs(5);
/// An inbound kad stream with no request for this long is closed (go-libp2p-kad-dht reuses streams).
const KAD_STREAM_IDLE: Duration = Duration::from_secs(60);

/// A cloneable handle to the host's event loop.
#[derive(Debug, Clone)]
pub struct P2pHandle {
    commands: mpsc::Sender<Command>,
    local_peer_id: PeerId,
    handlers: Names,
    limits: Arc<Limits>,
    max_stream_frame: u64,
    listen_addrs: watch::Receiver<Vec<Multiaddr>>,
    visible_addrs: watch::Receiver<Vec<Multiaddr>>,
    reachability: watch::Receiver<Reachability>,
    peers: watch::Receiver<Vec<PeerId>>,
    connectivity: watch::Receiver<Connectivity>,
    links: Links,
    pinned: Pinned,
}

/// A relay from [`P2pConfig::trusted_relays`] and the state of its reservation.
#[derive(Debug)]
struct TrustedRelay {
    peer: PeerId,
    /// Its address without `/p2p/`.
    addr: Multiaddr,
    /// The circuit listener holding (or asking for) the reservation.
    listener: Option<ListenerId>,
    /// The wait before the next try.
    backoff: Duration,
    retry_pending: bool,
    /// Waiting for a connection to the relay before asking (asking while another dial to it is in
    /// flight would fail).
    connecting: bool,
}

/// A dial asked for through [`P2pHandle::dial`], waiting for its outcome.
type PendingDial = (Multiaddr, oneshot::Sender<Result<PeerId, HostError>>);

/// Whether `addr` goes through a relay.
fn is_relayed(addr: &Multiaddr) -> bool {
    addr.iter().any(|p| matches!(p, Protocol::P2pCircuit))
}

/// Whether `addr` is a loopback address (never dialable from another machine).
fn is_loopback(addr: &Multiaddr) -> bool {
    match addr.iter().next() {
        Some(Protocol::Ip4(ip)) => ip.is_loopback(),
        Some(Protocol::Ip6(ip)) => ip.is_loopback(),
        _ => false,
    }
}

/// How many observed addresses the status keeps.
const OBSERVED_ADDRS: usize = 8;

/// The libp2p host; [`Host::spawn`] starts its event loop.
#[derive(Debug)]
pub struct Host;

impl Host {
    /// Builds the swarm, listens on `config.listen_addrs`, and spawns the event loop on the current tokio
    /// runtime. Returns the handle and the event loop's join handle.
    pub fn spawn(config: P2pConfig) -> Result<(P2pHandle, tokio::task::JoinHandle<()>), HostError> {
        let keypair = config
            .keypair
            .clone()
            .unwrap_or_else(libp2p::identity::Keypair::generate_ed25519);
        let handlers: Names = Arc::new(RwLock::new(HashMap::new()));
        let names = handlers.clone();
        let pinned: Pinned = Arc::default();
        let agent = config.agent_version.clone();
        let (transport, relay_client) = crate::transport::build(&keypair, &config)?;
        let mut trusted = Vec::new();
        for full in &config.trusted_relays {
            let mut addr = full.clone();
            let Some(Protocol::P2p(peer)) = addr.pop() else {
                return Err(HostError::Dial {
                    addr: full.clone(),
                    reason: "a trusted relay's address must end with /p2p/<peer id>".into(),
                });
            };
            trusted.push(TrustedRelay {
                peer,
                addr,
                listener: None,
                backoff: RELAY_RETRY_MIN,
                retry_pending: false,
                connecting: false,
            });
        }
        let peer = keypair.public().to_peer_id();
        let behaviour = Behaviour {
            rpc: behaviour::Behaviour::new(
                names,
                pinned.clone(),
                AddressBook::new(peer, config.address_book_capacity),
                config.kad_server_mode,
            ),
            identify: identify::Behaviour::new(
                identify::Config::new("ipfs/0.1.0".into(), keypair.public())
                    .with_agent_version(agent)
                    // a relayed address appears after the connections are made: tell peers (the relay
                    // answers peer-routing queries with it)
                    .with_push_listen_addr_updates(true),
            ),
            ping: ping::Behaviour::default(),
            relay_client: relay_client.into(),
            relay: config
                .relay_service
                .as_ref()
                .map(|limits| relay::Behaviour::new(peer, limits.to_relay_config()))
                .into(),
            dcutr: config.dcutr.then(|| dcutr::Behaviour::new(peer)).into(),
            autonat: config
                .autonat
                .then(|| {
                    let autonat_config = autonat::Config {
                        boot_delay: config.autonat_boot_delay,
                        only_global_ips: config.autonat_only_global_ips,
                        ..autonat::Config::default()
                    };
                    autonat::Behaviour::new(peer, autonat_config)
                })
                .into(),
            upnp: config.upnp.then(upnp::tokio::Behaviour::default).into(),
        };
        let mut swarm = Swarm::new(
            transport,
            behaviour,
            peer,
            libp2p::swarm::Config::with_tokio_executor()
                .with_idle_connection_timeout(config.idle_connection_timeout),
        );
        for addr in &config.external_addrs {
            swarm.add_external_address(addr.clone());
        }
        for addr in &config.listen_addrs {
            swarm.listen_on(addr.clone()).map_err(|e| HostError::Listen {
                addr: addr.clone(),
                reason: e.to_string(),
            })?;
        }
        let (commands, command_rx) = mpsc::channel(config.command_capacity.max(1));
        let (addrs_tx, listen_addrs) = watch::channel(Vec::new());
        let (visible_tx, visible_addrs) = watch::channel(Vec::new());
        let initial = config.force_reachability.unwrap_or_default();
        let (reachability_tx, reachability) = watch::channel(initial);
        let (connectivity_tx, connectivity) = watch::channel(Connectivity {
            reachability: initial,
            forced: config.force_reachability.is_some(),
            autonat: config.autonat,
            seeks_relays: config.relay_client
                && (config.auto_relay_reservations > 0 || !config.trusted_relays.is_empty()),
            ..Connectivity::default()
        });
        let links = Links::default();
        let (peers_tx, peers) = watch::channel(Vec::new());
        let handle = P2pHandle {
            commands,
            local_peer_id: *swarm.local_peer_id(),
            handlers: handlers.clone(),
            limits: Arc::new(Limits {
                total: Arc::new(Semaphore::new(config.max_outbound_calls)),
                total_max: config.max_outbound_calls,
                per_peer: Mutex::new(HashMap::new()),
                per_peer_max: config.max_outbound_calls_per_peer,
            }),
            max_stream_frame: config.max_stream_frame,
            listen_addrs,
            visible_addrs,
            reachability,
            peers,
            connectivity,
            links: links.clone(),
            pinned,
        };
        let event_loop = EventLoop {
            swarm,
            commands: command_rx,
            handlers,
            inbound: Arc::new(Semaphore::new(config.max_inbound_calls)),
            max_stream_frame: config.max_stream_frame,
            addrs_tx,
            visible_tx,
            reachability_tx,
            handler_timeout: config.handler_timeout,
            peers_tx,
            listens: HashMap::new(),
            dials: HashMap::new(),
            joined_dials: HashMap::new(),
            me: handle.commands.downgrade(),
            relay_client: config.relay_client,
            auto_relay_reservations: config.auto_relay_reservations,
            reservations: HashMap::new(),
            forced: config.force_reachability,
            trusted,
            relay_capable: HashSet::new(),
            accepted: HashSet::new(),
            observed: VecDeque::new(),
            port_mapping: None,
            hole_punches: HolePunches::default(),
            connectivity_tx,
            links,
            reverse: HashSet::new(),
            reversals: HashSet::new(),
            upgrade_relayed: config.dcutr,
        };
        Ok((handle, tokio::spawn(event_loop.start())))
    }
}

impl P2pHandle {
    /// This host's peer id.
    pub fn local_peer_id(&self) -> PeerId {
        self.local_peer_id
    }

    /// The addresses this host listens on, as they change.
    pub fn listen_addrs(&self) -> watch::Receiver<Vec<Multiaddr>> {
        self.listen_addrs.clone()
    }

    /// The addresses other peers can use to reach this host, as they change: the listen addresses
    /// (including relayed `/p2p-circuit` ones) and the confirmed or announced external addresses.
    pub fn visible_addrs(&self) -> watch::Receiver<Vec<Multiaddr>> {
        self.visible_addrs.clone()
    }

    /// Whether other peers can dial this host, as AutoNAT finds it ([`Reachability::Unknown`] with
    /// AutoNAT off).
    pub fn reachability(&self) -> watch::Receiver<Reachability> {
        self.reachability.clone()
    }

    /// How peers reach this host (reachability, relays, hole punching, round trips), as it changes.
    pub fn connectivity(&self) -> watch::Receiver<Connectivity> {
        self.connectivity.clone()
    }

    /// Keeps connections to `peer` open on this side while idle (a bootstrap peer: without it, a quiet
    /// node loses every connection after [`P2pConfig::idle_connection_timeout`] and looks offline). The
    /// remote closes them on its side when it finds them idle unless it keeps this host too, so some
    /// traffic within its idle timeout is still needed (the DHT pings its bootstrap peers).
    /// Applies to existing and new connections.
    pub fn keep_alive(&self, peer: PeerId) {
        self.pinned
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(peer);
    }

    /// `peer`'s connections to this host (direct or relayed, and the latest round trip), if connected.
    pub fn link(&self, peer: &PeerId) -> Option<Link> {
        self.links.get(peer)
    }

    /// The peers with at least one open connection, as they change.
    pub fn connected_peers(&self) -> watch::Receiver<Vec<PeerId>> {
        self.peers.clone()
    }

    async fn request<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> Command) -> Option<T> {
        let (tx, rx) = oneshot::channel();
        self.commands.send(make(tx)).await.ok()?;
        rx.await.ok()
    }

    /// Starts listening on `addr`; returns the first concrete address (port 0 resolved).
    pub async fn listen(&self, addr: Multiaddr) -> Result<Multiaddr, HostError> {
        self.request(|reply| Command::Listen { addr, reply })
            .await
            .ok_or(HostError::Shutdown)?
    }

    /// Dials `addr` (a `/p2p/` suffix names the expected peer) and waits for the connection.
    pub async fn dial(&self, addr: Multiaddr) -> Result<PeerId, HostError> {
        self.request(|reply| Command::Dial { addr, reply })
            .await
            .ok_or(HostError::Shutdown)?
    }

    /// Records an address for `peer`; calls to the peer dial it when needed.
    pub async fn add_address(&self, peer: PeerId, addr: Multiaddr) -> Result<(), HostError> {
        self.commands
            .send(Command::AddAddresses {
                peer,
                addrs: vec![addr],
            })
            .await
            .map_err(|_| HostError::Shutdown)
    }

    /// Announces `addr` as an external address of this host (as hivemind's `announce_maddrs`): identify
    /// advertises it, and a relay service serves once it has one.
    pub async fn add_external_address(&self, addr: Multiaddr) -> Result<(), HostError> {
        self.commands
            .send(Command::AddExternalAddress { addr })
            .await
            .map_err(|_| HostError::Shutdown)
    }

    /// Looks `peer` up on `/ipfs/kad/1.0.0` ([`crate::routing`]), asking the network even when
    /// addresses are known here (they may be the ones that just failed); returns its addresses, already
    /// recorded for dialing (none when it is connected already).
    pub async fn find_peer(&self, peer: PeerId) -> Result<Vec<Multiaddr>, HostError> {
        self.find_peer_via(peer, Vec::new()).await
    }

    /// [`P2pHandle::find_peer`] asking `hints` first: peers likely to know where `peer` is (in
    /// hivemind's DHT, the node whose `rpc_find` answer named it). Stops at the first answer that
    /// carries the peer's addresses.
    pub async fn find_peer_via(&self, peer: PeerId, hints: Vec<PeerId>) -> Result<Vec<Multiaddr>, HostError> {
        if self.peers.borrow().contains(&peer) {
            return Ok(Vec::new());
        }
        let key = routing::kad_key(&peer.to_bytes());
        let known = self
            .request(|reply| Command::Closest {
                key,
                exclude: None,
                reply,
            })
            .await
            .ok_or(HostError::Shutdown)?;
        // the addresses known here are asked about again: a caller looks a peer up after they failed
        // (a relayed address the peer gained since, a new port after a restart)
        let known: Vec<PeerRecord> = known.into_iter().filter(|r| r.peer != peer).collect();
        let mut lookup = routing::Lookup::new(peer, hints, known);
        let mut in_flight = futures::stream::FuturesUnordered::new();
        // every answer in flight when the first one names the peer adds its addresses: peers see
        // different ones (a neighbour on the peer's LAN its private address, its relay the relayed one)
        let mut found: Option<Vec<Multiaddr>> = None;
        loop {
            let room = if found.is_some() {
                0
            } else {
                LOOKUP_PARALLELISM.saturating_sub(in_flight.len())
            };
            for asked in lookup.next(room, LOOKUP_MAX_ASKED) {
                let this = self.clone();
                in_flight.push(async move {
                    let stream = this.open_stream(asked, routing::KAD_PROTOCOL).await;
                    match stream {
                        Ok(stream) => routing::find_node(stream, &peer, LOOKUP_QUERY_TIMEOUT)
                            .await
                            .map_err(|e| e.to_string()),
                        Err(e) => Err(e.to_string()),
                    }
                });
            }
            let Some(answer) = in_flight.next().await else {
                return found.ok_or(HostError::PeerNotFound(peer));
            };
            let Ok(peers) = answer else { continue };
            for (other, addrs) in peers {
                if addrs.is_empty() {
                    continue;
                }
                if other == peer {
                    let all = found.get_or_insert_with(Vec::new);
                    for addr in &addrs {
                        if !all.contains(addr) {
                            all.push(addr.clone());
                        }
                    }
                }
                if other != self.local_peer_id {
                    lookup.learn([other]);
                    let _ = self
                        .commands
                        .send(Command::AddAddresses { peer: other, addrs })
                        .await;
                }
            }
        }
    }

    /// Stops the event loop, closing every connection.
    pub async fn shutdown(&self) {
        let _ = self.request(|reply| Command::Shutdown { reply }).await;
    }

    /// Serves a unary handler under `name`, replacing any handler of that name.
    pub fn add_unary_handler(&self, name: &str, handler: UnaryHandler) -> Result<(), InvalidName> {
        self.add_handler(name, Handler::Unary(handler))
    }

    /// Serves a stream handler under `name`, replacing any handler of that name.
    pub fn add_stream_handler(&self, name: &str, handler: StreamHandler) -> Result<(), InvalidName> {
        self.add_handler(name, Handler::Stream(handler))
    }

    fn add_handler(&self, name: &str, handler: Handler) -> Result<(), InvalidName> {
        rpc::validate_name(name)?;
        self.handlers
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(name.to_owned(), handler);
        Ok(())
    }

    /// Stops serving `name`; returns whether a handler was registered.
    pub fn remove_handler(&self, name: &str) -> bool {
        self.handlers
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(name)
            .is_some()
    }

    async fn open_stream(&self, peer: PeerId, name: &str) -> Result<Stream, CallError> {
        let name = name.to_owned();
        let (reply, rx) = oneshot::channel();
        self.commands
            .send(Command::OpenStream { peer, name, reply })
            .await
            .map_err(|_| CallError::Shutdown)?;
        // a dropped reply: the connection the request went to closed before the stream opened
        let opened = rx
            .await
            .map_err(|_| OpenError::Io("the connection closed before the stream opened".into()))?;
        Ok(opened?)
    }

    /// Calls unary handler `name` on `peer` (dialing it if needed) and returns its response bytes.
    ///
    /// Requests whose envelope exceeds 4 MiB are refused before anything is sent. Dropping the future
    /// cancels the call (the stream is reset).
    pub async fn call_unary(
        &self,
        peer: PeerId,
        name: &str,
        request: Bytes,
        timeout: Duration,
    ) -> Result<Bytes, CallError> {
        rpc::validate_name(name)?;
        let call_id = Bytes::copy_from_slice(&rand::random::<[u8; 16]>());
        let envelope = wire::encode_unary_call(call_id.clone(), Bytes::from(peer.to_bytes()), name, request)
            .map_err(CallError::Refused)?;
        let _permit = self.limits.acquire(peer)?;
        tokio::time::timeout(timeout, async {
            let mut stream = self.open_stream(peer, name).await?;
            stream.write_all(&envelope).await?;
            stream.flush().await?;
            drop(envelope);
            let reply = rpc::read_envelope(&mut stream, wire::MAX_UNARY_ENVELOPE).await?;
            let _ = stream.close().await;
            let (id, result) = wire::decode_unary_response(&reply).map_err(ReadError::from)?;
            if id != call_id {
                return Err(CallError::CallIdMismatch);
            }
            result.map_err(CallError::Remote)
        })
        .await
        .map_err(|_| CallError::Timeout)?
    }

    /// Calls stream handler `name` on `peer`: sends `requests` as message frames then the end-of-stream
    /// frame, and returns the responses. `timeout` bounds opening the stream and each wait for a
    /// response frame; an error frame ends the responses with [`CallError::Remote`]. Dropping the
    /// returned stream cancels the call.
    pub async fn call_stream(
        &self,
        peer: PeerId,
        name: &str,
        requests: BoxStream<'static, Bytes>,
        timeout: Duration,
    ) -> Result<BoxStream<'static, Result<Bytes, CallError>>, CallError> {
        rpc::validate_name(name)?;
        let permit = self.limits.acquire(peer)?;
        let stream = tokio::time::timeout(timeout, self.open_stream(peer, name))
            .await
            .map_err(|_| CallError::Timeout)??;
        let (read, mut write) = stream.split();
        let writer = tokio::spawn(async move {
            let mut requests = requests;
            while let Some(message) = requests.next().await {
                write.write_all(&rpc::message_frame(&message)).await?;
            }
            write.write_all(&END_OF_STREAM).await?;
            write.flush().await?;
            Ok::<_, std::io::Error>(write)
        });
        let state = StreamCall {
            read,
            _permit: permit,
            _writer: AbortOnDrop(writer),
            max_frame: self.max_stream_frame,
            timeout,
        };
        Ok(futures::stream::unfold(Some(state), |state| async move {
            let mut state = state?;
            let frame =
                tokio::time::timeout(state.timeout, rpc::read_frame(&mut state.read, state.max_frame)).await;
            match frame {
                Err(_) => Some((Err(CallError::Timeout), None)),
                Ok(Ok(Some(Frame::Message(m)))) => Some((Ok(m), Some(state))),
                Ok(Ok(Some(Frame::Error(e)))) => Some((Err(CallError::Remote(e)), None)),
                Ok(Ok(None)) => None,
                Ok(Err(e)) => Some((Err(CallError::Reply(e)), None)),
            }
        })
        .boxed())
    }
}

struct StreamCall {
    read: futures::io::ReadHalf<Stream>,
    _permit: CallPermit,
    _writer: AbortOnDrop,
    max_frame: u64,
    timeout: Duration,
}

struct AbortOnDrop(tokio::task::JoinHandle<std::io::Result<futures::io::WriteHalf<Stream>>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

struct EventLoop {
    swarm: Swarm<Behaviour>,
    commands: mpsc::Receiver<Command>,
    handlers: Names,
    inbound: Arc<Semaphore>,
    max_stream_frame: u64,
    addrs_tx: watch::Sender<Vec<Multiaddr>>,
    visible_tx: watch::Sender<Vec<Multiaddr>>,
    reachability_tx: watch::Sender<Reachability>,
    handler_timeout: Option<Duration>,
    peers_tx: watch::Sender<Vec<PeerId>>,
    listens: HashMap<ListenerId, oneshot::Sender<Result<Multiaddr, HostError>>>,
    dials: HashMap<ConnectionId, PendingDial>,
    /// Dials that found another dial to their peer in flight, answered by its outcome.
    joined_dials: HashMap<PeerId, Vec<PendingDial>>,
    me: mpsc::WeakSender<Command>,
    relay_client: bool,
    auto_relay_reservations: usize,
    /// Auto-relay circuit listeners and their relays.
    reservations: HashMap<ListenerId, PeerId>,
    /// Reachability set by the user; AutoNAT's findings are then only logged.
    forced: Option<Reachability>,
    trusted: Vec<TrustedRelay>,
    /// Peers that offer the relay service (seen through identify).
    relay_capable: HashSet<PeerId>,
    /// Relays that accepted a reservation whose circuit listener is still open.
    accepted: HashSet<PeerId>,
    /// This host's addresses as peers observed them, newest first.
    observed: VecDeque<Multiaddr>,
    /// The address a UPnP gateway mapped.
    port_mapping: Option<Multiaddr>,
    hole_punches: HolePunches,
    connectivity_tx: watch::Sender<Connectivity>,
    links: Links,
    /// Connection reversal (with hole punching on): peers that reached this host only through a relay,
    /// to be dialed directly at their listen addresses once identify tells them.
    reverse: HashSet<PeerId>,
    /// The reversal dials in flight.
    reversals: HashSet<ConnectionId>,
    /// Whether DCUtR and connection reversal run.
    upgrade_relayed: bool,
}

impl EventLoop {
    async fn start(mut self) {
        if self.relay_client && self.forced != Some(Reachability::Public) {
            for index in 0..self.trusted.len() {
                self.reserve_trusted(index);
            }
        }
        self.run().await;
    }

    async fn run(mut self) {
        loop {
            tokio::select! {
                event = self.swarm.select_next_some() => self.on_swarm_event(event),
                command = self.commands.recv() => match command {
                    Some(Command::Shutdown { reply }) => {
                        let _ = reply.send(());
                        break;
                    }
                    Some(command) => self.on_command(command),
                    None => break,
                },
            }
        }
        tracing::debug!("p2p event loop stopped");
    }

    fn on_command(&mut self, command: Command) {
        match command {
            Command::Listen { addr, reply } => match self.swarm.listen_on(addr.clone()) {
                Ok(id) => {
                    self.listens.insert(id, reply);
                }
                Err(e) => {
                    let _ = reply.send(Err(HostError::Listen {
                        addr,
                        reason: e.to_string(),
                    }));
                }
            },
            Command::Dial { addr, reply } => {
                let peer = match addr.iter().last() {
                    Some(Protocol::P2p(peer)) => Some(peer),
                    _ => None,
                };
                let opts = match peer {
                    Some(peer) if self.swarm.is_connected(&peer) => {
                        let _ = reply.send(Ok(peer));
                        return;
                    }
                    Some(peer) => {
                        let mut bare = addr.clone();
                        bare.pop();
                        self.swarm.behaviour_mut().rpc.book.add(peer, [bare]);
                        DialOpts::peer_id(peer).addresses(vec![addr.clone()]).build()
                    }
                    None => DialOpts::unknown_peer_id().address(addr.clone()).build(),
                };
                let id = opts.connection_id();
                match self.swarm.dial(opts) {
                    Ok(()) => {
                        self.dials.insert(id, (addr, reply));
                    }
                    // another part of the host (the relay client reserving a circuit) is dialing the
                    // peer already: that connection answers this dial too (one connection per peer, as
                    // a relay routes circuits over the one holding the reservation)
                    Err(libp2p::swarm::DialError::DialPeerConditionFalse(_)) if peer.is_some() => {
                        if let Some(peer) = peer {
                            self.joined_dials.entry(peer).or_default().push((addr, reply));
                        }
                    }
                    Err(e) => {
                        let _ = reply.send(Err(HostError::Dial {
                            addr,
                            reason: e.to_string(),
                        }));
                    }
                }
            }
            Command::AddAddresses { peer, addrs } => {
                self.swarm.behaviour_mut().rpc.book.add(peer, addrs);
            }
            Command::Closest { key, exclude, reply } => {
                let _ = reply.send(self.swarm.behaviour().rpc.book.closest(
                    &key,
                    routing::K,
                    exclude.as_ref(),
                ));
            }
            Command::AddExternalAddress { addr } => {
                self.swarm.add_external_address(addr);
                self.publish_addrs();
            }
            Command::OpenStream { peer, name, reply } => {
                self.swarm.behaviour_mut().rpc.open_stream(peer, name, reply);
            }
            Command::RetryRelay { index } => {
                if let Some(relay) = self.trusted.get_mut(index) {
                    relay.retry_pending = false;
                    self.reserve_trusted(index);
                }
            }
            Command::Shutdown { .. } => {}
        }
    }

    /// Asks trusted relay `index` for a reservation (a circuit listener through it); a failure is
    /// retried after the relay's backoff.
    fn reserve_trusted(&mut self, index: usize) {
        let Some(relay) = self.trusted.get(index) else {
            return;
        };
        if relay.listener.is_some() {
            return;
        }
        let (peer, addr) = (relay.peer, relay.addr.clone());
        self.swarm.behaviour_mut().rpc.book.add(peer, [addr.clone()]);
        if !self.swarm.is_connected(&peer) {
            // connect first; the reservation is asked for once connected (another part of the host,
            // the DHT's bootstrap, may be dialing the relay already: then this dial is skipped and
            // that connection serves)
            self.trusted[index].connecting = true;
            let opts = DialOpts::peer_id(peer)
                .condition(libp2p::swarm::dial_opts::PeerCondition::DisconnectedAndNotDialing)
                .addresses(vec![addr])
                .build();
            let _ = self.swarm.dial(opts);
            return;
        }
        self.trusted[index].connecting = false;
        let circuit = addr.with(Protocol::P2p(peer)).with(Protocol::P2pCircuit);
        match self.swarm.listen_on(circuit.clone()) {
            Ok(id) => {
                tracing::info!(relay = %peer, "asking a trusted relay for a reservation");
                self.trusted[index].listener = Some(id);
            }
            Err(e) => {
                tracing::warn!(%circuit, error = %e, "could not listen through a trusted relay");
                self.retry_trusted(index);
            }
        }
    }

    /// Schedules another try of trusted relay `index` after its backoff (which then doubles).
    fn retry_trusted(&mut self, index: usize) {
        let Some(relay) = self.trusted.get_mut(index) else {
            return;
        };
        if relay.retry_pending {
            return;
        }
        relay.retry_pending = true;
        let wait = relay.backoff;
        relay.backoff = (relay.backoff * 2).min(RELAY_RETRY_MAX);
        tracing::info!(relay = %relay.peer, wait_s = wait.as_secs_f64(), "relay reservation ended; retrying");
        let me = self.me.clone();
        tokio::spawn(async move {
            tokio::time::sleep(wait).await;
            if let Some(commands) = me.upgrade() {
                let _ = commands.send(Command::RetryRelay { index }).await;
            }
        });
    }

    /// Connection reversal: `peer` reached this host through a relay; where it listens on addresses this
    /// host may dial (not relayed, not loopback), dial it directly. A public caller then gets a direct
    /// connection to a host behind NAT without hole punching (which needs both sides behind NAT to
    /// cross their dials); calls use the direct connection from then on.
    fn reverse_connection(&mut self, peer: PeerId) {
        if self.links.get(&peer).is_some_and(|l| l.is_direct()) {
            return;
        }
        let addrs: Vec<Multiaddr> = self
            .swarm
            .behaviour()
            .rpc
            .book
            .addresses(&peer)
            .into_iter()
            .filter(|a| !is_relayed(a) && !is_loopback(a))
            .collect();
        if addrs.is_empty() {
            return;
        }
        let opts = DialOpts::peer_id(peer)
            .condition(libp2p::swarm::dial_opts::PeerCondition::Always)
            .addresses(addrs)
            // not this host's listening port: DCUtR may be dialing the same peer from it
            .allocate_new_port()
            .build();
        let id = opts.connection_id();
        if self.swarm.dial(opts).is_ok() {
            self.reversals.insert(id);
        }
    }

    /// Auto relay: reserves a circuit on `relay` (a connected peer offering the hop protocol) while there
    /// is room and this host is not public.
    fn maybe_reserve(&mut self, relay: PeerId) {
        let public = *self.reachability_tx.borrow() == Reachability::Public;
        if public
            || !self.relay_client
            || self.reservations.len() >= self.auto_relay_reservations
            || self.reservations.values().any(|p| *p == relay)
            || self.trusted.iter().any(|t| t.peer == relay)
        {
            return;
        }
        let Some(addr) = self
            .swarm
            .behaviour()
            .rpc
            .book
            .addresses(&relay)
            .into_iter()
            .next()
        else {
            return;
        };
        let circuit = addr.with(Protocol::P2p(relay)).with(Protocol::P2pCircuit);
        match self.swarm.listen_on(circuit.clone()) {
            Ok(id) => {
                tracing::info!(%relay, "auto relay: reserving a circuit");
                self.reservations.insert(id, relay);
            }
            Err(e) => tracing::debug!(%circuit, error = %e, "auto relay: could not listen"),
        }
    }

    /// Answers peer-routing requests on one inbound `/ipfs/kad/1.0.0` stream from the address book.
    fn serve_kad(&mut self, peer: PeerId, stream: Stream) {
        let Ok(permit) = self.inbound.clone().try_acquire_owned() else {
            tracing::warn!(%peer, "too many inbound calls; resetting a kad stream");
            return;
        };
        let me = self.me.clone();
        tokio::spawn(async move {
            let closest = |key: KadKey, requester: PeerId| {
                let me = me.clone();
                async move {
                    let Some(commands) = me.upgrade() else {
                        return Vec::new();
                    };
                    let (reply, rx) = oneshot::channel();
                    let exclude = Some(requester);
                    if commands
                        .send(Command::Closest { key, exclude, reply })
                        .await
                        .is_err()
                    {
                        return Vec::new();
                    }
                    rx.await.unwrap_or_default()
                }
            };
            if let Err(e) = routing::serve(stream, peer, KAD_STREAM_IDLE, closest).await {
                tracing::debug!(%peer, error = %e, "kad stream failed");
            }
            drop(permit);
        });
    }

    /// Recomputes [`Connectivity`] and publishes it when it changed.
    fn publish_connectivity(&self) {
        let (direct_connections, relayed_connections, peers, median_rtt) = self.links.summary();
        let mut relays: Vec<RelayStatus> = self
            .accepted
            .iter()
            .map(|peer| RelayStatus {
                peer: *peer,
                rtt: self.links.rtt(peer),
            })
            .collect();
        relays.sort_by_key(|r| r.peer);
        let relayed_addrs: Vec<Multiaddr> = self
            .swarm
            .listeners()
            .filter(|a| is_relayed(a))
            .cloned()
            .collect();
        let mut observed_addrs: Vec<Multiaddr> = Vec::new();
        for addr in self.swarm.external_addresses().chain(self.observed.iter()) {
            if !is_relayed(addr) && !observed_addrs.contains(addr) {
                observed_addrs.push(addr.clone());
            }
        }
        let reachability = *self.reachability_tx.borrow();
        self.connectivity_tx.send_if_modified(|c| {
            let new = Connectivity {
                reachability,
                forced: c.forced,
                autonat: c.autonat,
                seeks_relays: c.seeks_relays,
                relays,
                relayed_addrs,
                observed_addrs,
                port_mapping: self.port_mapping.clone(),
                direct_connections,
                relayed_connections,
                peers,
                median_rtt,
                hole_punches: self.hole_punches,
            };
            let changed = *c != new;
            *c = new;
            changed
        });
    }

    fn publish_peers(&self) {
        let peers: Vec<PeerId> = self.swarm.connected_peers().copied().collect();
        self.peers_tx.send_replace(peers);
    }

    fn publish_addrs(&self) {
        let addrs: Vec<Multiaddr> = self.swarm.listeners().cloned().collect();
        let mut visible = addrs.clone();
        for addr in self.swarm.external_addresses() {
            if !visible.contains(addr) {
                visible.push(addr.clone());
            }
        }
        self.addrs_tx.send_replace(addrs);
        self.visible_tx.send_if_modified(|old| {
            let changed = *old != visible;
            *old = visible;
            changed
        });
    }

    fn on_swarm_event(&mut self, event: SwarmEvent<BehaviourEvent>) {
        if let SwarmEvent::Behaviour(BehaviourEvent::Rpc(behaviour::Event::Inbound { peer, name, stream })) =
            event
        {
            return self.serve(peer, name, stream);
        }
        self.on_network_event(event);
        self.publish_connectivity();
    }

    fn on_network_event(&mut self, event: SwarmEvent<BehaviourEvent>) {
        match event {
            SwarmEvent::Behaviour(BehaviourEvent::Identify(identify::Event::Received {
                peer_id,
                info,
                ..
            })) => {
                let relays = info.protocols.iter().any(|p| p.as_ref() == RELAY_HOP_PROTOCOL);
                tracing::debug!(peer = %peer_id, addrs = ?info.listen_addrs, "identify: where the peer listens");
                self.swarm
                    .behaviour_mut()
                    .rpc
                    .book
                    .add(peer_id, info.listen_addrs);
                if relays {
                    self.relay_capable.insert(peer_id);
                    self.maybe_reserve(peer_id);
                }
                if self.reverse.remove(&peer_id) {
                    self.reverse_connection(peer_id);
                }
            }
            SwarmEvent::NewExternalAddrCandidate { address } => {
                self.observed.retain(|a| *a != address);
                self.observed.push_front(address);
                self.observed.truncate(OBSERVED_ADDRS);
            }
            SwarmEvent::Behaviour(BehaviourEvent::Ping(ping::Event {
                peer,
                result: Ok(rtt),
                ..
            })) => self.links.pinged(peer, rtt),
            SwarmEvent::Behaviour(BehaviourEvent::Ping(ping::Event {
                peer,
                connection,
                result: Err(ping::Failure::Timeout | ping::Failure::Other { .. }),
            })) => {
                // a connection that stopped answering is dead (an outage, a new address at the other
                // end): TCP would keep it for many minutes, a relay would route circuits over it, and the
                // status would count the peer; close it so that everything finds its way again
                tracing::info!(%peer, "a connection stopped answering pings; closing it");
                self.swarm.close_connection(connection);
            }
            SwarmEvent::Behaviour(BehaviourEvent::Dcutr(dcutr::Event {
                remote_peer_id,
                result,
            })) => match result {
                Ok(_) => {
                    self.hole_punches.succeeded += 1;
                    tracing::info!(peer = %remote_peer_id, "hole punching: a relayed connection is now direct");
                }
                Err(e) => {
                    self.hole_punches.failed += 1;
                    tracing::info!(peer = %remote_peer_id, error = %e, "hole punching failed; staying relayed");
                }
            },
            SwarmEvent::Behaviour(BehaviourEvent::Upnp(event)) => match event {
                upnp::Event::NewExternalAddr { external_addr, .. } => {
                    tracing::info!(addr = %external_addr, "UPnP: the gateway mapped a port");
                    self.port_mapping = Some(external_addr);
                }
                upnp::Event::ExpiredExternalAddr { .. } => self.port_mapping = None,
                upnp::Event::GatewayNotFound => tracing::debug!("UPnP: no gateway found"),
                upnp::Event::NonRoutableGateway => {
                    tracing::info!("UPnP: the gateway is itself behind NAT; no port mapped")
                }
            },
            SwarmEvent::NewListenAddr { listener_id, address } => {
                tracing::info!(%address, "listening");
                if let Some(reply) = self.listens.remove(&listener_id) {
                    let _ = reply.send(Ok(address));
                }
                self.publish_addrs();
            }
            SwarmEvent::ExpiredListenAddr { .. }
            | SwarmEvent::ExternalAddrConfirmed { .. }
            | SwarmEvent::ExternalAddrExpired { .. } => self.publish_addrs(),
            SwarmEvent::Behaviour(BehaviourEvent::Autonat(autonat::Event::StatusChanged { new, .. })) => {
                if let Some(forced) = self.forced {
                    tracing::info!(autonat = ?new, ?forced, "AutoNAT's finding (reachability is forced)");
                    return;
                }
                tracing::info!(status = ?new, "reachability changed");
                let now = match new {
                    autonat::NatStatus::Public(_) => Reachability::Public,
                    autonat::NatStatus::Private => Reachability::Private,
                    autonat::NatStatus::Unknown => Reachability::Unknown,
                };
                self.reachability_tx.send_replace(now);
                if now == Reachability::Private {
                    let relays: Vec<PeerId> = self.relay_capable.iter().copied().collect();
                    for relay in relays {
                        if self.swarm.is_connected(&relay) {
                            self.maybe_reserve(relay);
                        }
                    }
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::RelayClient(
                relay::client::Event::ReservationReqAccepted { relay_peer_id, .. },
            )) => {
                tracing::info!(relay = %relay_peer_id, "relay reservation accepted");
                self.accepted.insert(relay_peer_id);
                for relay in self.trusted.iter_mut().filter(|t| t.peer == relay_peer_id) {
                    relay.backoff = RELAY_RETRY_MIN;
                }
            }
            SwarmEvent::ListenerClosed {
                listener_id,
                reason,
                addresses,
            } => {
                if let Some(reply) = self.listens.remove(&listener_id) {
                    let _ = reply.send(Err(HostError::Listen {
                        addr: addresses.first().cloned().unwrap_or_else(Multiaddr::empty),
                        reason: format!("{reason:?}"),
                    }));
                }
                if let Some(relay) = self.reservations.remove(&listener_id) {
                    tracing::info!(%relay, ?reason, "auto relay: circuit closed");
                    self.accepted.remove(&relay);
                }
                if let Some(index) = self.trusted.iter().position(|t| t.listener == Some(listener_id)) {
                    self.trusted[index].listener = None;
                    self.accepted.remove(&self.trusted[index].peer);
                    self.retry_trusted(index);
                }
                self.publish_addrs();
            }
            SwarmEvent::ConnectionEstablished {
                peer_id,
                connection_id,
                endpoint,
                ..
            } => {
                self.links.opened(peer_id, connection_id, endpoint.is_relayed());
                if let Some((_, reply)) = self.dials.remove(&connection_id) {
                    let _ = reply.send(Ok(peer_id));
                }
                for (_, reply) in self.joined_dials.remove(&peer_id).unwrap_or_default() {
                    let _ = reply.send(Ok(peer_id));
                }
                if let Some(index) = self
                    .trusted
                    .iter()
                    .position(|t| t.peer == peer_id && t.connecting)
                {
                    self.reserve_trusted(index);
                }
                if self.reversals.remove(&connection_id) {
                    self.hole_punches.succeeded += 1;
                    tracing::info!(peer = %peer_id, "connection reversal: dialed a peer that came through a relay directly");
                }
                let direct = self.links.get(&peer_id).is_some_and(|l| l.is_direct());
                if self.upgrade_relayed && endpoint.is_relayed() && endpoint.is_listener() && !direct {
                    self.reverse.insert(peer_id);
                }
                self.publish_peers();
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                connection_id,
                num_established,
                ..
            } => {
                self.links.closed(peer_id, connection_id);
                if num_established == 0 {
                    // a reservation lives on the connection to its relay: ask again (after a backoff)
                    let stale: Vec<ListenerId> = self
                        .trusted
                        .iter()
                        .filter(|t| t.peer == peer_id)
                        .filter_map(|t| t.listener)
                        .chain(
                            self.reservations
                                .iter()
                                .filter(|(_, p)| **p == peer_id)
                                .map(|(id, _)| *id),
                        )
                        .collect();
                    for id in stale {
                        self.swarm.remove_listener(id);
                    }
                }
                self.publish_peers();
            }
            SwarmEvent::OutgoingConnectionError {
                connection_id,
                error,
                peer_id,
            } => {
                tracing::debug!(peer = ?peer_id, %error, "outgoing connection failed");
                if self.reversals.remove(&connection_id) {
                    tracing::debug!(peer = ?peer_id, "connection reversal failed (the peer is not publicly reachable)");
                }
                if let Some(peer) = peer_id
                    && !self.swarm.is_connected(&peer)
                    && let Some(index) = self.trusted.iter().position(|t| t.peer == peer && t.connecting)
                {
                    self.trusted[index].connecting = false;
                    self.retry_trusted(index);
                }
                if let Some((addr, reply)) = self.dials.remove(&connection_id) {
                    let _ = reply.send(Err(HostError::Dial {
                        addr,
                        reason: error.to_string(),
                    }));
                }
                if let Some(peer) = peer_id
                    && !self.swarm.is_connected(&peer)
                {
                    for (addr, reply) in self.joined_dials.remove(&peer).unwrap_or_default() {
                        let _ = reply.send(Err(HostError::Dial {
                            addr,
                            reason: error.to_string(),
                        }));
                    }
                }
            }
            _ => {}
        }
    }

    fn serve(&mut self, peer: PeerId, name: String, stream: Stream) {
        if name == routing::KAD_PROTOCOL {
            return self.serve_kad(peer, stream);
        }
        let handler = self
            .handlers
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&name)
            .cloned();
        let Some(handler) = handler else {
            tracing::debug!(%peer, %name, "handler removed; resetting the stream");
            return;
        };
        let Ok(permit) = self.inbound.clone().try_acquire_owned() else {
            tracing::warn!(%peer, %name, "too many inbound calls; resetting the stream");
            return;
        };
        let max_frame = self.max_stream_frame;
        let timeout = self.handler_timeout;
        tokio::spawn(async move {
            let result = match handler {
                Handler::Unary(h) => rpc::serve_unary(stream, peer, h, timeout).await,
                Handler::Stream(h) => rpc::serve_stream(stream, peer, h, max_frame).await,
            };
            if let Err(e) = result {
                tracing::debug!(%peer, %name, error = %e, "inbound call failed");
            }
            drop(permit);
        });
    }
}
