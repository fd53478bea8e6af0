//! Where experts compute: the GPUs the governor's NVML probe finds, and the `device` setting
//! ([`DeviceChoice`]) turned into a candle device when an experiment is joined.

use apiary_catalog::GpuProfile;
use apiary_governor::Sample;
use serde::Serialize;

use crate::config::DeviceChoice;
use crate::error::NodeError;

const MIB: u64 = 1024 * 1024;

/// What a UI shows of the `device` setting (`GET /api/device`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DeviceSetting {
    /// The setting: `auto`, `cpu` or `cuda:N`.
    pub device: DeviceChoice,
    /// Whether this build can compute on CUDA GPUs (built with the `cuda` feature); without it only
    /// `auto` (which then means the CPU) and `cpu` are accepted.
    pub cuda_supported: bool,
    /// When a change takes effect, in words.
    pub note: &'static str,
}

/// The note [`DeviceSetting`] carries.
pub const APPLIES_NOTE: &str = "applies to experts joined after the change: experiments joined \
    before keep computing where they are until they are left and joined again (or the node restarts)";

impl DeviceSetting {
    pub(crate) fn of(device: DeviceChoice) -> Self {
        DeviceSetting {
            device,
            cuda_supported: DeviceChoice::CUDA_BUILD,
            note: APPLIES_NOTE,
        }
    }
}

/// The GPUs in the governor's latest sample, in NVML index order (`gpus[i]` is `cuda:i`): name and
/// memory (an unknown reading counts as 0 MiB). None when the probe found none, or could not read
/// them (no NVIDIA driver), or has not sampled yet.
pub(crate) fn gpus(sample: Option<&Sample>) -> Vec<GpuProfile> {
    let Some(found) = sample.and_then(|s| s.gpus.known()) else {
        return Vec::new();
    };
    let mut found: Vec<_> = found.iter().collect();
    found.sort_by_key(|g| g.index);
    found
        .into_iter()
        .map(|g| {
            let total = g.memory_total.get().unwrap_or(0);
            let used = g.memory_used.get().unwrap_or(0);
            GpuProfile {
                name: g
                    .name
                    .known()
                    .cloned()
                    .unwrap_or_else(|| format!("GPU {}", g.index)),
                vram_total_mb: total / MIB,
                vram_free_mb: total.saturating_sub(used) / MIB,
            }
        })
        .collect()
}

/// The GPUs join planning may place experts on under `choice`: none for the CPU (and for `auto`
/// in a build without CUDA support), GPU N alone for `cuda:N`, the first for `auto` with CUDA.
pub(crate) fn for_planning(all: Vec<GpuProfile>, choice: DeviceChoice) -> Vec<GpuProfile> {
    match choice.gpu() {
        Some(n) => all.into_iter().nth(n as usize).into_iter().collect(),
        None => Vec::new(),
    }
}

/// `choice`, unless this build cannot compute on it ([`NodeError::DeviceUnavailable`]).
pub(crate) fn require_supported(choice: DeviceChoice) -> Result<(), NodeError> {
    choice
        .check_supported()
        .map(drop)
        .map_err(|reason| NodeError::DeviceUnavailable {
            device: choice,
            reason,
        })
}

/// The device experts joined now compute on, and how the ledger counts their time. `gpus_found`:
/// how many GPUs the NVML probe sees (`auto` tries CUDA only when there is one, so a machine without
/// an NVIDIA driver never loads CUDA). `cuda:N` in a build without CUDA support, or a GPU that cannot
/// be opened, is an error naming the setting; `auto` falls back to the CPU instead.
pub(crate) fn open(
    choice: DeviceChoice,
    gpus_found: usize,
) -> Result<(candle_core::Device, apiary_ledger::Device), NodeError> {
    let cpu = Ok((candle_core::Device::Cpu, apiary_ledger::Device::Cpu));
    match choice {
        DeviceChoice::Cpu => cpu,
        DeviceChoice::Auto if !DeviceChoice::CUDA_BUILD || gpus_found == 0 => cpu,
        DeviceChoice::Auto => match open_cuda(0) {
            Ok(d) => Ok((d, apiary_ledger::Device::Gpu)),
            Err(reason) => {
                tracing::warn!(
                    "the device setting is `auto` but GPU 0 cannot be used ({reason}): computing on the CPU"
                );
                cpu
            }
        },
        DeviceChoice::Cuda(n) => {
            require_supported(choice)?;
            open_cuda(n)
                .map(|d| (d, apiary_ledger::Device::Gpu))
                .map_err(|reason| NodeError::DeviceUnavailable {
                    device: choice,
                    reason,
                })
        }
    }
}

