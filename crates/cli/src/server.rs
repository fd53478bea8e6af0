//! `apiary server`: hosts experts that real hivemind trainers call (like `hivemind-server`).

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use apiary_dht::DhtHandle;
use apiary_expert::checkpoints::{load_or_init, save_all};
use apiary_expert::runtime::{Runtime, RuntimeConfig, RuntimeHandle};
use apiary_expert::schema::ExpertSchema;
use apiary_expert::server::{Declarer, ExpertServer};
use apiary_expert::{BackendConfig, ExpertConfig, ExpertKind, OptimizerConfig, ScheduleConfig};
use apiary_wire::msgpack::Value;
use apiary_wire::proto::runtime::CompressionType;
use candle_core::Device;
use clap::Args;
use serde_json::json;

use crate::dht::{NodeArgs, start, visible_maddrs};
use crate::output::Output;

/// `hivemind-server`'s options, in kebab-case.
#[derive(Debug, Args)]
pub struct ServerArgs {
    /// A pattern of uids to sample `--num-experts` from, e.g. `ffn.[0:4].[0:8]`.
    #[arg(long)]
    expert_pattern: Option<String>,
    /// Exact expert uids to host (instead of a pattern).
    #[arg(long, num_args = 1..)]
    expert_uids: Vec<String>,
    /// How many experts to sample from --expert-pattern.
    #[arg(long)]
    num_experts: Option<usize>,
    /// The expert class: ffn, transformer, nop or det_dropout.
    #[arg(long, default_value = "ffn")]
    expert_cls: String,
    /// The experts' hidden size.
    #[arg(long, default_value_t = 1024)]
    hidden_dim: usize,
    /// Largest batch (rows) one compute step takes; larger requests are refused.
    #[arg(long, default_value_t = 16384)]
    max_batch_size: usize,
    /// Smallest batch a pool waits for (up to a short timeout).
    #[arg(long, default_value_t = 1)]
    min_batch_size: usize,
    /// adam, adamw, sgd or none (no training).
    #[arg(long, default_value = "adam")]
    optimizer: String,
    /// Learning rate of the optimizer.
    #[arg(long)]
    lr: Option<f64>,
    /// none or linear (warmup, then linear decay).
    #[arg(long, default_value = "none")]
    scheduler: String,
    /// Warmup steps of --scheduler linear.
    #[arg(long, default_value_t = 0)]
    num_warmup_steps: u64,
    /// Total steps of --scheduler linear.
    #[arg(long, default_value_t = 1)]
    num_training_steps: u64,
    /// Clip each step's global gradient norm to this.
    #[arg(long)]
    clip_grad_norm: Option<f64>,
    /// Wire compression of inputs and gradients: NONE, FLOAT16, MEANSTD_16BIT, QUANTILE_8BIT,
    /// UNIFORM_8BIT, BLOCKWISE_8BIT.
    #[arg(long, default_value = "NONE")]
    compression: String,
    /// Save each expert here (`<dir>/<uid>/checkpoint.safetensors` and its optimizer state) every
    /// --update-period and on exit;
    /// load from it on start.
    #[arg(long)]
    checkpoint_dir: Option<PathBuf>,
    /// Seconds between DHT declarations (and checkpoints).
    #[arg(long, default_value_t = 30.0)]
    update_period: f64,
    /// Seconds declarations live (default max(2 × update period, 3)).
    #[arg(long)]
    expiration: Option<f64>,
    /// Log each expert's throughput every this many seconds (hivemind's `stats_report_interval`).
    #[arg(long)]
    stats_report_interval: Option<f64>,
    /// Where the experts compute: `cpu`, or `cuda` / `cuda:N` in a build with the `cuda` feature.
    #[arg(long, default_value = "cpu")]
    device: String,
    #[command(flatten)]
    node: NodeArgs,
}

