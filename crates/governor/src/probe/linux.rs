//! Linux activity: X11 (XScreenSaver idle time, EWMH fullscreen) and D-Bus (GNOME Mutter,
//! freedesktop ScreenSaver, GNOME SessionManager, systemd-logind).
//!
//! [`LinuxActivityProbe`] merges the sources, first known value wins:
//!
//! | reading | sources, in order |
//! |---|---|
//! | idle time | Mutter `org.gnome.Mutter.IdleMonitor.GetIdletime` (ms); `org.freedesktop.ScreenSaver.GetSessionIdleTime` (treated as ms, as KDE implements it); X11 `MIT-SCREEN-SAVER` `QueryInfo`; logind session `IdleHint`/`IdleSinceHint` (coarse: 0 while the hint is off) |
//! | locked | logind session `LockedHint`; `org.freedesktop.ScreenSaver.GetActive`; X11 screensaver state `On` |
//! | fullscreen | X11: `_NET_ACTIVE_WINDOW`'s `_NET_WM_STATE` holds `_NET_WM_STATE_FULLSCREEN`; Wayland gives no way to see other apps' windows, so `Unknown` |
//! | idle inhibited | logind `BlockInhibited` contains `idle`; GNOME `org.gnome.SessionManager.IsInhibited(8)` (where browsers' video inhibitors land) — true if either says so |
//!
//! On a Wayland session (`WAYLAND_DISPLAY` set or `XDG_SESSION_TYPE=wayland`) X11 is not asked
//! unless a display is given explicitly: Xwayland only sees X clients' input, and opening it can
//! hang (BOINC PR #7064). The X11 connection is opened on a helper thread that the probe waits on
//! for at most 200 ms (a slower server is picked up at a later tick); a bus connection gets
//! 500 ms; D-Bus calls time out after 250 ms. A failing source backs off (1 s → 60 s).

use std::sync::mpsc::{Receiver, TryRecvError, sync_channel};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use x11rb::connection::{Connection as _, RequestConnection as _};
use x11rb::protocol::screensaver;
use x11rb::protocol::xproto::{Atom, AtomEnum, ConnectionExt as _, Window};
use x11rb::rust_connection::RustConnection;
use zbus::zvariant::{OwnedObjectPath, OwnedValue};

use super::{ActivityProbe, ActivitySample, Backoff, Reading};

/// How long the probe waits for an X server to accept a connection.
const X11_CONNECT_WAIT: Duration = Duration::from_millis(200);
/// Per-call timeout for D-Bus.
const DBUS_CALL_TIMEOUT: Duration = Duration::from_millis(250);
/// How often the slower D-Bus signals (lock, inhibitors, logind) are read.
const SLOW_EVERY: Duration = Duration::from_millis(500);

struct Atoms {
    active_window: Atom,
    wm_state: Atom,
    fullscreen: Atom,
}

struct X11Conn {
    conn: RustConnection,
    root: Window,
    has_screensaver: bool,
    atoms: Atoms,
}

type ConnectResult = Result<X11Conn, &'static str>;

fn x11_connect(display: Option<&str>) -> ConnectResult {
    let (conn, screen) = RustConnection::connect(display).map_err(|_| "cannot connect to the X server")?;
    let root = conn
        .setup()
        .roots
        .get(screen)
        .map(|s| s.root)
        .ok_or("X server has no such screen")?;
    let has_screensaver = conn
        .extension_information(screensaver::X11_EXTENSION_NAME)
        .map_err(|_| "X server did not answer")?
        .is_some();
    let intern = |name: &[u8]| -> Result<Atom, &'static str> {
        conn.intern_atom(false, name)
            .map_err(|_| "X server did not answer")?
            .reply()
            .map(|r| r.atom)
            .map_err(|_| "X server did not answer")
    };
    let atoms = Atoms {
        active_window: intern(b"_NET_ACTIVE_WINDOW")?,
        wm_state: intern(b"_NET_WM_STATE")?,
        fullscreen: intern(b"_NET_WM_STATE_FULLSCREEN")?,
    };
    Ok(X11Conn {
        conn,
        root,
        has_screensaver,
        atoms,
    })
}

