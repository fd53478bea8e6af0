//! `apiary bench dht`: the measure of hivemind's `benchmarks/benchmark_dht.py`, on Apiary DHT nodes that
//! all run in this one process (each with its own libp2p host on loopback).
//!
//! 1. Create `--num-peers` nodes one by one, each bootstrapped from up to `--initial-peers` random earlier
//!    nodes (timed: `create_s`).
//! 2. Pick `--failure-rate` of the nodes to shut down during the run, at random ticks of the schedule.
//! 3. `--num-threads` concurrent workers each run `--total-num-rounds` rounds on the surviving nodes: a
//!    fresh key; `--num-store-peers` random nodes each store one random sub-key of it concurrently (one
//!    store round, timed); then `--num-get-peers` random nodes get it with `latest` (one get round). A get
//!    succeeds when it returns exactly the sub-keys whose store succeeded, with their values.
//!
//! `tests/interop/bench_dht.py` does the same through hivemind's public API.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use apiary_dht::{Dht, DhtConfig, DhtHandle, Found};
use apiary_p2p::{Host, Multiaddr, P2pConfig, P2pHandle};
use apiary_wire::msgpack::Value;
use clap::{Args, Subcommand};
use serde_json::json;
use tokio::sync::Mutex;

use crate::output::Output;

#[derive(Debug, Args)]
pub struct BenchArgs {
    #[command(subcommand)]
    what: BenchCommand,
}

#[derive(Debug, Subcommand)]
enum BenchCommand {
    /// DHT store/get rounds among many nodes with churn (hivemind's benchmark_dht.py).
    Dht(DhtBench),
    /// Expert server throughput: Apiary clients against an Apiary server (hivemind's
    /// benchmark_throughput.py). To aim hivemind clients at an Apiary server, run
    /// `apiary server --expert-uids expert.0 … --hidden-dim H --max-batch-size 4096` and
    /// `tests/interop/bench_server.py --initial-peers <its maddr>`.
    Server(server_bench::ServerBench),
    /// Trainer throughput (steps/s, samples/s) of the demo's model against local volunteers, optionally
    /// with injected latency (`tests/interop/bench_moe.py` is hivemind's side; `cargo xtask bench moe`
    /// runs both, also with latency on every loopback packet).
    Moe(crate::bench_moe::MoeBench),
}

/// Parameters of hivemind's `benchmark_dht.py` (its names, in kebab-case; underscores work too).
#[derive(Debug, Args, Clone)]
pub struct DhtBench {
    #[arg(long, alias = "num_peers", default_value_t = 16)]
    num_peers: usize,
    #[arg(long, alias = "initial_peers", default_value_t = 4)]
    initial_peers: usize,
    #[arg(long, alias = "random_seed", default_value_t = 30)]
    random_seed: u64,
    #[arg(long, alias = "num_threads", default_value_t = 10)]
    num_threads: usize,
    #[arg(long, alias = "total_num_rounds", default_value_t = 16)]
    total_num_rounds: usize,
    #[arg(long, alias = "num_store_peers", default_value_t = 8)]
    num_store_peers: usize,
    #[arg(long, alias = "num_get_peers", default_value_t = 8)]
    num_get_peers: usize,
    /// Seconds each RPC may take.
    #[arg(long, alias = "wait_timeout", default_value_t = 5.0)]
    wait_timeout: f64,
    /// Seconds stored values live.
    #[arg(long, default_value_t = 300.0)]
    expiration: f64,
    #[arg(long, alias = "failure_rate", default_value_t = 0.1)]
    failure_rate: f64,
}

pub async fn run(args: BenchArgs, out: &Output) -> Result<()> {
    match args.what {
        BenchCommand::Dht(params) => dht(params, out).await,
        BenchCommand::Server(params) => server_bench::run(params, out).await,
        BenchCommand::Moe(params) => crate::bench_moe::run(params, out).await,
    }
}

struct Node {
    p2p: P2pHandle,
    dht: DhtHandle,
    maddr: Multiaddr,
}

