//! The expert RPCs over real libp2p on 127.0.0.1: malformed, oversized and wrong-schema requests get an
//! error text while another client's calls keep succeeding; experts attached to and detached from a
//! registered server while it serves.

#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::time::Duration;

use apiary_expert::runtime::{Runtime, RuntimeConfig, RuntimeHandle};
use apiary_expert::schema::{ExpertSchema, to_candle};
use apiary_expert::server::{ExpertServer, RPC_BACKWARD, RPC_FORWARD, RPC_FORWARD_STREAM, RPC_INFO};
use apiary_expert::{BackendConfig, Expert, ExpertBackend, ExpertConfig, ExpertError, ExpertKind};
use apiary_p2p::{CallError, Host, Multiaddr, P2pConfig, P2pHandle};
use apiary_wire::proto::runtime::{CompressionType, ExpertInfo, ExpertRequest, ExpertResponse, ExpertUid};
use apiary_wire::tensor::{self, DType, Limits, Tensor};
use bytes::Bytes;
use futures::StreamExt;
use prost::Message;

const T: Duration = Duration::from_secs(20);
const H: usize = 16;

async fn host() -> (P2pHandle, Multiaddr) {
    let (p2p, _task) = Host::spawn(P2pConfig::default()).unwrap();
    let addr = p2p.listen("/ip4/127.0.0.1/tcp/0".parse().unwrap()).await.unwrap();
    let full = addr.with_p2p(p2p.local_peer_id()).unwrap();
    (p2p, full)
}

fn request(uid: &str, tensors: &[Tensor]) -> Bytes {
    let tensors = tensors
        .iter()
        .map(|t| tensor::serialize(t, CompressionType::None).unwrap())
        .collect();
    Bytes::from(
        ExpertRequest {
            uid: uid.into(),
            tensors,
            ..Default::default()
        }
        .encode_to_vec(),
    )
}

fn rows(n: usize, h: usize) -> Tensor {
    Tensor::from_vec(
        vec![n, h],
        (0..n * h).map(|i| (i % 7) as f32 * 0.1).collect::<Vec<f32>>(),
    )
    .unwrap()
}

