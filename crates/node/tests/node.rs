//! The node over a real swarm on 127.0.0.1: a bootstrap node, a publisher (which also trains) and an
//! Apiary node spawned through `Node::spawn`, with a switchable activity probe standing in for the
//! user. Measures how fast the node yields when the user comes back.

#![allow(clippy::unwrap_used, clippy::print_stdout)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use apiary_catalog::bundled::{LOCAL_DEMO_ID, layer_prefix, local_demo};
use apiary_catalog::swarm::{Publication, rosters, validator};
use apiary_catalog::{Manifest, SignedManifest, Source, Status, fingerprint};
use apiary_dht::DhtHandle;
use apiary_governor::{Mode, PolicyConfig};
use apiary_ledger::Filter;
use apiary_moe::beam::{BeamSearchConfig, MoEBeamSearcher};
use apiary_moe::moe::{MoeConfig, RemoteMixtureOfExperts};
use apiary_moe::transport::{ExpertAddr, ExpertTransport};
use apiary_node::{JoinOptions, Node, NodeConfig, NodeError, NodeEvent, NodeHandle, RunState};
use apiary_p2p::PeerId;
use apiary_wire::signature::RsaPrivateKey;
use candle_core::{Device, Tensor, Var};
use tokio::sync::broadcast;

mod common;
use common::{Peer, User, probes, unix_now, wait_for};

const HIDDEN: usize = 16;
/// One MoE layer of a 2×2 grid: the manifest's grid is `[1, 2, 2]`, four experts.
const GRID: [usize; 2] = [2, 2];
const PATIENCE: Duration = Duration::from_secs(20);

/// A bootstrap node and a publisher publishing the local demo (one layer of a 2×2 grid).
struct Swarm {
    boot: Peer,
    publisher: Peer,
    publication: Publication,
    manifest: Manifest,
    fingerprint: String,
    key: RsaPrivateKey,
}

impl Swarm {
    async fn start() -> Swarm {
        let boot = Peer::spawn(&[], validator(None).unwrap()).await;
        let key = RsaPrivateKey::generate().unwrap();
        let publisher = Peer::spawn(
            std::slice::from_ref(&boot.addr),
            validator(Some(key.clone())).unwrap(),
        )
        .await;
        let manifest = local_demo(&key.public_key(), unix_now(), 1, &GRID, HIDDEN).unwrap();
        let signed = SignedManifest::sign(manifest.clone(), &key).unwrap();
        let publication = Publication::start(
            publisher.dht.clone(),
            &signed,
            unix_now(),
            Duration::from_secs(1),
            Duration::from_secs(5),
        )
        .await
        .unwrap();
        Swarm {
            boot,
            publisher,
            publication,
            manifest,
            fingerprint: fingerprint(&key.public_key()),
            key,
        }
    }

    fn config(&self, data_dir: &std::path::Path) -> NodeConfig {
        NodeConfig {
            data_dir: data_dir.to_owned(),
            listen_maddrs: vec!["/ip4/127.0.0.1/tcp/0".into()],
            initial_peers: vec![self.boot.addr.to_string()],
            update_period: Duration::from_secs(2),
            start_paused: false,
            policy: PolicyConfig {
                mode: Mode::OnlyWhenAway,
                // the tests measure yielding and resuming; the notice before an away start has its
                // own test (api.rs)
                away_start_delay_s: 0.0,
                ..PolicyConfig::default()
            },
            ..NodeConfig::default()
        }
    }

    async fn stop(self) {
        self.publication.withdraw().await;
        self.publisher.stop().await;
        self.boot.stop().await;
    }
}

async fn wait_state(node: &NodeHandle, want: RunState, timeout: Duration) -> Duration {
    let start = Instant::now();
    let mut status = node.status();
    wait_for(&format!("the node to be {want:?}"), timeout, async || {
        let s = status.borrow_and_update().clone();
        if s.state == want {
            Ok(())
        } else {
            Err(format!("{:?}: {}", s.state, s.reason))
        }
    })
    .await;
    start.elapsed()
}

/// The experts a beam search from `dht` finds (no negative caching: misses are not remembered).
async fn declared(dht: &DhtHandle, manifest: &Manifest) -> Result<Vec<(String, PeerId)>, String> {
    let mut config = BeamSearchConfig::default();
    config.negative_caching = false;
    let search = MoEBeamSearcher::new(dht.clone(), &layer_prefix(manifest, 0), GRID.to_vec(), config)
        .map_err(|e| e.to_string())?;
    let scores: Vec<Vec<f32>> = GRID.iter().map(|&n| vec![0.0; n]).collect();
    let found = search
        .find_best_experts(&scores, 4)
        .await
        .map_err(|e| e.to_string())?;
    Ok(found.into_iter().map(|e| (e.uid, e.peer_id)).collect())
}

