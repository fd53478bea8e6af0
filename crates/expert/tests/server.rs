//! The expert RPCs over real libp2p on 127.0.0.1: malformed, oversized and wrong-schema requests get an
//! error text while another client's calls keep succeeding.

#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::time::Duration;

use apiary_expert::runtime::{Runtime, RuntimeConfig};
use apiary_expert::schema::ExpertSchema;
use apiary_expert::server::{ExpertServer, RPC_BACKWARD, RPC_FORWARD, RPC_FORWARD_STREAM, RPC_INFO};
use apiary_expert::{BackendConfig, Expert, ExpertBackend, ExpertConfig, ExpertKind};
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
