//! `apiary train`: the trainer for any swarm — Apiary or hivemind expert servers found through the DHT.
//! `--model demo` is the demo's character-level language model (one MoE layer per `--uid-prefix`);
//! `--model toy` a small classifier around one MoE layer, like hivemind's examples.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use apiary_catalog::records::in_grid;
use apiary_catalog::swarm::validator;
use apiary_catalog::{Publication, SignedManifest};
use apiary_moe::lm::{Corpus, LmConfig, Split};
use apiary_moe::toy::ToyTrainer;
use apiary_moe::trainer::{Trainer, TrainerConfig};
use apiary_moe::transport::{P2pTransport, TransportConfig};
use apiary_wire::signature::RsaPrivateKey;
use clap::{Args, ValueEnum};
use serde_json::json;

use crate::dht::{NodeArgs, start, start_with_validator};
use crate::output::Output;
use crate::swarm::{self, MoeSettings, Progress, publish_status};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Model {
    /// The demo's character-level language model (one MoE layer per --uid-prefix).
    Demo,
    /// A classifier around one MoE layer on synthetic data, as in hivemind's examples.
    Toy,
}

#[derive(Debug, Args)]
pub struct TrainArgs {
    /// The experts' uid prefix, one per MoE layer (e.g. `ffn.`; the demo swarm uses `ffn_demo.0. ffn_demo.1.`).
    #[arg(long, num_args = 1.., required = true)]
    uid_prefix: Vec<String>,
    /// The expert grid, one size per dimension.
    #[arg(long, num_args = 1.., required = true)]
    grid: Vec<usize>,
    /// The experts' hidden dim (the model's width).
    #[arg(long, required = true)]
    hidden_dim: usize,
    /// The experts' class; the trainer's models route through `ffn` experts.
    #[arg(long, default_value = "ffn")]
    expert_cls: String,
    /// Experts chosen per sample.
    #[arg(long, default_value_t = 4)]
    k_best: usize,
    /// Experts that must answer (in total) for a step to go on.
    #[arg(long, default_value_t = 1)]
    k_min: usize,
    /// Expert answers the backward pass needs.
    #[arg(long, default_value_t = 1)]
    backward_k_min: usize,
    /// Seconds the experts' forward calls may take in all.
    #[arg(long, default_value_t = 30.0)]
    forward_timeout: f64,
    /// Seconds the experts' backward calls may take in all.
    #[arg(long, default_value_t = 30.0)]
    backward_timeout: f64,
    /// Seconds to wait for more experts once every sample has --k-min answers.
    #[arg(long, default_value_t = 2.0)]
    timeout_after_k_min: f64,
    /// Go on with zero outputs for samples none of whose experts answered.
    #[arg(long)]
    allow_zero_outputs: bool,
    /// Refuse non-finite inputs and gradients; count non-finite expert answers as failures.
    #[arg(long)]
    detect_anomalies: bool,
    /// Training steps.
    #[arg(long, default_value_t = 100)]
    steps: u64,
    /// The model to train.
    #[arg(long, value_enum, default_value_t = Model::Demo)]
    model: Model,
    /// Samples per batch (sequences for `demo`, examples for `toy`).
    #[arg(long, default_value_t = 16)]
    batch: usize,
    /// Characters per sequence (`demo`).
    #[arg(long, default_value_t = 32)]
    seq: usize,
    /// Adam's learning rate.
    #[arg(long, default_value_t = 3e-3)]
    lr: f64,
    /// Seeds the model and the batches.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Publish this experiment's manifest (TOML/JSON, as `apiary publish` takes it) while training, and
    /// the trainer's live status beside it; needs --key. Every --uid-prefix's grid must lie in its grid.
    #[arg(long, requires = "key")]
    manifest: Option<PathBuf>,
    /// The publisher's private key for --manifest.
    #[arg(long, requires = "manifest")]
    key: Option<PathBuf>,
    /// Seconds between refreshes of the published manifest and status.
    #[arg(long, default_value_t = 10.0)]
    status_period: f64,
    #[command(flatten)]
    node: NodeArgs,
}

