//! `apiary publish` and `apiary experiments list|show|join|leave`, run as the real binary on loopback: a
//! publisher's experiment appears in the catalog and is withdrawn when it stops; `apiary demo` publishes
//! its own experiment, which `join` adds a volunteer to (the demo's trainer then sends it traffic) and
//! `leave` takes it away; real hivemind 1.1.12 peers read the catalog and cannot overwrite an entry.

#![allow(clippy::unwrap_used)] // test helpers as well as tests

mod common;

use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use apiary_testkit::{HivemindPeer, hivemind_python, interop_dir};
use apiary_wire::signature::RsaPublicKey;
use common::APIARY;
use serde_json::Value;

const LOOPBACK: &str = "/ip4/127.0.0.1/tcp/0";

/// A long-running `apiary --json -q ARGS…` whose stdout lines (JSON) are read by a thread as they come,
/// so the process never blocks on a full pipe; killed (and reaped) on drop, also when a test panics.
struct Proc {
    name: String,
    child: Child,
    lines: mpsc::Receiver<Value>,
}

impl Proc {
    fn spawn(args: &[&str]) -> Proc {
        let mut child = Command::new(APIARY)
            .args(["--json", "-q"])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("apiary starts");
        let stdout = child.stdout.take().unwrap();
        // bounded: the demo's many `step` lines are dropped once nobody reads them, the rest wait
        let (tx, lines) = mpsc::sync_channel(1024);
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let value: Value = serde_json::from_str(&line)
                    .unwrap_or_else(|_| Value::String(format!("(not JSON) {line}")));
                let sent = if value["event"] == "step" {
                    !matches!(tx.try_send(value), Err(mpsc::TrySendError::Disconnected(_)))
                } else {
                    tx.send(value).is_ok()
                };
                if !sent {
                    break;
                }
            }
        });
        Proc {
            name: format!("apiary {}", args[..args.len().min(3)].join(" ")),
            child,
            lines,
        }
    }

    /// The first line from now on that `pred` accepts, within `timeout`; panics on timeout or exit.
    fn wait_for(&self, timeout: Duration, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + timeout;
        let mut last = Value::Null;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if pred(&line) => return line,
                Ok(line) => last = line,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    panic!(
                        "`{}`: no {what} within {timeout:?} (last line: {last})",
                        self.name
                    )
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    panic!("`{}` ended before {what} (last line: {last})", self.name)
                }
            }
        }
    }

    /// Its `ready` line.
    fn ready(&self, timeout: Duration) -> Value {
        self.wait_for(timeout, "ready line", |l| l["event"] == "ready")
    }

    /// Its exit status within `timeout` (panics, and the drop kills it, when it lingers).
    fn exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "`{}` did not exit within {timeout:?}",
                self.name
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// SIGTERM (what Ctrl-C or a service manager sends), then its exit status.
    fn terminate(&mut self, timeout: Duration) -> ExitStatus {
        let pid = self.child.id().to_string();
        let sent = Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        assert!(sent.success(), "kill -TERM {pid}");
        self.exit(timeout)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What a one-shot `apiary` printed.
struct Ran {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

impl Ran {
    /// Its one JSON result line; panics with stderr when it failed.
    fn json(&self) -> Value {
        assert!(self.status.success(), "failed: {}", self.stderr);
        serde_json::from_str(self.stdout.trim())
            .unwrap_or_else(|e| panic!("not one JSON line ({e}): {:?}", self.stdout))
    }

    /// Asserts it failed with a message that holds every one of `words`.
    fn fails_with(&self, words: &[&str]) {
        assert!(
            !self.status.success(),
            "should have failed; printed {:?}",
            self.stdout
        );
        for w in words {
            assert!(self.stderr.contains(w), "no `{w}` in {:?}", self.stderr);
        }
    }
}

/// `apiary --json -q ARGS…` to completion, killed (and the test failed) after `timeout`.
fn run(args: &[&str], timeout: Duration) -> Ran {
    run_in(Path::new("."), args, timeout)
}

/// [`run`] in the folder `cwd`.
fn run_in(cwd: &Path, args: &[&str], timeout: Duration) -> Ran {
    let mut child = Command::new(APIARY)
        .current_dir(cwd)
        .args(["--json", "-q"])
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("apiary starts");
    let drain = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut s = String::new();
            let _ = r.read_to_string(&mut s);
            s
        })
    };
    let out = drain(Box::new(child.stdout.take().unwrap()));
    let err = drain(Box::new(child.stderr.take().unwrap()));
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("apiary {args:?} did not finish within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    Ran {
        status,
        stdout: out.join().unwrap(),
        stderr: err.join().unwrap(),
    }
}

