//! `apiary demo`: the main job on its embedded default — a whole swarm on this machine (a bootstrap DHT
//! node, volunteers hosting an `ffn` expert grid per MoE layer, and a trainer) training the demo's
//! character-level language model on the bundled corpus. Half-way through, one volunteer is killed
//! outright (no goodbye: its declarations stay in the DHT until they expire) and training goes on.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use apiary_dht::{Dht, DhtConfig, DhtHandle};
use apiary_expert::runtime::{Runtime, RuntimeConfig, RuntimeHandle};
use apiary_expert::schema::ExpertSchema;
use apiary_expert::server::{Declarer, ExpertServer};
use apiary_expert::{BackendConfig, Expert, ExpertBackend, ExpertConfig, ExpertKind};
use apiary_moe::beam::{BeamSearchConfig, MoEBeamSearcher};
use apiary_moe::lm::{Corpus, LmConfig, Split};
use apiary_moe::moe::{MoeConfig, RemoteMixtureOfExperts};
use apiary_moe::trainer::{StepReport, Trainer, TrainerConfig};
use apiary_moe::transport::{P2pTransport, TransportConfig};
use apiary_p2p::{Host, Multiaddr, P2pConfig, P2pHandle, Protocol};
use apiary_wire::proto::runtime::CompressionType;
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;

use crate::output::Output;

/// The demo's training text: eight public-domain plays (provenance in `assets/corpus/README.md`).
const CORPUS: &str = include_str!("../../../assets/corpus/shakespeare-plays.txt");

/// How often volunteers refresh their declarations, and how long one lives.
const UPDATE_PERIOD: Duration = Duration::from_secs(4);
const EXPIRATION: Duration = Duration::from_secs(10);

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Volunteer nodes hosting the experts.
    #[arg(long, default_value_t = 3)]
    volunteers: usize,
    /// Training steps.
    #[arg(long, default_value_t = 600)]
    steps: u64,
    /// The expert grid of each MoE layer, one size per dimension.
    #[arg(long, num_args = 1.., default_values_t = [4usize, 4])]
    grid: Vec<usize>,
    /// The model's width, which is the experts' hidden dim.
    #[arg(long, default_value_t = 64)]
    hidden_dim: usize,
    /// Transformer blocks (one MoE layer each).
    #[arg(long, default_value_t = 2)]
    layers: usize,
    /// Sequences per batch.
    #[arg(long, default_value_t = 16)]
    batch: usize,
    /// Characters per sequence.
    #[arg(long, default_value_t = 32)]
    seq: usize,
    /// Experts per character and layer.
    #[arg(long, default_value_t = 4)]
    k_best: usize,
    /// The trainer's learning rate (Adam).
    #[arg(long, default_value_t = 3e-3)]
    lr: f64,
    /// Seeds the model, the experts and the batches.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Kill one volunteer outright after this many steps (default: half of them; 0: never).
    #[arg(long)]
    kill_after: Option<u64>,
    /// Characters of generated text to show at the end.
    #[arg(long, default_value_t = 200)]
    sample_chars: usize,
    /// Also train the same model without its MoE layers for the same steps, for comparison.
    #[arg(long)]
    baseline: bool,
    /// Leave the swarm up after training (until Ctrl-C), for other `apiary` commands and hivemind peers.
    #[arg(long)]
    keep_running: bool,
}

/// One volunteer: a node of the swarm hosting some experts.
struct Volunteer {
    name: String,
    p2p: P2pHandle,
    dht: DhtHandle,
    runtime: RuntimeHandle,
    declarer: Option<Declarer>,
    uids: Vec<String>,
    /// The last statistics, kept when the volunteer is killed.
    stats: Option<apiary_expert::RuntimeStats>,
}

impl Volunteer {
    async fn start(
        name: String,
        bootstrap: &[Multiaddr],
        uids: Vec<String>,
        hidden: usize,
        seed: u64,
    ) -> Result<Self> {
        let (p2p, dht) = node(bootstrap, false).await?;
        let mut backends = Vec::new();
        let mut schemas = std::collections::HashMap::new();
        for (i, uid) in uids.iter().enumerate() {
            let config = ExpertConfig::new(ExpertKind::Ffn, hidden);
            let expert = Expert::new(config, seed.wrapping_mul(1000).wrapping_add(i as u64))?;
            backends.push((uid.clone(), ExpertBackend::new(expert, BackendConfig::default())?));
            schemas.insert(
                uid.clone(),
                ExpertSchema::server_create(ExpertKind::Ffn, hidden, CompressionType::None, 4096),
            );
        }
        let runtime = Runtime::spawn(backends, RuntimeConfig::default())?;
        ExpertServer::new(runtime.clone(), schemas)
            .register(&p2p)
            .context("registering the expert RPCs")?;
        let (declarer, _) = Declarer::start(dht.clone(), uids.clone(), UPDATE_PERIOD, EXPIRATION).await;
        Ok(Self {
            name,
            p2p,
            dht,
            runtime,
            declarer: Some(declarer),
            uids,
            stats: None,
        })
    }

