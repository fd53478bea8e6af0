//! `RemoteMixtureOfExperts` over real parts on 127.0.0.1: beam search through Apiary DHT nodes, experts
//! called over libp2p (`P2pTransport`) on Apiary expert servers and on real hivemind 1.1.12 servers.
//!
//! - the remote layer equals the same layer over the same experts in-process (`LocalTransport`,
//!   `StaticRouter`) through training steps: outputs and every gradient;
//! - a server killed outright (declarations left to expire) is masked out, then routed around;
//! - a small regression model trains through experts hosted by hivemind, and a mixed swarm (hivemind and
//!   Apiary servers hosting parts of one grid) serves one layer.
//!
//! The layer blocks on a tokio runtime, so each test builds one and calls the layer from its own thread.

#![allow(clippy::unwrap_used)]

mod moe_common;

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use apiary_expert::{BackendConfig, Optimizer, OptimizerConfig};
use apiary_moe::lm::Rng;
use apiary_moe::moe::{MoeConfig, RemoteMixtureOfExperts, StaticRouter, coordinates};
use apiary_moe::transport::{ExpertAddr, LocalTransport, P2pTransport, TransportConfig};
use apiary_p2p::{Multiaddr, PeerId};
use apiary_testkit::HivemindPeer;
use candle_core::{Device, Tensor, Var};
use moe_common::{
    Recording, Server, ServerSpec, TrainerNode, all_finite, ffn_schema, flat, grid_uids, max_rel_diff, rand,
    run, seeded_backend,
};

const H: usize = 16;
const GRID: [usize; 2] = [3, 3];
const PREFIX: &str = "ffn.";
const BATCH: usize = 12;
const GATING_SEED: u64 = 7;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// Expert `ffn.i.j`'s seed.
fn seed_of(uid: &str) -> u64 {
    let c = coordinates(PREFIX, &GRID, uid).unwrap();
    100 + 10 * c[0] as u64 + c[1] as u64
}

fn adam(lr: f64) -> BackendConfig {
    BackendConfig {
        optimizer: OptimizerConfig::Adam {
            lr,
            betas: (0.9, 0.999),
            eps: 1e-8,
            weight_decay: 0.0,
        },
        ..BackendConfig::default()
    }
}

/// The grid split over `n` servers: `ffn.i.j` on server `(i + j) % n`, so every row spans servers.
fn split(n: usize) -> Vec<Vec<(String, u64)>> {
    let mut parts = vec![Vec::new(); n];
    for i in 0..GRID[0] {
        for j in 0..GRID[1] {
            let uid = format!("{PREFIX}{i}.{j}");
            let seed = seed_of(&uid);
            parts[(i + j) % n].push((uid, seed));
        }
    }
    parts
}

/// `n` Apiary servers hosting the grid (see [`split`]), each joining the DHT through the first.
async fn servers(
    n: usize,
    backend: BackendConfig,
    update_period: Duration,
    expiration: Duration,
) -> Vec<Server> {
    let mut out: Vec<Server> = Vec::new();
    for experts in split(n) {
        let spec = ServerSpec {
            experts,
            hidden: H,
            backend,
            update_period,
            expiration,
        };
        let bootstrap = out.first().map(|s| vec![s.addr.clone()]).unwrap_or_default();
        out.push(Server::spawn(bootstrap, &spec).await);
    }
    out
}

fn uid_set(rec: &Recording) -> BTreeSet<String> {
    rec.answered().into_keys().map(|(uid, _)| uid).collect()
}