async fn dht(p: DhtBench, out: &Output) -> Result<()> {
    if p.num_peers < 2 {
        bail!("--num-peers must be at least 2");
    }
    let mut rng = SplitMix(p.random_seed);
    let mut config = DhtConfig::default();
    config.wait_timeout = Duration::from_secs_f64(p.wait_timeout);

    let started = Instant::now();
    let mut nodes: Vec<Node> = Vec::with_capacity(p.num_peers);
    for i in 0..p.num_peers {
        let bootstrap: Vec<Multiaddr> = rng
            .sample(nodes.len(), p.initial_peers.min(nodes.len()))
            .into_iter()
            .map(|j| nodes[j].maddr.clone())
            .collect();
        let p2p_config = P2pConfig {
            listen_addrs: vec!["/ip4/127.0.0.1/tcp/0".parse()?],
            quic: false,
            ..P2pConfig::default()
        };
        let (p2p, _task) = Host::spawn(p2p_config).context("starting a libp2p host")?;
        let mut addrs = p2p.listen_addrs();
        tokio::time::timeout(Duration::from_secs(10), addrs.wait_for(|a| !a.is_empty()))
            .await
            .context("a host did not start listening")??;
        let maddr: Multiaddr = format!("{}/p2p/{}", addrs.borrow()[0], p2p.local_peer_id()).parse()?;
        let dht = Dht::spawn(p2p.clone(), config.clone(), bootstrap)
            .await
            .with_context(|| format!("node {i} could not join the DHT"))?;
        nodes.push(Node { p2p, dht, maddr });
    }
    let create_s = started.elapsed().as_secs_f64();
    let rss_mb = memory_mb();
    tracing::info!(peers = p.num_peers, create_s, rss_mb, "peers created");

    let doomed_count = ((p.failure_rate * p.num_peers as f64) as usize).min(p.num_peers - 1);
    let doomed_idx = rng.sample(p.num_peers, doomed_count);
    let alive: Vec<DhtHandle> = (0..p.num_peers)
        .filter(|i| !doomed_idx.contains(i))
        .map(|i| nodes[i].dht.clone())
        .collect();
    let doomed: Vec<(P2pHandle, DhtHandle)> = doomed_idx
        .iter()
        .map(|&i| (nodes[i].p2p.clone(), nodes[i].dht.clone()))
        .collect();
    let total_ticks = p.num_threads * p.total_num_rounds;
    let ticks = rng.sample(total_ticks, doomed.len().min(total_ticks));
    let killer = Arc::new(Mutex::new(Killer {
        doomed,
        ticks,
        tick: 0,
        rng: SplitMix(p.random_seed ^ 0x5eed),
    }));

    let mut workers = Vec::new();
    for w in 0..p.num_threads {
        let (alive, killer, p) = (alive.clone(), killer.clone(), p.clone());
        let seed = p.random_seed.wrapping_add(1 + w as u64);
        workers.push(tokio::spawn(async move { worker(alive, killer, p, seed).await }));
    }
    let mut totals = Totals::default();
    for w in workers {
        totals.add(w.await.context("a benchmark worker panicked")?);
    }

    let result = json!({
        "peers": p.num_peers,
        "create_s": create_s,
        "store_round_mean_s": mean(&totals.store_times),
        "get_round_mean_s": mean(&totals.get_times),
        "store_success": totals.stores_ok as f64 / totals.stores.max(1) as f64,
        "get_success": totals.gets_ok as f64 / totals.gets.max(1) as f64,
        "rss_mb": rss_mb,
        "rss_mb_per_peer": rss_mb / p.num_peers as f64,
        "stores": totals.stores,
        "gets": totals.gets,
    });
    for node in &nodes {
        node.dht.shutdown().await;
        node.p2p.shutdown().await;
    }
    out.result(result);
    Ok(())
}

struct Killer {
    doomed: Vec<(P2pHandle, DhtHandle)>,
    ticks: Vec<usize>,
    tick: usize,
    rng: SplitMix,
}

#[derive(Default)]
struct Totals {
    store_times: Vec<f64>,
    get_times: Vec<f64>,
    stores_ok: usize,
    gets_ok: usize,
    stores: usize,
    gets: usize,
}

impl Totals {
    fn add(&mut self, o: Totals) {
        self.store_times.extend(o.store_times);
        self.get_times.extend(o.get_times);
        self.stores_ok += o.stores_ok;
        self.gets_ok += o.gets_ok;
        self.stores += o.stores;
        self.gets += o.gets;
    }
}

