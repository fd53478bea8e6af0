//! Mains and battery.
//!
//! - Linux: `/sys/class/power_supply/*` ([`SysfsPower`]). `type` = `Mains` or `USB` with `online` = 1
//!   means on mains; `type` = `Battery` gives `capacity` (percent) and `status` (`Discharging`,
//!   `Charging`, `Full`, `Not charging`). Batteries with `scope` = `Device` (mice, headsets) are
//!   ignored. Without a mains entry, `status` = `Discharging` means on battery. No entries at all
//!   (a desktop, a container) gives `Unknown`.
//! - Windows: `GetSystemPowerStatus` (see [`super::windows`]).
//! - Other OSes: `Unknown` (macOS would use IOKit's `IOPSCopyPowerSourcesInfo`; a maintainer adds
//!   it with the CoreFoundation bindings).

use std::path::{Path, PathBuf};

use super::{PowerProbe, PowerSample, Reading};

/// Reads `/sys/class/power_supply` (or a copy of it, for tests).
#[derive(Debug, Clone)]
pub struct SysfsPower {
    root: PathBuf,
}

impl Default for SysfsPower {
    fn default() -> Self {
        SysfsPower {
            root: PathBuf::from("/sys/class/power_supply"),
        }
    }
}

impl SysfsPower {
    /// Reads supplies under `root` instead of `/sys/class/power_supply`.
    pub fn with_root(root: impl Into<PathBuf>) -> Self {
        SysfsPower { root: root.into() }
    }
}

fn read_trimmed(dir: &Path, name: &str) -> Option<String> {
    std::fs::read_to_string(dir.join(name))
        .ok()
        .map(|s| s.trim().to_owned())
}

impl PowerProbe for SysfsPower {
    fn sample(&mut self) -> PowerSample {
        let Ok(entries) = std::fs::read_dir(&self.root) else {
            let why = "no power supply information (/sys/class/power_supply missing)";
            return PowerSample {
                on_ac: Reading::Unknown(why),
                battery_percent: Reading::Unknown(why),
            };
        };
        let mut mains_seen = false;
        let mut mains_online = false;
        let mut capacities = Vec::new();
        let mut discharging = false;
        let mut charging_or_full = false;
        for entry in entries.flatten() {
            let dir = entry.path();
            let kind = read_trimmed(&dir, "type").unwrap_or_default();
            match kind.as_str() {
                "Mains" | "USB" | "USB_C" | "USB_PD" => {
                    if let Some(online) = read_trimmed(&dir, "online") {
                        mains_seen = true;
                        mains_online |= online == "1";
                    }
                }
                "Battery" => {
                    if read_trimmed(&dir, "scope").as_deref() == Some("Device") {
                        continue;
                    }
                    if let Some(c) = read_trimmed(&dir, "capacity").and_then(|c| c.parse::<f64>().ok()) {
                        capacities.push(c.clamp(0.0, 100.0));
                    }
                    match read_trimmed(&dir, "status").as_deref() {
                        Some("Discharging") => discharging = true,
                        Some("Charging" | "Full" | "Not charging") => charging_or_full = true,
                        _ => {}
                    }
                }
                _ => {}
            }
        }
        let battery_percent = if capacities.is_empty() {
            Reading::Unknown("no system battery")
        } else {
            Reading::Known(capacities.iter().sum::<f64>() / capacities.len() as f64)
        };
        let on_ac = if mains_seen {
            Reading::Known(mains_online)
        } else if discharging {
            Reading::Known(false)
        } else if charging_or_full {
            Reading::Known(true)
        } else {
            Reading::Unknown("no charger or battery reported (a desktop?)")
        };
        PowerSample {
            on_ac,
            battery_percent,
        }
    }
}

/// The power probe of this platform.
pub fn platform_power() -> Box<dyn PowerProbe> {
    #[cfg(target_os = "linux")]
    {
        Box::new(SysfsPower::default())
    }
    #[cfg(windows)]
    {
        Box::new(super::windows::WindowsPower)
    }
    #[cfg(not(any(target_os = "linux", windows)))]
    {
        let why = "power state not read on this OS yet";
        Box::new(super::FixedPower(PowerSample {
            on_ac: Reading::Unknown(why),
            battery_percent: Reading::Unknown(why),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn supply(root: &Path, name: &str, files: &[(&str, &str)]) {
        let dir = root.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        for (f, v) in files {
            std::fs::write(dir.join(f), format!("{v}\n")).unwrap();
        }
    }

    #[test]
    fn laptop_on_battery_then_ac() {
        let tmp = tempfile::tempdir().unwrap();
        supply(tmp.path(), "AC", &[("type", "Mains"), ("online", "0")]);
        supply(
            tmp.path(),
            "BAT0",
            &[("type", "Battery"), ("capacity", "35"), ("status", "Discharging")],
        );
        supply(
            tmp.path(),
            "hidpp_battery_0",
            &[
                ("type", "Battery"),
                ("scope", "Device"),
                ("capacity", "5"),
                ("status", "Discharging"),
            ],
        );
        let mut p = SysfsPower::with_root(tmp.path());
        let s = p.sample();
        assert_eq!(s.on_ac, Reading::Known(false));
        assert_eq!(
            s.battery_percent,
            Reading::Known(35.0),
            "the mouse battery is ignored"
        );
        supply(tmp.path(), "AC", &[("online", "1")]);
        supply(tmp.path(), "BAT0", &[("status", "Charging")]);
        assert_eq!(p.sample().on_ac, Reading::Known(true));
    }

    #[test]
    fn battery_status_without_mains_entry() {
        let tmp = tempfile::tempdir().unwrap();
        supply(
            tmp.path(),
            "BAT1",
            &[("type", "Battery"), ("capacity", "80"), ("status", "Full")],
        );
        let s = SysfsPower::with_root(tmp.path()).sample();
        assert_eq!(s.on_ac, Reading::Known(true));
        assert_eq!(s.battery_percent, Reading::Known(80.0));
    }

    #[test]
    fn desktop_without_supplies_is_unknown() {
        let tmp = tempfile::tempdir().unwrap();
        let s = SysfsPower::with_root(tmp.path()).sample();
        assert!(!s.on_ac.is_known());
        assert!(!s.battery_percent.is_known());
        let s = SysfsPower::with_root(tmp.path().join("missing")).sample();
        assert!(s.on_ac.reason().unwrap().contains("power_supply"));
    }
}
