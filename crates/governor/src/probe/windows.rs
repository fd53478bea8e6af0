//! Windows: input idle time (`GetLastInputInfo`), presentation / fullscreen / lock state
//! (`SHQueryUserNotificationState`) and power (`GetSystemPowerStatus`).
//!
//! Declared by hand (three small, stable Win32 calls) instead of adding `windows-sys`; this file
//! is compiled only on Windows and has not been compiled on the Linux machines that built the
//! rest of the crate. `GetLastInputInfo` sees the input of the session the process runs in, so
//! the governor must run in the user's session (not as a service), as the docs require anyway.
//! Idle inhibitors have no public query on Windows: `inhibited` is `Unknown`.
#![allow(unsafe_code)]

use super::{ActivityProbe, ActivitySample, PowerProbe, PowerSample, Reading};

#[repr(C)]
#[allow(non_snake_case, non_camel_case_types)]
struct LASTINPUTINFO {
    cbSize: u32,
    dwTime: u32,
}

#[repr(C)]
#[allow(non_snake_case, non_camel_case_types)]
struct SYSTEM_POWER_STATUS {
    ACLineStatus: u8,
    BatteryFlag: u8,
    BatteryLifePercent: u8,
    SystemStatusFlag: u8,
    BatteryLifeTime: u32,
    BatteryFullLifeTime: u32,
}

#[link(name = "user32")]
unsafe extern "system" {
    fn GetLastInputInfo(plii: *mut LASTINPUTINFO) -> i32;
}

#[link(name = "kernel32")]
unsafe extern "system" {
    fn GetTickCount() -> u32;
    fn GetSystemPowerStatus(status: *mut SYSTEM_POWER_STATUS) -> i32;
}

#[link(name = "shell32")]
unsafe extern "system" {
    fn SHQueryUserNotificationState(state: *mut i32) -> i32;
}

// QUERY_USER_NOTIFICATION_STATE values.
const QUNS_NOT_PRESENT: i32 = 1;
const QUNS_BUSY: i32 = 2;
const QUNS_RUNNING_D3D_FULL_SCREEN: i32 = 3;
const QUNS_PRESENTATION_MODE: i32 = 4;

/// `GetLastInputInfo` + `SHQueryUserNotificationState`.
#[derive(Debug, Default, Clone, Copy)]
pub struct WindowsActivityProbe;

impl ActivityProbe for WindowsActivityProbe {
    fn sample(&mut self) -> ActivitySample {
        let mut lii = LASTINPUTINFO {
            cbSize: std::mem::size_of::<LASTINPUTINFO>() as u32,
            dwTime: 0,
        };
        // SAFETY: `lii` is a valid, initialised LASTINPUTINFO with cbSize set, as the API requires.
        let ok = unsafe { GetLastInputInfo(&mut lii) } != 0;
        let idle_s = if ok {
            // SAFETY: no arguments; returns milliseconds since boot (wraps every 49.7 days, as dwTime does).
            let now = unsafe { GetTickCount() };
            Reading::Known(f64::from(now.wrapping_sub(lii.dwTime)) / 1000.0)
        } else {
            Reading::Unknown("GetLastInputInfo failed")
        };
        let mut state = 0i32;
        // SAFETY: `state` is a valid out pointer for the enum (an int).
        let hr = unsafe { SHQueryUserNotificationState(&mut state) };
        let (fullscreen, locked) = if hr >= 0 {
            (
                Reading::Known(matches!(
                    state,
                    QUNS_BUSY | QUNS_RUNNING_D3D_FULL_SCREEN | QUNS_PRESENTATION_MODE
                )),
                Reading::Known(state == QUNS_NOT_PRESENT),
            )
        } else {
            let why = "SHQueryUserNotificationState failed";
            (Reading::Unknown(why), Reading::Unknown(why))
        };
        ActivitySample {
            idle_s,
            locked,
            fullscreen,
            inhibited: Reading::Unknown("Windows has no idle-inhibitor query"),
        }
    }
}

/// `GetSystemPowerStatus`.
#[derive(Debug, Default, Clone, Copy)]
pub struct WindowsPower;

impl PowerProbe for WindowsPower {
    fn sample(&mut self) -> PowerSample {
        let mut s = SYSTEM_POWER_STATUS {
            ACLineStatus: 255,
            BatteryFlag: 255,
            BatteryLifePercent: 255,
            SystemStatusFlag: 0,
            BatteryLifeTime: 0,
            BatteryFullLifeTime: 0,
        };
        // SAFETY: `s` is a valid out pointer to a SYSTEM_POWER_STATUS.
        if unsafe { GetSystemPowerStatus(&mut s) } == 0 {
            let why = "GetSystemPowerStatus failed";
            return PowerSample {
                on_ac: Reading::Unknown(why),
                battery_percent: Reading::Unknown(why),
            };
        }
        let on_ac = match s.ACLineStatus {
            0 => Reading::Known(false),
            1 => Reading::Known(true),
            _ => Reading::Unknown("AC line status unknown"),
        };
        // BatteryFlag 128 = no system battery; 255 = unknown.
        let battery_percent = if s.BatteryFlag == 128 || s.BatteryFlag == 255 || s.BatteryLifePercent > 100 {
            Reading::Unknown("no system battery")
        } else {
            Reading::Known(f64::from(s.BatteryLifePercent))
        };
        PowerSample {
            on_ac,
            battery_percent,
        }
    }
}