async fn worker(alive: Vec<DhtHandle>, killer: Arc<Mutex<Killer>>, p: DhtBench, seed: u64) -> Totals {
    let mut rng = SplitMix(seed);
    let mut t = Totals::default();
    for _ in 0..p.total_num_rounds {
        let key = Value::Str(rng.hex());
        let store_peers = rng.sample(alive.len(), p.num_store_peers.min(alive.len()));
        let values: Vec<(String, String)> = store_peers.iter().map(|_| (rng.hex(), rng.hex())).collect();
        let started = Instant::now();
        let expiration = now() + p.expiration;
        let stores = store_peers.iter().zip(&values).map(|(&i, (subkey, value))| {
            let (dht, key) = (alive[i].clone(), key.clone());
            let (subkey, value) = (Value::Str(subkey.clone()), Value::Str(value.clone()));
            async move {
                dht.store(key, value, expiration, Some(subkey))
                    .await
                    .unwrap_or(false)
            }
        });
        let results = futures_join_all(stores).await;
        {
            let mut k = killer.lock().await;
            if k.ticks.contains(&k.tick) && !k.doomed.is_empty() {
                let n = k.doomed.len();
                let victim = k.rng.below(n);
                let (p2p, dht) = k.doomed.swap_remove(victim);
                dht.shutdown().await;
                p2p.shutdown().await;
            }
            k.tick += 1;
        }
        t.store_times.push(started.elapsed().as_secs_f64());
        let stored: Vec<&(String, String)> = values
            .iter()
            .zip(&results)
            .filter(|(_, ok)| **ok)
            .map(|(v, _)| v)
            .collect();
        t.stores += results.len();
        t.stores_ok += stored.len();

        let get_peers = rng.sample(alive.len(), p.num_get_peers.min(alive.len()));
        let started = Instant::now();
        let gets = get_peers.iter().map(|&i| {
            let (dht, key) = (alive[i].clone(), key.clone());
            async move { dht.get(key, true).await.ok().flatten() }
        });
        let found = futures_join_all(gets).await;
        t.get_times.push(started.elapsed().as_secs_f64());
        t.gets += found.len();
        t.gets_ok += found.iter().filter(|f| complete(f.as_ref(), &stored)).count();
    }
    t
}

/// Whether a get returned exactly the stored sub-keys with their values.
fn complete(found: Option<&Found>, stored: &[&(String, String)]) -> bool {
    let Some(Found::Dictionary { entries, .. }) = found else {
        return false;
    };
    entries.len() == stored.len()
        && stored.iter().all(|(subkey, value)| {
            entries
                .iter()
                .any(|(s, v, _)| s.as_str() == Some(subkey) && v.as_str() == Some(value))
        })
}

/// Runs the futures as concurrent tasks and collects their outputs (a panicked task is left out).
async fn futures_join_all<F>(futures: impl Iterator<Item = F>) -> Vec<F::Output>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    let handles: Vec<_> = futures.map(tokio::spawn).collect();
    let mut out = Vec::with_capacity(handles.len());
    for h in handles {
        if let Ok(v) = h.await {
            out.push(v);
        }
    }
    out
}

fn mean(xs: &[f64]) -> f64 {
    if xs.is_empty() {
        0.0
    } else {
        xs.iter().sum::<f64>() / xs.len() as f64
    }
}

fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// This process's proportional resident memory (PSS, as the hivemind script measures), in MiB.
pub(crate) fn memory_mb() -> f64 {
    let read = |file: &str, field: &str| -> Option<f64> {
        let text = std::fs::read_to_string(file).ok()?;
        let line = text.lines().find(|l| l.starts_with(field))?;
        line.split_whitespace()
            .nth(1)?
            .parse::<f64>()
            .ok()
            .map(|kb| kb / 1024.0)
    };
    read("/proc/self/smaps_rollup", "Pss:")
        .or_else(|| read("/proc/self/status", "VmRSS:"))
        .unwrap_or(0.0)
}

/// splitmix64: seeded choices without a dependency.
pub(crate) struct SplitMix(pub(crate) u64);

impl SplitMix {
    pub(crate) fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    pub(crate) fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }

    /// `k` distinct indices of `0..n`.
    fn sample(&mut self, n: usize, k: usize) -> Vec<usize> {
        let mut all: Vec<usize> = (0..n).collect();
        for i in 0..k.min(n) {
            let j = i + self.below(n - i);
            all.swap(i, j);
        }
        all.truncate(k.min(n));
        all
    }

    fn hex(&mut self) -> String {
        format!("{:016x}{:016x}", self.next(), self.next())
    }
}

