//! `cargo xtask …`: Apiary's one entry point for setting up, testing and benchmarking.
//!
//! ```text
//! cargo xtask demo     build (release) and run `apiary demo`: a local swarm trains a small language model
//! cargo xtask test     install what is missing, then fmt check, clippy -D warnings, every test suite,
//!                      the dashboard's Vitest suite, its end-to-end tests (Chromium, the desktop app),
//!                      the Linux installers installed, started and removed, and the NAT test (a
//!                      simulated internet in network namespaces, real hivemind peers included; root)
//! cargo xtask test-nat the NAT test alone (after a `test` built the debug binaries)
//! cargo xtask setup    only install what is missing (system packages, the cached hivemind venv)
//! cargo xtask golden   regenerate the golden vectors with real hivemind (crates/wire/tests/golden)
//! cargo xtask bench    tensor codec benchmark, Apiary and hivemind side by side on this machine
//! cargo xtask bench dht   DHT benchmark, Apiary and hivemind side by side on this machine
//! cargo xtask bench server   expert server throughput (benchmark_throughput.py), Apiary and hivemind
//! cargo xtask bench moe   MoE trainer steps/s at 0 and 100 ms one-way latency, Apiary and hivemind
//! cargo xtask bench idle  idle CPU and RSS of a paused, joined `apiary node run` beside a hivemind server
//! cargo xtask bench desktop  the desktop app's size, cold start to first paint, idle footprint
//! cargo xtask bundle   the Linux installers (.deb, .rpm), see installers/README.md
//! ```
//!
//! Caches live outside the clone: `$APIARY_CACHE_DIR` (default `${XDG_CACHE_HOME:-~/.cache}/apiary`)
//! holds the hivemind venv; `.ci/run` points `CARGO_TARGET_DIR` there too.

mod bench;
mod bench_desktop;
mod bench_idle;
mod dashboard;
mod installers;
mod nat;
mod setup;

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

fn main() {
    if let Err(err) = run() {
        eprintln!("xtask: error: {err:#}");
        std::process::exit(1);
    }
}

fn run() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let cmd = args.next().unwrap_or_else(|| "help".to_owned());
    let rest: Vec<String> = args.collect();
    match cmd.as_str() {
        "demo" => demo(&rest),
        "test" => test(&rest),
        "setup" => setup::all().map(|_| ()),
        "golden" => golden(),
        "bench" => bench::run(&rest),
        "bundle" => installers::run(&rest),
        installers::SMOKE => installers::smoke_inside(&rest),
        // the installer step of `test` alone (after a `test` built the debug binaries)
        "test-installers" => installers::test(),
        // the NAT end-to-end step alone (root; after a `test` built the debug binaries)
        "test-nat" => nat::test(),
        "help" | "-h" | "--help" => {
            eprintln!("{}", HELP);
            Ok(())
        }
        other => bail!("unknown command {other:?}\n{HELP}"),
    }
}

const HELP: &str = "usage: cargo xtask <demo|test|setup|golden|bench>
  demo    build (release) and run `apiary demo [flags]`: no GPU, network or download needed
  test    install prerequisites, then fmt check, clippy -D warnings and every test suite
  test-nat  the NAT end-to-end test alone (root, network namespaces; the debug `apiary` built)
  setup   install prerequisites only (system packages, cached hivemind venv)
  golden  regenerate crates/wire/tests/golden with real hivemind
  bench   [codecs] tensor codec benchmark beside hivemind's serialize/deserialize on this machine
  bench dht        DHT benchmark (hivemind's benchmark_dht.py measure) beside hivemind's
  bench server     expert server throughput (benchmark_throughput.py measure): Apiary and hivemind
  bench moe        MoE trainer steps/s and samples/s of the demo's model at 0 and 100 ms one-way latency
                   (a network namespace delaying loopback): Apiary and hivemind's RemoteMixtureOfExperts
  bench idle       idle CPU and RSS of `apiary node run` joined but paused, beside an idle hivemind server
  bench desktop    the desktop app: binary size, cold start to first painted dashboard, idle footprint
  bundle  [--debug] [--bundles deb,rpm]  the Linux installers (.deb, .rpm: app, CLI, user unit); Windows
          and macOS: installers/README.md";

/// `cargo run --release -p apiary-cli -- demo <args>`: the demo needs nothing but a Rust toolchain.
fn demo(args: &[String]) -> Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    step(
        "build (release) and run the demo: a local swarm trains a small language model",
        Command::new(cargo)
            .args(["run", "--release", "--quiet", "-p", "apiary-cli", "--", "demo"])
            .args(args),
    )
}

