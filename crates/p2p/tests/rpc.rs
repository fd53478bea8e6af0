//! Two Apiary hosts on 127.0.0.1 calling each other's hivemind handlers over real libp2p.

#![allow(clippy::unwrap_used)] // test helpers as well as tests

use std::sync::Arc;
use std::time::Duration;

use apiary_p2p::{CallError, Host, OpenError, P2pConfig, P2pHandle, StreamHandler, UnaryHandler};
use apiary_wire::proto::test::{TestRequest, TestResponse};
use bytes::Bytes;
use futures::{FutureExt, StreamExt};
use prost::Message;

const T: Duration = Duration::from_secs(20);

async fn host(config: P2pConfig) -> (P2pHandle, libp2p::Multiaddr) {
    let (handle, _task) = Host::spawn(config).unwrap();
    let addr = handle
        .listen("/ip4/127.0.0.1/tcp/0".parse().unwrap())
        .await
        .unwrap();
    let full = addr.with_p2p(handle.local_peer_id()).unwrap();
    (handle, full)
}

fn square() -> UnaryHandler {
    Arc::new(|_peer, bytes: Bytes| {
        async move {
            let req = TestRequest::decode(bytes).map_err(|e| e.to_string())?;
            if req.number < 0 {
                return Err(format!("negative number {}", req.number));
            }
            Ok(Bytes::from(
                TestResponse {
                    number: req.number * req.number,
                }
                .encode_to_vec(),
            ))
        }
        .boxed()
    })
}

async fn pair(client: P2pConfig) -> (P2pHandle, P2pHandle) {
    let (server, addr) = host(P2pConfig::default()).await;
    server
        .add_unary_handler("ExampleServicer.rpc_square", square())
        .unwrap();
    let (client, _) = host(client).await;
    assert_eq!(client.dial(addr).await.unwrap(), server.local_peer_id());
    (server, client)
}

#[tokio::test]
async fn unary_round_trip_errors_and_unknown_handler() {
    let (server, client) = pair(P2pConfig::default()).await;
    let peer = server.local_peer_id();
    let req = Bytes::from(TestRequest { number: 7 }.encode_to_vec());
    let resp = client
        .call_unary(peer, "ExampleServicer.rpc_square", req, T)
        .await
        .unwrap();
    assert_eq!(TestResponse::decode(resp).unwrap().number, 49);

    let req = Bytes::from(TestRequest { number: -3 }.encode_to_vec());
    match client
        .call_unary(peer, "ExampleServicer.rpc_square", req, T)
        .await
    {
        Err(CallError::Remote(text)) => assert!(text.contains("negative number -3"), "{text}"),
        other => panic!("expected the handler's error, got {other:?}"),
    }

    match client
        .call_unary(peer, "ExampleServicer.rpc_missing", Bytes::new(), T)
        .await
    {
        Err(CallError::Open(OpenError::Unsupported(name))) => assert_eq!(name, "ExampleServicer.rpc_missing"),
        other => panic!("expected an unsupported handler, got {other:?}"),
    }

    let huge = Bytes::from(vec![0u8; 4 * 1024 * 1024 + 1]);
    assert!(matches!(
        client
            .call_unary(peer, "ExampleServicer.rpc_square", huge, T)
            .await,
        Err(CallError::Refused(_))
    ));
    assert!(!client.remove_handler("ExampleServicer.rpc_square"));
    assert!(server.remove_handler("ExampleServicer.rpc_square"));
    assert!(matches!(
        client
            .call_unary(peer, "ExampleServicer.rpc_square", Bytes::new(), T)
            .await,
        Err(CallError::Open(OpenError::Unsupported(_)))
    ));
    assert!(client.connected_peers().borrow().contains(&peer));
}

#[tokio::test]
async fn stream_call_both_ways() {
    let (server, client) = pair(P2pConfig::default()).await;
    // Echo each request twice; a request of 255 fails the call with an error frame.
    let echo: StreamHandler = Arc::new(|_peer, requests| {
        requests
            .flat_map(|m: Bytes| {
                let out = if m.as_ref() == [255] {
                    vec![Err("bad request 255".to_owned())]
                } else {
                    vec![Ok(m.clone()), Ok(m)]
                };
                futures::stream::iter(out)
            })
            .boxed()
    });
    server.add_stream_handler("ns::Echo.rpc_echo", echo).unwrap();
    let peer = server.local_peer_id();
    let requests = futures::stream::iter((1u8..=3).map(|i| Bytes::from(vec![i; i as usize]))).boxed();
    let responses: Vec<_> = client
        .call_stream(peer, "ns::Echo.rpc_echo", requests, T)
        .await
        .unwrap()
        .collect()
        .await;
    let responses: Vec<Bytes> = responses.into_iter().map(Result::unwrap).collect();
    assert_eq!(responses.len(), 6);
    assert_eq!(responses[4].as_ref(), &[3, 3, 3]);

    let requests = futures::stream::iter([Bytes::from_static(&[1]), Bytes::from_static(&[255])]).boxed();
    let responses: Vec<_> = client
        .call_stream(peer, "ns::Echo.rpc_echo", requests, T)
        .await
        .unwrap()
        .collect()
        .await;
    assert_eq!(responses.len(), 3);
    match &responses[2] {
        Err(CallError::Remote(text)) => assert_eq!(text, "bad request 255"),
        other => panic!("expected an error frame, got {other:?}"),
    }
}

#[tokio::test]
async fn in_flight_limit() {
    let config = P2pConfig {
        max_outbound_calls_per_peer: 2,
        ..P2pConfig::default()
    };
    let (server, client) = pair(config).await;
    let (release_tx, release_rx) = tokio::sync::watch::channel(false);
    let (started_tx, mut started_rx) = tokio::sync::mpsc::channel(8);
    let slow: UnaryHandler = Arc::new(move |_peer, bytes| {
        let mut release = release_rx.clone();
        let started = started_tx.clone();
        async move {
            let _ = started.send(()).await;
            release.wait_for(|r| *r).await.map_err(|e| e.to_string())?;
            Ok(bytes)
        }
        .boxed()
    });
    server.add_unary_handler("Slow.rpc_wait", slow).unwrap();
    let peer = server.local_peer_id();
    let calls: Vec<_> = (0..2)
        .map(|_| {
            let client = client.clone();
            tokio::spawn(async move {
                client
                    .call_unary(peer, "Slow.rpc_wait", Bytes::from_static(b"x"), T)
                    .await
            })
        })
        .collect();
    // Once both calls are being served, a third is refused without touching the network.
    for _ in 0..2 {
        tokio::time::timeout(T, started_rx.recv()).await.unwrap().unwrap();
    }
    match client.call_unary(peer, "Slow.rpc_wait", Bytes::new(), T).await {
        Err(CallError::TooManyInFlight { scope, limit }) => assert_eq!((scope, limit), ("per-peer", 2)),
        other => panic!("expected the in-flight limit, got {other:?}"),
    }
    release_tx.send(true).unwrap();
    for call in calls {
        assert_eq!(call.await.unwrap().unwrap().as_ref(), b"x");
    }
}
