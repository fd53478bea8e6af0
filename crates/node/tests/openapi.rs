//! `crates/node/openapi.json` against the real API: served as is at `/api/openapi.json`, every route of
//! `src/api.rs` documented (and nothing documented that does not exist), and real responses of a real
//! node on 127.0.0.1 valid against the documented schemas (with a small validator for the subset of
//! JSON Schema the document uses).

#![allow(clippy::unwrap_used, clippy::print_stdout)]

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use apiary_catalog::bundled::LOCAL_DEMO_ID;
use apiary_node::api::{self, ApiConfig, ApiServer};
use apiary_node::{Node, NodeConfig, NodeHandle};
use futures::StreamExt;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

mod common;
use common::{User, probes, wait_for};

const DOCUMENT: &str = include_str!("../openapi.json");
const API_SOURCE: &str = include_str!("../src/api.rs");
const METHODS: [&str; 5] = ["get", "post", "put", "delete", "patch"];

fn document() -> Value {
    serde_json::from_str(DOCUMENT).expect("openapi.json is JSON")
}

/// A node alone (no bootstrap peers) and its API on 127.0.0.1.
async fn start(dir: &std::path::Path) -> (NodeHandle, ApiServer) {
    let config = NodeConfig {
        data_dir: dir.to_owned(),
        listen_maddrs: vec!["/ip4/127.0.0.1/tcp/0".into()],
        initial_peers: Vec::new(),
        start_paused: false,
        ..NodeConfig::default()
    };
    let node = Node::spawn(config, probes(&User::default())).await.unwrap();
    let api_config = ApiConfig {
        bind: "127.0.0.1:0".parse().unwrap(),
        ..ApiConfig::default()
    };
    let server = api::serve(node.clone(), api_config).await.unwrap();
    (node, server)
}

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

    /// A request (with the token unless `token` is false): its status, content type and body.
    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
        token: bool,
    ) -> (StatusCode, String, String) {
        let mut r = self.http.request(method, format!("{}{path}", self.base));
        if token {
            r = r.bearer_auth(&self.token);
        }
        if let Some(b) = body {
            r = r.json(&b);
        }
        let response = r.send().await.unwrap();
        let status = response.status();
        let content_type = response
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        (status, content_type, response.text().await.unwrap())
    }
}

// ---- the routes in the source ---------------------------------------------------------------

/// Every `.route("path", …)` of `src/api.rs`, with the methods its method router names.
fn source_routes() -> BTreeMap<String, BTreeSet<String>> {
    let mut routes = BTreeMap::new();
    let mut rest = API_SOURCE;
    while let Some(at) = rest.find(".route(\"") {
        let call = &rest[at + ".route(".len()..];
        // the call's text up to its closing parenthesis
        let mut depth = 1usize;
        let mut end = call.len();
        for (i, c) in call.char_indices() {
            match c {
                '(' => depth += 1,
                ')' => {
                    depth -= 1;
                    if depth == 0 {
                        end = i;
                        break;
                    }
                }
                _ => {}
            }
        }
        let call = &call[..end];
        let path = call[1..].split('"').next().unwrap().to_owned();
        let handlers = &call[path.len() + 2..];
        let mut methods = BTreeSet::new();
        for m in METHODS {
            let named = handlers.match_indices(&format!("{m}(")).any(|(i, _)| {
                i == 0
                    || !handlers[..i]
                        .chars()
                        .next_back()
                        .is_some_and(|c| c.is_alphanumeric() || c == '_')
            });
            if named {
                methods.insert(m.to_owned());
            }
        }
        assert!(
            !methods.is_empty(),
            "no method found for the route {path}: {call}"
        );
        routes.insert(path, methods);
        rest = &rest[at + 1..];
    }
    routes
}

fn documented_routes(doc: &Value) -> BTreeMap<String, BTreeSet<String>> {
    doc["paths"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(path, item)| {
            let methods = item
                .as_object()
                .unwrap()
                .keys()
                .filter(|k| METHODS.contains(&k.as_str()))
                .cloned()
                .collect();
            (path.clone(), methods)
        })
        .collect()
}

/// The documented path with its `{id}` filled in.
fn concrete(path: &str) -> String {
    path.replace("{id}", "no-such-experiment")
}

