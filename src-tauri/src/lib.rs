//! Apiary's desktop app (Tauri 2): the volunteer node (`apiary-node`, its only engine dependency) runs
//! in this process; the tray carries every action; the dashboard (`ui/`) talks to the node through the
//! commands in [`commands`] and the events in [`events`]. The node's local HTTP API is served too, so
//! `apiary node status|pause|…` and a browser reach the same node.
//!
//! Closing the window keeps the app in the tray (the window and its WebKit processes are gone until
//! the dashboard is opened again); Quit leaves the experiments cleanly (in-flight work
//! drained, declarations withdrawn, checkpoints saved) before exiting. A second launch shows the first
//! instance's window. `--minimized` (the autostart entry) starts without showing the window.
//! SIGTERM and SIGINT (the session ending, `kill`, a package upgrade) quit the same clean way.

pub mod commands;
pub mod error;
pub mod events;
pub mod setup;
pub mod tray;
pub mod update;

use apiary_node::{ApiConfig, Node, NodeConfig, Probes};
use tauri::{AppHandle, Manager, RunEvent};

use crate::commands::AppState;

/// The dashboard window's label.
pub const MAIN_WINDOW: &str = "main";

/// Starts the app; returns when it quits.
pub fn run() {
    let started = std::time::Instant::now();
    let built = tauri::Builder::default()
        // first: a second launch hands over to this one and exits
        .plugin(tauri_plugin_single_instance::init(|app, _args, _cwd| {
            tracing::info!("launched again: showing this instance's window");
            show_window(app, None);
        }))
        .plugin(tauri_plugin_autostart::init(
            tauri_plugin_autostart::MacosLauncher::LaunchAgent,
            Some(vec!["--minimized"]),
        ))
        .plugin(tauri_plugin_notification::init())
        .plugin(tauri_plugin_updater::Builder::new().build())
        // the node's `tracing` events reach it as `log` records (tracing's `log` feature, no tracing
        // subscriber in the app): stdout and a file in the platform's log folder
        .plugin(
            tauri_plugin_log::Builder::new()
                .level(log_level())
                // their span records are noise at info
                .level_for("zbus", log::LevelFilter::Warn)
                .level_for("tracing::span", log::LevelFilter::Warn)
                .build(),
        )
        .setup(move |app| {
            let handle = app.handle().clone();
            let node = tauri::async_runtime::block_on(start_node())?;
            let setup = setup::Setup::new(&node.config().data_dir);
            let setup_done = setup.is_done();
            app.manage(AppState {
                node: node.clone(),
                setup,
                started,
                painted: Default::default(),
            });
            let tray = tray::build(&handle)?;
            app.manage(tray);
            events::spawn(handle.clone(), node.clone());
            quit_on_signals(handle.clone());
            tauri::async_runtime::spawn(async move {
                match apiary_node::api::serve(node, api_config()).await {
                    Ok(api) => {
                        tracing::info!(addr = %api.addr(), "local API for `apiary node …` and browsers");
                        // served for the app's lifetime
                        std::mem::forget(api);
                    }
                    Err(e) => tracing::warn!("no local API (another node may be running): {e}"),
                }
            });
            // the dashboard's window exists only while it is shown (a hidden webview keeps WebKit's
            // processes, hundreds of MB and timers, alive); `--minimized` (the autostart entry) starts
            // without it, except on the first run, which shows its wizard
            if !(setup_done && std::env::args().any(|a| a == "--minimized")) {
                show_window(&handle, None);
            }
            Ok(())
        })
        .invoke_handler(tauri::generate_handler![
            commands::status,
            commands::pause,
            commands::resume,
            commands::finish,
            commands::cancel_start,
            commands::snooze,
            commands::set_mode,
            commands::policy,
            commands::set_policy,
            commands::machine,
            commands::device,
            commands::set_device,
            commands::experiments,
            commands::show_experiment,
            commands::join,
            commands::leave,
            commands::contributions,
            commands::history,
            commands::export_csv,
            commands::log,
            commands::autostart,
            commands::set_autostart,
            commands::tray_action,
            commands::first_run,
            commands::complete_setup,
            commands::painted,
            commands::check_update,
            commands::paths,
            commands::install_update,
        ])
        .build(tauri::generate_context!());
    match built {
        // closing the dashboard's window keeps the app (and the node) in the tray: only Quit (an
        // explicit exit code) ends it
        Ok(app) => app.run(|_, event| {
            if let RunEvent::ExitRequested { code: None, api, .. } = event {
                api.prevent_exit();
            }
        }),
        Err(e) => {
            eprintln!("apiary-desktop: cannot start: {e}");
            std::process::exit(1);
        }
    }
}

