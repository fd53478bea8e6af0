//! The throttling policy: a pure function of the user's choices, the probes' readings and the
//! time, kept in [`Policy`] and evaluated by [`Policy::tick`].
//!
//! # Directives
//!
//! | directive | what the engine does |
//! |---|---|
//! | [`Directive::Run`] `{ level }` | works at `level` (0..=1] of full speed, duty-cycling between micro-batches |
//! | [`Directive::Pace`] `{ duty }` | the same, but the temperature controller holds the duty below the mode's level (`duty` may be 0: keep weights loaded, compute nothing) |
//! | [`Directive::Drain`] | starts no new work, lets in-flight work finish, withdraws its DHT declarations; then reports `in_flight = 0` |
//! | [`Directive::Paused`] | yields now: no new expert compute within 250 ms, in-flight work finished or refused within 1 s, declarations withdrawn at once, device memory released within 3 s |
//!
//! Every directive carries a human `reason` and, where known, `until` (unix seconds) — when it is
//! expected to change on its own (a snooze's end, a schedule window's edge, a cooldown's end).
//!
//! # Rules, in order (first match wins)
//!
//! 1. **You paused or snoozed** ([`Policy::pause_manual`], [`Policy::snooze`]) → `Paused`. A snooze
//!    ends by itself at its `until`; the state survives restarts ([`PolicyState`]).
//! 2. **Protection rules** — they stop *all* work, manual or automatic, because they protect the
//!    PC's usability and hardware; each can be switched off in [`PolicyConfig`]:
//!    on battery (`pause_on_battery`), battery below `min_battery_percent` (even on mains: it waits
//!    to charge), a fullscreen window (`pause_on_fullscreen`), another process using a GPU above
//!    `gpu_other_threshold`. Fullscreen and other-GPU pauses last `cooldown_s` after the condition
//!    clears (a game's loading screen must not restart work), with `until` set to that moment.
//! 3. **Finish then pause** ([`Policy::finish_then_pause`]) → `Drain` until the engine reports
//!    `in_flight == 0` (or `finish_timeout_s` passes), then `Paused` until you resume.
//! 4. **Availability rules** — they stop only *automatically started* work. "Manual start wins":
//!    after [`Policy::resume_manual`] the activity rules (in use / away, Only-when-away, unknown
//!    idle) and the schedule no longer pause work; the in-use level still throttles it, and where
//!    the mode's in-use level is 0 the manual run uses `manual_in_use_level`. A manual start with
//!    an `until` returns to automatic control then; [`Policy::resume_auto`] returns at once.
//!    - outside the `schedule` → `Paused` until the next window;
//!    - the mode's level for "in use" or "away" (see [`Mode`]); a level of 0 → `Paused`;
//!    - where the in-use level is 0 (work waits while you use the PC), finding you away starts
//!      work only after `away_start_delay_s` (default 10 s): meanwhile `Paused`
//!      ([`PauseCause::StartingSoon`], "Starting in 10 s because you are away", `until` = the
//!      start), so the app can offer Cancel ([`Policy::cancel_away_start`]); a cancelled start
//!      stays `Paused` ([`PauseCause::StartCancelled`]) until you are back and away again.
//! 5. **Temperature**: a PI controller (below) limits the duty; if the limit is under the level
//!    → `Pace`, otherwise `Run`.
//!
//! # In use or away
//!
//! Away: the screen is locked (or the screensaver runs), or input has been idle for at least
//! `idle_threshold_s`. In use: input within the threshold, or an idle inhibitor is active
//! (video playback) and the screen is not locked.
//!
//! # Unknown readings
//!
//! Unknown readings never pause by themselves, with one documented exception: in
//! [`Mode::OnlyWhenAway`] an unknown idle time pauses automatic work ("cannot tell whether you are
//! away"). In the other modes an unknown idle time counts as *in use* (the lower level). Unknown
//! fullscreen, GPU, battery or temperature readings disable the rule that needs them.
//!
//! # Temperature controller
//!
//! Each tick, with `e = temperature_target_c - hottest GPU temperature` and `dt` the seconds since
//! the previous tick (at most 2 s): `I = clamp(I + KI·e·dt, 0, 1)` and
//! `limit = clamp(I + KP·e, 0, 1)` with `KP = 0.05` per °C and `KI = 0.01` per °C·s. Far below
//! the target the limit is 1 (no effect); above it the proportional term cuts the duty at once
//! (5 °C over → −25 %), and the integral term settles the duty where the temperature equals the
//! target. An unknown temperature freezes the limit. The engine gets `Pace { duty: min(level, limit) }`.

