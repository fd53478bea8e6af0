//! The local HTTP/WebSocket API over a real server on 127.0.0.1: real HTTP (reqwest), a real
//! WebSocket (tokio-tungstenite), a real node (`Node::spawn`), and for join/leave a small swarm on
//! loopback (a bootstrap node and a publisher of the local demo).

#![allow(clippy::unwrap_used, clippy::print_stdout)]

use std::time::{Duration, Instant};

use apiary_catalog::bundled::{LOCAL_DEMO_ID, local_demo};
use apiary_catalog::swarm::{Publication, validator};
use apiary_catalog::{SignedManifest, fingerprint};
use apiary_governor::{Mode, PolicyConfig};
use apiary_node::api::{self, ApiConfig, ApiServer, BODY_LIMIT, TOKEN_FILE};
use apiary_node::{Node, NodeConfig, NodeHandle, RunState};
use apiary_wire::signature::RsaPrivateKey;
use futures::StreamExt;
use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

mod common;
use common::{Peer, User, probes, unix_now, wait_for};

const PATIENCE: Duration = Duration::from_secs(20);

/// A node alone (no bootstrap peers), not paused.
fn lone_config(data_dir: &std::path::Path) -> NodeConfig {
    NodeConfig {
        data_dir: data_dir.to_owned(),
        listen_maddrs: vec!["/ip4/127.0.0.1/tcp/0".into()],
        initial_peers: Vec::new(),
        start_paused: false,
        ..NodeConfig::default()
    }
}

fn local_api() -> ApiConfig {
    ApiConfig {
        bind: "127.0.0.1:0".parse().unwrap(),
        ..ApiConfig::default()
    }
}

/// An HTTP client for one server.
struct Client {
    http: reqwest::Client,
    base: String,
    token: String,
}

