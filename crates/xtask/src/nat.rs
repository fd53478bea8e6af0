//! The NAT end-to-end test (`cargo xtask test-nat`, a step of `cargo xtask test`): Apiary volunteers
//! behind home routers that masquerade, reached through a relay, hole punched, cut off and back.
//!
//! The test builds a small simulated internet out of network namespaces, all its own
//! (`apn<pid>-<role>`, deleted at the end, also on failure; ones an earlier run left behind are deleted
//! first):
//!
//! ```text
//!   pub: bridge br0 with 11.0.0.1/24 (relay + bootstrap) and 11.0.0.2/24 (trainer)
//!    ├── r1: wan 11.0.0.11/24 ── MASQUERADE ── lan 192.168.1.1/24 ── h1: eth0 192.168.1.2/24
//!    └── r2: wan 11.0.0.12/24 ── MASQUERADE ── lan 192.168.1.1/24 ── h2: eth0 192.168.1.2/24
//! ```
//!
//! libp2p ignores relay and peer addresses it considers non-public (RFC 1918, CGNAT, the documentation
//! ranges), so the "internet" uses 11.0.0.0/24: it exists only inside these namespaces, which have no
//! link to the host's, so no packet leaves them. Both homes use the same private subnet, as real homes
//! do. The topology is checked first (a home reaches the relay's address and is seen as its router's
//! public address; the public side cannot reach a home host, the router can).
//!
//! Then, with the test run's debug `apiary` (`$CARGO_TARGET_DIR/debug/apiary`), every process with
//! `--json` (stdout and stderr of each saved under `target/e2e/nat/`):
//!
//! 1. a relay + bootstrap DHT node in `pub` (`apiary dht --force-reachability public`);
//! 2. volunteer 1 in h1 (`apiary server --use-auto-relay --trusted-relays RELAY`, AutoNAT decides,
//!    hole punching on) and volunteer 2 in h2 (the same, `--force-reachability private
//!    --no-hole-punching`: the relayed baseline);
//! 3. right after them, a trainer in `pub` (`apiary call`, 20 calls of 4×64 forward and backward to
//!    each): every expert answers; volunteer 2's calls all take the relay; at least one of volunteer 1's
//!    is direct (DCUtR: MASQUERADE keeps ports, the NAT is endpoint-independent). **Time to the first
//!    served request**: a volunteer's spawn to the first successful call to it in this run (the trainer
//!    starts at the same moment and waits for the expert's declaration, so it counts the volunteer's
//!    start, bootstrap, reservation and declaration and the trainer's lookup and relayed dial);
//! 4. throughput of the `ffn` expert (hidden 1024, batch 64, forward and backward, 20 calls) over a
//!    hole-punched direct path and over the relay (a second pair of volunteers, the same flags):
//!    rows/s = 64 ÷ the mean time of the calls that took that path;
//! 5. an outage: home 1's internet connection (router r1's public side) down for 25 s, back with a new
//!    public address (11.0.0.21, as when a router reconnects: the NAT's mappings are gone), then a fresh
//!    trainer must reach volunteer 1 within 90 s; whether it logged a re-bootstrap is reported;
//! 6. two NATs (before 4): a trainer at home 2 calls volunteer 1 at home 1; only DCUtR hole punching can
//!    make that connection direct, and at least one call must be direct;
//! 7. real hivemind: a hivemind relay + bootstrap DHT node and a hivemind trainer in `pub`
//!    (`tests/interop/hivemind_peer.py`), an Apiary server in h1 reserving a circuit on the hivemind
//!    relay; the trainer's calls must succeed through it.
//!
//! The numbers go to `target/bench/nat.md`. Needs root (network namespaces, veth, a bridge, iptables):
//! [`can_run`] says why not; [`test`] then fails with an [`Unsupported`] error the caller can tell
//! apart and warn about loudly.

use std::fmt::Write as _;
use std::fs::File;
use std::io::{BufRead, BufReader, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::{root, show};

/// Namespaces of this test are `apn<pid>-<role>`.
const PREFIX: &str = "apn";

/// The relay and bootstrap node (Apiary's; hivemind's listens on [`HIVEMIND_RELAY_PORT`]).
const RELAY_IP: &str = "11.0.0.1";
const RELAY_PORT: u16 = 4001;
const HIVEMIND_RELAY_PORT: u16 = 4002;
/// The trainer's public address.
const TRAINER_IP: &str = "11.0.0.2";
/// Each home's subnet, its router and its host.
const HOME_NET: &str = "192.168.1.0/24";
const HOME_GW: &str = "192.168.1.1";
const HOME_HOST: &str = "192.168.1.2";

/// Volunteer 1 (h1, hole punching) and volunteer 2 (h2, relayed only).
const UID_PUNCHED: &str = "ffn_nat.0.1";
const UID_RELAYED: &str = "ffn_nat.0.2";
/// The throughput pair (hidden 1024).
const UID_TPUT_DIRECT: &str = "ffn_nat.1.1";
const UID_TPUT_RELAYED: &str = "ffn_nat.1.2";
/// The expert the hivemind trainer calls.
const UID_HIVEMIND: &str = "ffn_hm.0.1";

/// How long home 1's internet connection is down.
const OUTAGE: Duration = Duration::from_secs(25);
/// Router r1's public address after the outage.
const R1_NEW_IP: &str = "11.0.0.21";
const RECOVERY_BOUND: Duration = Duration::from_secs(90);

/// Why this machine cannot run the NAT test (not root, no network namespaces): not a failure of
/// Apiary, but the caller must say loudly that the test did not run.
#[derive(Debug)]
pub struct Unsupported(pub String);

impl std::fmt::Display for Unsupported {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "the NAT test cannot run on this machine: {}", self.0)
    }
}

impl std::error::Error for Unsupported {}

/// Whether this machine can build the test's network namespaces: root, `ip`, and a throw-away
/// namespace holding a bridge and a veth pair.
pub fn can_run() -> Result<(), String> {
    if !is_root() {
        return Err("not root: network namespaces, veth links and iptables need root (CAP_NET_ADMIN)".into());
    }
    if !present("ip") {
        return Err("no `ip` command (Debian package iproute2)".into());
    }
    let probe = format!("{PREFIX}{}-probe", std::process::id());
    let ip = |args: &[&str]| -> Result<(), String> {
        let out = Command::new("ip")
            .args(args)
            .output()
            .map_err(|e| format!("running ip: {e}"))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "`ip {}` failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }
    };
    ip(&["netns", "add", &probe])?;
    let made = ip(&["-n", &probe, "link", "add", "br0", "type", "bridge"]).and_then(|()| {
        ip(&[
            "-n", &probe, "link", "add", "probe0", "type", "veth", "peer", "name", "probe1",
        ])
    });
    let _ = ip(&["netns", "del", &probe]);
    made
}

/// `ip` and `iptables` present (installed with apt-get when missing) and root to use them; shared with
/// `bench moe`'s latency namespace.
pub(crate) fn tools() -> Result<()> {
    let mut missing = Vec::new();
    if !present("ip") {
        missing.push("iproute2");
    }
    if !present("iptables") {
        missing.push("iptables");
    }
    if !is_root() {
        bail!("network namespaces need root");
    }
    if !missing.is_empty() {
        crate::step(
            "install what the network namespaces need",
            Command::new("apt-get")
                .args(["install", "-y", "--no-install-recommends"])
                .args(&missing)
                .env("DEBIAN_FRONTEND", "noninteractive"),
        )?;
    }
    Ok(())
}

