//! `cargo xtask bench idle`: the idle footprint of `apiary node run` joined to an experiment but paused,
//! beside an idle hivemind server's process tree (issue 7: CPU ≤ 0.5 % of one core and RSS ≤ 60 MB,
//! averaged over 60 s; the probes' own cost per tick).
//!
//! ```text
//! cargo xtask bench idle [--seconds 60] [--settle 5] [--probe-seconds 30] [--hivemind-handlers N]
//! ```
//!
//! 1. `cargo run --release -p apiary-governor --example probe_cost`: the platform probes sampled at the
//!    governor's cadence (activity every 100 ms; GPU, power, system every 1 s), µs per call.
//! 2. In a temporary folder: `apiary keys new`, a manifest of a 2 × 3 grid of `ffn` experts (hidden 32),
//!    `apiary --json publish` on loopback (the DHT bootstrap and catalog), then `apiary --json node run
//!    --join ID --no-api` bootstrapped from it. A first run starts paused; once it prints `joined`, wait
//!    `--settle` s and sample once per second for `--seconds` s: CPU time (utime + stime of
//!    `/proc/PID/stat`) and `VmRSS` of `/proc/PID/status`, for the node and (informational) the publisher.
//! 3. `tests/interop/idle_hivemind.py`: a hivemind 1.1.12 `Server` hosting as many `ffn` experts of the same
//!    hidden size with its DHT, hivemind's defaults otherwise (8 connection handlers per expert unless
//!    `--hivemind-handlers`), no clients; the same samples summed over its whole process tree (the Python
//!    process and every descendant: handlers, DHT process, `p2pd`).
//!
//! MB are 10⁶ bytes. Table in `target/bench/idle.md`. Every process started is stopped by its pid (SIGTERM,
//! then SIGKILL; for hivemind also every process of its tree still alive), on success and on error.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::bench::{one_json, publish, setup_and_build_apiary, stop};
use crate::{root, show};

const USAGE: &str = "usage: cargo xtask bench idle [--seconds 60] [--settle 5] [--probe-seconds 30] \
                     [--hivemind-handlers N]";

/// Issue 7's bounds for the paused node.
const CPU_BOUND_PCT: f64 = 0.5;
const RSS_BOUND_MB: f64 = 60.0;

/// The experiment the node joins: 2 × 3 `ffn` experts of hidden 32 (as `crates/cli/tests/cli_experiments.rs`).
const EXPERIMENT: &str = "idle-bench-grid";
const HIDDEN: usize = 32;

/// How long to wait, then how long to sample (once a second).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Sampling {
    pub seconds: u64,
    pub settle: u64,
}

struct Params {
    seconds: u64,
    settle: u64,
    probe_seconds: u64,
    hivemind_handlers: Option<u64>,
}

impl Params {
    fn sampling(&self) -> Sampling {
        Sampling {
            seconds: self.seconds,
            settle: self.settle,
        }
    }
}

fn parse(args: &[String]) -> Result<Params> {
    let mut p = Params {
        seconds: 60,
        settle: 5,
        probe_seconds: 30,
        hivemind_handlers: None,
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut number = |name: &str| -> Result<u64> {
            it.next()
                .and_then(|v| v.parse().ok())
                .with_context(|| format!("{name} needs a number\n{USAGE}"))
        };
        match a.as_str() {
            "--seconds" => p.seconds = number("--seconds")?.max(2),
            "--settle" => p.settle = number("--settle")?,
            "--probe-seconds" => p.probe_seconds = number("--probe-seconds")?.max(1),
            "--hivemind-handlers" => p.hivemind_handlers = Some(number("--hivemind-handlers")?.max(1)),
            other => bail!("unknown argument {other:?}\n{USAGE}"),
        }
    }
    Ok(p)
}

