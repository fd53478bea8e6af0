//! The dashboard's commands: each a thin call into [`NodeHandle`] (the same operations as the node's
//! local HTTP API, with the same names the UI's IPC transport invokes).

use apiary_node::{
    Bucket, Card, DeviceChoice, DeviceSetting, Filter, JoinOptions, JoinPlan, LoggedEvent, MachineProfile,
    Mode, NodeHandle, NodeStatus, PolicyConfig, Preview, Row, Totals,
};
use tauri::State;
use tauri_plugin_autostart::ManagerExt;

use crate::error::UiError;

/// What the commands reach: the embedded node.
#[derive(Debug)]
pub struct AppState {
    pub node: NodeHandle,
    /// Whether the first-run wizard has been completed.
    pub setup: crate::setup::Setup,
    /// When the app started (for the cold-start figure the dashboard's first paint logs).
    pub started: std::time::Instant,
    /// Whether the dashboard has painted once.
    pub painted: std::sync::atomic::AtomicBool,
}

type Result<T> = std::result::Result<T, UiError>;

#[tauri::command]
pub fn status(state: State<'_, AppState>) -> NodeStatus {
    state.node.status().borrow().clone()
}

#[tauri::command]
pub async fn pause(state: State<'_, AppState>) -> Result<()> {
    Ok(state.node.pause().await?)
}

#[tauri::command]
pub async fn resume(state: State<'_, AppState>) -> Result<()> {
    Ok(state.node.resume().await?)
}

#[tauri::command]
pub async fn finish(state: State<'_, AppState>) -> Result<()> {
    Ok(state.node.finish().await?)
}

#[tauri::command]
pub async fn cancel_start(state: State<'_, AppState>) -> Result<()> {
    Ok(state.node.cancel_start().await?)
}

#[tauri::command]
pub async fn snooze(state: State<'_, AppState>, seconds: f64) -> Result<()> {
    let duration = apiary_node::check_snooze(seconds).map_err(UiError::bad_request)?;
    Ok(state.node.snooze(duration).await?)
}

#[tauri::command]
pub async fn set_mode(state: State<'_, AppState>, mode: Mode) -> Result<()> {
    Ok(state.node.set_mode(mode).await?)
}

#[tauri::command]
pub fn policy(state: State<'_, AppState>) -> PolicyConfig {
    state.node.config().policy
}

#[tauri::command]
pub async fn set_policy(state: State<'_, AppState>, policy: PolicyConfig) -> Result<PolicyConfig> {
    apiary_node::check_policy(&policy).map_err(UiError::bad_request)?;
    state.node.set_policy(policy).await?;
    Ok(state.node.config().policy)
}

/// Where experts joined from now on compute (`auto`, `cpu`, `cuda:N`), and whether this build can use
/// a GPU.
#[tauri::command]
pub fn device(state: State<'_, AppState>) -> DeviceSetting {
    state.node.device()
}

/// Changes where experts joined from now on compute; saved with the settings.
#[tauri::command]
pub async fn set_device(state: State<'_, AppState>, device: String) -> Result<DeviceSetting> {
    let choice = device
        .parse::<DeviceChoice>()
        .map_err(|e| UiError::bad_request(e.to_string()))?;
    Ok(state.node.set_device(choice).await?)
}

/// This computer as the catalog's fit sees it (the wizard's hardware check).
#[tauri::command]
pub async fn machine(state: State<'_, AppState>) -> Result<MachineProfile> {
    Ok(state.node.machine_profile().await)
}

#[tauri::command]
pub async fn experiments(state: State<'_, AppState>) -> Result<Vec<Card>> {
    Ok(state.node.experiments().await?)
}

#[tauri::command]
pub async fn show_experiment(
    state: State<'_, AppState>,
    id: String,
    publisher: Option<String>,
) -> Result<Preview> {
    check_id(&id)?;
    Ok(state.node.show(&id, publisher.as_deref()).await?)
}

#[tauri::command]
pub async fn join(
    state: State<'_, AppState>,
    id: String,
    max_experts: Option<usize>,
    publisher: Option<String>,
) -> Result<JoinPlan> {
    check_id(&id)?;
    Ok(state
        .node
        .join(
            &id,
            JoinOptions {
                max_experts,
                publisher,
            },
        )
        .await?)
}

#[tauri::command]
pub async fn leave(state: State<'_, AppState>, id: String) -> Result<()> {
    check_id(&id)?;
    Ok(state.node.leave(&id).await?)
}

#[tauri::command]
pub async fn contributions(state: State<'_, AppState>, filter: Option<Filter>) -> Result<Totals> {
    Ok(state.node.contributions(filter.unwrap_or_default()).await?)
}

