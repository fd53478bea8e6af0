//! `cargo xtask bench desktop`: the desktop app's installed size, cold start and idle footprint
//! (issue 8: the app paused with its window closed uses ≤ 0.5 % of one core and ≤ 120 MB RSS for its
//! whole process tree, averaged over 60 s).
//!
//! ```text
//! cargo xtask bench desktop [--launches 5] [--seconds 60] [--settle 10]
//! ```
//!
//! 1. Builds the dashboard (`npm ci`, `npm run build`) and `apiary-desktop` in release with it embedded
//!    (`--features custom-protocol`); the binary's size as built and stripped (`strip -o`, what an
//!    installer ships).
//! 2. Runs itself again under `xvfb-run` and `dbus-run-session` (a private X server and session bus), then,
//!    in a fresh home folder per launch (settings on loopback with no peers, the first-run wizard marked
//!    done): launches the app `--launches` times and times each launch from `spawn` to the app's log line
//!    "dashboard painted" (the dashboard's first frame with the node's status, reported by the page
//!    after two animation frames).
//! 3. Launches it once more with `--minimized` (what the autostart entry runs: no window), the node
//!    paused as a first start leaves it, waits `--settle` s, then samples the whole process tree (the app,
//!    WebKit's web and network processes) once a second for `--seconds` s, as `bench idle` does.
//!
//! Table in `target/bench/desktop.md`. Every process started is stopped by its pid.

use std::fmt::Write as _;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::bench::{publish, stop};
use crate::bench_idle::{Footprint, Sampling, sample};
use crate::step;

const USAGE: &str = "usage: cargo xtask bench desktop [--launches 5] [--seconds 60] [--settle 10]";

/// Issue 8's bounds for the idle app (paused, window closed), whole process tree.
const CPU_BOUND_PCT: f64 = 0.5;
const RSS_BOUND_MB: f64 = 120.0;

/// The argument that marks the run inside Xvfb.
const INNER: &str = "--inside-xvfb";

struct Params {
    launches: usize,
    sampling: Sampling,
    inner: bool,
}

fn parse(args: &[String]) -> Result<Params> {
    let mut p = Params {
        launches: 5,
        sampling: Sampling {
            seconds: 60,
            settle: 10,
        },
        inner: false,
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut number = |name: &str| -> Result<u64> {
            it.next()
                .and_then(|v| v.parse().ok())
                .with_context(|| format!("{name} needs a number\n{USAGE}"))
        };
        match a.as_str() {
            "--launches" => p.launches = usize::try_from(number("--launches")?.clamp(1, 50))?,
            "--seconds" => p.sampling.seconds = number("--seconds")?.max(2),
            "--settle" => p.sampling.settle = number("--settle")?,
            INNER => p.inner = true,
            other => bail!("unknown argument {other:?}\n{USAGE}"),
        }
    }
    Ok(p)
}

fn binary() -> PathBuf {
    crate::dashboard::target_dir().join("release/apiary-desktop")
}

pub fn run(args: &[String]) -> Result<()> {
    let p = parse(args)?;
    if p.inner {
        return measure(&p);
    }
    crate::setup::all()?;
    crate::dashboard::build()?;
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    step(
        "build the desktop app (release, dashboard embedded)",
        Command::new(&cargo).args([
            "build",
            "--release",
            "-p",
            "apiary-desktop",
            "--features",
            "custom-protocol",
        ]),
    )?;
    let me = std::env::current_exe().context("this xtask's path")?;
    step(
        "measure inside a private X server and D-Bus session",
        Command::new("xvfb-run")
            .args(["-a", "-s", "-screen 0 1280x900x24", "dbus-run-session", "--"])
            .arg(me)
            .args(["bench", "desktop"])
            .args(args)
            .arg(INNER),
    )
}

/// A fresh home for one launch: settings on loopback, no peers, the wizard marked done.
pub(crate) fn fresh_home(base: &Path, n: usize) -> Result<PathBuf> {
    let home = base.join(format!("home-{n}"));
    let config = home.join(".config/apiary");
    let data = home.join(".local/share/apiary");
    std::fs::create_dir_all(&config)?;
    std::fs::create_dir_all(&data)?;
    std::fs::write(
        config.join("node.toml"),
        "listen_maddrs = [\"/ip4/127.0.0.1/tcp/0\"]\ninitial_peers = []\n",
    )?;
    std::fs::write(data.join("setup-done"), "bench\n")?;
    Ok(home)
}

pub(crate) fn launch(bin: &Path, home: &Path, extra: &[&str]) -> Result<Child> {
    Command::new(bin)
        .args(extra)
        .env("HOME", home)
        .env("XDG_CONFIG_HOME", home.join(".config"))
        .env("XDG_DATA_HOME", home.join(".local/share"))
        .env("XDG_CACHE_HOME", home.join(".cache"))
        .env("APIARY_API_BIND", "127.0.0.1:0")
        .env("RUST_LOG", "info")
        .env("WEBKIT_DISABLE_DMABUF_RENDERER", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))
}

/// Spawn → the "dashboard painted N ms" log line: (wall ms, the app's own ms since `run()`).
fn time_to_paint(bin: &Path, home: &Path) -> Result<(f64, f64)> {
    let t0 = Instant::now();
    let mut child = launch(bin, home, &[])?;
    let stdout = child.stdout.take().context("the app's stdout")?;
    let (tx, rx) = mpsc::sync_channel(1);
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(ms) = painted_ms(&line) {
                let _ = tx.send((t0.elapsed().as_secs_f64() * 1e3, ms));
            }
        }
    });
    let got = rx.recv_timeout(Duration::from_secs(60));
    stop(&mut child);
    got.context("no \"dashboard painted\" line within 60 s")
}