/// Whether the roster read from `dht` lists `peer`.
async fn in_roster(dht: &DhtHandle, manifest: &Manifest, peer: &str) -> Result<bool, String> {
    let r = rosters(dht, manifest).await.map_err(|e| e.to_string())?;
    Ok(r.iter().any(|(p, _)| p == peer))
}

async fn forward(
    transport: &Arc<dyn ExpertTransport>,
    uid: &str,
    peer: PeerId,
    rows: usize,
) -> Result<(), String> {
    let x = Tensor::randn(0f32, 1.0, (rows, HIDDEN), &Device::Cpu).unwrap();
    transport
        .forward(&ExpertAddr::new(uid, peer), vec![x])
        .await
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// `steps` forward + backward passes of a MoE layer over the whole grid, routed through `trainer`'s DHT.
async fn train(trainer: &Peer, manifest: &Manifest, steps: usize) -> Result<(), String> {
    let mut beam = BeamSearchConfig::default();
    beam.negative_caching = false;
    let prefix = layer_prefix(manifest, 0);
    let searcher = MoEBeamSearcher::new(trainer.dht.clone(), &prefix, GRID.to_vec(), beam).unwrap();
    let mut config = MoeConfig::new(HIDDEN, &prefix, GRID.to_vec());
    config.k_best = 4;
    config.forward_timeout = Some(Duration::from_secs(10));
    config.backward_timeout = Some(Duration::from_secs(10));
    let moe = RemoteMixtureOfExperts::new(
        config,
        Arc::new(searcher),
        trainer.transport(),
        tokio::runtime::Handle::current(),
        7,
    )
    .unwrap();
    tokio::task::spawn_blocking(move || {
        for step in 0..steps {
            let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (8, HIDDEN), &Device::Cpu).unwrap()).unwrap();
            let out = moe
                .forward(x.as_tensor())
                .map_err(|e| format!("step {step}: {e}"))?;
            out.sum_all()
                .unwrap()
                .backward()
                .map_err(|e| format!("step {step}: {e}"))?;
            let stats = moe.stats();
            let fwd = stats.last_forward.ok_or("no forward stats")?;
            if !fwd.failed.is_empty() {
                return Err(format!("step {step}: {fwd:?}"));
            }
        }
        Ok(())
    })
    .await
    .unwrap()
}

fn drain_events(rx: &mut broadcast::Receiver<NodeEvent>, seen: &mut Vec<NodeEvent>) {
    while let Ok(e) = rx.try_recv() {
        seen.push(e);
    }
}

