//! Interop with real hivemind 1.1.12 at swarm scale: a mixed swarm of Apiary and hivemind DHT nodes
//! where every node finds every key, and RSA-signed owner sub-keys across the two implementations.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use apiary_dht::validation::{CompositeValidator, RecordValidator, RsaOwnerValidator, ValidatorError};
use apiary_dht::{Found, StoreEntry};
use apiary_testkit::HivemindPeer;
use apiary_wire::msgpack::Value;
use apiary_wire::signature::{DhtRecord, RsaPrivateKey, RsaSignatureValidator};
use common::{Node, args, expiration, node, node_with, oneshot, test_config};
use serde_json::json;

/// Starts hivemind `dht` peers concurrently, one per argument list.
async fn spawn_peers(arg_lists: Vec<Vec<String>>) -> Vec<HivemindPeer> {
    let spawns = arg_lists.into_iter().map(|a| {
        tokio::task::spawn_blocking(move || {
            let refs: Vec<&str> = a.iter().map(String::as_str).collect();
            HivemindPeer::spawn("dht", &refs, Duration::from_secs(90))
        })
    });
    futures::future::join_all(spawns)
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect()
}

/// What a key should hold: a regular string, or string sub-keys with string values.
#[derive(Debug, Clone, PartialEq)]
enum Expected {
    Regular(String),
    Dict(BTreeMap<String, String>),
}

fn expected_json(e: &Expected) -> serde_json::Value {
    match e {
        Expected::Regular(v) => json!({"kind": "regular", "value": v}),
        Expected::Dict(d) => json!({"kind": "dictionary", "value": d}),
    }
}

fn found_json(found: Option<Found>) -> serde_json::Value {
    let text = |v: &Value| match v {
        Value::Str(s) => s.clone(),
        Value::Bin(b) => String::from_utf8_lossy(b).into_owned(),
        other => format!("{other:?}"),
    };
    match found {
        None => json!({"found": false}),
        Some(Found::Regular { value, .. }) => json!({"kind": "regular", "value": text(&value)}),
        Some(Found::Dictionary { entries, .. }) => {
            let d: BTreeMap<String, String> = entries.iter().map(|(s, v, _)| (text(s), text(v))).collect();
            json!({"kind": "dictionary", "value": d})
        }
    }
}