/// `apiary bench server`: the measure of hivemind's `benchmarks/benchmark_throughput.py`, Apiary clients
/// against an Apiary expert server, all in this process (each client its own libp2p host on loopback).
///
/// 1. Start the server: a host, a batching [`Runtime`] over `--experts` `ffn` experts `expert.0` …
///    (`--hidden`, max batch 4096) and the [`ExpertServer`] RPCs. Its memory (PSS) is taken now, idle.
/// 2. `--clients` client hosts, each a tokio task, call a random expert `--batches` times with a
///    (`--batch`, `--hidden`) input: `rpc_forward`, then (unless `--forward-only`) `rpc_backward` with a
///    random output gradient; unary below 2 MiB of payload, the `*_stream` RPCs above (as hivemind's
///    `RemoteExpert`). Timed from the start of all clients to the last one's finish.
/// 3. The same work on one [`ExpertBackend`] in-process (no network): `local_samples_per_s`.
/// 4. Median of 20 batch-1 forward round trips.
mod server_bench {
    use std::collections::HashMap;
    use std::num::NonZeroUsize;
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use anyhow::{Context, Result, bail};
    use apiary_expert::runtime::{Runtime, RuntimeConfig};
    use apiary_expert::schema::{ExpertSchema, to_candle};
    use apiary_expert::server::{
        ExpertServer, RPC_BACKWARD, RPC_BACKWARD_STREAM, RPC_FORWARD, RPC_FORWARD_STREAM, STREAM_CHUNK,
    };
    use apiary_expert::{BackendConfig, Expert, ExpertBackend, ExpertConfig, ExpertKind};
    use apiary_p2p::{Host, Multiaddr, P2pConfig, P2pHandle, PeerId};
    use apiary_wire::proto::runtime::{CompressionType, ExpertRequest, ExpertResponse};
    use apiary_wire::tensor::{self, Limits, StreamCombiner, Tensor};
    use bytes::Bytes;
    use clap::Args;
    use futures::StreamExt;
    use prost::Message;
    use serde_json::json;

    use super::{SplitMix, memory_mb};
    use crate::output::Output;

    const CALL_TIMEOUT: Duration = Duration::from_secs(600);
    /// hivemind's client streams a request whose payload exceeds this (`MAX_UNARY_PAYLOAD_SIZE`).
    const MAX_UNARY_PAYLOAD: usize = 2 * 1024 * 1024;
    const MAX_BATCH: usize = 4096;

    /// benchmark_throughput.py's knobs.
    #[derive(Debug, Args, Clone)]
    pub struct ServerBench {
        #[arg(long, default_value_t = 4)]
        experts: usize,
        #[arg(long, default_value_t = 4)]
        clients: usize,
        /// Batches each client sends.
        #[arg(long, default_value_t = 8)]
        batches: usize,
        /// Rows per batch.
        #[arg(long, default_value_t = 256)]
        batch: usize,
        #[arg(long, default_value_t = 1024)]
        hidden: usize,
        /// Forward passes only (no rpc_backward, no optimizer steps).
        #[arg(long)]
        forward_only: bool,
        /// Batch-1 forward round trips to take the median of.
        #[arg(long, default_value_t = 20)]
        latency_calls: usize,
        #[arg(long, default_value_t = 0)]
        seed: u64,
    }

    async fn host() -> Result<(P2pHandle, Multiaddr)> {
        let config = P2pConfig {
            listen_addrs: vec![],
            quic: false,
            ..P2pConfig::default()
        };
        let (p2p, _task) = Host::spawn(config).context("starting a libp2p host")?;
        let addr = p2p
            .listen("/ip4/127.0.0.1/tcp/0".parse()?)
            .await
            .context("listening on loopback")?;
        let full = addr
            .with_p2p(p2p.local_peer_id())
            .map_err(|a| anyhow::anyhow!("cannot add /p2p to {a}"))?;
        Ok((p2p, full))
    }

