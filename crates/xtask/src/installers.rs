//! The Linux installers: `cargo xtask bundle` builds them, `cargo xtask test` installs, runs and
//! removes them.
//!
//! ```text
//! cargo xtask bundle [--debug] [--bundles deb,rpm]
//! ```
//!
//! 1. Builds the dashboard (`npm ci`, `npm run build`), then `apiary-desktop` (dashboard embedded,
//!    `--features custom-protocol`) and the `apiary` CLI, in release (or debug with `--debug`).
//! 2. Stages stripped copies (`strip -o`) in `<target>/installers/`.
//! 3. Runs Tauri's bundler on them (`tauri bundle`, from `@tauri-apps/cli` in `ui/`'s locked packages)
//!    with `installers/linux/tauri.bundle.json` merged into `src-tauri/tauri.conf.json`: the app at
//!    `/usr/bin/apiary-desktop` with its desktop entry and icons at the freedesktop locations, the CLI at
//!    `/usr/bin/apiary`, the headless node's systemd **user** unit at
//!    `/usr/lib/systemd/user/apiary-node.service` (not enabled); the `.rpm` compressed with xz, the
//!    `.deb` rebuilt with xz by `dpkg-deb` (Tauri's bundler writes gzip). They land in
//!    `<target>/installers/<profile>/bundle/{deb,rpm}/`; a release run writes their sizes to
//!    `target/bench/installers.md`.
//!
//! The test ([`test`], in `cargo xtask test`, or alone with `cargo xtask test-installers` after it)
//! bundles the debug binaries the test run built (stripped,
//! so the packaging is the same and no release build is needed), then, for the `.deb`: checks its
//! contents and dependencies, installs it with `dpkg -i`, checks every file landed, `apiary --version`
//! runs from `PATH`, systemd accepts the unit and it is not enabled, the desktop entry is valid, starts
//! the installed app under Xvfb and a private D-Bus (a fresh home), waits for its window and its
//! painted dashboard, saves a screenshot (`target/e2e/installers/`), quits it with SIGTERM (a clean
//! leave, exit 0), removes the package with `dpkg --purge` and checks none of its files is left. The
//! `.rpm` gets the same checks installed with `rpm --root` into a scratch root (Debian's `rpm` cannot
//! resolve Fedora's dependency names, hence `--nodeps`; `--noscripts` because the scratch root has no
//! shell to run them in).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};

use crate::dashboard::target_dir;
use crate::{root, step};

const USAGE: &str = "usage: cargo xtask bundle [--debug] [--bundles deb,rpm[,appimage]]";

/// The package formats this OS builds by default.
const FORMATS: [&str; 2] = ["deb", "rpm"];

/// Configured too, built only when asked: Tauri's AppImage bundler downloads AppRun and linuxdeploy
/// at bundle time.
const APPIMAGE: &str = "appimage";

/// The Debian package's name (Tauri derives it from `productName`).
const DEB_PACKAGE: &str = "apiary";

/// Files every package installs.
const EXPECTED: [&str; 7] = [
    "/usr/bin/apiary-desktop",
    "/usr/bin/apiary",
    "/usr/share/applications/Apiary.desktop",
    "/usr/share/icons/hicolor/32x32/apps/apiary-desktop.png",
    "/usr/share/icons/hicolor/128x128/apps/apiary-desktop.png",
    "/usr/share/icons/hicolor/512x512/apps/apiary-desktop.png",
    "/usr/lib/systemd/user/apiary-node.service",
];

/// The runtime libraries the `.deb` must depend on: WebKitGTK, GTK and the tray's app indicator.
const DEB_DEPENDS: [&str; 3] = ["libwebkit2gtk-4.1-0", "libgtk-3-0", "libayatana-appindicator3-1"];

/// The `.rpm`'s counterparts (Tauri's bundler requires the libraries by soname).
const RPM_REQUIRES: [&str; 3] = [
    "libwebkit2gtk-4.1.so.0()(64bit)",
    "libgtk-3.so.0()(64bit)",
    "libayatana-appindicator3.so.1()(64bit)",
];

/// The hidden command that runs inside Xvfb: `installers-smoke <app> <screenshot>`.
pub const SMOKE: &str = "installers-smoke";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Profile {
    Debug,
    Release,
}

