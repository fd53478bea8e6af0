//! `apiary dht`: a DHT node that real hivemind peers accept (like `hivemind-dht`), and one-shot
//! `apiary dht get` / `apiary dht store`.

use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use apiary_dht::validation::CompositeValidator;
use apiary_dht::{Dht, DhtConfig, DhtHandle, Found};
use apiary_node::NetworkConfig;
use apiary_p2p::{Host, Multiaddr, P2pConfig, P2pHandle, Protocol};
use apiary_wire::msgpack::Value;
use clap::{Args, Subcommand};
use serde_json::json;

use crate::json::{key_string, parse, to_json};
use crate::nat::{NatArgs, hivemind_defaults};
use crate::output::Output;

#[derive(Debug, Args)]
pub struct DhtArgs {
    #[command(subcommand)]
    command: Option<DhtCommand>,
    #[command(flatten)]
    node: NodeArgs,
}

#[derive(Debug, Subcommand)]
enum DhtCommand {
    /// Get the latest value of KEY and print `{"found", "kind", "value", "expiration"}`.
    Get {
        /// The key (a string, as hivemind's `dht.get(key)`).
        key: String,
        #[command(flatten)]
        node: NodeArgs,
    },
    /// Store VALUE under KEY (and SUBKEY) and print `{"ok"}`.
    Store {
        /// The key (a string).
        key: String,
        /// The value as JSON; `{"tuple": [...]}` is a msgpack tuple, `{"bytes": "<hex>"}` bytes.
        value: String,
        /// A sub-key, as JSON: the value joins a dictionary under KEY.
        #[arg(long)]
        subkey: Option<String>,
        /// Seconds until the value expires.
        #[arg(long, default_value_t = 60.0)]
        ttl: f64,
        #[command(flatten)]
        node: NodeArgs,
    },
}

/// Node options, named as in hivemind's `hivemind-dht`.
#[derive(Debug, Args, Clone)]
pub(crate) struct NodeArgs {
    /// Multiaddrs to listen on.
    #[arg(long, num_args = 1.., default_value = "/ip4/0.0.0.0/tcp/0")]
    host_maddrs: Vec<Multiaddr>,
    /// Full multiaddrs (with /p2p/<peer id>) of peers to bootstrap from.
    #[arg(long, num_args = 1..)]
    pub(crate) initial_peers: Vec<Multiaddr>,
    /// The node's private key in libp2p's protobuf format (hivemind's identity files too); created when
    /// missing.
    #[arg(long)]
    identity_path: Option<PathBuf>,
    /// Take no incoming DHT requests and stay out of others' routing tables (for firewalled peers).
    #[arg(long)]
    pub(crate) client_mode: bool,
    #[command(flatten)]
    pub(crate) nat: NatArgs,
}

pub async fn run(args: DhtArgs, out: &Output) -> Result<()> {
    match args.command {
        None => serve(args.node, out).await,
        Some(DhtCommand::Get { key, node }) => {
            let (p2p, dht) = start(&node, true).await?;
            let found = dht.get(Value::Str(key), true).await.context("get failed")?;
            out.result(found_json(found.as_ref()));
            dht.shutdown().await;
            p2p.shutdown().await;
            Ok(())
        }
        Some(DhtCommand::Store {
            key,
            value,
            subkey,
            ttl,
            node,
        }) => {
            let value = parse(&value).context("VALUE")?;
            let subkey = subkey.as_deref().map(parse).transpose().context("--subkey")?;
            let (p2p, dht) = start(&node, true).await?;
            let ok = dht
                .store(Value::Str(key), value, now() + ttl, subkey)
                .await
                .context("store failed")?;
            out.result(json!({ "ok": ok }));
            dht.shutdown().await;
            p2p.shutdown().await;
            Ok(())
        }
    }
}

async fn serve(node: NodeArgs, out: &Output) -> Result<()> {
    // a bootstrap node relays for home PCs unless told not to
    let network = node.nat.network(hivemind_defaults(true));
    let (p2p, dht) = start_with(&node, node.client_mode, &network).await?;
    let maddrs = visible_maddrs(&p2p, &node).await;
    tracing::info!(peer_id = %p2p.local_peer_id(), "DHT node running; Ctrl-C to stop");
    out.ready(
        &p2p.local_peer_id().to_string(),
        &maddrs,
        json!({ "node_id": dht.node_id().to_string() }),
    );
    crate::shutdown_signal().await;
    tracing::info!("shutting down");
    dht.shutdown().await;
    p2p.shutdown().await;
    Ok(())
}

