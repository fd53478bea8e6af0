//! Peer routing on `/ipfs/kad/1.0.0`: an address book, a `FIND_NODE` server and targeted lookups.
//!
//! hivemind's DHT names peers by id only, so a node must turn an id into addresses before it can call
//! the peer. Go's routed host (inside hivemind's `p2pd`) does it with a Kademlia `FindPeer`. This module
//! speaks the same protocol (libp2p's `dht.proto`, varint-delimited, several requests per stream) with a
//! narrow job — peer routing only, no records, no providers — and two differences from a general
//! Kademlia that matter for hivemind swarms:
//!
//! - A lookup asks first the peers that *named* the target (the DHT node whose `rpc_find` answer held
//!   it knows where it is), and stops as soon as any answer carries the target's addresses, instead of
//!   converging on the k closest peers.
//! - Nothing runs in the background: no bootstrap or refresh queries. libp2p-kad starts a bootstrap
//!   whenever its table holds fewer than 20 peers and cannot be told not to; on this machine that was
//!   half the CPU of starting a 64-node swarm.
//!
//! The server answers `FIND_NODE` (and the closer-peers part of `GET_VALUE` / `GET_PROVIDERS`) from the
//! address book, and `PING`; it stores nothing, so `PUT_VALUE` and `ADD_PROVIDER` end the stream.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use libp2p::{Multiaddr, PeerId};
use prost::Message;
use sha2::{Digest, Sha256};

use crate::rpc::ReadError;

/// The protocol name, as libp2p and `p2pd` spell it.
pub const KAD_PROTOCOL: &str = "/ipfs/kad/1.0.0";

/// Peers returned per answer (Kademlia's k).
pub(crate) const K: usize = 20;

/// Largest kad message accepted (Go's limit is 4 MiB, libp2p-kad's 16 KiB; answers here are a few KiB).
const MAX_MESSAGE: usize = 64 * 1024;

/// Addresses kept per peer.
const MAX_ADDRS_PER_PEER: usize = 8;

/// libp2p's `dht.proto` message (only the fields peer routing reads are interpreted).
#[derive(Clone, PartialEq, Message)]
pub(crate) struct KadMessage {
    #[prost(enumeration = "MessageType", tag = "1")]
    pub r#type: i32,
    #[prost(int32, tag = "10")]
    pub cluster_level_raw: i32,
    #[prost(bytes = "vec", tag = "2")]
    pub key: Vec<u8>,
    #[prost(message, optional, tag = "3")]
    pub record: Option<KadRecord>,
    #[prost(message, repeated, tag = "8")]
    pub closer_peers: Vec<KadPeer>,
    #[prost(message, repeated, tag = "9")]
    pub provider_peers: Vec<KadPeer>,
}

/// `dht.proto`'s `Record` (decoded so that a `PUT_VALUE` parses; never stored).
#[derive(Clone, PartialEq, Message)]
pub(crate) struct KadRecord {
    #[prost(bytes = "vec", tag = "1")]
    pub key: Vec<u8>,
    #[prost(bytes = "vec", tag = "2")]
    pub value: Vec<u8>,
    #[prost(string, tag = "5")]
    pub time_received: String,
}

/// `dht.proto`'s `Message.Peer`.
#[derive(Clone, PartialEq, Message)]
pub(crate) struct KadPeer {
    #[prost(bytes = "vec", tag = "1")]
    pub id: Vec<u8>,
    #[prost(bytes = "vec", repeated, tag = "2")]
    pub addrs: Vec<Vec<u8>>,
    #[prost(enumeration = "ConnectionType", tag = "3")]
    pub connection: i32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, prost::Enumeration)]
#[repr(i32)]
pub(crate) enum MessageType {
    PutValue = 0,
    GetValue = 1,
    AddProvider = 2,
    GetProviders = 3,
    FindNode = 4,
    Ping = 5,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, prost::Enumeration)]
#[repr(i32)]
pub(crate) enum ConnectionType {
    NotConnected = 0,
    Connected = 1,
    CanConnect = 2,
    CannotConnect = 3,
}

/// A position in the Kademlia key space: SHA-256 of the key's bytes (a peer's: its id's bytes).
pub(crate) type KadKey = [u8; 32];

pub(crate) fn kad_key(bytes: &[u8]) -> KadKey {
    Sha256::digest(bytes).into()
}