// ---- a validator for the subset of JSON Schema the document uses ------------------------------

/// Keywords the validator checks, and those it may ignore (annotations).
const CHECKED: [&str; 14] = [
    "$ref",
    "type",
    "enum",
    "properties",
    "required",
    "additionalProperties",
    "items",
    "oneOf",
    "anyOf",
    "minimum",
    "maximum",
    "exclusiveMinimum",
    "minLength",
    "maxLength",
];
const ANNOTATIONS: [&str; 2] = ["description", "format"];

fn resolve<'a>(doc: &'a Value, reference: &str) -> &'a Value {
    let pointer = reference
        .strip_prefix('#')
        .unwrap_or_else(|| panic!("only local references: {reference}"));
    doc.pointer(pointer)
        .unwrap_or_else(|| panic!("the reference {reference} resolves to nothing"))
}

/// Checks that `schema` (and everything under it) uses only the supported keywords, and that every
/// `$ref` resolves.
fn check_subset(doc: &Value, schema: &Value, at: &str) {
    let object = schema
        .as_object()
        .unwrap_or_else(|| panic!("{at}: a schema is an object"));
    for (key, value) in object {
        assert!(
            CHECKED.contains(&key.as_str()) || ANNOTATIONS.contains(&key.as_str()),
            "{at}: the keyword `{key}` is outside the validated subset"
        );
        match key.as_str() {
            "$ref" => {
                let r = value.as_str().unwrap();
                assert!(r.starts_with("#/components/schemas/"), "{at}: {r}");
                resolve(doc, r);
            }
            "properties" => {
                for (name, s) in value.as_object().unwrap() {
                    check_subset(doc, s, &format!("{at}.{name}"));
                }
            }
            "items" => check_subset(doc, value, &format!("{at}[]")),
            "oneOf" | "anyOf" => {
                for (i, s) in value.as_array().unwrap().iter().enumerate() {
                    check_subset(doc, s, &format!("{at}/{key}/{i}"));
                }
            }
            "additionalProperties" => {
                assert!(value.is_boolean(), "{at}: additionalProperties is a boolean here")
            }
            "required" => {
                let props = schema.get("properties").and_then(Value::as_object);
                for name in value.as_array().unwrap() {
                    let name = name.as_str().unwrap();
                    assert!(
                        props.is_some_and(|p| p.contains_key(name)),
                        "{at}: `{name}` is required but not a property"
                    );
                }
            }
            _ => {}
        }
    }
}

fn type_matches(name: &str, value: &Value) -> bool {
    match name {
        "null" => value.is_null(),
        "boolean" => value.is_boolean(),
        "string" => value.is_string(),
        "array" => value.is_array(),
        "object" => value.is_object(),
        "number" => value.is_number(),
        "integer" => value.is_i64() || value.is_u64() || value.as_f64().is_some_and(|f| f.fract() == 0.0),
        other => panic!("unknown type `{other}`"),
    }
}