/// X11 idle time (XScreenSaver extension), screensaver state and EWMH fullscreen state.
pub struct X11ActivityProbe {
    display: Option<String>,
    conn: Option<X11Conn>,
    pending: Option<Receiver<ConnectResult>>,
    backoff: Backoff,
}

impl std::fmt::Debug for X11ActivityProbe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("X11ActivityProbe")
            .field("display", &self.display)
            .field("connected", &self.conn.is_some())
            .finish_non_exhaustive()
    }
}

impl X11ActivityProbe {
    /// A probe for `display` (e.g. `":0"`); `None` uses `$DISPLAY`. Connects at the first sample.
    pub fn new(display: Option<String>) -> Self {
        X11ActivityProbe {
            display,
            conn: None,
            pending: None,
            backoff: Backoff::default(),
        }
    }

    fn failed(&mut self, why: &'static str) -> ActivitySample {
        self.conn = None;
        if self.backoff.failed(Instant::now()) {
            tracing::info!(display = ?self.display, reason = why, "X11 activity probe unavailable");
        }
        ActivitySample::unknown(why)
    }

    fn ensure_connected(&mut self) -> Result<(), &'static str> {
        if self.conn.is_some() {
            return Ok(());
        }
        if self.pending.is_none() {
            if !self.backoff.ready(Instant::now()) {
                return Err("X server unavailable (retrying later)");
            }
            let (tx, rx) = sync_channel(1);
            let display = self.display.clone();
            let spawned = std::thread::Builder::new()
                .name("apiary-x11-connect".into())
                .spawn(move || {
                    let _ = tx.send(x11_connect(display.as_deref()));
                });
            if spawned.is_err() {
                return Err("cannot start the X11 connect thread");
            }
            self.pending = Some(rx);
            if let Some(rx) = &self.pending {
                return match rx.recv_timeout(X11_CONNECT_WAIT) {
                    Ok(r) => self.connected(r),
                    Err(_) => Err("X server is not answering"),
                };
            }
        }
        let Some(rx) = &self.pending else {
            return Err("X server is not answering");
        };
        match rx.try_recv() {
            Ok(r) => self.connected(r),
            Err(TryRecvError::Empty) => Err("X server is not answering"),
            Err(TryRecvError::Disconnected) => {
                self.pending = None;
                Err("cannot connect to the X server")
            }
        }
    }

    fn connected(&mut self, r: ConnectResult) -> Result<(), &'static str> {
        self.pending = None;
        let c = r?;
        self.conn = Some(c);
        Ok(())
    }

    fn fullscreen(c: &X11Conn) -> Reading<bool> {
        let active = c
            .conn
            .get_property(false, c.root, c.atoms.active_window, AtomEnum::WINDOW, 0, 1)
            .ok()
            .and_then(|cookie| cookie.reply().ok());
        let Some(window) = active
            .as_ref()
            .and_then(|r| r.value32())
            .and_then(|mut v| v.next())
        else {
            return Reading::Unknown("no window manager publishes _NET_ACTIVE_WINDOW");
        };
        if window == 0 {
            return Reading::Known(false);
        }
        let state = c
            .conn
            .get_property(false, window, c.atoms.wm_state, AtomEnum::ATOM, 0, 64)
            .ok()
            .and_then(|cookie| cookie.reply().ok());
        match state.as_ref().and_then(|r| r.value32()) {
            Some(mut atoms) => Reading::Known(atoms.any(|a| a == c.atoms.fullscreen)),
            // The active window may vanish between the two requests, or carry no state at all.
            None => Reading::Known(false),
        }
    }
}