/// Deletes the namespaces named `<prefix><pid>…` whose pid is gone (a killed earlier run's); shared
/// with `bench moe`. Processes still inside one are left alone (they are not this run's) and named.
pub(crate) fn remove_stale_namespaces(prefix: &str) {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        let Some(rest) = name.strip_prefix(prefix) else {
            continue;
        };
        let pid: String = rest.chars().take_while(char::is_ascii_digit).collect();
        if pid.is_empty() || !matches!(rest[pid.len()..].chars().next(), None | Some('-')) {
            continue;
        }
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let pids = Command::new("ip")
                .args(["netns", "pids", name])
                .output()
                .map(|o| {
                    String::from_utf8_lossy(&o.stdout)
                        .split_whitespace()
                        .collect::<Vec<_>>()
                        .join(" ")
                })
                .unwrap_or_default();
            if pids.is_empty() {
                eprintln!("xtask: removing the stale namespace {name}");
            } else {
                eprintln!("xtask: removing the stale namespace {name} (processes still in it: {pids})");
            }
            let _ = Command::new("ip").args(["netns", "del", name]).status();
        }
    }
}

fn present(tool: &str) -> bool {
    Command::new(tool)
        .arg("-V")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// The effective uid is 0.
fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status").is_ok_and(|s| {
        s.lines()
            .find(|l| l.starts_with("Uid:"))
            .and_then(|l| l.split_whitespace().nth(2))
            == Some("0")
    })
}