/// Validates `value` against `schema`; the first mismatch, with where it is.
fn validate(doc: &Value, schema: &Value, value: &Value, at: &str) -> Result<(), String> {
    if let Some(r) = schema.get("$ref").and_then(Value::as_str) {
        return validate(doc, resolve(doc, r), value, at);
    }
    if let Some(t) = schema.get("type") {
        let names: Vec<&str> = match t {
            Value::String(s) => vec![s.as_str()],
            Value::Array(a) => a.iter().map(|n| n.as_str().unwrap()).collect(),
            _ => panic!("{at}: bad type {t}"),
        };
        if !names.iter().any(|n| type_matches(n, value)) {
            return Err(format!("{at}: {value} is not of type {t}"));
        }
    }
    if let Some(options) = schema.get("enum").and_then(Value::as_array)
        && !options.contains(value)
    {
        return Err(format!("{at}: {value} is not one of {options:?}"));
    }
    if let Some(n) = value.as_f64() {
        let bound = |k: &str| schema.get(k).and_then(Value::as_f64);
        if bound("minimum").is_some_and(|m| n < m)
            || bound("maximum").is_some_and(|m| n > m)
            || bound("exclusiveMinimum").is_some_and(|m| n <= m)
        {
            return Err(format!("{at}: {n} is out of range"));
        }
    }
    if let Some(s) = value.as_str() {
        let len = s.chars().count() as u64;
        let bound = |k: &str| schema.get(k).and_then(Value::as_u64);
        if bound("minLength").is_some_and(|m| len < m) || bound("maxLength").is_some_and(|m| len > m) {
            return Err(format!("{at}: the length {len} is out of range"));
        }
    }
    if let Some(object) = value.as_object() {
        let props = schema.get("properties").and_then(Value::as_object);
        for name in schema
            .get("required")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let name = name.as_str().unwrap();
            if !object.contains_key(name) {
                return Err(format!("{at}: `{name}` is missing"));
            }
        }
        for (name, v) in object {
            match props.and_then(|p| p.get(name)) {
                Some(s) => validate(doc, s, v, &format!("{at}.{name}"))?,
                None if schema.get("additionalProperties") == Some(&Value::Bool(false)) => {
                    return Err(format!("{at}: `{name}` is not a documented property"));
                }
                None => {}
            }
        }
    }
    if let (Some(items), Some(array)) = (schema.get("items"), value.as_array()) {
        for (i, v) in array.iter().enumerate() {
            validate(doc, items, v, &format!("{at}[{i}]"))?;
        }
    }
    if let Some(options) = schema.get("oneOf").and_then(Value::as_array) {
        let results: Vec<_> = options.iter().map(|s| validate(doc, s, value, at)).collect();
        let passed = results.iter().filter(|r| r.is_ok()).count();
        if passed != 1 {
            return Err(format!("{at}: {passed} of oneOf match {value}: {results:?}"));
        }
    }
    if let Some(options) = schema.get("anyOf").and_then(Value::as_array) {
        let results: Vec<_> = options.iter().map(|s| validate(doc, s, value, at)).collect();
        if !results.iter().any(Result::is_ok) {
            return Err(format!("{at}: no anyOf matches {value}: {results:?}"));
        }
    }
    Ok(())
}

fn schema_ref(name: &str) -> Value {
    json!({ "$ref": format!("#/components/schemas/{name}") })
}

/// The documented JSON schema of `method path`'s `status` response.
fn response_schema<'a>(doc: &'a Value, path: &str, method: &str, status: StatusCode) -> &'a Value {
    let operation = &doc["paths"][path][method];
    assert!(operation.is_object(), "{method} {path} is not documented");
    let mut response = operation["responses"]
        .get(status.as_str())
        .unwrap_or_else(|| panic!("{method} {path}: the status {status} is not documented"));
    if let Some(r) = response.get("$ref").and_then(Value::as_str) {
        response = resolve(doc, r);
    }
    response
        .pointer("/content/application~1json/schema")
        .unwrap_or_else(|| panic!("{method} {path} {status}: no JSON schema"))
}

/// Requests `method path` and checks the answer has `want` and matches the documented schema for it.
async fn check(
    c: &Client,
    doc: &Value,
    method: &str,
    documented: &str,
    path: &str,
    want: StatusCode,
) -> Value {
    check_with(c, doc, method, documented, path, want, true).await
}

async fn check_with(
    c: &Client,
    doc: &Value,
    method: &str,
    documented: &str,
    path: &str,
    want: StatusCode,
    token: bool,
) -> Value {
    let (status, content_type, body) = c
        .send(method.to_uppercase().parse().unwrap(), path, None, token)
        .await;
    assert_eq!(status, want, "{method} {path}: {body}");
    assert_eq!(content_type, "application/json", "{method} {path}");
    let value: Value = serde_json::from_str(&body).unwrap();
    let schema = response_schema(doc, documented, method, status);
    if let Err(e) = validate(doc, schema, &value, "$") {
        panic!("{method} {path} ({status}) does not match its schema: {e}\n{value:#}");
    }
    value
}

// ---- the tests ------------------------------------------------------------------------------