    fn alive(&self) -> bool {
        self.declarer.is_some()
    }

    fn stats(&self) -> apiary_expert::RuntimeStats {
        self.stats.clone().unwrap_or_else(|| self.runtime.stats())
    }

    /// Gone without a goodbye: declarations are neither refreshed nor withdrawn, connections drop.
    async fn kill(&mut self) {
        self.stats = Some(self.runtime.stats());
        drop(self.declarer.take()); // stops refreshing; the records stay until they expire
        self.p2p.shutdown().await;
        self.runtime.shutdown().await;
        self.dht.shutdown().await;
    }

    /// A clean exit: declarations withdrawn first.
    async fn stop(&mut self) {
        if let Some(declarer) = self.declarer.take() {
            self.stats = Some(self.runtime.stats());
            declarer.withdraw().await;
            self.runtime.shutdown().await;
            self.dht.shutdown().await;
            self.p2p.shutdown().await;
        }
    }
}

/// A P2P host on loopback and a DHT node bootstrapped from `bootstrap`.
async fn node(bootstrap: &[Multiaddr], client_mode: bool) -> Result<(P2pHandle, DhtHandle)> {
    let config = P2pConfig {
        listen_addrs: vec!["/ip4/127.0.0.1/tcp/0".parse()?],
        ..P2pConfig::default()
    };
    let (p2p, _task) = Host::spawn(config).context("could not start a libp2p host")?;
    let mut dht_config = DhtConfig::default();
    dht_config.client_mode = client_mode;
    let dht = Dht::spawn(p2p.clone(), dht_config, bootstrap.to_vec())
        .await
        .context("could not join the DHT")?;
    Ok((p2p, dht))
}

/// The full `/p2p/` multiaddrs of a host (waiting briefly for its listener).
async fn maddrs(p2p: &P2pHandle) -> Vec<Multiaddr> {
    let mut addrs = p2p.listen_addrs();
    let deadline = Instant::now() + Duration::from_secs(5);
    while addrs.borrow().is_empty() && Instant::now() < deadline {
        let _ = tokio::time::timeout(Duration::from_millis(200), addrs.changed()).await;
    }
    let id = p2p.local_peer_id();
    let list = addrs.borrow().clone();
    list.into_iter().map(|a| a.with(Protocol::P2p(id))).collect()
}

/// Which volunteer hosts expert `coords` of layer `layer`: spread so that every grid row (a prefix the
/// beam search expands) lives on several volunteers, and losing one never takes a sample's whole choice.
fn host_of(layer: usize, coords: &[usize], volunteers: usize) -> usize {
    (layer + coords.iter().sum::<usize>()) % volunteers
}

/// Every coordinate tuple of `grid`, in order.
fn grid_coords(grid: &[usize]) -> Vec<Vec<usize>> {
    let mut all = vec![Vec::new()];
    for &size in grid {
        all = all
            .into_iter()
            .flat_map(|prefix| {
                (0..size).map(move |i| {
                    let mut c = prefix.clone();
                    c.push(i);
                    c
                })
            })
            .collect();
    }
    all
}

fn uid(layer: usize, coords: &[usize]) -> String {
    let c: Vec<String> = coords.iter().map(ToString::to_string).collect();
    format!("{}{}", prefix(layer), c.join("."))
}

fn prefix(layer: usize) -> String {
    format!("ffn_l{layer}.")
}

/// What the trainer thread reports.
enum Event {
    Step(StepReport, usize),
    Done(Box<Result<Finished>>),
}

struct Finished {
    train_start: f32,
    valid_start: f32,
    train_end: f32,
    valid_end: f32,
    sample: String,
    calls: (u64, u64, u64, u64),
}