impl Profile {
    /// xz's level: 6 (Debian's default) for what ships, 1 for the test's debug packages (same
    /// packaging, a fraction of the time).
    fn xz_level(self) -> u32 {
        match self {
            Profile::Debug => 1,
            Profile::Release => 6,
        }
    }

    fn dir(self) -> &'static str {
        match self {
            Profile::Debug => "debug",
            Profile::Release => "release",
        }
    }
}

/// `cargo xtask bundle`.
pub fn run(args: &[String]) -> Result<()> {
    let mut profile = Profile::Release;
    let mut formats: Vec<String> = FORMATS.iter().map(|f| (*f).to_owned()).collect();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--debug" => profile = Profile::Debug,
            "--bundles" => {
                let list = it
                    .next()
                    .with_context(|| format!("--bundles needs a list\n{USAGE}"))?;
                formats = list.split(',').map(|f| f.trim().to_lowercase()).collect();
                if let Some(bad) = formats
                    .iter()
                    .find(|f| !FORMATS.contains(&f.as_str()) && *f != APPIMAGE)
                {
                    bail!(
                        "`{bad}` cannot be built on Linux (it builds {} and, with network access, \
                         {APPIMAGE}; Windows and macOS installers need their OS: installers/README.md)\n{USAGE}",
                        FORMATS.join(", ")
                    );
                }
                if formats.iter().any(|f| f == APPIMAGE) {
                    eprintln!(
                        "xtask: the AppImage bundler downloads AppRun and linuxdeploy: it fails without \
                         network access"
                    );
                }
            }
            other => bail!("unknown argument {other:?}\n{USAGE}"),
        }
    }
    crate::setup::system_packages()?;
    crate::dashboard::build()?;
    build(profile)?;
    let made = bundle(profile, &formats)?;
    let mut report = String::from("| package | download | installed |\n|---|---|---|\n");
    for path in &made {
        let size = std::fs::metadata(path)?.len();
        let installed = installed_size(path)?;
        let name = path
            .file_name()
            .map_or_else(String::new, |n| n.to_string_lossy().into_owned());
        eprintln!(
            "xtask: {name}: {:.1} MB, {:.1} MB installed",
            mb(size),
            mb(installed)
        );
        report.push_str(&format!(
            "| `{name}` | {:.1} MB | {:.1} MB |\n",
            mb(size),
            mb(installed)
        ));
    }
    // what hivemind takes on this machine: its venv (Python packages, PyTorch and its CUDA wheels, p2pd)
    let venv = crate::setup::cache_dir().join("hivemind-venv");
    if venv.is_dir() {
        let bytes = tree_size(&venv);
        eprintln!(
            "xtask: hivemind's venv {}: {:.2} GB",
            venv.display(),
            bytes as f64 / 1e9
        );
        report.push_str(&format!(
            "| hivemind 1.1.12's venv (`pip install hivemind`, for comparison) | — | {:.1} MB |\n",
            mb(bytes)
        ));
    }
    if profile == Profile::Release {
        crate::bench::publish("installers.md", &report)?;
    }
    Ok(())
}

/// What a package takes once installed (bytes), as its own metadata says.
fn installed_size(package: &Path) -> Result<u64> {
    let (field, scale) = if package.extension().is_some_and(|x| x == "deb") {
        // Debian's Installed-Size is in KiB
        let field = output(
            Command::new("dpkg-deb")
                .arg("--field")
                .arg(package)
                .arg("Installed-Size"),
        )?;
        (field, 1024)
    } else {
        (
            output(
                Command::new("rpm")
                    .args(["-qp", "--queryformat", "%{SIZE}"])
                    .arg(package),
            )?,
            1,
        )
    };
    let n: u64 = field
        .trim()
        .parse()
        .with_context(|| format!("the installed size of {} is {field:?}", package.display()))?;
    Ok(n * scale)
}

/// The bytes of the regular files under `dir` (symbolic links not followed).
fn tree_size(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .filter_map(Result::ok)
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => tree_size(&e.path()),
            Ok(t) if t.is_file() => e.metadata().map_or(0, |m| m.len()),
            _ => 0,
        })
        .sum()
}

fn mb(bytes: u64) -> f64 {
    bytes as f64 / 1e6
}