pub fn run(args: &[String]) -> Result<()> {
    let p = parse(args)?;
    let (env, target) = setup_and_build_apiary()?;
    let apiary_bin = target.join("release/apiary");

    let probes = one_json(
        "the governor's probes: µs per call, sampled at the governor's cadence (release)",
        Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned()))
            .args([
                "run",
                "--release",
                "--quiet",
                "-p",
                "apiary-governor",
                "--example",
                "probe_cost",
                "--",
                "--seconds",
            ])
            .arg(p.probe_seconds.to_string()),
    )?;

    let dir = std::env::temp_dir().join(format!("apiary-bench-idle-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let measured = measure_both(&p, &apiary_bin, &env.hivemind_python, &dir);
    if measured.is_ok() {
        let _ = std::fs::remove_dir_all(&dir);
    } else {
        eprintln!("xtask: logs of the processes kept in {}", dir.display());
    }
    let (node, publisher, hivemind) = measured?;
    let report = table(&p, &node, &publisher, &hivemind, &probes)?;
    publish("idle.md", &report)
}

/// What one process (or process tree) used over the window.
#[derive(Debug, Default)]
pub(crate) struct Footprint {
    label: String,
    pub cpu_pct: f64,
    pub rss_mean_mb: f64,
    pub rss_max_mb: f64,
    pub pss_end_mb: Option<f64>,
    pub procs: usize,
    threads: u64,
    /// `joined` line (node) or `ready` line (hivemind), for the table's notes.
    info: Value,
}

fn measure_both(
    p: &Params,
    apiary: &Path,
    python: &Path,
    dir: &Path,
) -> Result<(Footprint, Footprint, Footprint)> {
    let mut started = Started::default();

    // Apiary: a publisher (the swarm's bootstrap and the catalog) and the paused, joined node
    let key = dir.join("publisher.key");
    let out = Command::new(apiary)
        .args(["--json", "-q", "keys", "new"])
        .arg(&key)
        .output()
        .context("running apiary keys new")?;
    if !out.status.success() {
        bail!("apiary keys new failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let manifest = dir.join("experiment.toml");
    std::fs::write(&manifest, manifest_text(EXPERIMENT)).context("writing the manifest")?;
    let mut cmd = Command::new(apiary);
    cmd.args(["--json", "publish"])
        .arg(&manifest)
        .arg("--key")
        .arg(&key)
        .args(["--host-maddrs", "/ip4/127.0.0.1/tcp/0"]);
    let publisher = started.spawn("publisher", &mut cmd, dir, false)?;
    let ready = wait_for(&started.lines[publisher], "the publisher's ready line", 60, |v| {
        v["event"] == "ready"
    })?;
    let boot = ready["maddrs"][0]
        .as_str()
        .context("the publisher's ready line has no maddrs")?
        .to_owned();

    let mut cmd = Command::new(apiary);
    cmd.args(["--json", "node", "run", "--config"])
        .arg(dir.join("node.toml"))
        .arg("--data-dir")
        .arg(dir.join("data"))
        .args(["--host-maddrs", "/ip4/127.0.0.1/tcp/0", "--initial-peers", &boot])
        .args(["--join", EXPERIMENT, "--no-api"]);
    let node = started.spawn("node", &mut cmd, dir, false)?;
    let node_ready = wait_for(&started.lines[node], "the node's ready line", 60, |v| {
        v["event"] == "ready"
    })?;
    if node_ready["state"] != "paused" {
        bail!("the node should start paused on a first run: {node_ready}");
    }
    let joined = wait_for(&started.lines[node], "the node's joined event", 120, |v| {
        v["event"] == "joined"
    })?;
    let experts = joined["uids"].as_array().map_or(0, Vec::len);
    if experts == 0 {
        bail!("the node joined with no experts: {joined}");
    }
    let targets = [
        (started.pid(node), false, "node"),
        (started.pid(publisher), false, "publisher"),
    ];
    let mut fp = sample(&targets, &p.sampling())?.into_iter();
    let mut node_fp = fp.next().context("no node footprint")?;
    let mut pub_fp = fp.next().context("no publisher footprint")?;
    node_fp.label = format!("`apiary node run` (joined, paused, hosting {experts} experts)");
    node_fp.info = joined;
    pub_fp.label = "`apiary publish` (the swarm's bootstrap and catalog; informational)".to_owned();
    // stop the node first: it leaves through the publisher's DHT
    started.stop_all();

    // hivemind: an idle Server of as many experts, its whole process tree
    let mut cmd = Command::new(python);
    cmd.arg(root().join("tests/interop/idle_hivemind.py")).args([
        "--experts",
        &experts.to_string(),
        "--hidden",
        &HIDDEN.to_string(),
    ]);
    if let Some(h) = p.hivemind_handlers {
        cmd.args(["--num-handlers", &h.to_string()]);
    }
    let server = started.spawn("hivemind", &mut cmd, dir, true)?;
    let ready = wait_for(
        &started.lines[server],
        "the hivemind server's ready line",
        300,
        |v| v["event"] == "ready",
    )?;
    let mut hm = sample(&[(started.pid(server), true, "hivemind")], &p.sampling())?
        .pop()
        .context("no hivemind footprint")?;
    hm.label = format!(
        "hivemind 1.1.12 `Server` process tree ({experts} experts, {} connection handlers, DHT, p2pd)",
        ready["num_handlers"]
    );
    hm.info = ready;
    started.stop_all();
    Ok((node_fp, pub_fp, hm))
}

/// The test suite's manifest shape: a 2 × 3 grid of small `ffn` experts; the key is filled in by `publish`.
fn manifest_text(id: &str) -> String {
    format!(
        r#"schema_version = 1
id = "{id}"
title = "Idle footprint benchmark"
summary = "Published by cargo xtask bench idle."
description = "A 2 × 3 grid of small ffn experts."
created = 0
expires = 0
status = "training"
uid_prefix = "ffn_idle."
grid = [2, 3]

[publisher]
name = "Apiary xtask"
public_key = ""

[expert]
kind = "ffn"
hidden_dim = {HIDDEN}
max_batch_size = 1024
optimizer = {{ name = "adam", lr = 0.001 }}

[requirements]
min_ram_mb_per_expert = 4
min_vram_mb_per_expert = 0
bandwidth_mbps = 0
disk_mb = 1
"#
    )
}

/// The processes this benchmark started; each is stopped by its pid when dropped (also on an error).
#[derive(Default)]
struct Started {
    children: Vec<(String, Child, bool)>,
    lines: Vec<Receiver<Value>>,
}

impl Started {
    /// Starts `cmd` (stdout drained into JSON values, stderr into `DIR/NAME.log`); returns its index.
    fn spawn(&mut self, name: &str, cmd: &mut Command, dir: &Path, tree: bool) -> Result<usize> {
        let log = dir.join(format!("{name}.log"));
        eprintln!(
            "\n==> start {name} (stderr in {})\n    $ {}",
            log.display(),
            show(cmd)
        );
        let log = std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let mut child = cmd
            .current_dir(root())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .with_context(|| format!("could not start `{}`", show(cmd)))?;
        let stdout = child.stdout.take().context("no stdout")?;
        let (tx, rx) = mpsc::sync_channel(1024);
        // drains stdout until the process exits, whether or not anyone still listens (lines beyond the
        // bound are dropped, never blocking the process on a full pipe)
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Ok(v) = serde_json::from_str::<Value>(&line) {
                    let _ = tx.try_send(v);
                }
            }
        });
        self.children.push((name.to_owned(), child, tree));
        self.lines.push(rx);
        Ok(self.children.len() - 1)
    }

    fn pid(&self, i: usize) -> u32 {
        self.children[i].1.id()
    }

    /// Stops the processes, last started first: SIGTERM, then SIGKILL; for a tree, also its descendants.
    fn stop_all(&mut self) {
        while let Some((name, mut child, tree)) = self.children.pop() {
            self.lines.pop();
            eprintln!("xtask: stopping {name} (pid {})", child.id());
            if tree {
                let family = descendants(child.id());
                stop_slowly(&mut child, Duration::from_secs(30));
                for (pid, start) in family {
                    // only what is still the same process (same start time) and still alive
                    if read_stat(pid).is_some_and(|s| s.start == start) {
                        let _ = Command::new("kill").args(["-KILL", &pid.to_string()]).status();
                    }
                }
            } else {
                stop(&mut child);
            }
        }
    }
}