/// The experiment `apiary train --manifest` publishes, checked against the trainer's layers.
fn experiment(args: &TrainArgs) -> Result<Option<(RsaPrivateKey, SignedManifest)>> {
    let (Some(manifest), Some(key)) = (&args.manifest, &args.key) else {
        return Ok(None);
    };
    if !(args.status_period.is_finite() && args.status_period > 0.0) {
        bail!("--status-period must be a positive number of seconds");
    }
    let (key, signed) = crate::experiments::load_and_sign(manifest, key)?;
    let m = &signed.manifest;
    for prefix in &args.uid_prefix {
        for coords in swarm::grid_coords(&args.grid) {
            let c: Vec<String> = coords.iter().map(ToString::to_string).collect();
            let uid = format!("{prefix}{}", c.join("."));
            if !in_grid(&uid, &m.uid_prefix, &m.grid) {
                bail!(
                    "--uid-prefix {prefix} with --grid {:?} routes to {uid}, which is not in the experiment's grid \
                     ({} {:?})",
                    args.grid,
                    m.uid_prefix,
                    m.grid
                );
            }
        }
    }
    if m.expert.kind != "ffn" || m.expert.hidden_dim != args.hidden_dim {
        bail!(
            "the experiment's experts are `{}` of hidden dim {}, the trainer routes through `ffn` of {}",
            m.expert.kind,
            m.expert.hidden_dim,
            args.hidden_dim
        );
    }
    Ok(Some((key, signed)))
}

