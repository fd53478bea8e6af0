//! `MoEBeamSearcher` over real Apiary DHT nodes on loopback: expert grids declared as hivemind's
//! `declare_experts` writes them, searches checked against brute force and against hivemind's beam, batch
//! searches against per-sample ones, withdrawn and expired experts, negative caching and its TTL, malformed
//! values, and experts declared by a real hivemind 1.1.12 server.

#![allow(clippy::unwrap_used)]

mod beam_common;

use std::collections::HashSet;
use std::time::Duration;

use apiary_dht::{Found, PeerId, StoreEntry, get_dht_time};
use apiary_expert::server::Declarer;
use apiary_moe::beam::{BeamError, BeamSearchConfig, ExpertInfo, MoEBeamSearcher};
use apiary_testkit::HivemindPeer;
use apiary_wire::msgpack::Value;
use beam_common::{
    Node, Rng, brute_force, declare, eventually, grid_uids, hivemind_2d, node, score_of, stop_all, swarm,
    uids,
};

/// Declares `all` split between two servers (even positions on `a`, odd on `b`), until `now + ttl`.
async fn declare_split(a: &Node, b: &Node, all: &[String], ttl: f64) -> Vec<ExpertInfo> {
    let (mut on_a, mut on_b) = (Vec::new(), Vec::new());
    let mut declared = Vec::new();
    for (i, uid) in all.iter().enumerate() {
        let server = if i % 2 == 0 { a } else { b };
        if i % 2 == 0 {
            on_a.push(uid.clone());
        } else {
            on_b.push(uid.clone());
        }
        declared.push(ExpertInfo {
            uid: uid.clone(),
            peer_id: server.peer_id(),
        });
    }
    declare(a, &on_a, ttl).await;
    declare(b, &on_b, ttl).await;
    declared
}

fn searcher(node: &Node, prefix: &str, grid: Vec<usize>) -> MoEBeamSearcher {
    MoEBeamSearcher::new(node.dht.clone(), prefix, grid, BeamSearchConfig::default()).unwrap()
}