async fn forward_ok(client: &P2pHandle, server: &P2pHandle) -> Vec<usize> {
    let reply = client
        .call_unary(
            server.local_peer_id(),
            RPC_FORWARD,
            request("ffn.0", &[rows(3, H)]),
            T,
        )
        .await
        .unwrap();
    let response = ExpertResponse::decode(reply).unwrap();
    let out = tensor::deserialize(&response.tensors[0], &Limits::default()).unwrap();
    out.shape().to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_errors_and_others_are_served() {
    let expert = Expert::new(ExpertConfig::new(ExpertKind::Ffn, H), 1).unwrap();
    let backend = ExpertBackend::new(expert, BackendConfig::default()).unwrap();
    let runtime = Runtime::spawn(vec![("ffn.0".into(), backend)], RuntimeConfig::default()).unwrap();
    let schema = ExpertSchema::server_create(ExpertKind::Ffn, H, CompressionType::None, 64);
    let server = ExpertServer::new(
        runtime.clone(),
        HashMap::from([("ffn.0".to_owned(), schema.clone())]),
    );
    let (p2p, addr) = host().await;
    server.register(&p2p).unwrap();

    let (good, _) = host().await;
    good.dial(addr.clone()).await.unwrap();
    let (bad, _) = host().await;
    bad.dial(addr).await.unwrap();
    let peer = p2p.local_peer_id();

    // rpc_info answers the schema's bytes
    let info = bad
        .call_unary(
            peer,
            RPC_INFO,
            Bytes::from(ExpertUid { uid: "ffn.0".into() }.encode_to_vec()),
            T,
        )
        .await
        .unwrap();
    assert_eq!(
        ExpertInfo::decode(info).unwrap().serialized_info.as_ref(),
        schema.rpc_info().as_slice()
    );

    let remote_error = |r: Result<Bytes, CallError>| match r {
        Err(CallError::Remote(text)) => text,
        other => panic!("expected an error reply, got {other:?}"),
    };
    let cases: Vec<(&str, Bytes, &str)> = vec![
        ("garbage", Bytes::from_static(&[0xff, 0xff, 0x01]), "malformed"),
        ("unknown expert", request("ffn.9", &[rows(2, H)]), "ffn.9"),
        (
            "wrong width",
            request("ffn.0", &[rows(2, H + 1)]),
            "expected shape",
        ),
        (
            "two tensors",
            request("ffn.0", &[rows(2, H), rows(2, H)]),
            "expected 1 tensors",
        ),
        ("past max batch", request("ffn.0", &[rows(65, H)]), "limit"),
        (
            "int tensor",
            request("ffn.0", &[Tensor::zeros(vec![2, H], DType::Int64).unwrap()]),
            "expected float32",
        ),
    ];
    for (name, bytes, expect) in cases {
        let text = remote_error(bad.call_unary(peer, RPC_FORWARD, bytes, T).await);
        assert!(text.contains(expect), "{name}: {text}");
        assert_eq!(forward_ok(&good, &p2p).await, vec![3, H], "after {name}");
    }
    // a tensor whose declared size disagrees with its buffer
    let mut wire = tensor::serialize(&rows(2, H), CompressionType::None).unwrap();
    wire.size = vec![2000, H as u32];
    let lying = Bytes::from(
        ExpertRequest {
            uid: "ffn.0".into(),
            tensors: vec![wire],
            ..Default::default()
        }
        .encode_to_vec(),
    );
    let text = remote_error(bad.call_unary(peer, RPC_FORWARD, lying, T).await);
    assert!(text.contains("bad tensor"), "{text}");
    // backward needs the output's gradient too
    let text = remote_error(
        bad.call_unary(peer, RPC_BACKWARD, request("ffn.0", &[rows(2, H)]), T)
            .await,
    );
    assert!(text.contains("expected 2 tensors"), "{text}");
    // a stream whose messages name different experts
    let msgs = futures::stream::iter(vec![request("ffn.0", &[rows(2, H)]), request("ffn.1", &[])]).boxed();
    let mut replies = bad.call_stream(peer, RPC_FORWARD_STREAM, msgs, T).await.unwrap();
    let first = replies.next().await.unwrap();
    assert!(
        matches!(&first, Err(CallError::Remote(t)) if t.contains("differ")),
        "{first:?}"
    );
    assert_eq!(forward_ok(&good, &p2p).await, vec![3, H]);

    // a good stream call
    let msgs = futures::stream::iter(vec![request("ffn.0", &[rows(5, H)])]).boxed();
    let replies: Vec<_> = good
        .call_stream(peer, RPC_FORWARD_STREAM, msgs, T)
        .await
        .unwrap()
        .collect()
        .await;
    let response = ExpertResponse::decode(replies[0].as_ref().unwrap().clone()).unwrap();
    assert_eq!(response.tensors[0].size, vec![5, H as u32]);
    runtime.shutdown().await;
}

/// Declarations as hivemind's `declare_experts` writes them; pause withdraws them (readers see an empty
/// record at once), resume declares again, withdraw ends them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn declarations_pause_resume_and_withdraw() {
    use apiary_dht::{Dht, DhtConfig, Found};
    use apiary_expert::server::Declarer;
    use apiary_wire::msgpack::Value;

    let (server_p2p, server_addr) = host().await;
    let server_dht = Dht::spawn(server_p2p.clone(), DhtConfig::default(), vec![])
        .await
        .unwrap();
    let (reader_p2p, _) = host().await;
    let reader = Dht::spawn(reader_p2p.clone(), DhtConfig::default(), vec![server_addr])
        .await
        .unwrap();
    let uids = vec!["ffn.0.3".to_owned(), "ffn.1.2".to_owned()];
    let (declarer, stored) = Declarer::start(
        server_dht.clone(),
        uids,
        Duration::from_secs(30),
        Duration::from_secs(60),
    )
    .await;
    assert_eq!(stored, 4, "two uid keys and two prefix sub-keys");
    let peer = Value::str(server_p2p.local_peer_id().to_base58());
    let uid_value = |found: Option<Found>| match found {
        Some(Found::Regular { value, .. }) => value,
        other => panic!("expected a regular value, got {other:?}"),
    };
    let prefix_value = |found: Option<Found>| match found {
        Some(Found::Dictionary { entries, .. }) => entries
            .into_iter()
            .find(|(k, _, _)| *k == Value::from(3))
            .map(|(_, v, _)| v)
            .unwrap(),
        other => panic!("expected a dictionary, got {other:?}"),
    };
    let get = |key: &str| {
        let reader = reader.clone();
        let key = Value::str(key);
        async move { reader.get(key, true).await.unwrap() }
    };
    assert_eq!(uid_value(get("ffn.0.3").await), peer);
    assert_eq!(
        prefix_value(get("ffn.0.").await),
        Value::Tuple(vec![Value::str("ffn.0.3"), peer.clone()])
    );

    declarer.pause().await;
    assert_eq!(uid_value(get("ffn.0.3").await), Value::Nil);
    assert_eq!(prefix_value(get("ffn.0.").await), Value::Nil);

    assert_eq!(declarer.resume().await, 4);
    assert_eq!(uid_value(get("ffn.1.2").await), peer);

    declarer.withdraw().await;
    assert_eq!(uid_value(get("ffn.1.2").await), Value::Nil);
    reader.shutdown().await;
    server_dht.shutdown().await;
}