pub async fn run(args: TrainArgs, out: &Output) -> Result<()> {
    if args.expert_cls != "ffn" {
        bail!(
            "--expert-cls {}: the trainer's models route through ffn experts",
            args.expert_cls
        );
    }
    if args.model == Model::Toy && args.uid_prefix.len() != 1 {
        bail!("--model toy has one MoE layer: give one --uid-prefix");
    }
    let experiment = experiment(&args)?;
    let (p2p, dht) = match &experiment {
        Some((key, _)) => {
            let network = args.node.nat.network(crate::nat::hivemind_defaults(false));
            start_with_validator(&args.node, true, &network, validator(Some(key.clone()))?).await?
        }
        None => start(&args.node, true).await?,
    };
    let publishing = match &experiment {
        Some((_, signed)) => {
            let period = Duration::from_secs_f64(args.status_period);
            let publication = Publication::start(
                dht.clone(),
                signed,
                swarm::unix_now(),
                period,
                (2 * period).max(Duration::from_secs(3)),
            )
            .await
            .context("publishing the experiment")?;
            let publication = Arc::new(publication);
            let (tx, rx) = tokio::sync::watch::channel(Progress::default());
            let task = tokio::spawn(publish_status(
                publication.clone(),
                dht.clone(),
                signed.manifest.clone(),
                rx,
                period,
            ));
            tracing::info!(experiment = %signed.manifest.id, "published the experiment");
            Some((publication, tx, task))
        }
        None => None,
    };
    let transport = Arc::new(P2pTransport::new(
        p2p.clone(),
        TransportConfig {
            info_timeout: Duration::from_secs(10),
            forward_timeout: Duration::from_secs_f64(args.forward_timeout),
            backward_timeout: Duration::from_secs_f64(args.backward_timeout),
        },
    ));
    let settings = MoeSettings {
        k_best: args.k_best,
        k_min: args.k_min,
        backward_k_min: args.backward_k_min,
        forward_timeout: Some(Duration::from_secs_f64(args.forward_timeout)),
        backward_timeout: Some(Duration::from_secs_f64(args.backward_timeout)),
        timeout_after_k_min: Some(Duration::from_secs_f64(args.timeout_after_k_min)),
        allow_zero_outputs: args.allow_zero_outputs,
        detect_anomalies: args.detect_anomalies,
    };
    let mut moes = swarm::moe_layers(
        &dht,
        transport,
        &args.uid_prefix,
        &args.grid,
        args.hidden_dim,
        settings,
        args.seed,
    )?;
    out.ready(
        &p2p.local_peer_id().to_string(),
        &[],
        json!({ "model": format!("{:?}", args.model).to_lowercase() }),
    );

    let stop = Arc::new(AtomicBool::new(false));
    let (tx, mut rx) = tokio::sync::mpsc::channel::<(u64, f32, f64, Option<f32>)>(64);
    let worker_stop = stop.clone();
    let steps = args.steps;
    let job = match args.model {
        Model::Demo => {
            let corpus = Corpus::new(crate::demo::CORPUS, 0.1)?;
            let mut lm = LmConfig::new(corpus.vocab.len());
            lm.d_model = args.hidden_dim;
            lm.layers = moes.len();
            lm.context = args.seq.max(1);
            let config = TrainerConfig {
                batch: args.batch,
                seq: args.seq,
                lr: args.lr,
                seed: args.seed,
                ..TrainerConfig::default()
            };
            let mut trainer = Trainer::new(lm, moes, corpus, config)?;
            tokio::task::spawn_blocking(move || -> Result<serde_json::Value> {
                let valid_start = trainer.evaluate(Split::Valid)?;
                for _ in 0..steps {
                    if worker_stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let r = trainer.step()?;
                    if tx.blocking_send((r.step, r.loss, r.seconds, None)).is_err() {
                        break;
                    }
                }
                let valid_end = trainer.evaluate(Split::Valid)?;
                Ok(json!({"valid_loss_start": valid_start, "valid_loss_end": valid_end}))
            })
        }
        Model::Toy => {
            let moe = moes.pop().context("one MoE layer")?;
            let mut toy = ToyTrainer::new(moe, 2, 1024, args.batch, args.lr, args.seed)?;
            tokio::task::spawn_blocking(move || -> Result<serde_json::Value> {
                for _ in 0..steps {
                    if worker_stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let (r, acc) = toy.step()?;
                    if tx.blocking_send((r.step, r.loss, r.seconds, Some(acc))).is_err() {
                        break;
                    }
                }
                Ok(json!({}))
            })
        }
    };

    let bar = out.progress(steps);
    let signal = crate::shutdown_signal();
    tokio::pin!(signal);
    let mut losses = Vec::new();
    loop {
        let next = tokio::select! {
            n = rx.recv() => n,
            _ = &mut signal, if !stop.load(Ordering::Relaxed) => {
                stop.store(true, Ordering::Relaxed);
                continue;
            }
        };
        let Some((step, loss, seconds, accuracy)) = next else {
            break;
        };
        losses.push(loss);
        bar.set_position(step);
        if let Some((_, progress, _)) = &publishing {
            let samples = match args.model {
                Model::Demo => args.batch * args.seq,
                Model::Toy => args.batch,
            };
            let _ = progress.send(Progress {
                step,
                loss: Some(f64::from(loss)),
                samples_per_s: samples as f64 / seconds.max(1e-9),
            });
        }
        bar.set_message(match accuracy {
            Some(a) => format!("loss {loss:.3} accuracy {:.0}%", 100.0 * a),
            None => format!("loss {loss:.3}"),
        });
        let mut line = json!({"event": "step", "step": step, "loss": loss, "seconds": seconds});
        if let Some(a) = accuracy {
            line["accuracy"] = json!(a);
        }
        out.event(line);
    }
    bar.finish_and_clear();
    let outcome = job.await.context("the trainer thread")?;
    if let Some((publication, _, task)) = publishing {
        task.abort();
        let _ = task.await;
        if let Ok(publication) = Arc::try_unwrap(publication) {
            publication.withdraw().await;
        }
    }
    dht.shutdown().await;
    p2p.shutdown().await;
    let mut result = outcome.context("training stopped")?;
    let first = losses.first().copied();
    let last = losses.last().copied();
    result["event"] = json!("result");
    result["steps"] = json!(losses.len());
    result["loss_start"] = json!(first);
    result["loss_end"] = json!(last);
    out.event(result.clone());
    out.say(&format!(
        "trained {} steps: loss {} → {}{}",
        losses.len(),
        first.map_or("-".into(), |l| format!("{l:.3}")),
        last.map_or("-".into(), |l| format!("{l:.3}")),
        match (
            result.get("valid_loss_start").and_then(|v| v.as_f64()),
            result.get("valid_loss_end").and_then(|v| v.as_f64())
        ) {
            (Some(a), Some(b)) => format!("; validation {a:.3} → {b:.3}"),
            _ => String::new(),
        }
    ));
    Ok(())
}
