//! The governor loop: one std thread owns the probes and the [`Policy`], samples, ticks and
//! publishes the [`Directive`] on a `tokio::sync::watch` channel.
//!
//! Fast path: the activity probe is sampled every tick (default 100 ms), so a change the probe
//! sees is published within one tick plus the probe's own call time. GPU, power and system probes
//! are sampled every `slow_interval` (default 1 s). Commands (snooze, pause, resume, finish, mode,
//! settings, the engine's in-flight count) go through a bounded channel; a user command wakes the
//! loop at once and is reflected in the next directive without waiting for the tick.
//!
//! The thread runs until [`GovernorHandle::shutdown`] or until the handle is dropped (the loop
//! notices within one tick).

use std::sync::Arc;
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError, sync_channel};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::watch;

use crate::GovernorError;
use crate::policy::{Directive, Mode, Policy, PolicyConfig, PolicyState, Sample};
use crate::probe::{self, ActivityProbe, GpuProbe, PowerProbe, Reading, SystemProbe};

/// Capacity of the command channel.
const COMMAND_CAPACITY: usize = 64;

/// The probes the governor owns.
pub struct Probes {
    /// Sampled every tick.
    pub activity: Box<dyn ActivityProbe>,
    /// Sampled every `slow_interval`.
    pub gpu: Box<dyn GpuProbe>,
    /// Sampled every `slow_interval`.
    pub power: Box<dyn PowerProbe>,
    /// Sampled every `slow_interval`.
    pub system: Box<dyn SystemProbe>,
}

impl std::fmt::Debug for Probes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Probes").finish_non_exhaustive()
    }
}

impl Probes {
    /// This platform's probes (see the crate docs).
    pub fn platform() -> Self {
        Probes {
            activity: probe::platform_activity(),
            gpu: Box::new(probe::nvml::NvmlProbe::new()),
            power: probe::power::platform_power(),
            system: Box::new(probe::system::SysinfoProbe::new()),
        }
    }
}

/// Loop timing and the state to start from.
#[derive(Debug, Clone)]
pub struct GovernorOptions {
    /// Activity sampling and policy tick period. Default 100 ms.
    pub tick_interval: Duration,
    /// GPU, power and system sampling period. Default 1 s.
    pub slow_interval: Duration,
    /// The persisted policy state to restore (e.g. a snooze). Default: automatic.
    pub initial_state: PolicyState,
    /// The GPU the experts compute on (NVML index), which the GPU rules watch alone
    /// ([`Policy::set_gpu`]). Default `None`: every GPU.
    pub gpu: Option<u32>,
}

impl Default for GovernorOptions {
    fn default() -> Self {
        GovernorOptions {
            tick_interval: Duration::from_millis(100),
            slow_interval: Duration::from_secs(1),
            initial_state: PolicyState::default(),
            gpu: None,
        }
    }
}

/// A request to the governor thread.
#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    /// Pause until this unix time.
    Snooze {
        /// End of the snooze (unix seconds).
        until: f64,
    },
    /// Pause until resumed.
    Pause,
    /// Start by hand ("manual start wins"), optionally until a unix time.
    ResumeManual {
        /// Back to automatic control at this time, if set.
        until: Option<f64>,
    },
    /// Back to automatic control.
    ResumeAuto,
    /// Finish in-flight work, then pause.
    FinishThenPause,
    /// Cancel a start that is due because you are away ([`Policy::cancel_away_start`]).
    CancelAwayStart,
    /// Change the mode.
    SetMode(Mode),
    /// Replace the settings.
    SetConfig(Box<PolicyConfig>),
    /// Select the GPU the GPU rules watch (`None`: every GPU); see [`Policy::set_gpu`].
    SetGpu(Option<u32>),
    /// The engine's count of work items in flight.
    InFlight(u32),
    /// Stop the governor thread.
    Shutdown,
}

/// Starts governors.
#[derive(Debug)]
pub struct Governor;

impl Governor {
    /// Spawns the governor thread with default options except `tick_interval`.
    pub fn spawn(
        config: PolicyConfig,
        probes: Probes,
        tick_interval: Duration,
    ) -> Result<GovernorHandle, GovernorError> {
        Self::spawn_with(
            config,
            probes,
            GovernorOptions {
                tick_interval,
                ..GovernorOptions::default()
            },
        )
    }