/// The same experts (same seeds, same optimizer) on three Apiary servers, reached by beam search and
/// libp2p, and in-process behind a `StaticRouter`: two layers with the same gating give the same outputs,
/// input gradients and gating gradients at every training step (every backward steps the experts on both
/// sides alike), and the experts end up trained the same.
#[test]
fn remote_layer_equals_the_same_experts_in_process_through_training_steps() {
    let started = Instant::now();
    let rt = runtime();
    let backend = adam(1e-2);
    let (servers, trainer, found) = rt.block_on(async {
        let servers = servers(3, backend, Duration::from_secs(30), Duration::from_secs(60)).await;
        let trainer = TrainerNode::spawn(vec![servers[0].addr.clone()]).await;
        let found = trainer.wait_for_experts(PREFIX, &GRID, 9).await;
        (servers, trainer, found)
    });
    // each expert is declared by the server hosting it
    for e in &found {
        let host = servers.iter().find(|s| s.uids.contains(&e.uid)).unwrap();
        assert_eq!(e.peer_id, host.peer_id(), "{}", e.uid);
    }

    // k_best 4 ≥ grid_size[0]: the beam search is exact, so it picks what the static router picks
    let config = MoeConfig::new(H, PREFIX, GRID.to_vec());
    assert!(config.k_best >= GRID[0]);
    let remote_rec = Recording::new(Arc::new(P2pTransport::new(
        trainer.p2p.clone(),
        TransportConfig::default(),
    )));
    let remote = RemoteMixtureOfExperts::new(
        config.clone(),
        Arc::new(trainer.searcher(PREFIX, &GRID)),
        Arc::new(remote_rec.clone()),
        rt.handle().clone(),
        GATING_SEED,
    )
    .unwrap();

    let mut local_transport = LocalTransport::new(TransportConfig::default());
    for e in &found {
        local_transport = local_transport
            .with_backend(
                e.uid.clone(),
                seeded_backend(H, seed_of(&e.uid), backend),
                &ffn_schema(H),
            )
            .unwrap();
    }
    let addrs: Vec<ExpertAddr> = found
        .iter()
        .map(|e| ExpertAddr::new(e.uid.clone(), e.peer_id))
        .collect();
    let local_rec = Recording::new(Arc::new(local_transport));
    let local = RemoteMixtureOfExperts::new(
        config,
        Arc::new(StaticRouter::new(PREFIX, &GRID, addrs).unwrap()),
        Arc::new(local_rec.clone()),
        rt.handle().clone(),
        GATING_SEED,
    )
    .unwrap();

    let mut rng = Rng::new(11);
    let x0 = rand(&mut rng, &[BATCH, H]);
    let mut first_out = None;
    let mut worst = 0f32;
    for step in 0..4 {
        let x = if step == 0 {
            x0.clone()
        } else {
            rand(&mut rng, &[BATCH, H])
        };
        let g = rand(&mut rng, &[BATCH, H]);
        remote_rec.clear();
        local_rec.clear();
        let got = run(&remote, &x, &g);
        let want = run(&local, &x, &g);
        for ((name, a), (_, b)) in got.tensors().into_iter().zip(want.tensors()) {
            let d = max_rel_diff(a, b);
            assert!(d < 1e-5, "step {step}: {name} differs by {d} (relative)");
            worst = worst.max(d);
        }
        // the same experts answered, once forward and once backward each
        assert_eq!(uid_set(&remote_rec), uid_set(&local_rec), "step {step}");
        for ((uid, _), calls) in remote_rec.answered() {
            assert_eq!(calls, [1, 1], "step {step}: {uid}");
        }
        let (r, l) = (remote.stats(), local.stats());
        let fwd = r.last_forward.unwrap();
        assert!(fwd.failed.is_empty(), "step {step}: {fwd:?}");
        assert_eq!(fwd.answered_pairs, BATCH * 4);
        assert_eq!(fwd.experts_called, l.last_forward.unwrap().experts_called);
        assert!(r.last_backward.unwrap().failed.is_empty());
        if step == 0 {
            first_out = Some(got.out);
        }
    }
    // both sides trained their experts alike: the first batch again gives equal outputs, unlike before
    let again_remote = remote.forward(&x0).unwrap();
    let again_local = local.forward(&x0).unwrap();
    assert!(max_rel_diff(&again_remote, &again_local) < 1e-5);
    let moved = max_rel_diff(&again_remote, first_out.as_ref().unwrap());
    assert!(moved > 1e-4, "the experts' optimizer steps show: {moved}");

    drop((remote, local));
    rt.block_on(async {
        trainer.stop().await;
        for s in servers {
            s.stop().await;
        }
    });
    eprintln!(
        "remote == local: largest relative difference {worst:e}; {:?}",
        started.elapsed()
    );
}

