//! `apiary bench moe`: the trainer's throughput on the demo's model against local volunteers.
//!
//! 1. The demo's swarm, built the demo's way ([`crate::swarm`]): a bootstrap DHT node and `--volunteers`
//!    volunteers hosting one `ffn` expert grid per MoE layer (`ffn_demo.0.`, `ffn_demo.1.`, … grid `--grid`,
//!    hidden `--hidden-dim`), all in this process, each on its own libp2p host on loopback.
//! 2. A trainer on its own host (a DHT client) with the demo's character-level LM, whose feed-forward
//!    sublayers are `RemoteMixtureOfExperts` layers (beam search over the DHT, `--k-best` experts per
//!    character, Adam at `--lr`), on the demo's corpus.
//! 3. `--warmup` steps untimed (connections, `rpc_info`, the first declarations), then `--steps` timed
//!    steps, back to back: `steps_per_s` = steps / their wall time, `samples_per_s` = the characters
//!    trained per second (`batch · seq` per step).
//!
//! Latency: `--latency-ms L` injects it inside this process — every expert RPC the trainer makes waits
//! `L` before its request leaves and `L` before its reply is handed back (a round trip of `2L`); DHT
//! traffic (the beam search) is not delayed. For latency on every packet (DHT included), run the
//! benchmark with `--latency-ms 0` in a network namespace whose loopback delays packets, as
//! `cargo xtask bench moe` does (`--network-latency-ms L` then only records it in the result).
//!
//! `tests/interop/bench_moe.py` is the same measure with hivemind's `RemoteMixtureOfExperts`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use apiary_moe::lm::Corpus;
use apiary_moe::trainer::Trainer;
use apiary_moe::transport::{
    ExpertAddr, ExpertInfo, ExpertTransport, P2pTransport, TransportConfig, TransportError,
};
use candle_core::Tensor;
use clap::Args;
use futures::future::BoxFuture;
use serde_json::json;

use crate::output::Output;
use crate::swarm::{self, SwarmArgs, maddrs, node};

/// The demo's training text.
const CORPUS: &str = include_str!("../../../assets/corpus/shakespeare-plays.txt");

/// The demo's model and swarm, and how long to measure.
#[derive(Debug, Args, Clone)]
pub struct MoeBench {
    /// Timed training steps.
    #[arg(long, default_value_t = 30)]
    steps: u64,
    /// Untimed steps first (connections, expert infos, declarations settling).
    #[arg(long, default_value_t = 3)]
    warmup: u64,
    /// One-way latency injected on every expert RPC of the trainer, in milliseconds (in-process: the
    /// request waits this long before it leaves, the reply before it is handed back).
    #[arg(long, default_value_t = 0.0)]
    latency_ms: f64,
    /// One-way latency the network itself adds (e.g. a namespace delaying loopback packets, as
    /// `cargo xtask bench moe` sets up): only recorded in the result.
    #[arg(long, default_value_t = 0.0)]
    network_latency_ms: f64,
    #[command(flatten)]
    swarm: SwarmArgs,
}

/// An [`ExpertTransport`] whose calls take `delay` longer each way: the request waits `delay` before it
/// goes out, the reply `delay` before it is handed back.
#[derive(Debug)]
struct Delayed {
    inner: Arc<dyn ExpertTransport>,
    delay: Duration,
}

impl Delayed {
    async fn around<T>(&self, call: BoxFuture<'_, Result<T, TransportError>>) -> Result<T, TransportError> {
        tokio::time::sleep(self.delay).await;
        let reply = call.await;
        tokio::time::sleep(self.delay).await;
        reply
    }
}

impl ExpertTransport for Delayed {
    fn info<'a>(&'a self, expert: &'a ExpertAddr) -> BoxFuture<'a, Result<Arc<ExpertInfo>, TransportError>> {
        // rpc_info is cached after the first call; only the first one crosses the network
        self.inner.info(expert)
    }

    fn forward<'a>(
        &'a self,
        expert: &'a ExpertAddr,
        inputs: Vec<Tensor>,
    ) -> BoxFuture<'a, Result<Vec<Tensor>, TransportError>> {
        Box::pin(self.around(self.inner.forward(expert, inputs)))
    }

    fn backward<'a>(
        &'a self,
        expert: &'a ExpertAddr,
        inputs: Vec<Tensor>,
        grad_outputs: Vec<Tensor>,
    ) -> BoxFuture<'a, Result<Vec<Tensor>, TransportError>> {
        Box::pin(self.around(self.inner.backward(expert, inputs, grad_outputs)))
    }
}

/// What the training thread measured.
struct Measured {
    seconds: f64,
    step_seconds: Vec<f64>,
    loss_first: f32,
    loss_last: f32,
    calls: [u64; 4],
}

