//! The hivemind RPC behaviour: raw libp2p streams under plain `String` protocol names.
//!
//! hivemind's handler names (`DHTProtocol.rpc_find`, `ns::Class.rpc_x`) have no leading `/`, so nothing here
//! builds a [`libp2p::StreamProtocol`]: inbound streams are accepted by [`HandlerNames`], an upgrade listing
//! the registered names as `String`s, and outbound streams use [`ReadyUpgrade<String>`]
//! (hivemind-wire.md §11). The behaviour only opens and accepts streams; the bytes on them are handled
//! by tasks outside the swarm ([`crate::rpc`]), so no handler work ever blocks the swarm.

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::sync::{Arc, PoisonError, RwLock};
use std::task::{Context, Poll};

use futures::future::{Ready, ready};
use libp2p::core::transport::PortUse;
use libp2p::core::upgrade::{InboundUpgrade, ReadyUpgrade, UpgradeInfo};
use libp2p::core::{Endpoint, Multiaddr};
use libp2p::swarm::dial_opts::DialOpts;
use libp2p::swarm::handler::{
    ConnectionEvent, DialUpgradeError, FullyNegotiatedInbound, FullyNegotiatedOutbound,
};
use libp2p::swarm::{
    ConnectionDenied, ConnectionHandler, ConnectionHandlerEvent, ConnectionId, FromSwarm, NetworkBehaviour,
    NotifyHandler, StreamUpgradeError, SubstreamProtocol, THandler, THandlerInEvent, THandlerOutEvent,
    ToSwarm,
};
use libp2p::{PeerId, Stream};
use tokio::sync::oneshot;

use crate::routing::{AddressBook, KAD_PROTOCOL};

/// The registered handlers by name, shared by the behaviour and every connection handler.
pub(crate) type Names = Arc<RwLock<HashMap<String, crate::rpc::Handler>>>;
/// Peers whose connections stay open while idle (bootstrap peers), shared with every connection handler.
pub(crate) type Pinned = Arc<RwLock<std::collections::HashSet<PeerId>>>;

/// Why an outbound stream could not be opened.
#[derive(Debug, Clone, thiserror::Error)]
pub enum OpenError {
    /// The remote does not serve this handler name.
    #[error("peer does not serve `{0}`")]
    Unsupported(String),
    /// No address of the peer is known (look it up, e.g. with `P2pHandle::find_peer`, then retry).
    #[error("no known address for the peer")]
    NoAddresses,
    /// No connection to the peer could be made at its known addresses.
    #[error("could not connect to the peer: {0}")]
    Dial(String),
    /// The connection closed or the stream failed while negotiating.
    #[error("stream could not be opened: {0}")]
    Io(String),
    /// Negotiating the protocol took too long.
    #[error("timed out negotiating the stream")]
    Timeout,
}

type OpenReply = oneshot::Sender<Result<Stream, OpenError>>;

/// An inbound upgrade accepting any of the registered handler names, kept as plain strings.
#[derive(Debug, Clone)]
pub struct HandlerNames(Vec<String>);

impl UpgradeInfo for HandlerNames {
    type Info = String;
    type InfoIter = std::vec::IntoIter<String>;

    fn protocol_info(&self) -> Self::InfoIter {
        self.0.clone().into_iter()
    }
}

impl InboundUpgrade<Stream> for HandlerNames {
    type Output = (Stream, String);
    type Error = Infallible;
    type Future = Ready<Result<Self::Output, Infallible>>;

    fn upgrade_inbound(self, stream: Stream, name: String) -> Self::Future {
        ready(Ok((stream, name)))
    }
}

/// What the behaviour reports to the host's event loop.
#[derive(Debug)]
pub enum Event {
    /// A remote opened a stream for one of our handlers.
    Inbound {
        /// The remote peer (from the connection, never from the envelope).
        peer: PeerId,
        /// The negotiated handler name.
        name: String,
        /// The stream, after multistream-select.
        stream: Stream,
    },
}

/// Commands from the behaviour to one connection's handler.
#[derive(Debug)]
pub struct OpenStream {
    name: String,
    reply: OpenReply,
}

