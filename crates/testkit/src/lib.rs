//! Test support shared by Apiary's crates: real hivemind 1.1.12 peers for interop tests.
//!
//! [`hivemind_python`] finds the cached venv that `cargo xtask test` (or `cargo xtask setup`) makes, and
//! [`HivemindPeer`] runs `tests/interop/hivemind_peer.py` in it, waits for its `ready` line and stops it
//! when dropped. Tests that need hivemind fail — they never skip — when the venv is missing.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// The workspace root.
pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// `tests/interop`: the hivemind peer harness and the golden-vector generator.
pub fn interop_dir() -> PathBuf {
    workspace_root().join("tests/interop")
}

/// The Python of the cached hivemind venv.
///
/// `APIARY_HIVEMIND_PYTHON` wins (set by `cargo xtask test`); otherwise the default cache location,
/// `${APIARY_CACHE_DIR:-${XDG_CACHE_HOME:-~/.cache}/apiary}/hivemind-venv`. Panics with the command that
/// makes the venv when it is missing.
pub fn hivemind_python() -> PathBuf {
    if let Some(p) = std::env::var_os("APIARY_HIVEMIND_PYTHON") {
        return PathBuf::from(p);
    }
    let cache = std::env::var_os("APIARY_CACHE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            std::env::var_os("XDG_CACHE_HOME")
                .map(PathBuf::from)
                .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
                .unwrap_or_else(std::env::temp_dir)
                .join("apiary")
        });
    let python = cache.join("hivemind-venv/bin/python");
    assert!(
        python.exists(),
        "this test runs real hivemind, but no venv was found at {}: run `cargo xtask setup` \
         (or `cargo xtask test`), or set APIARY_HIVEMIND_PYTHON",
        python.display()
    );
    python
}

/// A running `hivemind_peer.py` process (a real hivemind peer with its Go p2pd), stopped on drop.
#[derive(Debug)]
pub struct HivemindPeer {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<serde_json::Value>,
    /// The `ready` line: `peer_id`, `maddrs` and mode-specific fields.
    pub ready: serde_json::Value,
}

impl HivemindPeer {
    /// Starts `hivemind_peer.py MODE ARGS…` and waits up to `timeout` for its `ready` line.
    pub fn spawn(mode: &str, args: &[&str], timeout: Duration) -> Self {
        let mut child = Command::new(hivemind_python())
            .arg(interop_dir().join("hivemind_peer.py"))
            .arg(mode)
            .args(args)
            .arg("--stop-on-stdin-eof")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("could not start hivemind_peer.py");
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, lines) = mpsc::sync_channel(64);
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Ok(value) = serde_json::from_str::<serde_json::Value>(&line)
                    && tx.send(value).is_err()
                {
                    break;
                }
            }
        });
        let mut peer = Self {
            child,
            stdin,
            lines,
            ready: serde_json::Value::Null,
        };
        let deadline = std::time::Instant::now() + timeout;
        peer.ready = loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let line = peer.lines.recv_timeout(left).unwrap_or_else(|_| {
                panic!("hivemind peer `{mode}` printed no ready line within {timeout:?}")
            });
            match line["event"].as_str() {
                Some("ready") => break line,
                Some("error") => panic!("hivemind peer `{mode}` failed: {}", line["error"]),
                _ => {}
            }
        };
        peer
    }

    /// The peer's first full multiaddr (`/ip4/127.0.0.1/tcp/…/p2p/…`).
    pub fn maddr(&self) -> &str {
        self.ready["maddrs"][0].as_str().expect("ready line has maddrs")
    }

    /// The peer's id in base58.
    pub fn peer_id(&self) -> &str {
        self.ready["peer_id"].as_str().expect("ready line has peer_id")
    }

    /// The next JSON line the peer prints, if one comes within `timeout`.
    pub fn next_line(&self, timeout: Duration) -> Option<serde_json::Value> {
        self.lines.recv_timeout(timeout).ok()
    }
}

impl Drop for HivemindPeer {
    fn drop(&mut self) {
        // Closing stdin stops the peer (`--stop-on-stdin-eof`); kill it if it lingers.
        drop(self.stdin.take());
        for _ in 0..50 {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs a one-shot `hivemind_peer.py ARGS…` (e.g. `dht-get --initial-peers M --key K`) to completion and
/// returns the last JSON line it printed (its `result` or `error` event); panics when it printed none.
pub fn hivemind_oneshot<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> serde_json::Value {
    let out = Command::new(hivemind_python())
        .arg(interop_dir().join("hivemind_peer.py"))
        .args(args)
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .expect("could not start hivemind_peer.py");
    let stdout = String::from_utf8_lossy(&out.stdout);
    stdout
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .unwrap_or_else(|| {
            let shown: Vec<_> = args
                .iter()
                .map(|a| a.as_ref().to_string_lossy().into_owned())
                .collect();
            panic!("hivemind_peer.py {shown:?} printed no JSON: {stdout}")
        })
}