/// 8 Apiary nodes and 8 real hivemind `dht` peers, bootstrapped from each other in turn; both sides
/// store regular values and sub-keys (some into one dictionary that both write); then all 8 Apiary nodes
/// and 8 hivemind clients (each bootstrapped from a different node) find every key with its value.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mixed_swarm_every_node_finds_every_key() {
    let t0 = Instant::now();
    // A0..A3: an Apiary chain
    let mut apiary: Vec<Node> = Vec::new();
    for i in 0..4 {
        let initial = apiary
            .last()
            .map(|n: &Node| vec![n.addr.clone()])
            .unwrap_or_default();
        apiary.push(node(initial).await);
        assert!(i == 0 || apiary[i].dht.routing_table_len().await.unwrap() >= 1);
    }
    // H0..H3 from A0..A3
    let mut hivemind = spawn_peers(
        (0..4)
            .map(|i| args(&["--initial-peers", &apiary[i].addr.to_string()]))
            .collect(),
    )
    .await;
    // A4..A7 from H0..H3 alone
    for i in 4..8 {
        let a = node(vec![hivemind[i - 4].maddr().parse().unwrap()]).await;
        assert!(a.dht.routing_table_len().await.unwrap() >= 1);
        apiary.push(a);
    }
    // H4..H7 from A4, H1, A6, H3
    let h_initial: Vec<String> = (4..8)
        .map(|i| {
            if i % 2 == 0 {
                apiary[i].addr.to_string()
            } else {
                hivemind[i - 4].maddr().to_owned()
            }
        })
        .collect();
    hivemind.extend(spawn_peers(h_initial.iter().map(|a| args(&["--initial-peers", a])).collect()).await);
    let started = t0.elapsed();

    let mut expected: BTreeMap<String, Expected> = BTreeMap::new();
    let mut shared = BTreeMap::new();
    // Apiary: each node a regular key, a sub-key of its own dictionary and one of the shared dictionary
    let exp = expiration(300.0);
    let stores = apiary.iter().enumerate().map(|(i, n)| {
        let entries = vec![
            StoreEntry {
                key: Value::str(format!("apiary-reg-{i}")),
                subkey: None,
                value: Value::str(format!("apiary value {i}")),
                expiration: exp,
            },
            StoreEntry {
                key: Value::str(format!("apiary-dict-{}", i % 2)),
                subkey: Some(Value::str(format!("a{i}"))),
                value: Value::str(format!("apiary sub {i}")),
                expiration: exp,
            },
            StoreEntry {
                key: Value::str("shared-dict"),
                subkey: Some(Value::str(format!("apiary-{i}"))),
                value: Value::str(format!("from apiary {i}")),
                expiration: exp,
            },
        ];
        n.dht.store_many(entries, false)
    });
    for (i, oks) in futures::future::join_all(stores).await.into_iter().enumerate() {
        assert_eq!(oks.unwrap(), vec![true; 3], "Apiary node {i} failed to store");
        expected.insert(
            format!("apiary-reg-{i}"),
            Expected::Regular(format!("apiary value {i}")),
        );
        let Expected::Dict(d) = expected
            .entry(format!("apiary-dict-{}", i % 2))
            .or_insert_with(|| Expected::Dict(BTreeMap::new()))
        else {
            unreachable!()
        };
        d.insert(format!("a{i}"), format!("apiary sub {i}"));
        shared.insert(format!("apiary-{i}"), format!("from apiary {i}"));
    }
    // hivemind: two batch clients (bootstrapped from H1 and A5) store the same kinds of records
    let batches = [hivemind[1].maddr().to_owned(), apiary[5].addr.to_string()]
        .into_iter()
        .enumerate()
        .map(|(b, via)| {
            let mut items = Vec::new();
            for j in 0..4 {
                let i = b * 4 + j;
                items.push(json!({"key": format!("hivemind-reg-{i}"), "value": format!("hivemind value {i}"), "ttl": 300}));
                items.push(json!({"key": format!("hivemind-dict-{b}"), "subkey": format!("h{i}"), "value": format!("hivemind sub {i}"), "ttl": 300}));
                items.push(json!({"key": "shared-dict", "subkey": format!("hivemind-{i}"), "value": format!("from hivemind {i}"), "ttl": 300}));
            }
            let items = serde_json::to_string(&items).unwrap();
            oneshot(args(&["dht-store-many", "--initial-peers", &via, "--items", &items]))
        });
    for (b, result) in futures::future::join_all(batches).await.into_iter().enumerate() {
        assert_eq!(
            result["ok"],
            json!(vec![true; 12]),
            "hivemind batch {b}: {result}"
        );
        for j in 0..4 {
            let i = b * 4 + j;
            expected.insert(
                format!("hivemind-reg-{i}"),
                Expected::Regular(format!("hivemind value {i}")),
            );
            let Expected::Dict(d) = expected
                .entry(format!("hivemind-dict-{b}"))
                .or_insert_with(|| Expected::Dict(BTreeMap::new()))
            else {
                unreachable!()
            };
            d.insert(format!("h{i}"), format!("hivemind sub {i}"));
            shared.insert(format!("hivemind-{i}"), format!("from hivemind {i}"));
        }
    }
    expected.insert("shared-dict".into(), Expected::Dict(shared));
    let stored = t0.elapsed();
    let keys: Vec<String> = expected.keys().cloned().collect();
    assert_eq!(keys.len(), 8 + 2 + 8 + 2 + 1);

    // every Apiary node finds every key
    let gets = apiary
        .iter()
        .map(|n| n.dht.get_many(keys.iter().map(Value::str).collect(), true));
    for (i, found) in futures::future::join_all(gets).await.into_iter().enumerate() {
        for (key, found) in keys.iter().zip(found.unwrap()) {
            assert_eq!(
                found_json(found),
                expected_json(&expected[key]),
                "Apiary node {i}, key {key}"
            );
        }
    }
    // hivemind clients bootstrapped from each node in turn (H0, A1, H2, A3, H4, A5, H6, A7) find every key
    let gets = (0..8).map(|i| {
        let via = if i % 2 == 0 {
            hivemind[i].maddr().to_owned()
        } else {
            apiary[i].addr.to_string()
        };
        let mut a = args(&["dht-get-many", "--initial-peers", &via, "--keys"]);
        a.extend(keys.iter().cloned());
        oneshot(a)
    });
    for (i, result) in futures::future::join_all(gets).await.into_iter().enumerate() {
        assert_eq!(result["event"], "result", "hivemind client {i}: {result}");
        for key in &keys {
            let got = &result["found"][key];
            assert_eq!(got["found"], true, "hivemind client {i}, key {key}: {got}");
            let got = json!({"kind": got["kind"], "value": got["value"]});
            assert_eq!(
                got,
                expected_json(&expected[key]),
                "hivemind client {i}, key {key}"
            );
        }
    }
    eprintln!(
        "mixed swarm: 16 nodes up in {:.1?}, stored after {:.1?}, all checked after {:.1?}",
        started,
        stored,
        t0.elapsed()
    );
    for n in &apiary {
        n.stop().await;
    }
    drop(hivemind);
}

