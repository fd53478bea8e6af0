//! `apiary`: the command-line face of the Apiary engine.
//!
//! Conventions for every command: logs and progress on stderr (`-v` more, `-q` less, `RUST_LOG` wins);
//! `--json` makes stdout machine-readable — a long-running command prints exactly one
//! `{"event":"ready","peer_id":…,"maddrs":[…]}` line once it is reachable, a one-shot command one result
//! line; exit code 0 on success, non-zero with a one-line reason on stderr otherwise; Ctrl-C and SIGTERM
//! shut down cleanly. Options that hivemind's CLIs have keep hivemind's names in kebab-case.

mod bench;
mod bench_moe;
mod call;
mod demo;
mod dht;
mod experiments;
mod json;
mod keys;
mod nat;
mod node;
mod output;
mod server;
mod swarm;
mod train;

use std::process::ExitCode;

use clap::{ArgAction, Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "apiary",
    version,
    about = "Lend your PC to open, decentralized deep-learning experiments"
)]
struct Cli {
    /// More logs on stderr (repeat for more).
    #[arg(short, long, global = true, action = ArgAction::Count)]
    verbose: u8,
    /// Fewer logs on stderr (errors only).
    #[arg(short, long, global = true)]
    quiet: bool,
    /// Machine-readable JSON lines on stdout.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// The main job on its embedded default: a local swarm trains a small language model (no GPU, no
    /// network), kills a volunteer half-way, and shows the loss, a sample and each volunteer's share.
    Demo(Box<demo::DemoArgs>),
    /// Run a DHT node (like hivemind-dht), or get/store one key.
    Dht(Box<dht::DhtArgs>),
    /// Host experts that hivemind trainers call (like hivemind-server).
    Server(Box<server::ServerArgs>),
    /// Train a model whose feed-forward layers are mixtures of the swarm's experts.
    Train(Box<train::TrainArgs>),
    /// Call experts found through the DHT and report each call's time and path (direct or relayed).
    Call(Box<call::CallArgs>),
    /// Browse, join and leave experiments.
    Experiments(experiments::ExperimentsArgs),
    /// Sign an experiment's manifest and keep it in the DHT's catalog until interrupted.
    Publish(Box<experiments::PublishArgs>),
    /// The volunteer node without a window (what the desktop app embeds).
    Node(node::NodeArgs),
    /// Publisher keys that sign experiment manifests.
    Keys(keys::KeysArgs),
    /// Benchmarks measured the way hivemind's benchmark scripts measure.
    Bench(bench::BenchArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // the demo speaks for itself on stdout; its nodes' logs only with -v
    let quiet_default = matches!(cli.command, Command::Demo(_));
    init_logging(cli.verbose, cli.quiet, quiet_default);
    let out = output::Output::new(cli.json);
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => return fail(&e.into()),
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Demo(args) => demo::run(*args, &out).await,
            Command::Dht(args) => dht::run(*args, &out).await,
            Command::Server(args) => server::run(*args, &out).await,
            Command::Experiments(args) => experiments::run(args, &out).await,
            Command::Publish(args) => experiments::publish(*args, &out).await,
            Command::Node(args) => node::run(args, &out).await,
            Command::Train(args) => train::run(*args, &out).await,
            Command::Call(args) => call::run(*args, &out).await,
            Command::Keys(args) => keys::run(args, &out),
            Command::Bench(args) => bench::run(args, &out).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(&e),
    }
}

fn fail(err: &anyhow::Error) -> ExitCode {
    // One line: the error and its causes.
    eprintln!("apiary: error: {err:#}");
    ExitCode::FAILURE
}

fn init_logging(verbose: u8, quiet: bool, quiet_default: bool) {
    let level = match (quiet, verbose) {
        (true, _) => "error",
        (false, 0) if quiet_default => "warn",
        (false, 0) => "info",
        (false, 1) => "debug",
        (false, _) => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(format!("warn,apiary={level}")));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
}

/// Resolves when Ctrl-C or SIGTERM arrives.
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(s) => s,
            Err(_) => {
                let _ = ctrl_c.await;
                return;
            }
        };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}