impl ActivityProbe for X11ActivityProbe {
    fn sample(&mut self) -> ActivitySample {
        if let Err(why) = self.ensure_connected() {
            if self.pending.is_none() && why != "X server unavailable (retrying later)" {
                return self.failed(why);
            }
            return ActivitySample::unknown(why);
        }
        let Some(c) = &self.conn else {
            return ActivitySample::unknown("not connected to X");
        };
        let (idle_s, locked) = if c.has_screensaver {
            match screensaver::query_info(&c.conn, c.root).map(|cookie| cookie.reply()) {
                Ok(Ok(info)) => (
                    Reading::Known(f64::from(info.ms_since_user_input) / 1000.0),
                    Reading::Known(info.state == u8::from(screensaver::State::ON)),
                ),
                _ => return self.failed("X server stopped answering"),
            }
        } else {
            let why = "X server lacks the MIT-SCREEN-SAVER extension";
            (Reading::Unknown(why), Reading::Unknown(why))
        };
        let fullscreen = Self::fullscreen(c);
        if c.conn.flush().is_err() {
            return self.failed("X server stopped answering");
        }
        self.backoff.succeeded();
        ActivitySample {
            idle_s,
            locked,
            fullscreen,
            inhibited: Reading::Unknown("X11 has no idle-inhibit query"),
        }
    }
}

/// Which D-Bus bus to use.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum BusChoice {
    /// The usual one (`DBUS_SESSION_BUS_ADDRESS` / the system bus socket).
    #[default]
    Default,
    /// An explicit address such as `unix:path=/run/user/1000/bus` (tests use a private bus).
    Address(String),
    /// Do not use this bus.
    Disabled,
}

/// One D-Bus value polled at an interval, with back-off on errors.
struct Polled<T> {
    every: Duration,
    next: Option<Instant>,
    backoff: Backoff,
    last: Reading<T>,
    name: &'static str,
}

impl<T: Copy> Polled<T> {
    fn new(name: &'static str, every: Duration) -> Self {
        Polled {
            every,
            next: None,
            backoff: Backoff::default(),
            last: Reading::Unknown("not read yet"),
            name,
        }
    }

    fn due(&self, now: Instant) -> bool {
        self.next.is_none_or(|t| now >= t) && self.backoff.ready(now)
    }

    fn record(&mut self, now: Instant, r: Result<T, zbus::Error>, why: &'static str) {
        self.next = Some(now + self.every);
        match r {
            Ok(v) => {
                self.backoff.succeeded();
                self.last = Reading::Known(v);
            }
            Err(e) => {
                if self.backoff.failed(now) {
                    tracing::debug!(source = self.name, error = %e, "activity source unavailable");
                }
                self.last = Reading::Unknown(why);
            }
        }
    }
}

struct Bus {
    choice: BusChoice,
    conn: Option<zbus::Connection>,
    backoff: Backoff,
    name: &'static str,
}

impl Bus {
    fn new(choice: BusChoice, name: &'static str) -> Self {
        Bus {
            choice,
            conn: None,
            backoff: Backoff::default(),
            name,
        }
    }

    /// Connects if needed; `system` picks the system bus for [`BusChoice::Default`].
    fn get(&mut self, rt: &tokio::runtime::Runtime, system: bool) -> Option<zbus::Connection> {
        if let Some(c) = &self.conn {
            return Some(c.clone());
        }
        let now = Instant::now();
        if self.choice == BusChoice::Disabled || !self.backoff.ready(now) {
            return None;
        }
        let builder = match &self.choice {
            BusChoice::Default if system => zbus::connection::Builder::system(),
            BusChoice::Default => zbus::connection::Builder::session(),
            BusChoice::Address(a) => zbus::connection::Builder::address(a.as_str()),
            BusChoice::Disabled => return None,
        };
        let r = match builder {
            Ok(b) => rt
                .block_on(async { tokio::time::timeout(Duration::from_millis(500), b.build()).await })
                .map_err(|_| zbus::Error::Failure("timed out connecting".into()))
                .and_then(|r| r),
            Err(e) => Err(e),
        };
        match r {
            Ok(c) => {
                self.backoff.succeeded();
                self.conn = Some(c.clone());
                Some(c)
            }
            Err(e) => {
                if self.backoff.failed(now) {
                    tracing::info!(bus = self.name, error = %e, "D-Bus bus unavailable for activity probes");
                }
                None
            }
        }
    }

    /// Drops the connection after a transport error (a method error keeps it).
    fn check(&mut self, e: &zbus::Error) {
        if !matches!(
            e,
            zbus::Error::MethodError(..) | zbus::Error::FDO(_) | zbus::Error::Variant(_)
        ) {
            self.conn = None;
        }
    }
}