/// A runtime serving one `ffn` expert per `(uid, seed)`, the schemas to attach them with, and a copy of
/// each expert (same seed, same weights) to compute locally.
fn ffn_runtime(
    experts: &[(&str, u64)],
) -> (
    RuntimeHandle,
    HashMap<String, ExpertSchema>,
    HashMap<String, Expert>,
) {
    let config = ExpertConfig::new(ExpertKind::Ffn, H);
    let backends = experts
        .iter()
        .map(|&(uid, seed)| {
            let expert = Expert::new(config, seed).unwrap();
            (
                uid.to_owned(),
                ExpertBackend::new(expert, BackendConfig::default()).unwrap(),
            )
        })
        .collect();
    let runtime = Runtime::spawn(backends, RuntimeConfig::default()).unwrap();
    let schemas = experts
        .iter()
        .map(|&(uid, _)| {
            let schema = ExpertSchema::server_create(ExpertKind::Ffn, H, CompressionType::None, 64);
            (uid.to_owned(), schema)
        })
        .collect();
    let local = experts
        .iter()
        .map(|&(uid, seed)| (uid.to_owned(), Expert::new(config, seed).unwrap()))
        .collect();
    (runtime, schemas, local)
}

/// `rpc_forward` of `uid` on `server` with `n` rows; the output tensor or the remote error text.
async fn forward(client: &P2pHandle, server: &P2pHandle, uid: &str, n: usize) -> Result<Tensor, String> {
    match client
        .call_unary(
            server.local_peer_id(),
            RPC_FORWARD,
            request(uid, &[rows(n, H)]),
            T,
        )
        .await
    {
        Ok(reply) => {
            let response = ExpertResponse::decode(reply).unwrap();
            Ok(tensor::deserialize(&response.tensors[0], &Limits::default()).unwrap())
        }
        Err(CallError::Remote(text)) => Err(text),
        Err(other) => panic!("expected a reply or an error text, got {other:?}"),
    }
}

/// `rpc_forward_stream` of `uid` on `server` with `n` rows; the output tensor.
async fn forward_stream(client: &P2pHandle, server: &P2pHandle, uid: &str, n: usize) -> Tensor {
    let msgs = futures::stream::iter(vec![request(uid, &[rows(n, H)])]).boxed();
    let replies: Vec<_> = client
        .call_stream(server.local_peer_id(), RPC_FORWARD_STREAM, msgs, T)
        .await
        .unwrap()
        .collect()
        .await;
    assert_eq!(replies.len(), 1, "one part for a small output");
    let response = ExpertResponse::decode(replies[0].as_ref().unwrap().clone()).unwrap();
    tensor::deserialize(&response.tensors[0], &Limits::default()).unwrap()
}