    fn random(rng: &mut SplitMix, rows: usize, hidden: usize) -> Result<Tensor> {
        // uniform in [-1.7, 1.7): unit variance, as randn's
        let values: Vec<f32> = (0..rows * hidden)
            .map(|_| ((rng.next() >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 3.46)
            .collect();
        Ok(Tensor::from_vec(vec![rows, hidden], values)?)
    }

    /// One expert RPC as hivemind's client makes it: unary for small payloads, streamed otherwise.
    async fn call(
        client: &P2pHandle,
        server: PeerId,
        uid: &str,
        tensors: &[&Tensor],
        backward: bool,
    ) -> Result<Tensor> {
        let wire = tensors
            .iter()
            .map(|t| tensor::serialize(t, CompressionType::None))
            .collect::<Result<Vec<_>, _>>()?;
        let payload: usize = wire.iter().map(|t| t.buffer.len()).sum();
        let limits = Limits::default();
        if payload <= MAX_UNARY_PAYLOAD {
            let request = ExpertRequest {
                uid: uid.into(),
                tensors: wire,
                ..Default::default()
            };
            let name = if backward { RPC_BACKWARD } else { RPC_FORWARD };
            let reply = client
                .call_unary(server, name, Bytes::from(request.encode_to_vec()), CALL_TIMEOUT)
                .await
                .with_context(|| format!("{name} on {uid}"))?;
            let response = ExpertResponse::decode(reply)?;
            let first = response.tensors.first().context("an empty response")?;
            return Ok(tensor::deserialize(first, &limits)?);
        }
        let chunk = NonZeroUsize::new(STREAM_CHUNK).context("chunk size")?;
        let mut messages = Vec::new();
        for t in &wire {
            for part in tensor::split_for_streaming(t, chunk)? {
                messages.push(Bytes::from(
                    ExpertRequest {
                        uid: uid.into(),
                        tensors: vec![part],
                        ..Default::default()
                    }
                    .encode_to_vec(),
                ));
            }
        }
        let name = if backward {
            RPC_BACKWARD_STREAM
        } else {
            RPC_FORWARD_STREAM
        };
        let mut replies = client
            .call_stream(
                server,
                name,
                futures::stream::iter(messages).boxed(),
                CALL_TIMEOUT,
            )
            .await
            .with_context(|| format!("{name} on {uid}"))?;
        let mut combiner = StreamCombiner::new(limits);
        let mut first = None;
        while let Some(reply) = replies.next().await {
            let response = ExpertResponse::decode(reply.with_context(|| format!("{name} on {uid}"))?)?;
            for part in response.tensors {
                if let Some(done) = combiner.push(part)? {
                    first.get_or_insert(done);
                }
            }
        }
        let first = first.context("an empty response")?;
        Ok(tensor::deserialize(&first, &limits)?)
    }

    pub async fn run(p: ServerBench, out: &Output) -> Result<()> {
        if p.experts == 0 || p.clients == 0 || p.batches == 0 || p.batch == 0 || p.hidden == 0 {
            bail!("--experts, --clients, --batches, --batch and --hidden must be positive");
        }
        if p.batch > MAX_BATCH {
            bail!("--batch must be at most {MAX_BATCH}");
        }
        let uids: Vec<String> = (0..p.experts).map(|i| format!("expert.{i}")).collect();
        let config = ExpertConfig::new(ExpertKind::Ffn, p.hidden);

        // 1. the server
        let mut backends = Vec::new();
        let mut schemas = HashMap::new();
        for (i, uid) in uids.iter().enumerate() {
            let expert = Expert::new(config, p.seed.wrapping_add(i as u64)).context("expert")?;
            backends.push((uid.clone(), ExpertBackend::new(expert, BackendConfig::default())?));
            schemas.insert(
                uid.clone(),
                ExpertSchema::server_create(ExpertKind::Ffn, p.hidden, CompressionType::None, MAX_BATCH),
            );
        }
        let runtime_config = RuntimeConfig {
            max_batch_size: MAX_BATCH,
            min_batch_size: 1,
            max_queued_rows: MAX_BATCH * 4,
            ..RuntimeConfig::default()
        };
        let runtime = Runtime::spawn(backends, runtime_config).context("starting the compute runtime")?;
        let (server_p2p, server_addr) = host().await?;
        ExpertServer::new(runtime.clone(), schemas)
            .register(&server_p2p)
            .context("registering the expert RPCs")?;
        let server = server_p2p.local_peer_id();
        tokio::time::sleep(Duration::from_millis(500)).await;
        let server_rss_mb = memory_mb();
        tracing::info!(experts = p.experts, server_rss_mb, "server up");

        // 2. the clients
        let mut clients = Vec::new();
        for c in 0..p.clients {
            let (client, _) = host().await?;
            client
                .dial(server_addr.clone())
                .await
                .context("dialing the server")?;
            let mut rng = SplitMix(p.seed ^ (0xC11E_0000 + c as u64));
            let x = Arc::new(random(&mut rng, p.batch, p.hidden)?);
            let g = Arc::new(random(&mut rng, p.batch, p.hidden)?);
            // warm up the connection (and the expert) before the clock starts
            call(
                &client,
                server,
                &uids[0],
                &[&random(&mut rng, 1, p.hidden)?],
                false,
            )
            .await?;
            clients.push((client, rng, x, g));
        }
        let started = Instant::now();
        let mut tasks = Vec::new();
        for (client, mut rng, x, g) in clients {
            let (uids, p2) = (uids.clone(), p.clone());
            tasks.push(tokio::spawn(async move {
                for _ in 0..p2.batches {
                    let uid = &uids[rng.below(uids.len())];
                    let out = call(&client, server, uid, &[&x], false).await?;
                    if out.shape() != x.shape() {
                        bail!("output shape {:?}", out.shape());
                    }
                    if !p2.forward_only {
                        let grad = call(&client, server, uid, &[&x, &g], true).await?;
                        if grad.shape() != x.shape() {
                            bail!("grad shape {:?}", grad.shape());
                        }
                    }
                }
                client.shutdown().await;
                Ok(())
            }));
        }
        for t in tasks {
            t.await.context("a client panicked")??;
        }
        let total_s = started.elapsed().as_secs_f64();
        let samples = p.clients * p.batches * p.batch;

        // 4. batch-1 forward latency
        let (client, _) = host().await?;
        client
            .dial(server_addr.clone())
            .await
            .context("dialing the server")?;
        let mut rng = SplitMix(p.seed ^ 0x1A7E);
        let x1 = random(&mut rng, 1, p.hidden)?;
        call(&client, server, &uids[0], &[&x1], false).await?;
        let mut times = Vec::with_capacity(p.latency_calls);
        for _ in 0..p.latency_calls.max(1) {
            let t = Instant::now();
            call(&client, server, &uids[0], &[&x1], false).await?;
            times.push(t.elapsed().as_secs_f64());
        }
        times.sort_by(f64::total_cmp);
        let batch1_forward_ms = times[times.len() / 2] * 1e3;
        client.shutdown().await;
        ExpertServer::unregister(&server_p2p);
        runtime.shutdown().await;
        server_p2p.shutdown().await;

        // 3. the same work in-process, on one backend
        let local_s = {
            let p = p.clone();
            tokio::task::spawn_blocking(move || -> Result<f64> {
                let expert = Expert::new(ExpertConfig::new(ExpertKind::Ffn, p.hidden), p.seed)?;
                let mut backend = ExpertBackend::new(expert, BackendConfig::default())?;
                let mut rng = SplitMix(p.seed ^ 0x10CA1);
                let x = to_candle(&random(&mut rng, p.batch, p.hidden)?)?;
                let g = to_candle(&random(&mut rng, p.batch, p.hidden)?)?;
                backend.forward(std::slice::from_ref(&x))?; // warm-up, as the clients' first call
                let started = Instant::now();
                for _ in 0..p.clients * p.batches {
                    backend.forward(std::slice::from_ref(&x))?;
                    if !p.forward_only {
                        backend.backward(std::slice::from_ref(&x), std::slice::from_ref(&g))?;
                    }
                }
                Ok(started.elapsed().as_secs_f64())
            })
            .await
            .context("the local run panicked")??
        };

        out.result(json!({
            "samples_per_s": samples as f64 / total_s,
            "total_s": total_s,
            "samples": samples,
            "local_samples_per_s": samples as f64 / local_s,
            "local_total_s": local_s,
            "server_rss_mb": server_rss_mb,
            "batch1_forward_ms": batch1_forward_ms,
            "experts": p.experts,
            "clients": p.clients,
            "batches": p.batches,
            "batch": p.batch,
            "hidden": p.hidden,
            "forward_only": p.forward_only,
        }));
        Ok(())
    }
}
