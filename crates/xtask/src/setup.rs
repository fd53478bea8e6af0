//! Installs what the test suites need on a fresh Debian/Ubuntu machine, and nothing that is present.

use std::path::PathBuf;
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};

use crate::step;

/// The hivemind release Apiary is wire-compatible with, and the pins that make its codecs work
/// (numpy 2 breaks 1.1.12's 8-bit codecs; BLOCKWISE_8BIT needs bitsandbytes).
const HIVEMIND_REQUIREMENTS: &[&str] = &["hivemind==1.1.12", "numpy<2", "bitsandbytes"];

/// Written into the venv only after every package installed, so a half-made venv is redone.
const VENV_READY_MARKER: &str = ".apiary-ready";

/// What the later steps need to know about the prepared machine.
#[derive(Debug)]
pub struct Env {
    pub hivemind_python: PathBuf,
}

pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("APIARY_CACHE_DIR") {
        return PathBuf::from(dir);
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir);
    base.join("apiary")
}

pub fn all() -> Result<Env> {
    system_packages()?;
    cargo_tools()?;
    let hivemind_python = hivemind_venv()?;
    Ok(Env { hivemind_python })
}

/// Cargo-installed tools the checks use, installed into `~/.cargo/bin` (outside the clone) once.
fn cargo_tools() -> Result<()> {
    for (binary, what, krate) in [
        (
            "cargo-deny",
            "licence, ban and source checks of the dependency tree",
            "cargo-deny@^0.20",
        ),
        // Tauri 3 alphas are the registry's newest: stay on 2, like every Tauri crate here
        (
            "tauri-driver",
            "WebDriver for the desktop app's end-to-end test",
            "tauri-driver@^2",
        ),
    ] {
        if on_path(binary) {
            eprintln!("==> {binary}: present");
            continue;
        }
        step(
            &format!("install {binary} ({what}; once per machine)"),
            Command::new("cargo").args(["install", "--locked", krate]),
        )?;
    }
    Ok(())
}

fn on_path(binary: &str) -> bool {
    succeeds(Command::new("sh").args(["-c", &format!("command -v {binary}")]))
}

