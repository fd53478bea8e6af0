//! The node's local HTTP/WebSocket API: what the dashboard (`ui/`) talks to in a normal browser when
//! the node runs headless, and what scripts can drive.
//!
//! [`serve`] binds [`ApiConfig::bind`] (by default `127.0.0.1:7787`: **loopback only**, so only
//! programs on this computer can reach it; binding another address exposes the node's controls to
//! the network, protected by the token alone) and serves, on the tokio runtime:
//!
//! | method | path | in | out |
//! |---|---|---|---|
//! | GET | `/api/status` | | [`NodeStatus`] |
//! | GET | `/api/events` | WebSocket | the status, then `{"type":"status", ...}` / `{"type":"event", ...}` / `{"type":"lagged","missed":n}` text frames |
//! | POST | `/api/pause`, `/api/resume`, `/api/finish`, `/api/cancel-start` | | `{"ok":true}` |
//! | POST | `/api/snooze` | `{"seconds": s}` | `{"ok":true}` |
//! | PUT | `/api/mode` | `{"mode": "quiet" \| "balanced" \| "max" \| "only_when_away"}` | `{"ok":true}` |
//! | GET / PUT | `/api/policy` | [`PolicyConfig`] (missing fields: defaults) | the policy in effect |
//! | GET / PUT | `/api/device` | `{"device": "auto" \| "cpu" \| "cuda:N"}` | [`DeviceSetting`](crate::DeviceSetting): where experts joined from now on compute |
//! | GET | `/api/experiments` | | [`Card`](apiary_catalog::Card)s |
//! | GET | `/api/experiments/{id}?publisher=` | | [`Preview`](crate::Preview) |
//! | POST | `/api/experiments/{id}/join` | `{"max_experts"?, "publisher"?}` (or no body) | [`JoinPlan`](apiary_catalog::JoinPlan) |
//! | POST | `/api/experiments/{id}/leave` | | `{"ok":true}` |
//! | GET | `/api/contributions?experiment=&uid=&from=&to=` | | [`Totals`](apiary_ledger::Totals) |
//! | GET | `/api/history?bucket=hour\|day&experiment=&uid=&from=&to=` | | [`Row`](apiary_ledger::Row)s |
//! | GET | `/api/export.csv?bucket=&experiment=&uid=&from=&to=` | | `text/csv` |
//! | GET | `/api/log?limit=` | | [`LoggedEvent`](crate::LoggedEvent)s, oldest first (the last 500 at most) |
//! | GET | `/api/machine` | | [`MachineProfile`](crate::MachineProfile): cores, RAM, free disk, GPUs |
//! | GET | `/api/openapi.json` | | this table as an OpenAPI 3.1 document (`crates/node/openapi.json`) |
//!
//! Everything else is the dashboard: the files of [`ApiConfig::ui_dir`] (`index.html` for a folder),
//! or, without one, a short text page saying the dashboard is not bundled.
//!
//! # Security
//!
//! - Every `/api/*` request carries the token, as `Authorization: Bearer <token>` or as a
//!   `?token=<token>` query parameter (for WebSocket and EventSource, which cannot set headers).
//!   It is compared in constant time; a missing or wrong token is `401`. The token is
//!   [`ApiConfig::token`], or the one kept in `<data_dir>/api-token` (created with 32 random bytes in
//!   hex, mode 0600 on Unix, and reused at every start).
//! - While bound to a loopback address, a request whose `Host` is not `localhost` or a loopback IP
//!   is refused with `403` (a DNS-rebinding page cannot reach the API under its own name); a request
//!   with an `Origin` that is not the same origin as its `Host` is refused with `403` as well.
//! - No CORS headers: only pages served by this API (same origin) can call it from a browser.
//! - Request bodies are limited to [`BODY_LIMIT`] (64 KiB): larger is `413`.
//!
//! Errors are JSON `{"code": "...", "message": "..."}`: `400` bad input, `401` unauthorized, `403`
//! forbidden, `404` unknown experiment or route, `409` already joined / not joined / several
//! publishers, `413` body too large, `422` the experiment cannot be joined (planning, or a `device`
//! setting this build or computer cannot compute on), `503` the node has stopped, `500` anything else.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use apiary_governor::{Mode, PolicyConfig};
use apiary_ledger::{Bucket, Filter};
use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade, close_code};
use axum::extract::{DefaultBodyLimit, Path as UrlPath, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, watch};