const ONE_SHOT: Duration = Duration::from_secs(60);
const HIVEMIND_ONE_SHOT: Duration = Duration::from_secs(60);

/// `--initial-peers BOOT` (when given), loopback, and `--data-dir DIR`.
fn browse_args<'a>(boot: Option<&'a str>, data_dir: &'a str) -> Vec<&'a str> {
    let mut a = Vec::new();
    if let Some(b) = boot {
        a.extend(["--initial-peers", b]);
    }
    a.extend(["--host-maddrs", LOOPBACK, "--data-dir", data_dir]);
    a
}

/// `apiary experiments list`: its result (`experiments`, `refused`, `dht`).
fn list(boot: Option<&str>, data_dir: &str) -> Value {
    run(
        &[&["experiments", "list"][..], &browse_args(boot, data_dir)].concat(),
        ONE_SHOT,
    )
    .json()
}

/// The card of `id` from `source` ("dht" or "bundled") in a list result.
fn card<'a>(listed: &'a Value, id: &str, source: &str) -> Option<&'a Value> {
    listed["experiments"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["id"] == id && c["source"] == source)
}

/// Polls `probe` until it gives a value, for at most `timeout`.
fn poll<T>(timeout: Duration, what: &str, mut probe: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = probe() {
            return v;
        }
        assert!(Instant::now() < deadline, "no {what} within {timeout:?}");
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// A publisher key made with `apiary keys new`: its OpenSSH public key and fingerprint.
fn new_key(path: &Path) -> (String, String) {
    let path = path.to_str().unwrap();
    run(&["keys", "new", path], ONE_SHOT).json();
    let public = run(&["keys", "show", path], ONE_SHOT).json()["public_key"]
        .as_str()
        .unwrap()
        .to_owned();
    let key = RsaPublicKey::from_openssh(public.as_bytes()).unwrap();
    (public, apiary_catalog::fingerprint(&key))
}

/// `hivemind_peer.py MODE ARGS…` one-shot (as `common::hivemind`, but killed and failed after `timeout`
/// instead of hanging the test): its `result` line.
fn hivemind(mode: &str, args: &[&str], timeout: Duration) -> Value {
    let mut child = Command::new(hivemind_python())
        .arg(interop_dir().join("hivemind_peer.py"))
        .arg(mode)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("hivemind_peer.py starts");
    let mut stdout = child.stdout.take().unwrap();
    let out = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + timeout;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("hivemind {mode} {args:?} did not finish within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = out.join().unwrap();
    let last = out
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str::<Value>(l).ok())
        .unwrap_or_else(|| panic!("hivemind {mode} printed no JSON: {out}"));
    assert_eq!(last["event"], "result", "hivemind {mode} failed: {last}");
    last
}

const TITLE: &str = "CLI test: a small grid";
const GRID_EXPERTS: u64 = 6;

/// A manifest shaped like `assets/catalog/local-demo.toml`: experiment `id`, a 2 × 3 grid, the publisher
/// key `public_key` (empty: filled in from --key), created and expires 0 (now, and thirty days on).
fn manifest(id: &str, public_key: &str) -> String {
    format!(
        r#"schema_version = 1
id = "{id}"
title = "{TITLE}"
summary = "Published by apiary's CLI tests."
description = "A 2 × 3 grid of small ffn experts."
created = 0
expires = 0
status = "training"
uid_prefix = "ffn_cli_test."
grid = [2, 3]

[publisher]
name = "Apiary CLI tests"
public_key = "{public_key}"

[expert]
kind = "ffn"
hidden_dim = 32
max_batch_size = 1024
optimizer = {{ name = "adam", lr = 0.001 }}

[requirements]
min_ram_mb_per_expert = 4
min_vram_mb_per_expert = 0
bandwidth_mbps = 0
disk_mb = 1
"#
    )
}

/// `apiary publish MANIFEST --key KEY`, running (checked against its ready line).
fn publish(manifest: &Path, key: &Path, boot: Option<&str>, id: &str, fp: &str) -> (Proc, Value) {
    let mut args = vec![
        "publish",
        manifest.to_str().unwrap(),
        "--key",
        key.to_str().unwrap(),
        "--update-period",
        "2",
        "--host-maddrs",
        LOOPBACK,
    ];
    if let Some(b) = boot {
        args.extend(["--initial-peers", b]);
    }
    let publisher = Proc::spawn(&args);
    let ready = publisher.ready(Duration::from_secs(60));
    assert_eq!(ready["experiment"], id, "{ready}");
    assert_eq!(ready["publisher"], fp, "{ready}");
    (publisher, ready)
}

/// A published manifest is listed from the DHT with its publisher's fingerprint, fit and need, beside the
/// bundled catalog; `show` plans a join; SIGTERM withdraws it at once. A manifest naming another key than
/// --key, and a malformed one, are refused with a clear message.
#[test]
fn publish_list_show_and_withdraw() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let data = data.to_str().unwrap();
    let key = dir.path().join("publisher.key");
    let (public, fp) = new_key(&key);
    assert_eq!(fp.len(), 16);
    assert!(fp.chars().all(|c| c.is_ascii_hexdigit()), "{fp}");
    let id = "cli-test-grid";
    let path = dir.path().join("experiment.toml");
    std::fs::write(&path, manifest(id, "")).unwrap();

    let boot = Proc::spawn(&["dht", "--host-maddrs", LOOPBACK]);
    let boot_maddr = boot.ready(Duration::from_secs(30))["maddrs"][0]
        .as_str()
        .unwrap()
        .to_owned();
    let (mut publisher, _) = publish(&path, &key, Some(&boot_maddr), id, &fp);

    let listed = poll(Duration::from_secs(30), "DHT card", || {
        let l = list(Some(&boot_maddr), data);
        card(&l, id, "dht").is_some().then_some(l)
    });
    assert_eq!(listed["dht"], true);
    assert_eq!(listed["refused"], serde_json::json!([]));
    let c = card(&listed, id, "dht").unwrap();
    assert_eq!(c["fingerprint"], fp.as_str(), "{c}");
    assert_eq!(c["publisher"], "Apiary CLI tests");
    assert_eq!(c["manifest"]["title"], TITLE);
    assert_eq!(
        c["manifest"]["publisher"]["public_key"],
        public.as_str(),
        "the empty key was filled in from --key"
    );
    assert!(c["manifest"]["created"].as_u64().unwrap() > 1_600_000_000);
    assert!(c["manifest"]["expires"].as_u64().unwrap() > c["manifest"]["created"].as_u64().unwrap());
    assert!(c["fit"]["level"].as_str().is_some_and(|l| !l.is_empty()), "{c}");
    assert_eq!(c["need"]["grid_experts"], GRID_EXPERTS);
    assert_eq!(c["volunteers"], 0);
    assert_eq!(c["covered"], 0);
    let demo = card(&listed, "local-demo", "bundled").expect("the bundled demo card");
    assert_eq!(demo["fingerprint"], Value::Null);
    assert!(card(&listed, "local-demo", "dht").is_none());

    let shown = run(
        &[
            &["experiments", "show", id][..],
            &browse_args(Some(&boot_maddr), data),
        ]
        .concat(),
        ONE_SHOT,
    )
    .json();
    assert_eq!(shown["experiment"]["id"], id);
    assert_eq!(shown["experiment"]["source"], "dht");
    let uids = shown["plan"]["uids"]
        .as_array()
        .unwrap_or_else(|| panic!("a plan with uids: {}", shown["plan"]));
    assert!(!uids.is_empty() && uids.len() as u64 <= GRID_EXPERTS, "{uids:?}");
    assert!(
        uids.iter()
            .all(|u| u.as_str().unwrap().starts_with("ffn_cli_test.")),
        "{uids:?}"
    );

    // SIGTERM: the publisher withdraws its entry before it exits, so the next list no longer has it
    assert!(publisher.terminate(Duration::from_secs(30)).success());
    let after = list(Some(&boot_maddr), data);
    assert!(
        card(&after, id, "dht").is_none(),
        "withdrawn at once: {}",
        after["experiments"]
    );
    assert!(card(&after, "local-demo", "bundled").is_some());

    // another publisher's key in the manifest
    let (other_public, other_fp) = new_key(&dir.path().join("other.key"));
    let theirs = dir.path().join("theirs.toml");
    std::fs::write(&theirs, manifest(id, &other_public)).unwrap();
    let args = |m: &Path| {
        vec![
            "publish".to_owned(),
            m.to_str().unwrap().to_owned(),
            "--key".into(),
            key.to_str().unwrap().into(),
            "--initial-peers".into(),
            boot_maddr.clone(),
            "--host-maddrs".into(),
            LOOPBACK.into(),
        ]
    };
    let a = args(&theirs);
    let a: Vec<&str> = a.iter().map(String::as_str).collect();
    run(&a, ONE_SHOT).fails_with(&["another publisher key", &other_fp, &fp]);

    // a malformed manifest names the problem
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, manifest(id, "").replace("grid = [2, 3]", "grid = \"2x3\"")).unwrap();
    let a = args(&bad);
    let a: Vec<&str> = a.iter().map(String::as_str).collect();
    run(&a, ONE_SHOT).fails_with(&["malformed", "grid"]);
    let a = args(&dir.path().join("missing.toml"));
    let a: Vec<&str> = a.iter().map(String::as_str).collect();
    run(&a, ONE_SHOT).fails_with(&["missing.toml"]);
}