/// Asserts that `remote` is what `expert` computes for `n` rows of [`rows`].
fn assert_matches_local(remote: &Tensor, expert: &Expert, n: usize, what: &str) {
    let local = expert.forward(&[to_candle(&rows(n, H)).unwrap()]).unwrap();
    let local = &local[0];
    let remote = to_candle(remote).unwrap();
    assert_eq!(remote.dims(), local.dims(), "{what}");
    let (remote, local) = (
        remote.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        local.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
    );
    for (i, (r, l)) in remote.iter().zip(&local).enumerate() {
        assert!(
            (r - l).abs() <= 1e-5 * (1.0 + l.abs()),
            "{what}[{i}]: remote {r} vs local {l}"
        );
    }
}

fn unknown_expert(uid: &str) -> String {
    ExpertError::UnknownExpert(uid.to_owned()).to_string()
}

fn rpc_info(uid: &str) -> Bytes {
    Bytes::from(ExpertUid { uid: uid.into() }.encode_to_vec())
}

/// One registered `ExpertServer::empty()` hosts runtime A, then B as well, refuses a duplicate uid, and
/// after A is detached answers A's uids as unknown while B keeps serving, all over real p2p RPCs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attach_and_detach_while_serving() {
    let server = ExpertServer::empty();
    let (p2p, addr) = host().await;
    server.register(&p2p).unwrap();
    let (client, _) = host().await;
    client.dial(addr).await.unwrap();
    let peer = p2p.local_peer_id();

    // nothing hosted yet
    assert!(server.uids().is_empty());
    assert_eq!(
        forward(&client, &p2p, "a.0", 2).await.unwrap_err(),
        unknown_expert("a.0")
    );

    let (a, a_schemas, a_local) = ffn_runtime(&[("a.0", 1), ("a.1", 2)]);
    server.attach(a.clone(), a_schemas.clone()).unwrap();
    assert_eq!(server.uids(), ["a.0", "a.1"]);
    let out = forward(&client, &p2p, "a.0", 3).await.unwrap();
    assert_matches_local(&out, &a_local["a.0"], 3, "a.0");
    let info = client
        .call_unary(peer, RPC_INFO, rpc_info("a.1"), T)
        .await
        .unwrap();
    assert_eq!(
        ExpertInfo::decode(info).unwrap().serialized_info.as_ref(),
        a_schemas["a.1"].rpc_info().as_slice()
    );

    // a second runtime joins while the first keeps serving
    let (b, b_schemas, b_local) = ffn_runtime(&[("b.0", 3)]);
    server.attach(b.clone(), b_schemas).unwrap();
    assert_eq!(server.uids(), ["a.0", "a.1", "b.0"]);
    let (out_a0, out_a1, out_b0) = tokio::join!(
        forward(&client, &p2p, "a.0", 4),
        forward(&client, &p2p, "a.1", 2),
        forward(&client, &p2p, "b.0", 5),
    );
    assert_matches_local(&out_a0.unwrap(), &a_local["a.0"], 4, "a.0");
    assert_matches_local(&out_a1.unwrap(), &a_local["a.1"], 2, "a.1");
    assert_matches_local(&out_b0.unwrap(), &b_local["b.0"], 5, "b.0");
    // the experts differ, so the right runtime answered each uid
    assert_ne!(
        forward(&client, &p2p, "a.0", 2).await.unwrap(),
        forward(&client, &p2p, "b.0", 2).await.unwrap()
    );

    // a duplicate uid refuses the whole set
    let (c, c_schemas, _) = ffn_runtime(&[("c.0", 4), ("a.1", 5)]);
    let err = server.attach(c.clone(), c_schemas).unwrap_err();
    assert!(err.to_string().contains("\"a.1\" is already hosted"), "{err}");
    assert_eq!(server.uids(), ["a.0", "a.1", "b.0"]);
    assert_eq!(
        forward(&client, &p2p, "c.0", 2).await.unwrap_err(),
        unknown_expert("c.0")
    );
    let out = forward(&client, &p2p, "a.1", 2).await.unwrap();
    assert_matches_local(&out, &a_local["a.1"], 2, "a.1 after the refused attach");

    // A leaves: its uids are unknown at once (as any unknown uid), B keeps serving
    let gone = server.detach(&["a.0".into(), "a.1".into(), "zz.0".into()]);
    assert_eq!(gone, ["a.0", "a.1"]);
    assert_eq!(server.uids(), ["b.0"]);
    assert_eq!(
        forward(&client, &p2p, "a.0", 2).await.unwrap_err(),
        unknown_expert("a.0")
    );
    assert_eq!(
        forward(&client, &p2p, "zz.0", 2).await.unwrap_err(),
        unknown_expert("zz.0")
    );
    let info = client.call_unary(peer, RPC_INFO, rpc_info("a.1"), T).await;
    assert!(
        matches!(&info, Err(CallError::Remote(t)) if *t == unknown_expert("a.1")),
        "{info:?}"
    );
    let msgs = futures::stream::iter(vec![request("a.0", &[rows(2, H)])]).boxed();
    let replies: Vec<_> = client
        .call_stream(peer, RPC_FORWARD_STREAM, msgs, T)
        .await
        .unwrap()
        .collect()
        .await;
    assert!(
        matches!(&replies[..], [Err(CallError::Remote(t))] if *t == unknown_expert("a.0")),
        "{replies:?}"
    );
    let out = forward(&client, &p2p, "b.0", 3).await.unwrap();
    assert_matches_local(&out, &b_local["b.0"], 3, "b.0 after A left");
    let out = forward_stream(&client, &p2p, "b.0", 6).await;
    assert_matches_local(&out, &b_local["b.0"], 6, "b.0 stream after A left");

    // A may come back
    server.attach(a.clone(), a_schemas).unwrap();
    let out = forward(&client, &p2p, "a.0", 2).await.unwrap();
    assert_matches_local(&out, &a_local["a.0"], 2, "a.0 attached again");

    for runtime in [a, b, c] {
        runtime.shutdown().await;
    }
}