fn distance(a: &KadKey, b: &KadKey) -> KadKey {
    let mut d = [0u8; 32];
    for (i, x) in d.iter_mut().enumerate() {
        *x = a[i] ^ b[i];
    }
    d
}

/// What the book knows of one peer.
#[derive(Debug)]
struct Entry {
    key: KadKey,
    addrs: Vec<Multiaddr>,
    connections: usize,
    seen: Instant,
}

/// One peer in an answer: id, addresses, whether it is connected now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PeerRecord {
    pub peer: PeerId,
    pub addrs: Vec<Multiaddr>,
    pub connected: bool,
}

/// Known peers and their dialable addresses, bounded; owned by the host's event loop (inside the RPC
/// behaviour, which hands the addresses to the swarm when it dials by peer id).
#[derive(Debug)]
pub(crate) struct AddressBook {
    local: PeerId,
    peers: HashMap<PeerId, Entry>,
    capacity: usize,
}

impl AddressBook {
    pub(crate) fn new(local: PeerId, capacity: usize) -> Self {
        Self {
            local,
            peers: HashMap::new(),
            capacity: capacity.max(1),
        }
    }

    fn entry(&mut self, peer: PeerId) -> &mut Entry {
        if !self.peers.contains_key(&peer) && self.peers.len() >= self.capacity {
            self.evict();
        }
        self.peers.entry(peer).or_insert_with(|| Entry {
            key: kad_key(&peer.to_bytes()),
            addrs: Vec::new(),
            connections: 0,
            seen: Instant::now(),
        })
    }

    /// Drops the least recently seen disconnected peer (or, if all are connected, the oldest one).
    fn evict(&mut self) {
        let victim = self
            .peers
            .iter()
            .min_by_key(|(_, e)| (e.connections > 0, e.seen))
            .map(|(p, _)| *p);
        if let Some(p) = victim {
            self.peers.remove(&p);
        }
    }

    /// Records addresses `peer` listens on (newest first, at most [`MAX_ADDRS_PER_PEER`]).
    pub(crate) fn add(&mut self, peer: PeerId, addrs: impl IntoIterator<Item = Multiaddr>) {
        if peer == self.local {
            return;
        }
        let entry = self.entry(peer);
        for addr in addrs {
            let addr = strip_p2p(addr);
            if addr.is_empty() {
                continue;
            }
            entry.addrs.retain(|a| *a != addr);
            entry.addrs.insert(0, addr);
        }
        entry.addrs.truncate(MAX_ADDRS_PER_PEER);
        entry.seen = Instant::now();
    }

    pub(crate) fn connected(&mut self, peer: PeerId) {
        if peer == self.local {
            return;
        }
        let entry = self.entry(peer);
        entry.connections += 1;
        entry.seen = Instant::now();
    }

    pub(crate) fn disconnected(&mut self, peer: PeerId) {
        if let Some(entry) = self.peers.get_mut(&peer) {
            entry.connections = entry.connections.saturating_sub(1);
            entry.seen = Instant::now();
            if entry.connections == 0 && entry.addrs.is_empty() {
                self.peers.remove(&peer);
            }
        }
    }

    pub(crate) fn addresses(&self, peer: &PeerId) -> Vec<Multiaddr> {
        self.peers.get(peer).map(|e| e.addrs.clone()).unwrap_or_default()
    }

    /// Up to `n` peers with known addresses, closest to `key` first, without `exclude`.
    pub(crate) fn closest(&self, key: &KadKey, n: usize, exclude: Option<&PeerId>) -> Vec<PeerRecord> {
        let mut all: Vec<(KadKey, &PeerId, &Entry)> = self
            .peers
            .iter()
            .filter(|(p, e)| !e.addrs.is_empty() && Some(*p) != exclude)
            .map(|(p, e)| (distance(key, &e.key), p, e))
            .collect();
        if all.len() > n {
            all.select_nth_unstable_by(n, |a, b| a.0.cmp(&b.0));
            all.truncate(n);
        }
        all.sort_by_key(|a| a.0);
        all.into_iter()
            .map(|(_, p, e)| PeerRecord {
                peer: *p,
                addrs: e.addrs.clone(),
                connected: e.connections > 0,
            })
            .collect()
    }
}

fn strip_p2p(mut addr: Multiaddr) -> Multiaddr {
    if matches!(addr.iter().last(), Some(libp2p::multiaddr::Protocol::P2p(_))) {
        addr.pop();
    }
    addr
}