/// Without bootstrap peers `list` shows the bundled catalog, and joining the local demo says to start
/// `apiary demo`.
#[test]
fn list_without_peers_shows_the_bundled_catalog() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_str().unwrap();
    let listed = list(None, data);
    assert_eq!(listed["dht"], false, "nobody to ask");
    let demo = card(&listed, "local-demo", "bundled").expect("the bundled demo card");
    assert_eq!(demo["fingerprint"], Value::Null);
    assert_eq!(demo["volunteers"], 0);
    assert_eq!(demo["need"]["grid_experts"], 32);
    assert!(
        listed["experiments"]
            .as_array()
            .unwrap()
            .iter()
            .all(|c| c["source"] == "bundled"),
        "{}",
        listed["experiments"]
    );

    // a relative --data-dir that does not exist yet counts the free disk space of the folder it is in
    let relative = run_in(
        dir.path(),
        &[
            "experiments",
            "list",
            "--host-maddrs",
            LOOPBACK,
            "--data-dir",
            "not/yet",
        ],
        ONE_SHOT,
    )
    .json();
    let relative = card(&relative, "local-demo", "bundled").unwrap();
    assert_eq!(
        relative["fit"]["level"], demo["fit"]["level"],
        "{}",
        relative["fit"]
    );

    let shown = run(
        &[
            &["experiments", "show", "local-demo"][..],
            &browse_args(None, data),
        ]
        .concat(),
        ONE_SHOT,
    )
    .json();
    assert_eq!(shown["experiment"]["source"], "bundled");
    assert_eq!(shown["plan"], Value::Null, "nothing to plan from");

    run(
        &[
            &["experiments", "join", "local-demo"][..],
            &browse_args(None, data),
        ]
        .concat(),
        ONE_SHOT,
    )
    .fails_with(&["apiary demo"]);
    assert!(
        !dir.path().join("joined/local-demo.json").exists(),
        "a failed join records nothing"
    );
    run(
        &["experiments", "leave", "local-demo", "--data-dir", data],
        ONE_SHOT,
    )
    .fails_with(&["not joined"]);
}