pub async fn run(args: DemoArgs, out: &Output) -> Result<()> {
    if args.volunteers == 0 || args.steps == 0 || args.layers == 0 {
        bail!("--volunteers, --steps and --layers must be positive");
    }
    if args.grid.is_empty() || args.grid.contains(&0) {
        bail!("--grid: every size must be positive");
    }
    let corpus = Corpus::new(CORPUS, 0.1)?;
    let t0 = Instant::now();

    // the swarm
    let (boot_p2p, boot_dht) = node(&[], false).await?;
    let boot = maddrs(&boot_p2p).await;
    let coords = grid_coords(&args.grid);
    let mut volunteers = Vec::new();
    for v in 0..args.volunteers {
        let uids: Vec<String> = (0..args.layers)
            .flat_map(|l| {
                coords
                    .iter()
                    .filter(move |c| host_of(l, c, args.volunteers) == v)
                    .map(move |c| uid(l, c))
            })
            .collect();
        let name = format!("volunteer {}", v + 1);
        volunteers.push(
            Volunteer::start(name, &boot, uids, args.hidden_dim, args.seed ^ (v as u64 + 1))
                .await
                .with_context(|| format!("starting volunteer {}", v + 1))?,
        );
    }
    let experts: usize = volunteers.iter().map(|v| v.uids.len()).sum();
    let boot_strings: Vec<String> = boot.iter().map(ToString::to_string).collect();
    out.ready(
        &boot_p2p.local_peer_id().to_string(),
        &[],
        json!({
            "bootstrap": boot_strings,
            "volunteers": volunteers.iter().map(|v| json!({
                "name": v.name, "peer_id": v.p2p.local_peer_id().to_string(), "experts": v.uids,
            })).collect::<Vec<_>>(),
        }),
    );
    out.say(&format!(
        "Apiary demo: a local swarm of {} volunteers hosting {experts} ffn experts ({} layer(s) × grid {:?}, \
         hidden {}), training a character-level language model on {} characters of Shakespeare.\n\
         bootstrap: {}",
        args.volunteers,
        args.layers,
        args.grid,
        args.hidden_dim,
        corpus.train.len(),
        boot_strings.join(" ")
    ));

    // the trainer
    let (t_p2p, t_dht) = node(&boot, true).await?;
    let transport = Arc::new(P2pTransport::new(
        t_p2p.clone(),
        TransportConfig {
            info_timeout: Duration::from_secs(5),
            forward_timeout: Duration::from_secs(10),
            backward_timeout: Duration::from_secs(10),
        },
    ));
    let mut moes = Vec::new();
    for layer in 0..args.layers {
        let searcher = MoEBeamSearcher::new(
            t_dht.clone(),
            &prefix(layer),
            args.grid.clone(),
            BeamSearchConfig::default(),
        )?;
        let mut config = MoeConfig::new(args.hidden_dim, &prefix(layer), args.grid.clone());
        config.k_best = args.k_best;
        config.forward_timeout = Some(Duration::from_secs(20));
        config.backward_timeout = Some(Duration::from_secs(20));
        config.timeout_after_k_min = Some(Duration::from_secs(2));
        moes.push(RemoteMixtureOfExperts::new(
            config,
            Arc::new(searcher),
            transport.clone(),
            tokio::runtime::Handle::current(),
            args.seed.wrapping_add(100 + layer as u64),
        )?);
    }
    let mut lm = LmConfig::new(corpus.vocab.len());
    lm.d_model = args.hidden_dim;
    lm.layers = args.layers;
    lm.context = args.seq.max(1);
    let tconfig = TrainerConfig {
        batch: args.batch,
        seq: args.seq,
        lr: args.lr,
        seed: args.seed,
        ..TrainerConfig::default()
    };
    let trainer = Trainer::new(lm, moes, corpus.clone(), tconfig)?;

    let stop = Arc::new(AtomicBool::new(false));
    let (tx, mut rx) = tokio::sync::mpsc::channel(64);
    let steps = args.steps;
    let sample_chars = args.sample_chars;
    let seed = args.seed;
    let worker_stop = stop.clone();
    let worker = tokio::task::spawn_blocking(move || {
        let result = train(trainer, steps, sample_chars, seed, &worker_stop, &tx);
        let _ = tx.blocking_send(Event::Done(Box::new(result)));
    });

    let bar = if out.is_json() {
        ProgressBar::hidden()
    } else {
        let bar = ProgressBar::new(steps);
        bar.set_style(
            ProgressStyle::with_template("{bar:30} step {pos}/{len} {msg} [{elapsed_precise}]")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        bar
    };
    let kill_at = args.kill_after.unwrap_or(steps / 2);
    let mut killed: Option<(usize, u64)> = None;
    let mut recovered_at = None;
    let mut losses = Vec::new();
    let mut tokens = 0usize;
    let mut busy = 0f64;
    let signal = crate::shutdown_signal();
    tokio::pin!(signal);
    let finished = loop {
        let event = tokio::select! {
            e = rx.recv() => e,
            _ = &mut signal, if !stop.load(Ordering::Relaxed) => {
                stop.store(true, Ordering::Relaxed);
                bar.println("stopping after this step (Ctrl-C)");
                continue;
            }
        };
        match event {
            Some(Event::Step(r, failed)) => {
                losses.push(r.loss);
                tokens += r.tokens;
                busy += r.seconds;
                let rate = tokens as f64 / busy.max(1e-9);
                bar.set_position(r.step);
                bar.set_message(format!("loss {:.3} · {rate:.0} chars/s", r.loss));
                out.event(json!({
                    "event": "step", "step": r.step, "loss": r.loss, "seconds": r.seconds,
                    "samples_per_s": r.tokens as f64 / r.seconds.max(1e-9), "failed_expert_calls": failed,
                }));
                if let Some((_, at)) = killed {
                    if failed > 0 {
                        recovered_at = None;
                    } else if recovered_at.is_none() && r.step > at {
                        recovered_at = Some(r.step);
                    }
                }
                if killed.is_none() && kill_at > 0 && r.step == kill_at && volunteers.len() > 1 {
                    let v = volunteers.len() - 1;
                    volunteers[v].kill().await;
                    let msg = format!(
                        "step {}: killed {} outright ({} experts gone, no goodbye); training goes on",
                        r.step,
                        volunteers[v].name,
                        volunteers[v].uids.len()
                    );
                    bar.println(&msg);
                    tracing::info!("{msg}");
                    out.event(json!({"event": "killed", "step": r.step, "volunteer": volunteers[v].name}));
                    killed = Some((v, r.step));
                }
            }
            Some(Event::Done(result)) => break *result,
            None => bail!("the trainer stopped without a word"),
        }
    };
    let _ = worker.await;
    bar.finish_and_clear();
    let finished = finished?;
    let elapsed = t0.elapsed().as_secs_f64();
    let done_steps = losses.len();

    let baseline = if args.baseline {
        let mut lm = LmConfig::new(corpus.vocab.len());
        lm.d_model = args.hidden_dim;
        lm.layers = args.layers;
        lm.context = args.seq.max(1);
        let mut plain = Trainer::new(lm, Vec::new(), corpus.clone(), tconfig)?;
        let n = done_steps as u64;
        Some(
            tokio::task::spawn_blocking(move || -> Result<f32> {
                for _ in 0..n {
                    plain.step()?;
                }
                Ok(plain.evaluate(Split::Valid)?)
            })
            .await??,
        )
    } else {
        None
    };

    // the report
    let contributions: Vec<serde_json::Value> = volunteers
        .iter()
        .map(|v| {
            let s = v.stats();
            let sum = |f: fn(&apiary_expert::ExpertStats) -> u64| s.experts.iter().map(f).sum::<u64>();
            json!({
                "volunteer": v.name,
                "alive": v.alive(),
                "experts": v.uids.len(),
                "forward_batches": sum(|e| e.forward_batches),
                "backward_batches": sum(|e| e.backward_batches),
                "forward_samples": sum(|e| e.forward_rows),
                "backward_samples": sum(|e| e.backward_rows),
                "optimizer_steps": sum(|e| e.optimizer_steps),
            })
        })
        .collect();
    let curve = curve(&losses, 10);
    out.event(json!({
        "event": "result",
        "steps": done_steps,
        "seconds": elapsed,
        "train_loss_start": finished.train_start,
        "train_loss_end": finished.train_end,
        "valid_loss_start": finished.valid_start,
        "valid_loss_end": finished.valid_end,
        "baseline_valid_loss_end": baseline,
        "loss_curve": curve,
        "killed": killed.map(|(v, at)| json!({"volunteer": volunteers[v].name, "step": at})),
        "recovered_at_step": recovered_at,
        "expert_calls": {"forward": finished.calls.0, "forward_failed": finished.calls.1,
                          "backward": finished.calls.2, "backward_failed": finished.calls.3},
        "sample": finished.sample,
        "contributions": contributions,
    }));
    if !out.is_json() {
        let mut text = String::new();
        text.push_str(&format!(
            "\ntrained {done_steps} steps in {elapsed:.0} s ({:.0} chars/s)\n",
            tokens as f64 / busy.max(1e-9)
        ));
        text.push_str(&format!(
            "loss (nats/char)   start → end\n  train            {:.3} → {:.3}\n  validation       {:.3} → {:.3}\n",
            finished.train_start, finished.train_end, finished.valid_start, finished.valid_end
        ));
        if let Some(b) = baseline {
            text.push_str(&format!(
                "  validation without the MoE layers, same steps: {b:.3}\n"
            ));
        }
        let points: Vec<String> = curve.iter().map(|(s, l)| format!("{s}:{l:.2}")).collect();
        text.push_str(&format!("loss curve (step:loss)  {}\n", points.join("  ")));
        if let Some((v, at)) = killed {
            text.push_str(&format!(
                "{} was killed at step {at}; {} of {} expert calls failed and were routed around{}\n",
                volunteers[v].name,
                finished.calls.1 + finished.calls.3,
                finished.calls.0 + finished.calls.2,
                match recovered_at {
                    Some(s) => format!("; no failures since step {s} (its declarations expired)"),
                    None => String::new(),
                }
            ));
        }
        text.push_str(&format!("\nsample: {}\n\ncontributions:\n", finished.sample));
        text.push_str(
            "  volunteer     state   experts  fwd batches  bwd batches  samples fwd/bwd   optimizer steps\n",
        );
        for c in &contributions {
            let n = |k: &str| c[k].as_u64().unwrap_or(0);
            text.push_str(&format!(
                "  {:<12}  {:<6}  {:>7}  {:>11}  {:>11}  {:>7}/{:<7}  {:>15}\n",
                c["volunteer"].as_str().unwrap_or(""),
                if c["alive"].as_bool().unwrap_or(false) {
                    "up"
                } else {
                    "killed"
                },
                n("experts"),
                n("forward_batches"),
                n("backward_batches"),
                n("forward_samples"),
                n("backward_samples"),
                n("optimizer_steps"),
            ));
        }
        out.say(&text);
    }

    if args.keep_running && !stop.load(Ordering::Relaxed) {
        out.say(&format!(
            "the swarm stays up; join it with --initial-peers {}  (Ctrl-C to stop)",
            boot_strings.join(" ")
        ));
        signal.await;
    }
    for v in &mut volunteers {
        v.stop().await;
    }
    t_dht.shutdown().await;
    t_p2p.shutdown().await;
    boot_dht.shutdown().await;
    boot_p2p.shutdown().await;
    Ok(())
}

/// The trainer thread: the starting losses, `steps` steps (each reported), the final losses and a sample.
fn train(
    mut trainer: Trainer,
    steps: u64,
    sample_chars: usize,
    seed: u64,
    stop: &AtomicBool,
    tx: &tokio::sync::mpsc::Sender<Event>,
) -> Result<Finished> {
    let train_start = trainer.evaluate(Split::Train)?;
    let valid_start = trainer.evaluate(Split::Valid)?;
    let failures = |t: &Trainer| -> u64 {
        t.moes()
            .iter()
            .map(|m| {
                let s = m.stats();
                s.forward_failures + s.backward_failures
            })
            .sum()
    };
    for _ in 0..steps {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        let before = failures(&trainer);
        let report = trainer.step()?;
        let failed = (failures(&trainer) - before) as usize;
        if tx.blocking_send(Event::Step(report, failed)).is_err() {
            break;
        }
    }
    let train_end = trainer.evaluate(Split::Train)?;
    let valid_end = trainer.evaluate(Split::Valid)?;
    let sample = trainer.sample("ROMEO.\n", sample_chars, 0.8, seed)?;
    let calls = trainer.moes().iter().fold((0, 0, 0, 0), |acc, m| {
        let s = m.stats();
        (
            acc.0 + s.forward_calls,
            acc.1 + s.forward_failures,
            acc.2 + s.backward_calls,
            acc.3 + s.backward_failures,
        )
    });
    Ok(Finished {
        train_start,
        valid_start,
        train_end,
        valid_end,
        sample,
        calls,
    })
}

/// `points` evenly spaced `(step, mean loss of the window ending there)` pairs.
fn curve(losses: &[f32], points: usize) -> Vec<(usize, f32)> {
    if losses.is_empty() {
        return Vec::new();
    }
    let window = losses.len().div_ceil(points).max(1);
    losses
        .chunks(window)
        .enumerate()
        .map(|(i, c)| (i * window + c.len(), c.iter().sum::<f32>() / c.len() as f32))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_grid_row_spans_several_volunteers() {
        for layer in 0..2 {
            for row in 0..4 {
                let hosts: std::collections::HashSet<usize> =
                    (0..4).map(|j| host_of(layer, &[row, j], 3)).collect();
                assert!(hosts.len() >= 2, "layer {layer} row {row}: {hosts:?}");
            }
        }
        assert_eq!(grid_coords(&[2, 3]).len(), 6);
        assert_eq!(uid(1, &[2, 3]), "ffn_l1.2.3");
    }

    #[test]
    fn the_curve_averages_windows() {
        let c = curve(&[4.0, 2.0, 3.0, 1.0], 2);
        assert_eq!(c, vec![(2, 3.0), (4, 2.0)]);
    }
}