use serde::{Deserialize, Serialize};

use crate::probe::{ActivitySample, GpuSample, PowerSample, Reading, SystemSample};
use crate::schedule::Schedule;

/// Proportional gain of the temperature controller (duty per °C).
pub const THERMAL_KP: f64 = 0.05;
/// Integral gain of the temperature controller (duty per °C per second).
pub const THERMAL_KI: f64 = 0.01;

/// How hard to work.
///
/// | mode | in use | away |
/// |---|---|---|
/// | `Quiet` | `quiet_in_use_level` (0.1) | `quiet_away_level` (0.5): low heat and fan noise even when away |
/// | `Balanced` (default) | `in_use_level` (0.3) | `away_level` (1.0) |
/// | `Max` | 1.0 | 1.0 (protection rules and the temperature target still apply) |
/// | `OnlyWhenAway` | 0 (paused) | `away_level` (1.0); unknown idle → paused |
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// A trickle while you work, half speed when away.
    Quiet,
    /// Some work while you work, full speed when away.
    #[default]
    Balanced,
    /// Full speed always (still yields to games, batteries and heat).
    Max,
    /// Nothing while you work, full speed when away.
    OnlyWhenAway,
}

impl Mode {
    fn label(self) -> &'static str {
        match self {
            Mode::Quiet => "Quiet",
            Mode::Balanced => "Balanced",
            Mode::Max => "Max",
            Mode::OnlyWhenAway => "Only when away",
        }
    }
}

/// The user's settings (serde; missing fields take the defaults documented on each field).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct PolicyConfig {
    /// The mode. Default `Balanced`.
    pub mode: Mode,
    /// Seconds without input after which you count as away. Default 120.
    pub idle_threshold_s: f64,
    /// Balanced: level while you use the PC. Default 0.3.
    pub in_use_level: f64,
    /// Balanced and Only-when-away: level while you are away. Default 1.0.
    pub away_level: f64,
    /// Quiet: level while you use the PC. Default 0.1.
    pub quiet_in_use_level: f64,
    /// Quiet: level while you are away. Default 0.5.
    pub quiet_away_level: f64,
    /// Level of a manual start while you use the PC, where the mode's in-use level is 0. Default 0.3.
    pub manual_in_use_level: f64,
    /// Pause when processes other than ours use any GPU above this fraction (0..=1). Default 0.2.
    pub gpu_other_threshold: f64,
    /// Pause while a fullscreen window is in front. Default true.
    pub pause_on_fullscreen: bool,
    /// Pause while on battery. Default true.
    pub pause_on_battery: bool,
    /// Pause while the battery is below this percentage, on battery or charging. Default 40.
    pub min_battery_percent: f64,
    /// The hottest GPU is held at this temperature (°C). Default 80.
    pub temperature_target_c: f64,
    /// Seconds a fullscreen or other-GPU pause lasts after the condition clears. Default 30.
    pub cooldown_s: f64,
    /// Longest "finish then pause" drain before pausing anyway (seconds). Default 300.
    pub finish_timeout_s: f64,
    /// When automatic work may run; `None` = always. Default `None`.
    pub schedule: Option<Schedule>,
    /// Seconds between finding you away and starting work that waits while you use the PC (the
    /// mode's in-use level is 0): the app says "Starting in 10 s because you are away" and offers
    /// Cancel. 0 starts at once. Default 10.
    pub away_start_delay_s: f64,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        PolicyConfig {
            mode: Mode::Balanced,
            idle_threshold_s: 120.0,
            in_use_level: 0.3,
            away_level: 1.0,
            quiet_in_use_level: 0.1,
            quiet_away_level: 0.5,
            manual_in_use_level: 0.3,
            gpu_other_threshold: 0.2,
            pause_on_fullscreen: true,
            pause_on_battery: true,
            min_battery_percent: 40.0,
            temperature_target_c: 80.0,
            cooldown_s: 30.0,
            finish_timeout_s: 300.0,
            schedule: None,
            away_start_delay_s: 10.0,
        }
    }
}

