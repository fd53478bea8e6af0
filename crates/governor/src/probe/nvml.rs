//! NVIDIA GPUs through NVML, loaded at run time (`libnvidia-ml.so.1` / `nvml.dll`).
//!
//! A failed `Nvml::init()` means no NVIDIA driver: the probe reports `Unknown` and retries with a
//! back-off (a driver installed later is picked up). Per device it reads utilization, memory,
//! temperature, power and the first fan; each field that errors (e.g. `NotSupported` on a laptop
//! GPU without a fan reading) is `Unknown` on its own.
//!
//! **Ours vs others.** Memory: the running compute and graphics process lists split used memory
//! into our PIDs ([`NvmlProbe::with_our_pids`], default: this process) and the rest.
//! Utilization of other processes: the sum of per-process SM utilization
//! (`nvmlDeviceGetProcessUtilization`) over PIDs that are not ours. Where that call is not
//! supported, the fallback is: if none of our PIDs is on the device, all utilization is others';
//! if only ours are, others' is 0; otherwise `Unknown`.

use std::collections::HashMap;
use std::time::Instant;

use nvml_wrapper::Nvml;
use nvml_wrapper::enum_wrappers::device::TemperatureSensor;
use nvml_wrapper::enums::device::UsedGpuMemory;
use nvml_wrapper::error::NvmlError;
use nvml_wrapper::struct_wrappers::device::ProcessInfo;

use super::{Backoff, GpuProbe, GpuSample, Reading};

/// Reads NVIDIA GPUs through NVML.
pub struct NvmlProbe {
    nvml: Option<Nvml>,
    backoff: Backoff,
    our_pids: Vec<u32>,
    /// Per device: the newest per-process utilization sample timestamp seen (µs).
    last_seen: HashMap<u32, u64>,
}

impl std::fmt::Debug for NvmlProbe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NvmlProbe")
            .field("loaded", &self.nvml.is_some())
            .field("our_pids", &self.our_pids)
            .finish_non_exhaustive()
    }
}

impl Default for NvmlProbe {
    fn default() -> Self {
        Self::new()
    }
}

impl NvmlProbe {
    /// A probe that counts this process as "ours"; NVML is loaded at the first sample.
    pub fn new() -> Self {
        Self::with_our_pids(vec![std::process::id()])
    }

    /// A probe that counts `pids` (e.g. the engine's worker processes) as "ours".
    pub fn with_our_pids(pids: Vec<u32>) -> Self {
        NvmlProbe {
            nvml: None,
            backoff: Backoff::default(),
            our_pids: pids,
            last_seen: HashMap::new(),
        }
    }

    /// Replaces the set of PIDs counted as ours.
    pub fn set_our_pids(&mut self, pids: Vec<u32>) {
        self.our_pids = pids;
    }