impl Client {
    fn new(server: &ApiServer) -> Client {
        Client {
            http: http_client(),
            base: format!("http://{}", server.addr()),
            token: server.token().to_owned(),
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        self.http.request(method, self.url(path)).bearer_auth(&self.token)
    }

    /// A request with the token; its status and JSON body (`Null` when not JSON).
    async fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> (StatusCode, Value) {
        let mut r = self.request(method, path);
        if let Some(b) = body {
            r = r.json(&b);
        }
        let response = r.send().await.unwrap();
        let status = response.status();
        let text = response.text().await.unwrap();
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    async fn get(&self, path: &str) -> (StatusCode, Value) {
        self.call(reqwest::Method::GET, path, None).await
    }

    async fn post(&self, path: &str, body: Option<Value>) -> (StatusCode, Value) {
        self.call(reqwest::Method::POST, path, body).await
    }

    async fn put(&self, path: &str, body: Value) -> (StatusCode, Value) {
        self.call(reqwest::Method::PUT, path, Some(body)).await
    }
}

fn assert_error(got: &(StatusCode, Value), status: StatusCode, code: &str) {
    assert_eq!(got.0, status, "{:?}", got.1);
    assert_eq!(got.1["code"], code, "{:?}", got.1);
    assert!(
        got.1["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{:?}",
        got.1
    );
}

async fn wait_state(node: &NodeHandle, want: RunState) {
    let mut status = node.status();
    wait_for(&format!("the node to be {want:?}"), PATIENCE, async || {
        let s = status.borrow_and_update().clone();
        if s.state == want {
            Ok(())
        } else {
            Err(format!("{:?}: {}", s.state, s.reason))
        }
    })
    .await;
}

/// Sends `head` then `body` in 16 KiB chunks (chunked encoding, no length) over a raw connection;
/// the response as text (what arrived before the server closed, or after 5 s).
async fn raw_request(addr: std::net::SocketAddr, head: &str, body: &[u8]) -> String {
    use tokio::io::AsyncWriteExt;
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.write_all(head.as_bytes()).await.unwrap();
    if body.is_empty() {
        return read_response(&mut stream).await;
    }
    for chunk in body.chunks(16 * 1024) {
        let framed = [format!("{:x}\r\n", chunk.len()).as_bytes(), chunk, b"\r\n"].concat();
        // the server may answer and close before it has read everything
        if stream.write_all(&framed).await.is_err() {
            break;
        }
    }
    let _ = stream.write_all(b"0\r\n\r\n").await;
    read_response(&mut stream).await
}

/// What arrives on `stream` until the server closes it (or 5 s pass), as text.
async fn read_response(stream: &mut tokio::net::TcpStream) -> String {
    use tokio::io::AsyncReadExt;
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        match tokio::time::timeout(Duration::from_millis(500), stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
            Err(_) if !out.is_empty() => break,
            Err(_) => {}
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn next_frame(ws: &mut Ws) -> Value {
    loop {
        let msg = tokio::time::timeout(PATIENCE, ws.next())
            .await
            .expect("a frame in time")
            .expect("the stream open")
            .unwrap();
        match msg {
            Message::Text(t) => return serde_json::from_str(t.as_str()).unwrap(),
            Message::Ping(_) | Message::Pong(_) => {}
            other => panic!("unexpected frame {other:?}"),
        }
    }
}

/// Reads frames until `want` matches one; returns it.
async fn frame_where(ws: &mut Ws, what: &str, want: impl Fn(&Value) -> bool) -> Value {
    let start = Instant::now();
    let mut seen = Vec::new();
    loop {
        assert!(start.elapsed() < PATIENCE, "no frame with {what}; saw {seen:?}");
        let f = next_frame(ws).await;
        if want(&f) {
            return f;
        }
        seen.push(f["type"].clone());
    }
}

/// No token, a wrong token, a foreign `Host`, a foreign `Origin`, a 1 MiB body, an unknown route,
/// the dashboard page.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_host_origin_and_limits() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::spawn(lone_config(dir.path()), probes(&User::default()))
        .await
        .unwrap();
    let server = api::serve(node.clone(), local_api()).await.unwrap();
    assert!(server.addr().ip().is_loopback());
    assert_ne!(server.addr().port(), 0);
    let c = Client::new(&server);
    let http = http_client();

    // 401: no token, a wrong one (header or query), another scheme
    let read = async |r: reqwest::RequestBuilder| {
        let response = r.send().await.unwrap();
        let status = response.status();
        (status, response.json::<Value>().await.unwrap_or(Value::Null))
    };
    let none = read(http.get(c.url("/api/status"))).await;
    assert_error(&none, StatusCode::UNAUTHORIZED, "unauthorized");
    let wrong = read(http.get(c.url("/api/status")).bearer_auth("0".repeat(64))).await;
    assert_error(&wrong, StatusCode::UNAUTHORIZED, "unauthorized");
    let wrong_query = read(http.get(c.url(&format!("/api/status?token={}", "0".repeat(64))))).await;
    assert_error(&wrong_query, StatusCode::UNAUTHORIZED, "unauthorized");
    let basic = read(
        http.get(c.url("/api/status"))
            .header("authorization", format!("Basic {}", c.token)),
    )
    .await;
    assert_error(&basic, StatusCode::UNAUTHORIZED, "unauthorized");
    let paused = read(http.post(c.url("/api/pause"))).await;
    assert_error(&paused, StatusCode::UNAUTHORIZED, "unauthorized");
    // a WebSocket without the token is refused before the upgrade
    let ws = tokio_tungstenite::connect_async(format!("ws://{}/api/events", server.addr())).await;
    match ws {
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) => assert_eq!(r.status(), 401),
        other => panic!("{other:?}"),
    }
    // the right token, in the header or the query
    assert_eq!(c.get("/api/status").await.0, StatusCode::OK);
    let q = read(http.get(c.url(&format!("/api/status?token={}", c.token)))).await;
    assert_eq!(q.0, StatusCode::OK, "{:?}", q.1);

    // 403: a foreign Host (DNS rebinding), even with the token; a foreign Origin
    let rebound = read(
        c.request(reqwest::Method::GET, "/api/status")
            .header("host", "evil.example"),
    )
    .await;
    assert_error(&rebound, StatusCode::FORBIDDEN, "forbidden");
    let rebound_port = read(
        c.request(reqwest::Method::GET, "/api/status")
            .header("host", format!("evil.example:{}", server.addr().port())),
    )
    .await;
    assert_error(&rebound_port, StatusCode::FORBIDDEN, "forbidden");
    let page = read(http.get(c.url("/")).header("host", "evil.example")).await;
    assert_eq!(page.0, StatusCode::FORBIDDEN);
    let localhost = read(
        c.request(reqwest::Method::GET, "/api/status")
            .header("host", format!("localhost:{}", server.addr().port())),
    )
    .await;
    assert_eq!(localhost.0, StatusCode::OK, "{:?}", localhost.1);
    let cross = read(
        c.request(reqwest::Method::POST, "/api/pause")
            .header("origin", "http://evil.example"),
    )
    .await;
    assert_error(&cross, StatusCode::FORBIDDEN, "forbidden");
    let same = read(
        c.request(reqwest::Method::GET, "/api/status")
            .header("origin", format!("http://{}", server.addr())),
    )
    .await;
    assert_eq!(same.0, StatusCode::OK, "{:?}", same.1);
    // no CORS headers, ever
    let response = c
        .request(reqwest::Method::GET, "/api/status")
        .header("origin", format!("http://{}", server.addr()))
        .send()
        .await
        .unwrap();
    assert!(
        response
            .headers()
            .keys()
            .all(|k| !k.as_str().starts_with("access-control-")),
        "{:?}",
        response.headers()
    );

    // 413: a 1 MiB body (declared length, and chunked without one)
    let big = vec![b' '; 1 << 20];
    // a declared 1 MiB body is refused from its header, before any of it is read (raw TCP: an HTTP
    // client writing the body races the server's early answer and may see a broken pipe instead)
    let declared = raw_request(
        server.addr(),
        &format!(
            "PUT /api/policy HTTP/1.1\r\nhost: {}\r\nauthorization: Bearer {}\r\n\
             content-type: application/json\r\ncontent-length: {}\r\n\r\n",
            server.addr(),
            c.token,
            big.len()
        ),
        &[],
    )
    .await;
    assert!(declared.starts_with("HTTP/1.1 413"), "{declared}");
    assert!(declared.contains("too_large"), "{declared}");
    let chunked = raw_request(
        server.addr(),
        &format!(
            "POST /api/snooze HTTP/1.1\r\nhost: {}\r\nauthorization: Bearer {}\r\n\
             content-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n",
            server.addr(),
            c.token
        ),
        &big,
    )
    .await;
    assert!(chunked.starts_with("HTTP/1.1 413"), "{chunked}");
    assert!(chunked.contains("too_large"), "{chunked}");
    // just under the limit is read (and is bad JSON here)
    let under = read(
        c.request(reqwest::Method::POST, "/api/snooze")
            .header("content-type", "application/json")
            .body(vec![b'x'; BODY_LIMIT - 1]),
    )
    .await;
    assert_error(&under, StatusCode::BAD_REQUEST, "bad_request");

    // unknown routes are JSON 404s; the page says the dashboard is not bundled
    assert_error(&c.get("/api/nope").await, StatusCode::NOT_FOUND, "not_found");
    let page = http.get(c.url("/")).send().await.unwrap();
    assert_eq!(page.status(), StatusCode::OK);
    assert!(page.text().await.unwrap().contains("not bundled"));
    assert_eq!(
        http.get(c.url("/app.js")).send().await.unwrap().status(),
        StatusCode::NOT_FOUND
    );

    server.shutdown().await;
    node.shutdown().await.unwrap();
}

/// `ui_dir`: files served at `/`, `index.html` for the root, nothing outside the folder.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_the_dashboard_files() {
    let dir = tempfile::tempdir().unwrap();
    let ui = dir.path().join("ui");
    std::fs::create_dir_all(ui.join("assets")).unwrap();
    std::fs::write(ui.join("index.html"), "<h1>Apiary</h1>").unwrap();
    std::fs::write(ui.join("assets").join("app.js"), "console.log(1)").unwrap();
    std::fs::write(dir.path().join("secret.txt"), "TOP SECRET CONTENT").unwrap();
    let node = Node::spawn(lone_config(&dir.path().join("data")), probes(&User::default()))
        .await
        .unwrap();
    let server = api::serve(
        node.clone(),
        ApiConfig {
            ui_dir: Some(ui),
            ..local_api()
        },
    )
    .await
    .unwrap();
    let c = Client::new(&server);
    let http = http_client();
    let index = http.get(c.url("/")).send().await.unwrap();
    assert_eq!(index.status(), StatusCode::OK);
    assert!(
        index.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/html")
    );
    assert_eq!(index.text().await.unwrap(), "<h1>Apiary</h1>");
    let js = http.get(c.url("/assets/app.js")).send().await.unwrap();
    assert_eq!(js.status(), StatusCode::OK);
    assert!(
        js.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/javascript")
    );
    // `..` sent as is (an HTTP client library would resolve it first)
    let raw = raw_request(
        server.addr(),
        &format!(
            "GET /../secret.txt HTTP/1.1\r\nhost: {}\r\nconnection: close\r\n\r\n",
            server.addr()
        ),
        &[],
    )
    .await;
    assert!(raw.starts_with("HTTP/1.1 404"), "{raw}");
    assert!(!raw.contains("TOP SECRET"), "{raw}");
    for bad in [
        "/%2e%2e/secret.txt",
        "/assets/%2e%2e/%2e%2e/secret.txt",
        "/missing.html",
        "/..%2fsecret.txt",
    ] {
        let r = http.get(c.url(bad)).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::NOT_FOUND, "{bad}");
        assert!(!r.text().await.unwrap().contains("TOP SECRET"), "{bad}");
    }
    server.shutdown().await;
    node.shutdown().await.unwrap();
}

/// The status matches the handle; pause, resume, snooze, finish, mode and policy act on the node; a
/// WebSocket client sees the first status, the events and the status changes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_controls_and_the_event_stream() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::spawn(lone_config(dir.path()), probes(&User::default()))
        .await
        .unwrap();
    wait_state(&node, RunState::Running).await;
    let server = api::serve(node.clone(), local_api()).await.unwrap();
    let c = Client::new(&server);