/// Join, serve a trainer, yield to the user within the governor's bounds, come back, leave.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn join_serve_pause_resume_leave() {
    let started = Instant::now();
    let swarm = Swarm::start().await;
    let dir = tempfile::tempdir().unwrap();
    let user = User(Arc::new(AtomicBool::new(false)));
    let node = Node::spawn(swarm.config(dir.path()), probes(&user))
        .await
        .unwrap();
    let mut events = node.events();
    let mut seen = Vec::new();
    let peer_id = node.p2p().local_peer_id();
    let peer = peer_id.to_base58();
    assert_eq!(node.status().borrow().peer_id, peer);
    wait_state(&node, RunState::Running, PATIENCE).await;

    // the catalog lists the published demo from the DHT
    let cards = wait_for("the demo in the node's catalog", PATIENCE, async || {
        let cards = node.experiments().await.map_err(|e| e.to_string())?;
        match cards.iter().find(|c| c.id == LOCAL_DEMO_ID) {
            Some(c) if c.source == Source::Dht => Ok(cards),
            _ => Err(format!(
                "{:?}",
                cards.iter().map(|c| (&c.id, c.source)).collect::<Vec<_>>()
            )),
        }
    })
    .await;
    let card = cards.iter().find(|c| c.id == LOCAL_DEMO_ID).unwrap();
    assert_eq!(card.fingerprint.as_deref(), Some(swarm.fingerprint.as_str()));
    let preview = node.show(LOCAL_DEMO_ID, None).await.unwrap();
    assert!(preview.plan.is_some(), "{:?}", preview.why_not);

    // join: all four experts
    let plan = node
        .join(
            LOCAL_DEMO_ID,
            JoinOptions {
                max_experts: Some(4),
                publisher: Some(swarm.fingerprint.clone()),
            },
        )
        .await
        .unwrap();
    assert_eq!(plan.uids.len(), 4, "{plan:?}");
    let status = node.status().borrow().clone();
    assert_eq!(status.experiments.len(), 1);
    assert_eq!(status.experiments[0].uids.len(), 4);
    assert!(
        std::fs::read_to_string(dir.path().join("joined.json"))
            .unwrap()
            .contains(LOCAL_DEMO_ID)
    );

    // a trainer routes to the node's experts and trains through them
    let trainer = &swarm.publisher;
    wait_for("the node's four experts in the DHT", PATIENCE, async || {
        let found = declared(&trainer.dht, &swarm.manifest).await?;
        if found.len() == 4 && found.iter().all(|(_, p)| *p == peer_id) {
            Ok(())
        } else {
            Err(format!("{found:?}"))
        }
    })
    .await;
    train(trainer, &swarm.manifest, 3).await.unwrap();
    let mut status_rx = node.status();
    wait_for("served samples in the status", PATIENCE, async || {
        let s = status_rx.borrow_and_update().clone();
        let e = s.experiments.first().ok_or("no experiment")?;
        if e.forward_samples > 0 && e.backward_samples > 0 && e.optimizer_steps > 0 {
            Ok(())
        } else {
            Err(format!("{e:?}"))
        }
    })
    .await;
    let totals = wait_for("the ledger to hold the work", PATIENCE, async || {
        node.flush_ledger().await.map_err(|e| e.to_string())?;
        let t = node
            .contributions(Filter::experiment(LOCAL_DEMO_ID))
            .await
            .map_err(|e| e.to_string())?;
        if t.counters.forward_samples > 0 && t.counters.backward_samples > 0 && t.counters.optimizer_steps > 0
        {
            Ok(t)
        } else {
            Err(format!("{t:?}"))
        }
    })
    .await;
    assert!(totals.counters.cpu_seconds > 0.0, "{totals:?}");
    assert!(totals.counters.flops > 0.0, "{totals:?}");

    // load: a client keeps forward calls in flight on every expert until told to stop
    let stop_load = Arc::new(AtomicBool::new(false));
    let load_ok = Arc::new(AtomicU64::new(0));
    let mut load = Vec::new();
    for uid in plan.uids.clone() {
        let (transport, stop, ok) = (trainer.transport(), stop_load.clone(), load_ok.clone());
        load.push(tokio::spawn(async move {
            while !stop.load(Ordering::SeqCst) {
                if forward(&transport, &uid, peer_id, 16).await.is_ok() {
                    ok.fetch_add(1, Ordering::SeqCst);
                } else {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }));
    }
    wait_for("load to be served", PATIENCE, async || {
        let n = load_ok.load(Ordering::SeqCst);
        if n >= 8 { Ok(()) } else { Err(format!("{n} calls")) }
    })
    .await;

    // the user comes back: the node yields
    let probe = trainer.transport();
    let uid0 = plan.uids[0].clone();
    forward(&probe, &uid0, peer_id, 4).await.unwrap();
    let t0 = Instant::now();
    user.0.store(true, Ordering::SeqCst);
    let paused = wait_state(&node, RunState::Paused, Duration::from_secs(5)).await;
    let refused = {
        wait_for(
            "a forward call to be refused",
            Duration::from_secs(5),
            async || match forward(&probe, &uid0, peer_id, 4).await {
                Err(e) => Ok(e),
                Ok(()) => Err("served".into()),
            },
        )
        .await
    };
    let refused_at = t0.elapsed();
    let mut status_rx = node.status();
    wait_for("in-flight work drained", Duration::from_secs(5), async || {
        let s = status_rx.borrow_and_update().clone();
        let e = s.experiments.first().ok_or("no experiment")?;
        if e.queued_rows == 0 && !e.accepting {
            Ok(())
        } else {
            Err(format!("{e:?}"))
        }
    })
    .await;
    let drained_at = t0.elapsed();
    wait_for(
        "the declarations and roster entry withdrawn",
        Duration::from_secs(5),
        async || {
            let found = declared(&swarm.boot.dht, &swarm.manifest).await?;
            let listed = in_roster(&swarm.boot.dht, &swarm.manifest, &peer).await?;
            if found.is_empty() && !listed {
                Ok(())
            } else {
                Err(format!("found {found:?}, in roster {listed}"))
            }
        },
    )
    .await;
    let withdrawn_at = t0.elapsed();
    let s = node.status().borrow().clone();
    assert!(s.reason.contains("using the PC"), "{}", s.reason);
    // the status says so once the engine's withdrawal calls return (the DHT may show it first)
    let mut status_rx = node.status();
    wait_for(
        "the status to show the withdrawal",
        Duration::from_secs(1),
        async || {
            let s = status_rx.borrow_and_update().clone();
            match s.experiments.first() {
                Some(e) if e.withdrawn => Ok(()),
                e => Err(format!("{e:?}")),
            }
        },
    )
    .await;
    eprintln!("yield latencies after the activity probe changed (loopback, CPU):");
    eprintln!(
        "  status Paused        {:>6.1} ms (bound 250 ms)",
        paused.as_secs_f64() * 1e3
    );
    eprintln!(
        "  new compute refused  {:>6.1} ms (bound 250 ms; the call's error: {refused})",
        refused_at.as_secs_f64() * 1e3
    );
    eprintln!(
        "  in-flight drained    {:>6.1} ms (bound 1000 ms)",
        drained_at.as_secs_f64() * 1e3
    );
    eprintln!(
        "  declarations gone    {:>6.1} ms (bound 1000 ms; read from another node)",
        withdrawn_at.as_secs_f64() * 1e3
    );
    eprintln!(
        "  device memory        N/A on the CPU (no device memory; the runtime holds no queued work, weights stay loaded for a quick resume)"
    );
    assert!(paused < Duration::from_millis(250), "paused after {paused:?}");
    assert!(
        refused_at < Duration::from_millis(250),
        "refused after {refused_at:?}"
    );
    assert!(
        drained_at < Duration::from_secs(1),
        "drained after {drained_at:?}"
    );
    assert!(
        withdrawn_at < Duration::from_secs(1),
        "withdrawn after {withdrawn_at:?}"
    );

    // the user leaves again: the node resumes, declares, serves
    user.0.store(false, Ordering::SeqCst);
    wait_state(&node, RunState::Running, Duration::from_secs(5)).await;
    wait_for("the declarations back", PATIENCE, async || {
        let found = declared(&swarm.boot.dht, &swarm.manifest).await?;
        let listed = in_roster(&swarm.boot.dht, &swarm.manifest, &peer).await?;
        if found.len() == 4 && listed {
            Ok(())
        } else {
            Err(format!("found {found:?}, in roster {listed}"))
        }
    })
    .await;
    forward(&probe, &uid0, peer_id, 4).await.unwrap();
    stop_load.store(true, Ordering::SeqCst);
    for l in load {
        l.await.unwrap();
    }
    train(trainer, &swarm.manifest, 1).await.unwrap();
    drain_events(&mut events, &mut seen);
    assert!(
        seen.iter()
            .any(|e| matches!(e, NodeEvent::Joined { id, uids } if id == LOCAL_DEMO_ID && uids.len() == 4)),
        "{seen:?}"
    );
    assert!(
        seen.iter().any(|e| matches!(e, NodeEvent::Paused { .. })),
        "{seen:?}"
    );
    assert!(
        seen.iter().any(|e| matches!(e, NodeEvent::Resumed { .. })),
        "{seen:?}"
    );

    // leave: withdrawn, the ledger keeps the work
    node.leave(LOCAL_DEMO_ID).await.unwrap();
    assert!(node.status().borrow().experiments.is_empty());
    wait_for(
        "the left experiment's records withdrawn",
        Duration::from_secs(5),
        async || {
            let found = declared(&swarm.boot.dht, &swarm.manifest).await?;
            let listed = in_roster(&swarm.boot.dht, &swarm.manifest, &peer).await?;
            if found.is_empty() && !listed {
                Ok(())
            } else {
                Err(format!("found {found:?}, in roster {listed}"))
            }
        },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    drain_events(&mut events, &mut seen);
    assert!(
        seen.iter()
            .any(|e| matches!(e, NodeEvent::Left { id, .. } if id == LOCAL_DEMO_ID)),
        "{seen:?}"
    );
    node.flush_ledger().await.unwrap();
    let after = node
        .contributions(Filter::experiment(LOCAL_DEMO_ID))
        .await
        .unwrap();
    assert!(
        after.counters.samples() >= totals.counters.samples(),
        "{after:?} vs {totals:?}"
    );
    assert!(after.uptime_seconds > 0.0, "{after:?}");
    assert_eq!(
        std::fs::read_to_string(dir.path().join("joined.json"))
            .unwrap()
            .trim(),
        "[]"
    );

    node.shutdown().await.unwrap();
    assert!(matches!(node.pause().await, Err(NodeError::Stopped)));
    swarm.stop().await;
    eprintln!("join_serve_pause_resume_leave: {:.1?}", started.elapsed());
}

/// A snooze survives a restart; settings round-trip through the TOML file; a malformed file is
/// reported with its path and line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snooze_survives_a_restart_and_config_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let user = User(Arc::new(AtomicBool::new(false)));
    let config = NodeConfig {
        data_dir: dir.path().join("data"),
        listen_maddrs: vec!["/ip4/127.0.0.1/tcp/0".into()],
        initial_peers: Vec::new(),
        start_paused: false,
        ..NodeConfig::default()
    };

    // the settings file: save, load, equal; missing = defaults; malformed = the file and the line
    let path = dir.path().join("config").join("node.toml");
    assert_eq!(NodeConfig::load(&path).unwrap(), NodeConfig::default());
    config.save(&path).unwrap();
    assert_eq!(NodeConfig::load(&path).unwrap(), config);
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "client_mode = false\nupdate_period = \"soon\"\n").unwrap();
    let err = NodeConfig::load(&bad).unwrap_err().to_string();
    assert!(
        err.contains(&bad.display().to_string()) && err.contains("line 2"),
        "{err}"
    );

    let node = Node::spawn_from(&path, probes(&user)).await.unwrap();
    wait_state(&node, RunState::Running, PATIENCE).await;
    node.snooze(Duration::from_secs(3600)).await.unwrap();
    wait_state(&node, RunState::Paused, Duration::from_secs(5)).await;
    let first = node.status().borrow().clone();
    assert!(first.reason.to_lowercase().contains("snooz"), "{}", first.reason);
    let until = first.until.unwrap();
    let expected = apiary_ledger::unix_now() + 3600.0;
    assert!((until - expected).abs() < 5.0, "{until} vs {expected}");
    // settings changed through the handle are written back to the file the node was loaded from
    let policy = PolicyConfig {
        mode: Mode::Max,
        ..PolicyConfig::default()
    };
    node.set_policy(policy.clone()).await.unwrap();
    assert_eq!(NodeConfig::load(&path).unwrap().policy, policy);
    assert_eq!(node.config().policy.mode, Mode::Max);
    node.shutdown().await.unwrap();

    // a restart: still snoozed, until the same time, and the same peer id (the identity is kept)
    let node = Node::spawn_from(&path, probes(&user)).await.unwrap();
    assert_eq!(
        node.status().borrow().peer_id,
        first.peer_id,
        "the node keeps its identity"
    );
    let mut status = node.status();
    let again = wait_for("the restored snooze", Duration::from_secs(5), async || {
        let s = status.borrow_and_update().clone();
        if s.state == RunState::Paused && s.reason.to_lowercase().contains("snooz") {
            Ok(s)
        } else {
            Err(format!("{:?}: {}", s.state, s.reason))
        }
    })
    .await;
    assert!((again.until.unwrap() - until).abs() < 1e-3, "{again:?}");
    assert_eq!(node.config().policy.mode, Mode::Max);
    // resume ends it
    node.resume().await.unwrap();
    wait_state(&node, RunState::Running, Duration::from_secs(5)).await;
    // "finish then pause" with nothing in flight pauses at once
    node.finish().await.unwrap();
    let mut status = node.status();
    wait_for("finish then pause", Duration::from_secs(5), async || {
        let s = status.borrow_and_update().clone();
        if s.directive.pause_cause() == Some(apiary_governor::PauseCause::Finished) {
            Ok(())
        } else {
            Err(format!("{:?}: {}", s.state, s.reason))
        }
    })
    .await;
    node.shutdown().await.unwrap();

    // a first run with the default `start_paused` waits for the user
    let fresh = NodeConfig {
        data_dir: dir.path().join("fresh"),
        start_paused: true,
        ..config.clone()
    };
    let node = Node::spawn(fresh, probes(&user)).await.unwrap();
    let mut status = node.status();
    wait_for(
        "a first run to be paused by the user",
        Duration::from_secs(5),
        async || {
            let s = status.borrow_and_update().clone();
            if s.state == RunState::Paused && s.reason != "Starting up" {
                Ok(())
            } else {
                Err(format!("{:?}: {}", s.state, s.reason))
            }
        },
    )
    .await;
    node.shutdown().await.unwrap();
}

