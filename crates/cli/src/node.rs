//! `apiary node run`: the volunteer node without a window — the same engine the desktop app embeds
//! (`apiary-node`), with the platform's activity, GPU and power probes, until Ctrl-C.
//! `apiary node status|pause|resume|finish|cancel-start|snooze|mode|log` drive a running node through its
//! local API.

use std::path::PathBuf;

use anyhow::{Context, Result};
use apiary_governor::{Mode, Probes};
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
    /// What a running node is doing (through its local API).
    Status(ControlArgs),
    /// Pause a running node until `resume` (survives restarts).
    Pause(ControlArgs),
    /// Let a running node work (a manual start: it wins over "only when away").
    Resume(ControlArgs),
    /// Finish the work in flight, then pause.
    Finish(ControlArgs),
    /// Call off a start that is due because you are away ("Starting in 10 s because you are away"):
    /// stays paused until you are back and away again.
    CancelStart(ControlArgs),
    /// Pause for a while, e.g. `apiary node snooze 1h` (s, m, h, d; survives restarts).
    Snooze {
        /// How long: `90s`, `30m`, `1h`, `2d`, or seconds.
        duration: String,
        #[command(flatten)]
        at: ControlArgs,
    },
    /// Set how much of the computer the node may use.
    Mode {
        mode: ModeArg,
        #[command(flatten)]
        at: ControlArgs,
    },
    /// The node's recent events (joined, left, paused, resumed, errors, notices).
    Log {
        /// The newest this many.
        #[arg(long, default_value_t = 20)]
        limit: usize,
        #[command(flatten)]
        at: ControlArgs,
    },
}

/// Which running node to talk to.
#[derive(Debug, Args)]
struct ControlArgs {
    /// The node's settings file (its data folder holds the API's URL and token). Default:
    /// `<config dir>/apiary/node.toml`.
    #[arg(long)]
    config: Option<PathBuf>,
    /// The node's data folder, instead of the settings' one.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// The API's URL (`http://127.0.0.1:PORT/`), instead of the one the data folder names.
    #[arg(long)]
    api: Option<String>,
}

/// The governor's modes, as the command line spells them.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum ModeArg {
    /// A trickle while you work, half speed when away.
    Quiet,
    /// Some work while you work, full speed when away.
    Balanced,
    /// Full speed always (still yields to games, batteries and heat).
    Max,
    /// Nothing while you work, full speed when away.
    OnlyWhenAway,
}

impl From<ModeArg> for Mode {
    fn from(m: ModeArg) -> Mode {
        match m {
            ModeArg::Quiet => Mode::Quiet,
            ModeArg::Balanced => Mode::Balanced,
            ModeArg::Max => Mode::Max,
            ModeArg::OnlyWhenAway => Mode::OnlyWhenAway,
        }
    }
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
    /// Shorthand for `--api-bind 127.0.0.1:PORT`.
    #[arg(long, conflicts_with = "api_bind")]
    api_port: Option<u16>,
    /// Serve no local API.
    #[arg(long)]
    no_api: bool,
    /// Set the mode at start (kept in the settings file): how much of the computer the node may use.
    #[arg(long)]
    mode: Option<ModeArg>,
    /// Serve the built dashboard (`ui/dist`) from this folder at the API's address.
    #[arg(long)]
    ui_dir: Option<PathBuf>,
    /// NAT options; given ones replace the settings file's `network` values for this run.
    #[command(flatten)]
    nat: crate::nat::NatArgs,
}

pub async fn run(args: NodeArgs, out: &Output) -> Result<()> {
    match args.command {
        NodeCommand::Run(args) => run_node(*args, out).await,
        NodeCommand::Status(at) => status(&at, out).await,
        NodeCommand::Pause(at) => control(&at, "/api/pause", None, "paused", PAUSED, out).await,
        NodeCommand::Resume(at) => control(&at, "/api/resume", None, "resumed", WORKING, out).await,
        NodeCommand::Finish(at) => {
            control(
                &at,
                "/api/finish",
                None,
                "finishing the work in flight, then pausing",
                &["draining", "paused"],
                out,
            )
            .await
        }
        NodeCommand::CancelStart(at) => {
            control(
                &at,
                "/api/cancel-start",
                None,
                "a start because you are away, if one was due, is called off until you are back",
                &[],
                out,
            )
            .await
        }
        NodeCommand::Snooze { duration, at } => {
            let seconds = parse_duration(&duration)?;
            let body = json!({ "seconds": seconds });
            let said = format!("snoozed for {duration}");
            control(&at, "/api/snooze", Some(body), &said, PAUSED, out).await
        }
        NodeCommand::Mode { mode, at } => {
            let mode = Mode::from(mode);
            let said = format!(
                "mode: {}",
                serde_json::to_value(mode)?.as_str().unwrap_or_default()
            );
            let client = ApiClient::find(&at)?;
            client
                .send(reqwest::Method::PUT, "/api/mode", Some(json!({ "mode": mode })))
                .await?;
            out.event(json!({ "event": "done", "mode": mode }));
            out.say(&said);
            Ok(())
        }
        NodeCommand::Log { limit, at } => log(&at, limit, out).await,
    }
}

