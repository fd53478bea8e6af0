//! Times the `ffn` expert's server work on CPU: forward (no grad); gradients (forward re-run + hand-written
//! backward); the optimizer step (clip check + fused Adam); and backward as the server runs it (all of it).
//! `cargo run --release -p apiary-expert --example ffn_bench -- [HID_DIM] [BATCH] [ITERS]`; results on
//! stderr, as the fastest and the median iteration (shared machines are noisy: compare minima).

mod common;

use anyhow::Result;
use apiary_expert::{BackendConfig, Expert, ExpertBackend, ExpertConfig, ExpertKind};
use candle_core::{Device, Tensor};
use common::time;

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1).map(|a| a.parse::<usize>());
    let h = args.next().transpose()?.unwrap_or(1024);
    let b = args.next().transpose()?.unwrap_or(256);
    let iters = args.next().transpose()?.unwrap_or(10).max(1);
    let expert = Expert::new(ExpertConfig::new(ExpertKind::Ffn, h), 0)?;
    let mut backend = ExpertBackend::new(expert, BackendConfig::default())?;
    let inputs = [Tensor::randn(0f32, 1f32, (b, h), &Device::Cpu)?];
    let grads = [(Tensor::randn(0f32, 1f32, (b, h), &Device::Cpu)? * 1e-3)?];
    // warm up (page faults, thread pools, optimizer state)
    backend.forward(&inputs)?;
    backend.backward(&inputs, &grads)?;
    let fwd = time(iters, || Ok(backend.forward(&inputs).map(drop)?))?;
    let grad = time(iters, || {
        Ok(backend.expert().backward(&inputs, &grads).map(drop)?)
    })?;
    let g = backend.expert().backward(&inputs, &grads)?;
    let step = time(iters, || Ok(backend.apply(&g).map(drop)?))?;
    let bwd = time(iters, || Ok(backend.backward(&inputs, &grads).map(drop)?))?;
    eprintln!(
        "ffn h={h} batch={b} (min / median ms): forward {:.1} / {:.1}; gradients {:.1} / {:.1}; \
         clip check + Adam {:.1} / {:.1}; backward+Adam {:.1} / {:.1}. \
         forward {:.0} samples/s, server work (forward + backward+Adam) {:.0} samples/s (from minima)",
        fwd.0,
        fwd.1,
        grad.0,
        grad.1,
        step.0,
        step.1,
        bwd.0,
        bwd.1,
        b as f64 / fwd.0 * 1e3,
        b as f64 / (fwd.0 + bwd.0) * 1e3,
    );
    Ok(())
}