impl PolicyConfig {
    /// `(in use, away)` levels of the current mode.
    pub fn levels(&self) -> (f64, f64) {
        let (u, a) = match self.mode {
            Mode::Quiet => (self.quiet_in_use_level, self.quiet_away_level),
            Mode::Balanced => (self.in_use_level, self.away_level),
            Mode::Max => (1.0, 1.0),
            Mode::OnlyWhenAway => (0.0, self.away_level),
        };
        (u.clamp(0.0, 1.0), a.clamp(0.0, 1.0))
    }
}

/// Everything the policy looks at.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Sample {
    /// When the readings were taken (unix seconds).
    pub taken_at: f64,
    /// User activity.
    pub activity: ActivitySample,
    /// GPUs (`Unknown` without NVML).
    pub gpus: Reading<Vec<GpuSample>>,
    /// Mains and battery.
    pub power: PowerSample,
    /// CPU, memory, load (shown to the user; no rule uses them yet).
    pub system: SystemSample,
    /// Work items the engine still has in flight (reported by the engine).
    pub in_flight: Reading<u32>,
}

impl Sample {
    /// A sample with every reading unknown.
    pub fn unknown(taken_at: f64) -> Self {
        let why = "not measured";
        Sample {
            taken_at,
            activity: ActivitySample::unknown(why),
            gpus: Reading::Unknown(why),
            power: PowerSample {
                on_ac: Reading::Unknown(why),
                battery_percent: Reading::Unknown(why),
            },
            system: SystemSample {
                cpu_percent: Reading::Unknown(why),
                memory_used: Reading::Unknown(why),
                memory_total: Reading::Unknown(why),
                load_1m: Reading::Unknown(why),
            },
            in_flight: Reading::Unknown("the engine has not reported"),
        }
    }
}

/// Why work is paused (for the UI and for tests; `reason` has the words).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PauseCause {
    /// The governor has not sampled yet.
    Starting,
    /// You paused.
    User,
    /// You snoozed.
    Snoozed,
    /// "Finish then pause" finished.
    Finished,
    /// You are using the PC and the mode's in-use level is 0.
    InUse,
    /// Only-when-away cannot tell whether you are away.
    IdleUnknown,
    /// A fullscreen window is (or was just) in front.
    Fullscreen,
    /// Another process uses a GPU.
    OtherGpuUse,
    /// On battery.
    OnBattery,
    /// Battery below the minimum.
    LowBattery,
    /// Outside the schedule.
    Schedule,
    /// You are away: work waiting while you use the PC starts at `until` unless you cancel.
    StartingSoon,
    /// You cancelled a start because you were away: waits until you are back, then away again.
    StartCancelled,
}

/// What the engine should do now (see the module docs for each variant's contract).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Directive {
    /// Work at `level` (0..=1] of full speed.
    Run {
        /// Fraction of full speed.
        level: f64,
        /// Why, in words.
        reason: String,
        /// When this is expected to change, if known (unix seconds).
        until: Option<f64>,
    },
    /// Work at `duty` (0..=1) because the temperature controller limits it.
    Pace {
        /// Fraction of time computing.
        duty: f64,
        /// Why, in words.
        reason: String,
        /// When this is expected to change, if known.
        until: Option<f64>,
    },
    /// Finish in-flight work, start nothing new, then report `in_flight = 0`.
    Drain {
        /// Why, in words.
        reason: String,
        /// Deadline after which the policy pauses anyway.
        until: Option<f64>,
    },
    /// Yield: stop, release device memory, withdraw declarations.
    Paused {
        /// Machine-readable cause.
        cause: PauseCause,
        /// Why, in words.
        reason: String,
        /// When work may resume on its own, if known.
        until: Option<f64>,
    },
}

