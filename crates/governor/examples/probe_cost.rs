//! What the governor's probes cost per tick on this machine (`cargo xtask bench idle` runs it).
//!
//! ```text
//! cargo run --release -p apiary-governor --example probe_cost [-- --seconds 10]
//! ```
//!
//! Builds [`Probes::platform`] and samples them at the governor's own cadence for `--seconds`: the
//! activity probe every 100 ms, the GPU, power and system probes every 1 s (paced, because some probes
//! do their work only once per window, e.g. sysinfo refreshes the CPU usage every 250 ms at most).
//! Each call is timed (wall clock); the first call of each probe (connecting to buses, loading NVML) is
//! reported apart. The thread's CPU time over the whole loop comes from `/proc/thread-self/schedstat`.
//! Prints one JSON line: mean, median and max µs per call of each probe, the per-second total
//! (10 × activity + gpu + power + system) and the loop's CPU % of one core.

use std::time::{Duration, Instant};

use apiary_governor::Probes;
use serde_json::json;

/// Wall-clock times of one probe's calls.
#[derive(Debug, Default)]
struct Times {
    first_us: f64,
    rest: Vec<f64>,
}

impl Times {
    fn time<T>(&mut self, f: impl FnOnce() -> T) -> T {
        let t = Instant::now();
        let out = f();
        let us = t.elapsed().as_secs_f64() * 1e6;
        if self.rest.is_empty() && self.first_us == 0.0 {
            self.first_us = us;
        } else {
            self.rest.push(us);
        }
        out
    }

    fn mean(&self) -> f64 {
        if self.rest.is_empty() {
            self.first_us
        } else {
            self.rest.iter().sum::<f64>() / self.rest.len() as f64
        }
    }

    fn median(&self) -> f64 {
        let mut v = self.rest.clone();
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied().unwrap_or(self.first_us)
    }

    fn json(&self) -> serde_json::Value {
        json!({
            "mean_us": self.mean(),
            "median_us": self.median(),
            "max_us": self.rest.iter().copied().fold(0.0, f64::max),
            "first_us": self.first_us,
            "calls": self.rest.len() + 1,
        })
    }
}

/// This thread's CPU time in ns (Linux); `None` elsewhere.
fn thread_cpu_ns() -> Option<u64> {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

fn main() {
    let mut seconds = 10u64;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--seconds" => {
                seconds = args
                    .next()
                    .and_then(|v| v.parse().ok())
                    .filter(|&n| n > 0)
                    .unwrap_or_else(|| {
                        eprintln!("--seconds needs a positive number");
                        std::process::exit(2)
                    });
            }
            other => {
                eprintln!("unknown argument {other:?}; usage: probe_cost [--seconds N]");
                std::process::exit(2);
            }
        }
    }

    let built = Instant::now();
    let mut probes = Probes::platform();
    let build_us = built.elapsed().as_secs_f64() * 1e6;
    let (mut activity, mut gpu, mut power, mut system) = (
        Times::default(),
        Times::default(),
        Times::default(),
        Times::default(),
    );
    let ticks = seconds * 10;
    let start = Instant::now();
    let cpu_start = thread_cpu_ns();
    let mut known = json!({});
    for tick in 0..ticks {
        let a = activity.time(|| probes.activity.sample());
        if tick % 10 == 0 {
            let g = gpu.time(|| probes.gpu.sample());
            let p = power.time(|| probes.power.sample());
            let s = system.time(|| probes.system.sample());
            known = json!({ "activity": a, "gpu": g, "power": p, "system": s });
        }
        let next = start + Duration::from_millis(100 * (tick + 1));
        if let Some(wait) = next.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    let cpu_pct = match (cpu_start, thread_cpu_ns()) {
        (Some(a), Some(b)) => Some(100.0 * (b.saturating_sub(a)) as f64 / 1e9 / elapsed),
        _ => None,
    };
    let per_second = 10.0 * activity.mean() + gpu.mean() + power.mean() + system.mean();
    let line = json!({
        "seconds": seconds,
        "build_us": build_us,
        "activity": activity.json(),
        "gpu": gpu.json(),
        "power": power.json(),
        "system": system.json(),
        "per_second_us": per_second,
        "loop_cpu_pct": cpu_pct,
        "last_readings": known,
    });
    #[allow(clippy::print_stdout)]
    {
        println!("{line}");
    }
}