/// The issue's acceptance: `apiary demo` publishes its own experiment into its local swarm, so
/// `apiary experiments list --initial-peers …` pointed at a running demo lists it, and `join` adds a
/// volunteer to it that the demo's trainer sends traffic to; `leave` takes it away again.
#[test]
fn join_a_running_demo_then_leave() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_str().unwrap();
    // the debug binary trains slowly: many steps keep the trainer busy for the whole test
    let demo = Proc::spawn(&["demo", "--steps", "100000", "--kill-after", "0", "--keep-running"]);
    let published = demo.wait_for(Duration::from_secs(90), "published event", |l| {
        l["event"] == "published"
    });
    assert_eq!(published["experiment"], "local-demo");
    let fp = published["fingerprint"].as_str().unwrap().to_owned();
    let boot = published["bootstrap"][0].as_str().unwrap().to_owned();
    let boot = Some(boot.as_str());

    let live = poll(
        Duration::from_secs(60),
        "demo card with 3 volunteers and a live step",
        || {
            let l = list(boot, data);
            let c = card(&l, "local-demo", "dht")?.clone();
            (c["volunteers"] == 3
                && c["covered"] == c["need"]["grid_experts"]
                && c["live"]["step"].as_u64().is_some_and(|s| s > 0))
            .then_some(c)
        },
    );
    assert_eq!(live["fingerprint"], fp.as_str());
    assert_eq!(live["need"]["grid_experts"], 32);
    assert_eq!(live["covered"], 32);
    assert_eq!(live["live"]["grid_experts"], 32);

    // Every expert already has a volunteer, so `join` plans replicas. A uid's declaration is hivemind's
    // single `uid → peer` record, and the one with the latest expiration wins: with `--update-period 1`
    // (expiration 3 s) the demo's volunteers (expiration 10 s) always win and the trainer never calls the
    // new replicas. 6 s (expiration 12 s) wins most of the time.
    let mut join = Proc::spawn(
        &[
            &[
                "experiments",
                "join",
                "local-demo",
                "--max-experts",
                "4",
                "--update-period",
                "6",
            ][..],
            &browse_args(boot, data),
        ]
        .concat(),
    );
    let ready = join.ready(Duration::from_secs(60));
    assert_eq!(ready["experiment"], "local-demo");
    assert_eq!(ready["publisher"], fp.as_str());
    let uids = ready["plan"]["uids"].as_array().unwrap().clone();
    assert_eq!(uids.len(), 4, "{}", ready["plan"]);
    assert!(uids.iter().all(|u| u.as_str().unwrap().starts_with("ffn_demo.")));
    assert!(dir.path().join("joined/local-demo.json").exists());

    poll(Duration::from_secs(30), "a fourth volunteer", || {
        let l = list(boot, data);
        (card(&l, "local-demo", "dht")?["volunteers"] == 4).then_some(())
    });
    let served = join.wait_for(
        Duration::from_secs(90),
        "forward and backward samples served",
        |l| {
            l["event"] == "hosting"
                && l["forward_samples"].as_u64().is_some_and(|n| n > 0)
                && l["backward_samples"].as_u64().is_some_and(|n| n > 0)
        },
    );
    assert_eq!(served["experiment"], "local-demo");

    run(
        &[
            &["experiments", "join", "local-demo"][..],
            &browse_args(boot, data),
        ]
        .concat(),
        ONE_SHOT,
    )
    .fails_with(&["already joined", "apiary experiments leave local-demo"]);

    let left = run(
        &["experiments", "leave", "local-demo", "--data-dir", data],
        ONE_SHOT,
    )
    .json();
    assert_eq!(left["event"], "left");
    assert_eq!(left["uids"], Value::Array(uids));
    let goodbye = join.wait_for(Duration::from_secs(30), "left event", |l| l["event"] == "left");
    assert_eq!(goodbye["reason"], "leave requested");
    assert!(goodbye["forward_samples"].as_u64().unwrap() >= served["forward_samples"].as_u64().unwrap());
    assert!(join.exit(Duration::from_secs(30)).success());
    assert!(!dir.path().join("joined/local-demo.json").exists());

    poll(Duration::from_secs(30), "the volunteers back to 3", || {
        let l = list(boot, data);
        (card(&l, "local-demo", "dht")?["volunteers"] == 3).then_some(())
    });
    drop(demo);
}

