//! Probes: what the governor can learn about the PC, each value as a [`Reading`].
//!
//! A probe never fails: a missing source (no X display, no session bus, no NVIDIA driver, no
//! battery) is a [`Reading::Unknown`] carrying a short reason that the UI can show. A source that
//! errors is retried with a back-off ([`Backoff`]) and logged once per outage, not once per tick.
//!
//! Probes may block (X11 round trips, D-Bus calls, NVML): call [`ActivityProbe::sample`] and friends
//! from a plain thread (the governor's own thread does) or `spawn_blocking`, never on a tokio worker.
//! The D-Bus probe owns a private current-thread runtime and panics if driven from inside another
//! runtime's worker thread, like every blocking call in tokio would.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;

#[cfg(target_os = "linux")]
pub mod linux;
#[cfg(target_os = "macos")]
pub mod macos;
pub mod nvml;
pub mod power;
pub mod system;
#[cfg(windows)]
pub mod windows;

/// A value read from the system, or the reason it could not be read.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Reading<T> {
    /// The source answered.
    Known(T),
    /// The source is missing or failed; the text says why (shown to the user as is).
    Unknown(&'static str),
}

impl<T> Reading<T> {
    /// The value, if known.
    pub fn known(&self) -> Option<&T> {
        match self {
            Reading::Known(v) => Some(v),
            Reading::Unknown(_) => None,
        }
    }

    /// Whether the value is known.
    pub fn is_known(&self) -> bool {
        matches!(self, Reading::Known(_))
    }

    /// Maps the known value.
    pub fn map<U>(self, f: impl FnOnce(T) -> U) -> Reading<U> {
        match self {
            Reading::Known(v) => Reading::Known(f(v)),
            Reading::Unknown(why) => Reading::Unknown(why),
        }
    }

    /// This reading if known, otherwise `other`.
    pub fn or(self, other: Reading<T>) -> Reading<T> {
        match self {
            Reading::Known(_) => self,
            Reading::Unknown(_) => other,
        }
    }

    /// The reason, if unknown.
    pub fn reason(&self) -> Option<&'static str> {
        match self {
            Reading::Known(_) => None,
            Reading::Unknown(why) => Some(why),
        }
    }
}

impl<T: Copy> Reading<T> {
    /// The value, if known (by copy).
    pub fn get(&self) -> Option<T> {
        self.known().copied()
    }
}

/// What the user is doing, as far as the platform tells.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct ActivitySample {
    /// Seconds since the last keyboard, mouse or touch input.
    pub idle_s: Reading<f64>,
    /// The session is locked or the screensaver is active (counts as "away").
    pub locked: Reading<bool>,
    /// The focused window is fullscreen or the OS reports a presentation / game state.
    pub fullscreen: Reading<bool>,
    /// Something (typically a video player) inhibits idle; counts as "in use".
    pub inhibited: Reading<bool>,
}

impl ActivitySample {
    /// A sample with every reading unknown for the same reason.
    pub fn unknown(why: &'static str) -> Self {
        ActivitySample {
            idle_s: Reading::Unknown(why),
            locked: Reading::Unknown(why),
            fullscreen: Reading::Unknown(why),
            inhibited: Reading::Unknown(why),
        }
    }

    /// Idle for `idle_s` seconds, everything else known and false.
    pub fn idle(idle_s: f64) -> Self {
        ActivitySample {
            idle_s: Reading::Known(idle_s),
            locked: Reading::Known(false),
            fullscreen: Reading::Known(false),
            inhibited: Reading::Known(false),
        }
    }
}

/// One GPU as NVML (or a test) sees it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GpuSample {
    /// The device index (NVML order).
    pub index: u32,
    /// Marketing name, e.g. "NVIDIA GeForce RTX 4070".
    pub name: Reading<String>,
    /// Whole-device utilization, 0.0..=1.0 (all processes, ours included).
    pub utilization: Reading<f64>,
    /// Utilization by processes other than ours, 0.0..=1.0 (see [`nvml`] for how it is derived).
    pub other_utilization: Reading<f64>,
    /// Total device memory in bytes.
    pub memory_total: Reading<u64>,
    /// Used device memory in bytes (everything).
    pub memory_used: Reading<u64>,
    /// Device memory held by our processes, in bytes.
    pub memory_ours: Reading<u64>,
    /// Device memory held by other processes, in bytes.
    pub memory_others: Reading<u64>,
    /// Core temperature in °C.
    pub temperature_c: Reading<f64>,
    /// Board power draw in watts.
    pub power_w: Reading<f64>,
    /// Fan speed in percent of maximum (first fan).
    pub fan_percent: Reading<f64>,
}

