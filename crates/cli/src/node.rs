//! `apiary node run`: the volunteer node without a window — the same engine the desktop app embeds
//! (`apiary-node`), with the platform's activity, GPU and power probes, until Ctrl-C.

use std::path::PathBuf;

use anyhow::{Context, Result};
use apiary_governor::Probes;
use apiary_node::{ApiConfig, JoinOptions, Node, NodeConfig, NodeHandle, RunState};
use clap::{Args, Subcommand};
use serde_json::json;

use crate::output::Output;

#[derive(Debug, Args)]
pub struct NodeArgs {
    #[command(subcommand)]
    command: NodeCommand,
}

#[derive(Debug, Subcommand)]
enum NodeCommand {
    /// Run the volunteer node: host joined experiments while the governor allows, until Ctrl-C.
    Run(Box<RunArgs>),
}

#[derive(Debug, Args)]
struct RunArgs {
    /// The settings file (TOML); created with the defaults' values only when settings change. Default:
    /// `<config dir>/apiary/node.toml`.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Apiary's data folder (ledger, joined experiments, checkpoints), instead of the settings' one.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Multiaddrs to listen on, instead of the settings' ones.
    #[arg(long, num_args = 1..)]
    host_maddrs: Vec<String>,
    /// Full multiaddrs of bootstrap peers, instead of the settings' ones.
    #[arg(long, num_args = 1..)]
    initial_peers: Vec<String>,
    /// Join these experiments once the node is up (they are remembered for the next start).
    #[arg(long, num_args = 1..)]
    join: Vec<String>,
    /// Start working now (a first run starts paused, as the desktop app's wizard asks first).
    #[arg(long)]
    resume: bool,
    /// Where the local HTTP/WebSocket API (for the dashboard in a browser) listens; loopback by default.
    /// Requests carry the token kept in `<data dir>/api-token`.
    #[arg(long, default_value_t = apiary_node::api::DEFAULT_BIND)]
    api_bind: std::net::SocketAddr,
    /// Serve no local API.
    #[arg(long)]
    no_api: bool,
    /// Serve the built dashboard (`ui/dist`) from this folder at the API's address.
    #[arg(long)]
    ui_dir: Option<PathBuf>,
}

pub async fn run(args: NodeArgs, out: &Output) -> Result<()> {
    match args.command {
        NodeCommand::Run(args) => run_node(*args, out).await,
    }
}

async fn run_node(args: RunArgs, out: &Output) -> Result<()> {
    let path = match &args.config {
        Some(p) => p.clone(),
        None => NodeConfig::default_path()?,
    };
    let mut config = NodeConfig::load(&path)?;
    if let Some(dir) = args.data_dir {
        config.data_dir = std::path::absolute(&dir).unwrap_or(dir);
    }
    if !args.host_maddrs.is_empty() {
        config.listen_maddrs = args.host_maddrs;
    }
    if !args.initial_peers.is_empty() {
        config.initial_peers = args.initial_peers;
    }
    let node = Node::spawn(config, Probes::platform())
        .await
        .context("starting the node")?;
    let api = if args.no_api {
        None
    } else {
        let config = ApiConfig {
            bind: args.api_bind,
            ui_dir: args.ui_dir,
            ..ApiConfig::default()
        };
        match apiary_node::api::serve(node.clone(), config).await {
            Ok(api) => Some(api),
            Err(e) => {
                node.shutdown().await.ok();
                return Err(e).context("starting the local API (--api-bind, or --no-api)");
            }
        }
    };
    if let Some(api) = &api {
        let token_file = node.data_dir().join(apiary_node::api::TOKEN_FILE);
        out.event(
            json!({ "event": "api", "url": format!("http://{}/", api.addr()), "token_file": token_file }),
        );
        out.say(&format!(
            "local API on http://{}/ (token in {})",
            api.addr(),
            token_file.display()
        ));
    }
    let result = serve(&node, &args.join, args.resume, out).await;
    if let Some(api) = api {
        api.shutdown().await;
    }
    node.shutdown().await.context("stopping the node")?;
    out.say("node stopped");
    result
}

async fn serve(node: &NodeHandle, join: &[String], resume: bool, out: &Output) -> Result<()> {
    let mut status = node.status();
    let mut events = node.events();
    let first = status.borrow_and_update().clone();
    out.ready(
        &first.peer_id,
        &first.maddrs,
        json!({ "state": first.state, "reason": first.reason, "data_dir": node.data_dir() }),
    );
    out.say(&format!(
        "node {} · {}",
        first.peer_id,
        describe(first.state, &first.reason)
    ));
    if resume {
        node.resume().await?;
    }
    for id in join {
        match node.join(id, JoinOptions::default()).await {
            Ok(plan) => out.say(&format!(
                "joined `{id}`:\n{}",
                plan.explanation
                    .iter()
                    .map(|l| format!("  {l}\n"))
                    .collect::<String>()
            )),
            Err(e) => {
                out.event(json!({ "event": "error", "message": format!("joining {id}: {e}") }));
                out.say(&format!("could not join `{id}`: {e}"));
            }
        }
    }
    let mut shown = (first.state, first.reason.clone());
    let signal = crate::shutdown_signal();
    tokio::pin!(signal);
    loop {
        tokio::select! {
            _ = &mut signal => return Ok(()),
            changed = status.changed() => {
                if changed.is_err() {
                    return Ok(());
                }
                let now = status.borrow_and_update().clone();
                if (now.state, now.reason.clone()) != shown {
                    shown = (now.state, now.reason.clone());
                    out.event(json!({ "event": "status", "state": now.state, "reason": now.reason, "until": now.until }));
                    out.say(&describe(now.state, &now.reason));
                }
            }
            event = events.recv() => match event {
                Ok(e) => {
                    let line = serde_json::to_value(&e).unwrap_or_default();
                    if out.is_json() {
                        out.event(line);
                    } else {
                        out.say(&format!("{line}"));
                    }
                }
                Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                    tracing::warn!(missed = n, "missed node events");
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return Ok(()),
            },
        }
    }
}

fn describe(state: RunState, reason: &str) -> String {
    let state = serde_json::to_value(state)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default();
    format!("{state}: {reason}")
}