/// Builds the app (dashboard embedded) and the CLI.
fn build(profile: Profile) -> Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let mut cmd = Command::new(cargo);
    cmd.arg("build");
    if profile == Profile::Release {
        cmd.arg("--release");
    }
    cmd.args([
        "-p",
        "apiary-desktop",
        "-p",
        "apiary-cli",
        "--features",
        "apiary-desktop/custom-protocol",
    ]);
    step(
        &format!("installers: the desktop app and the CLI ({})", profile.dir()),
        &mut cmd,
    )
}

/// Stages stripped binaries and runs Tauri's bundler; the packages made, in `formats`' order.
fn bundle(profile: Profile, formats: &[String]) -> Result<Vec<PathBuf>> {
    let target = target_dir();
    let stage = target.join("installers");
    let app_dir = stage.join(profile.dir());
    let cli_dir = stage.join(format!("cli-{}", profile.dir()));
    let out = app_dir.join("bundle");
    if out.exists() {
        std::fs::remove_dir_all(&out).with_context(|| format!("clearing {}", out.display()))?;
    }
    std::fs::create_dir_all(&app_dir)?;
    std::fs::create_dir_all(&cli_dir)?;
    for (built, staged) in [
        (
            target.join(profile.dir()).join("apiary-desktop"),
            app_dir.join("apiary-desktop"),
        ),
        (target.join(profile.dir()).join("apiary"), cli_dir.join("apiary")),
    ] {
        step(
            "installers: a stripped copy of the binary (what the package ships)",
            Command::new("strip").arg("-o").arg(&staged).arg(&built),
        )?;
    }
    let overlay = stage.join(format!("tauri.bundle.{}.json", profile.dir()));
    std::fs::write(&overlay, overlay_config(&cli_dir.join("apiary"), profile)?)
        .with_context(|| format!("writing {}", overlay.display()))?;
    let mut cmd = Command::new(root().join("ui/node_modules/.bin/tauri"));
    cmd.args(["bundle", "--ci", "--bundles", &formats.join(",")])
        .arg("--config")
        .arg(&overlay)
        .env("CARGO_TARGET_DIR", &stage);
    if profile == Profile::Debug {
        cmd.arg("--debug");
    }
    step(
        &format!("installers: Tauri's bundler makes the {}", formats.join(" and ")),
        &mut cmd,
    )?;
    let made = formats
        .iter()
        .map(|format| {
            let dir = out.join(format);
            std::fs::read_dir(&dir)
                .with_context(|| format!("reading {}", dir.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .find(|p| {
                    p.extension()
                        .is_some_and(|x| x.to_string_lossy().to_lowercase() == *format)
                })
                .with_context(|| format!("no .{format} in {}", dir.display()))
        })
        .collect::<Result<Vec<_>>>()?;
    for deb in made.iter().filter(|p| p.extension().is_some_and(|x| x == "deb")) {
        recompress_deb(deb, profile.xz_level())?;
    }
    Ok(made)
}

/// Tauri's bundler compresses a `.deb` with gzip (its `.rpm` takes `compression` from the config);
/// dpkg-deb rebuilds it with xz, as Debian's own packages are: about a third smaller.
fn recompress_deb(deb: &Path, level: u32) -> Result<()> {
    let tree = deb.with_extension("tree");
    if tree.exists() {
        std::fs::remove_dir_all(&tree)?;
    }
    step(
        "installers: unpack the .deb",
        Command::new("dpkg-deb").arg("--raw-extract").arg(deb).arg(&tree),
    )?;
    step(
        "installers: rebuild the .deb with xz",
        Command::new("dpkg-deb")
            .arg("-Zxz")
            .arg(format!("-z{level}"))
            .args(["--root-owner-group", "--build"])
            .arg(&tree)
            .arg(deb),
    )?;
    std::fs::remove_dir_all(&tree)?;
    Ok(())
}

/// `installers/linux/tauri.bundle.json` with its file sources made absolute, the CLI added at
/// `/usr/bin/apiary` (its staged path is only known here) and the profile's xz level.
fn overlay_config(cli: &Path, profile: Profile) -> Result<String> {
    let path = root().join("installers/linux/tauri.bundle.json");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let mut config: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{} is not JSON", path.display()))?;
    for format in FORMATS {
        let files = config
            .pointer_mut(&format!("/bundle/linux/{format}/files"))
            .and_then(serde_json::Value::as_object_mut)
            .with_context(|| format!("{}: no bundle.linux.{format}.files", path.display()))?;
        for source in files.values_mut() {
            let relative = source.as_str().context("file sources are strings")?;
            *source = root().join(relative).to_string_lossy().into_owned().into();
        }
        files.insert(
            "/usr/bin/apiary".into(),
            cli.to_string_lossy().into_owned().into(),
        );
    }
    if let Some(level) = config.pointer_mut("/bundle/linux/rpm/compression/level") {
        *level = profile.xz_level().into();
    }
    Ok(serde_json::to_string_pretty(&config)?)
}

/// The installer test in `cargo xtask test` (see the module docs), on the debug binaries its build
/// step made (no build of its own: another package selection would unify features differently and
/// rebuild half the dependency tree).
pub fn test() -> Result<()> {
    for name in ["apiary-desktop", "apiary"] {
        let bin = crate::dashboard::debug_binary(name);
        ensure!(
            bin.is_file(),
            "{} is missing: `cargo xtask test` builds it before this step",
            bin.display()
        );
    }
    let formats: Vec<String> = FORMATS.iter().map(|f| (*f).to_owned()).collect();
    let made = bundle(Profile::Debug, &formats)?;
    check_deb(&made[0])?;
    check_rpm(&made[1])
}

/// Standard output of a command that must succeed.
fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .output()
        .with_context(|| format!("could not start `{}`", crate::show(cmd)))?;
    ensure!(
        out.status.success(),
        "`{}` failed ({}): {}",
        crate::show(cmd),
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn is_root() -> bool {
    output(Command::new("id").arg("-u")).is_ok_and(|uid| uid.trim() == "0")
}

/// Whether dpkg has the package installed (or half-installed).
fn deb_installed() -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f", "${Status}", DEB_PACKAGE])
        .output()
        .is_ok_and(|o| o.status.success() && String::from_utf8_lossy(&o.stdout).contains("installed"))
}

/// Removes the package again if a check fails half way.
struct DebInstalled;

impl Drop for DebInstalled {
    fn drop(&mut self) {
        if deb_installed() {
            eprintln!("xtask: removing the test's {DEB_PACKAGE} package");
            let _ = Command::new("dpkg").args(["--purge", DEB_PACKAGE]).status();
        }
    }
}

fn check_deb(deb: &Path) -> Result<()> {
    ensure!(
        is_root(),
        "the installer test installs the .deb with dpkg: run `cargo xtask test` as root (it also installs \
         system packages)"
    );
    ensure!(
        !deb_installed(),
        "a package named `{DEB_PACKAGE}` is installed on this machine: the installer test would replace \
         it; remove it first (`dpkg --purge {DEB_PACKAGE}`)"
    );
    let listing = output(Command::new("dpkg-deb").arg("--contents").arg(deb))?;
    for file in EXPECTED {
        ensure!(
            listing
                .lines()
                .filter_map(|l| l.split_whitespace().last())
                .any(|path| path.trim_start_matches('.').trim_start_matches('/') == &file[1..]),
            "the .deb lacks {file}:\n{listing}"
        );
    }
    let depends = output(Command::new("dpkg-deb").arg("--field").arg(deb).arg("Depends"))?;
    for lib in DEB_DEPENDS {
        ensure!(
            depends.contains(lib),
            "the .deb does not depend on {lib}: {depends}"
        );
    }

    let guard = DebInstalled;
    step(
        "installers: install the .deb",
        Command::new("dpkg").arg("--install").arg(deb),
    )?;
    let files: Vec<PathBuf> = output(Command::new("dpkg").args(["--listfiles", DEB_PACKAGE]))?
        .lines()
        .map(PathBuf::from)
        .filter(|p| p.is_file())
        .collect();
    for file in EXPECTED {
        ensure!(Path::new(file).is_file(), "{file} is not installed");
        ensure!(
            files.iter().any(|f| f == Path::new(file)),
            "dpkg does not list {file}"
        );
    }
    check_installed(Path::new("/"), true)?;
    smoke(Path::new("/usr/bin/apiary-desktop"), "deb")?;
    step(
        "installers: remove the .deb",
        Command::new("dpkg").args(["--purge", DEB_PACKAGE]),
    )?;
    drop(guard);
    ensure!(!deb_installed(), "dpkg still lists {DEB_PACKAGE} after --purge");
    all_gone(&files, "deb")
}

/// Every file the package installed is gone after its removal.
fn all_gone(files: &[PathBuf], format: &str) -> Result<()> {
    let left: Vec<&PathBuf> = files.iter().filter(|f| f.exists()).collect();
    ensure!(left.is_empty(), "left after removing the .{format}: {left:?}");
    eprintln!(
        "xtask: the .{format} installed {} files and removed them all",
        files.len()
    );
    Ok(())
}

/// Checks of an installed package under `prefix` (`/` for the .deb): `apiary --version` (from `PATH`
/// when `on_path`), the unit (systemd's verifier; not enabled) and the desktop entry.
fn check_installed(prefix: &Path, on_path: bool) -> Result<()> {
    let at = |file: &str| prefix.join(file.trim_start_matches('/'));
    let mut version = if on_path {
        // only the system's folders: the `apiary` found must be the package's
        let mut cmd = Command::new("apiary");
        cmd.env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin");
        cmd
    } else {
        Command::new(at("/usr/bin/apiary"))
    };
    let shown = output(version.arg("--version"))?;
    ensure!(
        shown.contains(env!("CARGO_PKG_VERSION")),
        "`apiary --version` says {shown:?}, not version {}",
        env!("CARGO_PKG_VERSION")
    );
    eprintln!("xtask: installed `apiary --version`: {}", shown.trim());

    let unit = at("/usr/lib/systemd/user/apiary-node.service");
    let text = std::fs::read_to_string(&unit)?;
    ensure!(
        text.lines().any(|l| l == "ExecStart=/usr/bin/apiary node run"),
        "the unit does not run the packaged CLI"
    );
    if on_path {
        let verify = Command::new("systemd-analyze")
            .arg("verify")
            .arg(&unit)
            .output()?;
        let complaints = String::from_utf8_lossy(&verify.stderr);
        ensure!(
            verify.status.success() && complaints.trim().is_empty(),
            "systemd-analyze verify {}: {complaints}",
            unit.display()
        );
    }
    for enabled in [
        "/etc/systemd/user/default.target.wants/apiary-node.service",
        "/usr/lib/systemd/user/default.target.wants/apiary-node.service",
    ] {
        ensure!(
            !at(enabled).exists(),
            "the unit is enabled by the package ({enabled})"
        );
    }
    let entry = at("/usr/share/applications/Apiary.desktop");
    let validate = Command::new("desktop-file-validate").arg(&entry).output()?;
    ensure!(
        validate.status.success() && validate.stdout.is_empty(),
        "desktop-file-validate {}: {}",
        entry.display(),
        String::from_utf8_lossy(&validate.stdout)
    );
    Ok(())
}

/// The rpm package's name, from the file.
fn rpm_name(rpm: &Path) -> Result<String> {
    Ok(output(
        Command::new("rpm")
            .args(["-qp", "--queryformat", "%{NAME}"])
            .arg(rpm),
    )?
    .trim()
    .to_owned())
}

fn check_rpm(rpm: &Path) -> Result<()> {
    let listing = output(Command::new("rpm").arg("-qlp").arg(rpm))?;
    for file in EXPECTED {
        ensure!(
            listing.lines().any(|l| l == file),
            "the .rpm lacks {file}:\n{listing}"
        );
    }
    let requires = output(Command::new("rpm").arg("-qpR").arg(rpm))?;
    for lib in RPM_REQUIRES {
        ensure!(
            requires.lines().any(|l| l.trim() == lib),
            "the .rpm does not require {lib}:\n{requires}"
        );
    }
    let name = rpm_name(rpm)?;
    let scratch = std::env::temp_dir().join(format!("apiary-rpm-root-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&scratch);
    std::fs::create_dir_all(&scratch)?;
    let result = (|| -> Result<()> {
        step(
            "installers: an empty rpm database in a scratch root",
            Command::new("rpm").arg("--root").arg(&scratch).arg("--initdb"),
        )?;
        step(
            "installers: install the .rpm into the scratch root",
            Command::new("rpm")
                .arg("--root")
                .arg(&scratch)
                .args(["--install", "--nodeps", "--noscripts"])
                .arg(rpm),
        )?;
        let files: Vec<PathBuf> = output(
            Command::new("rpm")
                .arg("--root")
                .arg(&scratch)
                .args(["-ql", &name]),
        )?
        .lines()
        .map(|f| scratch.join(f.trim_start_matches('/')))
        .filter(|p| p.is_file())
        .collect();
        for file in EXPECTED {
            ensure!(
                scratch.join(file.trim_start_matches('/')).is_file(),
                "{file} is not installed from the .rpm"
            );
        }
        check_installed(&scratch, false)?;
        smoke(&scratch.join("usr/bin/apiary-desktop"), "rpm")?;
        step(
            "installers: remove the .rpm",
            Command::new("rpm").arg("--root").arg(&scratch).args([
                "--erase",
                "--nodeps",
                "--noscripts",
                &name,
            ]),
        )?;
        ensure!(
            !Command::new("rpm")
                .arg("--root")
                .arg(&scratch)
                .args(["-q", &name])
                .output()?
                .status
                .success(),
            "rpm still lists {name} after --erase"
        );
        all_gone(&files, "rpm")
    })();
    let _ = std::fs::remove_dir_all(&scratch);
    result
}

/// Starts the installed app under Xvfb and a private D-Bus (this xtask again, as [`SMOKE`]).
fn smoke(app: &Path, label: &str) -> Result<()> {
    let shot = root().join("target/e2e/installers").join(format!("{label}.png"));
    let me = std::env::current_exe().context("this xtask's path")?;
    step(
        &format!(
            "installers: the app installed from the .{label} under Xvfb: window, painted dashboard, clean quit"
        ),
        Command::new("xvfb-run")
            .args(["-a", "-s", "-screen 0 1280x900x24", "dbus-run-session", "--"])
            .arg(me)
            .arg(SMOKE)
            .arg(app)
            .arg(&shot),
    )
}

/// Inside Xvfb: a fresh home, the app started, its window mapped and its dashboard painted within
/// 90 s, a screenshot, SIGTERM, exit 0 within 30 s.
pub fn smoke_inside(args: &[String]) -> Result<()> {
    let [app, shot] = args else {
        bail!("usage: cargo xtask {SMOKE} <app> <screenshot.png>");
    };
    let base = std::env::temp_dir().join(format!("apiary-installed-{}", std::process::id()));
    let home = crate::bench_desktop::fresh_home(&base, 0)?;
    let mut child = crate::bench_desktop::launch(Path::new(app), &home, &[])?;
    let result = watch(&mut child, Path::new(shot));
    if let Ok(None) = child.try_wait() {
        crate::bench::stop(&mut child);
    }
    let _ = std::fs::remove_dir_all(&base);
    result
}

fn watch(child: &mut Child, shot: &Path) -> Result<()> {
    let t0 = Instant::now();
    let stdout = child.stdout.take().context("the app's stdout")?;
    let (tx, rx) = mpsc::sync_channel(1);
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if line.contains("dashboard painted") {
                let _ = tx.send(line);
            }
        }
    });
    let painted = rx
        .recv_timeout(Duration::from_secs(90))
        .context("the installed app logged no \"dashboard painted\" within 90 s")?;
    eprintln!(
        "xtask: painted {:.1} s after start: {}",
        t0.elapsed().as_secs_f64(),
        painted.trim()
    );
    let windows = output(Command::new("xwininfo").args(["-root", "-tree"]))?;
    ensure!(
        windows.lines().any(|l| l.contains("\"Apiary\"")),
        "no window named \"Apiary\" on the X screen:\n{windows}"
    );
    if let Some(dir) = shot.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::thread::sleep(Duration::from_millis(500));
    step(
        "installers: a screenshot of the X screen",
        Command::new("import").args(["-window", "root"]).arg(shot),
    )?;
    output(Command::new("kill").args(["-TERM", &child.id().to_string()]))?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = child.try_wait()? {
            ensure!(status.success(), "the app exited with {status} after SIGTERM");
            eprintln!("xtask: the app quit cleanly on SIGTERM");
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("the app did not exit within 30 s of SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}
