//! Running the real `apiary` binary and real hivemind peers from tests.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

use apiary_testkit::hivemind_oneshot;
use serde_json::Value;

pub const APIARY: &str = env!("CARGO_BIN_EXE_apiary");

/// A running `apiary --json -q ARGS… --host-maddrs /ip4/127.0.0.1/tcp/0`, killed on drop.
pub struct Node {
    pub child: Child,
    pub ready: Value,
}

impl Node {
    pub fn start(args: &[&str]) -> Node {
        let mut child = Command::new(APIARY)
            .args(["--json", "-q"])
            .args(args)
            .args(["--host-maddrs", "/ip4/127.0.0.1/tcp/0"])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("apiary starts");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("stdout"))
            .read_line(&mut line)
            .expect("ready line");
        let ready: Value =
            serde_json::from_str(&line).unwrap_or_else(|e| panic!("bad ready line {line:?}: {e}"));
        assert_eq!(ready["event"], "ready");
        Node { child, ready }
    }

    pub fn maddr(&self) -> String {
        self.ready["maddrs"][0].as_str().expect("maddrs").to_owned()
    }

    /// SIGTERM, then the exit status.
    pub fn terminate(mut self) -> std::process::ExitStatus {
        let pid = self.child.id().to_string();
        Command::new("kill").args(["-TERM", &pid]).status().expect("kill");
        let status = self.child.wait().expect("wait");
        std::mem::forget(self);
        status
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `apiary --json ARGS…`: its one result line, or panics with stderr.
pub fn apiary(args: &[&str]) -> Value {
    let out = Command::new(APIARY)
        .arg("--json")
        .arg("-q")
        .args(args)
        .output()
        .expect("apiary runs");
    assert!(
        out.status.success(),
        "apiary {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).expect("utf-8");
    assert_eq!(stdout.lines().count(), 1, "one result line, got {stdout:?}");
    serde_json::from_str(stdout.trim()).expect("JSON result")
}

/// `hivemind_peer.py MODE ARGS…` one-shot: its result line.
pub fn hivemind(mode: &str, args: &[&str]) -> Value {
    let last = hivemind_oneshot(&[&[mode][..], args].concat());
    assert_eq!(last["event"], "result", "hivemind {mode} failed: {last}");
    last
}