use crate::{JoinOptions, NodeError, NodeEvent, NodeHandle, NodeStatus};

/// The default address: loopback only, port 7787.
pub const DEFAULT_BIND: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 7787);
/// The file in the data folder that keeps the API token.
pub const TOKEN_FILE: &str = "api-token";
/// The file in the data folder that names the running API's URL (`http://127.0.0.1:7787/`), for
/// `apiary node status` and other local clients; removed when the API stops.
pub const URL_FILE: &str = "api-url";
/// The largest request body accepted (bytes); larger is `413`.
pub const BODY_LIMIT: usize = 64 * 1024;
/// How long a WebSocket client may take to accept one frame before it is disconnected.
const SEND_TIMEOUT: Duration = Duration::from_secs(10);
/// How long [`ApiServer::shutdown`] waits for requests in flight.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// How to serve the local API.
#[derive(Clone, PartialEq, Eq)]
pub struct ApiConfig {
    /// The address to listen on. Default [`DEFAULT_BIND`], `127.0.0.1:7787`: loopback only, so
    /// only programs on this computer reach it. Another address exposes the node's controls to the
    /// network, guarded by the token alone (plain HTTP: anyone on the path can read the token).
    /// Port 0 picks a free port ([`ApiServer::addr`] says which).
    pub bind: SocketAddr,
    /// The token requests must carry. Default `None`: the one kept in `<data_dir>/api-token`,
    /// created (32 random bytes, hex, mode 0600 on Unix) when missing.
    pub token: Option<String>,
    /// A folder of static files served at `/` (the built dashboard). Default `None`: `/` says the
    /// dashboard is not bundled.
    pub ui_dir: Option<PathBuf>,
}

impl Default for ApiConfig {
    fn default() -> Self {
        ApiConfig {
            bind: DEFAULT_BIND,
            token: None,
            ui_dir: None,
        }
    }
}

impl std::fmt::Debug for ApiConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiConfig")
            .field("bind", &self.bind)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("ui_dir", &self.ui_dir)
            .finish()
    }
}

/// The API token kept in `<data_dir>/api-token`: read when the file exists (not empty), otherwise
/// created from 32 random bytes (64 hex digits), mode 0600 on Unix. An existing file readable by
/// others is narrowed to 0600.
pub fn load_or_create_token(data_dir: &Path) -> Result<String, NodeError> {
    let path = data_dir.join(TOKEN_FILE);
    let io = |what: &'static str| {
        let path = path.clone();
        move |source| NodeError::Io { what, path, source }
    };
    match std::fs::read_to_string(&path) {
        Ok(text) if !text.trim().is_empty() => {
            restrict_permissions(&path).map_err(io("restrict the permissions of"))?;
            return Ok(text.trim().to_owned());
        }
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io("read")(e)),
    }
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).map_err(|e| {
        io("create")(std::io::Error::other(format!(
            "the OS random number generator failed: {e}"
        )))
    })?;
    let token: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    std::fs::create_dir_all(data_dir).map_err(|source| NodeError::Io {
        what: "create",
        path: data_dir.to_owned(),
        source,
    })?;
    write_private(&path, token.as_bytes()).map_err(io("write"))?;
    Ok(token)
}

/// Writes `bytes` to a new file at `path` (replacing an empty one) readable by the owner only.
fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(path)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    drop(file);
    // `mode` applies to a created file only: narrow a file that existed (empty) before
    restrict_permissions(path)
}

#[cfg(unix)]
fn restrict_permissions(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(path)?.permissions().mode();
    if mode & 0o077 != 0 {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    }
    Ok(())
}

#[cfg(not(unix))]
fn restrict_permissions(_path: &Path) -> std::io::Result<()> {
    Ok(())
}

