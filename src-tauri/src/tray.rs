//! The tray: every action in its menu (Linux trays deliver no clicks), a status line with the reason,
//! and an icon per state (running, throttled, paused, error).

use std::sync::Mutex;
use std::time::Duration;

use apiary_node::{Mode, NodeStatus, PauseCause, RunState};
use tauri::image::Image;
use tauri::menu::{CheckMenuItem, Menu, MenuItem, PredefinedMenuItem, Submenu};
use tauri::tray::{TrayIcon, TrayIconBuilder};
use tauri::{AppHandle, Manager, Wry};

use crate::commands::AppState;
use crate::error::UiError;

const RUNNING: &[u8] = include_bytes!("../../assets/tray/running.png");
const THROTTLED: &[u8] = include_bytes!("../../assets/tray/throttled.png");
const PAUSED: &[u8] = include_bytes!("../../assets/tray/paused.png");
const ERROR: &[u8] = include_bytes!("../../assets/tray/error.png");

/// "Don't start now": the menu id (and the notification button's action id) that calls off a start
/// because you are away.
pub const CANCEL_START: &str = "cancel_start";

/// The modes, their menu ids and labels.
const MODES: [(Mode, &str, &str); 4] = [
    (Mode::Quiet, "mode_quiet", "Quiet"),
    (Mode::Balanced, "mode_balanced", "Balanced"),
    (Mode::Max, "mode_max", "Max"),
    (Mode::OnlyWhenAway, "mode_only_when_away", "Only when away"),
];

/// The icon's look.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Look {
    Running,
    Throttled,
    Paused,
    Error,
}

/// The tray and the menu items that change.
#[allow(missing_debug_implementations)] // Tauri's menu handles implement no Debug
pub struct Tray {
    icon: TrayIcon<Wry>,
    menu: Menu<Wry>,
    status: MenuItem<Wry>,
    /// "Don't start now": in the menu only while a start because you are away is due.
    cancel_start: MenuItem<Wry>,
    modes: Vec<(Mode, CheckMenuItem<Wry>)>,
    experiments: Submenu<Wry>,
    shown: Mutex<Shown>,
}

/// What the tray shows now (so that it changes only when something did).
#[derive(Default)]
struct Shown {
    line: String,
    look: Option<Look>,
    joined: Vec<String>,
    mode: Option<Mode>,
    cancel_start: bool,
}

/// Builds the tray with its menu; menu events run [`act`].
pub fn build(app: &AppHandle) -> tauri::Result<Tray> {
    let status = MenuItem::with_id(app, "status", "Starting…", false, None::<&str>)?;
    let cancel_start = MenuItem::with_id(app, CANCEL_START, "Don't start now", true, None::<&str>)?;
    let pause = Submenu::with_items(
        app,
        "Pause",
        true,
        &[
            &MenuItem::with_id(app, "pause_15m", "For 15 minutes", true, None::<&str>)?,
            &MenuItem::with_id(app, "pause_1h", "For 1 hour", true, None::<&str>)?,
            &MenuItem::with_id(app, "pause_3h", "For 3 hours", true, None::<&str>)?,
            &MenuItem::with_id(app, "pause_tomorrow", "Until tomorrow", true, None::<&str>)?,
            &MenuItem::with_id(app, "pause", "Until I resume", true, None::<&str>)?,
        ],
    )?;
    let finish = MenuItem::with_id(
        app,
        "finish",
        "Finish current work, then pause",
        true,
        None::<&str>,
    )?;
    let resume = MenuItem::with_id(app, "resume", "Resume", true, None::<&str>)?;
    let mut modes = Vec::new();
    for (mode, id, label) in MODES {
        modes.push((
            mode,
            CheckMenuItem::with_id(app, id, label, true, false, None::<&str>)?,
        ));
    }
    let mode_items: Vec<&dyn tauri::menu::IsMenuItem<Wry>> = modes
        .iter()
        .map(|(_, item)| item as &dyn tauri::menu::IsMenuItem<Wry>)
        .collect();
    let mode = Submenu::with_items(app, "Mode", true, &mode_items)?;
    let open = MenuItem::with_id(app, "open", "Open dashboard", true, None::<&str>)?;
    let experiments = Submenu::with_items(
        app,
        "Experiments",
        true,
        &[&MenuItem::with_id(app, "browse", "Browse…", true, None::<&str>)?],
    )?;
    let quit = MenuItem::with_id(app, "quit", "Quit", true, None::<&str>)?;
    let menu = Menu::with_items(
        app,
        &[
            &status,
            &PredefinedMenuItem::separator(app)?,
            &pause,
            &finish,
            &resume,
            &mode,
            &PredefinedMenuItem::separator(app)?,
            &open,
            &experiments,
            &PredefinedMenuItem::separator(app)?,
            &quit,
        ],
    )?;
    let icon = TrayIconBuilder::with_id("apiary")
        .icon(Image::from_bytes(PAUSED)?)
        .tooltip("Apiary")
        .menu(&menu)
        .show_menu_on_left_click(true)
        .on_menu_event(|app, event| {
            let app = app.clone();
            let id = event.id().as_ref().to_owned();
            tauri::async_runtime::spawn(async move {
                if let Err(e) = act(&app, &id).await {
                    tracing::warn!(action = %id, "tray action failed: {e}");
                }
            });
        })
        .build(app)?;
    Ok(Tray {
        icon,
        menu,
        status,
        cancel_start,
        modes,
        experiments,
        shown: Mutex::new(Shown::default()),
    })
}

