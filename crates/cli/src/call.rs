//! `apiary call`: calls experts found through the DHT, as a trainer does, and reports each call: whether
//! it worked, how long it took, and the path it took (a direct connection or a relay). A check that a
//! volunteer's experts can be reached from here, and the NAT test's trainer.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use apiary_dht::{DhtHandle, Found};
use apiary_moe::transport::{ExpertAddr, ExpertTransport, P2pTransport, TransportConfig};
use apiary_p2p::{P2pHandle, PeerId};
use apiary_wire::msgpack::Value;
use candle_core::{Device, Tensor};
use clap::Args;
use serde_json::json;

use crate::dht::{NodeArgs, start};
use crate::output::Output;

/// Which experts to call, how, and how often.
#[derive(Debug, Args)]
pub struct CallArgs {
    /// The uid of an expert to call (repeat for several); each is looked up in the DHT.
    #[arg(long = "uid", required = true)]
    uids: Vec<String>,
    /// The experts' hidden size.
    #[arg(long, default_value_t = 1024)]
    hidden_dim: usize,
    /// Rows per call.
    #[arg(long, default_value_t = 4)]
    batch: usize,
    /// Calls to each expert.
    #[arg(long, default_value_t = 1)]
    calls: usize,
    /// Pause between rounds of calls, in milliseconds.
    #[arg(long, default_value_t = 0)]
    interval_ms: u64,
    /// Also call rpc_backward (the expert then takes one optimizer step), as training does.
    #[arg(long)]
    backward: bool,
    /// How long to wait for each expert's declaration in the DHT, in seconds.
    #[arg(long, default_value_t = 30.0)]
    wait_s: f64,
    #[command(flatten)]
    node: NodeArgs,
}

/// How long to wait at start for an address observed by a peer (none comes where no peer is reachable).
const OBSERVED_ADDRS_WAIT: Duration = Duration::from_secs(3);

/// The largest `--batch × --hidden-dim` (64 Mi floats, 256 MiB per tensor).
const MAX_ELEMENTS: usize = 64 << 20;

#[derive(Debug, Default)]
struct Tally {
    ok: usize,
    failed: usize,
    direct: usize,
    relayed: usize,
    seconds: f64,
}

pub async fn run(args: CallArgs, out: &Output) -> Result<()> {
    if args.batch == 0 || args.hidden_dim == 0 || args.calls == 0 {
        bail!("--batch, --hidden-dim and --calls must be positive");
    }
    if args.batch.saturating_mul(args.hidden_dim) > MAX_ELEMENTS {
        bail!("--batch × --hidden-dim must be at most {MAX_ELEMENTS}");
    }
    for uid in &args.uids {
        if !apiary_moe::beam::is_valid_uid(uid) {
            bail!("--uid {uid}: not an expert uid (like ffn.3.7)");
        }
    }
    let (p2p, dht) = start(&args.node, true).await?;
    // hole punching offers the addresses peers observed for this host when a relayed connection opens:
    // give the bootstrap peers' identify a moment to tell them before the first call
    let mut connectivity = p2p.connectivity();
    let _ = tokio::time::timeout(
        OBSERVED_ADDRS_WAIT,
        connectivity.wait_for(|c| !c.observed_addrs.is_empty()),
    )
    .await;
    let result = call_all(&args, &p2p, &dht, out).await;
    dht.shutdown().await;
    p2p.shutdown().await;
    result
}