impl GpuSample {
    /// A GPU with the given index and every reading unknown.
    pub fn unknown(index: u32, why: &'static str) -> Self {
        GpuSample {
            index,
            name: Reading::Unknown(why),
            utilization: Reading::Unknown(why),
            other_utilization: Reading::Unknown(why),
            memory_total: Reading::Unknown(why),
            memory_used: Reading::Unknown(why),
            memory_ours: Reading::Unknown(why),
            memory_others: Reading::Unknown(why),
            temperature_c: Reading::Unknown(why),
            power_w: Reading::Unknown(why),
            fan_percent: Reading::Unknown(why),
        }
    }
}

/// Mains and battery.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct PowerSample {
    /// Running on mains (AC or USB-C power delivery).
    pub on_ac: Reading<bool>,
    /// Battery charge in percent (mean over system batteries).
    pub battery_percent: Reading<f64>,
}

/// CPU, memory and load.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct SystemSample {
    /// Whole-machine CPU usage in percent (0..=100).
    pub cpu_percent: Reading<f64>,
    /// Memory in use (total minus available), bytes.
    pub memory_used: Reading<u64>,
    /// Total memory, bytes.
    pub memory_total: Reading<u64>,
    /// One-minute load average.
    pub load_1m: Reading<f64>,
}

/// Input idle time, lock, fullscreen and idle inhibitors.
pub trait ActivityProbe: Send {
    /// Reads the current state (may block briefly; see the module docs).
    fn sample(&mut self) -> ActivitySample;
}

/// GPUs.
pub trait GpuProbe: Send {
    /// Reads every GPU; `Unknown` when no GPU library or driver is present.
    fn sample(&mut self) -> Reading<Vec<GpuSample>>;
}

/// Mains and battery.
pub trait PowerProbe: Send {
    /// Reads the power state.
    fn sample(&mut self) -> PowerSample;
}

/// CPU, memory and load.
pub trait SystemProbe: Send {
    /// Reads CPU, memory and load.
    fn sample(&mut self) -> SystemSample;
}

/// Exponential retry delay for a failing source: 1 s doubling to 60 s, reset on success.
///
/// It also remembers whether the outage was already logged, so a missing source is logged once.
#[derive(Debug, Clone)]
pub struct Backoff {
    next_try: Option<Instant>,
    delay: Duration,
    logged: bool,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            next_try: None,
            delay: Backoff::MIN,
            logged: false,
        }
    }
}

impl Backoff {
    const MIN: Duration = Duration::from_secs(1);
    const MAX: Duration = Duration::from_secs(60);

    /// Whether the source may be tried now.
    pub fn ready(&self, now: Instant) -> bool {
        self.next_try.is_none_or(|t| now >= t)
    }

    /// Records a failure: the next try waits for the current delay, which then doubles.
    /// Returns `true` the first time in an outage (the caller logs then).
    pub fn failed(&mut self, now: Instant) -> bool {
        self.next_try = Some(now + self.delay);
        self.delay = (self.delay * 2).min(Self::MAX);
        !std::mem::replace(&mut self.logged, true)
    }

    /// Records a success.
    pub fn succeeded(&mut self) {
        self.next_try = None;
        self.delay = Self::MIN;
        self.logged = false;
    }
}

/// An activity probe that always returns the same sample.
#[derive(Debug, Clone)]
pub struct FixedActivity(pub ActivitySample);

impl ActivityProbe for FixedActivity {
    fn sample(&mut self) -> ActivitySample {
        self.0
    }
}

/// A GPU probe that always returns the same reading.
#[derive(Debug, Clone)]
pub struct FixedGpu(pub Reading<Vec<GpuSample>>);

impl GpuProbe for FixedGpu {
    fn sample(&mut self) -> Reading<Vec<GpuSample>> {
        self.0.clone()
    }
}

/// A power probe that always returns the same sample.
#[derive(Debug, Clone)]
pub struct FixedPower(pub PowerSample);

impl PowerProbe for FixedPower {
    fn sample(&mut self) -> PowerSample {
        self.0
    }
}

/// A system probe that always returns the same sample.
#[derive(Debug, Clone)]
pub struct FixedSystem(pub SystemSample);

