//! The real probes on this machine, plus X11 against Xvfb and D-Bus against a private bus.
// Helpers and fake D-Bus services outside `#[test]` functions print and unwrap like the tests do.
#![allow(clippy::unwrap_used, clippy::print_stdout)]

use std::time::{Duration, Instant};

use apiary_governor::probe::nvml::NvmlProbe;
use apiary_governor::probe::power::platform_power;
use apiary_governor::probe::system::SysinfoProbe;
use apiary_governor::probe::{GpuProbe, Reading, SystemProbe, platform_activity};
use apiary_governor::{Directive, Governor, PauseCause, PolicyConfig, Probes};

fn check<T: std::fmt::Debug>(name: &str, r: &Reading<T>) {
    println!("{name}: {r:?}");
    if let Reading::Unknown(why) = r {
        assert!(
            !why.trim().is_empty(),
            "{name}: an unknown reading needs a reason"
        );
    }
}

#[test]
fn real_probes_report_values_or_reasons() {
    let mut activity = platform_activity();
    for _ in 0..3 {
        let a = activity.sample();
        check("idle_s", &a.idle_s);
        check("locked", &a.locked);
        check("fullscreen", &a.fullscreen);
        check("inhibited", &a.inhibited);
        if let Reading::Known(i) = a.idle_s {
            assert!(i >= 0.0);
        }
    }

    let mut gpu = NvmlProbe::new();
    let t = Instant::now();
    match gpu.sample() {
        Reading::Known(gpus) => {
            for g in &gpus {
                println!("{g:?}");
                for r in [
                    &g.utilization,
                    &g.other_utilization,
                    &g.temperature_c,
                    &g.power_w,
                    &g.fan_percent,
                ] {
                    check("gpu field", r);
                }
            }
        }
        Reading::Unknown(why) => {
            println!("GPUs unknown: {why}");
            assert!(why.contains("NVML") || why.contains("NVIDIA"), "{why}");
            // The retry is backed off: the second call does not reload the library.
            let t2 = Instant::now();
            assert_eq!(gpu.sample(), Reading::Unknown(why));
            assert!(t2.elapsed() < Duration::from_millis(5));
        }
    }
    println!("NVML probe took {:?}", t.elapsed());

    let mut sys = SysinfoProbe::new();
    std::thread::sleep(Duration::from_millis(300));
    let s = sys.sample();
    println!("{s:?}");
    let cpu = s.cpu_percent.get().expect("CPU usage is known after 250 ms");
    assert!((0.0..=100.0).contains(&cpu));
    let total = s.memory_total.get().expect("memory size is known");
    let used = s.memory_used.get().expect("memory use is known");
    assert!(
        total > 64 * 1024 * 1024 && used > 0 && used <= total,
        "{used} / {total}"
    );
    if cfg!(target_os = "linux") {
        assert!(s.load_1m.get().expect("Linux has a load average") >= 0.0);
    }

    let p = platform_power().sample();
    check("on_ac", &p.on_ac);
    check("battery_percent", &p.battery_percent);
    let supplies = std::fs::read_dir("/sys/class/power_supply")
        .map(|d| d.count())
        .unwrap_or(0);
    println!("/sys/class/power_supply entries: {supplies}");
    if supplies == 0 {
        assert!(!p.on_ac.is_known() && !p.battery_percent.is_known());
    }
}

/// The platform probes through the governor loop: a directive other than "starting" arrives.
#[test]
fn governor_runs_with_platform_probes() {
    let handle = Governor::spawn(
        PolicyConfig::default(),
        Probes::platform(),
        Duration::from_millis(100),
    )
    .unwrap();
    let mut rx = handle.directive();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let d = rt
        .block_on(async {
            tokio::time::timeout(
                Duration::from_secs(5),
                rx.wait_for(|d| d.pause_cause() != Some(PauseCause::Starting)),
            )
            .await
        })
        .expect("a directive within 5 s")
        .unwrap()
        .clone();
    println!("platform directive: {d:?}");
    assert!(!d.reason().is_empty());
    assert!(!matches!(d, Directive::Drain { .. }));
    handle.shutdown().unwrap();
}

#[cfg(target_os = "linux")]
mod linux {
    use std::io::{BufRead, BufReader};
    use std::process::{Child, Command, Stdio};
    use std::sync::Arc;
    use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

    use apiary_governor::Reading;
    use apiary_governor::probe::ActivityProbe;
    use apiary_governor::probe::linux::{
        BusChoice, DbusActivityProbe, LinuxActivityConfig, LinuxActivityProbe, X11ActivityProbe,
    };
    use x11rb::connection::Connection as _;
    use x11rb::protocol::xproto::{AtomEnum, ConnectionExt as _, CreateWindowAux, PropMode, WindowClass};
    use x11rb::wrapper::ConnectionExt as _;

    /// A child process we started, killed (by its own PID) when dropped.
    struct Killed(Child);