impl Tray {
    /// Shows `status` (and `mode`): the status line, the icon, the checked mode, the joined experiments.
    pub fn show(&self, app: &AppHandle, status: &NodeStatus, mode: Mode, error: bool) {
        let mut shown = self
            .shown
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let line = status_line(status, unix_now());
        if line != shown.line {
            let _ = self.status.set_text(&line);
            let _ = self.icon.set_tooltip(Some(format!("Apiary · {line}")));
            shown.line = line;
        }
        let look = look(status.state, error);
        if shown.look != Some(look) {
            let bytes = match look {
                Look::Running => RUNNING,
                Look::Throttled => THROTTLED,
                Look::Paused => PAUSED,
                Look::Error => ERROR,
            };
            if let Ok(image) = Image::from_bytes(bytes) {
                let _ = self.icon.set_icon(Some(image));
            }
            shown.look = Some(look);
        }
        if shown.mode != Some(mode) {
            for (m, item) in &self.modes {
                let _ = item.set_checked(*m == mode);
            }
            shown.mode = Some(mode);
        }
        let due = starting_soon(status);
        if due != shown.cancel_start {
            let _ = if due {
                self.menu.insert(&self.cancel_start, 1)
            } else {
                self.menu.remove(&self.cancel_start)
            };
            shown.cancel_start = due;
        }
        let joined: Vec<String> = status.experiments.iter().map(|e| e.id.clone()).collect();
        if joined != shown.joined {
            self.show_joined(app, status);
            shown.joined = joined;
        }
    }

    fn show_joined(&self, app: &AppHandle, status: &NodeStatus) {
        if let Ok(items) = self.experiments.items() {
            for item in items {
                let _ = self.experiments.remove(&item);
            }
        }
        for e in &status.experiments {
            let label = format!("{} · {} experts", e.title, e.uids.len());
            if let Ok(item) =
                MenuItem::with_id(app, format!("experiment:{}", e.id), label, true, None::<&str>)
            {
                let _ = self.experiments.append(&item);
            }
        }
        if !status.experiments.is_empty()
            && let Ok(sep) = PredefinedMenuItem::separator(app)
        {
            let _ = self.experiments.append(&sep);
        }
        if let Ok(browse) = MenuItem::with_id(app, "browse", "Browse…", true, None::<&str>) {
            let _ = self.experiments.append(&browse);
        }
    }
}

/// The icon for a state.
pub fn look(state: RunState, error: bool) -> Look {
    if error {
        return Look::Error;
    }
    match state {
        RunState::Running => Look::Running,
        RunState::Throttled => Look::Throttled,
        RunState::Draining | RunState::Paused => Look::Paused,
    }
}