/// A running API server (see [`serve`]). Dropping it stops the server too, without waiting.
#[derive(Debug)]
pub struct ApiServer {
    addr: SocketAddr,
    token: String,
    /// The `api-url` file written at start (removed at shutdown when it still names this server).
    url_file: Option<(PathBuf, String)>,
    stop: watch::Sender<bool>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl ApiServer {
    /// The address it listens on (the real port when bound to port 0).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The token requests must carry.
    pub fn token(&self) -> &str {
        &self.token
    }

    /// Stops accepting connections, closes the WebSocket streams, and waits (at most 5 s) for the
    /// requests in flight. The node keeps running.
    pub async fn shutdown(mut self) {
        let _ = self.stop.send(true);
        self.remove_url_file();
        if let Some(mut task) = self.task.take()
            && tokio::time::timeout(SHUTDOWN_GRACE, &mut task).await.is_err()
        {
            task.abort();
        }
    }
}

impl ApiServer {
    fn remove_url_file(&mut self) {
        if let Some((path, url)) = self.url_file.take()
            && std::fs::read_to_string(&path).is_ok_and(|now| now.trim() == url)
        {
            let _ = std::fs::remove_file(&path);
        }
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        self.remove_url_file();
    }
}

/// The URL of the API the node with data folder `data_dir` serves, from its `api-url` file (`None`
/// when no API runs there, or the file is not a loopback `http://` URL).
pub fn running_url(data_dir: &Path) -> Option<String> {
    let text = std::fs::read_to_string(data_dir.join(URL_FILE)).ok()?;
    let url = text.trim();
    let rest = url.strip_prefix("http://")?;
    let host = rest.trim_end_matches('/');
    let addr: SocketAddr = host.parse().ok()?;
    (url.len() < 64 && addr.ip().is_loopback()).then(|| url.to_owned())
}

/// Serves the local API for `handle` (see the [module docs](self)): binds [`ApiConfig::bind`],
/// reads or creates the token, and spawns the server on the current tokio runtime.
pub async fn serve(handle: NodeHandle, config: ApiConfig) -> Result<ApiServer, NodeError> {
    let token = match config.token {
        Some(t) if !t.is_empty() => t,
        Some(_) => {
            return Err(NodeError::Io {
                what: "use",
                path: PathBuf::from("the API token"),
                source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "the token is empty"),
            });
        }
        None => load_or_create_token(handle.data_dir())?,
    };
    let bind_err = |source| NodeError::Io {
        what: "listen on",
        path: PathBuf::from(config.bind.to_string()),
        source,
    };
    let listener = tokio::net::TcpListener::bind(config.bind)
        .await
        .map_err(bind_err)?;
    let addr = listener.local_addr().map_err(bind_err)?;
    let (stop, stopped) = watch::channel(false);
    let ui_dir = config.ui_dir.map(|d| std::fs::canonicalize(&d).unwrap_or(d));
    let data_dir = handle.data_dir().to_owned();
    let state = Arc::new(AppState {
        node: handle,
        token: token.clone(),
        loopback: addr.ip().is_loopback(),
        ui_dir,
        stopped: stopped.clone(),
    });
    let app = router(state);
    let mut signal = stopped;
    let server = axum::serve(listener, app).with_graceful_shutdown(async move {
        let _ = signal.wait_for(|s| *s).await;
    });
    let task = tokio::spawn(async move {
        if let Err(e) = server.await {
            tracing::warn!("the local API server stopped: {e}");
        }
    });
    tracing::info!(%addr, "local API listening");
    let url = format!("http://{addr}/");
    let url_path = data_dir.join(URL_FILE);
    let url_file = match crate::config::write_atomic(&url_path, url.as_bytes()) {
        Ok(()) => Some((url_path, url)),
        Err(e) => {
            tracing::warn!(path = %url_path.display(), "could not write the API's URL file: {e}");
            None
        }
    };
    Ok(ApiServer {
        addr,
        token,
        url_file,
        stop,
        task: Some(task),
    })
}

#[derive(Debug)]
struct AppState {
    node: NodeHandle,
    token: String,
    loopback: bool,
    ui_dir: Option<PathBuf>,
    stopped: watch::Receiver<bool>,
}

