//! Apiary DHT swarms on 127.0.0.1 over real libp2p: store/get at scale, churn, expiration and
//! dictionary-merge rules.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use apiary_dht::{Found, StoreEntry};
use apiary_wire::msgpack::Value;
use common::{Node, eventually, expiration, node, swarm};
use futures::StreamExt;
use rand::Rng;

fn value_of(i: usize) -> Value {
    Value::str(format!("value-{i}"))
}

/// Key `i`: regular unless `i % 10 >= 7`, then a dictionary with sub-keys "a" and "b".
async fn store_key(nodes: &[Node], i: usize, exp: f64) -> bool {
    let node = &nodes[rand::thread_rng().gen_range(0..nodes.len())];
    let mut entries = entries_of(i, exp);
    if entries.len() == 1 {
        let e = entries.remove(0);
        node.dht.store(e.key, e.value, e.expiration, None).await.unwrap()
    } else {
        let oks = node.dht.store_many(entries, false).await.unwrap();
        oks.into_iter().all(|ok| ok)
    }
}

async fn check_key(nodes: &[Node], i: usize) -> bool {
    let node = &nodes[rand::thread_rng().gen_range(0..nodes.len())];
    let key = Value::str(format!("key-{i}"));
    matches(i, node.dht.get(key, false).await.unwrap())
}

async fn store_all(nodes: &[Node], range: std::ops::Range<usize>, exp: f64) -> usize {
    futures::stream::iter(range)
        .map(|i| store_key(nodes, i, exp))
        .buffer_unordered(32)
        .filter(|ok| futures::future::ready(*ok))
        .count()
        .await
}

/// The entries of key `i` (one regular value, or sub-keys "a" and "b").
fn entries_of(i: usize, exp: f64) -> Vec<StoreEntry> {
    let key = Value::str(format!("key-{i}"));
    if i % 10 >= 7 {
        ["a", "b"]
            .into_iter()
            .map(|s| StoreEntry {
                key: key.clone(),
                subkey: Some(Value::str(s)),
                value: Value::str(format!("{s}-{i}")),
                expiration: exp,
            })
            .collect()
    } else {
        vec![StoreEntry {
            key,
            subkey: None,
            value: value_of(i),
            expiration: exp,
        }]
    }
}

