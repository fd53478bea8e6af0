//! `cargo xtask bench`: Apiary's tensor codecs beside hivemind's, on this machine, in one run.
//!
//! Both sides time the measure of hivemind's `benchmarks/benchmark_tensor_compression.py`: a seeded
//! 10M-element float32 randn vector serialized to a `runtime.proto` Tensor and deserialized back, per
//! codec, median of 30 iterations. Apiary's side is apiary-wire's `codec_throughput` example (release
//! build), hivemind's is `tests/interop/bench_tensor_compression.py` in the cached venv. Both print JSON
//! lines; this prints a markdown table and writes it to `target/bench/tensor-codecs.md`.
//!
//! ```text
//! cargo xtask bench [codecs] [--iters 30] [--size 10000000]
//! cargo xtask bench dht [ARGS of `apiary bench dht`]
//! ```
//!
//! `bench dht` runs `apiary bench dht` (release) and `tests/interop/bench_dht.py` (hivemind's
//! `benchmark_dht.py` measure) with the same parameters, by default the issue's
//! `--num-peers 64 --initial-peers 4 --total-num-rounds 8 --num-store-peers 8 --num-get-peers 8
//! --failure-rate 0.1`, and prints the side-by-side table (also `target/bench/dht.md`).
//!
//! `bench server [--experts 4 --clients 4 --batches 8 --batch 256 --hidden 1024 --forward-only]`
//! measures hivemind's `benchmark_throughput.py` three ways: (a) `apiary bench server` (Apiary clients →
//! Apiary server, plus the same work in-process), (b) `tests/interop/bench_server.py --initial-peers` of
//! a running `apiary server` (hivemind clients → Apiary server), (c) `bench_server.py` alone (hivemind
//! clients → hivemind server); table in `target/bench/server.md`.
//!
//! `bench moe [--steps 10 --warmup 2 --latency-ms 0 100 --hivemind-steps N --via netns|transport]`: trainer
//! throughput of the demo's model against 3 local volunteers, `apiary bench moe` beside
//! `tests/interop/bench_moe.py` (hivemind's `RemoteMixtureOfExperts` against hivemind `Server`s), at each
//! one-way latency; table in `target/bench/moe.md`. See [`moe`].
//!
//! `bench idle [--seconds 60]`: idle CPU and RSS of `apiary node run` joined but paused, beside an idle
//! hivemind server's process tree, and the governor probes' cost per tick; `target/bench/idle.md`. See
//! [`crate::bench_idle`].
//!
//! `bench desktop [--launches 5] [--seconds 60]`: the desktop app's binary size, cold start to the first
//! painted dashboard and idle footprint (paused, window closed); `target/bench/desktop.md`. See
//! [`crate::bench_desktop`].

use std::fmt::Write as _;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::{root, setup, show, step};

/// Table rows: `(label, Apiary's row, hivemind's row)`.
const ROWS: &[(&str, &str, &str)] = &[
    ("NONE (zero-copy)", "NONE", "NONE"),
    ("NONE (+ copy from &[f32])", "NONE+copy", "NONE"),
    ("FLOAT16", "FLOAT16", "FLOAT16"),
    ("MEANSTD_16BIT", "MEANSTD_16BIT", "MEANSTD_16BIT"),
    ("UNIFORM_8BIT", "UNIFORM_8BIT", "UNIFORM_8BIT"),
    ("QUANTILE_8BIT", "QUANTILE_8BIT", "QUANTILE_8BIT"),
    ("BLOCKWISE_8BIT", "BLOCKWISE_8BIT", "BLOCKWISE_8BIT"),
];

#[derive(Debug)]
struct Measure {
    codec: String,
    median_s: f64,
    gbps: f64,
}

pub fn run(args: &[String]) -> Result<()> {
    match args.first().map(String::as_str) {
        Some("dht") => dht(&args[1..]),
        Some("server") => server(&args[1..]),
        Some("moe") => moe::run(&args[1..]),
        Some("idle") => crate::bench_idle::run(&args[1..]),
        Some("desktop") => crate::bench_desktop::run(&args[1..]),
        Some("codecs") => codecs(&args[1..]),
        _ => codecs(args),
    }
}