/// Whether a start because you are away is due (it can be called off: "Don't start now").
pub fn starting_soon(status: &NodeStatus) -> bool {
    status.directive.pause_cause() == Some(PauseCause::StartingSoon)
}

/// The tray's status line: "Hosting 3 experts · GPU 62 % · 71 °C", "Paused: you are using the PC ·
/// resumes in 12 min", "Starting in 10 s because you are away".
pub fn status_line(status: &NodeStatus, now: f64) -> String {
    if starting_soon(status) {
        return status.reason.clone();
    }
    let experts: usize = status.experiments.iter().map(|e| e.uids.len()).sum();
    let mut parts = Vec::new();
    match status.state {
        RunState::Running | RunState::Throttled => {
            parts.push(match experts {
                0 => "Running · no experiment joined".to_owned(),
                1 => "Hosting 1 expert".to_owned(),
                n => format!("Hosting {n} experts"),
            });
            if status.state == RunState::Throttled {
                parts.push("throttled".to_owned());
            }
            if let Some(sample) = &status.telemetry {
                if let Some(gpu) = sample.gpus.known().and_then(|g| g.first()) {
                    if let Some(u) = gpu.utilization.known() {
                        parts.push(format!("GPU {u:.0} %"));
                    }
                    if let Some(t) = gpu.temperature_c.known() {
                        parts.push(format!("{t:.0} °C"));
                    }
                } else if let Some(cpu) = sample.system.cpu_percent.known() {
                    parts.push(format!("CPU {cpu:.0} %"));
                }
            }
        }
        RunState::Draining => parts.push(format!("Finishing: {}", lower_first(&status.reason))),
        RunState::Paused => parts.push(format!("Paused: {}", lower_first(&status.reason))),
    }
    if let Some(until) = status.until
        && until > now
        && !status.state.is_working()
    {
        parts.push(format!("resumes in {}", in_words(until - now)));
    }
    parts.join(" · ")
}

fn lower_first(text: &str) -> String {
    let mut chars = text.chars();
    match chars.next() {
        Some(c) => c.to_lowercase().chain(chars).collect(),
        None => String::new(),
    }
}

/// "45 s", "12 min", "3 h 20 min", "2 days".
pub fn in_words(seconds: f64) -> String {
    let s = seconds.max(0.0).round() as u64;
    match s {
        0..60 => format!("{s} s"),
        60..3600 => format!("{} min", s.div_ceil(60)),
        3600..86_400 => match (s / 3600, (s % 3600) / 60) {
            (h, 0) => format!("{h} h"),
            (h, m) => format!("{h} h {m} min"),
        },
        _ => match s / 86_400 {
            1 => "1 day".to_owned(),
            d => format!("{d} days"),
        },
    }
}

/// Seconds from now until tomorrow 08:00 local time.
pub fn until_tomorrow_morning() -> f64 {
    use chrono::{Days, Local, NaiveTime};
    let now = Local::now();
    let morning = now.date_naive().checked_add_days(Days::new(1)).and_then(|d| {
        d.and_time(NaiveTime::from_hms_opt(8, 0, 0)?)
            .and_local_timezone(Local)
            .earliest()
    });
    match morning {
        Some(m) => (m - now).num_seconds().max(60) as f64,
        None => 12.0 * 3600.0,
    }
}

/// Runs a tray action by its menu id.
pub async fn act(app: &AppHandle, id: &str) -> Result<(), UiError> {
    let node = app.state::<AppState>().node.clone();
    let snooze = |d: f64| Duration::from_secs_f64(d);
    match id {
        "pause_15m" => node.snooze(snooze(15.0 * 60.0)).await?,
        "pause_1h" => node.snooze(snooze(3600.0)).await?,
        "pause_3h" => node.snooze(snooze(3.0 * 3600.0)).await?,
        "pause_tomorrow" => node.snooze(snooze(until_tomorrow_morning())).await?,
        "pause" => node.pause().await?,
        "finish" => node.finish().await?,
        "resume" => node.resume().await?,
        CANCEL_START => node.cancel_start().await?,
        "open" => crate::show_window(app, None),
        "browse" => crate::show_window(app, Some("#/experiments")),
        "quit" => crate::quit(app).await,
        other => {
            if let Some((mode, _, _)) = MODES.iter().find(|(_, mid, _)| *mid == other) {
                node.set_mode(*mode).await?;
            } else if let Some(experiment) = other.strip_prefix("experiment:") {
                crate::show_window(app, Some(&format!("#/experiments/{experiment}")));
            } else {
                return Err(UiError::bad_request(format!("no tray action `{other}`")));
            }
        }
    }
    Ok(())
}

fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_in_words() {
        assert_eq!(in_words(12.4), "12 s");
        assert_eq!(in_words(61.0), "2 min");
        assert_eq!(in_words(3600.0), "1 h");
        assert_eq!(in_words(3.0 * 3600.0 + 20.0 * 60.0), "3 h 20 min");
        assert_eq!(in_words(86_400.0), "1 day");
        assert_eq!(in_words(3.5 * 86_400.0), "3 days");
        assert_eq!(in_words(-5.0), "0 s");
    }

    #[test]
    fn tomorrow_morning_is_within_a_day_and_a_bit() {
        let s = until_tomorrow_morning();
        assert!((60.0..=(32.0 * 3600.0)).contains(&s), "{s}");
    }

    #[test]
    fn looks() {
        assert_eq!(look(RunState::Running, false), Look::Running);
        assert_eq!(look(RunState::Throttled, false), Look::Throttled);
        assert_eq!(look(RunState::Draining, false), Look::Paused);
        assert_eq!(look(RunState::Paused, false), Look::Paused);
        assert_eq!(look(RunState::Running, true), Look::Error);
    }
}

#[cfg(test)]
mod status_line_tests {
    use apiary_node::{Directive, HostedStatus, NodeStatus, PauseCause, Reachability, RunState};

    use super::status_line;

    fn status(state: RunState, directive: Directive, experts: usize) -> NodeStatus {
        NodeStatus {
            state,
            reason: directive.reason().to_owned(),
            until: directive.until(),
            directive,
            mode: apiary_node::Mode::Balanced,
            experiments: vec![HostedStatus {
                id: "local-demo".into(),
                title: "Local demo".into(),
                publisher: None,
                uids: (0..experts).map(|i| format!("ffn.0.{i}")).collect(),
                forward_samples: 0,
                backward_samples: 0,
                optimizer_steps: 0,
                queued_rows: 0,
                accepting: true,
                withdrawn: false,
                experts: Vec::new(),
            }],
            peer_id: "12D3KooW".into(),
            maddrs: Vec::new(),
            peers: 3,
            reachability: Reachability::Unknown,
            network: apiary_node::NetworkStatus::default(),
            telemetry: None,
        }
    }

    #[test]
    fn the_tray_says_what_and_why() {
        let running = Directive::Run {
            level: 1.0,
            reason: "You are away".into(),
            until: None,
        };
        assert_eq!(
            status_line(&status(RunState::Running, running.clone(), 3), 0.0),
            "Hosting 3 experts"
        );
        assert_eq!(
            status_line(&status(RunState::Running, running, 1), 0.0),
            "Hosting 1 expert"
        );
        let paused = Directive::Paused {
            cause: PauseCause::InUse,
            reason: "You are using the PC".into(),
            until: Some(1000.0 + 720.0),
        };
        assert_eq!(
            status_line(&status(RunState::Paused, paused, 3), 1000.0),
            "Paused: you are using the PC · resumes in 12 min"
        );
        let draining = Directive::Drain {
            reason: "Finishing, then pausing".into(),
            until: None,
        };
        assert_eq!(
            status_line(&status(RunState::Draining, draining, 3), 0.0),
            "Finishing: finishing, then pausing"
        );
        let soon = Directive::Paused {
            cause: PauseCause::StartingSoon,
            reason: "Starting in 10 s because you are away".into(),
            until: Some(1010.0),
        };
        let s = status(RunState::Paused, soon, 3);
        assert!(super::starting_soon(&s));
        assert_eq!(status_line(&s, 1000.0), "Starting in 10 s because you are away");
    }
}