/// A client of a running node's local API.
struct ApiClient {
    url: String,
    token: String,
    http: reqwest::Client,
}

impl ApiClient {
    /// The node named by `at`: its data folder holds the API's URL (`api-url`) and token (`api-token`).
    fn find(at: &ControlArgs) -> Result<ApiClient> {
        let data_dir = match &at.data_dir {
            Some(d) => d.clone(),
            None => {
                let path = match &at.config {
                    Some(p) => p.clone(),
                    None => NodeConfig::default_path()?,
                };
                NodeConfig::load(&path)?.data_dir
            }
        };
        let url = match &at.api {
            Some(u) => u.trim_end_matches('/').to_owned() + "/",
            None => apiary_node::api::running_url(&data_dir).with_context(|| {
                format!(
                    "no node is running with the data folder {} (no API URL in it): start one with \
                     `apiary node run`, or name it with --data-dir, --config or --api",
                    data_dir.display()
                )
            })?,
        };
        let token_file = data_dir.join(apiary_node::api::TOKEN_FILE);
        let token = std::fs::read_to_string(&token_file)
            .with_context(|| format!("reading the API token from {}", token_file.display()))?
            .trim()
            .to_owned();
        // a build that unifies reqwest with the desktop app's updater has rustls without a provider
        let _ = rustls::crypto::ring::default_provider().install_default();
        let http = reqwest::Client::builder()
            .timeout(std::time::Duration::from_secs(30))
            .build()
            .context("building the HTTP client")?;
        Ok(ApiClient { url, token, http })
    }

    /// Sends a request; a non-2xx answer is an error carrying the API's message.
    async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> Result<serde_json::Value> {
        let url = format!("{}{}", self.url.trim_end_matches('/'), path);
        let mut request = self.http.request(method, &url).bearer_auth(&self.token);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.with_context(|| {
            format!(
                "no answer from the node's API at {} (is `apiary node run` running?)",
                self.url
            )
        })?;
        let code = response.status();
        let text = response.text().await.context("reading the node's answer")?;
        let value: serde_json::Value = serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text));
        if !code.is_success() {
            let message = value["message"]
                .as_str()
                .map_or_else(|| value.to_string(), str::to_owned);
            anyhow::bail!("the node refused: {message} ({code})");
        }
        Ok(value)
    }
}

/// The states a pause or snooze ends in.
const PAUSED: &[&str] = &["paused"];
/// The states a resume ends in (unless a protection rule still holds it: then its directive changes).
const WORKING: &[&str] = &["running", "throttled"];

/// How long a command's effect may take to show in the status (the governor applies a command at its
/// next tick, 100 ms by default; the engine then applies the directive).
const SETTLE: std::time::Duration = std::time::Duration::from_secs(2);