fn codecs(args: &[String]) -> Result<()> {
    let (mut iters, mut size) = (30usize, 10_000_000usize);
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut value = |name: &str| -> Result<usize> {
            it.next()
                .and_then(|v| v.parse().ok())
                .with_context(|| format!("{name} needs a positive number"))
        };
        match a.as_str() {
            "--iters" => iters = value("--iters")?.max(1),
            "--size" => size = value("--size")?.max(1),
            other => bail!("unknown argument {other:?}; usage: cargo xtask bench [--iters N] [--size N]"),
        }
    }
    let env = setup::all()?;
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    step(
        "build Apiary's codec benchmark (release)",
        Command::new(&cargo).args([
            "build",
            "--release",
            "--quiet",
            "-p",
            "apiary-wire",
            "--example",
            "codec_throughput",
        ]),
    )?;
    let (size_s, iters_s) = (size.to_string(), iters.to_string());
    let example = |extra: &[&str]| {
        let mut cmd = Command::new(&cargo);
        cmd.args([
            "run",
            "--release",
            "--quiet",
            "-p",
            "apiary-wire",
            "--example",
            "codec_throughput",
            "--",
        ])
        .args(["--size", &size_s, "--iters", &iters_s])
        .args(extra);
        cmd
    };
    let apiary = measure("Apiary: serialize + deserialize per codec", &mut example(&[]))?;
    let fresh = measure(
        "Apiary again with buffer recycling off: every output is a fresh allocation",
        &mut example(&["--no-pool"]),
    )?;
    let hivemind = measure(
        "hivemind 1.1.12: serialize_torch_tensor + deserialize_torch_tensor per codec",
        Command::new(&env.hivemind_python)
            .arg(root().join("tests/interop/bench_tensor_compression.py"))
            .args(["--size", &size_s, "--iters", &iters_s]),
    )?;
    let report = table(&apiary, &fresh, &hivemind, size, iters)?;
    publish("tensor-codecs.md", &report)
}

#[allow(clippy::print_stdout)]
fn print_report(report: &str) {
    println!("{report}");
}

/// Runs a benchmark command (stderr shown, stdout captured) and parses the JSON lines it prints.
fn json_lines(why: &str, cmd: &mut Command) -> Result<Vec<Value>> {
    eprintln!("\n==> {why}\n    $ {}", show(cmd));
    let out = cmd
        .current_dir(root())
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("could not start `{}`", show(cmd)))?;
    if !out.status.success() {
        bail!("`{}` failed ({})", show(cmd), out.status);
    }
    let text = String::from_utf8(out.stdout).context("benchmark output is not UTF-8")?;
    text.lines()
        .filter(|l| l.trim_start().starts_with('{'))
        .map(|line| serde_json::from_str(line).with_context(|| format!("bad benchmark line {line:?}")))
        .collect()
}

/// The codec rows a benchmark command prints.
fn measure(why: &str, cmd: &mut Command) -> Result<Vec<Measure>> {
    let mut rows = Vec::new();
    for v in json_lines(why, cmd)? {
        let field = |k: &str| v[k].as_f64().with_context(|| format!("{k} missing in {v}"));
        rows.push(Measure {
            codec: v["codec"].as_str().context("codec missing")?.to_owned(),
            median_s: field("median_s")?,
            gbps: field("gbps")?,
        });
    }
    if rows.is_empty() {
        bail!("`{}` printed no measurements", show(cmd));
    }
    Ok(rows)
}

/// Writes a report under `target/bench/` and prints it.
pub(crate) fn publish(name: &str, report: &str) -> Result<()> {
    let dir = root().join("target/bench");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let file = dir.join(name);
    std::fs::write(&file, report).with_context(|| format!("writing {}", file.display()))?;
    print_report(report);
    eprintln!("xtask: table written to {}", file.display());
    Ok(())
}

fn find<'a>(rows: &'a [Measure], codec: &str) -> Result<&'a Measure> {
    rows.iter()
        .find(|m| m.codec == codec)
        .with_context(|| format!("no {codec} measurement"))
}

fn gbps(m: &Measure) -> String {
    if m.gbps >= 1000.0 {
        format!("{:.0} ({:.1} µs)", m.gbps, m.median_s * 1e6)
    } else {
        format!("{:.2} ({:.1} ms)", m.gbps, m.median_s * 1e3)
    }
}