/// The behaviour: tracks connections, dials peers it must reach, and hands streams out.
#[derive(Debug)]
pub struct Behaviour {
    names: Names,
    pinned: Pinned,
    /// Where known peers listen: handed to the swarm when it dials by peer id, read by peer routing.
    pub(crate) book: AddressBook,
    /// Whether connections accept `/ipfs/kad/1.0.0` (peer routing served by the host).
    serve_kad: bool,
    /// Each connected peer's connections, and whether each goes through a relay.
    connected: HashMap<PeerId, Vec<(ConnectionId, bool)>>,
    /// Streams waiting for a connection to their peer.
    waiting: HashMap<PeerId, Vec<OpenStream>>,
    actions: VecDeque<ToSwarm<Event, OpenStream>>,
}

impl Behaviour {
    pub(crate) fn new(names: Names, pinned: Pinned, book: AddressBook, serve_kad: bool) -> Self {
        Self {
            names,
            pinned,
            book,
            serve_kad,
            connected: HashMap::new(),
            waiting: HashMap::new(),
            actions: VecDeque::new(),
        }
    }

    /// Opens a stream to `peer` for handler `name`, dialing the peer first if it is not connected.
    pub(crate) fn open_stream(&mut self, peer: PeerId, name: String, reply: OpenReply) {
        let open = OpenStream { name, reply };
        if let Some(connections) = self.connected.get(&peer).filter(|c| !c.is_empty()) {
            // a direct connection when there is one (after hole punching, the relayed one may linger)
            let (id, _) = connections
                .iter()
                .find(|(_, relayed)| !relayed)
                .unwrap_or(&connections[0]);
            self.actions.push_back(ToSwarm::NotifyHandler {
                peer_id: peer,
                handler: NotifyHandler::One(*id),
                event: open,
            });
        } else {
            let first = !self.waiting.contains_key(&peer);
            self.waiting.entry(peer).or_default().push(open);
            if first {
                self.actions.push_back(ToSwarm::Dial {
                    opts: DialOpts::peer_id(peer).build(),
                });
            }
        }
    }

    fn handler(&self, peer: PeerId) -> RpcHandler {
        RpcHandler {
            names: self.names.clone(),
            pinned: self.pinned.clone(),
            peer,
            serve_kad: self.serve_kad,
            pending: VecDeque::new(),
            events: VecDeque::new(),
        }
    }
}

impl NetworkBehaviour for Behaviour {
    type ConnectionHandler = RpcHandler;
    type ToSwarm = Event;

    fn handle_established_inbound_connection(
        &mut self,
        _: ConnectionId,
        peer: PeerId,
        _: &Multiaddr,
        _: &Multiaddr,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        Ok(self.handler(peer))
    }

    fn handle_established_outbound_connection(
        &mut self,
        _: ConnectionId,
        peer: PeerId,
        _: &Multiaddr,
        _: Endpoint,
        _: PortUse,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        Ok(self.handler(peer))
    }

    fn handle_pending_outbound_connection(
        &mut self,
        _: ConnectionId,
        peer: Option<PeerId>,
        _: &[Multiaddr],
        _: Endpoint,
    ) -> Result<Vec<Multiaddr>, ConnectionDenied> {
        Ok(peer.map(|p| self.book.addresses(&p)).unwrap_or_default())
    }

    fn on_swarm_event(&mut self, event: FromSwarm<'_>) {
        match event {
            FromSwarm::ConnectionEstablished(e) => {
                self.connected
                    .entry(e.peer_id)
                    .or_default()
                    .push((e.connection_id, e.endpoint.is_relayed()));
                self.book.connected(e.peer_id);
                if let libp2p::core::ConnectedPoint::Dialer { address, .. } = e.endpoint {
                    // An address that just worked (a listener's side sees only an ephemeral port).
                    if !address
                        .iter()
                        .any(|p| matches!(p, libp2p::multiaddr::Protocol::P2pCircuit))
                    {
                        self.book.add(e.peer_id, [address.clone()]);
                    }
                }
                for open in self.waiting.remove(&e.peer_id).unwrap_or_default() {
                    self.actions.push_back(ToSwarm::NotifyHandler {
                        peer_id: e.peer_id,
                        handler: NotifyHandler::One(e.connection_id),
                        event: open,
                    });
                }
            }
            FromSwarm::ConnectionClosed(e) => {
                self.book.disconnected(e.peer_id);
                if let Some(connections) = self.connected.get_mut(&e.peer_id) {
                    connections.retain(|(id, _)| *id != e.connection_id);
                    if connections.is_empty() {
                        self.connected.remove(&e.peer_id);
                    }
                }
            }
            FromSwarm::DialFailure(e) => {
                if let Some(peer) = e.peer_id
                    && !self.connected.contains_key(&peer)
                    && let Some(waiting) = self.waiting.remove(&peer)
                {
                    let error = match e.error {
                        libp2p::swarm::DialError::NoAddresses => OpenError::NoAddresses,
                        other => OpenError::Dial(other.to_string()),
                    };
                    for open in waiting {
                        let _ = open.reply.send(Err(error.clone()));
                    }
                }
            }
            _ => {}
        }
    }