/// Joining twice, an unknown experiment, or leaving one not joined: clear errors, nothing changes.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn joining_twice_or_unknown_is_a_clear_error() {
    let swarm = Swarm::start().await;
    let dir = tempfile::tempdir().unwrap();
    let user = User(Arc::new(AtomicBool::new(false)));
    let node = Node::spawn(swarm.config(dir.path()), probes(&user))
        .await
        .unwrap();

    let err = node
        .join("no-such-experiment", JoinOptions::default())
        .await
        .unwrap_err();
    assert!(matches!(err, NodeError::NotListed(_)), "{err:?}");
    assert!(
        err.to_string().contains("no experiment `no-such-experiment`"),
        "{err}"
    );

    let options = JoinOptions {
        max_experts: Some(2),
        publisher: None,
    };
    let plan = wait_for("the first join", PATIENCE, async || {
        match node.join(LOCAL_DEMO_ID, options.clone()).await {
            Ok(p) => Ok(p),
            Err(NodeError::NotListed(m)) => Err(m),
            Err(e) => panic!("{e}"),
        }
    })
    .await;
    assert_eq!(plan.uids.len(), 2);
    let err = node.join(LOCAL_DEMO_ID, options.clone()).await.unwrap_err();
    assert!(matches!(err, NodeError::AlreadyJoined(_)), "{err:?}");
    assert!(err.to_string().contains("already joined"), "{err}");
    // two joins at once: one wins
    node.leave(LOCAL_DEMO_ID).await.unwrap();
    let (a, b) = tokio::join!(
        node.join(LOCAL_DEMO_ID, options.clone()),
        node.join(LOCAL_DEMO_ID, options.clone())
    );
    assert!(a.is_ok() != b.is_ok(), "{a:?} / {b:?}");
    let status = node.status().borrow().clone();
    assert_eq!(status.experiments.len(), 1);
    assert_eq!(status.experiments[0].uids.len(), 2);

    let err = node.leave("no-such-experiment").await.unwrap_err();
    assert!(matches!(err, NodeError::NotJoined(_)), "{err:?}");

    // a restart re-joins what was joined (joined.json)
    node.shutdown().await.unwrap();
    let node = Node::spawn(swarm.config(dir.path()), probes(&user))
        .await
        .unwrap();
    let mut status = node.status();
    wait_for(
        "the experiment re-joined after the restart",
        PATIENCE,
        async || {
            let s = status.borrow_and_update().clone();
            match s.experiments.first() {
                Some(e) if e.id == LOCAL_DEMO_ID && e.uids.len() == 2 => Ok(()),
                _ => Err(format!("{:?}", s.experiments)),
            }
        },
    )
    .await;
    node.leave(LOCAL_DEMO_ID).await.unwrap();
    let err = node.leave(LOCAL_DEMO_ID).await.unwrap_err();
    assert!(matches!(err, NodeError::NotJoined(_)), "{err:?}");
    node.shutdown().await.unwrap();
    swarm.stop().await;
}