fn succeeds(cmd: &mut Command) -> bool {
    cmd.stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// System packages: only what is missing, with sudo when not root.
pub fn system_packages() -> Result<()> {
    let mut missing: Vec<&str> = Vec::new();
    // The hivemind venv needs a Python 3 that can make venvs with pip.
    if !succeeds(Command::new("python3").args(["-c", "import venv, ensurepip"])) {
        missing.extend(["python3", "python3-venv", "python3-pip"]);
    }
    // The governor's activity probes are tested against a real X server and a private D-Bus.
    for (binary, package) in [
        ("Xvfb", "xvfb"),
        ("xauth", "xauth"),
        ("dbus-daemon", "dbus-daemon"),
        // the systemd user unit in installers/linux is checked with systemd's own verifier
        ("systemd-analyze", "systemd"),
        // the desktop app's end-to-end test: WebKitGTK's WebDriver, and the X screen's screenshots
        ("WebKitWebDriver", "webkit2gtk-driver"),
        ("import", "imagemagick"),
        // the installer test: the .rpm's contents and a scratch-root install, the desktop entry's
        // validator, the X window list
        ("rpm", "rpm"),
        ("desktop-file-validate", "desktop-file-utils"),
        ("xwininfo", "x11-utils"),
        // the NAT test's simulated internet: namespaces, veth links, a bridge, MASQUERADE
        ("ip", "iproute2"),
        ("iptables", "iptables"),
    ] {
        if !on_path(binary) {
            missing.push(package);
        }
    }
    // the dashboard's end-to-end test drives Debian's Chromium (never a downloaded browser)
    if !crate::dashboard::has_chromium() {
        missing.extend(["chromium", "fonts-dejavu-core"]);
    }
    // the desktop app (src-tauri, Tauri 2) builds against WebKitGTK, GTK, the app indicator and librsvg
    for (library, package) in [
        ("webkit2gtk-4.1", "libwebkit2gtk-4.1-dev"),
        ("gtk+-3.0", "libgtk-3-dev"),
        ("ayatana-appindicator3-0.1", "libayatana-appindicator3-dev"),
        ("librsvg-2.0", "librsvg2-dev"),
        ("openssl", "libssl-dev"),
    ] {
        if !succeeds(Command::new("pkg-config").args(["--exists", library])) {
            missing.push(package);
        }
    }
    if !on_path("pkg-config") {
        missing.push("pkg-config");
    }
    // libxdo ships no pkg-config file: look for its development link
    if !succeeds(Command::new("sh").args([
        "-c",
        "ls /usr/lib/*/libxdo.so /usr/lib/libxdo.so 2>/dev/null | grep -q .",
    ])) {
        missing.push("libxdo-dev");
    }
    if missing.is_empty() {
        eprintln!("==> system packages: all present");
        return Ok(());
    }
    eprintln!("==> system packages missing: {}", missing.join(" "));
    apt_install(&missing)
}

fn apt_install(packages: &[&str]) -> Result<()> {
    if !succeeds(Command::new("apt-get").arg("--version")) {
        bail!(
            "packages {packages:?} are needed but this is not a Debian/Ubuntu machine (no apt-get): install them by hand"
        );
    }
    let is_root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0");
    let prefix: Vec<&str> = if is_root {
        vec![]
    } else if succeeds(Command::new("sudo").args(["-n", "true"])) {
        vec!["sudo", "-n"]
    } else {
        bail!("packages {packages:?} are needed: run as root or give this user password-less sudo");
    };
    let run = |args: &[&str]| -> Result<()> {
        let all: Vec<&str> = prefix.iter().chain(args).copied().collect();
        let mut cmd = Command::new(all[0]);
        cmd.args(&all[1..]).env("DEBIAN_FRONTEND", "noninteractive");
        step("install missing system packages", &mut cmd)
    };
    run(&["apt-get", "update"])?;
    let mut args = vec!["apt-get", "install", "-y", "--no-install-recommends"];
    args.extend(packages);
    run(&args).context("could not install the system packages")
}

/// The cached venv holding real hivemind from the package index, made once per machine.
fn hivemind_venv() -> Result<PathBuf> {
    let venv = std::env::var_os("APIARY_HIVEMIND_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| cache_dir().join("hivemind-venv"));
    let python = venv.join("bin/python");
    if venv.join(VENV_READY_MARKER).exists() && python.exists() {
        eprintln!("==> hivemind venv: ready at {}", venv.display());
        return Ok(python);
    }
    eprintln!(
        "==> hivemind venv: missing at {} — creating it (a few minutes, ≈5.6 GB: interop and golden \
         tests run {} from the package index)",
        venv.display(),
        HIVEMIND_REQUIREMENTS[0]
    );
    if venv.exists() {
        std::fs::remove_dir_all(&venv).with_context(|| format!("removing half-made {}", venv.display()))?;
    }
    std::fs::create_dir_all(venv.parent().unwrap_or(&venv))?;
    step(
        "create the venv",
        Command::new("python3").arg("-m").arg("venv").arg(&venv),
    )?;
    step(
        "install hivemind and its pins into the venv",
        Command::new(&python)
            .args(["-m", "pip", "install", "--quiet", "--disable-pip-version-check"])
            .args(HIVEMIND_REQUIREMENTS),
    )
    .context("could not install hivemind into the venv (is the package index reachable?)")?;
    step(
        "check that hivemind imports and every codec works",
        Command::new(&python).args([
            "-c",
            "import hivemind, torch, bitsandbytes; from hivemind.compression import serialize_torch_tensor; \
             from hivemind.proto.runtime_pb2 import CompressionType as C; \
             [serialize_torch_tensor(torch.randn(5000), c) for c in C.values()]; print(hivemind.__version__)",
        ]),
    )?;
    std::fs::write(venv.join(VENV_READY_MARKER), HIVEMIND_REQUIREMENTS.join("\n"))?;
    Ok(python)
}