/// Signs like an owner would, but with the wrong key: appends a well-formed `[signature:…]` made by
/// `key` to every record whose sub-key carries `marker` (someone else's owner marker), and accepts
/// every record, so the forgery is stored locally and served to others.
#[derive(Debug)]
struct Forger {
    key: RsaPrivateKey,
    marker: Vec<u8>,
}

impl RecordValidator for Forger {
    fn validate(&self, _record: &DhtRecord) -> Result<bool, ValidatorError> {
        Ok(true)
    }

    fn sign_value(&self, record: &DhtRecord) -> Result<Vec<u8>, ValidatorError> {
        if !record.subkey.windows(self.marker.len()).any(|w| w == self.marker) {
            return Ok(record.value.clone());
        }
        let mut value = record.value.clone();
        value.extend_from_slice(b"[signature:");
        value.extend_from_slice(&self.key.sign(&record.signed_message())?);
        value.push(b']');
        Ok(value)
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

/// Accepts every record and strips signatures without checking them.
#[derive(Debug)]
struct Gullible;

impl RecordValidator for Gullible {
    fn validate(&self, _record: &DhtRecord) -> Result<bool, ValidatorError> {
        Ok(true)
    }

    fn strip_value(&self, record: &DhtRecord) -> Vec<u8> {
        apiary_wire::signature::strip_signatures(&record.value)
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

fn dictionary_of(found: Option<Found>) -> Vec<(Value, Value)> {
    match found {
        Some(Found::Dictionary { entries, .. }) => entries.into_iter().map(|(s, v, _)| (s, v)).collect(),
        other => panic!("expected a dictionary, got {other:?}"),
    }
}

/// RSA owner sub-keys both ways: hivemind signs, Apiary (`RsaOwnerValidator`) reads the value without
/// the signature; Apiary signs, hivemind (`RSASignatureValidator`) reads it; the same private key gives
/// the same owner marker in both; a sub-key with hivemind's owner marker but a signature by another key is
/// served by the forger yet dropped by hivemind's validated get (and Apiary's).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rsa_owner_subkeys_across_implementations() {
    let t0 = Instant::now();
    let h = spawn_peers(vec![args(&["--rsa-validator"])]).await.pop().unwrap();
    let h_addr = h.maddr().to_owned();
    let h_owner = h.ready["owner"].as_str().unwrap().to_owned();
    assert!(h_owner.starts_with("[owner:ssh-rsa "), "{h_owner}");

    let apiary_key = RsaPrivateKey::generate().unwrap();
    let rsa = RsaSignatureValidator::new(apiary_key.clone());
    let a_owner = rsa.local_public_key().to_vec();
    let a = node_with(
        vec![h_addr.parse().unwrap()],
        test_config(),
        CompositeValidator::new([Box::new(RsaOwnerValidator(rsa)) as Box<dyn RecordValidator>]),
    )
    .await;
    let key_file = std::env::temp_dir().join(format!("apiary-mixed-rsa-{}.der", std::process::id()));
    std::fs::write(&key_file, apiary_key.to_der().unwrap()).unwrap();
    let key_file_str = key_file.to_str().unwrap().to_owned();

    // hivemind signs with its own key, and (in a second client) with Apiary's key from the file
    let (own, with_file) = futures::future::join(
        oneshot(args(&[
            "dht-store",
            "--rsa-validator",
            "--initial-peers",
            &h_addr,
            "--key",
            "hivemind-owned",
            "--owner-subkey",
            "--value",
            "\"signed by hivemind\"",
        ])),
        oneshot(args(&[
            "dht-store",
            "--rsa-validator",
            "--private-key-file",
            &key_file_str,
            "--initial-peers",
            &a.addr.to_string(),
            "--key",
            "hivemind-owned-apiary-key",
            "--owner-subkey",
            "--value",
            "\"same key, signed by hivemind\"",
        ])),
    )
    .await;
    let _ = std::fs::remove_file(&key_file);
    assert_eq!(own["ok"], true, "{own}");
    // each hivemind process signs with its own process-wide key unless given one
    let client_owner = own["owner"].as_str().unwrap().to_owned();
    assert!(client_owner.starts_with("[owner:ssh-rsa "), "{own}");
    assert_eq!(with_file["ok"], true, "{with_file}");
    assert_eq!(
        with_file["owner"].as_str().unwrap().as_bytes(),
        a_owner.as_slice(),
        "the same private key must give the same owner marker"
    );
    // Apiary reads them, signatures stripped
    let found = a
        .dht
        .get_many(
            vec![
                Value::str("hivemind-owned"),
                Value::str("hivemind-owned-apiary-key"),
            ],
            true,
        )
        .await
        .unwrap();
    let mut found = found.into_iter();
    assert_eq!(
        dictionary_of(found.next().unwrap()),
        vec![(
            Value::bin(client_owner.as_bytes()),
            Value::str("signed by hivemind")
        )]
    );
    assert_eq!(
        dictionary_of(found.next().unwrap()),
        vec![(
            Value::bin(a_owner.clone()),
            Value::str("same key, signed by hivemind")
        )]
    );

    // Apiary signs; a forger (no RSA validator) stores a sub-key with hivemind's marker, signed by another key
    assert!(
        a.dht
            .store(
                Value::str("apiary-owned"),
                Value::str("signed by apiary"),
                expiration(300.0),
                Some(Value::bin(a_owner.clone())),
            )
            .await
            .unwrap()
    );
    let forger = node_with(
        vec![a.addr.clone(), h_addr.parse().unwrap()],
        test_config(),
        CompositeValidator::new([Box::new(Forger {
            key: apiary_key,
            marker: h_owner.as_bytes().to_vec(),
        }) as Box<dyn RecordValidator>]),
    )
    .await;
    // the honest nodes refuse it; the forger keeps its own copy
    let _ = forger
        .dht
        .store(
            Value::str("forged"),
            Value::str("not really from hivemind"),
            expiration(300.0),
            Some(Value::bin(h_owner.as_bytes())),
        )
        .await
        .unwrap();
    assert!(forger.dht.holds(&Value::str("forged")).await.unwrap());

    // a node that accepts anything and strips signatures sees the forgery over the wire (hivemind
    // without a validator cannot even deserialize a signed value)
    let gullible = node_with(
        vec![forger.addr.clone()],
        test_config(),
        CompositeValidator::new([Box::new(Gullible) as Box<dyn RecordValidator>]),
    )
    .await;
    assert_eq!(
        dictionary_of(gullible.dht.get(Value::str("forged"), true).await.unwrap()),
        vec![(
            Value::bin(h_owner.as_bytes()),
            Value::str("not really from hivemind")
        )]
    );
    let validated = oneshot(args(&[
        "dht-get-many",
        "--rsa-validator",
        "--initial-peers",
        &forger.addr.to_string(),
        "--keys",
        "apiary-owned",
        "forged",
    ]))
    .await;
    let got = &validated["found"]["apiary-owned"];
    assert_eq!(got["kind"], "dictionary", "{validated}");
    assert_eq!(
        got["value"],
        json!({String::from_utf8(a_owner.clone()).unwrap(): "signed by apiary"})
    );
    assert_eq!(validated["found"]["forged"]["found"], false, "{validated}");
    // nor does the Apiary node that validates
    assert_eq!(a.dht.get(Value::str("forged"), true).await.unwrap(), None);

    eprintln!("rsa owner sub-keys: done in {:.1?}", t0.elapsed());
    gullible.stop().await;
    forger.stop().await;
    a.stop().await;
    drop(h);
}