impl Drop for Started {
    fn drop(&mut self) {
        self.stop_all();
    }
}

/// SIGTERM, then SIGKILL if it has not exited within `grace` (hivemind's shutdown takes up to 20 s).
fn stop_slowly(child: &mut Child, grace: Duration) {
    let _ = Command::new("kill").arg(child.id().to_string()).status();
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// The first JSON line matching `want` within `timeout_s`; an `error` event fails.
fn wait_for(
    lines: &Receiver<Value>,
    what: &str,
    timeout_s: u64,
    want: impl Fn(&Value) -> bool,
) -> Result<Value> {
    let deadline = Instant::now() + Duration::from_secs(timeout_s);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match lines.recv_timeout(left) {
            Ok(v) if want(&v) => return Ok(v),
            Ok(v) if v["event"] == "error" => bail!("waiting for {what}: {v}"),
            Ok(_) => {}
            Err(mpsc::RecvTimeoutError::Timeout) => bail!("no {what} within {timeout_s} s"),
            Err(mpsc::RecvTimeoutError::Disconnected) => bail!("the process exited before {what}"),
        }
    }
}

/// One `/proc/PID/stat` reading.
struct Stat {
    ppid: u32,
    /// utime + stime, clock ticks.
    ticks: u64,
    /// start time since boot, clock ticks (tells a reused pid apart).
    start: u64,
}

