//! `apiary demo`: the main job on its embedded default — a whole swarm on this machine (a bootstrap DHT
//! node, volunteers hosting an `ffn` expert grid per MoE layer, and a trainer) training the demo's
//! character-level language model on the bundled corpus. Half-way through, one volunteer is killed
//! outright (no goodbye: its declarations stay in the DHT until they expire) and training goes on.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use apiary_catalog::Publication;
use apiary_catalog::swarm::validator;
use apiary_moe::lm::{Corpus, Split};
use apiary_moe::trainer::{StepReport, Trainer};
use apiary_moe::transport::{P2pTransport, TransportConfig};
use clap::Args;
use serde_json::json;

use crate::output::Output;
use crate::swarm::{self, Progress, SwarmArgs, maddrs, node_with, publish_status};

/// The demo's training text: eight public-domain plays (provenance in `assets/corpus/README.md`).
pub(crate) const CORPUS: &str = include_str!("../../../assets/corpus/shakespeare-plays.txt");

#[derive(Debug, Args)]
pub struct DemoArgs {
    #[command(flatten)]
    swarm: SwarmArgs,
    /// Training steps.
    #[arg(long, default_value_t = 600)]
    steps: u64,
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
    if args.swarm.volunteers == 0 || args.steps == 0 || args.swarm.layers == 0 {
        bail!("--volunteers, --steps and --layers must be positive");
    }
    if args.swarm.grid.is_empty() || args.swarm.grid.contains(&0) {
        bail!("--grid: every size must be positive");
    }
    let corpus = Corpus::new(CORPUS, 0.1)?;
    let t0 = Instant::now();

    // the experiment and the swarm
    let (key, experiment) = args.swarm.experiment()?;
    let manifest = experiment.manifest.clone();
    // the bootstrap node refuses catalog writes their owner did not sign, as every Apiary DHT node does
    let (boot_p2p, boot_dht) = node_with(&[], false, validator(None)?).await?;
    let boot = maddrs(&boot_p2p).await;
    let mut volunteers = swarm::volunteers(&boot, args.swarm.volunteers, &manifest).await?;
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
        args.swarm.volunteers,
        args.swarm.layers,
        args.swarm.grid,
        args.swarm.hidden_dim,
        corpus.train.len(),
        boot_strings.join(" ")
    ));

    // the trainer, which also publishes the experiment and its status (signed with the demo's key)
    let (t_p2p, t_dht) = node_with(&boot, true, validator(Some(key))?).await?;
    let publication = Arc::new(
        Publication::start(
            t_dht.clone(),
            &experiment,
            swarm::unix_now(),
            swarm::UPDATE_PERIOD,
            swarm::EXPIRATION,
        )
        .await
        .context("publishing the demo experiment")?,
    );
    out.say(&format!(
        "published experiment `{}` (publisher key {}); from another terminal:\n  \
         apiary experiments list --initial-peers {}",
        manifest.id,
        apiary_catalog::fingerprint(&manifest.publisher_key()?),
        boot_strings.first().map_or("", String::as_str),
    ));
    out.event(json!({
        "event": "published",
        "experiment": manifest.id,
        "fingerprint": apiary_catalog::fingerprint(&manifest.publisher_key()?),
        "bootstrap": boot_strings,
    }));
    let (progress_tx, progress_rx) = tokio::sync::watch::channel(Progress::default());
    let status_task = tokio::spawn(publish_status(
        publication.clone(),
        t_dht.clone(),
        manifest.clone(),
        progress_rx,
        swarm::UPDATE_PERIOD / 2,
    ));
    let transport = Arc::new(P2pTransport::new(
        t_p2p.clone(),
        TransportConfig {
            info_timeout: Duration::from_secs(5),
            forward_timeout: Duration::from_secs(10),
            backward_timeout: Duration::from_secs(10),
        },
    ));
    let trainer = args.swarm.trainer(&t_dht, transport, corpus.clone())?;

    let stop = Arc::new(AtomicBool::new(false));
    let (tx, mut rx) = tokio::sync::mpsc::channel(64);
    let steps = args.steps;
    let sample_chars = args.sample_chars;
    let seed = args.swarm.seed;
    let worker_stop = stop.clone();
    let worker = tokio::task::spawn_blocking(move || {
        let result = train(trainer, steps, sample_chars, seed, &worker_stop, &tx);
        let _ = tx.blocking_send(Event::Done(Box::new(result)));
    });

    let bar = out.progress(steps);
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
                let _ = progress_tx.send(Progress {
                    step: r.step,
                    loss: Some(f64::from(r.loss)),
                    samples_per_s: rate,
                });
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
        let mut plain = Trainer::new(
            args.swarm.lm_config(corpus.vocab.len()),
            Vec::new(),
            corpus.clone(),
            args.swarm.trainer_config(),
        )?;
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
    let contributions: Vec<serde_json::Value> = volunteers.iter().map(|v| v.contribution()).collect();
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
    status_task.abort();
    let _ = status_task.await;
    if let Ok(publication) = Arc::try_unwrap(publication) {
        publication.withdraw().await;
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
        let report = match trainer.step() {
            Ok(r) => r,
            // every expert a sample chose was unreachable (volunteers left at once, their declarations
            // not expired yet): the swarm heals within an update period, so the demo waits and goes on
            Err(apiary_moe::MoeError::TooFewExperts(why) | apiary_moe::MoeError::NoExperts(why)) => {
                tracing::warn!("step skipped, the experts did not answer: {why}");
                std::thread::sleep(std::time::Duration::from_millis(500));
                continue;
            }
            Err(e) => return Err(e.into()),
        };
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
    fn the_curve_averages_windows() {
        let c = curve(&[4.0, 2.0, 3.0, 1.0], 2);
        assert_eq!(c, vec![(2, 3.0), (4, 2.0)]);
    }
}