fn table(
    apiary: &[Measure],
    fresh: &[Measure],
    hivemind: &[Measure],
    size: usize,
    iters: usize,
) -> Result<String> {
    let memcpy = find(apiary, "memcpy")?;
    let alloc_memcpy = find(apiary, "alloc+memcpy")?;
    let mut t = String::new();
    let cpu = cpu_model();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    writeln!(
        t,
        "## Tensor codecs: serialize + deserialize of {size} float32 values (median of {iters})\n"
    )?;
    writeln!(
        t,
        "Machine: {cpu}, {cores} CPUs. GB/s = 4·numel bytes / median round-trip time (10^9 B/s).\n"
    )?;
    writeln!(
        t,
        "| codec | Apiary GB/s | hivemind GB/s | ratio | Apiary, fresh buffers | ratio, fresh | memcpy GB/s |"
    )?;
    writeln!(t, "|---|---|---|---|---|---|---|")?;
    let (mut worst, mut worst_fresh) = (f64::INFINITY, f64::INFINITY);
    for &(label, ours, theirs) in ROWS {
        let (a, f, h) = (find(apiary, ours)?, find(fresh, ours)?, find(hivemind, theirs)?);
        let (ratio, ratio_fresh) = (a.gbps / h.gbps, f.gbps / h.gbps);
        if ours != "NONE" {
            worst = worst.min(ratio);
            worst_fresh = worst_fresh.min(ratio_fresh);
        }
        // The zero-copy row moves no bytes: a ratio of it would mean nothing.
        let show = |r: f64| {
            if ours == "NONE" {
                "— (no copy)".to_owned()
            } else {
                format!("{r:.1}×")
            }
        };
        writeln!(
            t,
            "| {label} | {} | {} | {} | {} | {} | {:.2} |",
            gbps(a),
            gbps(h),
            show(ratio),
            gbps(f),
            show(ratio_fresh),
            memcpy.gbps
        )?;
    }
    let copy = find(apiary, "NONE+copy")?;
    writeln!(t)?;
    writeln!(
        t,
        "- memcpy: `copy_from_slice` into an existing buffer; with a fresh allocation (every page faulted in) it \
         is {:.2} GB/s.",
        alloc_memcpy.gbps
    )?;
    writeln!(
        t,
        "- NONE (zero-copy) shares the tensor's buffer both ways; NONE (+ copy) starts from a borrowed `&[f32]` and \
         runs at {:.0}% of memcpy (target ≥ 50%).",
        100.0 * copy.gbps / memcpy.gbps
    )?;
    writeln!(
        t,
        "- Slowest codec ratio (NONE zero-copy excluded): {worst:.1}× with recycled output buffers (a node \
         serializing every step), {worst_fresh:.1}× with a fresh allocation per output (target ≥ 3×)."
    )?;
    Ok(t)
}

/// The issue's parameters of hivemind's `benchmark_dht.py` run, used when none are given.
const DHT_DEFAULTS: &[&str] = &[
    "--num_peers",
    "64",
    "--initial_peers",
    "4",
    "--total_num_rounds",
    "8",
    "--num_store_peers",
    "8",
    "--num_get_peers",
    "8",
    "--failure_rate",
    "0.1",
];

fn dht(args: &[String]) -> Result<()> {
    let params: Vec<String> = if args.is_empty() {
        DHT_DEFAULTS.iter().map(|s| (*s).to_owned()).collect()
    } else {
        // hivemind's script takes snake_case; `apiary bench dht` takes both.
        args.iter()
            .map(|a| {
                if a.starts_with("--") {
                    a.replace('-', "_").replacen("__", "--", 1)
                } else {
                    a.clone()
                }
            })
            .collect()
    };
    let (env, target) = setup_and_build_apiary()?;
    let apiary = one_json(
        "Apiary: all DHT nodes in one process",
        Command::new(target.join("release/apiary"))
            .args(["--json", "-q", "bench", "dht"])
            .args(&params),
    )?;
    let hivemind = one_json(
        "hivemind 1.1.12: benchmark_dht.py's measure through hivemind's API",
        Command::new(&env.hivemind_python)
            .arg(root().join("tests/interop/bench_dht.py"))
            .args(&params),
    )?;
    let report = dht_table(&apiary, &hivemind, &params)?;
    publish("dht.md", &report)
}

/// Runs a command whose stdout ends with one JSON result line.
pub(crate) fn one_json(why: &str, cmd: &mut Command) -> Result<Value> {
    json_lines(why, cmd)?.pop().context("no JSON result line")
}