    fn read_device(&mut self, nvml: &Nvml, index: u32) -> GpuSample {
        let device = match nvml.device_by_index(index) {
            Ok(d) => d,
            Err(_) => return GpuSample::unknown(index, "NVML could not open this GPU"),
        };
        let why = "not reported by NVML for this GPU";
        let rates = device.utilization_rates().ok();
        let utilization = rates
            .as_ref()
            .map_or(Reading::Unknown(why), |u| Reading::Known(pct(u.gpu)));
        let mem = device.memory_info().ok();
        let mut procs: Vec<ProcessInfo> = Vec::new();
        let mut procs_ok = false;
        if let Ok(p) = device.running_compute_processes() {
            procs.extend(p);
            procs_ok = true;
        }
        if let Ok(p) = device.running_graphics_processes() {
            procs.extend(p);
            procs_ok = true;
        }
        let ours = |pid: u32| self.our_pids.contains(&pid);
        let (memory_ours, memory_others) = if procs_ok {
            let mut o = 0u64;
            let mut t = 0u64;
            let mut any_unavailable = false;
            for p in &procs {
                match p.used_gpu_memory {
                    UsedGpuMemory::Used(b) if ours(p.pid) => o += b,
                    UsedGpuMemory::Used(b) => t += b,
                    UsedGpuMemory::Unavailable => any_unavailable = true,
                }
            }
            if any_unavailable {
                let why = "per-process GPU memory not available (Windows WDDM?)";
                (Reading::Unknown(why), Reading::Unknown(why))
            } else {
                (Reading::Known(o), Reading::Known(t))
            }
        } else {
            let why = "NVML process list not available";
            (Reading::Unknown(why), Reading::Unknown(why))
        };
        let since = self.last_seen.get(&index).copied();
        let other_utilization = match device.process_utilization_stats(since) {
            Ok(samples) => {
                let mut per_pid: HashMap<u32, u32> = HashMap::new();
                let mut newest = since.unwrap_or(0);
                for s in samples {
                    newest = newest.max(s.timestamp);
                    let e = per_pid.entry(s.pid).or_insert(0);
                    *e = (*e).max(s.sm_util);
                }
                self.last_seen.insert(index, newest);
                let others: u32 = per_pid
                    .iter()
                    .filter(|(pid, _)| !ours(**pid))
                    .map(|(_, u)| *u)
                    .sum();
                Reading::Known(pct(others))
            }
            Err(NvmlError::NotFound) => Reading::Known(0.0),
            Err(_) => {
                let has_ours = procs.iter().any(|p| ours(p.pid));
                let has_others = procs.iter().any(|p| !ours(p.pid));
                match (procs_ok, has_ours, has_others, &utilization) {
                    (true, false, _, Reading::Known(u)) => Reading::Known(*u),
                    (true, true, false, _) => Reading::Known(0.0),
                    _ => Reading::Unknown("per-process GPU utilization not supported"),
                }
            }
        };
        GpuSample {
            index,
            name: device.name().map_or(Reading::Unknown(why), Reading::Known),
            utilization,
            other_utilization,
            memory_total: mem
                .as_ref()
                .map_or(Reading::Unknown(why), |m| Reading::Known(m.total)),
            memory_used: mem
                .as_ref()
                .map_or(Reading::Unknown(why), |m| Reading::Known(m.used)),
            memory_ours,
            memory_others,
            temperature_c: device
                .temperature(TemperatureSensor::Gpu)
                .map_or(Reading::Unknown(why), |t| Reading::Known(f64::from(t))),
            power_w: device
                .power_usage()
                .map_or(Reading::Unknown(why), |mw| Reading::Known(f64::from(mw) / 1000.0)),
            fan_percent: device
                .fan_speed(0)
                .map_or(Reading::Unknown(why), |f| Reading::Known(f64::from(f))),
        }
    }
}

fn pct(p: u32) -> f64 {
    (f64::from(p) / 100.0).clamp(0.0, 1.0)
}

impl GpuProbe for NvmlProbe {
    fn sample(&mut self) -> Reading<Vec<GpuSample>> {
        if self.nvml.is_none() {
            let now = Instant::now();
            if !self.backoff.ready(now) {
                return Reading::Unknown("no NVIDIA driver (NVML not loaded)");
            }
            match Nvml::init() {
                Ok(n) => {
                    self.backoff.succeeded();
                    self.nvml = Some(n);
                }
                Err(e) => {
                    if self.backoff.failed(now) {
                        tracing::info!(error = %e, "NVML not available; GPU readings unknown");
                    }
                    return Reading::Unknown("no NVIDIA driver (NVML not loaded)");
                }
            }
        }
        let Some(nvml) = self.nvml.take() else {
            return Reading::Unknown("no NVIDIA driver (NVML not loaded)");
        };
        let result = match nvml.device_count() {
            Ok(n) => Reading::Known((0..n).map(|i| self.read_device(&nvml, i)).collect()),
            Err(_) => Reading::Unknown("NVML could not count GPUs"),
        };
        self.nvml = Some(nvml);
        result
    }
}