pub async fn run(args: ServerArgs, out: &Output) -> Result<()> {
    let device = parse_device(&args.device)?;
    let kind: ExpertKind = args.expert_cls.parse().context("--expert-cls")?;
    let compression = compression_type(&args.compression)?;
    let backend = backend_config(&args)?;
    if args.update_period <= 0.0 {
        bail!("--update-period must be positive");
    }
    let expiration = args.expiration.unwrap_or((2.0 * args.update_period).max(3.0));

    let (p2p, dht) = start(&args.node, args.node.client_mode).await?;
    let uids = choose_uids(&args, &dht).await?;
    let mut backends = Vec::new();
    let mut schemas = HashMap::new();
    for uid in &uids {
        let config = ExpertConfig::new(kind, args.hidden_dim);
        backends.push((
            uid.clone(),
            load_or_init(config, backend, uid, args.checkpoint_dir.as_deref(), seed())?
                .to_device(&device)
                .with_context(|| format!("moving {uid} to {}", args.device))?,
        ));
        schemas.insert(
            uid.clone(),
            ExpertSchema::server_create(kind, args.hidden_dim, compression, args.max_batch_size),
        );
    }
    let runtime_config = RuntimeConfig {
        max_batch_size: args.max_batch_size,
        min_batch_size: args.min_batch_size,
        max_queued_rows: args.max_batch_size.saturating_mul(4),
        ..RuntimeConfig::default()
    };
    let runtime = Runtime::spawn(backends, runtime_config).context("starting the compute runtime")?;
    let server = ExpertServer::new(runtime.clone(), schemas);
    server.register(&p2p).context("registering the expert RPCs")?;
    let period = Duration::from_secs_f64(args.update_period);
    let (declarer, stored) = Declarer::start(
        dht.clone(),
        uids.clone(),
        period,
        Duration::from_secs_f64(expiration),
    )
    .await;
    tracing::info!(experts = uids.len(), stored, "experts declared");

    let maddrs = visible_maddrs(&p2p, &args.node).await;
    tracing::info!(peer_id = %p2p.local_peer_id(), experts = ?uids, "expert server running; Ctrl-C to stop");
    out.ready(
        &p2p.local_peer_id().to_string(),
        &maddrs,
        json!({ "experts": uids }),
    );

    let checkpoints = args.checkpoint_dir.clone().map(|dir| {
        let runtime = runtime.clone();
        let uids = uids.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(period).await;
                save_all(&runtime, &uids, &dir).await;
            }
        })
    });
    let reports = args
        .stats_report_interval
        .filter(|s| *s > 0.0)
        .map(|secs| tokio::spawn(report_stats(runtime.clone(), Duration::from_secs_f64(secs))));
    crate::shutdown_signal().await;
    if let Some(task) = reports {
        task.abort();
    }
    tracing::info!("shutting down: withdrawing declarations");
    declarer.withdraw().await;
    ExpertServer::unregister(&p2p);
    if let Some(task) = checkpoints {
        task.abort();
    }
    if let Some(dir) = &args.checkpoint_dir {
        save_all(&runtime, &uids, dir).await;
    }
    runtime.shutdown().await;
    dht.shutdown().await;
    p2p.shutdown().await;
    Ok(())
}

fn compression_type(name: &str) -> Result<CompressionType> {
    CompressionType::from_str_name(&name.to_ascii_uppercase())
        .with_context(|| format!("--compression {name}: unknown (NONE, FLOAT16, MEANSTD_16BIT, QUANTILE_8BIT, UNIFORM_8BIT, BLOCKWISE_8BIT)"))
}

fn backend_config(args: &ServerArgs) -> Result<BackendConfig> {
    let mut optimizer = match args.optimizer.as_str() {
        "adam" => OptimizerConfig::adam(),
        "adamw" => OptimizerConfig::adamw(),
        "sgd" => OptimizerConfig::sgd(),
        "none" => OptimizerConfig::Sgd {
            lr: 0.0,
            momentum: 0.0,
            dampening: 0.0,
            weight_decay: 0.0,
            nesterov: false,
        },
        other => bail!("--optimizer {other}: expected adam, adamw, sgd or none"),
    };
    if let Some(new) = args.lr {
        match &mut optimizer {
            OptimizerConfig::Adam { lr, .. }
            | OptimizerConfig::AdamW { lr, .. }
            | OptimizerConfig::Sgd { lr, .. } => *lr = new,
        }
    }
    let schedule = match args.scheduler.as_str() {
        "none" => ScheduleConfig::None,
        "linear" => ScheduleConfig::Linear {
            warmup_steps: args.num_warmup_steps,
            training_steps: args.num_training_steps,
        },
        other => bail!("--scheduler {other}: expected none or linear"),
    };
    Ok(BackendConfig {
        optimizer,
        schedule,
        clip_grad_norm: args.clip_grad_norm,
    })
}