    // GET /api/status is the handle's status (telemetry may move in between: retry)
    let mut status_rx = node.status();
    wait_for("the API status to equal the handle's", PATIENCE, async || {
        let before = serde_json::to_value(&*status_rx.borrow_and_update()).unwrap();
        let (code, got) = c.get("/api/status").await;
        assert_eq!(code, StatusCode::OK, "{got:?}");
        let after = serde_json::to_value(&*status_rx.borrow_and_update()).unwrap();
        if got == before || got == after {
            Ok(())
        } else {
            Err(format!("{got} vs {after}"))
        }
    })
    .await;
    let (_, got) = c.get("/api/status").await;
    assert_eq!(got["state"], "running");
    assert_eq!(got["peer_id"], node.p2p().local_peer_id().to_base58());

    // the event stream: the status first
    let (mut ws, _) = tokio_tungstenite::connect_async(format!(
        "ws://{}/api/events?token={}",
        server.addr(),
        server.token()
    ))
    .await
    .unwrap();
    let first = next_frame(&mut ws).await;
    assert_eq!(first["type"], "status", "{first}");
    assert_eq!(first["state"], "running", "{first}");
    assert_eq!(first["peer_id"], got["peer_id"]);

    // pause: the node pauses, the stream shows the event and the status
    let (code, body) = c.post("/api/pause", None).await;
    assert_eq!(code, StatusCode::OK, "{body}");
    assert_eq!(body["ok"], true);
    wait_state(&node, RunState::Paused).await;
    let event = frame_where(&mut ws, "the paused event", |f| {
        f["type"] == "event" && f["event"] == "paused"
    })
    .await;
    assert!(event["reason"].as_str().is_some(), "{event}");
    frame_where(&mut ws, "the paused status", |f| {
        f["type"] == "status" && f["state"] == "paused"
    })
    .await;
    assert_eq!(c.get("/api/status").await.1["state"], "paused");