/// Sends a control, then reports the status once it shows the effect: a state in `expect`, or (with
/// no `expect`) a directive other than the one before; after [`SETTLE`] at most (a resume that a
/// protection rule holds, a control that changes nothing), the status as it is.
async fn control(
    at: &ControlArgs,
    path: &str,
    body: Option<serde_json::Value>,
    said: &str,
    expect: &[&str],
    out: &Output,
) -> Result<()> {
    let client = ApiClient::find(at)?;
    let before = client.send(reqwest::Method::GET, "/api/status", None).await?;
    client.send(reqwest::Method::POST, path, body).await?;
    let deadline = tokio::time::Instant::now() + SETTLE;
    let status = loop {
        let now = client.send(reqwest::Method::GET, "/api/status", None).await?;
        let state = now["state"].as_str().unwrap_or_default();
        let shown = if expect.is_empty() {
            now["directive"] != before["directive"]
        } else {
            expect.contains(&state)
        };
        if shown || tokio::time::Instant::now() >= deadline {
            break now;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    out.event(json!({ "event": "done", "state": status["state"], "reason": status["reason"] }));
    out.say(&format!(
        "{said} — now {}: {}",
        status["state"].as_str().unwrap_or("?"),
        status["reason"].as_str().unwrap_or("")
    ));
    Ok(())
}

async fn status(at: &ControlArgs, out: &Output) -> Result<()> {
    let client = ApiClient::find(at)?;
    let status = client.send(reqwest::Method::GET, "/api/status", None).await?;
    if out.is_json() {
        let mut line = json!({ "event": "status" });
        if let (Some(line), Some(fields)) = (line.as_object_mut(), status.as_object()) {
            line.extend(fields.clone());
        }
        out.event(line);
        return Ok(());
    }
    let network = &status["network"];
    let rtt = network["rtt_ms"]
        .as_f64()
        .map_or_else(String::new, |ms| format!(" · round trip {ms:.0} ms"));
    let mut text = format!(
        "{}: {}\npeer {} · {} DHT peers · network: {}{rtt} — {}\n",
        status["state"].as_str().unwrap_or("?"),
        status["reason"].as_str().unwrap_or(""),
        status["peer_id"].as_str().unwrap_or("?"),
        status["peers"],
        network["path"].as_str().unwrap_or("?"),
        network["reason"].as_str().unwrap_or(""),
    );
    match status["experiments"].as_array() {
        Some(list) if !list.is_empty() => {
            for e in list {
                let experts = e["experts"].as_array().map_or(0, Vec::len);
                let (fwd, bwd) = e["experts"].as_array().map_or((0, 0), |x| {
                    x.iter().fold((0, 0), |(f, b), x| {
                        (
                            f + x["forward_rows"].as_u64().unwrap_or(0),
                            b + x["backward_rows"].as_u64().unwrap_or(0),
                        )
                    })
                });
                text.push_str(&format!(
                    "  {}: {experts} experts, {fwd} samples forward, {bwd} backward{}\n",
                    e["id"].as_str().unwrap_or("?"),
                    if e["withdrawn"] == true {
                        " (withdrawn while paused)"
                    } else {
                        ""
                    }
                ));
            }
        }
        _ => text.push_str("  no experiments joined (`apiary experiments list`, then `join`)\n"),
    }
    out.say(text.trim_end());
    Ok(())
}

async fn log(at: &ControlArgs, limit: usize, out: &Output) -> Result<()> {
    let client = ApiClient::find(at)?;
    let events = client
        .send(reqwest::Method::GET, &format!("/api/log?limit={limit}"), None)
        .await?;
    for e in events.as_array().into_iter().flatten() {
        if out.is_json() {
            out.event(e.clone());
        } else {
            let mut fields = e.as_object().cloned().unwrap_or_default();
            let at = fields.remove("at").and_then(|v| v.as_f64()).unwrap_or(0.0);
            let kind = fields
                .remove("event")
                .map(|v| v.as_str().unwrap_or("?").to_owned());
            let rest: Vec<String> = fields
                .iter()
                .map(|(k, v)| format!("{k}={}", v.as_str().map_or_else(|| v.to_string(), str::to_owned)))
                .collect();
            out.say(&format!(
                "{:.0} {} {}",
                at,
                kind.unwrap_or_default(),
                rest.join(" ")
            ));
        }
    }
    Ok(())
}

/// `90s`, `30m`, `1h`, `2d`, or a number of seconds.
fn parse_duration(text: &str) -> Result<f64> {
    let t = text.trim();
    let (number, unit) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => (&t[..i], c),
        _ => (t, 's'),
    };
    let scale = match unit {
        's' => 1.0,
        'm' => 60.0,
        'h' => 3600.0,
        'd' => 86400.0,
        _ => anyhow::bail!("`{text}`: the unit must be s, m, h or d"),
    };
    let n: f64 = number
        .trim()
        .parse()
        .ok()
        .filter(|n: &f64| n.is_finite() && *n > 0.0)
        .with_context(|| format!("`{text}` is not a duration (e.g. 90s, 30m, 1h, 2d)"))?;
    Ok(n * scale)
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
    config.network = args.nat.network(config.network);
    if !args.initial_peers.is_empty() {
        config.initial_peers = args.initial_peers;
    }
    let node = Node::spawn_with_file(config, &path, Probes::platform())
        .await
        .context("starting the node")?;
    if let Some(mode) = args.mode {
        node.set_mode(mode.into()).await.context("setting the mode")?;
    }
    let api = if args.no_api {
        None
    } else {
        let config = ApiConfig {
            bind: args.api_port.map_or(args.api_bind, |port| {
                std::net::SocketAddr::from((std::net::Ipv4Addr::LOCALHOST, port))
            }),
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

#[cfg(test)]
mod tests {
    use super::parse_duration;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("90s").unwrap(), 90.0);
        assert_eq!(parse_duration("30m").unwrap(), 1800.0);
        assert_eq!(parse_duration("1h").unwrap(), 3600.0);
        assert_eq!(parse_duration("1.5h").unwrap(), 5400.0);
        assert_eq!(parse_duration("2d").unwrap(), 172_800.0);
        assert_eq!(parse_duration("45").unwrap(), 45.0);
        for bad in ["", "h", "1w", "-1h", "0m", "abc", "NaNs", "infh"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }
}