fn to_kad_peer(record: &PeerRecord) -> KadPeer {
    KadPeer {
        id: record.peer.to_bytes(),
        addrs: record.addrs.iter().map(|a| a.to_vec()).collect(),
        connection: if record.connected {
            ConnectionType::Connected
        } else {
            ConnectionType::NotConnected
        } as i32,
    }
}

/// The peers and addresses of an answer; malformed entries are skipped.
pub(crate) fn from_kad_peers(peers: &[KadPeer]) -> Vec<(PeerId, Vec<Multiaddr>)> {
    peers
        .iter()
        .filter_map(|p| {
            let peer = PeerId::from_bytes(&p.id).ok()?;
            let addrs = p
                .addrs
                .iter()
                .take(MAX_ADDRS_PER_PEER * 2)
                .filter_map(|a| Multiaddr::try_from(a.clone()).ok())
                .collect();
            Some((peer, addrs))
        })
        .take(K * 2)
        .collect()
}

/// Why a kad exchange failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum KadError {
    #[error("reading the kad message: {0}")]
    Read(#[from] ReadError),
    #[error("malformed kad message: {0}")]
    Decode(#[from] prost::DecodeError),
    #[error("kad stream I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("kad answer timed out")]
    Timeout,
}

/// Reads the next varint-delimited message of at most [`MAX_MESSAGE`] bytes; `buf` keeps what was read
/// past it for the next call (it never holds more than one message and one read). `Ok(None)` at a clean
/// end of stream.
async fn read_message<R: AsyncRead + Unpin>(
    io: &mut R,
    buf: &mut Vec<u8>,
) -> Result<Option<Vec<u8>>, ReadError> {
    let mut chunk = [0u8; 4096];
    loop {
        if let Some((message, used)) = apiary_wire::rpc::split_delimited(buf, MAX_MESSAGE)? {
            let message = message.to_vec();
            buf.drain(..used);
            return Ok(Some(message));
        }
        let n = io.read(&mut chunk).await?;
        if n == 0 {
            return if buf.is_empty() {
                Ok(None)
            } else {
                Err(ReadError::Eof)
            };
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

async fn write_message<W: AsyncWrite + Unpin>(io: &mut W, message: &KadMessage) -> std::io::Result<()> {
    let bytes = message.encode_length_delimited_to_vec();
    io.write_all(&bytes).await?;
    io.flush().await
}

/// Serves one inbound kad stream: answers requests until the remote closes it, goes quiet for `idle`,
/// or sends something this server does not answer. `closest(key, requester)` reads the address book.
pub(crate) async fn serve<S, F, Fut>(
    mut stream: S,
    requester: PeerId,
    idle: Duration,
    closest: F,
) -> Result<(), KadError>
where
    S: AsyncRead + AsyncWrite + Unpin,
    F: Fn(KadKey, PeerId) -> Fut,
    Fut: std::future::Future<Output = Vec<PeerRecord>>,
{
    let mut buf = Vec::new();
    loop {
        let bytes = match tokio::time::timeout(idle, read_message(&mut stream, &mut buf)).await {
            Err(_) | Ok(Ok(None)) => return Ok(()),
            Ok(Ok(Some(bytes))) => bytes,
            Ok(Err(e)) => return Err(e.into()),
        };
        let request = KadMessage::decode(bytes.as_slice())?;
        let kind = MessageType::try_from(request.r#type).ok();
        let reply = match kind {
            Some(MessageType::FindNode | MessageType::GetValue | MessageType::GetProviders) => {
                let peers = closest(kad_key(&request.key), requester).await;
                KadMessage {
                    r#type: request.r#type,
                    key: request.key,
                    closer_peers: peers.iter().map(to_kad_peer).collect(),
                    ..KadMessage::default()
                }
            }
            Some(MessageType::Ping) => KadMessage {
                r#type: request.r#type,
                ..KadMessage::default()
            },
            // No records or providers here: end the stream (the remote sees a failed request).
            Some(MessageType::PutValue | MessageType::AddProvider) | None => {
                let _ = stream.close().await;
                return Ok(());
            }
        };
        write_message(&mut stream, &reply).await?;
    }
}

/// Sends one `FIND_NODE` for `target` on `stream` and returns the peers of the answer.
pub(crate) async fn find_node<S>(
    mut stream: S,
    target: &PeerId,
    timeout: Duration,
) -> Result<Vec<(PeerId, Vec<Multiaddr>)>, KadError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let exchange = async {
        let request = KadMessage {
            r#type: MessageType::FindNode as i32,
            key: target.to_bytes(),
            ..KadMessage::default()
        };
        write_message(&mut stream, &request).await?;
        let bytes = read_message(&mut stream, &mut Vec::new())
            .await?
            .ok_or(ReadError::Eof)?;
        let answer = KadMessage::decode(bytes.as_slice())?;
        let _ = stream.close().await;
        Ok::<_, KadError>(from_kad_peers(&answer.closer_peers))
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| KadError::Timeout)?
}

/// The state of one lookup: who to ask next, closest first, the named-by hints before anyone.
#[derive(Debug)]
pub(crate) struct Lookup {
    target: PeerId,
    key: KadKey,
    hints: Vec<PeerId>,
    candidates: Vec<(KadKey, PeerId)>,
    asked: HashSet<PeerId>,
}

impl Lookup {
    pub(crate) fn new(target: PeerId, hints: Vec<PeerId>, known: Vec<PeerRecord>) -> Self {
        let key = kad_key(&target.to_bytes());
        let mut lookup = Self {
            target,
            key,
            hints: hints.into_iter().filter(|h| *h != target).collect(),
            candidates: Vec::new(),
            asked: HashSet::new(),
        };
        lookup.learn(known.into_iter().map(|r| r.peer));
        lookup
    }

    /// Adds peers named in an answer as candidates.
    pub(crate) fn learn(&mut self, peers: impl IntoIterator<Item = PeerId>) {
        for peer in peers {
            if peer == self.target
                || self.asked.contains(&peer)
                || self.candidates.iter().any(|(_, p)| *p == peer)
            {
                continue;
            }
            self.candidates
                .push((distance(&self.key, &kad_key(&peer.to_bytes())), peer));
        }
        self.candidates.sort_by_key(|a| a.0);
        self.candidates.truncate(K * 2);
    }

    /// The next up to `n` peers to ask (hints first, then the closest), or none when exhausted.
    pub(crate) fn next(&mut self, n: usize, max_asked: usize) -> Vec<PeerId> {
        let mut out = Vec::new();
        while out.len() < n && self.asked.len() < max_asked {
            let next = if self.hints.is_empty() {
                if self.candidates.is_empty() {
                    break;
                }
                self.candidates.remove(0).1
            } else {
                self.hints.remove(0)
            };
            if self.asked.insert(next) {
                out.push(next);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer() -> PeerId {
        PeerId::random()
    }

    #[test]
    fn book_is_bounded_and_evicts_disconnected_first() {
        let local = peer();
        let mut book = AddressBook::new(local, 3);
        let a = peer();
        book.add(a, ["/ip4/127.0.0.1/tcp/1".parse().unwrap()]);
        book.connected(a);
        let b = peer();
        book.add(b, ["/ip4/127.0.0.1/tcp/2".parse().unwrap()]);
        let c = peer();
        book.add(c, ["/ip4/127.0.0.1/tcp/3".parse().unwrap()]);
        let d = peer();
        book.add(d, ["/ip4/127.0.0.1/tcp/4".parse().unwrap()]);
        assert_eq!(book.peers.len(), 3);
        assert!(book.peers.contains_key(&a), "the connected peer stays");
        assert!(!book.peers.contains_key(&b), "the oldest disconnected one goes");
        book.add(local, ["/ip4/127.0.0.1/tcp/9".parse().unwrap()]);
        assert!(!book.peers.contains_key(&local));
    }

    #[test]
    fn addresses_are_deduplicated_capped_and_stripped_of_p2p() {
        let mut book = AddressBook::new(peer(), 10);
        let p = peer();
        let with_id: Multiaddr = format!("/ip4/127.0.0.1/tcp/5/p2p/{p}").parse().unwrap();
        book.add(p, [with_id.clone(), with_id]);
        assert_eq!(
            book.addresses(&p),
            vec!["/ip4/127.0.0.1/tcp/5".parse::<Multiaddr>().unwrap()]
        );
        book.add(
            p,
            (0..20).map(|i| format!("/ip4/127.0.0.1/tcp/{}", 100 + i).parse().unwrap()),
        );
        assert_eq!(book.addresses(&p).len(), MAX_ADDRS_PER_PEER);
        assert_eq!(
            book.addresses(&p)[0],
            "/ip4/127.0.0.1/tcp/119".parse::<Multiaddr>().unwrap()
        );
    }

    #[test]
    fn closest_orders_by_xor_distance_and_includes_the_target() {
        let mut book = AddressBook::new(peer(), 100);
        let peers: Vec<PeerId> = (0..50).map(|_| peer()).collect();
        for (i, p) in peers.iter().enumerate() {
            book.add(*p, [format!("/ip4/127.0.0.1/tcp/{}", 1000 + i).parse().unwrap()]);
        }
        let target = peers[17];
        let key = kad_key(&target.to_bytes());
        let got = book.closest(&key, K, Some(&peers[3]));
        assert_eq!(got.len(), K);
        assert_eq!(got[0].peer, target, "distance zero comes first");
        assert!(got.iter().all(|r| r.peer != peers[3]));
        let mut expected: Vec<PeerId> = peers.iter().copied().filter(|p| *p != peers[3]).collect();
        expected.sort_by_key(|p| distance(&key, &kad_key(&p.to_bytes())));
        let got_ids: Vec<PeerId> = got.iter().map(|r| r.peer).collect();
        assert_eq!(got_ids, expected[..K].to_vec());
    }

    #[test]
    fn lookup_asks_hints_first_then_closest_once_each() {
        let target = peer();
        let hint = peer();
        let known: Vec<PeerRecord> = (0..5)
            .map(|_| PeerRecord {
                peer: peer(),
                addrs: vec![],
                connected: false,
            })
            .collect();
        let mut lookup = Lookup::new(target, vec![hint, target], known.clone());
        let first = lookup.next(3, 100);
        assert_eq!(first[0], hint);
        assert_eq!(first.len(), 3);
        assert!(!first.contains(&target));
        lookup.learn(first.clone());
        lookup.learn([target]);
        let rest = lookup.next(10, 100);
        assert_eq!(rest.len(), 3);
        assert!(rest.iter().all(|p| !first.contains(p)));
        assert!(lookup.next(10, 100).is_empty());
    }

    /// Requests in, answers out.
    struct TestIo {
        input: futures::io::Cursor<Vec<u8>>,
        output: Vec<u8>,
        closed: bool,
    }

    impl TestIo {
        fn new(input: Vec<u8>) -> Self {
            Self {
                input: futures::io::Cursor::new(input),
                output: Vec::new(),
                closed: false,
            }
        }

        fn answers(&self) -> Vec<KadMessage> {
            let mut buf = self.output.as_slice();
            let mut out = Vec::new();
            while !buf.is_empty() {
                out.push(KadMessage::decode_length_delimited(&mut buf).unwrap());
            }
            out
        }
    }

    impl AsyncRead for TestIo {
        fn poll_read(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
            buf: &mut [u8],
        ) -> std::task::Poll<std::io::Result<usize>> {
            std::pin::Pin::new(&mut self.input).poll_read(cx, buf)
        }
    }

    impl AsyncWrite for TestIo {
        fn poll_write(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            buf: &[u8],
        ) -> std::task::Poll<std::io::Result<usize>> {
            self.output.extend_from_slice(buf);
            std::task::Poll::Ready(Ok(buf.len()))
        }

        fn poll_flush(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }

        fn poll_close(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            self.closed = true;
            std::task::Poll::Ready(Ok(()))
        }
    }

    fn request(kind: MessageType, key: Vec<u8>) -> Vec<u8> {
        KadMessage {
            r#type: kind as i32,
            key,
            ..KadMessage::default()
        }
        .encode_length_delimited_to_vec()
    }

    #[tokio::test]
    async fn server_answers_several_requests_on_one_stream() {
        let requester = peer();
        let known = PeerRecord {
            peer: peer(),
            addrs: vec!["/ip4/10.0.0.1/tcp/7".parse().unwrap()],
            connected: true,
        };
        let target = peer();
        let mut input = request(MessageType::FindNode, target.to_bytes());
        input.extend(request(MessageType::Ping, Vec::new()));
        input.extend(request(MessageType::GetProviders, b"some key".to_vec()));
        let mut io = TestIo::new(input);
        let seen = std::sync::Mutex::new(Vec::new());
        serve(&mut io, requester, Duration::from_secs(5), |key, from| {
            seen.lock().unwrap().push((key, from));
            let known = known.clone();
            async move { vec![known] }
        })
        .await
        .unwrap();
        let answers = io.answers();
        assert_eq!(answers.len(), 3);
        assert_eq!(answers[0].r#type, MessageType::FindNode as i32);
        assert_eq!(answers[0].key, target.to_bytes());
        assert_eq!(
            from_kad_peers(&answers[0].closer_peers),
            vec![(known.peer, known.addrs.clone())]
        );
        assert_eq!(
            answers[0].closer_peers[0].connection,
            ConnectionType::Connected as i32
        );
        assert_eq!(answers[1].r#type, MessageType::Ping as i32);
        assert!(answers[1].closer_peers.is_empty());
        assert_eq!(answers[2].r#type, MessageType::GetProviders as i32);
        let seen = seen.lock().unwrap();
        assert_eq!(seen[0], (kad_key(&target.to_bytes()), requester));
        assert_eq!(seen[1], (kad_key(b"some key"), requester));
    }

    #[tokio::test]
    async fn server_refuses_bad_input_without_answering() {
        let closest = |_, _| async { Vec::new() };
        // not protobuf
        let mut io = TestIo::new(vec![3, 0xff, 0xff, 0xff]);
        assert!(matches!(
            serve(&mut io, peer(), Duration::from_secs(5), closest).await,
            Err(KadError::Decode(_))
        ));
        assert!(io.output.is_empty());
        // a length prefix past the cap: refused before reading the body
        let mut huge = Vec::new();
        prost::encoding::encode_varint((MAX_MESSAGE + 1) as u64, &mut huge);
        let mut io = TestIo::new(huge);
        assert!(matches!(
            serve(&mut io, peer(), Duration::from_secs(5), closest).await,
            Err(KadError::Read(_))
        ));
        // records are not stored here: the stream ends, nothing is written
        let mut io = TestIo::new(request(MessageType::PutValue, b"k".to_vec()));
        serve(&mut io, peer(), Duration::from_secs(5), closest)
            .await
            .unwrap();
        assert!(io.output.is_empty() && io.closed);
        // an unknown message type
        let mut io = TestIo::new(
            KadMessage {
                r#type: 42,
                ..KadMessage::default()
            }
            .encode_length_delimited_to_vec(),
        );
        serve(&mut io, peer(), Duration::from_secs(5), closest)
            .await
            .unwrap();
        assert!(io.output.is_empty());
    }

    #[tokio::test]
    async fn find_node_reads_the_answer() {
        let target = peer();
        let other = peer();
        let answer = KadMessage {
            r#type: MessageType::FindNode as i32,
            closer_peers: vec![to_kad_peer(&PeerRecord {
                peer: other,
                addrs: vec!["/ip4/10.0.0.2/tcp/9".parse().unwrap()],
                connected: false,
            })],
            ..KadMessage::default()
        };
        let mut io = TestIo::new(answer.encode_length_delimited_to_vec());
        let peers = find_node(&mut io, &target, Duration::from_secs(5)).await.unwrap();
        assert_eq!(peers, vec![(other, vec!["/ip4/10.0.0.2/tcp/9".parse().unwrap()])]);
        let sent = KadMessage::decode_length_delimited(io.output.as_slice()).unwrap();
        assert_eq!(sent.r#type, MessageType::FindNode as i32);
        assert_eq!(sent.key, target.to_bytes());
    }

    #[test]
    fn messages_round_trip_and_garbage_is_an_error() {
        let p = peer();
        let m = KadMessage {
            r#type: MessageType::FindNode as i32,
            key: p.to_bytes(),
            closer_peers: vec![to_kad_peer(&PeerRecord {
                peer: p,
                addrs: vec!["/ip4/1.2.3.4/tcp/5".parse().unwrap()],
                connected: true,
            })],
            ..KadMessage::default()
        };
        let bytes = m.encode_to_vec();
        let back = KadMessage::decode(bytes.as_slice()).unwrap();
        assert_eq!(back, m);
        let peers = from_kad_peers(&back.closer_peers);
        assert_eq!(peers, vec![(p, vec!["/ip4/1.2.3.4/tcp/5".parse().unwrap()])]);
        assert!(KadMessage::decode(&[0xff, 0xff, 0xff][..]).is_err());
        let junk = KadPeer {
            id: vec![1, 2, 3],
            addrs: vec![vec![0xff]],
            connection: 0,
        };
        assert!(from_kad_peers(&[junk]).is_empty());
    }
}