fn read_stat(pid: u32) -> Option<Stat> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // the command name may hold spaces and parentheses: the fields start after the last ')'
    let rest = &text[text.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let num = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok());
    Some(Stat {
        ppid: u32::try_from(num(1)?).ok()?,
        ticks: num(11)? + num(12)?,
        start: num(19)?,
    })
}

/// `(VmRSS in bytes, Threads)` of `/proc/PID/status`.
fn read_status(pid: u32) -> Option<(u64, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| -> Option<u64> {
        text.lines()
            .find(|l| l.starts_with(name))?
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()
    };
    Some((
        field("VmRSS:").unwrap_or(0) * 1024,
        field("Threads:").unwrap_or(0),
    ))
}

/// Proportional set size in bytes (`/proc/PID/smaps_rollup`).
fn read_pss(pid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    let kb: u64 = text
        .lines()
        .find(|l| l.starts_with("Pss:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some(kb * 1024)
}

/// Every descendant of `root` (walking the ppid of every `/proc/*/stat`), with its start time.
fn descendants(root: u32) -> Vec<(u32, u64)> {
    let mut parent: HashMap<u32, Vec<(u32, u64)>> = HashMap::new();
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for e in entries.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
                continue;
            };
            if let Some(s) = read_stat(pid) {
                parent.entry(s.ppid).or_default().push((pid, s.start));
            }
        }
    }
    let (mut out, mut todo) = (Vec::new(), vec![root]);
    while let Some(p) = todo.pop() {
        for &(kid, start) in parent.get(&p).map_or(&[][..], Vec::as_slice) {
            out.push((kid, start));
            todo.push(kid);
        }
    }
    out
}

fn clock_ticks_per_s() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse::<f64>().ok())
        .filter(|&t| t > 0.0)
        .unwrap_or(100.0)
}