pub async fn run(p: MoeBench, out: &Output) -> Result<()> {
    if p.swarm.volunteers == 0
        || p.steps == 0
        || p.swarm.layers == 0
        || p.swarm.batch == 0
        || p.swarm.seq == 0
    {
        bail!("--volunteers, --steps, --layers, --batch and --seq must be positive");
    }
    if p.swarm.grid.is_empty() || p.swarm.grid.contains(&0) {
        bail!("--grid: every size must be positive");
    }
    if !(p.latency_ms >= 0.0 && p.latency_ms.is_finite()) {
        bail!("--latency-ms must be a non-negative number");
    }
    let corpus = Corpus::new(CORPUS, 0.1)?;

    // the swarm, as the demo builds it
    let (boot_p2p, boot_dht) = node(&[], false).await?;
    let boot = maddrs(&boot_p2p).await;
    let (_key, experiment) = p.swarm.experiment()?;
    let mut volunteers = swarm::volunteers(&boot, p.swarm.volunteers, &experiment.manifest).await?;
    let experts: usize = volunteers.iter().map(|v| v.uids.len()).sum();
    tracing::info!(volunteers = p.swarm.volunteers, experts, "swarm up");

    // the trainer
    let (t_p2p, t_dht) = node(&boot, true).await?;
    let p2p_transport: Arc<dyn ExpertTransport> = Arc::new(P2pTransport::new(
        t_p2p.clone(),
        TransportConfig {
            info_timeout: Duration::from_secs(5),
            forward_timeout: Duration::from_secs(10),
            backward_timeout: Duration::from_secs(10),
        },
    ));
    let transport: Arc<dyn ExpertTransport> = if p.latency_ms > 0.0 {
        Arc::new(Delayed {
            inner: p2p_transport,
            delay: Duration::from_secs_f64(p.latency_ms / 1e3),
        })
    } else {
        p2p_transport
    };
    let trainer = p.swarm.trainer(&t_dht, transport, corpus)?;

    let (warmup, steps) = (p.warmup, p.steps);
    let measured = tokio::task::spawn_blocking(move || train(trainer, warmup, steps))
        .await
        .context("the trainer thread panicked")??;

    let mut sorted = measured.step_seconds.clone();
    sorted.sort_by(f64::total_cmp);
    let median = sorted[sorted.len() / 2];
    let samples = p.steps as usize * p.swarm.batch * p.swarm.seq;
    let [fwd, fwd_failed, bwd, bwd_failed] = measured.calls;
    let (latency_ms, latency_via) = if p.latency_ms > 0.0 {
        (p.latency_ms, "transport")
    } else if p.network_latency_ms > 0.0 {
        (p.network_latency_ms, "network")
    } else {
        (0.0, "none")
    };
    let result = json!({
        "impl": "apiary",
        "steps_per_s": p.steps as f64 / measured.seconds,
        "samples_per_s": samples as f64 / measured.seconds,
        "seconds": measured.seconds,
        "step_ms_median": median * 1e3,
        "steps": p.steps,
        "warmup": p.warmup,
        "latency_ms": latency_ms,
        "latency_via": latency_via,
        "volunteers": p.swarm.volunteers,
        "experts": experts,
        "layers": p.swarm.layers,
        "grid": p.swarm.grid,
        "hidden": p.swarm.hidden_dim,
        "batch": p.swarm.batch,
        "seq": p.swarm.seq,
        "k_best": p.swarm.k_best,
        "loss_first": measured.loss_first,
        "loss_last": measured.loss_last,
        "expert_calls": {"forward": fwd, "forward_failed": fwd_failed, "backward": bwd, "backward_failed": bwd_failed},
    });

    for v in &mut volunteers {
        v.stop().await;
    }
    t_dht.shutdown().await;
    t_p2p.shutdown().await;
    boot_dht.shutdown().await;
    boot_p2p.shutdown().await;

    if out.is_json() {
        out.result(result);
    } else {
        out.say(&format!(
            "MoE trainer, {} layer(s) × grid {:?} (hidden {}) on {} local volunteers, batch {}×{}, k_best {}, \
             latency {latency_ms} ms one-way ({latency_via}):\n  {:.2} steps/s, {:.0} samples (characters)/s, \
             median step {:.0} ms, over {} steps after {} warm-up; loss {:.3} → {:.3}",
            p.swarm.layers,
            p.swarm.grid,
            p.swarm.hidden_dim,
            p.swarm.volunteers,
            p.swarm.batch,
            p.swarm.seq,
            p.swarm.k_best,
            p.steps as f64 / measured.seconds,
            samples as f64 / measured.seconds,
            median * 1e3,
            p.steps,
            p.warmup,
            measured.loss_first,
            measured.loss_last,
        ));
    }
    Ok(())
}

/// The training thread: `warmup` untimed steps, then `steps` timed ones.
fn train(mut trainer: Trainer, warmup: u64, steps: u64) -> Result<Measured> {
    for _ in 0..warmup {
        trainer.step()?;
    }
    let calls = |t: &Trainer| -> [u64; 4] {
        t.moes().iter().fold([0; 4], |acc, m| {
            let s = m.stats();
            [
                acc[0] + s.forward_calls,
                acc[1] + s.forward_failures,
                acc[2] + s.backward_calls,
                acc[3] + s.backward_failures,
            ]
        })
    };
    let before = calls(&trainer);
    let mut step_seconds = Vec::with_capacity(steps as usize);
    let (mut loss_first, mut loss_last) = (f32::NAN, f32::NAN);
    let started = Instant::now();
    for i in 0..steps {
        let r = trainer.step()?;
        if i == 0 {
            loss_first = r.loss;
        }
        loss_last = r.loss;
        step_seconds.push(r.seconds);
    }
    let seconds = started.elapsed().as_secs_f64();
    let after = calls(&trainer);
    Ok(Measured {
        seconds,
        step_seconds,
        loss_first,
        loss_last,
        calls: [
            after[0] - before[0],
            after[1] - before[1],
            after[2] - before[2],
            after[3] - before[3],
        ],
    })
}