/// Opens CUDA GPU `n` (a build without CUDA support gets candle's "not compiled with CUDA" error).
/// Loading the CUDA driver library may panic inside the bindings where it is missing: that is
/// caught and reported as an error.
fn open_cuda(n: u32) -> Result<candle_core::Device, String> {
    let ordinal = n as usize;
    match std::panic::catch_unwind(|| candle_core::Device::new_cuda(ordinal)) {
        Ok(Ok(d)) => Ok(d),
        Ok(Err(e)) => Err(format!("cannot open GPU {n}: {e}")),
        Err(_) => Err(format!(
            "cannot open GPU {n}: the CUDA driver library could not be loaded"
        )),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use apiary_governor::probe::{GpuSample, Reading};

    fn sample(gpus: Reading<Vec<GpuSample>>) -> Sample {
        let mut s = Sample::unknown(0.0);
        s.gpus = gpus;
        s
    }

    fn gpu(index: u32, name: &'static str, total_mib: u64, used_mib: u64) -> GpuSample {
        GpuSample {
            name: Reading::Known(name.to_owned()),
            memory_total: Reading::Known(total_mib * MIB),
            memory_used: Reading::Known(used_mib * MIB),
            ..GpuSample::unknown(index, "test")
        }
    }

    #[test]
    fn the_gpus_of_a_sample_in_index_order() {
        assert!(gpus(None).is_empty());
        assert!(gpus(Some(&sample(Reading::Unknown("no NVIDIA driver")))).is_empty());
        let s = sample(Reading::Known(vec![
            gpu(1, "B", 8192, 1024),
            gpu(0, "A", 24576, 0),
            GpuSample::unknown(2, "NVML failed"),
        ]));
        let g = gpus(Some(&s));
        assert_eq!(g.len(), 3);
        assert_eq!(
            (g[0].name.as_str(), g[0].vram_total_mb, g[0].vram_free_mb),
            ("A", 24576, 24576)
        );
        assert_eq!(
            (g[1].name.as_str(), g[1].vram_total_mb, g[1].vram_free_mb),
            ("B", 8192, 7168)
        );
        assert_eq!((g[2].name.as_str(), g[2].vram_total_mb), ("GPU 2", 0));
        // planning sees the selected GPU only
        assert!(for_planning(g.clone(), DeviceChoice::Cpu).is_empty());
        assert_eq!(for_planning(g.clone(), DeviceChoice::Cuda(1))[0].name, "B");
        assert!(for_planning(g.clone(), DeviceChoice::Cuda(9)).is_empty());
        assert_eq!(
            for_planning(g, DeviceChoice::Auto).len(),
            usize::from(DeviceChoice::CUDA_BUILD)
        );
    }

    #[test]
    fn opening_the_device_never_panics() {
        let (d, l) = open(DeviceChoice::Cpu, 0).unwrap();
        assert!(d.is_cpu() && l == apiary_ledger::Device::Cpu);
        // `auto` without a GPU found is the CPU, with or without CUDA support
        let (d, _) = open(DeviceChoice::Auto, 0).unwrap();
        assert!(d.is_cpu());
        if !DeviceChoice::CUDA_BUILD {
            let (d, _) = open(DeviceChoice::Auto, 2).unwrap();
            assert!(d.is_cpu());
            let e = open(DeviceChoice::Cuda(0), 1).unwrap_err();
            assert_eq!(e.code(), "device_unavailable");
            assert!(
                e.to_string().contains("cuda:0") && e.to_string().contains("no CUDA support"),
                "{e}"
            );
        }
    }
}