/// Waits `--settle` s, then samples each `(pid, whole tree?, name)` once a second for `--seconds` s.
pub(crate) fn sample(targets: &[(u32, bool, &str)], p: &Sampling) -> Result<Vec<Footprint>> {
    let names: Vec<&str> = targets.iter().map(|t| t.2).collect();
    eprintln!(
        "\n==> settle {} s, then sample {} once a second for {} s",
        p.settle,
        names.join(" and "),
        p.seconds
    );
    std::thread::sleep(Duration::from_secs(p.settle));
    let hz = clock_ticks_per_s();
    // per target: (pid, start) → (first ticks, last ticks); RSS sums; most processes and threads
    let mut ticks: Vec<HashMap<(u32, u64), (u64, u64)>> = vec![HashMap::new(); targets.len()];
    let mut rss: Vec<Vec<u64>> = vec![Vec::new(); targets.len()];
    let mut most: Vec<(usize, u64)> = vec![(0, 0); targets.len()];
    let start = Instant::now();
    for n in 0..=p.seconds {
        for (i, &(pid, tree, name)) in targets.iter().enumerate() {
            let root_stat = read_stat(pid).with_context(|| format!("{name} (pid {pid}) has exited"))?;
            let mut pids = vec![(pid, root_stat.start)];
            if tree {
                pids.extend(descendants(pid));
            }
            let (mut bytes, mut threads, mut alive) = (0, 0, 0);
            for (q, q_start) in pids {
                let Some(s) = read_stat(q).filter(|s| s.start == q_start) else {
                    continue;
                };
                let Some((r, t)) = read_status(q) else { continue };
                alive += 1;
                bytes += r;
                threads += t;
                ticks[i]
                    .entry((q, q_start))
                    .and_modify(|e| e.1 = s.ticks)
                    .or_insert((s.ticks, s.ticks));
            }
            rss[i].push(bytes);
            most[i] = (most[i].0.max(alive), most[i].1.max(threads));
        }
        let next = start + Duration::from_secs(n + 1);
        if n < p.seconds {
            std::thread::sleep(next.saturating_duration_since(Instant::now()));
        }
    }
    let window = start.elapsed().as_secs_f64();
    let mut out = Vec::new();
    for (i, &(pid, tree, _)) in targets.iter().enumerate() {
        let used: u64 = ticks[i].values().map(|(a, b)| b - a).sum();
        let mb = |b: u64| b as f64 / 1e6;
        let pss = if tree {
            let mut all = vec![pid];
            all.extend(descendants(pid).into_iter().map(|d| d.0));
            all.into_iter().map(read_pss).sum::<Option<u64>>()
        } else {
            read_pss(pid)
        };
        out.push(Footprint {
            cpu_pct: 100.0 * used as f64 / hz / window,
            rss_mean_mb: mb(rss[i].iter().sum::<u64>()) / rss[i].len() as f64,
            rss_max_mb: mb(rss[i].iter().copied().max().unwrap_or(0)),
            pss_end_mb: pss.map(mb),
            procs: most[i].0,
            threads: most[i].1,
            ..Footprint::default()
        });
    }
    Ok(out)
}

