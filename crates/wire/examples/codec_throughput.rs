//! Apiary's side of `cargo xtask bench`: the round trip of hivemind's
//! `benchmarks/benchmark_tensor_compression.py` (tensor → `runtime.proto` Tensor → tensor) on a seeded
//! randn float32 vector, for every codec, beside a plain memcpy of the same bytes.
//!
//! ## Usage
//!
//! ```text
//! cargo run --release -p apiary-wire --example codec_throughput -- [--size 10000000] [--iters 30] [--threads N] [--no-pool]
//! ```
//!
//! `--no-pool` turns off the recycling of output buffers (`set_buffer_pool_limit(0)`), so that every
//! output is a fresh allocation whose pages fault in.
//!
//! Prints one JSON line per measurement, `{"codec", "numel", "iters", "median_s", "min_s", "gbps"}`, where
//! `gbps` is the raw float32 bytes (4 · numel) over the median time, in 10^9 bytes per second. Rows:
//!
//! - each codec: `serialize(&tensor)` then `deserialize(&wire)` then the decoded values viewed as `&[f32]`,
//!   from a tensor built beforehand (as hivemind's benchmark starts from an existing torch tensor). NONE
//!   is zero-copy both ways, so its row is the cost of the protobuf struct and two reference counts;
//! - `NONE+copy`: the same NONE round trip starting from a borrowed `&[f32]` (`Tensor::from_slice`, one
//!   copy into a fresh buffer), what a caller holding a plain slice pays;
//! - `alloc+memcpy`: `to_vec()` of the 40 MB: a fresh allocation (every page faulted in) and the copy;
//! - `memcpy`: `copy_from_slice` of the 40 MB into an existing buffer.

#![allow(clippy::print_stdout)]

use std::hint::black_box;
use std::time::Instant;

use apiary_wire::proto::runtime::CompressionType;
use apiary_wire::tensor::{
    Limits, SerializeOptions, Tensor, deserialize, serialize_with, set_buffer_pool_limit,
};

#[path = "../benches/input/mod.rs"]
mod input;
use input::{CODECS, randn};

fn measure(name: &str, numel: usize, warmup: usize, iters: usize, mut f: impl FnMut()) {
    for _ in 0..warmup {
        f();
    }
    let mut times: Vec<f64> = (0..iters)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .collect();
    times.sort_by(f64::total_cmp);
    let median = if iters % 2 == 1 {
        times[iters / 2]
    } else {
        (times[iters / 2 - 1] + times[iters / 2]) / 2.0
    };
    println!(
        "{{\"codec\": \"{name}\", \"numel\": {numel}, \"iters\": {iters}, \"median_s\": {median:e}, \"min_s\": {:e}, \"gbps\": {}}}",
        times[0],
        4.0 * numel as f64 / median / 1e9
    );
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |name: &str, default: usize| -> usize {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let numel = arg("--size", 10_000_000);
    let iters = arg("--iters", 30).max(1);
    let warmup = arg("--warmup", 2);
    let options = SerializeOptions::default();
    let options = match args.iter().position(|a| a == "--threads") {
        Some(_) => options.with_max_threads(arg("--threads", 1)),
        None => options,
    };
    let limits = Limits::default().with_max_threads(options.max_threads);
    if args.iter().any(|a| a == "--no-pool") {
        set_buffer_pool_limit(0);
    }

    let x = randn(numel, 7348);
    let tensor = Tensor::from_slice([numel], &x).expect("shape matches");
    for codec in CODECS {
        measure(codec.as_str_name(), numel, warmup, iters, || {
            let wire = serialize_with(black_box(&tensor), codec, &options).expect("float32 encodes");
            let back = deserialize(&wire, &limits).expect("own bytes decode");
            black_box(back.as_slice::<f32>().expect("float32").len());
        });
    }
    measure("NONE+copy", numel, warmup, iters, || {
        let t = Tensor::from_slice([numel], black_box(&x)).expect("shape matches");
        let wire = serialize_with(&t, CompressionType::None, &options).expect("encodes");
        let back = deserialize(&wire, &limits).expect("decodes");
        black_box(back.as_slice::<f32>().expect("float32").len());
    });
    measure("alloc+memcpy", numel, warmup, iters, || {
        black_box(black_box(&x).to_vec());
    });
    let mut dst = vec![0f32; numel];
    measure("memcpy", numel, warmup, iters, || {
        dst.copy_from_slice(black_box(&x));
        black_box(&mut dst);
    });
}