    /// Spawns the governor thread.
    pub fn spawn_with(
        config: PolicyConfig,
        probes: Probes,
        options: GovernorOptions,
    ) -> Result<GovernorHandle, GovernorError> {
        let (tx, rx) = sync_channel(COMMAND_CAPACITY);
        let (directive_tx, directive_rx) = watch::channel(Directive::starting());
        let (state_tx, state_rx) = watch::channel(options.initial_state);
        let (sample_tx, sample_rx) = watch::channel(None);
        let mut policy = Policy::with_state(config, options.initial_state);
        policy.set_gpu(options.gpu);
        let worker = Worker {
            policy,
            probes,
            options,
            rx,
            directive_tx,
            state_tx,
            sample_tx,
        };
        let thread = std::thread::Builder::new()
            .name("apiary-governor".into())
            .spawn(move || worker.run())
            .map_err(GovernorError::Spawn)?;
        Ok(GovernorHandle {
            tx,
            directive: directive_rx,
            state: state_rx,
            sample: sample_rx,
            thread: Some(thread),
        })
    }
}

/// Talks to a running governor.
#[derive(Debug)]
pub struct GovernorHandle {
    tx: SyncSender<Command>,
    directive: watch::Receiver<Directive>,
    state: watch::Receiver<PolicyState>,
    sample: watch::Receiver<Option<Arc<Sample>>>,
    thread: Option<JoinHandle<()>>,
}

impl GovernorHandle {
    /// The current directive; `changed().await` wakes on every new one.
    pub fn directive(&self) -> watch::Receiver<Directive> {
        self.directive.clone()
    }

    /// The policy state to persist; changes on snooze, pause, resume, finish and their expiry.
    pub fn state(&self) -> watch::Receiver<PolicyState> {
        self.state.clone()
    }

    /// The latest sample (published every slow interval and on directive changes).
    pub fn sample(&self) -> watch::Receiver<Option<Arc<Sample>>> {
        self.sample.clone()
    }

    /// Sends a command without blocking (usable from async code).
    pub fn send(&self, command: Command) -> Result<(), GovernorError> {
        self.tx.try_send(command).map_err(|e| match e {
            TrySendError::Full(_) => GovernorError::Busy,
            TrySendError::Disconnected(_) => GovernorError::Stopped,
        })
    }

    /// Snoozes until `until` (unix seconds).
    pub fn snooze(&self, until: f64) -> Result<(), GovernorError> {
        self.send(Command::Snooze { until })
    }

    /// Pauses until resumed.
    pub fn pause(&self) -> Result<(), GovernorError> {
        self.send(Command::Pause)
    }

    /// Starts work by hand, optionally until a unix time.
    pub fn resume_manual(&self, until: Option<f64>) -> Result<(), GovernorError> {
        self.send(Command::ResumeManual { until })
    }

    /// Returns to automatic control.
    pub fn resume_auto(&self) -> Result<(), GovernorError> {
        self.send(Command::ResumeAuto)
    }

    /// Finishes in-flight work, then pauses.
    pub fn finish_then_pause(&self) -> Result<(), GovernorError> {
        self.send(Command::FinishThenPause)
    }

    /// Cancels a start that is due because you are away: work waits until you are back and away
    /// again ([`Policy::cancel_away_start`]; nothing happens when no such start is due).
    pub fn cancel_away_start(&self) -> Result<(), GovernorError> {
        self.send(Command::CancelAwayStart)
    }

    /// Changes the mode.
    pub fn set_mode(&self, mode: Mode) -> Result<(), GovernorError> {
        self.send(Command::SetMode(mode))
    }

    /// Replaces the settings.
    pub fn set_config(&self, config: PolicyConfig) -> Result<(), GovernorError> {
        self.send(Command::SetConfig(Box::new(config)))
    }

    /// Selects the GPU the experts compute on (NVML index; `None`: every GPU counts) for the GPU
    /// rules: other programs' use and the temperature controller look at that GPU alone.
    pub fn set_gpu(&self, gpu: Option<u32>) -> Result<(), GovernorError> {
        self.send(Command::SetGpu(gpu))
    }