    // resume
    let (code, body) = c.post("/api/resume", None).await;
    assert_eq!(code, StatusCode::OK, "{body}");
    wait_state(&node, RunState::Running).await;
    frame_where(&mut ws, "the resumed event", |f| {
        f["type"] == "event" && f["event"] == "resumed"
    })
    .await;
    frame_where(&mut ws, "the running status", |f| {
        f["type"] == "status" && f["state"] == "running"
    })
    .await;

    // snooze for an hour; bad durations are 400
    for bad in [
        json!({ "seconds": -1 }),
        json!({ "seconds": "soon" }),
        json!({}),
        json!({ "seconds": 1e12 }),
    ] {
        assert_error(
            &c.post("/api/snooze", Some(bad)).await,
            StatusCode::BAD_REQUEST,
            "bad_request",
        );
    }
    let (code, body) = c.post("/api/snooze", Some(json!({ "seconds": 3600 }))).await;
    assert_eq!(code, StatusCode::OK, "{body}");
    wait_state(&node, RunState::Paused).await;
    let s = c.get("/api/status").await.1;
    assert!(
        s["reason"].as_str().unwrap().to_lowercase().contains("snooz"),
        "{s}"
    );
    let until = s["until"].as_f64().unwrap();
    assert!((until - (unix_now() as f64 + 3600.0)).abs() < 10.0, "{s}");
    frame_where(&mut ws, "the snoozed status", |f| {
        f["type"] == "status" && f["until"].as_f64().is_some_and(|u| (u - until).abs() < 1e-3)
    })
    .await;
    assert_eq!(c.post("/api/resume", None).await.0, StatusCode::OK);
    wait_state(&node, RunState::Running).await;

    // finish: nothing in flight, so it pauses
    assert_eq!(c.post("/api/finish", None).await.0, StatusCode::OK);
    wait_state(&node, RunState::Paused).await;
    assert_eq!(c.post("/api/resume", None).await.0, StatusCode::OK);

    // mode
    let (code, body) = c.put("/api/mode", json!({ "mode": "max" })).await;
    assert_eq!(code, StatusCode::OK, "{body}");
    assert_eq!(node.config().policy.mode, Mode::Max);
    assert_error(
        &c.put("/api/mode", json!({ "mode": "turbo" })).await,
        StatusCode::BAD_REQUEST,
        "bad_request",
    );
    assert_eq!(node.config().policy.mode, Mode::Max);

    // policy: read, replace (missing fields take the defaults), bad values refused
    let (code, policy) = c.get("/api/policy").await;
    assert_eq!(code, StatusCode::OK);
    assert_eq!(policy["mode"], "max");
    assert_eq!(
        serde_json::from_value::<PolicyConfig>(policy).unwrap(),
        node.config().policy
    );
    let (code, policy) = c
        .put(
            "/api/policy",
            json!({ "mode": "quiet", "idle_threshold_s": 60.0 }),
        )
        .await;
    assert_eq!(code, StatusCode::OK, "{policy}");
    assert_eq!(policy["mode"], "quiet");
    assert_eq!(node.config().policy.mode, Mode::Quiet);
    assert_eq!(node.config().policy.idle_threshold_s, 60.0);
    assert_error(
        &c.put("/api/policy", json!({ "idle_threshold_s": -5 })).await,
        StatusCode::BAD_REQUEST,
        "bad_request",
    );
    assert_error(
        &c.put("/api/policy", json!({ "mode": 3 })).await,
        StatusCode::BAD_REQUEST,
        "bad_request",
    );
    for hot in [20.0, 120.0] {
        assert_error(
            &c.put("/api/policy", json!({ "temperature_target_c": hot })).await,
            StatusCode::BAD_REQUEST,
            "bad_request",
        );
    }
    assert_eq!(node.config().policy.idle_threshold_s, 60.0);

