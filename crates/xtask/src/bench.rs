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
fn publish(name: &str, report: &str) -> Result<()> {
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
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".to_owned());
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
fn one_json(why: &str, cmd: &mut Command) -> Result<Value> {
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
fn stop(child: &mut Child) {
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
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".to_owned());
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
fn setup_and_build_apiary() -> Result<(setup::Env, PathBuf)> {
    let env = setup::all()?;
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    step(
        "build the apiary binary (release)",
        Command::new(&cargo).args(["build", "--release", "--quiet", "-p", "apiary-cli"]),
    )?;
    let target = std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root().join("target"), Into::into);
    Ok((env, target))
}