#[test]
fn the_document_is_openapi_within_the_validated_subset() {
    let doc = document();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3.1."));
    assert!(doc["info"]["title"].is_string() && doc["info"]["version"].is_string());
    let schemes = doc["components"]["securitySchemes"].as_object().unwrap();
    assert_eq!(schemes["bearerToken"]["scheme"], "bearer");
    assert_eq!(schemes["queryToken"]["in"], "query");
    assert_eq!(schemes["queryToken"]["name"], "token");
    for (name, schema) in doc["components"]["schemas"].as_object().unwrap() {
        check_subset(&doc, schema, name);
    }
    // every schema in the paths (parameters, bodies, responses, frames) as well
    fn walk(doc: &Value, v: &Value, at: &str) {
        match v {
            Value::Object(o) => {
                for (k, child) in o {
                    let here = format!("{at}/{k}");
                    if k == "schema" || k == "x-websocket-frames" {
                        check_subset(doc, child, &here);
                    } else if k == "$ref" {
                        resolve(doc, child.as_str().unwrap());
                    } else {
                        walk(doc, child, &here);
                    }
                }
            }
            Value::Array(a) => {
                for (i, child) in a.iter().enumerate() {
                    walk(doc, child, &format!("{at}/{i}"));
                }
            }
            _ => {}
        }
    }
    walk(&doc, &doc["paths"], "paths");
    walk(&doc, &doc["components"]["responses"], "responses");
    // every operation answers 401 and 403 (the guard), and has an id
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, operation) in item.as_object().unwrap() {
            for status in ["401", "403"] {
                assert!(
                    operation["responses"].get(status).is_some(),
                    "{method} {path}: no {status}"
                );
            }
            assert!(operation["operationId"].is_string(), "{method} {path}");
        }
    }
}

#[test]
fn the_validator_refuses_what_does_not_match() {
    let doc = document();
    let status = json!({
        "state": "paused", "reason": "Paused by you", "until": null,
        "directive": { "kind": "paused", "cause": "user", "reason": "Paused by you", "until": null }, "mode": "balanced",
        "experiments": [], "peer_id": "12D3KooW", "maddrs": [], "peers": 0, "reachability": "unknown", "telemetry": null,
        "network": { "reachability": "unknown", "forced": false, "path": "checking", "reason": "x", "rtt_ms": null,
            "relays": [], "relayed_addrs": [], "observed_addrs": [], "port_mapping": null,
            "connections": { "direct": 0, "relayed": 0 }, "hole_punches": { "succeeded": 0, "failed": 0 } }
    });
    let node_status = schema_ref("NodeStatus");
    validate(&doc, &node_status, &status, "$").unwrap();
    // another type altogether
    assert!(validate(&doc, &schema_ref("Card"), &status, "$").is_err());
    // a missing required field, an extra field, a wrong type, a value outside an enum, a null where
    // none is allowed, an array item of the wrong type, and a oneOf that matches nothing
    let broken = |f: &dyn Fn(&mut Value)| {
        let mut s = status.clone();
        f(&mut s);
        s
    };
    for bad in [
        broken(&|s| drop(s.as_object_mut().unwrap().remove("peer_id"))),
        broken(&|s| s["surprise"] = json!(1)),
        broken(&|s| s["peers"] = json!("many")),
        broken(&|s| s["peers"] = json!(1.5)),
        broken(&|s| s["state"] = json!("asleep")),
        broken(&|s| s["reason"] = Value::Null),
        broken(&|s| s["maddrs"] = json!([1])),
        broken(&|s| s["directive"]["kind"] = json!("sleep")),
        broken(&|s| s["directive"]["cause"] = json!("tired")),
        broken(&|s| s["telemetry"] = json!({})),
    ] {
        assert!(validate(&doc, &node_status, &bad, "$").is_err(), "accepted {bad}");
    }
    // nullable fields take null, and `{"known": …}` / `{"unknown": …}` readings
    validate(&doc, &node_status, &broken(&|s| s["until"] = json!(1.5)), "$").unwrap();
    let reading = schema_ref("ReadingNumber");
    validate(&doc, &reading, &json!({ "known": 1.0 }), "$").unwrap();
    validate(&doc, &reading, &json!({ "unknown": "why" }), "$").unwrap();
    assert!(validate(&doc, &reading, &json!({ "known": "x" }), "$").is_err());
    assert!(validate(&doc, &reading, &json!(1.0), "$").is_err());
    // range and length bounds
    let snooze = schema_ref("SnoozeRequest");
    validate(&doc, &snooze, &json!({ "seconds": 60 }), "$").unwrap();
    assert!(validate(&doc, &snooze, &json!({ "seconds": 0 }), "$").is_err());
    assert!(validate(&doc, &snooze, &json!({ "seconds": 1e12 }), "$").is_err());
    assert!(validate(&doc, &snooze, &json!({}), "$").is_err());
    assert!(
        validate(
            &doc,
            &schema_ref("Error"),
            &json!({ "code": "oops", "message": "m" }),
            "$"
        )
        .is_err()
    );
}