    // a plain GET of the stream is told to upgrade
    assert_error(
        &c.get("/api/events").await,
        StatusCode::BAD_REQUEST,
        "websocket_required",
    );

    // the server shutting down closes the stream
    server.shutdown().await;
    let end = tokio::time::timeout(PATIENCE, async {
        loop {
            match ws.next().await {
                None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return,
                Some(Ok(_)) => {}
            }
        }
    })
    .await;
    assert!(end.is_ok(), "the stream stayed open after the shutdown");
    let _ = ws.close(None).await;
    node.shutdown().await.unwrap();
}

/// Only when away: finding the user away announces the start (`starting_soon`, with its time), and
/// `POST /api/cancel-start` calls it off until the user is back and away again; a negative delay is
/// refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_away_start_is_announced_and_can_be_cancelled() {
    use std::sync::atomic::Ordering;
    let dir = tempfile::tempdir().unwrap();
    let user = User::default();
    user.0.store(true, Ordering::SeqCst);
    let mut config = lone_config(dir.path());
    config.policy = PolicyConfig {
        mode: Mode::OnlyWhenAway,
        away_start_delay_s: 3.0,
        ..PolicyConfig::default()
    };
    let node = Node::spawn(config, probes(&user)).await.unwrap();
    let server = api::serve(node.clone(), local_api()).await.unwrap();
    let c = Client::new(&server);
    let cause = async |want: &str| {
        wait_for(&format!("the pause cause {want}"), PATIENCE, async || {
            let s = c.get("/api/status").await.1;
            if s["directive"]["cause"] == want {
                Ok(s)
            } else {
                Err(s["directive"].to_string())
            }
        })
        .await
    };
    cause("in_use").await;
    assert_error(
        &c.put(
            "/api/policy",
            json!({ "mode": "only_when_away", "away_start_delay_s": -1 }),
        )
        .await,
        StatusCode::BAD_REQUEST,
        "bad_request",
    );

    // away: announced with its time, then cancelled: still paused after the delay
    user.0.store(false, Ordering::SeqCst);
    let s = cause("starting_soon").await;
    assert_eq!(s["state"], "paused");
    assert_eq!(s["reason"], "Starting in 3 s because you are away");
    let until = s["until"].as_f64().unwrap();
    assert!((until - (unix_now() as f64 + 3.0)).abs() < 2.0, "{s}");
    let (code, body) = c.post("/api/cancel-start", None).await;
    assert_eq!(code, StatusCode::OK, "{body}");
    let s = cause("start_cancelled").await;
    assert!(s["reason"].as_str().unwrap().contains("cancelled"), "{s}");
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(
        c.get("/api/status").await.1["directive"]["cause"],
        "start_cancelled"
    );
    // a cancel with nothing due changes nothing
    assert_eq!(c.post("/api/cancel-start", None).await.0, StatusCode::OK);

    // back, then away again: announced again, and this time it starts
    user.0.store(true, Ordering::SeqCst);
    cause("in_use").await;
    user.0.store(false, Ordering::SeqCst);
    cause("starting_soon").await;
    wait_state(&node, RunState::Running).await;
    assert!(
        c.get("/api/status").await.1["reason"]
            .as_str()
            .unwrap()
            .contains("you are away")
    );
    server.shutdown().await;
    node.shutdown().await.unwrap();
}