/// The experts are declared ones, unique, best first.
fn check_sound(prefix: &str, found: &[ExpertInfo], declared: &[ExpertInfo], scores: &[Vec<f32>]) {
    let distinct: HashSet<&str> = found.iter().map(|e| e.uid.as_str()).collect();
    assert_eq!(distinct.len(), found.len(), "duplicates in {:?}", uids(found));
    for e in found {
        assert!(declared.contains(e), "{e:?} was not declared");
    }
    let s: Vec<f64> = found.iter().map(|e| score_of(prefix, &e.uid, scores)).collect();
    assert!(s.windows(2).all(|w| w[0] >= w[1]), "not sorted by score: {s:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn matches_brute_force_on_a_2d_grid() {
    let nodes = swarm(4).await;
    let holes = ["ffn.1.2", "ffn.3.0", "ffn.3.3"];
    let all: Vec<String> = grid_uids("ffn.", &[4, 4])
        .into_iter()
        .filter(|u| !holes.contains(&u.as_str()) && !u.starts_with("ffn.2."))
        .collect();
    let declared = declare_split(&nodes[0], &nodes[1], &all, 120.0).await;
    let search = searcher(&nodes[3], "ffn", vec![4, 4]);
    assert_eq!(search.uid_prefix(), "ffn.");

    let mut rng = Rng::new(1);
    for round in 0..15 {
        let scores = rng.grid_scores(&[4, 4]);
        for beam in [1, 2, 3, 4, 16] {
            let found = search.find_best_experts(&scores, beam).await.unwrap();
            check_sound("ffn.", &found, &declared, &scores);
            assert_eq!(
                found,
                hivemind_2d("ffn.", &declared, &scores, beam),
                "round {round}, beam {beam}"
            );
            if beam >= 4 {
                // wide enough for every active first coordinate: exact
                assert_eq!(
                    found,
                    brute_force("ffn.", &declared, &scores, beam),
                    "round {round}"
                );
            }
        }
    }

    // the initial beam: active first coordinates, best first, with their successors
    let scores = rng.grid_scores(&[4, 4]);
    let beam = search.get_initial_beam(&scores[0], 4).await.unwrap();
    let mut rows = [0usize, 1, 3];
    rows.sort_by(|&a, &b| scores[0][b].total_cmp(&scores[0][a]));
    let prefixes: Vec<String> = rows.iter().map(|r| format!("ffn.{r}.")).collect();
    assert_eq!(
        beam.iter().map(|e| e.prefix.clone()).collect::<Vec<_>>(),
        prefixes
    );
    for entry in &beam {
        let row: usize = entry.prefix[4..5].parse().unwrap();
        assert_eq!(entry.score, f64::from(scores[0][row]));
        let expected: Vec<i64> = (0..4i64)
            .filter(|c| all.contains(&format!("ffn.{row}.{c}")))
            .collect();
        assert_eq!(entry.successors.keys().copied().collect::<Vec<_>>(), expected);
        for (c, info) in &entry.successors {
            assert_eq!(info.uid, format!("ffn.{row}.{c}"));
            assert!(declared.contains(info));
        }
    }
    assert_eq!(
        search.get_initial_beam(&scores[0], 2).await.unwrap(),
        beam[..2].to_vec()
    );

    // active successors of a few prefixes; the empty row is negatively cached by now
    let got = search
        .get_active_successors(&["ffn.0.".into(), "ffn.2.".into(), "ffn.1.".into()], Some(2))
        .await
        .unwrap();
    assert_eq!(got["ffn.0."].len(), 2, "only coordinates 0..2");
    assert_eq!(got["ffn.1."].len(), 2);
    assert!(got["ffn.2."].is_empty());
    assert_eq!(got["ffn.0."][&1].peer_id, nodes[1].peer_id());
    assert!(search.negative_cache_ttl("ffn.2.").is_some());
    assert!(search.negative_cache_ttl("ffn.0.").is_none());
    stop_all(&nodes).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn matches_brute_force_on_a_3d_grid() {
    let nodes = swarm(4).await;
    let holes = ["ffn.1.1.1", "ffn.2.0.2", "ffn.0.2.0", "ffn.2.2.2"];
    let all: Vec<String> = grid_uids("ffn.", &[3, 3, 3])
        .into_iter()
        .filter(|u| !holes.contains(&u.as_str()) && !u.starts_with("ffn.0.0."))
        .collect();
    let declared = declare_split(&nodes[0], &nodes[1], &all, 120.0).await;
    let search = searcher(&nodes[2], "ffn.", vec![3, 3, 3]);
    let mut rng = Rng::new(7);
    for round in 0..10 {
        let scores = rng.grid_scores(&[3, 3, 3]);
        for beam in [1, 2, 3, 5, 9] {
            let found = search.find_best_experts(&scores, beam).await.unwrap();
            check_sound("ffn.", &found, &declared, &scores);
            assert_eq!(
                found.len(),
                beam.min(declared.len()),
                "round {round}, beam {beam}"
            );
            if beam >= 9 {
                // every active (i, j) prefix fits in the beam: exact
                assert_eq!(
                    found,
                    brute_force("ffn.", &declared, &scores, beam),
                    "round {round}"
                );
            }
        }
    }
    assert_eq!(search.negative_cache_len(), 0, "no prefix on the way is empty");
    stop_all(&nodes).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_agrees_with_per_sample_searches() {
    let nodes = swarm(4).await;
    let flat: Vec<String> = grid_uids("ffn.", &[4, 4])
        .into_iter()
        .filter(|u| !["ffn.0.1", "ffn.2.2", "ffn.2.3"].contains(&u.as_str()) && !u.starts_with("ffn.1."))
        .collect();
    let deep: Vec<String> = grid_uids("deep.", &[3, 2, 3])
        .into_iter()
        .filter(|u| !["deep.0.1.1", "deep.2.0.0"].contains(&u.as_str()))
        .collect();
    declare_split(&nodes[0], &nodes[1], &flat, 120.0).await;
    declare_split(&nodes[1], &nodes[2], &deep, 120.0).await;
    let mut rng = Rng::new(42);
    for (prefix, grid) in [("ffn.", vec![4, 4]), ("deep.", vec![3, 2, 3])] {
        let search = searcher(&nodes[3], prefix, grid.clone());
        let batch: Vec<Vec<Vec<f32>>> = (0..6).map(|_| rng.grid_scores(&grid)).collect();
        for beam in [1, 2, 4] {
            let together = search.batch_find_best_experts(&batch, beam).await.unwrap();
            assert_eq!(together.len(), batch.len());
            for (scores, found) in batch.iter().zip(&together) {
                let alone = search.find_best_experts(scores, beam).await.unwrap();
                assert_eq!(&alone, found, "{prefix} beam {beam}");
                assert_eq!(found.len(), beam);
            }
        }
        assert!(search.batch_find_best_experts(&[], 3).await.unwrap().is_empty());
    }
    stop_all(&nodes).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn withdrawn_and_expired_experts_disappear() {
    let nodes = swarm(3).await;
    let long: Vec<String> = grid_uids("ffn.", &[2, 4])
        .into_iter()
        .filter(|u| u != "ffn.0.0" && u != "ffn.1.3")
        .collect();
    declare(&nodes[0], &long, 120.0).await;
    // ffn.0.0 lives 4 s; ffn.1.3 is declared by a Declarer on another node
    declare(&nodes[0], &["ffn.0.0".to_owned()], 4.0).await;
    let (declarer, stored) = Declarer::start(
        nodes[1].dht.clone(),
        vec!["ffn.1.3".to_owned()],
        Duration::from_secs(30),
        Duration::from_secs(60),
    )
    .await;
    assert_eq!(stored, 2);
    let search = searcher(&nodes[2], "ffn", vec![2, 4]);
    let scores = vec![vec![1.0, 0.9], vec![1.0, 0.05, 0.2, 0.8]];
    let find = || async { search.find_best_experts(&scores, 8).await.unwrap() };

    let found = find().await;
    assert_eq!(
        uids(&found),
        [
            "ffn.0.0", "ffn.1.0", "ffn.0.3", "ffn.1.3", "ffn.0.2", "ffn.1.2", "ffn.0.1", "ffn.1.1"
        ]
    );
    assert_eq!(found[0].peer_id, nodes[0].peer_id());
    assert_eq!(found[3].peer_id, nodes[1].peer_id());

    let has = |found: &[ExpertInfo], uid: &str| found.iter().any(|e| e.uid == uid);
    declarer.pause().await;
    assert!(
        eventually(Duration::from_secs(5), || async {
            !has(&find().await, "ffn.1.3")
        })
        .await
    );
    assert_eq!(find().await.len(), 7);
    declarer.resume().await;
    assert!(eventually(Duration::from_secs(5), || async { has(&find().await, "ffn.1.3") }).await);
    declarer.withdraw().await;
    assert!(
        eventually(Duration::from_secs(5), || async {
            !has(&find().await, "ffn.1.3")
        })
        .await
    );

    // the short-lived declaration expires
    assert!(
        eventually(Duration::from_secs(10), || async {
            !has(&find().await, "ffn.0.0")
        })
        .await
    );
    let found = find().await;
    assert_eq!(found.len(), 6);
    let remaining: Vec<ExpertInfo> = long
        .iter()
        .map(|u| ExpertInfo {
            uid: u.clone(),
            peer_id: nodes[0].peer_id(),
        })
        .collect();
    assert_eq!(found, brute_force("ffn.", &remaining, &scores, 8));
    assert_eq!(search.negative_cache_len(), 0, "both rows still hold experts");
    stop_all(&nodes).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn negative_caching_marks_an_empty_prefix_until_its_ttl() {
    let nodes = swarm(3).await;
    let all: Vec<String> = grid_uids("ffn.", &[4, 4])
        .into_iter()
        .filter(|u| !u.starts_with("ffn.2."))
        .collect();
    declare(&nodes[0], &all, 120.0).await;
    let ttl = Duration::from_secs(3);
    let mut config = BeamSearchConfig::default();
    config.cache_expiration = ttl;
    let search = MoEBeamSearcher::new(nodes[2].dht.clone(), "ffn.", vec![4, 4], config.clone()).unwrap();
    let mut off = config;
    off.negative_caching = false;
    let uncached = MoEBeamSearcher::new(nodes[1].dht.clone(), "ffn.", vec![4, 4], off).unwrap();
    // row 2 is the best first coordinate, but it is empty
    let scores = vec![vec![0.1, 0.2, 1.0, 0.3], vec![0.0, 0.5, 0.0, 0.0]];

    let started = tokio::time::Instant::now();
    let stored_at = get_dht_time();
    let found = search.find_best_experts(&scores, 1).await.unwrap();
    assert_eq!(uids(&found), ["ffn.3.1"]);
    let left = search
        .negative_cache_ttl("ffn.2.")
        .expect("the empty prefix is remembered");
    assert!(left <= ttl && left + started.elapsed() >= ttl, "{left:?}");
    assert_eq!(search.negative_cache_len(), 1);
    assert_eq!(
        uids(&uncached.find_best_experts(&scores, 1).await.unwrap()),
        ["ffn.3.1"]
    );
    assert_eq!(uncached.negative_cache_len(), 0);

    // the negative record, as hivemind writes it: "ffn.2."[-1] = None until now + cache_expiration
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let record = loop {
        if let Ok(Some(Found::Dictionary { entries, .. })) =
            nodes[1].dht.get(Value::str("ffn.2."), true).await
            && let Some(entry) = entries.into_iter().find(|(k, _, _)| *k == Value::from(-1))
        {
            break Some(entry);
        }
        if tokio::time::Instant::now() > deadline {
            break None;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let (_, value, expiration) = record.unwrap();
    assert_eq!(value, Value::Nil);
    let after = expiration - stored_at;
    assert!(
        after >= 2.9 && after <= 3.0 + started.elapsed().as_secs_f64() + 0.1,
        "{after}"
    );

    // a new expert in the cached-empty row: invisible here until the TTL ends, visible elsewhere at once
    declare(&nodes[0], &["ffn.2.1".to_owned()], 120.0).await;
    assert_eq!(
        uids(&search.find_best_experts(&scores, 1).await.unwrap()),
        ["ffn.3.1"]
    );
    assert!(
        search.negative_cache_ttl("ffn.2.").unwrap() <= left,
        "not extended"
    );
    assert_eq!(
        uids(&uncached.find_best_experts(&scores, 1).await.unwrap()),
        ["ffn.2.1"]
    );
    let left = search.negative_cache_ttl("ffn.2.").unwrap_or_default();
    tokio::time::sleep(left + Duration::from_millis(100)).await;
    assert!(search.negative_cache_ttl("ffn.2.").is_none());
    assert_eq!(
        uids(&search.find_best_experts(&scores, 1).await.unwrap()),
        ["ffn.2.1"]
    );
    assert_eq!(search.negative_cache_len(), 0, "the row is active again");

    // deeper prefixes found empty are cached too (hivemind's get_active_successors)
    let got = search
        .get_active_successors(&["ffn.3.3.".into(), "ffn.3.".into()], None)
        .await
        .unwrap();
    assert!(got["ffn.3.3."].is_empty());
    assert_eq!(got["ffn.3."].len(), 4);
    assert!(search.negative_cache_ttl("ffn.3.3.").is_some());
    search.clear_negative_cache();
    assert_eq!(search.negative_cache_len(), 0);
    stop_all(&nodes).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_prefix_values_are_skipped() {
    let nodes = swarm(2).await;
    declare(&nodes[0], &["ffn.0.0".to_owned(), "ffn.1.1".to_owned()], 120.0).await;
    let peer = Value::str(nodes[0].peer_id().to_base58());
    let exp = get_dht_time() + 120.0;
    let junk = |key: &str, subkey: Option<Value>, value: Value| StoreEntry {
        key: Value::str(key),
        subkey,
        value,
        expiration: exp,
    };
    let entries = vec![
        junk("ffn.0.", Some(Value::from(2)), Value::str("junk")),
        junk(
            "ffn.0.",
            Some(Value::from(3)),
            Value::tuple([Value::str("ffn.0.3"), Value::str("not a peer")]),
        ),
        junk(
            "ffn.0.",
            Some(Value::str("4")),
            Value::tuple([Value::str("ffn.0.4"), peer.clone()]),
        ),
        junk(
            "ffn.0.",
            Some(Value::from(5)),
            Value::tuple([Value::str("other.9.9"), peer.clone()]),
        ),
        junk(
            "ffn.0.",
            Some(Value::from(6)),
            Value::list([Value::str("ffn.0.6"), peer.clone()]),
        ),
        junk(
            "ffn.0.",
            Some(Value::from(7)),
            Value::tuple([Value::str("ffn.0.7"), peer.clone(), peer.clone()]),
        ),
        junk(
            "ffn.2.",
            None,
            Value::tuple([Value::str("ffn.2.0"), peer.clone()]),
        ),
        junk(
            "ffn.3.",
            Some(Value::from(-1)),
            Value::tuple([Value::str("ffn.3"), peer.clone()]),
        ),
        junk(
            "ffn.1.",
            Some(Value::from(0)),
            Value::tuple([Value::str("ffn.1.0.0"), peer.clone()]),
        ),
    ];
    assert!(
        nodes[0]
            .dht
            .store_many(entries, false)
            .await
            .unwrap()
            .iter()
            .all(|ok| *ok)
    );
    let search = searcher(&nodes[1], "ffn.", vec![4, 8]);
    let mut rng = Rng::new(3);
    for _ in 0..5 {
        let scores = rng.grid_scores(&[4, 8]);
        let found = search.find_best_experts(&scores, 16).await.unwrap();
        let mut got = uids(&found);
        got.sort_unstable();
        assert_eq!(got, ["ffn.0.0", "ffn.1.1"]);
        assert!(found.iter().all(|e| e.peer_id == nodes[0].peer_id()));
    }
    stop_all(&nodes).await;
}

/// One-dimensional uids `flat.{i}` are declared as `"flat.{i}."[-1]` (hivemind's `FLAT_EXPERT`) and found
/// through the initial beam alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_dimensional_grid_uses_flat_expert_entries() {
    let nodes = swarm(2).await;
    let all: Vec<String> = ["flat.0", "flat.2", "flat.3", "flat.5"]
        .map(String::from)
        .to_vec();
    declare(&nodes[0], &all, 120.0).await;
    let declared: Vec<ExpertInfo> = all
        .iter()
        .map(|uid| ExpertInfo {
            uid: uid.clone(),
            peer_id: nodes[0].peer_id(),
        })
        .collect();
    let search = searcher(&nodes[1], "flat", vec![6]);
    let mut rng = Rng::new(5);
    for _ in 0..5 {
        let scores = rng.grid_scores(&[6]);
        for beam in [1, 2, 4, 6] {
            let found = search.find_best_experts(&scores, beam).await.unwrap();
            assert_eq!(
                found,
                brute_force("flat.", &declared, &scores, beam),
                "beam {beam}"
            );
        }
    }
    stop_all(&nodes).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejects_bad_arguments() {
    let n = node(vec![]).await;
    let new = |prefix: &str, grid: Vec<usize>| {
        MoEBeamSearcher::new(n.dht.clone(), prefix, grid, BeamSearchConfig::default())
    };
    for bad in ["", ".", "ffn.01", "a.b", "ffn..", "ffn.x."] {
        assert!(
            matches!(new(bad, vec![4]), Err(BeamError::InvalidPrefix(_))),
            "{bad:?}"
        );
    }
    assert_eq!(new("ffn.3", vec![4]).unwrap().uid_prefix(), "ffn.3.");
    assert!(matches!(new("ffn", vec![]), Err(BeamError::InvalidGrid(_))));
    assert!(matches!(new("ffn", vec![4, 0]), Err(BeamError::InvalidGrid(_))));

    let search = new("ffn", vec![2, 3]).unwrap();
    let good = vec![vec![0.0, 1.0], vec![0.0, 1.0, 2.0]];
    assert!(matches!(
        search.find_best_experts(&good, 0).await,
        Err(BeamError::ZeroBeamSize)
    ));
    assert!(matches!(
        search.find_best_experts(&good[..1], 2).await,
        Err(BeamError::DimensionMismatch { expected: 2, got: 1 })
    ));
    assert!(matches!(
        search.find_best_experts(&[vec![0.0, 1.0], vec![0.0]], 2).await,
        Err(BeamError::ScoreLength {
            dim: 1,
            expected: 3,
            got: 1
        })
    ));
    assert!(matches!(
        search
            .batch_find_best_experts(&[good.clone(), vec![vec![0.0, f32::NAN], vec![0.0; 3]]], 2)
            .await,
        Err(BeamError::NanScore { dim: 0, index: 1 })
    ));
    assert!(matches!(
        search.get_active_successors(&["ffn".into()], None).await,
        Err(BeamError::InvalidPrefix(_))
    ));
    assert!(matches!(
        search.get_initial_beam(&[1.0], 0).await,
        Err(BeamError::ZeroBeamSize)
    ));
    // nothing declared anywhere: nothing found, and both rows are remembered as empty
    assert!(search.find_best_experts(&good, 4).await.unwrap().is_empty());
    assert_eq!(search.negative_cache_len(), 2);
    n.stop().await;
}

/// A real hivemind 1.1.12 `Server` declares a random part of `ffn.[0:2].[0:4]` in its DHT; an Apiary node
/// joins that DHT and its beam search finds exactly those experts, served by the hivemind peer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finds_experts_declared_by_hivemind() {
    let hivemind = tokio::task::spawn_blocking(|| {
        HivemindPeer::spawn(
            "server",
            &[
                "--expert-pattern",
                "ffn.[0:2].[0:4]",
                "--num-experts",
                "6",
                "--hidden-dim",
                "4",
            ],
            Duration::from_secs(180),
        )
    })
    .await
    .unwrap();
    let hivemind_peer: PeerId = hivemind.peer_id().parse().unwrap();
    let experts: Vec<String> = hivemind.ready["experts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e.as_str().unwrap().to_owned())
        .collect();
    assert!(!experts.is_empty());
    let declared: Vec<ExpertInfo> = experts
        .iter()
        .map(|uid| ExpertInfo {
            uid: uid.clone(),
            peer_id: hivemind_peer,
        })
        .collect();
    let apiary = node(vec![hivemind.maddr().parse().unwrap()]).await;

    // wait for the server's first declaration (without negative caching, so an early miss is not kept)
    let mut config = BeamSearchConfig::default();
    config.negative_caching = false;
    let probe = MoEBeamSearcher::new(apiary.dht.clone(), "ffn", vec![2, 4], config).unwrap();
    let everything = vec![vec![0.0; 2], vec![0.0; 4]];
    assert!(
        eventually(Duration::from_secs(60), || async {
            probe.find_best_experts(&everything, 8).await.unwrap().len() == declared.len()
        })
        .await,
        "hivemind's experts {experts:?} never showed up"
    );

    let search = searcher(&apiary, "ffn.", vec![2, 4]);
    let mut rng = Rng::new(11);
    for _ in 0..10 {
        let scores = rng.grid_scores(&[2, 4]);
        for beam in [1, 2, 3, 8] {
            let found = search.find_best_experts(&scores, beam).await.unwrap();
            assert_eq!(
                found,
                hivemind_2d("ffn.", &declared, &scores, beam),
                "beam {beam}"
            );
            if beam >= 2 {
                assert_eq!(found, brute_force("ffn.", &declared, &scores, beam));
            }
            assert!(found.iter().all(|e| e.peer_id == hivemind_peer));
        }
    }
    let batch: Vec<Vec<Vec<f32>>> = (0..4).map(|_| rng.grid_scores(&[2, 4])).collect();
    let together = search.batch_find_best_experts(&batch, 3).await.unwrap();
    for (scores, found) in batch.iter().zip(&together) {
        assert_eq!(found, &brute_force("ffn.", &declared, scores, 3));
    }
    apiary.stop().await;
    drop(hivemind);
}