/// A real hivemind peer reads a catalog entry (the owned sub-key, the signed manifest as JSON text), and
/// cannot overwrite it: a hivemind DHT node running hivemind's own `RSASignatureValidator` and the
/// publisher's node both refuse the unsigned store, and the catalog keeps the original.
#[test]
fn hivemind_reads_the_catalog() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let data = data.to_str().unwrap();
    let key = dir.path().join("publisher.key");
    let (public, fp) = new_key(&key);
    let id = "cli-test-interop";
    let path = dir.path().join("experiment.toml");
    std::fs::write(&path, manifest(id, "")).unwrap();
    // the publisher's node is the bootstrap; a hivemind DHT node with hivemind's RSA validator joins it
    let (_publisher, ready) = publish(&path, &key, None, id, &fp);
    let boot = ready["maddrs"][0].as_str().unwrap().to_owned();
    let hm = HivemindPeer::spawn(
        "dht",
        &["--initial-peers", &boot, "--rsa-validator"],
        Duration::from_secs(120),
    );
    let hm_maddr = hm.maddr().to_owned();

    // hivemind reads owned records with its RSA validator, which strips the signature it appends to the
    // value (without it, hivemind's own msgpack decoding of the value fails)
    let got = hivemind(
        "dht-get",
        &[
            "--initial-peers",
            &hm_maddr,
            "--key",
            "apiary.catalog.v1",
            "--rsa-validator",
        ],
        HIVEMIND_ONE_SHOT,
    );
    assert_eq!(got["found"], true, "{got}");
    assert_eq!(got["kind"], "dictionary");
    let entries = got["value"].as_object().unwrap();
    let ours: Vec<(&String, &Value)> = entries
        .iter()
        .filter(|(k, _)| k.starts_with(&format!("{id}[owner:ssh-rsa ")))
        .collect();
    assert_eq!(ours.len(), 1, "{entries:?}");
    let (subkey, value) = ours[0];
    assert_eq!(*subkey, format!("{id}[owner:{public}]"));
    let text = value.as_str().expect("the value is JSON text");
    let signed: Value = serde_json::from_str(text).unwrap();
    assert_eq!(signed["manifest"]["id"], id);
    assert_eq!(signed["manifest"]["title"], TITLE);
    assert_eq!(signed["manifest"]["publisher"]["public_key"], public.as_str());
    assert!(signed["signature"].is_object(), "{signed}");

    // hivemind tries to replace the entry with a longer-lived one; it cannot sign for our key
    let forged = text.replace(TITLE, "Hijacked");
    assert_ne!(forged, text);
    let stored = hivemind(
        "dht-store",
        &[
            "--initial-peers",
            &hm_maddr,
            "--key",
            "apiary.catalog.v1",
            "--subkey",
            &serde_json::to_string(subkey).unwrap(),
            "--value",
            &serde_json::to_string(&forged).unwrap(),
            "--ttl",
            "600",
            "--rsa-validator",
        ],
        HIVEMIND_ONE_SHOT,
    );
    assert_eq!(
        stored["ok"], false,
        "no node (hivemind's validator, Apiary's) takes an unsigned owned entry"
    );
    let listed = list(Some(&boot), data);
    let c = card(&listed, id, "dht").expect("still listed");
    assert_eq!(c["manifest"]["title"], TITLE);
    assert_eq!(c["fingerprint"], fp.as_str());
    let again = hivemind(
        "dht-get",
        &[
            "--initial-peers",
            &hm_maddr,
            "--key",
            "apiary.catalog.v1",
            "--rsa-validator",
        ],
        HIVEMIND_ONE_SHOT,
    );
    let kept: Value = serde_json::from_str(again["value"][subkey].as_str().unwrap()).unwrap();
    assert_eq!(kept["manifest"]["title"], TITLE);
}