/// The catalog (the bundled demo), unknown ids, and the ledger's reports in JSON and CSV; a
/// stopped node is 503.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn catalog_reports_and_a_stopped_node() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::spawn(lone_config(dir.path()), probes(&User::default()))
        .await
        .unwrap();
    let server = api::serve(node.clone(), local_api()).await.unwrap();
    let c = Client::new(&server);

    let (code, cards) = c.get("/api/experiments").await;
    assert_eq!(code, StatusCode::OK, "{cards}");
    let demo = cards
        .as_array()
        .unwrap()
        .iter()
        .find(|card| card["id"] == LOCAL_DEMO_ID)
        .unwrap_or_else(|| panic!("no {LOCAL_DEMO_ID} in {cards}"));
    assert_eq!(demo["source"], "bundled");
    let (code, preview) = c.get(&format!("/api/experiments/{LOCAL_DEMO_ID}")).await;
    assert_eq!(code, StatusCode::OK, "{preview}");
    assert_eq!(preview["card"]["id"], LOCAL_DEMO_ID);
    assert!(preview["plan"].is_null());
    assert!(
        preview["why_not"].as_str().unwrap().contains("local demo"),
        "{preview}"
    );

    assert_error(
        &c.get("/api/experiments/no-such-experiment").await,
        StatusCode::NOT_FOUND,
        "not_found",
    );
    assert_error(
        &c.post("/api/experiments/no-such-experiment/join", None).await,
        StatusCode::NOT_FOUND,
        "not_found",
    );
    assert_error(
        &c.post(
            "/api/experiments/no-such-experiment/join",
            Some(json!({ "max_experts": "two" })),
        )
        .await,
        StatusCode::BAD_REQUEST,
        "bad_request",
    );
    assert_error(
        &c.post("/api/experiments/no-such-experiment/leave", None).await,
        StatusCode::CONFLICT,
        "not_joined",
    );

    // the reports: well-formed even when empty
    node.flush_ledger().await.unwrap();
    let (code, totals) = c.get("/api/contributions").await;
    assert_eq!(code, StatusCode::OK, "{totals}");
    assert!(totals["counters"]["forward_samples"].is_u64(), "{totals}");
    assert!(totals["uptime_seconds"].is_f64(), "{totals}");
    assert!(totals["currency"].is_string(), "{totals}");
    let (code, totals) = c
        .get(&format!(
            "/api/contributions?experiment={LOCAL_DEMO_ID}&from=0&to={}",
            unix_now()
        ))
        .await;
    assert_eq!(code, StatusCode::OK, "{totals}");
    assert_eq!(totals["counters"]["forward_samples"], 0);
    assert_error(
        &c.get("/api/contributions?from=yesterday").await,
        StatusCode::BAD_REQUEST,
        "bad_request",
    );
    for bucket in ["hour", "day"] {
        let (code, rows) = c.get(&format!("/api/history?bucket={bucket}")).await;
        assert_eq!(code, StatusCode::OK, "{rows}");
        for row in rows.as_array().unwrap() {
            assert!(row["start"].is_i64() && row["counters"].is_object(), "{row}");
        }
    }
    assert_error(
        &c.get("/api/history?bucket=week").await,
        StatusCode::BAD_REQUEST,
        "bad_request",
    );
    let csv = c
        .request(reqwest::Method::GET, "/api/export.csv?bucket=day")
        .send()
        .await
        .unwrap();
    assert_eq!(csv.status(), StatusCode::OK);
    assert!(
        csv.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/csv")
    );
    let text = csv.text().await.unwrap();
    let expected = node
        .export_csv(apiary_ledger::Filter::all(), apiary_ledger::Bucket::Day)
        .await
        .unwrap();
    assert_eq!(text, expected);
    let header = text.lines().next().unwrap_or_default();
    assert!(header.contains(','), "{text:?}");

    // a stopped node: the API answers 503
    node.shutdown().await.unwrap();
    assert_error(
        &c.post("/api/pause", None).await,
        StatusCode::SERVICE_UNAVAILABLE,
        "stopped",
    );
    server.shutdown().await;
}