    /// Reports how many work items the engine has in flight.
    pub fn report_in_flight(&self, n: u32) -> Result<(), GovernorError> {
        self.send(Command::InFlight(n))
    }

    /// Stops the thread and waits for it (at most one probe round; call from a blocking context).
    pub fn shutdown(mut self) -> Result<(), GovernorError> {
        // A full queue still ends the loop: dropping the sender below disconnects it.
        let _ = self.tx.try_send(Command::Shutdown);
        let thread = self.thread.take();
        drop(self);
        match thread {
            Some(t) => t.join().map_err(|_| GovernorError::Panicked),
            None => Ok(()),
        }
    }
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

struct Worker {
    policy: Policy,
    probes: Probes,
    options: GovernorOptions,
    rx: Receiver<Command>,
    directive_tx: watch::Sender<Directive>,
    state_tx: watch::Sender<PolicyState>,
    sample_tx: watch::Sender<Option<Arc<Sample>>>,
}

enum Applied {
    Retick,
    Quiet,
    Stop,
}

impl Worker {
    fn apply(&mut self, command: Command) -> Applied {
        let now = unix_now();
        tracing::info!(?command, "governor command");
        match command {
            Command::Snooze { until } => self.policy.snooze(until),
            Command::Pause => self.policy.pause_manual(),
            Command::ResumeManual { until } => self.policy.resume_manual(until),
            Command::ResumeAuto => self.policy.resume_auto(),
            Command::FinishThenPause => self.policy.finish_then_pause(now),
            Command::CancelAwayStart => {
                if !self.policy.cancel_away_start() {
                    tracing::info!("no start is due because you are away: nothing to cancel");
                }
            }
            Command::SetMode(m) => self.policy.set_mode(m),
            Command::SetConfig(c) => self.policy.set_config(*c),
            Command::SetGpu(g) => self.policy.set_gpu(g),
            Command::InFlight(_) => return Applied::Quiet,
            Command::Shutdown => return Applied::Stop,
        }
        Applied::Retick
    }

    fn run(mut self) {
        let mut next_slow = Instant::now();
        let why = "not sampled yet";
        let mut gpus = Reading::Unknown(why);
        let mut power = crate::probe::PowerSample {
            on_ac: Reading::Unknown(why),
            battery_percent: Reading::Unknown(why),
        };
        let mut system = Sample::unknown(0.0).system;
        let mut in_flight: Reading<u32> = Reading::Unknown("the engine has not reported");
        loop {
            let tick_start = Instant::now();
            let activity = self.probes.activity.sample();
            let slow = Instant::now() >= next_slow;
            if slow {
                gpus = self.probes.gpu.sample();
                power = self.probes.power.sample();
                system = self.probes.system.sample();
                next_slow = Instant::now() + self.options.slow_interval;
            }
            let now = unix_now();
            let sample = Sample {
                taken_at: now,
                activity,
                gpus: gpus.clone(),
                power,
                system,
                in_flight,
            };
            let directive = self.policy.tick(&sample, now);
            let changed = self.directive_tx.send_if_modified(|d| {
                if *d == directive {
                    false
                } else {
                    tracing::info!(?directive, "governor directive");
                    *d = directive;
                    true
                }
            });
            let state = self.policy.state();
            self.state_tx
                .send_if_modified(|s| std::mem::replace(s, state) != state);
            if slow || changed {
                self.sample_tx.send_replace(Some(Arc::new(sample)));
            }
            let deadline = tick_start + self.options.tick_interval;
            loop {
                let wait = deadline.saturating_duration_since(Instant::now());
                match self.rx.recv_timeout(wait) {
                    Ok(Command::InFlight(n)) => {
                        in_flight = Reading::Known(n);
                        if matches!(
                            self.policy.state().control,
                            crate::policy::Control::Finishing { .. }
                        ) {
                            break;
                        }
                    }
                    Ok(command) => match self.apply(command) {
                        Applied::Retick => break,
                        Applied::Quiet => {}
                        Applied::Stop => return,
                    },
                    Err(RecvTimeoutError::Timeout) => break,
                    Err(RecvTimeoutError::Disconnected) => return,
                }
            }
        }
    }
}
