//! Shared by the integration tests: where the golden files are and how to run real hivemind.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::Command;

pub use apiary_testkit::{hivemind_python, interop_dir};

/// `crates/wire/tests/golden`, the committed vectors made by `tests/interop/golden.py`.
pub fn golden_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden")
}

/// A committed golden JSON file, `golden_dir()/REL`.
pub fn golden_json(rel: &str) -> serde_json::Value {
    let path = golden_dir().join(rel);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Bytes of a golden hex string.
pub fn unhex(s: &str) -> Vec<u8> {
    assert!(s.len().is_multiple_of(2), "odd hex {s}");
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("golden hex"))
        .collect()
}

/// Lower-case hex of `b`, as the golden files write bytes.
pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Runs `tests/interop/golden.py ARGS…` in the hivemind venv and returns its stdout; panics with
/// its stderr when it fails.
pub fn run_golden_py(args: &[&str]) -> String {
    let out = Command::new(hivemind_python())
        .arg(interop_dir().join("golden.py"))
        .args(args)
        .output()
        .expect("could not start the hivemind venv's python");
    assert!(
        out.status.success(),
        "golden.py {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("golden.py prints UTF-8")
}