fn matches(i: usize, found: Option<Found>) -> bool {
    match found {
        Some(Found::Regular { value, .. }) => i % 10 < 7 && value == value_of(i),
        Some(Found::Dictionary { entries, .. }) => {
            let mut got: Vec<(String, String)> = entries
                .into_iter()
                .map(|(s, v, _)| (s.as_str().unwrap().to_owned(), v.as_str().unwrap().to_owned()))
                .collect();
            got.sort();
            i % 10 >= 7 && got == vec![("a".into(), format!("a-{i}")), ("b".into(), format!("b-{i}"))]
        }
        None => false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousand_keys_on_32_nodes() {
    let nodes = swarm(32).await;
    for n in &nodes {
        assert!(n.dht.routing_table_len().await.unwrap() > 0);
    }
    let exp = expiration(600.0);
    // keys 0..400 one by one (store / get), keys 400..1000 in batches of 10 (store_many / get_many),
    // each from a random node
    let mut stored = store_all(&nodes, 0..400, exp).await;
    stored += futures::stream::iter((400..1000).step_by(10))
        .map(|first| {
            let node = &nodes[rand::thread_rng().gen_range(0..nodes.len())];
            let entries: Vec<StoreEntry> = (first..first + 10).flat_map(|i| entries_of(i, exp)).collect();
            async move {
                let oks = node.dht.store_many(entries, false).await.unwrap();
                assert!(oks.iter().all(|ok| *ok), "batch at {first}: {oks:?}");
                10
            }
        })
        .buffer_unordered(8)
        .fold(0, |a, b| futures::future::ready(a + b))
        .await;
    assert_eq!(stored, 1000, "every store succeeds");
    let mut found = futures::stream::iter(0..400)
        .map(|i| check_key(&nodes, i))
        .buffer_unordered(32)
        .filter(|ok| futures::future::ready(*ok))
        .count()
        .await;
    found += futures::stream::iter((400..1000).step_by(10))
        .map(|first| {
            let node = &nodes[rand::thread_rng().gen_range(0..nodes.len())];
            let keys = (first..first + 10)
                .map(|i| Value::str(format!("key-{i}")))
                .collect();
            async move {
                let got = node.dht.get_many(keys, false).await.unwrap();
                got.into_iter()
                    .enumerate()
                    .filter(|(j, f)| matches(first + j, f.clone()))
                    .count()
            }
        })
        .buffer_unordered(8)
        .fold(0, |a, b| futures::future::ready(a + b))
        .await;
    assert_eq!(found, 1000, "every key is found with its value");
    for n in &nodes {
        n.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn churn_keeps_replicated_values() {
    let mut nodes = swarm(20).await;
    let exp = expiration(600.0);
    assert_eq!(store_all(&nodes, 0..150, exp).await, 150);
    // 20% of the nodes go away mid-run
    let dead: Vec<Node> = nodes.drain(1..5).collect();
    for n in &dead {
        n.stop().await;
    }
    assert_eq!(store_all(&nodes, 150..300, exp).await, 150);
    let mut replicated = 0;
    let mut some_holder = 0;
    let mut found_with_some_holder = 0;
    for i in 0..300 {
        let key = Value::str(format!("key-{i}"));
        let mut holders = 0;
        for n in &nodes {
            holders += usize::from(n.dht.holds(&key).await.unwrap());
        }
        let found = check_key(&nodes, i).await;
        if holders >= nodes[0].dht.config().num_replicas {
            replicated += 1;
            assert!(found, "key {i} has {holders} live holders but was not found");
        }
        if holders > 0 {
            some_holder += 1;
            found_with_some_holder += usize::from(found);
        }
        if i >= 150 {
            // stored after the churn: on live nodes only (dead ones in the beam just do not answer)
            assert!(
                holders > 0 && found,
                "key {i} stored after the churn: {holders} holders"
            );
        }
    }
    assert!(
        replicated > 0,
        "some keys keep all {} replicas",
        nodes[0].dht.config().num_replicas
    );
    assert_eq!(found_with_some_holder, some_holder);
    for n in &nodes {
        n.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expiration_and_dictionary_rules() {
    let nodes = swarm(8).await;
    let (a, b) = (&nodes[2].dht, &nodes[6].dht);
    let key = Value::str("rules");

    // regular values: a later expiration replaces, an earlier one is rejected, an expired one too
    let t = expiration(60.0);
    assert!(a.store(key.clone(), Value::str("v1"), t, None).await.unwrap());
    assert!(
        !b.store(key.clone(), Value::str("v0"), t - 10.0, None)
            .await
            .unwrap()
    );
    assert!(
        !b.store(key.clone(), Value::str("old"), expiration(-5.0), None)
            .await
            .unwrap()
    );
    assert!(
        b.store(key.clone(), Value::str("v2"), t + 10.0, None)
            .await
            .unwrap()
    );
    let got = nodes[7].dht.get(key.clone(), true).await.unwrap().unwrap();
    assert_eq!(
        got,
        Found::Regular {
            value: Value::str("v2"),
            expiration: t + 10.0
        }
    );

    // a sub-key with an earlier expiration than the regular value is rejected; a later one turns the
    // key into a dictionary
    assert!(
        !a.store(key.clone(), Value::str("s"), t, Some(Value::str("x")))
            .await
            .unwrap()
    );
    assert!(
        a.store(key.clone(), Value::str("x1"), t + 20.0, Some(Value::str("x")))
            .await
            .unwrap()
    );
    assert!(
        b.store(key.clone(), Value::str("y1"), t + 15.0, Some(Value::str("y")))
            .await
            .unwrap()
    );
    // per-sub-key rules: older "x" rejected, newer "y" accepted
    assert!(
        !b.store(key.clone(), Value::str("x0"), t + 19.0, Some(Value::str("x")))
            .await
            .unwrap()
    );
    assert!(
        a.store(key.clone(), Value::str("y2"), t + 30.0, Some(Value::str("y")))
            .await
            .unwrap()
    );
    // a regular value expiring before the dictionary's latest entry is rejected
    assert!(
        !a.store(key.clone(), Value::str("r"), t + 25.0, None)
            .await
            .unwrap()
    );
    let Some(Found::Dictionary {
        mut entries,
        expiration: dict_exp,
    }) = nodes[0].dht.get(key.clone(), true).await.unwrap()
    else {
        panic!("expected a dictionary")
    };
    entries.sort_by(|l, r| l.0.as_str().cmp(&r.0.as_str()));
    assert_eq!(dict_exp, t + 30.0);
    assert_eq!(
        entries,
        vec![
            (Value::str("x"), Value::str("x1"), t + 20.0),
            (Value::str("y"), Value::str("y2"), t + 30.0)
        ]
    );

    // short-lived values disappear once they expire, everywhere (storage and caches)
    let short = Value::str("short-lived");
    assert!(
        a.store(short.clone(), Value::str("soon gone"), expiration(1.5), None)
            .await
            .unwrap()
    );
    assert!(b.get(short.clone(), false).await.unwrap().is_some());
    let gone = eventually(Duration::from_secs(10), || async {
        nodes[5].dht.get(short.clone(), false).await.unwrap().is_none()
            && b.get(short.clone(), false).await.unwrap().is_none()
    })
    .await;
    assert!(gone, "an expired value is no longer returned");
    // a missing key is not found
    assert!(
        nodes[1]
            .dht
            .get(Value::str("never stored"), false)
            .await
            .unwrap()
            .is_none()
    );
    for n in &nodes {
        n.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_mode_node_stores_and_gets_but_is_not_routed_to() {
    let nodes = swarm(6).await;
    let mut config = common::test_config();
    config.client_mode = true;
    let client = common::node_with(
        vec![nodes[0].addr.clone()],
        config,
        apiary_dht::validation::CompositeValidator::default(),
    )
    .await;
    let t = expiration(60.0);
    assert!(
        client
            .dht
            .store(Value::str("from client"), Value::from(42), t, None)
            .await
            .unwrap()
    );
    let got = nodes[3]
        .dht
        .get(Value::str("from client"), false)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        got,
        Found::Regular {
            value: Value::from(42),
            expiration: t
        }
    );
    // nobody added the client to their routing table
    let client_peer = client.p2p.local_peer_id();
    for n in &nodes {
        assert!(
            n.dht
                .find_nearest_nodes(&[client.dht.node_id()], 20, true)
                .await
                .values()
                .all(|v| v.iter().all(|(_, p)| *p != client_peer))
        );
    }
    client.stop().await;
    for n in &nodes {
        n.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bootstrap_fails_clearly_when_no_initial_peer_answers() {
    let (p2p, addr) = common::host().await;
    p2p.shutdown().await; // a peer that is gone
    let (p2p2, _) = common::host().await;
    let err = apiary_dht::Dht::spawn(p2p2.clone(), common::test_config(), vec![addr])
        .await
        .unwrap_err();
    assert!(
        matches!(err, apiary_dht::DhtError::BootstrapFailed { tried: 1, .. }),
        "{err}"
    );
    // a lone first node needs no initial peers
    let lonely = node(vec![]).await;
    assert!(lonely.dht.get(Value::str("x"), false).await.unwrap().is_none());
    lonely.stop().await;
    p2p2.shutdown().await;
}

/// hivemind's cache refresh: a key a node keeps reading from its cache is fetched again before it
/// expires, so a newer value in the swarm replaces the cached one without waiting for the expiry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cached_keys_in_use_are_refreshed_before_they_expire() {
    let nodes = swarm(5).await;
    let mut config = common::test_config();
    // a client holds no replicas: what it reads comes from its cache or from the swarm
    config.client_mode = true;
    config.cache_refresh_before_expiry = Duration::from_secs(28);
    let reader = common::node_with(
        vec![nodes[0].addr.clone()],
        config,
        apiary_dht::validation::CompositeValidator::default(),
    )
    .await;
    let key = Value::str("refreshed key");
    let first = expiration(30.0);
    assert!(
        nodes[1]
            .dht
            .store(key.clone(), Value::from(1), first, None)
            .await
            .unwrap()
    );
    let regular = |found: Option<Found>| match found {
        Some(Found::Regular { value, .. }) => Some(value),
        _ => None,
    };
    // many concurrent first reads (they share results: reuse_get_requests) all see the value
    let reads = (0..16).map(|_| reader.dht.get(key.clone(), false));
    for got in futures::future::join_all(reads).await {
        assert_eq!(regular(got.unwrap()), Some(Value::from(1)));
    }
    // a read served from the cache schedules a refresh at `first` - 28 s
    assert_eq!(
        regular(reader.dht.get(key.clone(), false).await.unwrap()),
        Some(Value::from(1))
    );
    assert!(
        nodes[2]
            .dht
            .store(key.clone(), Value::from(2), expiration(120.0), None)
            .await
            .unwrap()
    );
    // without the refresh the cache would answer 1 until `first`, 30 s from now
    let refreshed = eventually(Duration::from_secs(12), || {
        let dht = reader.dht.clone();
        let key = key.clone();
        async move { regular(dht.get(key, false).await.unwrap()) == Some(Value::from(2)) }
    })
    .await;
    assert!(refreshed, "the cached value was not refreshed");
    reader.stop().await;
    for n in &nodes {
        n.stop().await;
    }
}

/// Two replicas keep the same key (hivemind's `uid → peer` declaration of a replicated expert), the
/// newest writer's value wins; a replica that withdraws erases the key only while it still holds its own
/// value, so the other replica stays visible.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_withdrawal_erases_only_its_own_value() {
    use apiary_dht::{KeptRecord, Refresher};
    let nodes = swarm(6).await;
    let key = Value::str("ffn.0.1");
    let subkey_key = Value::str("ffn.0.");
    let record = |peer: &str| {
        vec![
            KeptRecord {
                key: key.clone(),
                subkey: None,
                value: Value::str(peer),
            },
            KeptRecord {
                key: subkey_key.clone(),
                subkey: Some(Value::str("1")),
                value: Value::str(peer),
            },
        ]
    };
    let period = Duration::from_secs(600);
    let ttl = Duration::from_secs(30);
    let (first, stored) = Refresher::start(nodes[1].dht.clone(), record("peer-a"), period, ttl).await;
    assert!(stored > 0);
    tokio::time::sleep(Duration::from_millis(50)).await;
    let (second, stored) = Refresher::start(nodes[2].dht.clone(), record("peer-b"), period, ttl).await;
    assert!(stored > 0);
    let reader = &nodes[4].dht;
    let value_now = async || match reader.get(key.clone(), true).await.unwrap() {
        Some(Found::Regular { value, .. }) if value != Value::Nil => Some(value),
        _ => None,
    };
    let entry_now = async || match reader.get(subkey_key.clone(), true).await.unwrap() {
        Some(Found::Dictionary { entries, .. }) => entries
            .into_iter()
            .find(|(k, _, _)| *k == Value::str("1"))
            .map(|(_, v, _)| v)
            .filter(|v| *v != Value::Nil),
        _ => None,
    };
    assert_eq!(
        value_now().await,
        Some(Value::str("peer-b")),
        "the newest writer wins"
    );
    // the older replica leaves: the newer one's records stay
    first.withdraw().await;
    assert_eq!(value_now().await, Some(Value::str("peer-b")));
    assert_eq!(entry_now().await, Some(Value::str("peer-b")));
    // the replica whose value readers see leaves: gone at once
    second.withdraw().await;
    assert_eq!(value_now().await, None);
    assert_eq!(entry_now().await, None);
    for n in &nodes {
        n.stop().await;
    }
}

/// A node that lost every peer (its only bootstrap peer went away) dials its initial peers again by itself
/// and is back in the swarm once the bootstrap peer returns (hivemind's nodes stay alone).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_lost_every_peer_bootstraps_again() {
    use apiary_p2p::{Host, Keypair, P2pConfig};
    let key = Keypair::generate_ed25519();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let boot_at = |key: Keypair| async move {
        let (p2p, _task) = Host::spawn(P2pConfig {
            keypair: Some(key),
            ..P2pConfig::default()
        })
        .unwrap();
        let addr = p2p
            .listen(format!("/ip4/127.0.0.1/tcp/{port}").parse().unwrap())
            .await
            .unwrap();
        let dht = apiary_dht::Dht::spawn(p2p.clone(), common::test_config(), vec![])
            .await
            .unwrap();
        let addr = addr.with_p2p(p2p.local_peer_id()).unwrap();
        common::Node { dht, p2p, addr }
    };
    let boot = boot_at(key.clone()).await;
    let volunteer = node(vec![boot.addr.clone()]).await;
    let boot_id = boot.p2p.local_peer_id();
    assert!(volunteer.p2p.connected_peers().borrow().contains(&boot_id));

    boot.stop().await;
    let mut peers = volunteer.p2p.connected_peers();
    tokio::time::timeout(Duration::from_secs(20), peers.wait_for(|p| p.is_empty()))
        .await
        .expect("the volunteer kept a peer that is gone")
        .unwrap();
    // gone for a few of the volunteer's tries
    tokio::time::sleep(Duration::from_secs(3)).await;
    let boot = boot_at(key).await;
    tokio::time::timeout(Duration::from_secs(30), peers.wait_for(|p| p.contains(&boot_id)))
        .await
        .expect("the volunteer never came back to its bootstrap peer")
        .unwrap();
    let exp = expiration(60.0);
    assert!(
        volunteer
            .dht
            .store(Value::str("after-the-outage"), Value::from(7), exp, None)
            .await
            .unwrap()
    );
    assert!(
        eventually(Duration::from_secs(10), || async {
            boot.dht
                .get(Value::str("after-the-outage"), true)
                .await
                .ok()
                .flatten()
                .is_some()
        })
        .await,
        "the volunteer's store did not reach the returned bootstrap peer"
    );
    volunteer.stop().await;
    boot.stop().await;
}
