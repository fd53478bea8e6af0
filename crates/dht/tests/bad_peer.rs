//! A bad peer (malformed messages, forged owner signatures, oversized values, garbage responses) is
//! rejected while the DHT nodes keep serving.

#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use apiary_dht::validation::{CompositeValidator, RecordValidator, RsaOwnerValidator};
use apiary_dht::{Found, get_dht_time};
use apiary_p2p::{CallError, UnaryHandler};
use apiary_wire::dhtid::DhtId;
use apiary_wire::msgpack::{self, Value};
use apiary_wire::proto::dht::{NodeInfo, PingResponse, StoreRequest, StoreResponse};
use apiary_wire::signature::{DhtRecord, RsaPrivateKey, RsaSignatureValidator};
use bytes::Bytes;
use common::{expiration, host, node_with, test_config};
use futures::FutureExt;
use prost::Message;

const T: Duration = Duration::from_secs(10);

fn rsa_validator(key: &RsaPrivateKey) -> CompositeValidator {
    let v: Box<dyn RecordValidator> = Box::new(RsaOwnerValidator(RsaSignatureValidator::new(key.clone())));
    CompositeValidator::new([v])
}

fn store_request(key: DhtId, subkey: Vec<u8>, value: Vec<u8>, exp: f64) -> Bytes {
    let request = StoreRequest {
        keys: vec![Bytes::copy_from_slice(key.as_bytes())],
        subkeys: vec![subkey.into()],
        values: vec![value.into()],
        expiration_time: vec![exp],
        in_cache: vec![false],
        peer: Some(NodeInfo {
            node_id: Bytes::copy_from_slice(DhtId::random().as_bytes()),
        }),
        auth: None,
    };
    Bytes::from(request.encode_to_vec())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_peer_is_rejected_and_nodes_keep_serving() {
    let owner_key = RsaPrivateKey::generate().unwrap();
    let other_key = RsaPrivateKey::generate().unwrap();
    let first = node_with(vec![], test_config(), rsa_validator(&other_key)).await;
    let mut nodes = vec![first];
    for i in 1..6 {
        let initial = vec![nodes[i - 1].addr.clone()];
        nodes.push(node_with(initial, test_config(), rsa_validator(&other_key)).await);
    }
    let victim = &nodes[0];
    let victim_peer = victim.p2p.local_peer_id();
    let (bad, _) = host().await;
    bad.dial(victim.addr.clone()).await.unwrap();

    // malformed protobuf, misaligned arrays, a bad key length: error texts, no panic
    for (name, bytes) in [
        ("DHTProtocol.rpc_store", Bytes::from_static(&[0xff, 0xff, 0xff])),
        ("DHTProtocol.rpc_find", Bytes::from_static(&[0x0a, 0x05, 1])),
        ("DHTProtocol.rpc_ping", Bytes::from_static(&[0x12, 0x7f])),
    ] {
        match bad.call_unary(victim_peer, name, bytes, T).await {
            Err(CallError::Remote(text)) => assert!(text.contains("malformed"), "{text}"),
            other => panic!("{name}: expected an error text, got {other:?}"),
        }
    }
    let mut misaligned =
        StoreRequest::decode(store_request(DhtId::random(), vec![0xc0], vec![1], 1e12)).unwrap();
    misaligned.in_cache.clear();
    let r = bad
        .call_unary(
            victim_peer,
            "DHTProtocol.rpc_store",
            misaligned.encode_to_vec().into(),
            T,
        )
        .await;
    assert!(
        matches!(r, Err(CallError::Remote(ref t)) if t.contains("not aligned")),
        "{r:?}"
    );
    let short_key = store_request(DhtId::random(), vec![0xc0], vec![1], 1e12);
    let mut short_key = StoreRequest::decode(short_key).unwrap();
    short_key.keys[0] = Bytes::from_static(b"abc");
    let r = bad
        .call_unary(
            victim_peer,
            "DHTProtocol.rpc_store",
            short_key.encode_to_vec().into(),
            T,
        )
        .await;
    assert!(
        matches!(r, Err(CallError::Remote(ref t)) if t.contains("malformed DHT id")),
        "{r:?}"
    );

    // a forged signature on an owner-marked sub-key is refused; the owner's own signature is accepted
    let key = DhtId::from_key(&Value::str("owned"));
    let marker = owner_key.public_key().owner_marker();
    let subkey = msgpack::encode(&Value::bin(marker.clone()));
    let exp = expiration(60.0);
    let mut forged = msgpack::encode(&Value::str("forged"));
    forged.extend_from_slice(b"[signature:AAAAAAAA]");
    let reply = bad
        .call_unary(
            victim_peer,
            "DHTProtocol.rpc_store",
            store_request(key, subkey.clone(), forged, exp),
            T,
        )
        .await
        .unwrap();
    assert_eq!(StoreResponse::decode(reply).unwrap().store_ok, vec![false]);
    let unsigned = msgpack::encode(&Value::str("unsigned"));
    let reply = bad
        .call_unary(
            victim_peer,
            "DHTProtocol.rpc_store",
            store_request(key, subkey.clone(), unsigned, exp),
            T,
        )
        .await
        .unwrap();
    assert_eq!(StoreResponse::decode(reply).unwrap().store_ok, vec![false]);
    let record = DhtRecord::new(key, subkey.clone(), msgpack::encode(&Value::str("genuine")), exp);
    let signed = RsaSignatureValidator::new(owner_key.clone())
        .sign_value(&record)
        .unwrap();
    let reply = bad
        .call_unary(
            victim_peer,
            "DHTProtocol.rpc_store",
            store_request(key, subkey.clone(), signed, exp),
            T,
        )
        .await
        .unwrap();
    assert_eq!(StoreResponse::decode(reply).unwrap().store_ok, vec![true]);

    // an oversized value never gets through (the 4 MiB envelope cap)
    let huge = vec![0u8; 5 * 1024 * 1024];
    let r = bad
        .call_unary(
            victim_peer,
            "DHTProtocol.rpc_store",
            store_request(DhtId::random(), vec![0xc0], huge, exp),
            T,
        )
        .await;
    assert!(r.is_err(), "an oversized store is refused");

    // the victim keeps serving: ping, and gets through it (the genuine signed record is found, stripped)
    let ping = bad
        .call_unary(
            victim_peer,
            "DHTProtocol.rpc_ping",
            Bytes::from(apiary_dht::protocol::build_ping_request(NodeInfo::default(), false).encode_to_vec()),
            T,
        )
        .await
        .unwrap();
    assert!(PingResponse::decode(ping).unwrap().peer.unwrap().node_id.len() == 20);
    let got = nodes[3].dht.get(Value::str("owned"), true).await.unwrap();
    match got {
        Some(Found::Dictionary { entries, .. }) => {
            assert_eq!(entries, vec![(Value::bin(marker), Value::str("genuine"), exp)]);
        }
        other => panic!("expected the owner's dictionary, got {other:?}"),
    }
    assert!(
        nodes[5]
            .dht
            .store(Value::str("after"), Value::from(1), expiration(60.0), None)
            .await
            .unwrap()
    );
    assert!(
        victim
            .dht
            .get(Value::str("after"), false)
            .await
            .unwrap()
            .is_some()
    );
    for n in &nodes {
        n.stop().await;
    }
    bad.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_with_garbage_responses_is_survived() {
    // a "DHT peer" that answers pings properly (so it enters routing tables) but finds and stores with
    // garbage
    let (bad, bad_addr) = host().await;
    let node_id = Bytes::copy_from_slice(DhtId::random().as_bytes());
    let ping: UnaryHandler = Arc::new(move |_, _| {
        let node_id = node_id.clone();
        async move {
            Ok(Bytes::from(
                PingResponse {
                    peer: Some(NodeInfo { node_id }),
                    dht_time: get_dht_time(),
                    available: true,
                    auth: None,
                }
                .encode_to_vec(),
            ))
        }
        .boxed()
    });
    let garbage: UnaryHandler =
        Arc::new(|_, _| async { Ok(Bytes::from_static(&[0xff, 0x01, 0x02])) }.boxed());
    bad.add_unary_handler("DHTProtocol.rpc_ping", ping).unwrap();
    bad.add_unary_handler("DHTProtocol.rpc_find", garbage.clone())
        .unwrap();
    bad.add_unary_handler("DHTProtocol.rpc_store", garbage).unwrap();

    let good = common::node(vec![]).await;
    let a = common::node(vec![bad_addr.clone(), good.addr.clone()]).await;
    let b = common::node(vec![bad_addr, a.addr.clone()]).await;
    let exp = expiration(60.0);
    assert!(
        a.dht
            .store(Value::str("k"), Value::str("v"), exp, None)
            .await
            .unwrap()
    );
    let got = b.dht.get(Value::str("k"), true).await.unwrap();
    assert_eq!(
        got,
        Some(Found::Regular {
            value: Value::str("v"),
            expiration: exp
        })
    );
    for n in [&good, &a, &b] {
        n.stop().await;
    }
    bad.shutdown().await;
}