impl Directive {
    /// The reason, in words.
    pub fn reason(&self) -> &str {
        match self {
            Directive::Run { reason, .. }
            | Directive::Pace { reason, .. }
            | Directive::Drain { reason, .. }
            | Directive::Paused { reason, .. } => reason,
        }
    }

    /// When the directive is expected to change on its own, if known.
    pub fn until(&self) -> Option<f64> {
        match self {
            Directive::Run { until, .. }
            | Directive::Pace { until, .. }
            | Directive::Drain { until, .. }
            | Directive::Paused { until, .. } => *until,
        }
    }

    /// The fraction of time the engine may compute (0 for `Drain` and `Paused`).
    pub fn duty(&self) -> f64 {
        match self {
            Directive::Run { level, .. } => *level,
            Directive::Pace { duty, .. } => *duty,
            Directive::Drain { .. } | Directive::Paused { .. } => 0.0,
        }
    }

    /// Whether this is `Run`.
    pub fn is_run(&self) -> bool {
        matches!(self, Directive::Run { .. })
    }

    /// The pause cause, if paused.
    pub fn pause_cause(&self) -> Option<PauseCause> {
        match self {
            Directive::Paused { cause, .. } => Some(*cause),
            _ => None,
        }
    }

    /// The directive before the first sample.
    pub fn starting() -> Self {
        Directive::Paused {
            cause: PauseCause::Starting,
            reason: "Starting up".into(),
            until: None,
        }
    }
}

/// Who is in control of starting and stopping work.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
#[serde(tag = "control", rename_all = "snake_case")]
pub enum Control {
    /// The rules decide (work is "auto-started").
    #[default]
    Auto,
    /// You started work by hand; the availability rules do not stop it.
    Manual {
        /// Back to `Auto` at this time (unix seconds), if set.
        until: Option<f64>,
    },
    /// You paused (`until: None`) or snoozed (`until: Some`).
    Paused {
        /// End of the snooze (unix seconds), if any.
        until: Option<f64>,
        /// Paused because "finish then pause" completed.
        finished: bool,
    },
    /// "Finish then pause" is draining.
    Finishing {
        /// When it started (unix seconds).
        since: f64,
    },
}

/// The part of the policy that must survive restarts (serialize it on every change).
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct PolicyState {
    /// Who is in control, including a snooze's end time.
    pub control: Control,
}

/// The policy: settings, persisted state and the controller's memory.
#[derive(Debug, Clone)]
pub struct Policy {
    config: PolicyConfig,
    state: PolicyState,
    thermal_integral: f64,
    thermal_limit: f64,
    last_now: Option<f64>,
    fullscreen_seen: Option<f64>,
    other_gpu_seen: Option<(f64, u32, f64)>,
    /// The GPU the experts compute on (NVML index): the GPU rules look at it alone. `None`: at
    /// every GPU.
    gpu: Option<u32>,
    /// Since when you have been away, while that matters for starting work (see
    /// [`PolicyConfig::away_start_delay_s`]); `None` while you are not.
    away_since: Option<f64>,
    /// You cancelled the start of this time away.
    away_start_cancelled: bool,
}