/// Logs, every `period`, each expert's batches and rows since the last report and the share of the time
/// the runtime spent computing it.
async fn report_stats(runtime: RuntimeHandle, period: Duration) {
    let mut last = runtime.stats();
    loop {
        tokio::time::sleep(period).await;
        let now = runtime.stats();
        for (e, before) in now.experts.iter().zip(&last.experts) {
            let busy = e.busy.saturating_sub(before.busy).as_secs_f64() / period.as_secs_f64();
            tracing::info!(
                uid = %e.uid,
                forward_rows = e.forward_rows - before.forward_rows,
                backward_rows = e.backward_rows - before.backward_rows,
                failed_batches = e.failed_batches - before.failed_batches,
                steps = e.optimizer_steps,
                busy_percent = format!("{:.0}", 100.0 * busy),
                "expert stats"
            );
        }
        tracing::info!(queued_rows = now.queued_rows, gate = ?now.gate, "runtime stats");
        last = now;
    }
}

/// The uids to host: `--expert-uids`, or `--num-experts` sampled from `--expert-pattern` avoiding uids
/// the DHT already knows (hivemind's `_generate_uids`).
async fn choose_uids(args: &ServerArgs, dht: &DhtHandle) -> Result<Vec<String>> {
    if !args.expert_uids.is_empty() {
        for uid in &args.expert_uids {
            if !is_valid_uid(uid) {
                bail!("--expert-uids: `{uid}` is not a valid expert uid (like ffn.3.7)");
            }
        }
        return Ok(args.expert_uids.clone());
    }
    let (Some(pattern), Some(n)) = (&args.expert_pattern, args.num_experts) else {
        bail!("give --expert-uids, or --expert-pattern with --num-experts");
    };
    let grid = Pattern::parse(pattern)?;
    if n > grid.size() {
        bail!(
            "--num-experts {n}: the pattern {pattern} has only {} uids",
            grid.size()
        );
    }
    let mut rng = seed();
    let mut chosen: Vec<String> = Vec::new();
    let mut seen: HashSet<String> = HashSet::new();
    for _attempt in 0..32 {
        let mut batch = Vec::new();
        while chosen.len() + batch.len() < n && seen.len() < grid.size() {
            let uid = grid.sample(&mut rng);
            if seen.insert(uid.clone()) {
                batch.push(uid);
            }
        }
        if batch.is_empty() {
            break;
        }
        let found = dht
            .get_many(batch.iter().map(|u| Value::str(u.as_str())).collect(), false)
            .await
            .context("checking the DHT for taken uids")?;
        chosen.extend(
            batch
                .into_iter()
                .zip(found)
                .filter(|(_, f)| f.is_none())
                .map(|(u, _)| u),
        );
        if chosen.len() == n {
            break;
        }
    }
    if chosen.len() < n {
        bail!("only {} free uids found in {pattern}", chosen.len());
    }
    chosen.sort();
    Ok(chosen)
}

fn is_valid_uid(uid: &str) -> bool {
    let mut parts = uid.split('.');
    let head_ok = parts.next().is_some_and(|h| !h.is_empty());
    let mut coords = 0;
    for p in parts {
        let ok = p == "0" || (!p.is_empty() && !p.starts_with('0') && p.bytes().all(|b| b.is_ascii_digit()));
        if !ok {
            return false;
        }
        coords += 1;
    }
    head_ok && coords > 0
}

/// `prefix.[a:b].[c:d]…`
#[derive(Debug)]
struct Pattern {
    prefix: String,
    ranges: Vec<(u64, u64)>,
}