/// The milliseconds in a "dashboard painted 812 ms after start" log line.
fn painted_ms(line: &str) -> Option<f64> {
    let rest = &line[line.find("dashboard painted ")? + "dashboard painted ".len()..];
    rest.split_whitespace().next()?.parse().ok()
}

fn measure(p: &Params) -> Result<()> {
    let bin = binary();
    if !bin.exists() {
        bail!(
            "{} is missing: run `cargo xtask bench desktop` (it builds it)",
            bin.display()
        );
    }
    let size = std::fs::metadata(&bin)?.len();
    let base = std::env::temp_dir().join(format!("apiary-bench-desktop-{}", std::process::id()));
    std::fs::create_dir_all(&base)?;
    let stripped_path = base.join("apiary-desktop.stripped");
    step(
        "a stripped copy (what an installer ships)",
        Command::new("strip").arg("-o").arg(&stripped_path).arg(&bin),
    )?;
    let stripped = std::fs::metadata(&stripped_path)?.len();

    let mut starts = Vec::new();
    for n in 0..p.launches {
        let home = fresh_home(&base, n)?;
        let (wall, own) = time_to_paint(&bin, &home)?;
        eprintln!(
            "launch {}: first paint {wall:.0} ms after spawn ({own:.0} ms after the app's start)",
            n + 1
        );
        starts.push((wall, own));
    }

    let home = fresh_home(&base, p.launches)?;
    let mut child = launch(&bin, &home, &["--minimized"])?;
    let idle = sample(&[(child.id(), true, "apiary-desktop")], &p.sampling);
    stop(&mut child);
    let _ = std::fs::remove_dir_all(&base);
    let idle = idle?.into_iter().next().context("one footprint")?;
    publish("desktop.md", &table(p, size, stripped, &starts, &idle)?)
}

fn table(p: &Params, size: u64, stripped: u64, starts: &[(f64, f64)], idle: &Footprint) -> Result<String> {
    let cpu = crate::bench::cpu_model();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut walls: Vec<f64> = starts.iter().map(|s| s.0).collect();
    walls.sort_by(f64::total_cmp);
    let median = walls[walls.len() / 2];
    let mut t = String::new();
    writeln!(t, "## The desktop app: size, cold start, idle footprint\n")?;
    writeln!(
        t,
        "`cargo xtask bench desktop --launches {} --seconds {} --settle {}`: release build with the dashboard \
         embedded, under Xvfb (software rendering) and a private D-Bus session. Machine: {cpu}, {cores} CPUs. \
         MB = 10⁶ bytes.\n",
        p.launches, p.sampling.seconds, p.sampling.settle
    )?;
    writeln!(t, "| measure | value | bound (issue 8) | met |")?;
    writeln!(t, "|---|---|---|---|")?;
    let met = |ok: bool| if ok { "yes" } else { "**no**" };
    writeln!(
        t,
        "| binary size, as built / stripped | {:.1} MB / {:.1} MB | | |",
        size as f64 / 1e6,
        stripped as f64 / 1e6
    )?;
    writeln!(
        t,
        "| cold start: spawn → first painted dashboard, median of {} (first, max) | {median:.0} ms ({:.0}, {:.0}) | | |",
        walls.len(),
        starts[0].0,
        walls[walls.len() - 1]
    )?;
    writeln!(
        t,
        "| idle CPU, paused, window closed, whole tree, mean over {} s | {:.2} % of one core | ≤ {CPU_BOUND_PCT} % | {} |",
        p.sampling.seconds,
        idle.cpu_pct,
        met(idle.cpu_pct <= CPU_BOUND_PCT)
    )?;
    writeln!(
        t,
        "| idle RSS, same window, summed over {} processes (max) | {:.1} MB ({:.1}) | ≤ {RSS_BOUND_MB} MB | {} |",
        idle.procs,
        idle.rss_mean_mb,
        idle.rss_max_mb,
        met(idle.rss_mean_mb <= RSS_BOUND_MB)
    )?;
    writeln!(
        t,
        "| idle PSS at the end (shared pages counted once) | {} | | |",
        idle.pss_end_mb
            .map_or_else(|| "?".to_owned(), |m| format!("{m:.1} MB"))
    )?;
    writeln!(t)?;
    writeln!(
        t,
        "- Each launch has a fresh home folder (new settings, ledger and WebKit caches); the page cache is warm \
         after the first. The app's own figure (from `main` to the painted frame) was {}.",
        starts
            .iter()
            .map(|s| format!("{:.0} ms", s.1))
            .collect::<Vec<_>>()
            .join(", ")
    )?;
    writeln!(
        t,
        "- The idle app joined no experiment (a fresh install, paused, started `--minimized` as the autostart \
         entry starts it); `cargo xtask bench idle` measures a joined, paused node."
    )?;
    Ok(t)
}

#[cfg(test)]
mod tests {
    use super::painted_ms;

    #[test]
    fn reads_the_paint_line() {
        assert_eq!(
            painted_ms(
                "[2026-11-27][23:50:13][apiary_desktop::commands][INFO] dashboard painted 812 ms after start"
            ),
            Some(812.0)
        );
        assert_eq!(painted_ms("dashboard painted soon"), None);
        assert_eq!(painted_ms("something else"), None);
    }
}