/// A server killed outright mid-run: the layer keeps producing finite outputs and gradients with the
/// dead server's experts reported failed (and masked out), and once their declarations expire (3 s) the
/// beam search no longer routes to them.
#[test]
fn a_killed_server_is_masked_out_then_routed_around_once_its_declarations_expire() {
    let started = Instant::now();
    let rt = runtime();
    let expiration = Duration::from_secs(3);
    let (mut servers, trainer) = rt.block_on(async {
        let servers = servers(3, adam(1e-3), Duration::from_secs(1), expiration).await;
        let trainer = TrainerNode::spawn(vec![servers[0].addr.clone()]).await;
        trainer.wait_for_experts(PREFIX, &GRID, 9).await;
        (servers, trainer)
    });
    let transport = TransportConfig {
        info_timeout: Duration::from_secs(5),
        forward_timeout: Duration::from_secs(5),
        backward_timeout: Duration::from_secs(5),
    };
    let search = trainer.searcher(PREFIX, &GRID);
    let moe = RemoteMixtureOfExperts::new(
        MoeConfig::new(H, PREFIX, GRID.to_vec()),
        Arc::new(search.clone()),
        Arc::new(P2pTransport::new(trainer.p2p.clone(), transport)),
        rt.handle().clone(),
        GATING_SEED,
    )
    .unwrap();
    let mut rng = Rng::new(12);
    let mut step = || {
        let x = rand(&mut rng, &[BATCH, H]);
        let g = rand(&mut rng, &[BATCH, H]);
        let pass = run(&moe, &x, &g);
        assert!(pass.all_finite(), "outputs and gradients stay finite");
        moe.stats()
    };
    for _ in 0..2 {
        let stats = step();
        let fwd = stats.last_forward.unwrap();
        assert!(
            fwd.failed.is_empty() && fwd.answered_pairs == BATCH * 4,
            "{fwd:?}"
        );
    }

    let mut dead = servers.pop().unwrap();
    let dead_uids = dead.uids.clone();
    rt.block_on(dead.kill());
    let killed = Instant::now();
    let mut failed_steps = 0;
    let mut clean_streak = 0;
    let mut steps = 0;
    while clean_streak < 3 {
        std::thread::sleep(Duration::from_millis(50));
        assert!(
            killed.elapsed() < expiration + Duration::from_secs(12),
            "still failing {:?} after the kill",
            killed.elapsed()
        );
        let stats = step();
        steps += 1;
        let fwd = stats.last_forward.unwrap();
        for (uid, why) in &fwd.failed {
            assert!(
                dead_uids.contains(uid),
                "only the dead server's experts fail: {uid}: {why}"
            );
        }
        // every sample kept live experts (each holds 4 of the 9, at most 3 dead)
        assert_eq!(fwd.zero_samples, 0);
        // experts that failed forward get no backward: the backward pass sees no failures
        let bwd = stats.last_backward.unwrap();
        assert!(bwd.failed.is_empty(), "{bwd:?}");
        if fwd.failed.is_empty() {
            clean_streak += 1;
        } else {
            failed_steps += 1;
            clean_streak = 0;
            assert!(
                killed.elapsed() < expiration + Duration::from_secs(5),
                "routed to the dead server {:?} after the kill",
                killed.elapsed()
            );
        }
    }
    eprintln!(
        "after the kill: {failed_steps} steps with failures, clean after {:?} ({steps} steps)",
        killed.elapsed()
    );
    assert!(
        failed_steps > 0,
        "the dead server's experts were still declared at first"
    );
    // the beam search now finds exactly the live experts (polled: a live server's re-declaration may
    // land a moment late on a loaded machine)
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let all = rt
            .block_on(search.find_best_experts(&[vec![0.0; 3], vec![0.0; 3]], 9))
            .unwrap();
        assert!(
            all.iter()
                .all(|e| !dead_uids.contains(&e.uid) && e.peer_id != dead.peer_id()),
            "{all:?}"
        );
        if all.len() == 6 {
            break;
        }
        assert!(Instant::now() < deadline, "the live experts: {all:?}");
        std::thread::sleep(Duration::from_millis(100));
    }

    drop(moe);
    rt.block_on(async {
        trainer.stop().await;
        for s in servers {
            s.stop().await;
        }
    });
    eprintln!("killed server: {:?}", started.elapsed());
}

/// Starts `hivemind_peer.py server` with `count` random experts of `ffn.[0:3].[0:3]`, width [`H`].
fn hivemind_server(count: usize) -> HivemindPeer {
    let count = count.to_string();
    HivemindPeer::spawn(
        "server",
        &[
            "--expert-pattern",
            "ffn.[0:3].[0:3]",
            "--num-experts",
            &count,
            "--expert-cls",
            "ffn",
            "--hidden-dim",
            &H.to_string(),
        ],
        Duration::from_secs(180),
    )
}