async fn call<B, R>(
    conn: &zbus::Connection,
    dest: &str,
    path: &str,
    iface: &str,
    method: &str,
    body: &B,
) -> Result<R, zbus::Error>
where
    B: serde::Serialize + zbus::zvariant::DynamicType,
    R: for<'d> zbus::zvariant::DynamicDeserialize<'d>,
{
    let fut = conn.call_method(Some(dest), path, Some(iface), method, body);
    let msg = tokio::time::timeout(DBUS_CALL_TIMEOUT, fut)
        .await
        .map_err(|_| zbus::Error::Failure("D-Bus call timed out".into()))??;
    msg.body().deserialize::<R>()
}

async fn property<T>(
    conn: &zbus::Connection,
    dest: &str,
    path: &str,
    iface: &str,
    name: &str,
) -> Result<T, zbus::Error>
where
    T: TryFrom<OwnedValue>,
{
    let v: OwnedValue = call(
        conn,
        dest,
        path,
        "org.freedesktop.DBus.Properties",
        "Get",
        &(iface, name),
    )
    .await?;
    T::try_from(v).map_err(|_| zbus::Error::Failure(format!("property {name} has an unexpected type")))
}

const LOGIN1: &str = "org.freedesktop.login1";
const LOGIN1_PATH: &str = "/org/freedesktop/login1";
const LOGIN1_SESSION: &str = "org.freedesktop.login1.Session";

/// Activity through D-Bus: GNOME Mutter, freedesktop ScreenSaver, GNOME SessionManager (session
/// bus) and systemd-logind (system bus). Owns a private current-thread tokio runtime; call
/// [`ActivityProbe::sample`] from a plain thread.
pub struct DbusActivityProbe {
    rt: Option<tokio::runtime::Runtime>,
    session: Bus,
    system: Bus,
    logind_session_path: Option<String>,
    mutter_idle: Polled<f64>,
    screensaver_idle: Polled<f64>,
    screensaver_active: Polled<bool>,
    gnome_inhibited: Polled<bool>,
    logind_idle: Polled<f64>,
    logind_locked: Polled<bool>,
    logind_inhibited: Polled<bool>,
}

impl std::fmt::Debug for DbusActivityProbe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DbusActivityProbe")
            .field("session", &self.session.choice)
            .field("system", &self.system.choice)
            .finish_non_exhaustive()
    }
}

impl DbusActivityProbe {
    /// A probe on the given buses; connects at the first sample.
    pub fn new(session: BusChoice, system: BusChoice) -> Self {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .ok();
        DbusActivityProbe {
            rt,
            session: Bus::new(session, "session"),
            system: Bus::new(system, "system"),
            logind_session_path: None,
            mutter_idle: Polled::new("mutter idle", Duration::ZERO),
            screensaver_idle: Polled::new("screensaver idle", Duration::ZERO),
            screensaver_active: Polled::new("screensaver active", SLOW_EVERY),
            gnome_inhibited: Polled::new("gnome inhibited", SLOW_EVERY),
            logind_idle: Polled::new("logind idle", SLOW_EVERY),
            logind_locked: Polled::new("logind locked", SLOW_EVERY),
            logind_inhibited: Polled::new("logind inhibited", SLOW_EVERY),
        }
    }