fn dht_table(apiary: &Value, hivemind: &Value, params: &[String]) -> Result<String> {
    let num = |v: &Value, k: &str| v[k].as_f64().with_context(|| format!("{k} missing in {v}"));
    let mut t = String::new();
    writeln!(
        t,
        "## DHT: hivemind's benchmark_dht.py measure (`{}`)\n",
        params.join(" ")
    )?;
    writeln!(
        t,
        "| measure | Apiary | hivemind 1.1.12 | hivemind / Apiary | target |"
    )?;
    writeln!(t, "|---|---|---|---|---|")?;
    for (label, key, target) in [
        ("create all peers (s)", "create_s", "≥ 10×"),
        ("store round, mean (s)", "store_round_mean_s", "≥ 4×"),
        ("get round, mean (s)", "get_round_mean_s", "≥ 4×"),
    ] {
        let (a, h) = (num(apiary, key)?, num(hivemind, key)?);
        writeln!(t, "| {label} | {a:.3} | {h:.3} | {:.1}× | {target} |", h / a)?;
    }
    for (label, key) in [("store success", "store_success"), ("get success", "get_success")] {
        let (a, h) = (num(apiary, key)?, num(hivemind, key)?);
        writeln!(t, "| {label} | {:.1}% | {:.1}% | | 100% |", 100.0 * a, 100.0 * h)?;
    }
    let (a, h) = (num(apiary, "rss_mb")?, num(hivemind, "rss_mb")?);
    let peers = num(apiary, "peers")?;
    writeln!(
        t,
        "| memory of all peers (MiB, PSS) | {a:.0} | {h:.0} | {:.1}× | all Apiary peers < 4 hivemind peers ({:.0} MiB) |",
        h / a,
        4.0 * h / peers
    )?;
    Ok(t)
}

/// `(flag, default)` of the server benchmark: the issue's preset.
const SERVER_DEFAULTS: &[(&str, &str)] = &[
    ("--experts", "4"),
    ("--clients", "4"),
    ("--batches", "8"),
    ("--batch", "256"),
    ("--hidden", "1024"),
];

fn server(args: &[String]) -> Result<()> {
    let mut values: Vec<(String, String)> = SERVER_DEFAULTS
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    let mut forward_only = false;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if a == "--forward-only" {
            forward_only = true;
            continue;
        }
        let Some(slot) = values.iter_mut().find(|(k, _)| k == a) else {
            bail!(
                "unknown argument {a:?}; usage: cargo xtask bench server [--experts N] [--clients N] \
                 [--batches N] [--batch N] [--hidden N] [--forward-only]"
            );
        };
        let v = it.next().filter(|v| v.parse::<usize>().is_ok_and(|n| n > 0));
        slot.1 = v.with_context(|| format!("{a} needs a positive number"))?.clone();
    }
    let get = |k: &str| -> usize {
        values
            .iter()
            .find(|(key, _)| key == k)
            .and_then(|(_, v)| v.parse().ok())
            .unwrap_or(0)
    };
    let (experts, hidden) = (get("--experts"), get("--hidden"));
    let mut params: Vec<String> = values.iter().flat_map(|(k, v)| [k.clone(), v.clone()]).collect();
    if forward_only {
        params.push("--forward-only".to_owned());
    }

    let (env, target) = setup_and_build_apiary()?;
    let apiary_bin = target.join("release/apiary");
    let script = root().join("tests/interop/bench_server.py");

    let apiary = one_json(
        "(a) Apiary clients → Apiary server, all in one process (and the same work in-process)",
        Command::new(&apiary_bin)
            .args(["--json", "-q", "bench", "server"])
            .args(&params),
    )?;

    // (b) a standalone `apiary server` with the same experts, hivemind clients aimed at it
    let uids: Vec<String> = (0..experts).map(|i| format!("expert.{i}")).collect();
    let mut serve = Command::new(&apiary_bin);
    serve
        .args(["--json", "-q", "server", "--expert-uids"])
        .args(&uids)
        .args(["--hidden-dim", &hidden.to_string(), "--max-batch-size", "4096"])
        .args(["--host-maddrs", "/ip4/127.0.0.1/tcp/0"]);
    eprintln!("\n==> start an Apiary expert server\n    $ {}", show(&serve));
    let mut child = serve
        .current_dir(root())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("could not start `{}`", show(&serve)))?;
    let served = (|| -> Result<(Value, Option<f64>)> {
        let stdout = child.stdout.take().context("no stdout")?;
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .context("reading the server's ready line")?;
        let ready: Value = serde_json::from_str(&line).with_context(|| format!("bad ready line {line:?}"))?;
        let maddr = ready["maddrs"][0]
            .as_str()
            .context("the ready line has no maddrs")?
            .to_owned();
        std::thread::sleep(std::time::Duration::from_secs(2));
        let idle_mb = pss_mb(child.id());
        let result = one_json(
            "(b) hivemind clients → the Apiary server",
            Command::new(&env.hivemind_python)
                .arg(&script)
                .args(["--initial-peers", &maddr])
                .args(&params),
        )?;
        Ok((result, idle_mb))
    })();
    stop(&mut child);
    let (cross, apiary_server_mb) = served?;

    let hivemind = one_json(
        "(c) hivemind clients → hivemind server (benchmark_throughput.py's measure)",
        Command::new(&env.hivemind_python).arg(&script).args(&params),
    )?;
    let report = server_table(&apiary, &cross, &hivemind, apiary_server_mb, &params)?;
    publish("server.md", &report)
}

