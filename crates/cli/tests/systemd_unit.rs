//! `installers/linux/apiary-node.service`, the headless node as a systemd user service: systemd's own
//! checker accepts it (no warning) with the real `apiary` binary in place of `/usr/bin/apiary` (where
//! the .deb and .rpm put it), and its command line is one `apiary` understands. (`cargo xtask test`
//! also verifies it where the .deb installed it, beside the installed binary.)

#![allow(clippy::unwrap_used)]

use std::process::Command;

const APIARY: &str = env!("CARGO_BIN_EXE_apiary");
const UNIT: &str = include_str!("../../../installers/linux/apiary-node.service");
const INSTALLED_AT: &str = "/usr/bin/apiary";

#[test]
fn the_user_unit_passes_systemd_analyze_verify() {
    let exec = UNIT
        .lines()
        .find_map(|l| l.strip_prefix("ExecStart="))
        .expect("an ExecStart line");
    let args: Vec<&str> = exec
        .strip_prefix(INSTALLED_AT)
        .unwrap_or_else(|| panic!("ExecStart runs {INSTALLED_AT}: {exec}"))
        .split_whitespace()
        .collect();
    assert_eq!(args, ["node", "run"]);
    let help = Command::new(APIARY).args(&args).arg("--help").output().unwrap();
    assert!(help.status.success(), "{}", String::from_utf8_lossy(&help.stderr));

    let dir = tempfile::tempdir().unwrap();
    let unit = dir.path().join("apiary-node.service");
    std::fs::write(&unit, UNIT.replace(INSTALLED_AT, APIARY)).unwrap();
    let verify = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&unit)
        .output()
        .expect("systemd-analyze runs (the systemd package; `cargo xtask setup` installs it)");
    let complaints = String::from_utf8_lossy(&verify.stderr);
    assert!(
        verify.status.success() && complaints.trim().is_empty(),
        "systemd-analyze verify: {complaints}"
    );

    // and it does complain when something is wrong
    let broken = UNIT
        .replace(INSTALLED_AT, APIARY)
        .replace("Restart=on-failure", "Restart=sometimes");
    std::fs::write(&unit, broken).unwrap();
    let verify = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&unit)
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&verify.stderr).contains("restart specifier"),
        "{verify:?}"
    );
}
