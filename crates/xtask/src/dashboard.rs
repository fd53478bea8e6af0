//! The dashboard's and the desktop app's checks in `cargo xtask test`: install `ui/`'s locked npm
//! packages (downloads cached outside the clone), type-check and build it, run its Vitest suite, then
//! `tests/e2e/dashboard.mjs` (Debian's Chromium, driven by playwright-core, against the dashboard served
//! by a real `apiary node run` joined to a real `apiary demo` swarm) and `tests/e2e/desktop.mjs` (the
//! real `apiary-desktop` under Xvfb and a private D-Bus, driven through tauri-driver). Screenshots land
//! in `target/e2e/`.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::{root, setup, step};

/// Vite 8 needs Node.js 20.19 or later.
const NODE_MIN: (u32, u32) = (20, 19);

/// The browser the end-to-end test drives (the `chromium` package; never a downloaded one).
pub const CHROMIUM: &str = "/usr/bin/chromium";

/// Installs `ui/`'s locked packages and builds `ui/dist`: before `cargo test`, which embeds it in the
/// desktop app (`apiary-desktop/custom-protocol`).
pub fn build() -> Result<()> {
    check_node()?;
    let npm_cache = setup::cache_dir().join("npm");
    step(
        "dashboard: install ui/'s locked packages (npm ci; downloads cached outside the clone)",
        Command::new("npm")
            .args([
                "--prefix",
                "ui",
                "ci",
                "--no-audit",
                "--no-fund",
                "--prefer-offline",
                "--cache",
            ])
            .arg(&npm_cache),
    )?;
    step(
        "dashboard: type-check and build ui/ into ui/dist",
        Command::new("npm").args(["--prefix", "ui", "run", "build"]),
    )
}

/// Vitest, then both end-to-end tests (after `cargo test` built `apiary` and `apiary-desktop`).
pub fn test() -> Result<()> {
    step(
        "dashboard: unit and component tests (Vitest)",
        Command::new("npm").args(["--prefix", "ui", "test"]),
    )?;
    let artifacts = root().join("target/e2e");
    step(
        "dashboard in Chromium against a real node and a real demo swarm (tests/e2e/dashboard.mjs)",
        Command::new("node")
            .arg("tests/e2e/dashboard.mjs")
            .env("APIARY", debug_binary("apiary"))
            .env("CHROMIUM", CHROMIUM)
            .env("APIARY_E2E_ARTIFACTS", &artifacts),
    )?;
    step(
        "desktop app under Xvfb and D-Bus through tauri-driver/WebKitWebDriver: wizard, tray action, \
         the away-start notification's Cancel, closing and reopening the window, single instance, quit \
         (tests/e2e/desktop.mjs)",
        Command::new("xvfb-run")
            .args(["-a", "-s", "-screen 0 1280x900x24", "dbus-run-session", "--"])
            .args(["node", "tests/e2e/desktop.mjs"])
            .env("APIARY", debug_binary("apiary"))
            .env("APIARY_DESKTOP", debug_binary("apiary-desktop"))
            .env("APIARY_FAKE_NOTIFICATIONS", debug_binary("fake-notifications"))
            .env("APIARY_CLOSE_WINDOW", debug_binary("close-window"))
            .env("APIARY_E2E_ARTIFACTS", &artifacts),
    )
}

/// A debug binary `cargo test --workspace` built.
pub fn debug_binary(name: &str) -> PathBuf {
    target_dir().join("debug").join(name)
}

/// `CARGO_TARGET_DIR` (relative to the repository root), or `target/`.
pub fn target_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root().join("target"), PathBuf::from);
    if target.is_absolute() {
        target
    } else {
        root().join(target)
    }
}

fn check_node() -> Result<()> {
    let out = Command::new("node")
        .arg("--version")
        .output()
        .context("Node.js is needed for the dashboard (ui/): install Node.js 20.19 or later")?;
    let version = String::from_utf8_lossy(&out.stdout);
    let parsed = parse_node_version(&version);
    match parsed {
        Some(v) if v >= NODE_MIN => Ok(()),
        _ => bail!(
            "Node.js {}.{} or later is needed for the dashboard (ui/, Vite 8); found {:?}",
            NODE_MIN.0,
            NODE_MIN.1,
            version.trim()
        ),
    }
}

fn parse_node_version(text: &str) -> Option<(u32, u32)> {
    let mut parts = text.trim().trim_start_matches('v').split('.');
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}

/// Whether the browser is installed (setup installs the `chromium` package when it is not).
pub fn has_chromium() -> bool {
    Path::new(CHROMIUM).exists()
}

#[cfg(test)]
mod tests {
    use super::parse_node_version;

    #[test]
    fn node_versions() {
        assert_eq!(parse_node_version("v20.20.2\n"), Some((20, 20)));
        assert_eq!(parse_node_version("v18.19.0"), Some((18, 19)));
        assert!(parse_node_version("v20.20.2").unwrap() >= (20, 19));
        assert!(parse_node_version("v20.18.9").unwrap() < (20, 19));
        assert_eq!(parse_node_version("nonsense"), None);
    }
}