/// The local API on its usual address (`127.0.0.1:7787`), or `APIARY_API_BIND`'s (`127.0.0.1:0`: any
/// free port; the `api-url` file in the data folder names it, for `apiary node …` and tests).
fn api_config() -> ApiConfig {
    let mut config = ApiConfig::default();
    if let Ok(text) = std::env::var("APIARY_API_BIND") {
        match text.parse() {
            Ok(bind) => config.bind = bind,
            Err(e) => tracing::warn!(
                "APIARY_API_BIND `{text}` is not an address ({e}): using {}",
                config.bind
            ),
        }
    }
    config
}

/// `RUST_LOG=debug` (or `trace`, `warn`, …) changes it; default info.
fn log_level() -> log::LevelFilter {
    std::env::var("RUST_LOG")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(log::LevelFilter::Info)
}

/// The node with the user's settings (`<config dir>/apiary/node.toml`) and this computer's probes.
/// On the first run (no saved pause/resume state yet) it starts paused (`start_paused`, the default):
/// nothing is computed before the user has seen the wizard.
async fn start_node() -> Result<apiary_node::NodeHandle, Box<dyn std::error::Error>> {
    let path = NodeConfig::default_path()?;
    Ok(Node::spawn_from(&path, Probes::platform()).await?)
}

/// Shows, unminimizes and focuses the dashboard, at `route` (`#/experiments`) when given; creates
/// its window (from `app.windows[0]` in `tauri.conf.json`) when it is closed.
pub fn show_window(app: &AppHandle, route: Option<&str>) {
    if let Some(window) = app.get_webview_window(MAIN_WINDOW) {
        if let Some(route) = route {
            let _ = window.eval(format!("window.location.hash = {}", serde_json::json!(route)));
        }
        let _ = window.show();
        let _ = window.unminimize();
        let _ = window.set_focus();
        return;
    }
    let Some(config) = app
        .config()
        .app
        .windows
        .iter()
        .find(|w| w.label == MAIN_WINDOW)
        .cloned()
    else {
        tracing::warn!("no `{MAIN_WINDOW}` window in the configuration");
        return;
    };
    let mut builder = match tauri::WebviewWindowBuilder::from_config(app, &config) {
        Ok(b) => b,
        Err(e) => {
            tracing::warn!("cannot open the dashboard: {e}");
            return;
        }
    };
    if let Some(route) = route {
        // before the dashboard's own scripts: it starts on that page
        builder =
            builder.initialization_script(format!("window.location.hash = {};", serde_json::json!(route)));
    }
    match builder.build() {
        Ok(window) => {
            let _ = window.set_focus();
        }
        Err(e) => tracing::warn!("cannot open the dashboard: {e}"),
    }
}

/// Quits cleanly ([`quit`]) on SIGTERM or SIGINT.
fn quit_on_signals(app: AppHandle) {
    #[cfg(unix)]
    tauri::async_runtime::spawn(async move {
        use tokio::signal::unix::{SignalKind, signal};
        let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt()))
        else {
            tracing::warn!("cannot watch SIGTERM/SIGINT: a signal ends the app without leaving cleanly");
            return;
        };
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: leaving the experiments, then quitting"),
            _ = int.recv() => tracing::info!("SIGINT: leaving the experiments, then quitting"),
        }
        quit(&app).await;
    });
    #[cfg(not(unix))]
    let _ = app;
}

/// Leaves the experiments cleanly, then exits.
pub async fn quit(app: &AppHandle) {
    if let Some(state) = app.try_state::<AppState>()
        && let Err(e) = state.node.shutdown().await
    {
        tracing::warn!("stopping the node: {e}");
    }
    app.exit(0);
}