type Shared = State<Arc<AppState>>;

fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/api/status", get(status))
        .route("/api/events", get(events))
        .route("/api/pause", post(pause))
        .route("/api/resume", post(resume))
        .route("/api/finish", post(finish))
        .route("/api/cancel-start", post(cancel_start))
        .route("/api/snooze", post(snooze))
        .route("/api/mode", axum::routing::put(set_mode))
        .route("/api/policy", get(policy).put(set_policy))
        .route("/api/device", get(device).put(set_device))
        .route("/api/experiments", get(experiments))
        .route("/api/experiments/{id}", get(show))
        .route("/api/experiments/{id}/join", post(join))
        .route("/api/experiments/{id}/leave", post(leave))
        .route("/api/contributions", get(contributions))
        .route("/api/history", get(history))
        .route("/api/export.csv", get(export_csv))
        .route("/api/log", get(log))
        .route("/api/machine", get(machine))
        .route("/api/openapi.json", get(openapi))
        .fallback(static_files)
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .layer(middleware::from_fn_with_state(state.clone(), guard))
        .with_state(state)
}

// ---- errors ---------------------------------------------------------------------------------

/// An error response: `{"code", "message"}` with a status.
#[derive(Debug)]
struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    code: &'a str,
    message: &'a str,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
        }
    }

    fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            code: self.code,
            message: &self.message,
        };
        json_response(self.status, &body)
    }
}

impl From<NodeError> for ApiError {
    fn from(e: NodeError) -> Self {
        let code = e.code();
        let status = match code {
            "not_found" => StatusCode::NOT_FOUND,
            "already_joined" | "not_joined" | "ambiguous_publisher" => StatusCode::CONFLICT,
            "bad_device" => StatusCode::BAD_REQUEST,
            "cannot_plan" | "bad_manifest" | "device_unavailable" => StatusCode::UNPROCESSABLE_ENTITY,
            "stopped" | "busy" => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError::new(status, code, e.to_string())
    }
}

impl From<BytesRejection> for ApiError {
    fn from(r: BytesRejection) -> Self {
        if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
            too_large()
        } else {
            ApiError::new(r.status(), "bad_request", r.body_text())
        }
    }
}

impl From<QueryRejection> for ApiError {
    fn from(r: QueryRejection) -> Self {
        ApiError::bad_request(r.body_text())
    }
}

fn too_large() -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "too_large",
        format!("request bodies are limited to {BODY_LIMIT} bytes"),
    )
}

fn json_response(status: StatusCode, body: &impl Serialize) -> Response {
    match serde_json::to_vec(body) {
        Ok(bytes) => (
            status,
            [(header::CONTENT_TYPE, HeaderValue::from_static("application/json"))],
            bytes,
        )
            .into_response(),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            [(header::CONTENT_TYPE, HeaderValue::from_static("application/json"))],
            format!(r#"{{"code":"internal","message":"cannot encode the response: {e}"}}"#),
        )
            .into_response(),
    }
}

type ApiResult = Result<Response, ApiError>;

fn ok_json(body: &impl Serialize) -> ApiResult {
    Ok(json_response(StatusCode::OK, body))
}

fn ok() -> ApiResult {
    ok_json(&serde_json::json!({ "ok": true }))
}

/// Parses a JSON body (empty: `default`, when given).
fn parse_json<T: serde::de::DeserializeOwned>(
    body: Result<Bytes, BytesRejection>,
    default: Option<T>,
) -> Result<T, ApiError> {
    let body = body?;
    if body.iter().all(u8::is_ascii_whitespace)
        && let Some(d) = default
    {
        return Ok(d);
    }
    serde_json::from_slice(&body).map_err(|e| ApiError::bad_request(format!("invalid JSON body: {e}")))
}

// ---- the guard: host, origin, token, size ---------------------------------------------------