#[test]
fn every_route_of_the_source_is_documented() {
    let source = source_routes();
    assert!(source.len() >= 17, "{source:?}");
    assert_eq!(
        source["/api/policy"],
        BTreeSet::from(["get".to_owned(), "put".to_owned()])
    );
    assert_eq!(source["/api/mode"], BTreeSet::from(["put".to_owned()]));
    assert_eq!(documented_routes(&document()), source);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_served_document_is_the_file_and_every_documented_route_exists() {
    let dir = tempfile::tempdir().unwrap();
    let (node, server) = start(dir.path()).await;
    let c = Client::new(&server);

    let (status, content_type, body) = c.send(Method::GET, "/api/openapi.json", None, true).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(content_type, "application/json");
    assert_eq!(body, DOCUMENT);
    assert_eq!(serde_json::from_str::<Value>(&body).unwrap(), document());
    // behind the token like the rest of /api/
    let (status, _, _) = c.send(Method::GET, "/api/openapi.json", None, false).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);

    // every documented operation is routed: not 405, and not the fallback's "no API route" 404; an
    // undocumented method on a documented path is 405
    for (path, methods) in documented_routes(&document()) {
        let url = concrete(&path);
        for method in METHODS {
            // bodies that are refused (or harmless) rather than acted on
            let body = match (method, path.as_str()) {
                ("post", "/api/snooze") | ("put", "/api/mode") => Some(json!({ "bogus": 1 })),
                ("put", "/api/policy") => Some(json!({ "idle_threshold_s": -1 })),
                _ => None,
            };
            let (status, _, text) = c
                .send(method.to_uppercase().parse().unwrap(), &url, body, true)
                .await;
            if methods.contains(method) {
                assert_ne!(status, StatusCode::METHOD_NOT_ALLOWED, "{method} {url}: {text}");
                assert!(
                    !(status == StatusCode::NOT_FOUND && text.contains("no API route")),
                    "{method} {url}: {text}"
                );
                let documented = doc_statuses(&path, method);
                assert!(
                    documented.contains(status.as_str()),
                    "{method} {url} answered {status}, not among the documented {documented:?}: {text}"
                );
            } else {
                assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED, "{method} {url}: {text}");
            }
        }
    }
    server.shutdown().await;
    node.shutdown().await.unwrap();
}