impl SystemProbe for FixedSystem {
    fn sample(&mut self) -> SystemSample {
        self.0
    }
}

/// Replays a timeline of activity samples against real time (for tests and demos).
///
/// Step `i` applies from `start + steps[i].0` until the next step; before the first step the
/// first sample applies. The probe records when a sample call first returned each step, so a
/// test can tell the moment the probe *saw* a change from the moment it was scheduled.
#[derive(Debug, Clone)]
pub struct ScriptedActivity {
    start: Instant,
    steps: Vec<(Duration, ActivitySample)>,
    seen: Arc<Mutex<Vec<Option<Instant>>>>,
}

impl ScriptedActivity {
    /// A timeline starting at `start`; `steps` must be sorted by offset.
    pub fn new(start: Instant, steps: Vec<(Duration, ActivitySample)>) -> Self {
        let seen = Arc::new(Mutex::new(vec![None; steps.len()]));
        ScriptedActivity { start, steps, seen }
    }

    /// A shared view of when each step was first returned by [`ActivityProbe::sample`].
    pub fn seen(&self) -> Arc<Mutex<Vec<Option<Instant>>>> {
        Arc::clone(&self.seen)
    }
}

impl ActivityProbe for ScriptedActivity {
    fn sample(&mut self) -> ActivitySample {
        let now = Instant::now();
        let elapsed = now.saturating_duration_since(self.start);
        let Some(i) = self
            .steps
            .iter()
            .rposition(|(at, _)| *at <= elapsed)
            .or(if self.steps.is_empty() { None } else { Some(0) })
        else {
            return ActivitySample::unknown("empty script");
        };
        if let Ok(mut seen) = self.seen.lock()
            && let Some(slot) = seen.get_mut(i)
            && slot.is_none()
        {
            *slot = Some(now);
        }
        self.steps[i].1
    }
}

/// The probes of this platform, each falling back to `Unknown` where a source is missing.
///
/// Linux: X11 + D-Bus activity ([`linux::LinuxActivityProbe::from_env`]), NVML, sysfs power,
/// sysinfo. Windows: `GetLastInputInfo` and `SHQueryUserNotificationState`
/// ([`windows::WindowsActivityProbe`]), `GetSystemPowerStatus`, NVML, sysinfo. macOS: the
/// CoreGraphics input idle time ([`macos::MacActivityProbe`]), NVML (none on modern Macs), sysinfo;
/// power unknown.
pub fn platform_activity() -> Box<dyn ActivityProbe> {
    #[cfg(target_os = "linux")]
    {
        Box::new(linux::LinuxActivityProbe::from_env())
    }
    #[cfg(windows)]
    {
        Box::new(windows::WindowsActivityProbe)
    }
    #[cfg(target_os = "macos")]
    {
        Box::new(macos::MacActivityProbe)
    }
    #[cfg(not(any(target_os = "linux", windows, target_os = "macos")))]
    {
        Box::new(FixedActivity(ActivitySample::unknown(
            "no activity probe for this OS",
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_logs_once() {
        let t0 = Instant::now();
        let mut b = Backoff::default();
        assert!(b.ready(t0));
        assert!(b.failed(t0), "first failure is logged");
        assert!(!b.ready(t0 + Duration::from_millis(999)));
        assert!(b.ready(t0 + Duration::from_secs(1)));
        assert!(
            !b.failed(t0 + Duration::from_secs(1)),
            "second failure is not logged"
        );
        assert!(!b.ready(t0 + Duration::from_millis(2999)));
        assert!(b.ready(t0 + Duration::from_secs(3)));
        for _ in 0..20 {
            b.failed(t0);
        }
        assert_eq!(b.delay, Backoff::MAX);
        b.succeeded();
        assert!(b.ready(t0));
        assert!(b.failed(t0), "a new outage is logged again");
    }

    #[test]
    fn scripted_activity_replays_and_records() {
        let start = Instant::now() - Duration::from_secs(5);
        let mut p = ScriptedActivity::new(
            start,
            vec![
                (Duration::ZERO, ActivitySample::idle(600.0)),
                (Duration::from_secs(4), ActivitySample::idle(0.0)),
            ],
        );
        assert_eq!(p.sample().idle_s, Reading::Known(0.0));
        let seen = p.seen();
        let seen = seen.lock().unwrap();
        assert!(seen[0].is_none());
        assert!(seen[1].is_some());
    }
}