    fn poll_session(&mut self, rt: &tokio::runtime::Runtime, now: Instant) {
        let Some(conn) = self.session.get(rt, false) else {
            let why = "no D-Bus session bus";
            for p in [&mut self.mutter_idle, &mut self.screensaver_idle] {
                p.last = Reading::Unknown(why);
            }
            for p in [&mut self.screensaver_active, &mut self.gnome_inhibited] {
                p.last = Reading::Unknown(why);
            }
            return;
        };
        // Mutter first; the freedesktop ScreenSaver idle time only while Mutter is missing.
        if self.mutter_idle.due(now) {
            let r = rt.block_on(call::<_, u64>(
                &conn,
                "org.gnome.Mutter.IdleMonitor",
                "/org/gnome/Mutter/IdleMonitor/Core",
                "org.gnome.Mutter.IdleMonitor",
                "GetIdletime",
                &(),
            ));
            if let Err(e) = &r {
                self.session.check(e);
            }
            self.mutter_idle.record(
                now,
                r.map(|ms| ms as f64 / 1000.0),
                "GNOME Mutter idle monitor not available",
            );
        }
        if !self.mutter_idle.last.is_known() && self.screensaver_idle.due(now) {
            let r = rt.block_on(call::<_, u32>(
                &conn,
                "org.freedesktop.ScreenSaver",
                "/org/freedesktop/ScreenSaver",
                "org.freedesktop.ScreenSaver",
                "GetSessionIdleTime",
                &(),
            ));
            if let Err(e) = &r {
                self.session.check(e);
            }
            self.screensaver_idle.record(
                now,
                r.map(|ms| f64::from(ms) / 1000.0),
                "freedesktop ScreenSaver idle time not available",
            );
        }
        if self.screensaver_active.due(now) {
            let r = rt.block_on(call::<_, bool>(
                &conn,
                "org.freedesktop.ScreenSaver",
                "/org/freedesktop/ScreenSaver",
                "org.freedesktop.ScreenSaver",
                "GetActive",
                &(),
            ));
            if let Err(e) = &r {
                self.session.check(e);
            }
            self.screensaver_active
                .record(now, r, "freedesktop ScreenSaver not available");
        }
        if self.gnome_inhibited.due(now) {
            // GSM_INHIBITOR_FLAG_IDLE = 8
            let r = rt.block_on(call::<_, bool>(
                &conn,
                "org.gnome.SessionManager",
                "/org/gnome/SessionManager",
                "org.gnome.SessionManager",
                "IsInhibited",
                &(8u32,),
            ));
            if let Err(e) = &r {
                self.session.check(e);
            }
            self.gnome_inhibited
                .record(now, r, "GNOME session manager not available");
        }
    }

    fn poll_system(&mut self, rt: &tokio::runtime::Runtime, now: Instant) {
        let Some(conn) = self.system.get(rt, true) else {
            let why = "no D-Bus system bus";
            self.logind_idle.last = Reading::Unknown(why);
            self.logind_locked.last = Reading::Unknown(why);
            self.logind_inhibited.last = Reading::Unknown(why);
            return;
        };
        if self.logind_inhibited.due(now) {
            let r = rt.block_on(property::<String>(
                &conn,
                LOGIN1,
                LOGIN1_PATH,
                "org.freedesktop.login1.Manager",
                "BlockInhibited",
            ));
            if let Err(e) = &r {
                self.system.check(e);
            }
            self.logind_inhibited.record(
                now,
                r.map(|what| what.split(':').any(|w| w == "idle")),
                "systemd-logind not available",
            );
        }
        if !(self.logind_idle.due(now) || self.logind_locked.due(now)) {
            return;
        }
        if self.logind_session_path.is_none() {
            let r = rt.block_on(call::<_, OwnedObjectPath>(
                &conn,
                LOGIN1,
                LOGIN1_PATH,
                "org.freedesktop.login1.Manager",
                "GetSessionByPID",
                &(std::process::id(),),
            ));
            self.logind_session_path = Some(r.map_or_else(
                |_| "/org/freedesktop/login1/session/auto".to_owned(),
                |p| p.as_str().to_owned(),
            ));
        }
        let path = self.logind_session_path.clone().unwrap_or_default();
        if self.logind_idle.due(now) {
            let r = rt.block_on(async {
                let hint: bool = property(&conn, LOGIN1, &path, LOGIN1_SESSION, "IdleHint").await?;
                if !hint {
                    return Ok(0.0);
                }
                let since_us: u64 = property(&conn, LOGIN1, &path, LOGIN1_SESSION, "IdleSinceHint").await?;
                let now_us = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map_or(0, |d| d.as_micros() as u64);
                Ok(now_us.saturating_sub(since_us) as f64 / 1e6)
            });
            if let Err(e) = &r {
                self.system.check(e);
            }
            self.logind_idle
                .record(now, r, "no logind session for this process");
        }
        if self.logind_locked.due(now) {
            let r = rt.block_on(property::<bool>(
                &conn,
                LOGIN1,
                &path,
                LOGIN1_SESSION,
                "LockedHint",
            ));
            if let Err(e) = &r {
                self.system.check(e);
            }
            self.logind_locked
                .record(now, r, "no logind session for this process");
        }
    }
}