fn doc_statuses(path: &str, method: &str) -> BTreeSet<String> {
    document()["paths"][path][method]["responses"]
        .as_object()
        .unwrap()
        .keys()
        .cloned()
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_responses_match_the_documented_schemas() {
    let dir = tempfile::tempdir().unwrap();
    let (node, server) = start(dir.path()).await;
    let c = Client::new(&server);
    let doc = document();
    let ok = StatusCode::OK;

    // the ledger records the uptime of a working node within a few seconds: a history row to check
    wait_for("a history row", Duration::from_secs(20), async || {
        let rows = check(&c, &doc, "get", "/api/history", "/api/history", ok).await;
        if rows.as_array().is_some_and(|r| !r.is_empty()) {
            Ok(())
        } else {
            Err(rows.to_string())
        }
    })
    .await;

    // the event stream's first frame (the status), and then an event from a pause
    let url = format!("ws://{}/api/events?token={}", server.addr(), server.token());
    let (mut ws, _) = tokio_tungstenite::connect_async(url.as_str()).await.unwrap();
    let frames = &doc["paths"]["/api/events"]["get"]["x-websocket-frames"];
    let first = next_frame(&mut ws).await;
    assert_eq!(first["type"], "status", "{first}");
    validate(&doc, frames, &first, "$").unwrap_or_else(|e| panic!("{e}\n{first:#}"));
    assert_eq!(
        c.send(Method::POST, "/api/pause", None, true).await.0,
        StatusCode::OK
    );
    loop {
        let frame = next_frame(&mut ws).await;
        validate(&doc, frames, &frame, "$").unwrap_or_else(|e| panic!("{e}\n{frame:#}"));
        if frame["type"] == "event" {
            assert_eq!(frame["event"], "paused", "{frame}");
            break;
        }
    }

    // side-effect-free GETs (the node is paused now, with telemetry and a logged event)
    let status = check(&c, &doc, "get", "/api/status", "/api/status", ok).await;
    assert_eq!(status["state"], "paused");
    assert!(status["telemetry"].is_object(), "{status}");
    check(&c, &doc, "get", "/api/policy", "/api/policy", ok).await;
    check(&c, &doc, "get", "/api/machine", "/api/machine", ok).await;
    let device = check(&c, &doc, "get", "/api/device", "/api/device", ok).await;
    assert_eq!(device["device"], "auto", "{device}");
    let cards = check(&c, &doc, "get", "/api/experiments", "/api/experiments", ok).await;
    assert!(!cards.as_array().unwrap().is_empty(), "{cards}");
    let show = format!("/api/experiments/{LOCAL_DEMO_ID}");
    check(&c, &doc, "get", "/api/experiments/{id}", &show, ok).await;
    check(&c, &doc, "get", "/api/contributions", "/api/contributions", ok).await;
    check(
        &c,
        &doc,
        "get",
        "/api/contributions",
        "/api/contributions?experiment=x&from=0&to=1",
        ok,
    )
    .await;
    check(&c, &doc, "get", "/api/history", "/api/history?bucket=day", ok).await;
    let log = check(&c, &doc, "get", "/api/log", "/api/log", ok).await;
    assert!(
        log.as_array().unwrap().iter().any(|e| e["event"] == "paused"),
        "{log}"
    );
    check(&c, &doc, "get", "/api/log", "/api/log?limit=1", ok).await;

    // errors
    let bad = StatusCode::BAD_REQUEST;
    check_with(
        &c,
        &doc,
        "get",
        "/api/status",
        "/api/status",
        StatusCode::UNAUTHORIZED,
        false,
    )
    .await;
    check(&c, &doc, "get", "/api/history", "/api/history?bucket=week", bad).await;
    check(
        &c,
        &doc,
        "get",
        "/api/contributions",
        "/api/contributions?from=yesterday",
        bad,
    )
    .await;
    check(&c, &doc, "get", "/api/log", "/api/log?limit=many", bad).await;
    check(&c, &doc, "get", "/api/events", "/api/events", bad).await;
    let missing = "/api/experiments/no-such-experiment";
    check(
        &c,
        &doc,
        "get",
        "/api/experiments/{id}",
        missing,
        StatusCode::NOT_FOUND,
    )
    .await;
    let e = check(
        &c,
        &doc,
        "post",
        "/api/experiments/{id}/leave",
        &format!("{missing}/leave"),
        StatusCode::CONFLICT,
    )
    .await;
    assert_eq!(e["code"], "not_joined");

    // a stopped node
    node.shutdown().await.unwrap();
    let e = check(
        &c,
        &doc,
        "post",
        "/api/pause",
        "/api/pause",
        StatusCode::SERVICE_UNAVAILABLE,
    )
    .await;
    assert_eq!(e["code"], "stopped");
    server.shutdown().await;
}

type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn next_frame(ws: &mut Ws) -> Value {
    loop {
        let message = tokio::time::timeout(Duration::from_secs(20), ws.next())
            .await
            .expect("a frame in time")
            .expect("the stream open")
            .unwrap();
        match message {
            Message::Text(t) => return serde_json::from_str(t.as_str()).unwrap(),
            Message::Ping(_) | Message::Pong(_) => {}
            other => panic!("unexpected frame {other:?}"),
        }
    }
}

/// A plain HTTP client. A workspace build unifies reqwest with the desktop app's updater, which turns on
/// rustls without a crypto provider: install ring's first (a no-op once installed or without rustls).
fn http_client() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::new()
}