    impl Drop for Killed {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    fn which(cmd: &str) -> bool {
        std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).any(|d| d.join(cmd).is_file()))
            .unwrap_or(false)
    }

    fn start_xvfb() -> Option<(Killed, String)> {
        for n in 90..140 {
            if std::path::Path::new(&format!("/tmp/.X11-unix/X{n}")).exists()
                || std::path::Path::new(&format!("/tmp/.X{n}-lock")).exists()
            {
                continue;
            }
            let child = Command::new("Xvfb")
                .args([
                    format!(":{n}").as_str(),
                    "-screen",
                    "0",
                    "640x480x24",
                    "-nolisten",
                    "tcp",
                ])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .ok()?;
            let child = Killed(child);
            let t = Instant::now();
            while t.elapsed() < Duration::from_secs(10) {
                if std::path::Path::new(&format!("/tmp/.X11-unix/X{n}")).exists() {
                    return Some((child, format!(":{n}")));
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            return None;
        }
        None
    }

    #[test]
    fn x11_probe_against_xvfb() {
        if !which("Xvfb") {
            eprintln!(
                "\n*** SKIPPED x11_probe_against_xvfb: Xvfb is not installed (apt-get install xvfb) ***\n"
            );
            return;
        }
        let (_xvfb, display) = start_xvfb().expect("Xvfb starts");
        // the socket appears before the server answers; on a loaded machine the probe's 200 ms connect
        // limit can pass first, so give the server time to come up (a fresh probe per try: no back-off)
        let t = Instant::now();
        let (mut probe, a) = loop {
            let mut probe = X11ActivityProbe::new(Some(display.clone()));
            let a = probe.sample();
            if a.idle_s.is_known() || t.elapsed() > Duration::from_secs(20) {
                break (probe, a);
            }
            std::thread::sleep(Duration::from_millis(250));
        };
        println!("Xvfb {display} after {:?}: {a:?}", t.elapsed());
        let first = a.idle_s.get().expect("XScreenSaver idle time is known on Xvfb");
        assert_eq!(a.locked, Reading::Known(false));
        assert!(
            !a.fullscreen.is_known(),
            "no window manager yet: {:?}",
            a.fullscreen
        );
        std::thread::sleep(Duration::from_millis(1200));
        let second = probe.sample().idle_s.get().expect("still known");
        println!("idle grew from {first:.3} s to {second:.3} s");
        assert!(second >= first + 1.0, "idle time grows: {first} → {second}");

        // Act as a window manager: a fullscreen active window.
        let (conn, screen) = x11rb::connect(Some(&display)).unwrap();
        let root = conn.setup().roots[screen].root;
        let atom = |n: &[u8]| conn.intern_atom(false, n).unwrap().reply().unwrap().atom;
        let (active, state, full) = (
            atom(b"_NET_ACTIVE_WINDOW"),
            atom(b"_NET_WM_STATE"),
            atom(b"_NET_WM_STATE_FULLSCREEN"),
        );
        let win = conn.generate_id().unwrap();
        conn.create_window(
            0,
            win,
            root,
            0,
            0,
            100,
            100,
            0,
            WindowClass::INPUT_OUTPUT,
            0,
            &CreateWindowAux::new(),
        )
        .unwrap();
        conn.change_property32(PropMode::REPLACE, win, state, AtomEnum::ATOM, &[full])
            .unwrap();
        conn.change_property32(PropMode::REPLACE, root, active, AtomEnum::WINDOW, &[win])
            .unwrap();
        conn.sync().unwrap();
        assert_eq!(probe.sample().fullscreen, Reading::Known(true));
        conn.change_property32(PropMode::REPLACE, win, state, AtomEnum::ATOM, &[])
            .unwrap();
        conn.sync().unwrap();
        assert_eq!(probe.sample().fullscreen, Reading::Known(false));

        // The merged Linux probe with X11 only (both buses disabled) gives the same readings.
        let mut merged = LinuxActivityProbe::new(LinuxActivityConfig {
            x11_display: Some(display.clone()),
            session_bus: BusChoice::Disabled,
            system_bus: BusChoice::Disabled,
        });
        let m = merged.sample();
        assert!(
            m.idle_s.is_known() && m.fullscreen == Reading::Known(false),
            "{m:?}"
        );
        drop(conn);
    }

    #[test]
    fn x11_probe_without_server_is_unknown_and_quick() {
        let mut probe = X11ActivityProbe::new(Some(":239".into()));
        let t = Instant::now();
        let a = probe.sample();
        println!("no X server: {a:?} in {:?}", t.elapsed());
        assert!(a.idle_s.reason().is_some_and(|r| r.contains("X server")), "{a:?}");
        // Backed off: the next call does not try again.
        let t = Instant::now();
        assert!(!probe.sample().idle_s.is_known());
        assert!(t.elapsed() < Duration::from_millis(20));
    }

    struct FakeMutter;

    #[zbus::interface(name = "org.gnome.Mutter.IdleMonitor")]
    impl FakeMutter {
        fn get_idletime(&self) -> u64 {
            4242
        }
    }

    struct FakeLogindManager;

    #[zbus::interface(name = "org.freedesktop.login1.Manager")]
    impl FakeLogindManager {
        #[zbus(name = "GetSessionByPID")]
        fn get_session_by_pid(&self, _pid: u32) -> zbus::zvariant::OwnedObjectPath {
            zbus::zvariant::OwnedObjectPath::try_from("/org/freedesktop/login1/session/_31").unwrap()
        }

        #[zbus(property)]
        fn block_inhibited(&self) -> String {
            "handle-power-key:idle".into()
        }
    }

    struct FakeSession {
        idle_since_us: u64,
    }

    #[zbus::interface(name = "org.freedesktop.login1.Session")]
    impl FakeSession {
        #[zbus(property)]
        fn idle_hint(&self) -> bool {
            true
        }

        #[zbus(property)]
        fn idle_since_hint(&self) -> u64 {
            self.idle_since_us
        }

        #[zbus(property)]
        fn locked_hint(&self) -> bool {
            true
        }
    }

    /// A private `dbus-daemon` serving fake GNOME Mutter and logind objects; the probe is pointed
    /// at it as both its session and its system bus.
    #[test]
    fn dbus_probe_against_a_private_bus() {
        if !which("dbus-daemon") {
            eprintln!("\n*** SKIPPED dbus_probe_against_a_private_bus: dbus-daemon is not installed ***\n");
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let socket = tmp.path().join("bus");
        let config = tmp.path().join("bus.conf");
        std::fs::write(
            &config,
            format!(
                r#"<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig><type>session</type><listen>unix:path={}</listen><auth>EXTERNAL</auth>
<policy context="default"><allow send_destination="*" eavesdrop="true"/><allow eavesdrop="true"/><allow own="*"/></policy></busconfig>"#,
                socket.display()
            ),
        )
        .unwrap();
        let mut child = Command::new("dbus-daemon")
            .arg(format!("--config-file={}", config.display()))
            .args(["--nofork", "--print-address=1"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let _daemon = Killed(child);
        let mut address = String::new();
        BufReader::new(stdout).read_line(&mut address).unwrap();
        let address = address.trim().to_owned();
        assert!(address.starts_with("unix:"), "{address}");

        let rt = Arc::new(
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .unwrap(),
        );
        let now_us = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_micros() as u64;
        let (mutter, logind) = rt.block_on(async {
            let mutter = zbus::connection::Builder::address(address.as_str())
                .unwrap()
                .name("org.gnome.Mutter.IdleMonitor")
                .unwrap()
                .serve_at("/org/gnome/Mutter/IdleMonitor/Core", FakeMutter)
                .unwrap()
                .build()
                .await
                .unwrap();
            let logind = zbus::connection::Builder::address(address.as_str())
                .unwrap()
                .name("org.freedesktop.login1")
                .unwrap()
                .serve_at("/org/freedesktop/login1", FakeLogindManager)
                .unwrap()
                .serve_at(
                    "/org/freedesktop/login1/session/_31",
                    FakeSession {
                        idle_since_us: now_us - 300_000_000,
                    },
                )
                .unwrap()
                .build()
                .await
                .unwrap();
            (mutter, logind)
        });

        let mut probe = DbusActivityProbe::new(
            BusChoice::Address(address.clone()),
            BusChoice::Address(address.clone()),
        );
        let a = probe.sample();
        println!("private bus: {a:?}");
        assert_eq!(a.idle_s, Reading::Known(4.242), "Mutter's GetIdletime in ms → s");
        assert_eq!(a.locked, Reading::Known(true), "logind LockedHint");
        assert_eq!(
            a.inhibited,
            Reading::Known(true),
            "logind BlockInhibited has idle"
        );
        assert!(!a.fullscreen.is_known());

        // Mutter goes away: the idle time falls back to logind's IdleHint/IdleSinceHint (300 s).
        rt.block_on(async { mutter.close().await.unwrap() });
        std::thread::sleep(Duration::from_millis(600));
        let a = probe.sample();
        println!("without Mutter: {a:?}");
        let idle = a.idle_s.get().expect("logind idle");
        assert!((299.0..310.0).contains(&idle), "{idle}");
        rt.block_on(async { logind.close().await.unwrap() });
    }

    #[test]
    fn dbus_probe_without_buses_is_unknown() {
        let mut probe = DbusActivityProbe::new(
            BusChoice::Address("unix:path=/nonexistent/apiary-bus".into()),
            BusChoice::Address("unix:path=/nonexistent/apiary-system-bus".into()),
        );
        let t = Instant::now();
        let a = probe.sample();
        println!("no buses: {a:?} in {:?}", t.elapsed());
        assert!(a.idle_s.reason().is_some_and(|r| r.contains("D-Bus")), "{a:?}");
        assert!(a.locked.reason().is_some());
        assert!(a.inhibited.reason().is_some());
        assert!(t.elapsed() < Duration::from_secs(3));
    }
}