impl Pattern {
    fn parse(pattern: &str) -> Result<Self> {
        let bad = || anyhow::anyhow!("--expert-pattern {pattern}: expected like ffn.[0:4].[0:8]");
        let mut parts = pattern.split('.');
        let prefix = parts.next().filter(|p| !p.is_empty()).ok_or_else(bad)?.to_owned();
        let mut ranges = Vec::new();
        for p in parts {
            let range = if let Some(inner) = p.strip_prefix('[').and_then(|r| r.strip_suffix(']')) {
                let (a, b) = inner.split_once(':').ok_or_else(bad)?;
                let (a, b): (u64, u64) = (a.parse().map_err(|_| bad())?, b.parse().map_err(|_| bad())?);
                if a >= b {
                    return Err(bad());
                }
                (a, b)
            } else {
                let v: u64 = p.parse().map_err(|_| bad())?;
                (v, v + 1)
            };
            ranges.push(range);
        }
        if ranges.is_empty() {
            return Err(bad());
        }
        Ok(Self { prefix, ranges })
    }

    fn size(&self) -> usize {
        self.ranges
            .iter()
            .map(|(a, b)| (b - a) as usize)
            .fold(1usize, |acc, n| acc.saturating_mul(n))
    }

    fn sample(&self, rng: &mut u64) -> String {
        let mut uid = self.prefix.clone();
        for (a, b) in &self.ranges {
            *rng ^= *rng << 13;
            *rng ^= *rng >> 7;
            *rng ^= *rng << 17;
            uid.push_str(&format!(".{}", a + *rng % (b - a)));
        }
        uid
    }
}

fn seed() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0x9e37_79b9, |d| d.as_nanos() as u64)
        | 1
}

/// `cpu`, `cuda` or `cuda:N` as a candle device (`cuda` needs a build with the `cuda` feature and a GPU).
fn parse_device(name: &str) -> Result<Device> {
    let ordinal = match name {
        "cpu" => return Ok(Device::Cpu),
        "cuda" => 0,
        other => match other.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(n)) => n,
            _ => bail!("--device {other}: expected cpu, cuda or cuda:N"),
        },
    };
    if !candle_core::utils::cuda_is_available() {
        bail!(
            "--device {name}: this apiary was built without CUDA support; build it with \
             `cargo build --release -p apiary-cli --features cuda` (needs the CUDA toolkit)"
        );
    }
    Device::new_cuda(ordinal).with_context(|| format!("--device {name}: opening the GPU"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use apiary_expert::{CHECKPOINT_FILE, Expert};

    #[test]
    fn checkpoints_load_and_a_corrupted_one_is_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let config = ExpertConfig::new(ExpertKind::Ffn, 8);
        let saved = Expert::new(config, 3).unwrap();
        let path = dir.path().join("ffn.0.0").join(CHECKPOINT_FILE);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        saved.save(&path).unwrap();
        let loaded = load_or_init(config, BackendConfig::default(), "ffn.0.0", Some(dir.path()), 1).unwrap();
        let loaded = loaded.expert();
        let weights = |e: &Expert| -> Vec<Vec<f32>> {
            e.state_dict()
                .iter()
                .map(|(_, t)| t.flatten_all().unwrap().to_vec1::<f32>().unwrap())
                .collect()
        };
        assert_eq!(weights(loaded), weights(&saved));
        std::fs::write(&path, b"not safetensors").unwrap();
        let fresh = load_or_init(config, BackendConfig::default(), "ffn.0.0", Some(dir.path()), 1).unwrap();
        assert_ne!(weights(fresh.expert()), weights(&saved));
    }

    #[test]
    fn patterns_and_uids() {
        let p = Pattern::parse("ffn.[0:4].[0:8]").unwrap();
        assert_eq!(p.size(), 32);
        let mut rng = 12345;
        for _ in 0..100 {
            let uid = p.sample(&mut rng);
            assert!(is_valid_uid(&uid), "{uid}");
            let coords: Vec<u64> = uid.split('.').skip(1).map(|c| c.parse().unwrap()).collect();
            assert!(coords[0] < 4 && coords[1] < 8);
        }
        assert_eq!(Pattern::parse("expert.5").unwrap().size(), 1);
        for bad in ["ffn", ".[0:4]", "ffn.[4:4]", "ffn.[a:b]", "ffn.[0:4"] {
            assert!(Pattern::parse(bad).is_err(), "{bad}");
        }
        for (uid, ok) in [
            ("ffn.0", true),
            ("ffn.3.17", true),
            ("ffn", false),
            ("ffn.01", false),
            ("ffn.-1", false),
            ("ffn.", false),
        ] {
            assert_eq!(is_valid_uid(uid), ok, "{uid}");
        }
    }
}
