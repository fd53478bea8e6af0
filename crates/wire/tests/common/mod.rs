//! Shared by the integration tests: where the golden files are and how to run real hivemind.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::Command;

pub use apiary_testkit::{hivemind_python, interop_dir};

/// `crates/wire/tests/golden`, the committed vectors made by `tests/interop/golden.py`.
pub fn golden_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden")
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