async fn guard(State(state): Shared, request: Request, next: Next) -> Response {
    if let Err(e) = check_origin(&state, request.headers()) {
        return e.into_response();
    }
    let path = request.uri().path();
    if path == "/api" || path.starts_with("/api/") {
        let query_token = Query::<HashMap<String, String>>::try_from_uri(request.uri())
            .ok()
            .and_then(|Query(mut q)| q.remove("token"));
        let header_token = request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                let (scheme, rest) = v.trim().split_once(' ')?;
                scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
            });
        let authorized = header_token.is_some_and(|t| constant_time_eq(t.as_bytes(), state.token.as_bytes()))
            || query_token.is_some_and(|t| constant_time_eq(t.as_bytes(), state.token.as_bytes()));
        if !authorized {
            let mut response = ApiError::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "a valid API token is required (`Authorization: Bearer <token>` or `?token=<token>`)",
            )
            .into_response();
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            return response;
        }
    }
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > BODY_LIMIT as u64) {
        return too_large().into_response();
    }
    let mut response = next.run(request).await;
    let headers = response.headers_mut();
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers
        .entry(header::CACHE_CONTROL)
        .or_insert(HeaderValue::from_static("no-store"));
    response
}

/// `Host` must name a loopback address while bound to one (DNS rebinding); an `Origin`, when sent,
/// must be this same origin.
fn check_origin(state: &AppState, headers: &HeaderMap) -> Result<(), ApiError> {
    let forbidden = |message: String| ApiError::new(StatusCode::FORBIDDEN, "forbidden", message);
    let host = headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .unwrap_or("");
    if state.loopback && !is_loopback_host(host) {
        return Err(forbidden(format!(
            "the host `{host}` is not this computer: open the dashboard at http://127.0.0.1 or http://localhost"
        )));
    }
    if let Some(origin) = headers.get(header::ORIGIN) {
        let origin = origin.to_str().unwrap_or("");
        let same = origin
            .strip_prefix("http://")
            .is_some_and(|o| o.eq_ignore_ascii_case(host));
        if !same {
            return Err(forbidden(format!(
                "requests from the origin `{origin}` are not allowed (same origin only)"
            )));
        }
    }
    Ok(())
}