/// The token file: created with mode 0600, reused by the next start; an explicit token wins.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_token_file_is_private_and_reused() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::spawn(lone_config(dir.path()), probes(&User::default()))
        .await
        .unwrap();
    let server = api::serve(node.clone(), local_api()).await.unwrap();
    let token = server.token().to_owned();
    assert_eq!(token.len(), 64);
    assert!(token.chars().all(|c| c.is_ascii_hexdigit()), "{token}");
    let path = dir.path().join(TOKEN_FILE);
    assert_eq!(std::fs::read_to_string(&path).unwrap().trim(), token);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "{mode:o}");
    }
    server.shutdown().await;
    node.shutdown().await.unwrap();

    // a restart: the same token
    let node = Node::spawn(lone_config(dir.path()), probes(&User::default()))
        .await
        .unwrap();
    let server = api::serve(node.clone(), local_api()).await.unwrap();
    assert_eq!(server.token(), token);
    assert_eq!(Client::new(&server).get("/api/status").await.0, StatusCode::OK);
    server.shutdown().await;

    // an explicit token is used instead (the file stays)
    let server = api::serve(
        node.clone(),
        ApiConfig {
            token: Some("let-me-in".into()),
            ..local_api()
        },
    )
    .await
    .unwrap();
    assert_eq!(server.token(), "let-me-in");
    let c = Client::new(&server);
    assert_eq!(c.get("/api/status").await.0, StatusCode::OK);
    let old = http_client()
        .get(c.url("/api/status"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(old.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(std::fs::read_to_string(&path).unwrap().trim(), token);
    server.shutdown().await;
    node.shutdown().await.unwrap();
}

/// Join and leave the local demo, published on a loopback swarm, through the API.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn join_and_leave_a_published_experiment() {
    let started = Instant::now();
    let boot = Peer::spawn(&[], validator(None).unwrap()).await;
    let key = RsaPrivateKey::generate().unwrap();
    let publisher = Peer::spawn(
        std::slice::from_ref(&boot.addr),
        validator(Some(key.clone())).unwrap(),
    )
    .await;
    let manifest = local_demo(&key.public_key(), unix_now(), 1, &[2, 2], 16).unwrap();
    let signed = SignedManifest::sign(manifest, &key).unwrap();
    let publication = Publication::start(
        publisher.dht.clone(),
        &signed,
        unix_now(),
        Duration::from_secs(1),
        Duration::from_secs(5),
    )
    .await
    .unwrap();
    let fp = fingerprint(&key.public_key());

    let dir = tempfile::tempdir().unwrap();
    let config = NodeConfig {
        initial_peers: vec![boot.addr.to_string()],
        update_period: Duration::from_secs(2),
        ..lone_config(dir.path())
    };
    let node = Node::spawn(config, probes(&User::default())).await.unwrap();
    let server = api::serve(node.clone(), local_api()).await.unwrap();
    let c = Client::new(&server);
    let (mut ws, _) = tokio_tungstenite::connect_async(format!(
        "ws://{}/api/events?token={}",
        server.addr(),
        server.token()
    ))
    .await
    .unwrap();
    assert_eq!(next_frame(&mut ws).await["type"], "status");

    wait_for("the published demo in the API's catalog", PATIENCE, async || {
        let (code, cards) = c.get("/api/experiments").await;
        assert_eq!(code, StatusCode::OK, "{cards}");
        let demo = cards
            .as_array()
            .and_then(|a| a.iter().find(|card| card["id"] == LOCAL_DEMO_ID).cloned());
        match demo {
            Some(d) if d["source"] == "dht" && d["fingerprint"] == fp.as_str() => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    let (code, preview) = c
        .get(&format!("/api/experiments/{LOCAL_DEMO_ID}?publisher={fp}"))
        .await;
    assert_eq!(code, StatusCode::OK, "{preview}");
    assert!(preview["plan"]["uids"].is_array(), "{preview}");

    let join = format!("/api/experiments/{LOCAL_DEMO_ID}/join");
    let (code, plan) = c
        .post(&join, Some(json!({ "max_experts": 2, "publisher": fp })))
        .await;
    assert_eq!(code, StatusCode::OK, "{plan}");
    assert_eq!(plan["uids"].as_array().unwrap().len(), 2, "{plan}");
    frame_where(&mut ws, "the joined event", |f| {
        f["type"] == "event" && f["event"] == "joined" && f["id"] == LOCAL_DEMO_ID
    })
    .await;
    let status = c.get("/api/status").await.1;
    assert_eq!(status["experiments"][0]["id"], LOCAL_DEMO_ID, "{status}");
    assert_eq!(status["experiments"][0]["uids"], plan["uids"]);
    assert_error(
        &c.post(&join, Some(json!({ "max_experts": 2 }))).await,
        StatusCode::CONFLICT,
        "already_joined",
    );

    let leave = format!("/api/experiments/{LOCAL_DEMO_ID}/leave");
    let (code, body) = c.post(&leave, None).await;
    assert_eq!(code, StatusCode::OK, "{body}");
    frame_where(&mut ws, "the left event", |f| {
        f["type"] == "event" && f["event"] == "left" && f["id"] == LOCAL_DEMO_ID
    })
    .await;
    assert!(node.status().borrow().experiments.is_empty());
    assert_error(&c.post(&leave, None).await, StatusCode::CONFLICT, "not_joined");

    // the log keeps what happened, oldest first, with when
    let (code, log) = c.get("/api/log").await;
    assert_eq!(code, StatusCode::OK, "{log}");
    let kinds: Vec<&str> = log
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["event"].as_str().unwrap())
        .collect();
    let joined = kinds.iter().position(|k| *k == "joined").expect("joined logged");
    let left = kinds.iter().rposition(|k| *k == "left").expect("left logged");
    assert!(joined < left, "{kinds:?}");
    assert!(log[left]["at"].as_f64().unwrap() > 1.7e9, "{log}");
    assert_eq!(log[left]["id"], LOCAL_DEMO_ID);
    // the token may ride in the query here too (as for WebSocket clients)
    let by_query = c
        .http
        .get(c.url(&format!("/api/log?limit=1&token={}", c.token)))
        .send()
        .await
        .unwrap();
    assert_eq!(by_query.status(), StatusCode::OK);
    let (code, last) = c.get("/api/log?limit=1").await;
    assert_eq!(code, StatusCode::OK, "{last}");
    assert_eq!(last.as_array().unwrap().len(), 1);
    assert_eq!(last[0], log[kinds.len() - 1]);
    assert_error(
        &c.get("/api/log?limit=-1").await,
        StatusCode::BAD_REQUEST,
        "bad_request",
    );

    let _ = ws.close(None).await;
    server.shutdown().await;
    node.shutdown().await.unwrap();
    publication.withdraw().await;
    publisher.stop().await;
    boot.stop().await;
    eprintln!("join_and_leave_a_published_experiment: {:.1?}", started.elapsed());
}

/// The `device` setting through the API: read, bad text and unsupported devices refused with `400`
/// and a clear message, a good value saved to `node.toml` (and only it: command-line overrides stay
/// out) and in effect again after a restart; a join under a device this build cannot use fails with
/// a clear error, never a panic; `/api/machine` lists the GPUs the probe finds (none here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_device_setting_is_validated_saved_and_restored() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config").join(apiary_node::CONFIG_FILE);
    let config = lone_config(&dir.path().join("data"));
    let node = Node::spawn_with_file(config.clone(), &path, probes(&User::default()))
        .await
        .unwrap();
    let server = api::serve(node.clone(), local_api()).await.unwrap();
    let c = Client::new(&server);

    let (status, got) = c.get("/api/device").await;
    assert_eq!(status, StatusCode::OK, "{got}");
    assert_eq!(got["device"], "auto");
    assert_eq!(got["cuda_supported"], cfg!(feature = "cuda"));
    assert!(
        got["note"].as_str().unwrap().contains("joined after the change"),
        "{got}"
    );

    // bad text: 400 naming what is expected; nothing saved
    for bad in [
        json!({ "device": "gpu" }),
        json!({ "device": "cuda:x" }),
        json!({ "device": "" }),
    ] {
        let got = c.put("/api/device", bad.clone()).await;
        assert_error(&got, StatusCode::BAD_REQUEST, "bad_request");
        assert!(
            got.1["message"]
                .as_str()
                .unwrap()
                .contains("expected `auto`, `cpu` or `cuda:N`"),
            "{bad}: {got:?}"
        );
    }
    assert_error(
        &c.put("/api/device", json!({ "device": 0 })).await,
        StatusCode::BAD_REQUEST,
        "bad_request",
    );
    assert_error(
        &c.put("/api/device", json!({ "device": "cpu", "extra": 1 })).await,
        StatusCode::BAD_REQUEST,
        "bad_request",
    );
    assert!(!path.exists(), "nothing saved yet");
    if !cfg!(feature = "cuda") {
        // a GPU in a build without CUDA support: refused by the API and by the handle
        let got = c.put("/api/device", json!({ "device": "cuda:0" })).await;
        assert_error(&got, StatusCode::BAD_REQUEST, "bad_request");
        assert!(
            got.1["message"].as_str().unwrap().contains("no CUDA support"),
            "{got:?}"
        );
        let e = node
            .set_device(apiary_node::DeviceChoice::Cuda(0))
            .await
            .unwrap_err();
        assert_eq!(e.code(), "bad_device");
        assert_eq!(node.device().device, apiary_node::DeviceChoice::Auto);
    }

    // a good value: in effect, and saved (only the device: the file has no data_dir override)
    let (status, got) = c.put("/api/device", json!({ "device": "cpu" })).await;
    assert_eq!(status, StatusCode::OK, "{got}");
    assert_eq!(got["device"], "cpu");
    assert_eq!(c.get("/api/device").await.1["device"], "cpu");
    assert_eq!(node.config().device, apiary_node::DeviceChoice::Cpu);
    let saved = NodeConfig::load(&path).unwrap();
    assert_eq!(saved.device, apiary_node::DeviceChoice::Cpu);
    assert_eq!(saved.data_dir, NodeConfig::default().data_dir);
    assert!(
        std::fs::read_to_string(&path)
            .unwrap()
            .contains("device = \"cpu\""),
        "{}",
        std::fs::read_to_string(&path).unwrap()
    );
    // the machine profile lists the GPUs the (test) probe finds: none
    let (status, machine) = c.get("/api/machine").await;
    assert_eq!(status, StatusCode::OK, "{machine}");
    assert_eq!(machine["gpus"], json!([]));
    server.shutdown().await;
    node.shutdown().await.unwrap();

    // a restart from the file: the device is back
    let node = Node::spawn_from(&path, probes(&User::default())).await.unwrap();
    assert_eq!(node.device().device, apiary_node::DeviceChoice::Cpu);
    node.shutdown().await.unwrap();

    // a file naming a GPU this build cannot use: the node starts, and a join says why it cannot
    if !cfg!(feature = "cuda") {
        let gpu = NodeConfig {
            device: apiary_node::DeviceChoice::Cuda(1),
            ..lone_config(&dir.path().join("data2"))
        };
        let node = Node::spawn(gpu, probes(&User::default())).await.unwrap();
        let server = api::serve(node.clone(), local_api()).await.unwrap();
        let c = Client::new(&server);
        assert_eq!(c.get("/api/device").await.1["device"], "cuda:1");
        let got = c
            .post(&format!("/api/experiments/{LOCAL_DEMO_ID}/join"), None)
            .await;
        assert_error(&got, StatusCode::UNPROCESSABLE_ENTITY, "device_unavailable");
        let message = got.1["message"].as_str().unwrap();
        assert!(
            message.contains("cuda:1") && message.contains("no CUDA support"),
            "{message}"
        );
        assert!(node.status().borrow().experiments.is_empty());
        server.shutdown().await;
        node.shutdown().await.unwrap();
    }
}

/// A plain HTTP client. A workspace build unifies reqwest with the desktop app's updater, which turns on
/// rustls without a crypto provider: install ring's first (a no-op once installed or without rustls).
fn http_client() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::new()
}
