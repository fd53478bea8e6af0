//! CPU, memory and load through `sysinfo` (all OSes; the load average is `Unknown` on Windows).

use std::time::{Duration, Instant};

use sysinfo::{CpuRefreshKind, MemoryRefreshKind, RefreshKind, System};

use super::{Reading, SystemProbe, SystemSample};

/// CPU usage needs two refreshes at least this far apart (sysinfo's minimum is 200 ms).
const CPU_WINDOW: Duration = Duration::from_millis(250);

/// Reads CPU, memory and load with `sysinfo`.
pub struct SysinfoProbe {
    sys: System,
    first_refresh: Instant,
    last_cpu: Option<(Instant, f64)>,
}

impl std::fmt::Debug for SysinfoProbe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SysinfoProbe")
            .field("last_cpu", &self.last_cpu)
            .finish_non_exhaustive()
    }
}

impl Default for SysinfoProbe {
    fn default() -> Self {
        Self::new()
    }
}

impl SysinfoProbe {
    /// Starts the CPU measurement window (the first CPU reading comes 250 ms later).
    pub fn new() -> Self {
        let sys = System::new_with_specifics(
            RefreshKind::nothing()
                .with_cpu(CpuRefreshKind::nothing().with_cpu_usage())
                .with_memory(MemoryRefreshKind::nothing().with_ram()),
        );
        SysinfoProbe {
            sys,
            first_refresh: Instant::now(),
            last_cpu: None,
        }
    }
}

impl SystemProbe for SysinfoProbe {
    fn sample(&mut self) -> SystemSample {
        let now = Instant::now();
        let due = match self.last_cpu {
            Some((at, _)) => now.duration_since(at) >= CPU_WINDOW,
            None => now.duration_since(self.first_refresh) >= CPU_WINDOW,
        };
        if due {
            self.sys.refresh_cpu_usage();
            let usage = f64::from(self.sys.global_cpu_usage()).clamp(0.0, 100.0);
            self.last_cpu = Some((now, usage));
        }
        let cpu_percent = match self.last_cpu {
            Some((_, usage)) => Reading::Known(usage),
            None => Reading::Unknown("CPU usage needs a 250 ms window; ask again"),
        };
        self.sys
            .refresh_memory_specifics(MemoryRefreshKind::nothing().with_ram());
        let total = self.sys.total_memory();
        let (memory_used, memory_total) = if total == 0 {
            let why = "memory size not reported";
            (Reading::Unknown(why), Reading::Unknown(why))
        } else {
            (
                Reading::Known(total.saturating_sub(self.sys.available_memory())),
                Reading::Known(total),
            )
        };
        let load_1m = if cfg!(windows) {
            Reading::Unknown("Windows has no load average")
        } else {
            Reading::Known(System::load_average().one)
        };
        SystemSample {
            cpu_percent,
            memory_used,
            memory_total,
            load_1m,
        }
    }
}