/// The node's identity lives in the data folder; an unreadable identity file stops the start with the
/// file named, and is left as it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_identity_is_reported_not_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(apiary_node::IDENTITY_FILE);
    std::fs::write(&path, b"not a key").unwrap();
    let config = NodeConfig {
        data_dir: dir.path().to_owned(),
        listen_maddrs: vec!["/ip4/127.0.0.1/tcp/0".into()],
        initial_peers: Vec::new(),
        ..NodeConfig::default()
    };
    let err = Node::spawn(config, probes(&User::default())).await.unwrap_err();
    assert!(matches!(err, NodeError::Identity { .. }), "{err:?}");
    assert!(err.to_string().contains("identity.key"), "{err}");
    assert_eq!(std::fs::read(&path).unwrap(), b"not a key");
}

/// The node reads the joined experiment's catalog entry again: a new summary changes nothing, the
/// publisher marking it finished makes the node leave it (and forget it), and it cannot be joined again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_finished_experiment_is_left() {
    let swarm = Swarm::start().await;
    let dir = tempfile::tempdir().unwrap();
    let user = User(Arc::new(AtomicBool::new(false)));
    let config = NodeConfig {
        catalog_check_period: Duration::from_millis(500),
        ..swarm.config(dir.path())
    };
    let node = Node::spawn(config, probes(&user)).await.unwrap();
    let mut events = node.events();
    let options = JoinOptions {
        max_experts: Some(2),
        publisher: None,
    };
    wait_for("the join", PATIENCE, async || {
        match node.join(LOCAL_DEMO_ID, options.clone()).await {
            Ok(p) => Ok(p),
            Err(NodeError::NotListed(m)) => Err(m),
            Err(e) => panic!("{e}"),
        }
    })
    .await;

    let republish = async |manifest: Manifest| {
        let signed = SignedManifest::sign(manifest, &swarm.key).unwrap();
        let stored = swarm.publication.update(&signed, unix_now()).await.unwrap();
        assert!(stored > 0);
    };
    let mut summary = swarm.manifest.clone();
    summary.summary = "A better summary.".into();
    republish(summary.clone()).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        node.status().borrow().experiments.len(),
        1,
        "an updated summary is no reason to leave"
    );

    let mut finished = summary;
    finished.status = Status::Finished;
    republish(finished).await;
    let mut seen = Vec::new();
    let left = wait_for(
        "the node to leave the finished experiment",
        PATIENCE,
        async || {
            drain_events(&mut events, &mut seen);
            seen.iter()
                .find_map(|e| match e {
                    NodeEvent::Left { id, reason } if id == LOCAL_DEMO_ID => Some(reason.clone()),
                    _ => None,
                })
                .ok_or_else(|| format!("{seen:?}"))
        },
    )
    .await;
    assert!(left.contains("finished"), "{left}");
    assert!(node.status().borrow().experiments.is_empty());
    let remembered = std::fs::read_to_string(dir.path().join("joined.json")).unwrap_or_default();
    assert!(!remembered.contains(LOCAL_DEMO_ID), "forgotten: {remembered}");
    let err = node.join(LOCAL_DEMO_ID, options).await.unwrap_err();
    assert!(err.to_string().contains("finished"), "{err}");
    node.shutdown().await.unwrap();
    swarm.stop().await;
}

