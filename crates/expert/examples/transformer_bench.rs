//! Times the `transformer` expert's hand-written backward against candle's autograd on the same work.
//! `cargo run --release -p apiary-expert --example transformer_bench -- [HID_DIM] [BATCH] [SEQ] [ITERS]`;
//! results on stderr (fastest / median iteration).

mod common;

use anyhow::Result;
use apiary_expert::{Expert, ExpertConfig, ExpertKind};
use candle_core::{DType, Device, Tensor};
use common::time;

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1).map(|a| a.parse::<usize>());
    let h = args.next().transpose()?.unwrap_or(256);
    let b = args.next().transpose()?.unwrap_or(16);
    let s = args.next().transpose()?.unwrap_or(64);
    let iters = args.next().transpose()?.unwrap_or(5).max(1);
    let e = Expert::new(ExpertConfig::new(ExpertKind::Transformer, h), 0)?;
    let inputs = [
        Tensor::randn(0f32, 1f32, (b, s, h), &Device::Cpu)?,
        Tensor::zeros((b, s), DType::U8, &Device::Cpu)?,
    ];
    let grads = [(Tensor::randn(0f32, 1f32, (b, s, h), &Device::Cpu)? * 1e-3)?];
    e.backward(&inputs, &grads)?;
    e.backward_reference(&inputs, &grads)?;
    let fwd = time(iters, || Ok(e.forward(&inputs).map(drop)?))?;
    let fast = time(iters, || Ok(e.backward(&inputs, &grads).map(drop)?))?;
    let slow = time(iters, || Ok(e.backward_reference(&inputs, &grads).map(drop)?))?;
    eprintln!(
        "transformer h={h} batch={b} seq={s} (min / median ms): forward {:.1} / {:.1}; gradients hand-written \
         {:.1} / {:.1}; gradients via candle autograd {:.1} / {:.1}",
        fwd.0, fwd.1, fast.0, fast.1, slow.0, slow.1
    );
    Ok(())
}
