//! Tensor codec round trips on a 10M-element float32 randn vector, hivemind's
//! `benchmark_tensor_compression.py` measure: `serialize` then `deserialize` then the decoded values viewed
//! as `&[f32]`, per codec, with throughput in bytes of raw float32. Beside them: the NONE round trip from
//! a borrowed `&[f32]` (one copy in), and a plain memcpy of the same 40 MB.
//!
//! `cargo bench -p apiary-wire --bench codecs`. For the side-by-side table with hivemind on the same
//! machine run `cargo xtask bench` (it uses the `codec_throughput` example, which prints JSON).

use std::hint::black_box;
use std::time::Duration;

use apiary_wire::proto::runtime::CompressionType;
use apiary_wire::tensor::{Limits, Tensor, deserialize, serialize};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};

#[path = "input/mod.rs"]
mod input;
use input::{CODECS, randn};

const NUMEL: usize = 10_000_000;

fn codecs(c: &mut Criterion) {
    let x = randn(NUMEL, 7348);
    let tensor = Tensor::from_slice([NUMEL], &x).expect("shape matches");
    let limits = Limits::default();
    let mut group = c.benchmark_group("round_trip_10M_f32");
    group.throughput(Throughput::Bytes(4 * NUMEL as u64));
    group.sample_size(10);
    group.warm_up_time(Duration::from_secs(1));
    group.measurement_time(Duration::from_secs(4));
    for codec in CODECS {
        group.bench_function(codec.as_str_name(), |b| {
            b.iter(|| {
                let wire = serialize(black_box(&tensor), codec).expect("float32 encodes");
                let back = deserialize(&wire, &limits).expect("own bytes decode");
                black_box(back.as_slice::<f32>().expect("float32").len())
            });
        });
    }
    group.bench_function("NONE+copy", |b| {
        b.iter(|| {
            let t = Tensor::from_slice([NUMEL], black_box(&x)).expect("shape matches");
            let wire = serialize(&t, CompressionType::None).expect("encodes");
            let back = deserialize(&wire, &limits).expect("decodes");
            black_box(back.as_slice::<f32>().expect("float32").len())
        });
    });
    let mut dst = vec![0f32; NUMEL];
    group.bench_function("memcpy", |b| {
        b.iter(|| {
            dst.copy_from_slice(black_box(&x));
            black_box(dst.len())
        });
    });
    group.finish();
}

criterion_group!(benches, codecs);
criterion_main!(benches);
