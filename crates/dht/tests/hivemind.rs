//! Interop with real hivemind 1.1.12 DHT peers (the cached venv with its Go p2pd): an Apiary node
//! bootstraps from a hivemind node, values go both ways (regular and dictionary sub-keys), and a
//! hivemind peer bootstraps from an Apiary node.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use apiary_dht::Found;
use apiary_testkit::HivemindPeer;
use apiary_wire::msgpack::Value;
use common::{args, expiration, node, oneshot};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apiary_and_hivemind_share_one_dht() {
    let hivemind = tokio::task::spawn_blocking(|| HivemindPeer::spawn("dht", &[], Duration::from_secs(120)))
        .await
        .unwrap();
    let h_addr = hivemind.maddr().to_owned();

    // (1) an Apiary node bootstraps from the hivemind node
    let apiary = node(vec![h_addr.parse().unwrap()]).await;
    assert!(apiary.dht.routing_table_len().await.unwrap() >= 1);

    // Apiary stores, hivemind reads: a regular value and a dictionary sub-key
    let exp = expiration(120.0);
    assert!(
        apiary
            .dht
            .store(
                Value::str("apiary-regular"),
                Value::str("hello from apiary"),
                exp,
                None
            )
            .await
            .unwrap()
    );
    assert!(
        apiary
            .dht
            .store(
                Value::str("apiary-dict"),
                Value::from(7),
                exp,
                Some(Value::str("s1"))
            )
            .await
            .unwrap()
    );
    let got = oneshot(args(&[
        "dht-get",
        "--initial-peers",
        &h_addr,
        "--key",
        "apiary-regular",
    ]))
    .await;
    assert_eq!(got["found"], true, "{got}");
    assert_eq!(got["kind"], "regular");
    assert_eq!(got["value"], "hello from apiary");
    let got = oneshot(args(&[
        "dht-get",
        "--initial-peers",
        &h_addr,
        "--key",
        "apiary-dict",
    ]))
    .await;
    assert_eq!(got["kind"], "dictionary", "{got}");
    assert_eq!(got["value"], serde_json::json!({"s1": 7}));

    // (2) hivemind stores, Apiary reads
    let stored = oneshot(args(&[
        "dht-store",
        "--initial-peers",
        &h_addr,
        "--key",
        "hivemind-regular",
        "--value",
        "[1, 2, \"three\"]",
    ]))
    .await;
    assert_eq!(stored["ok"], true, "{stored}");
    let stored = oneshot(args(&[
        "dht-store",
        "--initial-peers",
        &h_addr,
        "--key",
        "hivemind-dict",
        "--subkey",
        "\"sk\"",
        "--value",
        "\"sub-value\"",
    ]))
    .await;
    assert_eq!(stored["ok"], true, "{stored}");
    match apiary
        .dht
        .get(Value::str("hivemind-regular"), true)
        .await
        .unwrap()
    {
        Some(Found::Regular { value, .. }) => {
            assert_eq!(
                value,
                Value::list([Value::from(1), Value::from(2), Value::str("three")])
            );
        }
        other => panic!("expected hivemind's regular value, got {other:?}"),
    }
    match apiary.dht.get(Value::str("hivemind-dict"), true).await.unwrap() {
        Some(Found::Dictionary { entries, .. }) => {
            assert_eq!(entries.len(), 1);
            assert_eq!(
                (&entries[0].0, &entries[0].1),
                (&Value::str("sk"), &Value::str("sub-value"))
            );
        }
        other => panic!("expected hivemind's dictionary, got {other:?}"),
    }

    // (3) hivemind peers bootstrap from the Apiary node alone
    let a_addr = apiary.addr.to_string();
    let got = oneshot(args(&[
        "dht-get",
        "--initial-peers",
        &a_addr,
        "--key",
        "apiary-regular",
    ]))
    .await;
    assert_eq!(got["value"], "hello from apiary", "{got}");
    let got = oneshot(args(&[
        "dht-get",
        "--initial-peers",
        &a_addr,
        "--key",
        "hivemind-regular",
    ]))
    .await;
    assert_eq!(got["value"], serde_json::json!([1, 2, "three"]), "{got}");

    apiary.stop().await;
    drop(hivemind);
}