/// `localhost`, `127.x.x.x` or `[::1]`, with or without a port.
fn is_loopback_host(host: &str) -> bool {
    let name = if let Some(rest) = host.strip_prefix('[') {
        match rest.split_once(']') {
            Some((ip, port)) if port.is_empty() || port.strip_prefix(':').is_some_and(valid_port) => ip,
            _ => return false,
        }
    } else {
        match host.rsplit_once(':') {
            Some((name, port)) if valid_port(port) => name,
            Some(_) => return false,
            None => host,
        }
    };
    name.eq_ignore_ascii_case("localhost") || name.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

fn valid_port(p: &str) -> bool {
    p.parse::<u16>().is_ok()
}

/// Compares without stopping at the first difference (the length is not secret).
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

// ---- handlers -------------------------------------------------------------------------------

/// The OpenAPI 3.1 description of this API (`crates/node/openapi.json`).
async fn openapi() -> Response {
    (
        [(header::CONTENT_TYPE, HeaderValue::from_static("application/json"))],
        include_str!("../openapi.json"),
    )
        .into_response()
}

async fn status(State(state): Shared) -> ApiResult {
    let status = state.node.status().borrow().clone();
    ok_json(&status)
}

async fn pause(State(state): Shared) -> ApiResult {
    state.node.pause().await?;
    ok()
}

async fn resume(State(state): Shared) -> ApiResult {
    state.node.resume().await?;
    ok()
}

async fn finish(State(state): Shared) -> ApiResult {
    state.node.finish().await?;
    ok()
}

async fn cancel_start(State(state): Shared) -> ApiResult {
    state.node.cancel_start().await?;
    ok()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SnoozeRequest {
    seconds: f64,
}

async fn snooze(State(state): Shared, body: Result<Bytes, BytesRejection>) -> ApiResult {
    let SnoozeRequest { seconds } = parse_json(body, None)?;
    let duration = crate::config::check_snooze(seconds).map_err(ApiError::bad_request)?;
    state.node.snooze(duration).await?;
    ok()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ModeRequest {
    mode: Mode,
}

async fn set_mode(State(state): Shared, body: Result<Bytes, BytesRejection>) -> ApiResult {
    let ModeRequest { mode } = parse_json(body, None)?;
    state.node.set_mode(mode).await?;
    ok()
}

async fn policy(State(state): Shared) -> ApiResult {
    ok_json(&state.node.config().policy)
}

async fn set_policy(State(state): Shared, body: Result<Bytes, BytesRejection>) -> ApiResult {
    let policy: PolicyConfig = parse_json(body, None)?;
    crate::config::check_policy(&policy).map_err(ApiError::bad_request)?;
    state.node.set_policy(policy).await?;
    ok_json(&state.node.config().policy)
}

async fn device(State(state): Shared) -> ApiResult {
    ok_json(&state.node.device())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DeviceRequest {
    device: String,
}

/// `{"device": "auto" | "cpu" | "cuda:N"}`: refused with `400` when the text is not a device, or
/// names a GPU in a build without CUDA support; saved to the settings file; applies to experts
/// joined after the change.
async fn set_device(State(state): Shared, body: Result<Bytes, BytesRejection>) -> ApiResult {
    let DeviceRequest { device } = parse_json(body, None)?;
    let choice = device
        .parse::<crate::DeviceChoice>()
        .map_err(|e| ApiError::bad_request(e.to_string()))?
        .check_supported()
        .map_err(ApiError::bad_request)?;
    ok_json(&state.node.set_device(choice).await?)
}

async fn machine(State(state): Shared) -> ApiResult {
    ok_json(&state.node.machine_profile().await)
}

async fn experiments(State(state): Shared) -> ApiResult {
    ok_json(&state.node.experiments().await?)
}

fn check_id(id: &str) -> Result<(), ApiError> {
    crate::config::check_experiment_id(id).map_err(ApiError::bad_request)
}

#[derive(Deserialize)]
struct ShowQuery {
    publisher: Option<String>,
}

async fn show(
    State(state): Shared,
    UrlPath(id): UrlPath<String>,
    query: Result<Query<ShowQuery>, QueryRejection>,
) -> ApiResult {
    check_id(&id)?;
    let Query(q) = query?;
    let publisher = q.publisher.filter(|p| !p.is_empty());
    ok_json(&state.node.show(&id, publisher.as_deref()).await?)
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct JoinRequest {
    max_experts: Option<usize>,
    publisher: Option<String>,
}

async fn join(
    State(state): Shared,
    UrlPath(id): UrlPath<String>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult {
    check_id(&id)?;
    let request: JoinRequest = parse_json(body, Some(JoinRequest::default()))?;
    let options = JoinOptions {
        max_experts: request.max_experts,
        publisher: request.publisher.filter(|p| !p.is_empty()),
    };
    ok_json(&state.node.join(&id, options).await?)
}

async fn leave(State(state): Shared, UrlPath(id): UrlPath<String>) -> ApiResult {
    check_id(&id)?;
    state.node.leave(&id).await?;
    ok()
}

/// The ledger's filter and bucket, from the query.
#[derive(Deserialize)]
struct ReportQuery {
    experiment: Option<String>,
    uid: Option<String>,
    from: Option<i64>,
    to: Option<i64>,
    bucket: Option<String>,
}

impl ReportQuery {
    fn filter(&self) -> Filter {
        let some = |s: &Option<String>| s.clone().filter(|s| !s.is_empty());
        Filter {
            experiment: some(&self.experiment),
            uid: some(&self.uid),
            from: self.from,
            to: self.to,
        }
    }

    fn bucket(&self) -> Result<Bucket, ApiError> {
        match self.bucket.as_deref() {
            None | Some("") | Some("hour") => Ok(Bucket::Hour),
            Some("day") => Ok(Bucket::Day),
            Some(other) => Err(ApiError::bad_request(format!(
                "`bucket` is `hour` or `day`, not `{other}`"
            ))),
        }
    }
}

async fn contributions(State(state): Shared, query: Result<Query<ReportQuery>, QueryRejection>) -> ApiResult {
    let Query(q) = query?;
    ok_json(&state.node.contributions(q.filter()).await?)
}

async fn history(State(state): Shared, query: Result<Query<ReportQuery>, QueryRejection>) -> ApiResult {
    let Query(q) = query?;
    let bucket = q.bucket()?;
    ok_json(&state.node.history(q.filter(), bucket).await?)
}

/// Like the other query strings, unknown parameters (the `token`) are ignored.
#[derive(Debug, Deserialize)]
struct LogQuery {
    /// The newest this many (default all the log keeps).
    limit: Option<usize>,
}

async fn log(State(state): Shared, query: Result<Query<LogQuery>, QueryRejection>) -> ApiResult {
    let Query(q) = query?;
    ok_json(&state.node.recent_events(q.limit))
}

async fn export_csv(State(state): Shared, query: Result<Query<ReportQuery>, QueryRejection>) -> ApiResult {
    let Query(q) = query?;
    let bucket = q.bucket()?;
    let csv = state.node.export_csv(q.filter(), bucket).await?;
    Ok((
        StatusCode::OK,
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/csv; charset=utf-8"),
            ),
            (
                header::CONTENT_DISPOSITION,
                HeaderValue::from_static("attachment; filename=\"apiary-contributions.csv\""),
            ),
        ],
        csv,
    )
        .into_response())
}

// ---- the event stream -----------------------------------------------------------------------

async fn events(
    State(state): Shared,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> ApiResult {
    let upgrade = upgrade.map_err(|r| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "websocket_required",
            format!("/api/events is a WebSocket: {}", r.body_text()),
        )
    })?;
    // subscribe before the upgrade completes: nothing published after the response is missed
    let status = state.node.status();
    let events = state.node.events();
    let stopped = state.stopped.clone();
    Ok(upgrade
        .max_message_size(BODY_LIMIT)
        .on_upgrade(move |socket| stream_events(socket, status, events, stopped)))
}

/// One frame of the event stream.
fn frame(kind: &str, body: &impl Serialize) -> Option<Message> {
    let mut value = match serde_json::to_value(body) {
        Ok(serde_json::Value::Object(map)) => map,
        Ok(other) => {
            let mut map = serde_json::Map::new();
            map.insert("value".into(), other);
            map
        }
        Err(e) => {
            tracing::warn!("cannot encode a {kind} frame: {e}");
            return None;
        }
    };
    value.insert("type".into(), serde_json::Value::from(kind));
    let text = serde_json::Value::Object(value).to_string();
    Some(Message::Text(text.into()))
}

/// Sends one frame; `false` when the client is gone or too slow.
async fn send(socket: &mut WebSocket, message: Option<Message>) -> bool {
    let Some(message) = message else {
        return true;
    };
    matches!(
        tokio::time::timeout(SEND_TIMEOUT, socket.send(message)).await,
        Ok(Ok(()))
    )
}

/// The status now, then every event and status change, until the client leaves, the node stops or
/// the server shuts down. Reads only from the node's `watch` and `broadcast`, so a slow client never
/// holds the node up: it loses events (told by a `lagged` frame) and sees only the latest status.
async fn stream_events(
    mut socket: WebSocket,
    mut status: watch::Receiver<NodeStatus>,
    mut events: broadcast::Receiver<NodeEvent>,
    mut stopped: watch::Receiver<bool>,
) {
    let first = status.borrow_and_update().clone();
    if !send(&mut socket, frame("status", &first)).await {
        return;
    }
    let close = |reason: &'static str| {
        Message::Close(Some(CloseFrame {
            code: close_code::AWAY,
            reason: reason.into(),
        }))
    };
    loop {
        tokio::select! {
            biased;
            // (the guard `wait_for` returns must not live across the sends below)
            () = async { let _ = stopped.wait_for(|s| *s).await; } => {
                let _ = send(&mut socket, Some(close("the API server is shutting down"))).await;
                return;
            }
            incoming = socket.recv() => match incoming {
                None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return,
                Some(Ok(_)) => {} // pings are answered by the socket; anything else is ignored
            },
            event = events.recv() => {
                let message = match event {
                    Ok(event) => frame("event", &event),
                    Err(broadcast::error::RecvError::Lagged(missed)) => {
                        frame("lagged", &serde_json::json!({ "missed": missed }))
                    }
                    Err(broadcast::error::RecvError::Closed) => {
                        let _ = send(&mut socket, Some(close("the node has stopped"))).await;
                        return;
                    }
                };
                if !send(&mut socket, message).await {
                    return;
                }
            }
            changed = status.changed() => {
                if changed.is_err() {
                    let _ = send(&mut socket, Some(close("the node has stopped"))).await;
                    return;
                }
                let now = status.borrow_and_update().clone();
                if !send(&mut socket, frame("status", &now)).await {
                    return;
                }
            }
        }
    }
}

// ---- the dashboard --------------------------------------------------------------------------

const NOT_BUNDLED: &str = "Apiary node\n\nThe dashboard is not bundled with this node. The local API \
is at /api/ (every request needs the token from the api-token file in the node's data folder, as \
`Authorization: Bearer <token>` or `?token=<token>`).\n";

async fn static_files(State(state): Shared, method: Method, uri: axum::http::Uri) -> ApiResult {
    let path = uri.path();
    if path == "/api" || path.starts_with("/api/") {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no API route {method} {path}"),
        ));
    }
    if method != Method::GET && method != Method::HEAD {
        return Err(ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "the dashboard's files are read with GET",
        ));
    }
    let not_found = || ApiError::new(StatusCode::NOT_FOUND, "not_found", format!("no file {path}"));
    let Some(root) = &state.ui_dir else {
        if path == "/" {
            return Ok((
                StatusCode::OK,
                [(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("text/plain; charset=utf-8"),
                )],
                NOT_BUNDLED,
            )
                .into_response());
        }
        return Err(not_found());
    };
    // only plain names: no `..`, no `.`, no encoded characters, no drive or root components
    let relative = path.trim_start_matches('/');
    if relative.contains(['%', '\\', ':']) {
        return Err(not_found());
    }
    let relative = Path::new(relative);
    if !relative.components().all(|c| matches!(c, Component::Normal(_))) {
        return Err(not_found());
    }
    let mut file = root.join(relative);
    if tokio::fs::metadata(&file).await.is_ok_and(|m| m.is_dir()) {
        file.push("index.html");
    }
    // a link inside the folder must not lead out of it
    let real = tokio::fs::canonicalize(&file).await.map_err(|_| not_found())?;
    if !real.starts_with(root) {
        return Err(not_found());
    }
    let bytes = tokio::fs::read(&real).await.map_err(|_| not_found())?;
    let body = if method == Method::HEAD {
        Body::empty()
    } else {
        Body::from(bytes)
    };
    Ok((
        StatusCode::OK,
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static(content_type(&real)),
        )],
        body,
    )
        .into_response())
}