async fn call_all(args: &CallArgs, p2p: &P2pHandle, dht: &DhtHandle, out: &Output) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs_f64(args.wait_s.max(0.0));
    let mut experts = Vec::new();
    for uid in &args.uids {
        match find(dht, uid, deadline).await {
            Some(peer) => experts.push(ExpertAddr::new(uid.clone(), peer)),
            None => bail!("{uid}: no declaration found in the DHT within {} s", args.wait_s),
        }
    }
    let transport: Arc<dyn ExpertTransport> =
        Arc::new(P2pTransport::new(p2p.clone(), TransportConfig::default()));
    let mut tallies: BTreeMap<String, Tally> = BTreeMap::new();
    for round in 0..args.calls {
        if round > 0 && args.interval_ms > 0 {
            tokio::time::sleep(Duration::from_millis(args.interval_ms)).await;
        }
        for expert in &experts {
            let started = Instant::now();
            let outcome = call_once(&*transport, expert, args).await;
            let seconds = started.elapsed().as_secs_f64();
            let link = p2p.link(&expert.peer);
            let path = match link {
                Some(l) if l.is_direct() => "direct",
                Some(_) => "relayed",
                None => "unknown",
            };
            let tally = tallies.entry(expert.uid.clone()).or_default();
            match &outcome {
                Ok(()) => {
                    tally.ok += 1;
                    tally.seconds += seconds;
                    match path {
                        "direct" => tally.direct += 1,
                        "relayed" => tally.relayed += 1,
                        _ => {}
                    }
                }
                Err(_) => tally.failed += 1,
            }
            let error = outcome.as_ref().err().map(|e| format!("{e:#}"));
            out.event(json!({
                "event": "call", "uid": expert.uid, "peer": expert.peer.to_base58(), "ok": outcome.is_ok(),
                "ms": seconds * 1e3, "path": path, "rtt_ms": link.and_then(|l| l.rtt).map(|d| d.as_secs_f64() * 1e3),
                "error": error, "at": crate::swarm::unix_now(),
            }));
            out.say(&match &error {
                None => format!("{} via {path}: {:.1} ms", expert.uid, seconds * 1e3),
                Some(e) => format!(
                    "{} via {path}: failed after {:.1} ms: {e}",
                    expert.uid,
                    seconds * 1e3
                ),
            });
        }
    }
    let by_uid: serde_json::Map<String, serde_json::Value> = tallies
        .iter()
        .map(|(uid, t)| {
            let mean_ms = (t.ok > 0).then(|| t.seconds * 1e3 / t.ok as f64);
            let rows_per_s = (t.seconds > 0.0).then(|| (t.ok * args.batch) as f64 / t.seconds);
            let value = json!({
                "ok": t.ok, "failed": t.failed, "direct": t.direct, "relayed": t.relayed,
                "mean_ms": mean_ms, "rows_per_s": rows_per_s,
            });
            (uid.clone(), value)
        })
        .collect();
    let ok: usize = tallies.values().map(|t| t.ok).sum();
    let unreached: Vec<&String> = tallies
        .iter()
        .filter(|(_, t)| t.ok == 0)
        .map(|(u, _)| u)
        .collect();
    out.result(json!({
        "event": "result", "calls": args.calls * experts.len(), "ok": ok, "by_uid": by_uid,
    }));
    if !unreached.is_empty() {
        bail!("no call reached {unreached:?}");
    }
    Ok(())
}

/// The peer declared under `uid` (waiting until `deadline` for a declaration).
async fn find(dht: &DhtHandle, uid: &str, deadline: Instant) -> Option<PeerId> {
    loop {
        if let Ok(Some(Found::Regular {
            value: Value::Str(peer),
            ..
        })) = dht.get(Value::str(uid), true).await
            && let Ok(peer) = peer.parse::<PeerId>()
        {
            return Some(peer);
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// One forward (and backward) call with random inputs.
async fn call_once(transport: &dyn ExpertTransport, expert: &ExpertAddr, args: &CallArgs) -> Result<()> {
    let input = Tensor::rand(-1f32, 1f32, (args.batch, args.hidden_dim), &Device::Cpu)?;
    let outputs = transport.forward(expert, vec![input.clone()]).await?;
    let Some(output) = outputs.first() else {
        bail!("the expert returned no output");
    };
    if output.dims() != [args.batch, args.hidden_dim] {
        bail!(
            "the expert returned shape {:?}, expected [{}, {}]",
            output.dims(),
            args.batch,
            args.hidden_dim
        );
    }
    if args.backward {
        let grad = output.ones_like()?;
        transport.backward(expert, vec![input], vec![grad]).await?;
    }
    Ok(())
}