/// `apiary node run`: the headless volunteer node joins a published experiment, works (a first run starts
/// paused; `--resume` starts it), reports its status and events, and leaves cleanly on SIGTERM while
/// remembering what it joined.
#[test]
fn node_run_joins_and_hosts_until_terminated() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("node-data");
    let key = dir.path().join("publisher.key");
    let (_public, fp) = new_key(&key);
    let id = "cli-node-grid";
    let path = dir.path().join("experiment.toml");
    std::fs::write(&path, manifest(id, "")).unwrap();
    let (_publisher, ready) = publish(&path, &key, None, id, &fp);
    let boot = ready["maddrs"][0].as_str().unwrap().to_owned();

    let config = dir.path().join("node.toml");
    let mut node = Proc::spawn(&[
        "node",
        "run",
        "--config",
        config.to_str().unwrap(),
        "--data-dir",
        data.to_str().unwrap(),
        "--host-maddrs",
        LOOPBACK,
        "--initial-peers",
        &boot,
        "--join",
        id,
        "--resume",
        "--api-bind",
        "127.0.0.1:0",
        "--mode",
        "quiet",
    ]);
    let api = node.wait_for(Duration::from_secs(60), "api line", |l| l["event"] == "api");
    let token_file = std::path::PathBuf::from(api["token_file"].as_str().unwrap());
    let token = std::fs::read_to_string(&token_file).unwrap();
    assert_eq!(token.trim().len(), 64, "a 32-byte hex token");
    assert!(
        api["url"].as_str().unwrap().starts_with("http://127.0.0.1:"),
        "{api}"
    );
    let ready = node.ready(Duration::from_secs(60));
    assert_eq!(ready["state"], "paused", "a first run starts paused: {ready}");
    assert!(
        !format!("{api}{ready}").contains(token.trim()),
        "the token never goes to stdout"
    );
    // --resume comes first, then the join; the node prints the status change and the joined event in
    // either order
    let working =
        |l: &Value| l["event"] == "status" && (l["state"] == "running" || l["state"] == "throttled");
    let first = node.wait_for(Duration::from_secs(60), "working status or joined event", |l| {
        working(l) || l["event"] == "joined"
    });
    let joined = if working(&first) {
        node.wait_for(Duration::from_secs(60), "joined event", |l| {
            l["event"] == "joined"
        })
    } else {
        node.wait_for(Duration::from_secs(60), "working status", working);
        first
    };
    let uids = joined["uids"].as_array().unwrap();
    assert!(!uids.is_empty() && uids.len() as u64 <= GRID_EXPERTS, "{joined}");
    // the experiment's roster now lists this node
    let listed = poll(Duration::from_secs(30), "a volunteer in the catalog", || {
        let l = list(Some(&boot), dir.path().join("browse").to_str().unwrap());
        card(&l, id, "dht").filter(|c| c["volunteers"] == 1).cloned()
    });
    assert_eq!(listed["covered"].as_u64().unwrap(), uids.len() as u64);

    // the running node answers `apiary node …` through its local API (URL and token from its data folder)
    let at = [
        "--config",
        config.to_str().unwrap(),
        "--data-dir",
        data.to_str().unwrap(),
    ];
    let node_cmd = |args: &[&str]| run(&[&["node"][..], args, &at].concat(), ONE_SHOT);
    let status = node_cmd(&["status"]).json();
    assert_eq!(status["event"], "status", "{status}");
    assert_eq!(status["experiments"][0]["id"], id, "{status}");
    let settings = || std::fs::read_to_string(&config).unwrap_or_default();
    assert!(
        settings().contains("mode = \"quiet\""),
        "--mode is kept: {}",
        settings()
    );
    let paused = node_cmd(&["pause"]).json();
    assert_eq!(paused["state"], "paused", "{paused}");
    let snoozed = node_cmd(&["snooze", "1h"]).json();
    assert_eq!(snoozed["state"], "paused", "{snoozed}");
    let until = node_cmd(&["status"]).json()["until"]
        .as_f64()
        .expect("a snooze has an end");
    let in_an_hour = until
        - std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
    assert!((3500.0..3700.0).contains(&in_an_hour), "{in_an_hour}");
    node_cmd(&["snooze", "1w"]).fails_with(&["unit"]);
    // nothing is due to start because you are away: calling it off changes nothing
    let called_off = node_cmd(&["cancel-start"]).json();
    assert_eq!(called_off["state"], "paused", "{called_off}");
    let resumed = node_cmd(&["resume"]).json();
    assert!(
        resumed["state"] == "running" || resumed["state"] == "throttled",
        "{resumed}"
    );
    node_cmd(&["mode", "max"]).json();
    assert!(settings().contains("mode = \"max\""), "{}", settings());
    assert!(
        !settings().contains("initial_peers = [\"/ip4"),
        "command-line overrides stay out of the settings file: {}",
        settings()
    );
    let log = node_cmd(&["log", "--limit", "100"]);
    assert!(log.status.success(), "{}", log.stderr);
    let kinds: Vec<String> = log
        .stdout
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["event"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    for want in ["joined", "paused", "resumed"] {
        assert!(kinds.iter().any(|k| k == want), "no {want} in {kinds:?}");
    }

    let status = node.terminate(Duration::from_secs(60));
    assert!(status.success(), "apiary node run exits 0 on SIGTERM: {status:?}");
    let remembered = std::fs::read_to_string(data.join("joined.json")).unwrap();
    assert!(remembered.contains(id), "{remembered}");
    // left cleanly: the roster entry is withdrawn at once
    let after = list(Some(&boot), dir.path().join("browse").to_str().unwrap());
    assert_eq!(card(&after, id, "dht").unwrap()["volunteers"], 0, "{after}");
    // no node runs there any more: a clear error
    node_cmd(&["status"]).fails_with(&["no node is running"]);
}
