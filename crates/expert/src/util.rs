//! Raw access to CPU f32 tensor buffers, and a small seeded generator for initial weights.

use candle_core::{CpuStorage, DType, Device, Layout, Storage, Tensor};

use crate::error::{ExpertError, Result};

/// Runs `f` on the f32 elements of `t` (made contiguous first when it is not).
pub(crate) fn with_f32<R>(t: &Tensor, what: &str, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    let t = if t.is_contiguous() {
        t.clone()
    } else {
        t.contiguous()?
    };
    if t.dtype() != DType::F32 {
        return Err(ExpertError::NotF32Cpu {
            what: what.to_owned(),
        });
    }
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else {
        return Err(ExpertError::NotF32Cpu {
            what: what.to_owned(),
        });
    };
    let all = cpu.as_slice::<f32>()?;
    let (start, end) = layout
        .contiguous_offsets()
        .ok_or_else(|| ExpertError::NotF32Cpu {
            what: what.to_owned(),
        })?;
    let slice = all.get(start..end).ok_or_else(|| ExpertError::NotF32Cpu {
        what: what.to_owned(),
    })?;
    Ok(f(slice))
}

/// Whether every element of the f32 tensor `t` is finite, on any device (a scan on the CPU; elsewhere one
/// reduction: `Σ 0·v` is zero exactly when no element is infinite or NaN).
pub fn all_finite(t: &Tensor, what: &str) -> Result<bool> {
    if t.device().is_cpu() {
        return with_f32(t, what, |s| s.iter().all(|v| v.is_finite()));
    }
    let zeroed = (t * 0.0)?.sum_all()?.to_dtype(DType::F32)?;
    Ok(zeroed.to_scalar::<f32>()?.is_finite())
}

/// A CPU tensor owning `v` (no copy).
pub(crate) fn tensor(v: Vec<f32>, shape: &[usize]) -> Result<Tensor> {
    Ok(Tensor::from_vec(v, shape, &Device::Cpu)?)
}

/// The mutable f32 elements of an in-place op's storage.
pub(crate) fn mut_f32<'a>(
    storage: &'a mut CpuStorage,
    layout: &Layout,
) -> candle_core::Result<&'a mut [f32]> {
    let CpuStorage::F32(v) = storage else {
        candle_core::bail!("in-place f32 op on a non-f32 tensor")
    };
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("in-place f32 op on a non-contiguous tensor")
    };
    match v.get_mut(start..end) {
        Some(s) => Ok(s),
        None => candle_core::bail!("in-place f32 op: layout out of range"),
    }
}

/// SplitMix64: a tiny, seeded, reproducible generator for initial weights (not for cryptography).
#[derive(Debug, Clone)]
pub(crate) struct SplitMix64(u64);

impl SplitMix64 {
    pub(crate) fn new(seed: u64) -> Self {
        Self(seed)
    }

    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[-bound, bound)`.
    pub(crate) fn uniform(&mut self, bound: f32, n: usize) -> Vec<f32> {
        (0..n)
            .map(|_| {
                let u = (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32;
                (2.0 * u - 1.0) * bound
            })
            .collect()
    }
}