enum Presence {
    Away(&'static str),
    InUse(&'static str),
    Unknown(&'static str),
}

impl Policy {
    /// A policy under automatic control.
    pub fn new(config: PolicyConfig) -> Self {
        Self::with_state(config, PolicyState::default())
    }

    /// A policy restored from a saved state.
    pub fn with_state(config: PolicyConfig, state: PolicyState) -> Self {
        Policy {
            config,
            state,
            thermal_integral: 1.0,
            thermal_limit: 1.0,
            last_now: None,
            fullscreen_seen: None,
            other_gpu_seen: None,
            gpu: None,
            away_since: None,
            away_start_cancelled: false,
        }
    }

    /// Selects the GPU the experts compute on (its NVML index): the GPU rules (other programs' use,
    /// the temperature controller) then look at that GPU alone. `None` (computing on the CPU, or not
    /// known): every GPU counts, as before.
    pub fn set_gpu(&mut self, gpu: Option<u32>) {
        if self.gpu != gpu {
            self.gpu = gpu;
            self.other_gpu_seen = None;
        }
    }

    /// The selected GPU (see [`Policy::set_gpu`]).
    pub fn gpu(&self) -> Option<u32> {
        self.gpu
    }

    /// Whether the GPU rules look at the GPU with NVML index `index`.
    fn watches(&self, index: u32) -> bool {
        self.gpu.is_none_or(|g| g == index)
    }

    /// The settings.
    pub fn config(&self) -> &PolicyConfig {
        &self.config
    }

    /// Replaces the settings (the persisted state is kept).
    pub fn set_config(&mut self, config: PolicyConfig) {
        self.config = config;
    }

    /// Changes the mode.
    pub fn set_mode(&mut self, mode: Mode) {
        self.config.mode = mode;
    }

    /// The state to persist.
    pub fn state(&self) -> PolicyState {
        self.state
    }

    /// Restores a persisted state (e.g. a snooze across a restart).
    pub fn restore(&mut self, state: PolicyState) {
        self.state = state;
    }

    /// Pauses until `until` (unix seconds), then returns to automatic control.
    pub fn snooze(&mut self, until: f64) {
        self.state.control = Control::Paused {
            until: Some(until),
            finished: false,
        };
    }

    /// Pauses until you resume.
    pub fn pause_manual(&mut self) {
        self.state.control = Control::Paused {
            until: None,
            finished: false,
        };
    }

    /// Starts work by hand ("manual start wins"), until `until` if given, then automatic.
    pub fn resume_manual(&mut self, until: Option<f64>) {
        self.state.control = Control::Manual { until };
    }

    /// Returns to automatic control (ends a pause, snooze or manual start).
    pub fn resume_auto(&mut self) {
        self.state.control = Control::Auto;
    }

    /// Finishes the work in flight, then pauses until you resume.
    pub fn finish_then_pause(&mut self, now: f64) {
        if !matches!(
            self.state.control,
            Control::Paused { .. } | Control::Finishing { .. }
        ) {
            self.state.control = Control::Finishing { since: now };
        }
    }

    /// Cancels a start that is due because you are away (the [`PauseCause::StartingSoon`] pause), or
    /// stops work that such a start began: work then waits until you are back and away again.
    /// Returns whether there was such a start; does nothing otherwise.
    pub fn cancel_away_start(&mut self) -> bool {
        let pending = self.away_since.is_some() && !self.away_start_cancelled;
        if pending {
            self.away_start_cancelled = true;
        }
        pending
    }

    /// The temperature controller's current duty limit (0..=1).
    pub fn thermal_limit(&self) -> f64 {
        self.thermal_limit
    }

    fn update_controls(&mut self, sample: &Sample, now: f64) {
        match self.state.control {
            Control::Paused { until: Some(u), .. } | Control::Manual { until: Some(u) } if now >= u => {
                self.state.control = Control::Auto;
            }
            Control::Finishing { since }
                if sample.in_flight == Reading::Known(0) || now - since >= self.config.finish_timeout_s =>
            {
                self.state.control = Control::Paused {
                    until: None,
                    finished: true,
                };
            }
            _ => {}
        }
    }

    fn update_thermal(&mut self, sample: &Sample, dt: f64) -> Option<(u32, f64)> {
        let hottest = sample.gpus.known().and_then(|gpus| {
            gpus.iter()
                .filter(|g| self.watches(g.index))
                .filter_map(|g| g.temperature_c.get().map(|t| (g.index, t)))
                .max_by(|a, b| a.1.total_cmp(&b.1))
        });
        if let Some((_, t)) = hottest {
            let e = self.config.temperature_target_c - t;
            self.thermal_integral = (self.thermal_integral + THERMAL_KI * e * dt).clamp(0.0, 1.0);
            self.thermal_limit = (self.thermal_integral + THERMAL_KP * e).clamp(0.0, 1.0);
        }
        hottest
    }

    fn presence(&self, a: &ActivitySample) -> Presence {
        if a.locked == Reading::Known(true) {
            return Presence::Away("the screen is locked");
        }
        if a.inhibited == Reading::Known(true) {
            return Presence::InUse("a video or another app keeps the screen awake");
        }
        match a.idle_s {
            Reading::Known(i) if i >= self.config.idle_threshold_s => Presence::Away("you are away"),
            Reading::Known(_) => Presence::InUse("you are using the PC"),
            Reading::Unknown(why) => Presence::Unknown(why),
        }
    }

    /// Decides what the engine should do at `now` (unix seconds) given `sample`.
    pub fn tick(&mut self, sample: &Sample, now: f64) -> Directive {
        let dt = self.last_now.map_or(0.0, |l| (now - l).clamp(0.0, 2.0));
        self.last_now = Some(now);
        self.update_controls(sample, now);
        let hottest = self.update_thermal(sample, dt);
        let cfg = &self.config;

        if sample.activity.fullscreen == Reading::Known(true) {
            self.fullscreen_seen = Some(now);
        }
        let busiest_other = sample.gpus.known().and_then(|gpus| {
            gpus.iter()
                .filter(|g| self.watches(g.index))
                .filter_map(|g| g.other_utilization.get().map(|u| (g.index, u)))
                .max_by(|a, b| a.1.total_cmp(&b.1))
        });
        if let Some((index, u)) = busiest_other
            && u > cfg.gpu_other_threshold
        {
            self.other_gpu_seen = Some((now, index, u));
        }
        let paused = |cause, reason: String, until| Directive::Paused { cause, reason, until };

        // 1. You paused or snoozed.
        match self.state.control {
            Control::Paused { until: Some(u), .. } => {
                return paused(PauseCause::Snoozed, "Snoozed by you".into(), Some(u));
            }
            Control::Paused {
                until: None,
                finished: true,
            } => {
                return paused(
                    PauseCause::Finished,
                    "Finished the current work and paused, as you asked".into(),
                    None,
                );
            }
            Control::Paused {
                until: None,
                finished: false,
            } => {
                return paused(PauseCause::User, "Paused by you".into(), None);
            }
            _ => {}
        }

        // 2. Protection rules (manual work too).
        if cfg.pause_on_battery && sample.power.on_ac == Reading::Known(false) {
            return paused(
                PauseCause::OnBattery,
                "On battery power; resumes when plugged in".into(),
                None,
            );
        }
        if let Reading::Known(p) = sample.power.battery_percent
            && p < cfg.min_battery_percent
        {
            let reason = format!(
                "Battery at {p:.0} %; waits until it is charged to {:.0} %",
                cfg.min_battery_percent
            );
            return paused(PauseCause::LowBattery, reason, None);
        }
        if cfg.pause_on_fullscreen
            && let Some(seen) = self.fullscreen_seen
            && now - seen < cfg.cooldown_s
        {
            return if seen == now {
                paused(
                    PauseCause::Fullscreen,
                    "A fullscreen app (game or video) is in front".into(),
                    None,
                )
            } else {
                let reason = format!(
                    "A fullscreen app just closed; resuming after {:.0} s",
                    cfg.cooldown_s
                );
                paused(PauseCause::Fullscreen, reason, Some(seen + cfg.cooldown_s))
            };
        }
        if let Some((seen, index, u)) = self.other_gpu_seen
            && now - seen < cfg.cooldown_s
        {
            return if seen == now {
                let reason = format!("Another program is using GPU {index} ({:.0} %)", u * 100.0);
                paused(PauseCause::OtherGpuUse, reason, None)
            } else {
                let reason = format!(
                    "Another program used GPU {index}; resuming after {:.0} s",
                    cfg.cooldown_s
                );
                paused(PauseCause::OtherGpuUse, reason, Some(seen + cfg.cooldown_s))
            };
        }

        // 3. Finish then pause.
        if let Control::Finishing { since } = self.state.control {
            return Directive::Drain {
                reason: "Finishing the current work, then pausing (you asked)".into(),
                until: Some(since + cfg.finish_timeout_s),
            };
        }

        // 4. Availability rules (automatically started work only).
        let manual = match self.state.control {
            Control::Manual { until } => Some(until),
            _ => None,
        };
        let mut until = None;
        if manual.is_none()
            && let Some(schedule) = &cfg.schedule
        {
            if !schedule.allows(now) {
                return paused(
                    PauseCause::Schedule,
                    "Outside your schedule".into(),
                    schedule.next_change(now),
                );
            }
            until = schedule.next_change(now);
        }
        let (in_use_level, away_level) = cfg.levels();
        let mode = cfg.mode.label();
        let presence = self.presence(&sample.activity);
        // 4a. A start because you are away waits `away_start_delay_s`, and you may cancel it.
        match presence {
            Presence::Away(why) if manual.is_none() && in_use_level <= 0.0 && away_level > 0.0 => {
                let since = *self.away_since.get_or_insert(now);
                if self.away_start_cancelled {
                    let reason =
                        format!("{mode}: you cancelled the start; waits until you are back and away again");
                    return paused(PauseCause::StartCancelled, reason, None);
                }
                let delay = cfg.away_start_delay_s.max(0.0);
                if now - since < delay {
                    let reason = format!("Starting in {delay:.0} s because {why}");
                    return paused(PauseCause::StartingSoon, reason, Some(since + delay));
                }
            }
            Presence::Away(_) => {}
            Presence::InUse(_) | Presence::Unknown(_) => {
                self.away_since = None;
                self.away_start_cancelled = false;
            }
        }
        let (mut level, mut reason) = match presence {
            Presence::Away(why) => (away_level, format!("{mode}: {why}")),
            Presence::InUse(why) => (in_use_level, format!("{mode}: {why}")),
            Presence::Unknown(why) if cfg.mode == Mode::OnlyWhenAway && manual.is_none() => {
                let reason = format!("Cannot tell whether you are away ({why})");
                return paused(PauseCause::IdleUnknown, reason, None);
            }
            Presence::Unknown(why) => (
                in_use_level,
                format!("{mode}: idle time unknown ({why}), so the in-use level"),
            ),
        };
        if let Some(manual_until) = manual {
            until = manual_until;
            if level <= 0.0 {
                level = cfg.manual_in_use_level.clamp(0.0, 1.0);
            }
            reason = format!("Started by you; {reason}");
        }
        if level <= 0.0 {
            let reason = format!(
                "{mode}: you are using the PC; starts after {:.0} s without input",
                cfg.idle_threshold_s
            );
            return paused(PauseCause::InUse, reason, None);
        }

        // 5. Temperature.
        let limit = (self.thermal_limit * 100.0).round() / 100.0;
        if limit < level {
            let target = cfg.temperature_target_c;
            let reason = match hottest {
                Some((index, t)) if limit <= 0.0 => {
                    format!("GPU {index} at {t:.0} °C; waiting for it to cool to {target:.0} °C")
                }
                Some((index, t)) => format!("Holding GPU {index} at {target:.0} °C (now {t:.0} °C)"),
                None => format!("Holding the GPU near {target:.0} °C (temperature unknown just now)"),
            };
            return Directive::Pace {
                duty: limit,
                reason,
                until: None,
            };
        }
        Directive::Run { level, reason, until }
    }
}