#[tauri::command]
pub async fn history(
    state: State<'_, AppState>,
    filter: Option<Filter>,
    bucket: Option<String>,
) -> Result<Vec<Row>> {
    Ok(state
        .node
        .history(filter.unwrap_or_default(), bucket_of(bucket.as_deref())?)
        .await?)
}

#[tauri::command]
pub async fn export_csv(
    state: State<'_, AppState>,
    filter: Option<Filter>,
    bucket: Option<String>,
) -> Result<String> {
    Ok(state
        .node
        .export_csv(filter.unwrap_or_default(), bucket_of(bucket.as_deref())?)
        .await?)
}

#[tauri::command]
pub fn log(state: State<'_, AppState>, limit: Option<usize>) -> Vec<LoggedEvent> {
    state.node.recent_events(limit)
}

/// Whether the app starts with the user's session.
#[tauri::command]
pub fn autostart(app: tauri::AppHandle) -> Result<bool> {
    app.autolaunch()
        .is_enabled()
        .map_err(|e| UiError::internal(e.to_string()))
}

/// Starts the app with the user's session (or not); opt-in from the wizard or the settings.
#[tauri::command]
pub fn set_autostart(app: tauri::AppHandle, enabled: bool) -> Result<bool> {
    let launcher = app.autolaunch();
    let done = if enabled {
        launcher.enable()
    } else {
        launcher.disable()
    };
    done.map_err(|e| UiError::internal(e.to_string()))?;
    launcher
        .is_enabled()
        .map_err(|e| UiError::internal(e.to_string()))
}

/// Whether the first-run wizard still has to run (the node then stays paused until it ends).
#[tauri::command]
pub fn first_run(state: State<'_, AppState>) -> bool {
    !state.setup.is_done()
}

/// The wizard's last step: remembers it is done, and starts work when `start` (the user chose
/// "Start contributing"; otherwise the node stays paused until Resume).
#[tauri::command]
pub async fn complete_setup(state: State<'_, AppState>, start: bool) -> Result<()> {
    state
        .setup
        .complete()
        .map_err(|e| UiError::internal(format!("cannot record the finished setup: {e}")))?;
    tracing::info!(start, "first-run wizard completed");
    if start {
        state.node.resume().await?;
    }
    Ok(())
}

/// The dashboard painted its first screen with the node's status: logged once, with the time since
/// the app started (`cargo xtask bench desktop` reads it as the cold start).
#[tauri::command]
pub fn painted(state: State<'_, AppState>) {
    if !state.painted.swap(true, std::sync::atomic::Ordering::Relaxed) {
        let ms = state.started.elapsed().as_secs_f64() * 1e3;
        tracing::info!("dashboard painted {ms:.0} ms after start");
    }
}

/// Where the app keeps its settings, data and logs (shown in Settings).
#[derive(Debug, Clone, serde::Serialize)]
pub struct AppPaths {
    pub config_file: String,
    pub data_dir: String,
    pub log_dir: Option<String>,
}

#[tauri::command]
pub fn paths(app: tauri::AppHandle, state: State<'_, AppState>) -> Result<AppPaths> {
    use tauri::Manager;
    let config_file =
        apiary_node::NodeConfig::default_path().map_err(|e| UiError::internal(e.to_string()))?;
    Ok(AppPaths {
        config_file: config_file.display().to_string(),
        data_dir: state.node.config().data_dir.display().to_string(),
        log_dir: app.path().app_log_dir().ok().map(|d| d.display().to_string()),
    })
}

/// Asks the release feed whether a newer, signed release exists.
#[tauri::command]
pub async fn check_update(app: tauri::AppHandle) -> Result<Option<crate::update::UpdateInfo>> {
    crate::update::check(&app).await
}

/// Installs the newer release (its signature checked) and restarts; `false`: nothing newer.
#[tauri::command]
pub async fn install_update(app: tauri::AppHandle) -> Result<bool> {
    crate::update::install(&app).await
}

/// Runs one of the tray menu's actions by its id (`pause_1h`, `resume`, `mode_quiet`, …): the menu's
/// behaviour, reachable from the window and from tests (Linux trays cannot be clicked by a test).
#[tauri::command]
pub async fn tray_action(app: tauri::AppHandle, id: String) -> Result<()> {
    crate::tray::act(&app, &id).await
}

fn check_id(id: &str) -> Result<()> {
    apiary_node::check_experiment_id(id).map_err(UiError::bad_request)
}

fn bucket_of(text: Option<&str>) -> Result<Bucket> {
    match text.unwrap_or("hour") {
        "hour" => Ok(Bucket::Hour),
        "day" => Ok(Bucket::Day),
        other => Err(UiError::bad_request(format!(
            "`bucket` is `hour` or `day`, not `{other}`"
        ))),
    }
}