/// Requests that reached the runtime before their expert is detached still finish: the runtime thread is
/// held busy (a `with_backend` call that waits for a signal) while a unary and a stream forward queue,
/// the expert is detached, then the thread is let go.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_flight_forward_finishes_after_detach() {
    let server = ExpertServer::empty();
    let (p2p, addr) = host().await;
    server.register(&p2p).unwrap();
    let (client, _) = host().await;
    client.dial(addr).await.unwrap();

    let (a, a_schemas, a_local) = ffn_runtime(&[("a.0", 7)]);
    server.attach(a.clone(), a_schemas).unwrap();

    // hold the runtime thread
    let (started_tx, started_rx) = tokio::sync::oneshot::channel::<()>();
    let (release_tx, release_rx) = std::sync::mpsc::sync_channel::<()>(1);
    let blocker = tokio::spawn({
        let a = a.clone();
        async move {
            a.with_backend("a.0", move |_| {
                let _ = started_tx.send(());
                let _ = release_rx.recv();
            })
            .await
        }
    });
    tokio::time::timeout(T, started_rx).await.unwrap().unwrap();

    let unary = tokio::spawn({
        let (client, p2p) = (client.clone(), p2p.clone());
        async move { forward(&client, &p2p, "a.0", 3).await }
    });
    let stream = tokio::spawn({
        let (client, p2p) = (client.clone(), p2p.clone());
        async move { forward_stream(&client, &p2p, "a.0", 5).await }
    });
    // both requests are past the server's lookup and queued in the runtime
    let deadline = tokio::time::Instant::now() + T;
    while a.stats().experts[0].queued_forward_rows < 3 + 5 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the requests never queued"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }

    assert_eq!(server.detach(&["a.0".into()]), ["a.0"]);
    assert!(server.uids().is_empty());
    assert_eq!(
        forward(&client, &p2p, "a.0", 2).await.unwrap_err(),
        unknown_expert("a.0")
    );
    assert!(!unary.is_finished() && !stream.is_finished());

    release_tx.send(()).unwrap();
    blocker.await.unwrap().unwrap();
    let out = tokio::time::timeout(T, unary).await.unwrap().unwrap().unwrap();
    assert_matches_local(&out, &a_local["a.0"], 3, "in-flight unary");
    let out = tokio::time::timeout(T, stream).await.unwrap().unwrap();
    assert_matches_local(&out, &a_local["a.0"], 5, "in-flight stream");
    a.shutdown().await;
}