fn any_true(readings: &[Reading<bool>]) -> Reading<bool> {
    if readings.contains(&Reading::Known(true)) {
        return Reading::Known(true);
    }
    readings
        .iter()
        .copied()
        .find(Reading::is_known)
        .unwrap_or_else(|| readings.first().copied().unwrap_or(Reading::Unknown("no source")))
}

impl ActivityProbe for DbusActivityProbe {
    fn sample(&mut self) -> ActivitySample {
        let Some(rt) = self.rt.take() else {
            return ActivitySample::unknown("cannot start the D-Bus runtime");
        };
        let now = Instant::now();
        self.poll_session(&rt, now);
        self.poll_system(&rt, now);
        self.rt = Some(rt);
        ActivitySample {
            idle_s: self
                .mutter_idle
                .last
                .or(self.screensaver_idle.last)
                .or(self.logind_idle.last),
            locked: self.logind_locked.last.or(self.screensaver_active.last),
            fullscreen: Reading::Unknown("D-Bus gives no fullscreen state"),
            inhibited: any_true(&[self.logind_inhibited.last, self.gnome_inhibited.last]),
        }
    }
}

/// Where [`LinuxActivityProbe`] looks.
#[derive(Debug, Clone, Default)]
pub struct LinuxActivityConfig {
    /// X display to ask (e.g. `":0"`); `None` disables X11.
    pub x11_display: Option<String>,
    /// The session bus (Mutter, ScreenSaver, GNOME SessionManager).
    pub session_bus: BusChoice,
    /// The system bus (logind).
    pub system_bus: BusChoice,
}

/// Every Linux activity source, merged (see the module docs).
#[derive(Debug)]
pub struct LinuxActivityProbe {
    x11: Option<X11ActivityProbe>,
    dbus: DbusActivityProbe,
    wayland: bool,
}

impl LinuxActivityProbe {
    /// Probes configured explicitly.
    pub fn new(config: LinuxActivityConfig) -> Self {
        let wayland = std::env::var_os("WAYLAND_DISPLAY").is_some()
            || std::env::var("XDG_SESSION_TYPE").is_ok_and(|t| t == "wayland");
        LinuxActivityProbe {
            x11: config.x11_display.map(|d| X11ActivityProbe::new(Some(d))),
            dbus: DbusActivityProbe::new(config.session_bus, config.system_bus),
            wayland,
        }
    }

    /// Probes chosen from the environment: X11 on `$DISPLAY` unless the session is Wayland, and
    /// the default session and system buses.
    pub fn from_env() -> Self {
        let wayland = std::env::var_os("WAYLAND_DISPLAY").is_some()
            || std::env::var("XDG_SESSION_TYPE").is_ok_and(|t| t == "wayland");
        let display = std::env::var("DISPLAY")
            .ok()
            .filter(|d| !d.is_empty() && !wayland);
        Self::new(LinuxActivityConfig {
            x11_display: display,
            ..LinuxActivityConfig::default()
        })
    }
}

impl ActivityProbe for LinuxActivityProbe {
    fn sample(&mut self) -> ActivitySample {
        let d = self.dbus.sample();
        let Some(x) = self.x11.as_mut().map(|x| x.sample()) else {
            let mut d = d;
            if !d.idle_s.is_known() {
                d.idle_s = Reading::Unknown(if self.wayland {
                    "no idle-time source: no Mutter or ScreenSaver idle service, no logind session"
                } else {
                    "no idle-time source: no X display, no D-Bus idle service, no logind session"
                });
            }
            d.fullscreen = Reading::Unknown(if self.wayland {
                "Wayland does not expose other apps' fullscreen state"
            } else {
                "no X display to read the fullscreen state from"
            });
            return d;
        };
        ActivitySample {
            // D-Bus idle sources first, except logind's coarse hint, which comes after X11.
            idle_s: self
                .dbus
                .mutter_idle
                .last
                .or(self.dbus.screensaver_idle.last)
                .or(x.idle_s)
                .or(d.idle_s),
            locked: d.locked.or(x.locked),
            fullscreen: x.fullscreen,
            inhibited: d.inhibited,
        }
    }
}