/// `cargo xtask test-nat`: see the module docs.
pub fn test() -> Result<()> {
    eprintln!("\n==> NAT: Apiary behind home routers in a simulated internet (network namespaces)");
    if !is_root() {
        return Err(Unsupported("not root: network namespaces need root (CAP_NET_ADMIN)".into()).into());
    }
    tools()?;
    can_run().map_err(Unsupported)?;
    let bin = crate::dashboard::debug_binary("apiary");
    anyhow::ensure!(
        bin.is_file(),
        "{} is missing: `cargo xtask test` builds it before this step (or `cargo build -p apiary-cli`)",
        bin.display()
    );
    let python = hivemind_python();
    let caps = Caps::detect(&bin, &python);
    let dir = out_dir();
    if dir.exists() {
        std::fs::remove_dir_all(&dir).with_context(|| format!("clearing {}", dir.display()))?;
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    remove_stale_namespaces(PREFIX);

    let t0 = Instant::now();
    let net = Net::create(&format!("{PREFIX}{}", std::process::id()))?;
    net.check()?;
    let mut report = Report::default();
    let result = scenario(&net, &bin, &python, &caps, &mut report);
    // every process of the scenario is stopped by now (dropped); the namespaces go next
    drop(net);
    let took = t0.elapsed().as_secs_f64();
    let mut text = report.render(took);
    if !caps.missing.is_empty() {
        let _ = writeln!(
            text,
            "\n**Not run** (the binaries lack what issue 10's spec asks for): {}.",
            caps.missing.join("; ")
        );
    }
    crate::bench::publish("nat.md", &text)?;
    eprintln!("xtask: logs of every process in {}", dir.display());
    result?;
    if !report.failures.is_empty() {
        bail!("the NAT test failed:\n  - {}", report.failures.join("\n  - "));
    }
    if !caps.missing.is_empty() {
        bail!(
            "the NAT test could not run everything: {}",
            caps.missing.join("; ")
        );
    }
    eprintln!("xtask: the NAT test passed in {took:.0} s");
    Ok(())
}

/// `target/e2e/nat/`: each process's stdout (`<name>.out`) and stderr (`<name>.log`).
fn out_dir() -> PathBuf {
    root().join("target/e2e/nat")
}

/// The hivemind venv's python: `APIARY_HIVEMIND_PYTHON`, else `$APIARY_HIVEMIND_VENV/bin/python`, else
/// the cached venv's (`cargo xtask setup` makes it).
fn hivemind_python() -> PathBuf {
    if let Some(p) = std::env::var_os("APIARY_HIVEMIND_PYTHON") {
        return p.into();
    }
    std::env::var_os("APIARY_HIVEMIND_VENV")
        .map_or_else(|| crate::setup::cache_dir().join("hivemind-venv"), PathBuf::from)
        .join("bin/python")
}

/// What the binaries offer of issue 10's spec (`apiary --help` of each command, `hivemind_peer.py
/// --help`): the test runs what it can and fails at the end naming the rest.
#[derive(Debug, Default)]
struct Caps {
    call: bool,
    force_reachability: bool,
    no_hole_punching: bool,
    hivemind_relay: bool,
    missing: Vec<String>,
}

impl Caps {
    fn detect(bin: &Path, python: &Path) -> Self {
        let help = |cmd: &mut Command| -> Option<String> {
            let out = cmd.arg("--help").output().ok()?;
            out.status
                .success()
                .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
        };
        let dht = help(Command::new(bin).arg("dht")).unwrap_or_default();
        let server = help(Command::new(bin).arg("server")).unwrap_or_default();
        let call = help(Command::new(bin).arg("call"));
        let script = root().join("tests/interop/hivemind_peer.py");
        let peer = help(Command::new(python).arg(&script)).unwrap_or_default();
        let mut caps = Caps {
            call: call.is_some(),
            force_reachability: dht.contains("--force-reachability")
                && server.contains("--force-reachability"),
            no_hole_punching: server.contains("--no-hole-punching"),
            ..Caps::default()
        };
        if !caps.call {
            caps.missing
                .push("`apiary call` (so no calls, paths, throughput or recovery were measured)".into());
        }
        if !caps.force_reachability {
            caps.missing
                .push("`--force-reachability` on `apiary dht`/`server` (ran without it)".into());
        }
        if !caps.no_hole_punching {
            caps.missing
                .push("`--no-hole-punching` on `apiary server` (volunteer 2 ran without it)".into());
        }
        let hm_flags = [
            "--use-relay",
            "--force-reachability",
            "--announce-maddrs",
            "--use-auto-relay",
            "--trusted-relays",
            "--calls",
        ];
        let hm_missing: Vec<&str> = hm_flags.iter().copied().filter(|f| !peer.contains(f)).collect();
        caps.hivemind_relay = !peer.is_empty() && hm_missing.is_empty();
        if peer.is_empty() {
            caps.missing.push(format!(
                "the hivemind venv ({} --help failed; `cargo xtask setup` makes it): the hivemind part did not run",
                python.display()
            ));
        } else if !hm_missing.is_empty() {
            caps.missing.push(format!(
                "tests/interop/hivemind_peer.py lacks {} (the hivemind part did not run)",
                hm_missing.join(", ")
            ));
        }
        caps
    }
}

/// The simulated internet: this run's namespaces, deleted on drop (with any process still in them:
/// they are this run's, e.g. a p2pd whose python was killed).
#[derive(Debug)]
struct Net {
    prefix: String,
    made: Vec<String>,
}

impl Net {
    fn create(prefix: &str) -> Result<Self> {
        eprintln!(
            "\n==> NAT: namespaces {prefix}-{{pub,tr,r1,r2,h1,h2}}: a public bridge ({RELAY_IP}, {TRAINER_IP}), \
             two routers masquerading {HOME_NET}, two homes"
        );
        let mut net = Self {
            prefix: prefix.to_owned(),
            made: Vec::new(),
        };
        for role in ["pub", "tr", "r1", "r2", "h1", "h2"] {
            let name = net.ns(role);
            run_ok(Command::new("ip").args(["netns", "add", &name]))?;
            net.made.push(name);
            net.ip(role, &["link", "set", "lo", "up"])?;
        }
        net.ip("pub", &["link", "add", "br0", "type", "bridge"])?;
        net.ip("pub", &["addr", "add", &format!("{RELAY_IP}/24"), "dev", "br0"])?;
        net.ip("pub", &["link", "set", "br0", "up"])?;
        let public = net.ns("pub");
        // the trainer: a host of its own on the public network (sharing the relay's namespace, its
        // connections to the relay would come from the relay's own address, which peers cannot dial)
        net.ip(
            "tr",
            &[
                "link", "add", "eth0", "type", "veth", "peer", "name", "tr", "netns", &public,
            ],
        )?;
        net.ip("pub", &["link", "set", "tr", "master", "br0", "up"])?;
        net.ip("tr", &["addr", "add", &format!("{TRAINER_IP}/24"), "dev", "eth0"])?;
        net.ip("tr", &["link", "set", "eth0", "up"])?;
        for (i, router, home) in [(1, "r1", "h1"), (2, "r2", "h2")] {
            // the router's public side: a veth whose other end is a port of pub's bridge
            net.ip(
                router,
                &[
                    "link", "add", "wan", "type", "veth", "peer", "name", router, "netns", &public,
                ],
            )?;
            net.ip("pub", &["link", "set", router, "master", "br0", "up"])?;
            net.ip(router, &["addr", "add", &format!("11.0.0.1{i}/24"), "dev", "wan"])?;
            net.ip(router, &["link", "set", "wan", "up"])?;
            // the home side
            let home_ns = net.ns(home);
            net.ip(
                router,
                &[
                    "link", "add", "lan", "type", "veth", "peer", "name", "eth0", "netns", &home_ns,
                ],
            )?;
            net.ip(router, &["addr", "add", &format!("{HOME_GW}/24"), "dev", "lan"])?;
            net.ip(router, &["link", "set", "lan", "up"])?;
            net.ip(home, &["addr", "add", &format!("{HOME_HOST}/24"), "dev", "eth0"])?;
            net.ip(home, &["link", "set", "eth0", "up"])?;
            net.ip(home, &["route", "add", "default", "via", HOME_GW])?;
            run_ok(net.exec(router, "sysctl").args(["-qw", "net.ipv4.ip_forward=1"]))?;
            run_ok(
                net.exec(router, "iptables")
                    .args(["-t", "nat", "-A", "POSTROUTING", "-s", HOME_NET])
                    .args(["-o", "wan", "-j", "MASQUERADE"]),
            )?;
            // as home routers do: unsolicited connections from outside are dropped, not refused (a
            // reset would end a hole punch whose other half is a moment late)
            run_ok(
                net.exec(router, "iptables")
                    .args(["-A", "INPUT", "-i", "wan", "-p", "tcp", "--syn", "-j", "DROP"]),
            )?;
        }
        Ok(net)
    }

    fn ns(&self, role: &str) -> String {
        format!("{}-{role}", self.prefix)
    }

    /// `ip -n <ns> <args>`.
    fn ip(&self, role: &str, args: &[&str]) -> Result<()> {
        run_ok(Command::new("ip").arg("-n").arg(self.ns(role)).args(args))
    }

    /// `program` run inside the namespace (`ip netns exec` execs it: the child's pid is the program's).
    fn exec(&self, role: &str, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns(role)]).arg(program);
        c
    }

    /// The topology does what a NAT does: a home reaches the public side and is seen as its router;
    /// the public side cannot reach a home host (its router can).
    fn check(&self) -> Result<()> {
        for (home, seen) in [("h1", "11.0.0.11"), ("h2", "11.0.0.12")] {
            let listener = self.probe_listen("pub", RELAY_IP, 4999)?;
            run_ok(&mut self.probe_connect(home, RELAY_IP, 4999))
                .with_context(|| format!("{home} cannot reach {RELAY_IP}"))?;
            let peer = listener.wait_line(|l| l != "ready", Duration::from_secs(5), "the peer's address")?;
            anyhow::ensure!(
                peer == seen,
                "the public listener saw {home} as {peer}, not as its router's address {seen}: no NAT"
            );
        }
        let listener = self.probe_listen("h1", HOME_HOST, 4998)?;
        anyhow::ensure!(
            !self.probe_connect("pub", HOME_HOST, 4998).status()?.success(),
            "the public side reached {HOME_HOST} in h1 directly: no NAT"
        );
        run_ok(&mut self.probe_connect("r1", HOME_HOST, 4998)).context("r1 cannot reach its home host")?;
        listener.wait_line(
            |l| l != "ready",
            Duration::from_secs(5),
            "the router's connection",
        )?;
        eprintln!(
            "xtask: topology checked: h1 and h2 reach {RELAY_IP} seen as 11.0.0.11 and 11.0.0.12; {TRAINER_IP}'s side \
             cannot reach {HOME_HOST}, r1 can"
        );
        Ok(())
    }

    fn probe_listen(&self, role: &str, host: &str, port: u16) -> Result<Proc> {
        let mut cmd = self.exec(role, "python3");
        cmd.args(["-c", PROBE, "listen", host, &port.to_string()]);
        let p = Proc::spawn(&format!("probe-{role}-{port}"), &mut cmd, false)?;
        p.wait_line(|l| l == "ready", Duration::from_secs(10), "the probe listener")?;
        Ok(p)
    }

    fn probe_connect(&self, role: &str, host: &str, port: u16) -> Command {
        let mut cmd = self.exec(role, "python3");
        cmd.args(["-c", PROBE, "connect", host, &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        cmd
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        let left = |name: &str| -> Vec<String> {
            Command::new("ip")
                .args(["netns", "pids", name])
                .output()
                .map(|o| {
                    String::from_utf8_lossy(&o.stdout)
                        .split_whitespace()
                        .map(str::to_owned)
                        .collect()
                })
                .unwrap_or_default()
        };
        // this run's processes only (e.g. a p2pd whose python was stopped): SIGTERM, SIGKILL after 3 s
        for signal in ["-TERM", "-KILL"] {
            let pids: Vec<String> = self.made.iter().flat_map(|n| left(n)).collect();
            if pids.is_empty() {
                break;
            }
            eprintln!(
                "xtask: {signal} to {} still in this run's namespaces",
                pids.join(" ")
            );
            for pid in &pids {
                let _ = Command::new("kill").args([signal, pid]).status();
            }
            for _ in 0..30 {
                if self.made.iter().all(|n| left(n).is_empty()) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        for name in &self.made {
            let _ = Command::new("ip").args(["netns", "del", name]).status();
        }
    }
}

/// A TCP probe: `listen HOST PORT` prints `ready`, then the first peer's address; `connect HOST PORT`
/// exits 0 once connected.
const PROBE: &str = r#"
import socket, sys
mode, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
if mode == "listen":
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((host, port))
    s.listen()
    s.settimeout(15)
    print("ready", flush=True)
    conn, peer = s.accept()
    print(peer[0], flush=True)
else:
    socket.create_connection((host, port), timeout=3).close()
"#;

/// Runs a command that must succeed, its output captured (shown on failure).
fn run_ok(cmd: &mut Command) -> Result<()> {
    let out = cmd
        .output()
        .with_context(|| format!("could not start `{}`", show(cmd)))?;
    if !out.status.success() {
        bail!(
            "`{}` failed ({}): {}",
            show(cmd),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// What a process printed on stdout so far, and whether it closed it.
#[derive(Debug, Default)]
struct Lines {
    /// Each line with when it arrived; whether stdout is closed.
    state: Mutex<(Vec<(SystemTime, String)>, bool)>,
    more: Condvar,
}

/// A process this test started: stdout read line by line (also to `<name>.out`), stderr to
/// `<name>.log`; stopped on drop (SIGTERM, SIGKILL after 5 s).
#[derive(Debug)]
struct Proc {
    name: String,
    child: Child,
    lines: Arc<Lines>,
    spawned: SystemTime,
    log: PathBuf,
}

impl Proc {
    /// `keep_stdin`: hold a pipe to its stdin (hivemind_peer.py's `--stop-on-stdin-eof` then ends it
    /// even if this test dies); otherwise stdin is empty.
    fn spawn(name: &str, cmd: &mut Command, keep_stdin: bool) -> Result<Self> {
        let log = out_dir().join(format!("{name}.log"));
        let stderr = File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        eprintln!("    [{name}] $ {}", show(cmd).replace(PROBE, "<tcp probe>"));
        let spawned = SystemTime::now();
        let mut child = cmd
            .stdin(if keep_stdin { Stdio::piped() } else { Stdio::null() })
            .stdout(Stdio::piped())
            .stderr(stderr)
            .env("NO_COLOR", "1")
            .spawn()
            .with_context(|| format!("could not start `{}`", show(cmd)))?;
        let stdout = child.stdout.take().context("no stdout")?;
        let lines = Arc::new(Lines::default());
        let copy = Arc::clone(&lines);
        let saved = out_dir().join(format!("{name}.out"));
        std::thread::spawn(move || {
            let mut file = File::create(saved).ok();
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(f) = file.as_mut() {
                    let _ = writeln!(f, "{line}");
                }
                let mut state = copy.state.lock().unwrap_or_else(|e| e.into_inner());
                state.0.push((SystemTime::now(), line));
                copy.more.notify_all();
            }
            copy.state.lock().unwrap_or_else(|e| e.into_inner()).1 = true;
            copy.more.notify_all();
        });
        Ok(Self {
            name: name.to_owned(),
            child,
            lines,
            spawned,
            log,
        })
    }

    /// The first stdout line `pick` accepts, waiting up to `timeout`.
    fn wait_line(&self, pick: impl Fn(&str) -> bool, timeout: Duration, what: &str) -> Result<String> {
        self.wait_timed_line(pick, timeout, what).map(|(_, l)| l)
    }

    /// The first stdout line `pick` accepts and when it arrived, waiting up to `timeout`.
    fn wait_timed_line(
        &self,
        pick: impl Fn(&str) -> bool,
        timeout: Duration,
        what: &str,
    ) -> Result<(SystemTime, String)> {
        let deadline = Instant::now() + timeout;
        let mut state = self.lines.state.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some((at, line)) = state.0.iter().find(|(_, l)| pick(l.trim())) {
                return Ok((*at, line.trim().to_owned()));
            }
            let now = Instant::now();
            if state.1 || now >= deadline {
                let why = if state.1 { "exited" } else { "timed out" };
                bail!(
                    "[{}] {why} without {what} (after {:.0} s); its log ({}) ends:\n{}",
                    self.name,
                    self.age(),
                    self.log.display(),
                    self.log_tail(15)
                );
            }
            state = self
                .lines
                .more
                .wait_timeout(state, deadline - now)
                .map_or_else(|e| e.into_inner().0, |(s, _)| s);
        }
    }

    /// The first JSON line whose `"event"` is `event`, and how long after the start it came.
    fn wait_event(&self, event: &str, timeout: Duration) -> Result<(Value, f64)> {
        let (at, line) = self.wait_timed_line(
            |l| serde_json::from_str::<Value>(l).is_ok_and(|v| v["event"] == event),
            timeout,
            &format!("a {event:?} line"),
        )?;
        let after = at.duration_since(self.spawned).map_or(0.0, |d| d.as_secs_f64());
        Ok((serde_json::from_str(&line)?, after))
    }

    /// Every JSON line printed so far.
    fn events(&self) -> Vec<Value> {
        self.timed_events().into_iter().map(|(_, v)| v).collect()
    }

    /// Every JSON line printed so far, with when it arrived.
    fn timed_events(&self) -> Vec<(SystemTime, Value)> {
        let state = self.lines.state.lock().unwrap_or_else(|e| e.into_inner());
        state
            .0
            .iter()
            .filter_map(|(t, l)| serde_json::from_str(l).ok().map(|v| (*t, v)))
            .collect()
    }

    /// Waits for it to exit (killed after `timeout`), then for the rest of its stdout.
    fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(status) = self.child.try_wait()? {
                break status;
            }
            if Instant::now() >= deadline {
                self.stop();
                bail!(
                    "[{}] still running after {:.0} s: killed; its log ({}) ends:\n{}",
                    self.name,
                    timeout.as_secs_f64(),
                    self.log.display(),
                    self.log_tail(15)
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        let until = Instant::now() + Duration::from_secs(2);
        let mut state = self.lines.state.lock().unwrap_or_else(|e| e.into_inner());
        while !state.1 && Instant::now() < until {
            state = self
                .lines
                .more
                .wait_timeout(state, Duration::from_millis(100))
                .map_or_else(|e| e.into_inner().0, |(s, _)| s);
        }
        Ok(status)
    }

    /// SIGTERM if it runs (no wait).
    fn terminate(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = Command::new("kill")
                .args(["-TERM", &self.child.id().to_string()])
                .status();
        }
    }

    /// SIGTERM, then SIGKILL if it has not exited within 5 s.
    fn stop(&mut self) {
        self.terminate();
        for _ in 0..50 {
            if !matches!(self.child.try_wait(), Ok(None)) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        eprintln!("xtask: [{}] ignored SIGTERM for 5 s: killed", self.name);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Seconds since it was started.
    fn age(&self) -> f64 {
        self.spawned.elapsed().map_or(0.0, |d| d.as_secs_f64())
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn log_tail(&self, n: usize) -> String {
        let text = self.log_text();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..]
            .iter()
            .map(|l| format!("      {l}"))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Waits up to `timeout` for a stderr line containing `needle`.
    fn wait_log(&self, needle: &str, timeout: Duration) -> Option<String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(line) = self.log_text().lines().find(|l| l.contains(needle)) {
                return Some(line.trim().to_owned());
            }
            let exited = self.lines.state.lock().unwrap_or_else(|e| e.into_inner()).1;
            if Instant::now() >= deadline || exited {
                return None;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop();
    }
}

/// One `{"event":"call"}` line of `apiary call`.
#[derive(Debug, Clone)]
struct Call {
    uid: String,
    ok: bool,
    ms: f64,
    path: String,
    /// When its line arrived (more precise than its `at`, whole seconds).
    seen: SystemTime,
    error: String,
}

impl Call {
    /// Seconds from `t` to this call's line.
    fn after(&self, t: SystemTime) -> f64 {
        self.seen.duration_since(t).map_or(0.0, |d| d.as_secs_f64())
    }
}

fn calls_of(p: &Proc) -> Vec<Call> {
    p.timed_events()
        .into_iter()
        .filter(|(_, v)| v["event"] == "call")
        .map(|(seen, v)| Call {
            uid: v["uid"].as_str().unwrap_or("").to_owned(),
            ok: v["ok"].as_bool().unwrap_or(false),
            ms: v["ms"].as_f64().unwrap_or(f64::NAN),
            path: v["path"].as_str().unwrap_or("unknown").to_owned(),
            seen,
            error: v["error"].as_str().unwrap_or("").to_owned(),
        })
        .collect()
}

/// `R` relayed, `D` direct, `?` unknown, `x` failed, one per call.
fn path_letters(calls: &[&Call]) -> String {
    calls
        .iter()
        .map(|c| match (c.ok, c.path.as_str()) {
            (false, _) => 'x',
            (true, "direct") => 'D',
            (true, "relayed") => 'R',
            _ => '?',
        })
        .collect()
}

/// The distinct errors of the failed calls, each with its count, shortened.
fn errors_of(calls: &[&Call]) -> String {
    let mut seen: Vec<(String, usize)> = Vec::new();
    for c in calls.iter().filter(|c| !c.ok) {
        let short: String = c.error.chars().take(600).collect();
        match seen.iter_mut().find(|(e, _)| *e == short) {
            Some((_, n)) => *n += 1,
            None => seen.push((short, 1)),
        }
    }
    if seen.is_empty() {
        return "none".to_owned();
    }
    seen.iter()
        .map(|(e, n)| format!("{n}× {e:?}"))
        .collect::<Vec<_>>()
        .join("; ")
}

fn mean(values: impl Iterator<Item = f64>) -> Option<f64> {
    let v: Vec<f64> = values.collect();
    (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
}

/// What the scenario measured, and what it found wrong (the test fails on any).
#[derive(Debug, Default)]
struct Report {
    sections: Vec<String>,
    failures: Vec<String>,
}

impl Report {
    fn fail(&mut self, why: String) {
        eprintln!("xtask: NAT FAILURE: {why}");
        self.failures.push(why);
    }

    fn render(&self, took_s: f64) -> String {
        let mut t = String::new();
        let _ = writeln!(
            t,
            "## NAT traversal: volunteers behind home routers (simulated internet)\n"
        );
        let _ = writeln!(
            t,
            "Network namespaces, nothing leaves them: a public bridge with the relay + bootstrap node ({RELAY_IP}) \
             and a trainer ({TRAINER_IP}); two home routers (11.0.0.11, 11.0.0.12; unsolicited inbound connections dropped) masquerading the same \
             {HOME_NET} (iptables MASQUERADE: endpoint-independent, ports kept); one volunteer host per home \
             ({HOME_HOST}). `cargo xtask test-nat`, the debug build, {}; whole test {took_s:.0} s.\n",
            crate::bench::cpu_model()
        );
        for s in &self.sections {
            let _ = writeln!(t, "{s}");
        }
        if !self.failures.is_empty() {
            let _ = writeln!(t, "**Failed:**\n");
            for f in &self.failures {
                let _ = writeln!(t, "- {f}");
            }
        }
        t
    }
}

/// How the scenario starts its processes.
#[derive(Debug)]
struct Ctx<'a> {
    net: &'a Net,
    bin: &'a Path,
    python: &'a Path,
    script: PathBuf,
    caps: &'a Caps,
    /// The Apiary relay's full multiaddr.
    relay: String,
    /// The flags that keep a volunteer relayed (what the binary has of them).
    relayed_only: Vec<&'static str>,
}

impl Ctx<'_> {
    /// `apiary --json` in a namespace.
    fn apiary(&self, role: &str) -> Command {
        let mut c = self.net.exec(role, self.bin);
        c.arg("--json");
        c
    }

    /// An `apiary server` hosting `uid` at home, bootstrapping from and reserving on `relay`.
    fn volunteer(
        &self,
        name: &str,
        role: &str,
        uid: &str,
        hidden: &str,
        relay: &str,
        extra: &[&str],
    ) -> Result<Proc> {
        let mut cmd = self.apiary(role);
        cmd.args([
            "server",
            "--expert-uids",
            uid,
            "--expert-cls",
            "ffn",
            "--hidden-dim",
            hidden,
        ])
        .args(["--update-period", "5", "--host-maddrs", "/ip4/0.0.0.0/tcp/0"])
        .args([
            "--initial-peers",
            relay,
            "--use-auto-relay",
            "--trusted-relays",
            relay,
        ])
        .args(extra);
        Proc::spawn(name, &mut cmd, false)
    }

    /// `apiary call --backward` from the trainer's public address; `shape`: `[hidden, batch, calls,
    /// interval_ms]`.
    fn call(&self, name: &str, uids: &[&str], shape: [&str; 4], wait_s: u64) -> Result<Proc> {
        let [hidden, batch, calls, interval_ms] = shape;
        let mut cmd = self.apiary("tr");
        cmd.args(["call", "--initial-peers", &self.relay])
            .args(["--host-maddrs", &format!("/ip4/{TRAINER_IP}/tcp/0")]);
        for uid in uids {
            cmd.args(["--uid", uid]);
        }
        cmd.args(["--hidden-dim", hidden, "--batch", batch, "--calls", calls])
            .args(["--interval-ms", interval_ms, "--backward"])
            .args(["--wait-s", &wait_s.to_string()]);
        Proc::spawn(name, &mut cmd, false)
    }
}

/// g: a trainer behind NAT too (at home 2) calls volunteer 1 (home 1): nobody can be dialed, so only a
/// DCUtR hole punch (both sides dialing each other's observed address at once, through two
/// MASQUERADE NATs) makes the connection direct.
fn punch(ctx: &Ctx<'_>, report: &mut Report) -> Result<()> {
    eprintln!("\n==> NAT: a trainer at home 2 calls volunteer 1 at home 1 (hole punching through two NATs)");
    let mut cmd = ctx.apiary("h2");
    cmd.args(["call", "--initial-peers", &ctx.relay])
        .args(["--host-maddrs", "/ip4/0.0.0.0/tcp/0", "--uid", UID_PUNCHED])
        .args(["--hidden-dim", "64", "--batch", "4", "--calls", "20"])
        .args(["--interval-ms", "250", "--backward", "--wait-s", "30"]);
    let mut p = Proc::spawn("trainer-h2", &mut cmd, false)?;
    p.wait_exit(Duration::from_secs(90))?;
    let calls = calls_of(&p);
    let ok = calls.iter().filter(|c| c.ok).count();
    let direct = calls.iter().filter(|c| c.ok && c.path == "direct").count();
    let relayed = calls.iter().filter(|c| c.ok && c.path == "relayed").count();
    let per_call = path_letters(&calls.iter().collect::<Vec<_>>());
    let punched = p
        .log_text()
        .contains("hole punching: a relayed connection is now direct");
    let mut s = String::from(
        "### Two NATs: a trainer at home 2 calls volunteer 1 at home 1

Neither side can be dialed; the first          calls go through the relay, and DCUtR hole punching (each side dials the other's observed address at once;          MASQUERADE keeps ports, so the mappings are endpoint-independent) may make the connection direct.

         | calls ok | direct | relayed | per call (R relayed, D direct, x failed) | a hole punch logged |
|---|---|---|---|---|
",
    );
    let _ = writeln!(
        s,
        "| {ok}/{} | {direct} | {relayed} | `{per_call}` | {} |",
        calls.len(),
        if punched { "yes" } else { "no" }
    );
    report.sections.push(s);
    if ok == 0 {
        report.fail(format!(
            "the trainer at home 2 never reached {UID_PUNCHED} ({per_call})"
        ));
    } else if direct == 0 {
        report.fail(format!(
            "hole punching between the two homes made no call direct ({per_call}); see trainer-h2.log and volunteer1-h1.log"
        ));
    }
    Ok(())
}

/// A volunteer of the first pair: its start and reservation.
#[derive(Debug)]
struct Started {
    name: String,
    uid: &'static str,
    spawned: SystemTime,
    ready_s: f64,
}

fn scenario(net: &Net, bin: &Path, python: &Path, caps: &Caps, report: &mut Report) -> Result<()> {
    let script = root().join("tests/interop/hivemind_peer.py");
    // a. the relay and bootstrap node; hivemind's starts now too (python and p2pd take seconds)
    let relay_maddr = format!("/ip4/{RELAY_IP}/tcp/{RELAY_PORT}");
    let mut cmd = net.exec("pub", bin);
    cmd.args([
        "--json",
        "dht",
        "--host-maddrs",
        &relay_maddr,
        "--announce-maddrs",
        &relay_maddr,
    ])
    .arg("--use-relay");
    if caps.force_reachability {
        cmd.args(["--force-reachability", "public"]);
    }
    let relay = Proc::spawn("relay", &mut cmd, false)?;
    let hm_relay = if caps.hivemind_relay {
        let maddr = format!("/ip4/{RELAY_IP}/tcp/{HIVEMIND_RELAY_PORT}");
        let mut cmd = net.exec("pub", python);
        cmd.arg(&script)
            .args(["dht", "--host-maddrs", &maddr, "--announce-maddrs", &maddr])
            .args(["--use-relay", "--force-reachability", "public"])
            .args(["--no-nat-port-map", "--stop-on-stdin-eof"]);
        Some(Proc::spawn("hivemind-relay", &mut cmd, true)?)
    } else {
        None
    };
    let (ready, ready_s) = relay.wait_event("ready", Duration::from_secs(30))?;
    let relay_addr = format!(
        "{relay_maddr}/p2p/{}",
        ready["peer_id"]
            .as_str()
            .context("the relay's ready line has no peer_id")?
    );
    eprintln!("xtask: relay {relay_addr} ready {ready_s:.1} s after start");
    let mut relayed_only = Vec::new();
    if caps.force_reachability {
        relayed_only.extend(["--force-reachability", "private"]);
    }
    if caps.no_hole_punching {
        relayed_only.push("--no-hole-punching");
    }
    let ctx = Ctx {
        net,
        bin,
        python,
        script,
        caps,
        relay: relay_addr,
        relayed_only,
    };

    // b. the volunteers (volunteer 2 stays relayed), c. the trainer started right after them
    let v1 = ctx.volunteer("volunteer1-h1", "h1", UID_PUNCHED, "64", &ctx.relay, &[])?;
    let v2 = ctx.volunteer(
        "volunteer2-h2",
        "h2",
        UID_RELAYED,
        "64",
        &ctx.relay,
        &ctx.relayed_only,
    )?;
    let trainer = if caps.call {
        Some(ctx.call(
            "trainer",
            &[UID_PUNCHED, UID_RELAYED],
            ["64", "4", "20", "250"],
            60,
        )?)
    } else {
        None
    };
    let mut started = Vec::new();
    let mut s = String::from(
        "### Volunteers behind NAT\n\nBoth bootstrap from the relay and reserve a circuit on it \
         (`--use-auto-relay --trusted-relays RELAY`).\n\n\
         | volunteer | ready after spawn | `/p2p-circuit` address in its ready line | relay reservation (its log) |\n\
         |---|---|---|---|\n",
    );
    for (v, uid) in [(&v1, UID_PUNCHED), (&v2, UID_RELAYED)] {
        let (ready, ready_s) = v.wait_event("ready", Duration::from_secs(60))?;
        let circuit = ready["maddrs"].as_array().is_some_and(|m| {
            m.iter()
                .any(|a| a.as_str().is_some_and(|a| a.contains("/p2p-circuit")))
        });
        let reserved = v.wait_log("relay reservation accepted", Duration::from_secs(30));
        eprintln!(
            "xtask: [{}] ready after {ready_s:.1} s (circuit address announced: {circuit}); reservation: {}",
            v.name,
            reserved.as_deref().unwrap_or("NONE")
        );
        let _ = writeln!(
            s,
            "| {} (`{uid}`) | {ready_s:.1} s | {} | {} |",
            v.name,
            if circuit { "yes" } else { "no" },
            if reserved.is_some() { "accepted" } else { "none" }
        );
        if reserved.is_none() {
            report.fail(format!(
                "{} ({uid}) logged no \"relay reservation accepted\" within {:.0} s of its start",
                v.name,
                v.age()
            ));
        }
        started.push(Started {
            name: v.name.clone(),
            uid,
            spawned: v.spawned,
            ready_s,
        });
    }
    report.sections.push(s);

    if let Some(trainer) = trainer {
        if paths(trainer, &started, report)? {
            punch(&ctx, report)?;
            throughput(&ctx, report)?;
            outage(&ctx, &v1, report)?;
        } else {
            report.sections.push(
                "Throughput and outage **not run**: the trainer could not reach every volunteer.\n"
                    .to_owned(),
            );
        }
    }
    drop(v1);
    drop(v2);
    if let Some(hm_relay) = hm_relay {
        hivemind(&ctx, &hm_relay, report)?;
    }
    Ok(())
}

/// c, d: every expert answers, the relayed one only through the relay, the other hole punched; the
/// time to the first served request. Whether every volunteer answered.
fn paths(mut trainer: Proc, started: &[Started], report: &mut Report) -> Result<bool> {
    let status = trainer.wait_exit(Duration::from_secs(120))?;
    let calls = calls_of(&trainer);
    let mut s = String::from(
        "### A trainer on the public side calls both volunteers\n\n`apiary call`: 20 calls, 4×64 rows, forward and \
         backward, 250 ms apart, started with the volunteers. Volunteer 1 (h1): AutoNAT, hole punching on; \
         volunteer 2 (h2): `--force-reachability private --no-hole-punching`.\n\n\
         | volunteer | calls ok | direct | relayed | mean ms (ok calls) | start → first ok call (its path) | per call (R relayed, D direct, x failed) |\n\
         |---|---|---|---|---|---|---|\n",
    );
    let mut reached_all = true;
    for v in started {
        let uid = v.uid;
        let mine: Vec<&Call> = calls.iter().filter(|c| c.uid == uid).collect();
        let ok: Vec<&Call> = mine.iter().copied().filter(|c| c.ok).collect();
        let direct = ok.iter().filter(|c| c.path == "direct").count();
        let relayed = ok.iter().filter(|c| c.path == "relayed").count();
        let first = ok.first().map_or_else(
            || "—".to_owned(),
            |c| format!("{:.1} s ({})", c.after(v.spawned), c.path),
        );
        let letters = path_letters(&mine);
        let _ = writeln!(
            s,
            "| {} (`{uid}`) | {}/{} | {direct} | {relayed} | {} | {first} | `{letters}` |",
            v.name,
            ok.len(),
            mine.len(),
            mean(ok.iter().map(|c| c.ms)).map_or_else(|| "—".into(), |m| format!("{m:.1}")),
        );
        eprintln!(
            "xtask: {uid}: {}/{} ok, per call {letters}; ready after {:.1} s",
            ok.len(),
            mine.len(),
            v.ready_s
        );
        if ok.is_empty() {
            reached_all = false;
            report.fail(format!(
                "no successful call to {uid} (trainer: {status}; {} calls; errors: {})",
                mine.len(),
                errors_of(&mine)
            ));
        }
        if uid == UID_RELAYED && relayed != ok.len() {
            report.fail(format!(
                "{uid} (forced private, no hole punching) was reached other than through the relay: {letters}"
            ));
        }
        if uid == UID_PUNCHED && !ok.is_empty() && direct == 0 {
            report.fail(format!(
                "no call to {uid} went direct: hole punching did not upgrade the relayed connection; per call: \
                 {letters} ({})",
                mine.iter().map(|c| c.path.as_str()).collect::<Vec<_>>().join(" ")
            ));
        }
    }
    let _ = writeln!(
        s,
        "\n\"start → first ok call\": from the volunteer's spawn to the first successful call to it of a trainer \
         started at the same moment (which waits for the expert's declaration in the DHT): the volunteer's start, \
         bootstrap, relay reservation and declaration, the trainer's lookup and its dial through the relay. \
         Volunteer 2's is the time to the first request served through a relay."
    );
    report.sections.push(s);
    Ok(reached_all)
}

/// e: the `ffn` expert's throughput over a hole-punched direct path and over the relay.
fn throughput(ctx: &Ctx<'_>, report: &mut Report) -> Result<()> {
    let v3 = ctx.volunteer(
        "volunteer3-h1-1024",
        "h1",
        UID_TPUT_DIRECT,
        "1024",
        &ctx.relay,
        &[],
    )?;
    let v4 = ctx.volunteer(
        "volunteer4-h2-1024",
        "h2",
        UID_TPUT_RELAYED,
        "1024",
        &ctx.relay,
        &ctx.relayed_only,
    )?;
    let mut s = String::from(
        "### Throughput of the `ffn` expert: direct (upgraded from relayed) vs relayed\n\nHidden 1024, batch 64, forward and \
         backward, 20 calls back to back (`apiary call --hidden-dim 1024 --batch 64 --calls 20 --backward`), one \
         trainer per volunteer, a second pair of volunteers with the same flags as the first. rows/s = 64 ÷ the \
         mean time of the calls that took the path.\n\n\
         | path | volunteer | calls on the path / ok / made | mean ms per call | rows/s | `apiary call`'s rows_per_s (all its ok calls) |\n\
         |---|---|---|---|---|---|\n",
    );
    let mut rates = Vec::new();
    for (name, uid, want, v) in [
        ("throughput-direct", UID_TPUT_DIRECT, "direct", &v3),
        ("throughput-relayed", UID_TPUT_RELAYED, "relayed", &v4),
    ] {
        v.wait_event("ready", Duration::from_secs(30))?;
        // a throughput measure, not a race with the reservation: calls start once the volunteer is
        // reachable through the relay (back-to-back calls would all fail within a second before that)
        let _ = v.wait_log("relay reservation accepted", Duration::from_secs(30));
        let mut p = ctx.call(name, &[uid], ["1024", "64", "20", "0"], 30)?;
        p.wait_exit(Duration::from_secs(150))?;
        let calls = calls_of(&p);
        let ok = calls.iter().filter(|c| c.ok).count();
        let on_path: Vec<&Call> = calls.iter().filter(|c| c.ok && c.path == want).collect();
        let mean_ms = mean(on_path.iter().map(|c| c.ms));
        let rate = mean_ms.map(|m| 64.0 * 1000.0 / m);
        let overall = p
            .events()
            .iter()
            .rev()
            .find(|v| v["event"] == "result")
            .and_then(|v| {
                v["by_uid"][uid]["rows_per_s"]
                    .as_f64()
                    .or_else(|| v["rows_per_s"].as_f64())
            });
        let _ = writeln!(
            s,
            "| {want} | {} (`{uid}`) | {}/{ok}/{} | {} | {} | {} |",
            v.name,
            on_path.len(),
            calls.len(),
            mean_ms.map_or_else(|| "—".into(), |m| format!("{m:.1}")),
            rate.map_or_else(|| "—".into(), |r| format!("{r:.0}")),
            overall.map_or_else(|| "—".into(), |r| format!("{r:.0}")),
        );
        match rate {
            Some(r) => rates.push(r),
            None => report.fail(format!(
                "no {want} call to {uid} to measure ({ok}/{} ok; per call: {}; errors: {})",
                calls.len(),
                path_letters(&calls.iter().collect::<Vec<_>>()),
                errors_of(&calls.iter().collect::<Vec<_>>())
            )),
        }
    }
    if let [direct, relayed] = rates[..] {
        let _ = writeln!(s, "\nDirect ÷ relayed: **{:.2}×**.", direct / relayed);
    }
    report.sections.push(s);
    Ok(())
}

/// f: home 1's connection down and back with a new public address; volunteer 1 must notice (its
/// connections die: the relay resets what comes from the new address), bootstrap again and be
/// reachable again by itself.
fn outage(ctx: &Ctx<'_>, v1: &Proc, report: &mut Report) -> Result<()> {
    eprintln!(
        "\n==> NAT: home 1's internet connection down for {} s, then back with a new public address",
        OUTAGE.as_secs()
    );
    let lines_with = |v: &Proc, needle: &str| v.log_text().lines().filter(|l| l.contains(needle)).count();
    let reservations = |v: &Proc| lines_with(v, "relay reservation accepted");
    let offline = |v: &Proc| lines_with(v, "No peer is connected");
    let reserved_before = reservations(v1);
    let offline_before = offline(v1);
    let down = Instant::now();
    ctx.net.ip("r1", &["link", "set", "wan", "down"])?;
    // the outage is real: h1 reaches nothing
    anyhow::ensure!(
        !ctx.net
            .probe_connect("h1", RELAY_IP, RELAY_PORT)
            .status()?
            .success(),
        "h1 still reached the relay with its router's public side down"
    );
    std::thread::sleep(OUTAGE.saturating_sub(down.elapsed()));
    ctx.net.ip("r1", &["addr", "flush", "dev", "wan"])?;
    ctx.net
        .ip("r1", &["addr", "add", &format!("{R1_NEW_IP}/24"), "dev", "wan"])?;
    ctx.net.ip("r1", &["link", "set", "wan", "up"])?;
    let up_at = SystemTime::now();
    let up = Instant::now();
    let mut recovered = None;
    let mut attempt = 0;
    while recovered.is_none() && up.elapsed() < RECOVERY_BOUND {
        if attempt > 0 {
            std::thread::sleep(Duration::from_secs(1));
        }
        attempt += 1;
        let left = RECOVERY_BOUND.saturating_sub(up.elapsed()).as_secs().max(5);
        let name = format!("recovery-{attempt}");
        let mut p = ctx.call(&name, &[UID_PUNCHED], ["64", "4", "4", "500"], left)?;
        p.wait_exit(Duration::from_secs(left + 30))?;
        recovered = calls_of(&p)
            .into_iter()
            .find(|c| c.ok)
            .map(|c| (c.after(up_at), c.path));
    }
    let rebootstrap = v1
        .log_text()
        .lines()
        .find(|l| l.contains("re-bootstrap"))
        .map(|l| l.trim().to_owned());
    let noticed = offline(v1) > offline_before;
    let mut s = format!(
        "### An outage at home 1\n\nHome 1's internet connection (router r1's public side) down {} s, then back with a \
         new public address ({R1_NEW_IP}: the NAT's mappings are gone, the relay resets what volunteer 1's old \
         connections send); fresh trainers call \
         volunteer 1 (`{UID_PUNCHED}`) until one call succeeds (bound {} s).\n\n| | |\n|---|---|\n",
        OUTAGE.as_secs(),
        RECOVERY_BOUND.as_secs()
    );
    match &recovered {
        Some((after, path)) => {
            let _ = writeln!(
                s,
                "| back online → first successful call (a fresh trainer's; trainers started: {attempt}) | {after:.1} s ({path}) |"
            );
        }
        None => {
            let _ = writeln!(
                s,
                "| back online → first successful call | none within {} s |",
                RECOVERY_BOUND.as_secs()
            );
            report.fail(format!(
                "volunteer 1 ({UID_PUNCHED}) was not reachable again within {} s of its link coming back",
                RECOVERY_BOUND.as_secs()
            ));
        }
    }
    let _ = writeln!(
        s,
        "| relay reservations volunteer 1 logged as accepted: before the outage / by the end | {reserved_before} / {} |",
        reservations(v1)
    );
    let _ = writeln!(
        s,
        "| volunteer 1 said it was offline (status `offline`, \"No peer is connected\") | {} |",
        if noticed { "yes" } else { "no" }
    );
    let _ = writeln!(
        s,
        "| volunteer 1 re-bootstrapped from its initial peers | {} |",
        rebootstrap.as_deref().map_or_else(
            || "not needed: its trusted relay's reservation retry reconnected within the DHT's 1 s grace"
                .to_owned(),
            |l| format!("`{}`", l.replace('|', "/"))
        )
    );
    if !noticed {
        report.fail(format!(
            "volunteer 1 lost its internet connection for {} s but its status never said offline",
            OUTAGE.as_secs()
        ));
    }
    report.sections.push(s);
    Ok(())
}

/// g: real hivemind: its relay and trainer on the public side, an Apiary server at home reserving a
/// circuit on the hivemind relay.
fn hivemind(ctx: &Ctx<'_>, hm_relay: &Proc, report: &mut Report) -> Result<()> {
    let (ready, ready_s) = hm_relay.wait_event("ready", Duration::from_secs(60))?;
    let hm_addr = format!(
        "/ip4/{RELAY_IP}/tcp/{HIVEMIND_RELAY_PORT}/p2p/{}",
        ready["peer_id"]
            .as_str()
            .context("hivemind's ready line has no peer_id")?
    );
    eprintln!("xtask: hivemind relay {hm_addr} ready {ready_s:.1} s after start");
    let forced: &[&str] = if ctx.caps.force_reachability {
        &["--force-reachability", "private"]
    } else {
        &[]
    };
    let v5 = ctx.volunteer(
        "volunteer5-h1-hivemind",
        "h1",
        UID_HIVEMIND,
        "64",
        &hm_addr,
        forced,
    )?;
    v5.wait_event("ready", Duration::from_secs(60))?;
    // p2pd backs off from a peer whose dial failed (5 s and more): a trainer dialing before the
    // reservation exists would fail all its calls, so it starts once the server is reachable
    let reserved = v5
        .wait_log("relay reservation accepted", Duration::from_secs(30))
        .is_some();
    let mut cmd = ctx.net.exec("tr", ctx.python);
    cmd.arg(&ctx.script)
        .args(["call", "--initial-peers", &hm_addr, "--uid", UID_HIVEMIND])
        .args(["--hidden-dim", "64", "--batch", "4", "--backward"])
        .args(["--calls", "10", "--interval-ms", "1000", "--wait-s", "60"]);
    let mut hm_trainer = Proc::spawn("hivemind-trainer", &mut cmd, false)?;
    let status = hm_trainer.wait_exit(Duration::from_secs(120))?;
    let (ok, made, mean_ms) = hivemind_calls(&hm_trainer.events());
    // the call lines carry no timestamp: when the first successful one arrived
    let first_after = hm_trainer
        .timed_events()
        .iter()
        .find(|(_, v)| v["event"] == "call" && v["ok"] == true)
        .and_then(|(t, _)| t.duration_since(v5.spawned).ok())
        .map(|d| d.as_secs_f64());
    let mut s = String::from(
        "### Real hivemind 1.1.12 across the NAT\n\nA hivemind relay + bootstrap DHT node and a hivemind trainer \
         (`RemoteExpert`, `tests/interop/hivemind_peer.py call --calls 10`, 4×64, forward and backward) on the \
         public side; an Apiary `server` in h1 reserving a circuit on the hivemind relay.\n\n| | |\n|---|---|\n",
    );
    let _ = writeln!(
        s,
        "| Apiary's reservation on the hivemind relay | {} |",
        if reserved { "accepted" } else { "none logged" }
    );
    let _ = writeln!(s, "| hivemind trainer's calls ok | {ok}/{made} ({status}) |");
    if let Some(ms) = mean_ms {
        let _ = writeln!(
            s,
            "| mean ms per successful call (forward + backward) | {ms:.1} |"
        );
    }
    if let Some(after) = first_after {
        let _ = writeln!(
            s,
            "| Apiary server's start → the trainer's first successful call (the trainer started once the reservation was accepted) | {after:.1} s |"
        );
    }
    report.sections.push(s);
    if ok == 0 {
        report.fail(format!(
            "the hivemind trainer's calls to Apiary's {UID_HIVEMIND} through the hivemind relay all failed \
             ({status}); see {}",
            hm_trainer.log.display()
        ));
    }
    Ok(())
}

/// `(ok, made, mean forward ms)` of `hivemind_peer.py call --calls N`: `{"event":"call","ok",…}` lines, or
/// a result line with `"ok"`/`"calls"`, or one result line per successful call (`forward_s`).
fn hivemind_calls(events: &[Value]) -> (usize, usize, Option<f64>) {
    let ms = |v: &Value| {
        v["ms"]
            .as_f64()
            .or_else(|| v["forward_s"].as_f64().map(|s| s * 1000.0))
    };
    let call_lines: Vec<&Value> = events.iter().filter(|v| v["event"] == "call").collect();
    if !call_lines.is_empty() {
        let ok: Vec<&&Value> = call_lines.iter().filter(|v| v["ok"] != false).collect();
        return (ok.len(), call_lines.len(), mean(ok.iter().filter_map(|v| ms(v))));
    }
    let results: Vec<&Value> = events.iter().filter(|v| v["event"] == "result").collect();
    if let Some(r) = results.iter().find(|r| r["ok"].is_u64()) {
        let ok = usize::try_from(r["ok"].as_u64().unwrap_or(0)).unwrap_or(0);
        let made = r["calls"]
            .as_u64()
            .map_or(ok, |c| usize::try_from(c).unwrap_or(ok));
        return (ok, made, ms(r));
    }
    let ok: Vec<&&Value> = results.iter().filter(|v| v["forward_s"].is_number()).collect();
    let errors = events.iter().filter(|v| v["event"] == "error").count();
    (ok.len(), ok.len() + errors, mean(ok.iter().filter_map(|v| ms(v))))
}
