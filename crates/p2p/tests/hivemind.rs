//! Interop with a real hivemind 1.1.12 peer (its Go p2pd) in both directions.

#![allow(clippy::unwrap_used)] // test helpers as well as tests

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use apiary_p2p::{Host, P2pConfig, PeerId, UnaryHandler};
use apiary_testkit::HivemindPeer;
use apiary_wire::proto::dht::{FindRequest, FindResponse, NodeInfo, PingRequest, PingResponse};
use bytes::Bytes;
use futures::FutureExt;
use prost::Message;

const T: Duration = Duration::from_secs(20);

fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

fn node_info() -> Option<NodeInfo> {
    Some(NodeInfo {
        node_id: rand::random::<[u8; 20]>().to_vec().into(),
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn apiary_calls_hivemind_dht() {
    let hivemind = tokio::task::spawn_blocking(|| HivemindPeer::spawn("dht", &[], Duration::from_secs(120)))
        .await
        .unwrap();
    let (handle, _task) = Host::spawn(P2pConfig::default()).unwrap();
    let peer: PeerId = hivemind.peer_id().parse().unwrap();
    assert_eq!(
        handle.dial(hivemind.maddr().parse().unwrap()).await.unwrap(),
        peer
    );

    let ping = PingRequest {
        peer: node_info(),
        ..Default::default()
    };
    let reply = handle
        .call_unary(peer, "DHTProtocol.rpc_ping", Bytes::from(ping.encode_to_vec()), T)
        .await
        .unwrap();
    let reply = PingResponse::decode(reply).unwrap();
    assert_eq!(reply.peer.unwrap().node_id.len(), 20);
    assert!(
        (reply.dht_time - now()).abs() < 600.0,
        "dht_time {}",
        reply.dht_time
    );

    let find = FindRequest {
        keys: vec![rand::random::<[u8; 20]>().to_vec().into()],
        peer: node_info(),
        ..Default::default()
    };
    let reply = handle
        .call_unary(peer, "DHTProtocol.rpc_find", Bytes::from(find.encode_to_vec()), T)
        .await
        .unwrap();
    let reply = FindResponse::decode(reply).unwrap();
    assert_eq!(reply.results.len(), 1);
    handle.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn hivemind_pings_apiary() {
    let (handle, _task) = Host::spawn(P2pConfig::default()).unwrap();
    let addr = handle
        .listen("/ip4/127.0.0.1/tcp/0".parse().unwrap())
        .await
        .unwrap();
    let full = addr.with_p2p(handle.local_peer_id()).unwrap().to_string();
    let pings = Arc::new(AtomicUsize::new(0));
    let (seen_tx, mut seen_rx) = tokio::sync::mpsc::channel::<PeerId>(16);
    let counter = pings.clone();
    let own = node_info();
    let ping: UnaryHandler = Arc::new(move |peer, bytes: Bytes| {
        let seen = seen_tx.clone();
        let own = own.clone();
        counter.fetch_add(1, Ordering::SeqCst);
        async move {
            PingRequest::decode(bytes).map_err(|e| e.to_string())?;
            let _ = seen.try_send(peer);
            let reply = PingResponse {
                peer: own,
                dht_time: now(),
                ..Default::default()
            };
            Ok(Bytes::from(reply.encode_to_vec()))
        }
        .boxed()
    });
    handle.add_unary_handler("DHTProtocol.rpc_ping", ping).unwrap();

    // hivemind's DHT bootstrap pings its initial peer; whether bootstrap then succeeds (we serve no
    // rpc_find) does not matter, so the peer runs in a blocking thread that this test never waits on.
    let (peer_tx, peer_rx) = tokio::sync::oneshot::channel();
    let (stop_tx, stop_rx) = std::sync::mpsc::sync_channel::<()>(1);
    std::thread::spawn(move || {
        let hivemind = std::panic::catch_unwind(|| {
            HivemindPeer::spawn("dht", &["--initial-peers", &full], Duration::from_secs(120))
        });
        match hivemind {
            Ok(hivemind) => {
                let _ = peer_tx.send(Some(hivemind.peer_id().to_owned()));
                let _ = stop_rx.recv_timeout(Duration::from_secs(180));
            }
            Err(_) => {
                let _ = peer_tx.send(None);
            }
        }
    });
    let from = tokio::time::timeout(Duration::from_secs(120), seen_rx.recv())
        .await
        .expect("hivemind never pinged the Apiary host")
        .unwrap();
    assert!(pings.load(Ordering::SeqCst) >= 1);
    // When hivemind came up, the ping came from its peer id.
    if let Ok(Ok(Some(id))) = tokio::time::timeout(Duration::from_secs(60), peer_rx).await {
        assert_eq!(from.to_string(), id);
    }
    let _ = stop_tx.try_send(());
    handle.shutdown().await;
}

/// Peer routing against Go's kad-dht inside p2pd: an Apiary host that knows only the hivemind peer
/// finds another Apiary host through it.
#[tokio::test(flavor = "multi_thread")]
async fn apiary_finds_a_peer_through_p2pd_kad() {
    let hivemind = tokio::task::spawn_blocking(|| HivemindPeer::spawn("dht", &[], Duration::from_secs(120)))
        .await
        .unwrap();
    let h: PeerId = hivemind.peer_id().parse().unwrap();
    let (b, _b_task) = Host::spawn(P2pConfig::default()).unwrap();
    let b_addr = b.listen("/ip4/127.0.0.1/tcp/0".parse().unwrap()).await.unwrap();
    assert_eq!(b.dial(hivemind.maddr().parse().unwrap()).await.unwrap(), h);
    let (c, _c_task) = Host::spawn(P2pConfig::default()).unwrap();
    assert_eq!(c.dial(hivemind.maddr().parse().unwrap()).await.unwrap(), h);

    // p2pd adds B to its routing table once identify shows B serves /ipfs/kad/1.0.0: ask until then.
    let deadline = tokio::time::Instant::now() + T;
    let found = loop {
        match c.find_peer_via(b.local_peer_id(), vec![h]).await {
            Ok(found) => break found,
            Err(e) if tokio::time::Instant::now() < deadline => {
                tracing::debug!(error = %e, "not yet");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("p2pd never named B: {e}"),
        }
    };
    assert!(found.contains(&b_addr), "{found:?} lacks {b_addr}");
    b.shutdown().await;
    c.shutdown().await;
}