    fn on_connection_handler_event(&mut self, peer: PeerId, _: ConnectionId, event: THandlerOutEvent<Self>) {
        let (stream, name) = event;
        self.actions
            .push_back(ToSwarm::GenerateEvent(Event::Inbound { peer, name, stream }));
    }

    fn poll(&mut self, _: &mut Context<'_>) -> Poll<ToSwarm<Self::ToSwarm, THandlerInEvent<Self>>> {
        match self.actions.pop_front() {
            Some(action) => Poll::Ready(action),
            None => Poll::Pending,
        }
    }
}

/// One connection's handler: opens requested streams and reports negotiated inbound ones.
#[derive(Debug)]
pub struct RpcHandler {
    names: Names,
    pinned: Pinned,
    peer: PeerId,
    serve_kad: bool,
    pending: VecDeque<OpenStream>,
    events: VecDeque<(Stream, String)>,
}

impl ConnectionHandler for RpcHandler {
    type FromBehaviour = OpenStream;
    type ToBehaviour = (Stream, String);
    type InboundProtocol = HandlerNames;
    type OutboundProtocol = ReadyUpgrade<String>;
    type InboundOpenInfo = ();
    type OutboundOpenInfo = OpenStream;

    fn listen_protocol(&self) -> SubstreamProtocol<HandlerNames, ()> {
        let names = self.names.read().unwrap_or_else(PoisonError::into_inner);
        let mut accepted: Vec<String> = names.keys().cloned().collect();
        if self.serve_kad {
            accepted.push(KAD_PROTOCOL.to_owned());
        }
        SubstreamProtocol::new(HandlerNames(accepted), ())
    }

    fn connection_keep_alive(&self) -> bool {
        self.pinned
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .contains(&self.peer)
    }

    fn poll(
        &mut self,
        _: &mut Context<'_>,
    ) -> Poll<ConnectionHandlerEvent<ReadyUpgrade<String>, OpenStream, (Stream, String)>> {
        if let Some(event) = self.events.pop_front() {
            return Poll::Ready(ConnectionHandlerEvent::NotifyBehaviour(event));
        }
        if let Some(open) = self.pending.pop_front() {
            let upgrade = ReadyUpgrade::new(open.name.clone());
            return Poll::Ready(ConnectionHandlerEvent::OutboundSubstreamRequest {
                protocol: SubstreamProtocol::new(upgrade, open),
            });
        }
        Poll::Pending
    }

    fn on_behaviour_event(&mut self, event: OpenStream) {
        self.pending.push_back(event);
    }

    fn on_connection_event(
        &mut self,
        event: ConnectionEvent<'_, HandlerNames, ReadyUpgrade<String>, (), OpenStream>,
    ) {
        match event {
            ConnectionEvent::FullyNegotiatedInbound(FullyNegotiatedInbound { protocol, .. }) => {
                self.events.push_back(protocol);
            }
            ConnectionEvent::FullyNegotiatedOutbound(FullyNegotiatedOutbound { protocol, info }) => {
                let _ = info.reply.send(Ok(protocol));
            }
            ConnectionEvent::DialUpgradeError(DialUpgradeError { info, error }) => {
                let error = match error {
                    StreamUpgradeError::NegotiationFailed => OpenError::Unsupported(info.name),
                    StreamUpgradeError::Timeout => OpenError::Timeout,
                    StreamUpgradeError::Io(e) => OpenError::Io(e.to_string()),
                    StreamUpgradeError::Apply(never) => match never {},
                };
                let _ = info.reply.send(Err(error));
            }
            _ => {}
        }
    }
}