/// The status's per-expert load: forward and backward calls from a client grow the expert's
/// counters, a steady stream shows as requests per second, and the busy share stays within 0–1.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn per_expert_load_grows_with_calls() {
    let swarm = Swarm::start().await;
    let dir = tempfile::tempdir().unwrap();
    let node = Node::spawn(swarm.config(dir.path()), probes(&User::default()))
        .await
        .unwrap();
    let peer_id = node.p2p().local_peer_id();
    wait_state(&node, RunState::Running, PATIENCE).await;
    let plan = wait_for("joining the demo", PATIENCE, async || {
        node.join(
            LOCAL_DEMO_ID,
            JoinOptions {
                max_experts: Some(4),
                publisher: Some(swarm.fingerprint.clone()),
            },
        )
        .await
        .map_err(|e| e.to_string())
    })
    .await;
    let uids = plan.uids.clone();
    let status = node.status().borrow().clone();
    let hosted = &status.experiments[0];
    assert_eq!(
        hosted.experts.iter().map(|e| &e.uid).collect::<Vec<_>>(),
        hosted.uids.iter().collect::<Vec<_>>()
    );
    assert!(
        hosted
            .experts
            .iter()
            .all(|e| e.forward_rows == 0 && e.backward_rows == 0 && e.requests_per_s == 0.0),
        "{hosted:?}"
    );

    // one expert, called directly: 16 forward rows, then 8 backward rows with an optimizer step
    let uid = uids[0].clone();
    let transport = swarm.publisher.transport();
    let addr = ExpertAddr::new(&uid, peer_id);
    wait_for("the expert to answer", PATIENCE, async || {
        forward(&transport, &uid, peer_id, 16).await
    })
    .await;
    let x = Tensor::randn(0f32, 1.0, (8, HIDDEN), &Device::Cpu).unwrap();
    let g = Tensor::ones((8, HIDDEN), candle_core::DType::F32, &Device::Cpu).unwrap();
    transport.backward(&addr, vec![x], vec![g]).await.unwrap();
    let mut rx = node.status();
    let load = |s: &apiary_node::NodeStatus, uid: &str| {
        s.experiments
            .first()
            .and_then(|h| h.experts.iter().find(|e| e.uid == uid))
            .cloned()
    };
    let first = wait_for("the calls in the expert's counters", PATIENCE, async || {
        let s = rx.borrow_and_update().clone();
        match load(&s, &uid) {
            Some(e) if e.forward_rows >= 16 && e.backward_rows >= 8 && e.optimizer_steps >= 1 => Ok(e),
            e => Err(format!("{e:?}")),
        }
    })
    .await;
    // the other experts were not called
    let s = node.status().borrow().clone();
    for other in &uids[1..] {
        let e = load(&s, other).unwrap();
        assert_eq!((e.forward_rows, e.backward_rows), (0, 0), "{e:?}");
    }

    // a steady stream of forward calls: requests per second and a busy share show in the status
    let stop = Arc::new(AtomicBool::new(false));
    let stream = {
        let (transport, uid, stop) = (transport.clone(), uid.clone(), stop.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::SeqCst) {
                let _ = forward(&transport, &uid, peer_id, 32).await;
            }
        })
    };
    let busy = wait_for("a load rate in the status", PATIENCE, async || {
        let s = rx.borrow_and_update().clone();
        let e = load(&s, &uid).ok_or("no expert")?;
        for h in &s.experiments {
            for e in &h.experts {
                assert!(
                    (0.0..=1.0).contains(&e.busy_fraction) && e.requests_per_s >= 0.0,
                    "{e:?}"
                );
            }
        }
        if e.requests_per_s > 0.0 && e.busy_fraction > 0.0 && e.forward_rows > first.forward_rows {
            Ok(e)
        } else {
            Err(format!("{e:?}"))
        }
    })
    .await;
    stop.store(true, Ordering::SeqCst);
    stream.await.unwrap();
    assert!(busy.busy_fraction <= 1.0, "{busy:?}");
    eprintln!(
        "per-expert load under a stream of 32-row forward calls: {:.1} requests/s, busy {:.0} %",
        busy.requests_per_s,
        busy.busy_fraction * 100.0
    );
    // once the stream stops, the rates fall back to zero within a couple of periods
    wait_for("the rates back to zero", PATIENCE, async || {
        let s = rx.borrow_and_update().clone();
        let e = load(&s, &uid).ok_or("no expert")?;
        if e.requests_per_s == 0.0 && e.busy_fraction == 0.0 {
            Ok(())
        } else {
            Err(format!("{e:?}"))
        }
    })
    .await;

    node.shutdown().await.unwrap();
    swarm.stop().await;
}