fn table(
    p: &Params,
    node: &Footprint,
    publisher: &Footprint,
    hivemind: &Footprint,
    probes: &Value,
) -> Result<String> {
    let cpu = crate::bench::cpu_model();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut t = String::new();
    writeln!(
        t,
        "## Idle footprint: `apiary node run` joined to an experiment but paused, beside an idle hivemind server\n"
    )?;
    writeln!(
        t,
        "`cargo xtask bench idle --seconds {} --settle {}`: sampled once a second for {} s after {} s of settling, \
         CPU = utime + stime of `/proc/PID/stat` over the window, RSS = `VmRSS` (MB = 10⁶ bytes), PSS at the \
         end of the window. Machine: {cpu}, {cores} CPUs.\n",
        p.seconds, p.settle, p.seconds, p.settle
    )?;
    writeln!(
        t,
        "| process | CPU % of one core (mean) | RSS MB (mean) | RSS MB (max) | PSS MB (end) | processes | threads |"
    )?;
    writeln!(t, "|---|---|---|---|---|---|---|")?;
    let pss = |f: &Footprint| f.pss_end_mb.map_or_else(|| "?".to_owned(), |m| format!("{m:.1}"));
    for f in [node, hivemind] {
        writeln!(
            t,
            "| {} | {:.2} | {:.1} | {:.1} | {} | {} | {} |",
            f.label,
            f.cpu_pct,
            f.rss_mean_mb,
            f.rss_max_mb,
            pss(f),
            f.procs,
            f.threads
        )?;
    }
    let ratio = |h: f64, a: f64| {
        if a > 0.0 {
            format!("{:.1}×", h / a)
        } else {
            "∞".to_owned()
        }
    };
    writeln!(
        t,
        "| hivemind ÷ Apiary | {} | {} | {} | {} | | |",
        ratio(hivemind.cpu_pct, node.cpu_pct),
        ratio(hivemind.rss_mean_mb, node.rss_mean_mb),
        ratio(hivemind.rss_max_mb, node.rss_max_mb),
        match (hivemind.pss_end_mb, node.pss_end_mb) {
            (Some(h), Some(a)) => ratio(h, a),
            _ => String::new(),
        }
    )?;
    writeln!(
        t,
        "| {} | {:.2} | {:.1} | {:.1} | {} | {} | {} |",
        publisher.label,
        publisher.cpu_pct,
        publisher.rss_mean_mb,
        publisher.rss_max_mb,
        pss(publisher),
        publisher.procs,
        publisher.threads
    )?;
    writeln!(t)?;
    writeln!(
        t,
        "| bound (issue 7), `apiary node run` paused | measured | met |"
    )?;
    writeln!(t, "|---|---|---|")?;
    let met = |ok: bool| if ok { "yes" } else { "**no**" };
    writeln!(
        t,
        "| CPU ≤ {CPU_BOUND_PCT} % of one core, mean over {} s | {:.2} % | {} |",
        p.seconds,
        node.cpu_pct,
        met(node.cpu_pct <= CPU_BOUND_PCT)
    )?;
    writeln!(
        t,
        "| RSS ≤ {RSS_BOUND_MB} MB, mean over {} s | {:.1} MB (max {:.1}) | {} |",
        p.seconds,
        node.rss_mean_mb,
        node.rss_max_mb,
        met(node.rss_mean_mb <= RSS_BOUND_MB)
    )?;
    writeln!(t)?;
    writeln!(
        t,
        "- A process tree's RSS is the sum over its {} processes, so the pages hivemind's forked processes share \
         (Python, torch) count once per process; PSS shares them out and is the fair comparison of the trees.",
        hivemind.procs
    )?;
    let us = |k: &str| -> Result<String> {
        let v = |f: &str| {
            probes[k][f]
                .as_f64()
                .with_context(|| format!("{k}.{f} missing in {probes}"))
        };
        Ok(format!("{:.1} µs (median {:.1})", v("mean_us")?, v("median_us")?))
    };
    let per_s = probes["per_second_us"]
        .as_f64()
        .with_context(|| format!("per_second_us missing in {probes}"))?;
    writeln!(
        t,
        "- Governor probes (`apiary_governor::Probes::platform()`, release, paced as the governor samples them for \
         {} s), mean wall time per call: activity {} (every 100 ms), GPU {}, power {}, system {} (each every 1 s): \
         {:.0} µs per second from the means = {:.3} % of one core; the probing thread's own CPU time \
         was {} of one core. First calls (connecting, loading NVML): activity {:.0} µs, GPU {:.0} µs, power {:.0} \
         µs, system {:.0} µs.",
        probes["seconds"],
        us("activity")?,
        us("gpu")?,
        us("power")?,
        us("system")?,
        per_s,
        per_s / 1e4,
        probes["loop_cpu_pct"]
            .as_f64()
            .map_or_else(|| "unknown".to_owned(), |c| format!("{c:.3} %")),
        probes["activity"]["first_us"].as_f64().unwrap_or(0.0),
        probes["gpu"]["first_us"].as_f64().unwrap_or(0.0),
        probes["power"]["first_us"].as_f64().unwrap_or(0.0),
        probes["system"]["first_us"].as_f64().unwrap_or(0.0),
    )?;
    writeln!(t, "- Probe readings on this machine: {}", probes["last_readings"])?;
    if let Some(uids) = node.info["uids"].as_array() {
        writeln!(
            t,
            "- The node hosts {} (`ffn`, hidden {HIDDEN}); the hivemind server the same number of `ffn` experts of \
             hidden {HIDDEN}, hivemind's defaults otherwise.",
            uids.iter()
                .filter_map(Value::as_str)
                .collect::<Vec<_>>()
                .join(", ")
        )?;
    }
    Ok(t)
}