/// The workspace root (the folder holding the top `Cargo.toml`).
///
/// `cargo run` sets `CARGO_MANIFEST_DIR` for the running binary: prefer it to the compile-time path, which
/// names whichever clone last linked the binary when clones share one `CARGO_TARGET_DIR`.
pub fn root() -> PathBuf {
    let manifest = std::env::var_os("CARGO_MANIFEST_DIR").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).to_path_buf(),
        PathBuf::from,
    );
    manifest
        .ancestors()
        .nth(2)
        .expect("xtask lives in crates/xtask")
        .to_path_buf()
}

/// Prints the step and why, runs it in the workspace root, fails loudly on a non-zero exit.
pub fn step(why: &str, cmd: &mut Command) -> Result<()> {
    eprintln!("\n==> {why}\n    $ {}", show(cmd));
    let status = cmd
        .current_dir(root())
        .status()
        .with_context(|| format!("could not start `{}`", show(cmd)))?;
    if !status.success() {
        bail!("`{}` failed ({status})", show(cmd));
    }
    Ok(())
}

pub fn show(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

fn cargo() -> Command {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned()))
}

fn test(extra: &[String]) -> Result<()> {
    let env = setup::all()?;
    step(
        "formatting must match rustfmt.toml",
        cargo().args(["fmt", "--all", "--check"]),
    )?;
    step(
        "clippy on every target, warnings are errors",
        cargo().args(["clippy", "--workspace", "--all-targets", "--", "-D", "warnings"]),
    )?;
    step(
        "dependencies: permissive licences, no banned crates, crates.io only (deny.toml)",
        cargo().args([
            "deny",
            "--log-level",
            "error",
            "check",
            "licenses",
            "bans",
            "sources",
        ]),
    )?;
    dashboard::build()?;
    step(
        "every test suite (unit, golden vectors against hivemind, interop through the hivemind venv); \
         the desktop app built with the dashboard embedded",
        cargo()
            .args([
                "test",
                "--workspace",
                // every failing suite in one run, not only the first
                "--no-fail-fast",
                "--features",
                "apiary-desktop/custom-protocol",
            ])
            .args(extra)
            .env("APIARY_HIVEMIND_PYTHON", &env.hivemind_python),
    )?;
    step(
        "the desktop app's binary with the dashboard embedded, the fake notification server and \
         close-window (for its end-to-end test), and the CLI (for the installers)",
        cargo()
            .args([
                "build",
                "-p",
                "apiary-desktop",
                "-p",
                "apiary-testkit",
                "-p",
                "apiary-cli",
            ])
            .args(["--features", "apiary-desktop/custom-protocol"])
            .args(["--bin", "apiary-desktop", "--bin", "fake-notifications"])
            .args(["--bin", "close-window", "--bin", "apiary"]),
    )?;
    dashboard::test()?;
    installers::test()?;
    // the simulated internet needs root; a machine without it says so loudly, it does not pass quietly
    let nat_skipped = match nat::test() {
        Ok(()) => None,
        Err(e) if e.downcast_ref::<nat::Unsupported>().is_some() => Some(e.to_string()),
        Err(e) => return Err(e),
    };
    match nat_skipped {
        None => eprintln!("\nxtask: all checks passed"),
        Some(why) => {
            let line = "!".repeat(100);
            eprintln!(
                "\n{line}\nxtask: WARNING: every other check passed, but the NAT end-to-end test did NOT run:\n  {why}\n\
                 run `cargo xtask test-nat` as root to check Apiary behind NAT\n{line}"
            );
        }
    }
    Ok(())
}

fn golden() -> Result<()> {
    let env = setup::all()?;
    let out = root().join("crates/wire/tests/golden");
    step(
        "regenerate golden vectors with real hivemind 1.1.12",
        Command::new(&env.hivemind_python)
            .arg(root().join("tests/interop/golden.py"))
            .arg("--out")
            .arg(&out),
    )
}