fn content_type(path: &Path) -> &'static str {
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase)
        .unwrap_or_default();
    match ext.as_str() {
        "html" | "htm" => "text/html; charset=utf-8",
        "js" | "mjs" => "text/javascript; charset=utf-8",
        "css" => "text/css; charset=utf-8",
        "json" | "map" => "application/json",
        "svg" => "image/svg+xml",
        "png" => "image/png",
        "jpg" | "jpeg" => "image/jpeg",
        "gif" => "image/gif",
        "webp" => "image/webp",
        "ico" => "image/x-icon",
        "wasm" => "application/wasm",
        "woff2" => "font/woff2",
        "woff" => "font/woff",
        "txt" => "text/plain; charset=utf-8",
        _ => "application/octet-stream",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_hosts() {
        for ok in [
            "localhost",
            "LOCALHOST:7787",
            "127.0.0.1",
            "127.0.0.1:80",
            "127.1.2.3:1",
            "[::1]",
            "[::1]:7787",
        ] {
            assert!(is_loopback_host(ok), "{ok}");
        }
        for bad in [
            "",
            "evil.example",
            "evil.example:7787",
            "localhost.evil.example",
            "10.0.0.1",
            "[::1]x",
            "[::1]7787",
            "127.0.0.1:99999",
            "0.0.0.0:7787",
        ] {
            assert!(!is_loopback_host(bad), "{bad}");
        }
    }

    #[test]
    fn constant_time_compare() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }
}