fn hivemind_experts(peer: &HivemindPeer) -> Vec<String> {
    peer.ready["experts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_owned())
        .collect()
}

/// A `Linear` layer's parameters, initialised like torch's.
fn linear(rng: &mut Rng, inputs: usize, outputs: usize) -> (Var, Var) {
    let bound = 1.0 / (inputs as f32).sqrt();
    let w = Tensor::from_vec(
        rng.uniform(bound, inputs * outputs),
        (outputs, inputs),
        &Device::Cpu,
    )
    .unwrap();
    let b = Tensor::from_vec(rng.uniform(bound, outputs), outputs, &Device::Cpu).unwrap();
    (Var::from_tensor(&w).unwrap(), Var::from_tensor(&b).unwrap())
}

fn apply(x: &Tensor, (w, b): &(Var, Var)) -> Tensor {
    x.matmul(&w.as_tensor().t().unwrap())
        .unwrap()
        .broadcast_add(b.as_tensor())
        .unwrap()
}

/// Linear(8 → H) → RemoteMixtureOfExperts → Linear(H → 1), trained with Adam on a fixed regression set
/// (`y = tanh(x·v)`); returns the loss at every step.
fn train_regression(moe: &RemoteMixtureOfExperts, steps: usize) -> Vec<f32> {
    const D_IN: usize = 8;
    const N: usize = 32;
    let mut rng = Rng::new(21);
    let x = rand(&mut rng, &[N, D_IN]);
    let v = rand(&mut rng, &[D_IN, 1]);
    let y = (x.matmul(&v).unwrap() * 1.5).unwrap().tanh().unwrap();
    let first = linear(&mut rng, D_IN, H);
    let last = linear(&mut rng, H, 1);
    let mut params = vec![first.0.clone(), first.1.clone(), last.0.clone(), last.1.clone()];
    params.extend(moe.params());
    let lr = 1e-2;
    let mut optimizer = Optimizer::new(
        OptimizerConfig::Adam {
            lr,
            betas: (0.9, 0.999),
            eps: 1e-8,
            weight_decay: 0.0,
        },
        params.len(),
    )
    .unwrap();
    let mut losses = Vec::with_capacity(steps);
    for _ in 0..steps {
        let hidden = apply(&x, &first);
        let mixed = moe.forward(&hidden).unwrap();
        let pred = apply(&mixed, &last);
        let loss = (pred - &y).unwrap().sqr().unwrap().mean_all().unwrap();
        let grads = loss.backward().unwrap();
        let g: Vec<Tensor> = params
            .iter()
            .map(|p| grads.get(p.as_tensor()).unwrap().clone())
            .collect();
        assert!(g.iter().all(all_finite));
        optimizer.step(&params, &g, lr, 1.0).unwrap();
        losses.push(loss.to_scalar::<f32>().unwrap());
    }
    losses
}

fn mean(v: &[f32]) -> f32 {
    v.iter().sum::<f32>() / v.len() as f32
}

/// Apiary's layer (beam search through the hivemind DHT, `P2pTransport`) trains a small regression model
/// whose experts are hosted by a real hivemind server: the loss falls, and the hivemind experts answer
/// every forward and backward call.
#[test]
fn trains_through_experts_hosted_by_hivemind() {
    let started = Instant::now();
    let hivemind = hivemind_server(6);
    let experts = hivemind_experts(&hivemind);
    assert_eq!(experts.len(), 6, "{experts:?}");
    let hivemind_peer: PeerId = hivemind.peer_id().parse().unwrap();
    let bootstrap: Multiaddr = hivemind.maddr().parse().unwrap();
    let rt = runtime();
    let (trainer, found) = rt.block_on(async {
        let trainer = TrainerNode::spawn(vec![bootstrap]).await;
        let found = trainer.wait_for_experts(PREFIX, &GRID, experts.len()).await;
        (trainer, found)
    });
    let found_uids: Vec<String> = found.iter().map(|e| e.uid.clone()).collect();
    assert_eq!(found_uids, experts);
    assert!(found.iter().all(|e| e.peer_id == hivemind_peer));

    let rec = Recording::new(Arc::new(P2pTransport::new(
        trainer.p2p.clone(),
        TransportConfig::default(),
    )));
    let moe = RemoteMixtureOfExperts::new(
        MoeConfig::new(H, PREFIX, GRID.to_vec()),
        Arc::new(trainer.searcher(PREFIX, &GRID)),
        Arc::new(rec.clone()),
        rt.handle().clone(),
        GATING_SEED,
    )
    .unwrap();
    let steps = 40;
    let losses = train_regression(&moe, steps);
    eprintln!("losses through hivemind experts: {losses:?}");
    assert!(losses.iter().all(|l| l.is_finite()));
    let (before, after) = (mean(&losses[..5]), mean(&losses[steps - 5..]));
    assert!(after < 0.5 * before, "the loss falls: {before} -> {after}");
    let stats = moe.stats();
    assert_eq!(stats.forward_failures + stats.backward_failures, 0, "{stats:?}");
    let answered = rec.answered();
    assert!(answered.len() >= 4, "{answered:?}");
    for ((uid, peer), [fwd, bwd]) in &answered {
        assert_eq!(*peer, hivemind_peer);
        assert!(experts.contains(uid));
        assert_eq!(fwd, bwd, "{uid}: every forward answer got its backward");
    }
    let calls: u64 = answered.values().map(|c| c[1]).sum();
    assert_eq!(calls, stats.backward_calls);

    drop(moe);
    rt.block_on(trainer.stop());
    drop(hivemind);
    eprintln!("hivemind training: {:?}", started.elapsed());
}

/// A mixed swarm: a hivemind server hosts part of the grid, an Apiary server (joined to hivemind's DHT)
/// the rest; the trainer, joined through the Apiary server, finds all of them and trains through both.
#[test]
fn a_mixed_swarm_of_hivemind_and_apiary_servers_serves_one_layer() {
    let started = Instant::now();
    let hivemind = hivemind_server(4);
    let hivemind_uids = hivemind_experts(&hivemind);
    assert_eq!(hivemind_uids.len(), 4, "{hivemind_uids:?}");
    let hivemind_peer: PeerId = hivemind.peer_id().parse().unwrap();
    let bootstrap: Multiaddr = hivemind.maddr().parse().unwrap();
    let apiary_uids: Vec<(String, u64)> = grid_uids(PREFIX, GRID)
        .into_iter()
        .filter(|u| !hivemind_uids.contains(u))
        .map(|u| {
            let seed = seed_of(&u);
            (u, seed)
        })
        .collect();
    let rt = runtime();
    let (server, trainer, found) = rt.block_on(async {
        let spec = ServerSpec {
            experts: apiary_uids.clone(),
            hidden: H,
            backend: adam(1e-3),
            update_period: Duration::from_secs(30),
            expiration: Duration::from_secs(60),
        };
        let server = Server::spawn(vec![bootstrap], &spec).await;
        let trainer = TrainerNode::spawn(vec![server.addr.clone()]).await;
        let found = trainer.wait_for_experts(PREFIX, &GRID, 9).await;
        (server, trainer, found)
    });
    let host_of: HashMap<String, PeerId> = found.iter().map(|e| (e.uid.clone(), e.peer_id)).collect();
    for uid in &hivemind_uids {
        assert_eq!(host_of[uid], hivemind_peer, "{uid}");
    }
    for (uid, _) in &apiary_uids {
        assert_eq!(host_of[uid], server.peer_id(), "{uid}");
    }

    let rec = Recording::new(Arc::new(P2pTransport::new(
        trainer.p2p.clone(),
        TransportConfig::default(),
    )));
    let moe = RemoteMixtureOfExperts::new(
        MoeConfig::new(H, PREFIX, GRID.to_vec()),
        Arc::new(trainer.searcher(PREFIX, &GRID)),
        Arc::new(rec.clone()),
        rt.handle().clone(),
        GATING_SEED,
    )
    .unwrap();
    let mut rng = Rng::new(31);
    for step in 0..4 {
        let x = rand(&mut rng, &[BATCH, H]);
        let g = rand(&mut rng, &[BATCH, H]);
        let pass = run(&moe, &x, &g);
        assert!(pass.all_finite());
        let fwd = moe.stats().last_forward.unwrap();
        assert!(fwd.failed.is_empty(), "step {step}: {fwd:?}");
        assert_eq!(fwd.answered_pairs, BATCH * 4);
    }
    let answered = rec.answered();
    for ((uid, peer), [fwd, bwd]) in &answered {
        assert_eq!(*peer, host_of[uid], "{uid} answered from its declared host");
        assert_eq!(fwd, bwd, "{uid}");
    }
    let backward_by = |peer: PeerId| -> u64 {
        answered
            .iter()
            .filter(|((_, p), _)| *p == peer)
            .map(|(_, c)| c[1])
            .sum()
    };
    let (from_hivemind, from_apiary) = (backward_by(hivemind_peer), backward_by(server.peer_id()));
    eprintln!("backward answers: hivemind {from_hivemind}, apiary {from_apiary}; {answered:?}");
    assert!(from_hivemind > 0 && from_apiary > 0, "both servers trained");
    // the Apiary server's experts took the optimizer steps its answers say
    let stepped: u64 = server
        .runtime
        .stats()
        .experts
        .iter()
        .map(|e| e.optimizer_steps)
        .sum();
    assert!(stepped >= from_apiary, "{stepped} < {from_apiary}");
    let values = flat(&moe.forward(&rand(&mut rng, &[2, H])).unwrap());
    assert!(values.iter().all(|v| v.is_finite()));

    drop(moe);
    rt.block_on(async {
        trainer.stop().await;
        server.stop().await;
    });
    drop(hivemind);
    eprintln!("mixed swarm: {:?}", started.elapsed());
}