/// The status says how peers reach the node: forced private with a trusted relay, it is relayed through
/// it (with the relay's round trip and the relayed address); with the relay gone, offline; a trusted relay
/// without a peer id is refused at start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_says_how_peers_reach_the_node() {
    use apiary_node::{ForceReachability, NetPath, NetworkConfig};
    use apiary_p2p::{Host, P2pConfig, RelayLimits};
    let (relay, relay_addr) = {
        let (p2p, _task) = Host::spawn(P2pConfig {
            relay_service: Some(RelayLimits::default()),
            ..P2pConfig::default()
        })
        .unwrap();
        let addr = p2p.listen("/ip4/127.0.0.1/tcp/0".parse().unwrap()).await.unwrap();
        p2p.add_external_address(addr.clone()).await.unwrap();
        let full = addr.with_p2p(p2p.local_peer_id()).unwrap();
        let dht = apiary_dht::Dht::spawn(p2p.clone(), apiary_dht::DhtConfig::default(), vec![])
            .await
            .unwrap();
        (
            common::Peer {
                p2p,
                dht,
                addr: full.clone(),
            },
            full,
        )
    };
    let network: NetworkConfig = toml::from_str(&format!(
        "force_reachability = \"private\"\ntrusted_relays = [\"{relay_addr}\"]\nnat_port_map = false\n"
    ))
    .unwrap();
    assert_eq!(network.force_reachability, Some(ForceReachability::Private));
    assert!(network.use_relay && network.use_auto_relay && network.hole_punching && !network.relay_service);
    let dir = tempfile::tempdir().unwrap();
    let config = NodeConfig {
        data_dir: dir.path().to_owned(),
        listen_maddrs: vec!["/ip4/127.0.0.1/tcp/0".into()],
        initial_peers: vec![relay_addr.to_string()],
        network,
        ..NodeConfig::default()
    };
    let user = common::User(Arc::new(AtomicBool::new(false)));
    let node = Node::spawn(config.clone(), probes(&user)).await.unwrap();
    let relay_id = relay.p2p.local_peer_id().to_base58();
    let status = wait_for("a relayed status", PATIENCE, async || {
        let s = node.status().borrow().clone();
        let relayed = s.network.path == NetPath::Relayed && s.network.rtt_ms.is_some();
        let seen = format!("{:?}", s.network);
        relayed.then_some(s).ok_or(seen)
    })
    .await;
    let n = &status.network;
    assert!(n.forced && n.reason.contains("through a relay"), "{n:?}");
    assert_eq!(n.relays.len(), 1);
    assert_eq!(n.relays[0].peer_id, relay_id);
    assert!(
        n.relayed_addrs.iter().any(|a| a.contains("/p2p-circuit")),
        "{n:?}"
    );
    let json = serde_json::to_value(&status).unwrap();
    assert_eq!(json["network"]["path"], "relayed");
    assert_eq!(json["network"]["reachability"], "private");

    relay.stop().await;
    wait_for("an offline status", PATIENCE, async || {
        let n = node.status().borrow().network.clone();
        (n.path == NetPath::Offline && n.relays.is_empty() && n.reason.contains("No peer"))
            .then_some(())
            .ok_or(format!("{n:?}"))
    })
    .await;
    node.shutdown().await.unwrap();

    let bad = NodeConfig {
        data_dir: dir.path().join("other"),
        network: NetworkConfig {
            trusted_relays: vec!["/ip4/127.0.0.1/tcp/1".into()],
            ..NetworkConfig::default()
        },
        ..config
    };
    let err = Node::spawn(bad, probes(&user)).await.unwrap_err();
    assert!(matches!(err, NodeError::Network(_)), "{err}");
    assert!(err.to_string().contains("/p2p/"), "{err}");
}