/// SIGTERM (a clean shutdown), then SIGKILL if it has not exited after 10 s.
pub(crate) fn stop(child: &mut Child) {
    let _ = Command::new("kill").arg(child.id().to_string()).status();
    for _ in 0..100 {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// A process's proportional resident memory, in MiB.
fn pss_mb(pid: u32) -> Option<f64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    let line = text.lines().find(|l| l.starts_with("Pss:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

fn server_table(
    apiary: &Value,
    cross: &Value,
    hivemind: &Value,
    apiary_server_mb: Option<f64>,
    params: &[String],
) -> Result<String> {
    let num = |v: &Value, k: &str| v[k].as_f64().with_context(|| format!("{k} missing in {v}"));
    let (a, x, h) = (
        num(apiary, "samples_per_s")?,
        num(cross, "samples_per_s")?,
        num(hivemind, "samples_per_s")?,
    );
    let local = num(apiary, "local_samples_per_s")?;
    let cpu = cpu_model();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut t = String::new();
    writeln!(
        t,
        "## Expert server: hivemind's benchmark_throughput.py measure (`{}`), `ffn` experts\n",
        params.join(" ")
    )?;
    writeln!(t, "Machine: {cpu}, {cores} CPUs; all three runs back to back.\n")?;
    writeln!(
        t,
        "| clients → server | samples/s | vs hivemind → hivemind | batch-1 forward (ms) |"
    )?;
    writeln!(t, "|---|---|---|---|")?;
    for (label, v, s) in [
        ("Apiary → Apiary", apiary, a),
        ("hivemind → Apiary", cross, x),
        ("hivemind → hivemind", hivemind, h),
    ] {
        writeln!(
            t,
            "| {label} | {s:.0} | {:.2}× | {:.2} |",
            s / h,
            num(v, "batch1_forward_ms")?
        )?;
    }
    writeln!(t)?;
    writeln!(t, "| measure | value | target |")?;
    writeln!(t, "|---|---|---|")?;
    writeln!(
        t,
        "| Apiary server ÷ hivemind server (Apiary clients / hivemind clients) | {:.2}× | ≥ 1.5× |",
        a / h
    )?;
    writeln!(
        t,
        "| Apiary server ÷ hivemind server (both with hivemind clients) | {:.2}× | |",
        x / h
    )?;
    writeln!(
        t,
        "| Apiary in-process rate, same work (samples/s) | {local:.0} | |"
    )?;
    writeln!(
        t,
        "| Apiary server as % of its in-process rate | {:.0}% | ≥ 90% |",
        100.0 * a / local
    )?;
    let apiary_mb = num(apiary, "server_rss_mb")?;
    let hivemind_mb = num(hivemind, "server_rss_mb")?;
    writeln!(
        t,
        "| idle server memory, PSS (MiB): Apiary (in `bench server`) / hivemind process tree | {apiary_mb:.0} / {hivemind_mb:.0} = {:.2} | ≤ 0.25 |",
        apiary_mb / hivemind_mb
    )?;
    if let Some(mb) = apiary_server_mb {
        writeln!(
            t,
            "| idle `apiary server` process (with its DHT), PSS (MiB) | {mb:.0} ({:.2} of hivemind's) | ≤ 0.25 |",
            mb / hivemind_mb
        )?;
    }
    let (a1, h1) = (
        num(apiary, "batch1_forward_ms")?,
        num(hivemind, "batch1_forward_ms")?,
    );
    writeln!(
        t,
        "| batch-1 forward round trip (ms): Apiary → Apiary / hivemind → hivemind | {a1:.2} / {h1:.2} ({:.1}× faster) | |",
        h1 / a1
    )?;
    Ok(t)
}

/// Installs what the benchmarks need and builds the release `apiary`; returns the setup and the target dir.
pub(crate) fn setup_and_build_apiary() -> Result<(setup::Env, PathBuf)> {
    let env = setup::all()?;
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    step(
        "build the apiary binary (release)",
        Command::new(&cargo).args(["build", "--release", "--quiet", "-p", "apiary-cli"]),
    )?;
    let target = std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root().join("target"), Into::into);
    Ok((env, target))
}

/// `cargo xtask bench moe`: `apiary bench moe` and `tests/interop/bench_moe.py` at each latency.
///
/// Latency (`--via netns`, the default): each run pair gets a fresh network namespace
/// (`apiary-moe-<pid>-<ms>`) whose loopback delays every packet `L` ms once — what `tc qdisc add dev lo
/// root netem delay <L>ms` does, so a round trip takes `2L` and every connection (DHT, expert RPCs, TCP
/// handshakes and ACKs) sees it. Kernels without `sch_netem` (this project's CI VMs: no
/// `CONFIG_NET_SCH_NETEM`, no modules) get the same delay from a userspace delay line: an iptables rule
/// sends every loopback packet leaving `OUTPUT` to netfilter queue 0, and `bench_moe.py delay --ms L` holds
/// each one `L` ms before accepting it. Both benchmarks run inside the namespace (`ip netns exec`), which
/// is deleted afterwards, also when a run fails. `--via transport` (or the fallback when no namespace can
/// be made) injects the latency inside each trainer instead: every expert RPC waits `L` before leaving
/// and `L` before its reply is used; DHT traffic is not delayed.
mod moe {
    use std::fmt::Write as _;
    use std::io::{BufRead, BufReader};
    use std::process::{Child, Command, Stdio};

    use anyhow::{Context, Result, bail};
    use serde_json::Value;

    use super::{one_json, publish, setup_and_build_apiary};
    use crate::{root, show};

    const USAGE: &str = "usage: cargo xtask bench moe [--steps N] [--warmup N] [--hivemind-steps N] \
                         [--latency-ms L ...] [--via netns|transport]";

    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum Via {
        Netns,
        Transport,
    }

    struct Params {
        steps: u64,
        warmup: u64,
        hivemind_steps: Option<u64>,
        latencies: Vec<u64>,
        via: Via,
    }

    fn parse(args: &[String]) -> Result<Params> {
        let mut p = Params {
            steps: 10,
            warmup: 2,
            hivemind_steps: None,
            latencies: vec![0, 100],
            via: Via::Netns,
        };
        let mut latencies = Vec::new();
        let mut it = args.iter().peekable();
        while let Some(a) = it.next() {
            let mut number = |name: &str| -> Result<u64> {
                it.next()
                    .and_then(|v| v.parse().ok())
                    .with_context(|| format!("{name} needs a number\n{USAGE}"))
            };
            match a.as_str() {
                "--steps" => p.steps = number("--steps")?.max(1),
                "--warmup" => p.warmup = number("--warmup")?,
                "--hivemind-steps" => p.hivemind_steps = Some(number("--hivemind-steps")?.max(1)),
                "--latency-ms" => {
                    latencies.push(number("--latency-ms")?);
                    while let Some(v) = it.peek().and_then(|v| v.parse::<u64>().ok()) {
                        latencies.push(v);
                        it.next();
                    }
                }
                "--via" => {
                    p.via = match it.next().map(String::as_str) {
                        Some("netns") => Via::Netns,
                        Some("transport") => Via::Transport,
                        _ => bail!("--via takes netns or transport\n{USAGE}"),
                    }
                }
                other => bail!("unknown argument {other:?}\n{USAGE}"),
            }
        }
        if !latencies.is_empty() {
            p.latencies = latencies;
        }
        Ok(p)
    }

    /// One measured row.
    struct Row {
        apiary: Value,
        hivemind: Value,
        latency_ms: u64,
        via: Via,
    }

    pub fn run(args: &[String]) -> Result<()> {
        let p = parse(args)?;
        let (env, target) = setup_and_build_apiary()?;
        let apiary_bin = target.join("release/apiary");
        let script = root().join("tests/interop/bench_moe.py");
        let mut via = p.via;
        if via == Via::Netns {
            if let Err(e) = crate::nat::tools() {
                eprintln!(
                    "xtask: no network namespaces here ({e:#}); injecting the latency in the trainers instead"
                );
                via = Via::Transport;
            } else {
                // namespaces a killed earlier run left behind (their xtask's pid is gone)
                crate::nat::remove_stale_namespaces("apiary-moe-");
            }
        }
        let mut rows = Vec::new();
        for &latency in &p.latencies {
            let ms = latency.to_string();
            let mut ns = None;
            if via == Via::Netns {
                match Netns::create(latency, &script, &env.hivemind_python) {
                    Ok(n) => ns = Some(n),
                    Err(e) if rows.is_empty() => {
                        eprintln!(
                            "xtask: could not set up a namespace ({e:#}); injecting the latency in the trainers instead"
                        );
                        via = Via::Transport;
                    }
                    Err(e) => return Err(e),
                }
            }
            let latency_flag = if via == Via::Netns {
                "--network-latency-ms"
            } else {
                "--latency-ms"
            };
            // inside the namespace when there is one; it is deleted when `ns` drops, also on an error
            let command = |program: &std::path::Path| -> Command {
                match &ns {
                    Some(n) => {
                        let mut c = Command::new("ip");
                        c.args(["netns", "exec", &n.name]).arg(program);
                        c
                    }
                    None => Command::new(program),
                }
            };
            let steps = p.steps.to_string();
            let warmup = p.warmup.to_string();
            let apiary = one_json(
                &format!("Apiary trainer, {latency} ms one-way"),
                command(&apiary_bin)
                    .args([
                        "--json", "-q", "bench", "moe", "--steps", &steps, "--warmup", &warmup,
                    ])
                    .args([latency_flag, &ms]),
            )?;
            let hsteps = p.hivemind_steps.unwrap_or(p.steps).to_string();
            let hivemind = one_json(
                &format!("hivemind 1.1.12 trainer (RemoteMixtureOfExperts), {latency} ms one-way"),
                command(&env.hivemind_python)
                    .arg(&script)
                    .args([
                        "--steps",
                        &hsteps,
                        "--warmup",
                        &warmup,
                        "--forward-timeout",
                        "300",
                    ])
                    .args([latency_flag, &ms]),
            )?;
            drop(ns);
            rows.push(Row {
                apiary,
                hivemind,
                latency_ms: latency,
                via,
            });
        }
        let report = table(&rows, &p)?;
        publish("moe.md", &report)
    }

    /// A network namespace whose loopback delays every packet; deleted on drop.
    struct Netns {
        name: String,
        delay_line: Option<Child>,
    }

    impl Netns {
        fn create(latency_ms: u64, script: &std::path::Path, python: &std::path::Path) -> Result<Self> {
            let name = format!("apiary-moe-{}-{latency_ms}", std::process::id());
            let ip = |args: &[&str]| -> Result<()> {
                let mut c = Command::new("ip");
                c.args(args);
                let status = c.status().with_context(|| format!("running `{}`", show(&c)))?;
                if !status.success() {
                    bail!("`{}` failed ({status})", show(&c));
                }
                Ok(())
            };
            eprintln!("\n==> network namespace {name}: loopback up, every packet delayed {latency_ms} ms");
            ip(&["netns", "add", &name])?;
            let mut ns = Self {
                name: name.clone(),
                delay_line: None,
            };
            ip(&["netns", "exec", &name, "ip", "link", "set", "lo", "up"])?;
            if latency_ms > 0 {
                ip(&[
                    "netns",
                    "exec",
                    &name,
                    "iptables",
                    "-A",
                    "OUTPUT",
                    "-o",
                    "lo",
                    "-j",
                    "NFQUEUE",
                    "--queue-num",
                    "0",
                ])?;
                let mut line = Command::new("ip");
                line.args(["netns", "exec", &name]).arg(python).arg(script).args([
                    "delay",
                    "--ms",
                    &latency_ms.to_string(),
                    "--queue",
                    "0",
                ]);
                eprintln!("    $ {}", show(&line));
                let mut child = line
                    .stdout(Stdio::piped())
                    .stderr(Stdio::inherit())
                    .spawn()
                    .with_context(|| format!("could not start `{}`", show(&line)))?;
                let stdout = child.stdout.take().context("no stdout")?;
                ns.delay_line = Some(child);
                let mut ready = String::new();
                BufReader::new(stdout)
                    .read_line(&mut ready)
                    .context("reading the delay line's ready line")?;
                if ready.trim() != "ready" {
                    bail!("the delay line did not start (said {ready:?})");
                }
            }
            Ok(ns)
        }
    }

    impl Drop for Netns {
        fn drop(&mut self) {
            if let Some(mut child) = self.delay_line.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
            let _ = Command::new("ip").args(["netns", "del", &self.name]).status();
        }
    }

    /// The flags of this run beyond `--steps` and `--warmup`, as they would be typed.
    fn flags(p: &Params, via: Via) -> String {
        let mut f = String::new();
        if let Some(h) = p.hivemind_steps {
            f.push_str(&format!(" --hivemind-steps {h}"));
        }
        if p.latencies != [0, 100] {
            let l: Vec<String> = p.latencies.iter().map(ToString::to_string).collect();
            f.push_str(&format!(" --latency-ms {}", l.join(" ")));
        }
        if via == Via::Transport {
            f.push_str(" --via transport");
        }
        f
    }

    fn table(rows: &[Row], p: &Params) -> Result<String> {
        let num = |v: &Value, k: &str| v[k].as_f64().with_context(|| format!("{k} missing in {v}"));
        let first = rows.first().context("no measurements")?;
        let a = &first.apiary;
        let cpu = super::cpu_model();
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let mut t = String::new();
        writeln!(
            t,
            "## MoE trainer: the demo's model against {} local volunteers\n",
            num(a, "volunteers")?
        )?;
        writeln!(
            t,
            "{} blocks, d_model {}, `ffn` experts (hidden {}) on a {} grid per block ({} experts), k_best {}, \
             batches of {}×{} characters, Adam; `cargo xtask bench moe --steps {} --warmup {}{}`. \
             Machine: {cpu}, {cores} CPUs.\n",
            num(a, "layers")?,
            num(a, "hidden")?,
            num(a, "hidden")?,
            a["grid"]
                .as_array()
                .map(|g| g.iter().map(ToString::to_string).collect::<Vec<_>>().join("×"))
                .unwrap_or_default(),
            num(a, "experts")?,
            num(a, "k_best")?,
            num(a, "batch")?,
            num(a, "seq")?,
            p.steps,
            p.warmup,
            flags(p, first.via),
        )?;
        let how = match first.via {
            Via::Netns => {
                "on every loopback packet of a network namespace both trainers and their swarms run in \
                           (a userspace NFQUEUE delay line: this kernel has no `sch_netem`); a round trip is 2× it"
            }
            Via::Transport => {
                "inside each trainer, on its expert RPCs only (L before the request, L before the \
                               reply; DHT lookups not delayed)"
            }
        };
        writeln!(t, "One-way latency injected {how}.\n")?;
        writeln!(
            t,
            "| trainer | one-way latency | steps/s | samples/s (characters) | median step (ms) | vs its 0 ms | Apiary ÷ hivemind |"
        )?;
        writeln!(t, "|---|---|---|---|---|---|---|")?;
        let base = |key: &str| rows.iter().find(|r| r.latency_ms == 0).map(|r| &r.apiary[key]);
        let hbase = rows
            .iter()
            .find(|r| r.latency_ms == 0)
            .map(|r| r.hivemind["samples_per_s"].clone());
        for (name, pick) in [("Apiary", true), ("hivemind 1.1.12", false)] {
            for r in rows {
                let v = if pick { &r.apiary } else { &r.hivemind };
                let rate = num(v, "samples_per_s")?;
                let zero = if pick {
                    base("samples_per_s").and_then(Value::as_f64)
                } else {
                    hbase.as_ref().and_then(Value::as_f64)
                };
                let vs = zero.map_or_else(String::new, |z| format!("{:.0}%", 100.0 * rate / z));
                let ratio = num(&r.apiary, "samples_per_s")? / num(&r.hivemind, "samples_per_s")?;
                writeln!(
                    t,
                    "| {name} | {} ms | {:.3} | {:.0} | {:.0} | {vs} | {} |",
                    r.latency_ms,
                    num(v, "steps_per_s")?,
                    rate,
                    num(v, "step_ms_median")?,
                    if pick {
                        format!("{ratio:.1}×")
                    } else {
                        String::new()
                    },
                )?;
            }
        }
        writeln!(t)?;
        writeln!(
            t,
            "- Steps: Apiary {} timed, hivemind {} timed, each after {} warm-up step(s). One trainer, stepping \
             synchronously: every step waits for its layers' beam searches and expert calls in turn.",
            num(a, "steps")?,
            num(&first.hivemind, "steps")?,
            p.warmup
        )?;
        writeln!(
            t,
            "- hivemind's `RemoteMixtureOfExperts` sends one request per (character, expert): {} per layer and \
             step here; Apiary's sends one per expert with all the characters routed to it.",
            num(a, "batch")? * num(a, "seq")? * num(a, "k_best")?
        )?;
        let failed: Vec<String> = rows
            .iter()
            .filter_map(|r| {
                let n = r.hivemind["failed_steps"].as_u64().unwrap_or(0);
                (n > 0).then(|| format!("{n} at {} ms", r.latency_ms))
            })
            .collect();
        if !failed.is_empty() {
            writeln!(
                t,
                "- hivemind steps that failed (an empty beam search or no expert answering in time) and were \
                 retried with the next batch, their time counted: {}.",
                failed.join(", ")
            )?;
        }
        Ok(t)
    }
}

/// The CPU's model name (`/proc/cpuinfo`), for the benchmark tables.
pub(crate) fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".to_owned())
}
