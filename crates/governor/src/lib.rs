//! The governor keeps the volunteer's PC usable: it watches what the user is doing and what the
//! GPUs, CPU and battery report, and tells the engine how hard to work.
//!
//! - [`probe`]: readings, each `Known` or `Unknown` with a reason; probes never fail.
//! - [`policy`]: the pure decision function [`Policy::tick`] → [`Directive`] (run at a level,
//!   pace to a duty cycle, drain, or pause, always with a reason and, where known, until when).
//! - [`schedule`]: weekly windows for automatic work.
//! - [`governor`]: a thread that samples the probes every 100 ms (activity) / 1 s (GPU, power,
//!   system), ticks the policy and publishes directives on a `tokio::sync::watch` channel.
//!
//! # Probes per OS
//!
//! | signal | Linux | Windows | macOS |
//! |---|---|---|---|
//! | input idle time | Mutter `GetIdletime`, freedesktop `GetSessionIdleTime`, X11 XScreenSaver `QueryInfo`, logind `IdleHint` ([`probe::linux`]) | `GetLastInputInfo` | CoreGraphics `CGEventSourceSecondsSinceLastEventType` |
//! | locked / screensaver | logind `LockedHint`, freedesktop `GetActive`, X11 screensaver state | `SHQueryUserNotificationState` = not present | Unknown |
//! | fullscreen / presentation | X11 EWMH `_NET_ACTIVE_WINDOW` + `_NET_WM_STATE_FULLSCREEN` (Unknown on Wayland) | `SHQueryUserNotificationState` busy / D3D fullscreen / presentation | Unknown |
//! | idle inhibitors (video) | logind `BlockInhibited` has `idle`, GNOME `IsInhibited(8)` | Unknown | Unknown |
//! | GPUs | NVML loaded at run time ([`probe::nvml`]) | NVML | NVML (none on Apple Silicon) |
//! | power | `/sys/class/power_supply` ([`probe::power`]) | `GetSystemPowerStatus` | Unknown |
//! | CPU, memory, load | sysinfo | sysinfo (no load average) | sysinfo |
//!
//! The Windows and macOS probes call a few OS functions declared by hand (no extra crates), in
//! `#[cfg]` modules that allow `unsafe` locally; they have not been compiled on the Linux machines
//! this crate was built on. A maintainer adding more (IOKit `HIDIdleTime`, macOS power sources,
//! Windows idle inhibitors) would add `io-kit-sys`/`core-foundation` or `windows-sys`.
//!
//! # Verified here
//!
//! On a headless Debian machine without a GPU: sysinfo CPU and memory are `Known`; NVML, the
//! session and system buses and `$DISPLAY` are missing and every probe reports `Unknown` with a
//! reason; the sysfs power probe is exercised on a fake `/sys/class/power_supply` tree; the X11
//! probe against a real `Xvfb` (idle time known and growing; fullscreen detection through EWMH
//! properties the test sets as a window manager would); the D-Bus probe against a private
//! `dbus-daemon` serving fake Mutter and logind objects. Not verified here: real GNOME/KDE
//! sessions, NVML on real GPUs, Windows and macOS.
#![deny(missing_docs)]

pub mod governor;
pub mod policy;
pub mod probe;
pub mod schedule;

pub use governor::{Command, Governor, GovernorHandle, GovernorOptions, Probes};
pub use policy::{Control, Directive, Mode, PauseCause, Policy, PolicyConfig, PolicyState, Sample};
pub use probe::Reading;

/// Errors of the governor handle.
#[derive(Debug, thiserror::Error)]
pub enum GovernorError {
    /// The governor thread could not be started.
    #[error("cannot start the governor thread: {0}")]
    Spawn(#[source] std::io::Error),
    /// The governor thread has stopped.
    #[error("the governor has stopped")]
    Stopped,
    /// The command queue is full (the governor is stuck in a probe).
    #[error("the governor is busy; try again")]
    Busy,
    /// The governor thread panicked.
    #[error("the governor thread panicked")]
    Panicked,
}