/// A node of the swarm: every Apiary node runs hivemind's RSA owner validator (with a key of its own), so
/// it refuses protected records their owner did not sign and reads signed ones (the experiment catalog).
pub(crate) async fn start(node: &NodeArgs, client_mode: bool) -> Result<(P2pHandle, DhtHandle)> {
    start_with(node, client_mode, &node.nat.network(hivemind_defaults(false))).await
}

/// [`start`] with these network settings.
pub(crate) async fn start_with(
    node: &NodeArgs,
    client_mode: bool,
    network: &NetworkConfig,
) -> Result<(P2pHandle, DhtHandle)> {
    let validator = apiary_catalog::swarm::validator(None).context("making the node's record key")?;
    start_with_validator(node, client_mode, network, validator).await
}

/// [`start`] with record validators (the catalog's RSA owner validator).
pub(crate) async fn start_with_validator(
    node: &NodeArgs,
    client_mode: bool,
    network: &NetworkConfig,
    validator: CompositeValidator,
) -> Result<(P2pHandle, DhtHandle)> {
    let keypair = match &node.identity_path {
        Some(path) if path.exists() => Some(
            apiary_p2p::identity::load(path).with_context(|| format!("identity file {}", path.display()))?,
        ),
        Some(path) => {
            let keypair = apiary_p2p::Keypair::generate_ed25519();
            apiary_p2p::identity::save(&keypair, path)
                .with_context(|| format!("writing identity file {}", path.display()))?;
            Some(keypair)
        }
        None => None,
    };
    let config = network
        .apply(P2pConfig {
            keypair,
            listen_addrs: node.host_maddrs.clone(),
            ..P2pConfig::default()
        })
        .map_err(anyhow::Error::msg)?;
    let (p2p, _task) = Host::spawn(config).context("could not start the libp2p host")?;
    log_connectivity(&p2p);
    let mut config = DhtConfig::default();
    config.client_mode = client_mode;
    let dht = Dht::spawn_with_validator(p2p.clone(), config, node.initial_peers.clone(), validator)
        .await
        .context("could not join the DHT")?;
    Ok((p2p, dht))
}

/// Logs how peers reach the node whenever that changes (the path and why), until the host stops.
fn log_connectivity(p2p: &P2pHandle) {
    let mut connectivity = p2p.connectivity();
    tokio::spawn(async move {
        let mut last = None;
        loop {
            let (path, reason) = {
                let c = connectivity.borrow_and_update();
                (c.path(), c.reason())
            };
            if last != Some(path) {
                tracing::info!(path = path.as_str(), "network: {reason}");
                last = Some(path);
            }
            if connectivity.changed().await.is_err() {
                return;
            }
        }
    });
}

/// Full `/p2p/` multiaddrs others can dial: the announced ones, else the listening ones.
pub(crate) async fn visible_maddrs(p2p: &P2pHandle, node: &NodeArgs) -> Vec<String> {
    let id = p2p.local_peer_id();
    if !node.nat.announce_maddrs.is_empty() {
        return node
            .nat
            .announce_maddrs
            .iter()
            .map(|a| format!("{a}/p2p/{id}"))
            .collect();
    }
    let mut visible = p2p.visible_addrs();
    // Listeners come up asynchronously: wait briefly for the first address.
    let _ = tokio::time::timeout(Duration::from_secs(5), visible.wait_for(|a| !a.is_empty())).await;
    let addrs = visible.borrow().clone();
    addrs
        .iter()
        .map(|a| {
            if a.iter().any(|p| matches!(p, Protocol::P2p(_))) {
                a.to_string()
            } else {
                format!("{a}/p2p/{id}")
            }
        })
        .collect()
}

fn found_json(found: Option<&Found>) -> serde_json::Value {
    match found {
        None => json!({ "found": false }),
        Some(Found::Regular { value, expiration }) => {
            json!({ "found": true, "kind": "regular", "value": to_json(value), "expiration": expiration })
        }
        Some(Found::Dictionary { entries, expiration }) => {
            let value: serde_json::Map<String, serde_json::Value> = entries
                .iter()
                .map(|(subkey, value, _)| (key_string(subkey), to_json(value)))
                .collect();
            json!({ "found": true, "kind": "dictionary", "value": value, "expiration": expiration })
        }
    }
}

fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}
