//! [`NodeConfig`]: the node's settings, kept in a TOML file (`node.toml`).

use std::path::{Path, PathBuf};
use std::time::Duration;

use apiary_governor::PolicyConfig;
use serde::{Deserialize, Serialize};

/// The file name of the node's settings inside the platform's config folder.
pub const CONFIG_FILE: &str = "node.toml";

/// The node's settings. Every field has a default (`#[serde(default)]`), so a file may set only what
/// it changes; an empty or missing file is the defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct NodeConfig {
    /// Where the ledger, the policy state, the joined experiments and the checkpoints live.
    /// Default: the platform's data folder + `apiary` (`$XDG_DATA_HOME/apiary` on Linux), or
    /// `./apiary` where the platform has none.
    pub data_dir: PathBuf,
    /// Multiaddrs the p2p host listens on. Default `["/ip4/0.0.0.0/tcp/0"]`.
    pub listen_maddrs: Vec<String>,
    /// Full multiaddrs (with `/p2p/`) of the DHT peers to bootstrap from. Default: the bundled
    /// bootstrap list ([`apiary_catalog::bundled::bootstrap_peers`], empty until public bootstrap
    /// nodes exist). An empty list starts the node alone; unreachable peers are logged, not fatal.
    pub initial_peers: Vec<String>,
    /// Run the DHT as a client (no incoming DHT requests; for nodes behind NAT). Default false.
    pub client_mode: bool,
    /// How often declarations and roster entries are refreshed and checkpoints saved, in seconds
    /// (a float in TOML). Default 30 s; declarations live two periods (at least 3 s).
    #[serde(with = "seconds")]
    pub update_period: Duration,
    /// How often the joined experiments' catalog entries are read again, in seconds (a float in
    /// TOML): an experiment its publisher marked finished, or whose experts changed, is left (with
    /// its checkpoints kept); one whose entry vanished is hosted until its manifest expires.
    /// Default 60 s.
    #[serde(with = "seconds")]
    pub catalog_check_period: Duration,
    /// Start paused when there is no saved policy state yet (the first run): the UI asks the user
    /// before the node computes anything. A saved state (a snooze, a pause, a resume) always wins.
    /// Default true.
    pub start_paused: bool,
    /// The most experts joined per experiment, unless a join says otherwise. Default none (the
    /// hardware fit decides).
    pub max_experts: Option<usize>,
    /// The governor's settings (mode, levels, protection rules, schedule). The mode also picks the
    /// memory budget of join planning: Quiet → Quiet, Balanced and Only-when-away → Balanced,
    /// Max → Max. Default [`PolicyConfig::default`].
    pub policy: PolicyConfig,
    /// Where experts compute: `"auto"` (the first CUDA GPU when this build has CUDA support and a
    /// GPU is found, else the CPU), `"cpu"`, or `"cuda:N"` (GPU N in NVML order, the order
    /// `GET /api/machine` lists them; a build without CUDA support refuses it at join time).
    /// Applies to experts joined after a change. Default `"auto"`.
    pub device: DeviceChoice,
    /// How the node gets through NAT: relays, hole punching, port mapping, reachability. Default
    /// [`NetworkConfig::default`] (a home PC's: auto relay on, no relay service).
    pub network: NetworkConfig,
}

/// How the p2p host gets through NAT (hivemind's `P2P.create` options, same names).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct NetworkConfig {
    /// Dial peers through circuit relays (libp2p circuit relay v2 client) and upgrade such connections
    /// to direct ones by hole punching. Default true (hivemind's `use_relay`).
    pub use_relay: bool,
    /// When this node is private (AutoNAT, or `force_reachability`), hold circuit reservations on the
    /// trusted relays and on up to [`AUTO_RELAYS`] connected peers offering the relay service, so that
    /// trainers can call in through them (hivemind's `use_auto_relay`). Implies `use_relay`. Default true
    /// in the node (a home PC is usually behind NAT); the `apiary dht|server` commands default to off, as
    /// hivemind's.
    pub use_auto_relay: bool,
    /// Relays to reserve circuits on at once (full multiaddrs with `/p2p/`), kept with a 1–30 s
    /// backoff. Implies `use_auto_relay`. Default none.
    pub trusted_relays: Vec<String>,
    /// Relay for others (circuit relay v2 service, with [`apiary_p2p::RelayLimits::default`]'s limits:
    /// 128 reservations, 16 circuits per peer, 30 min and 8 GiB per circuit). It serves only once the
    /// node is known to be reachable. Default false on a home PC; `apiary dht` turns it on.
    pub relay_service: bool,
    /// Skip AutoNAT's finding: `"public"` (dialable: no relay reservations) or `"private"` (behind NAT:
    /// reserve relays at once). Default none: AutoNAT decides.
    pub force_reachability: Option<ForceReachability>,
    /// Ask the home router for a port mapping with UPnP (only tried where the node listens on a private
    /// or unspecified IPv4 address: the only case a mapping can help). Default true (hivemind's
    /// `nat_port_map`).
    pub nat_port_map: bool,
    /// Addresses to announce instead of the observed ones (explicit ports), e.g. a port forwarded by
    /// hand. Default none.
    pub announce_maddrs: Vec<String>,
    /// Upgrade relayed connections to direct ones with DCUtR hole punching. Default true (p2pd enables
    /// it with AutoNAT).
    pub hole_punching: bool,
}

/// How many discovered relays auto relay holds reservations on (besides the trusted ones): two keep the
/// node reachable while one of them leaves.
pub const AUTO_RELAYS: usize = 2;

/// A reachability set by hand.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ForceReachability {
    /// Peers can dial this node directly.
    Public,
    /// They cannot: use relays.
    Private,
}

impl std::str::FromStr for ForceReachability {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "public" => Ok(ForceReachability::Public),
            "private" => Ok(ForceReachability::Private),
            other => Err(format!("`{other}`: expected public or private")),
        }
    }
}

impl Default for NetworkConfig {
    fn default() -> Self {
        NetworkConfig {
            use_relay: true,
            use_auto_relay: true,
            trusted_relays: Vec::new(),
            relay_service: false,
            force_reachability: None,
            nat_port_map: true,
            announce_maddrs: Vec::new(),
            hole_punching: true,
        }
    }
}

impl NetworkConfig {
    /// These settings applied to `p2p` (whose `listen_addrs` must be set already: UPnP is only started
    /// where a listen address is private or unspecified IPv4). AutoNAT is always on. Fails on an address
    /// that is not a multiaddr, or a trusted relay without `/p2p/`.
    pub fn apply(&self, mut p2p: apiary_p2p::P2pConfig) -> Result<apiary_p2p::P2pConfig, String> {
        let parse = |what: &str, list: &[String]| -> Result<Vec<apiary_p2p::Multiaddr>, String> {
            list.iter()
                .map(|a| {
                    a.parse()
                        .map_err(|e| format!("{what}: `{a}` is not a multiaddr: {e}"))
                })
                .collect()
        };
        let trusted = parse("trusted_relays", &self.trusted_relays)?;
        if let Some(bad) = trusted
            .iter()
            .find(|a| !matches!(a.iter().last(), Some(apiary_p2p::Protocol::P2p(_))))
        {
            return Err(format!("trusted_relays: `{bad}` must end with /p2p/<peer id>"));
        }
        let auto_relay = self.use_auto_relay || !trusted.is_empty();
        p2p.relay_client = self.use_relay || auto_relay;
        p2p.dcutr = p2p.relay_client && self.hole_punching;
        p2p.auto_relay_reservations = if auto_relay { AUTO_RELAYS } else { 0 };
        p2p.trusted_relays = trusted;
        p2p.relay_service = self.relay_service.then(apiary_p2p::RelayLimits::default);
        p2p.force_reachability = self.force_reachability.map(|f| match f {
            ForceReachability::Public => apiary_p2p::Reachability::Public,
            ForceReachability::Private => apiary_p2p::Reachability::Private,
        });
        p2p.autonat = true;
        p2p.upnp = self.nat_port_map && p2p.listen_addrs.iter().any(upnp_can_map);
        p2p.external_addrs = parse("announce_maddrs", &self.announce_maddrs)?;
        Ok(p2p)
    }
}

/// Whether a UPnP mapping could help a listener on `addr`: a private or unspecified IPv4 address (a
/// public one needs none; loopback cannot be mapped).
fn upnp_can_map(addr: &apiary_p2p::Multiaddr) -> bool {
    matches!(addr.iter().next(), Some(apiary_p2p::Protocol::Ip4(ip)) if ip.is_private() || ip.is_unspecified())
}

/// Where experts compute: the `device` setting (`auto`, `cpu` or `cuda:N` as text).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum DeviceChoice {
    /// The first CUDA GPU when this build has CUDA support and a GPU is found; else the CPU.
    #[default]
    Auto,
    /// The CPU.
    Cpu,
    /// CUDA GPU `N` (NVML order).
    Cuda(u32),
}

/// The largest GPU index `cuda:N` accepts.
pub const MAX_GPU_INDEX: u32 = 63;

/// Why a `device` setting's text is not a device.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "`{text}` is not a device: expected `auto`, `cpu` or `cuda:N` (N = a GPU's index, 0 to \
     {MAX_GPU_INDEX}, e.g. `cuda:0`)"
)]
pub struct BadDevice {
    /// The text (at most 64 characters of it).
    pub text: String,
}

impl DeviceChoice {
    /// Whether this build can compute on CUDA GPUs (built with the `cuda` feature).
    pub const CUDA_BUILD: bool = cfg!(feature = "cuda");

    /// The GPU the experts of this choice compute on (NVML index), as far as the setting says:
    /// `cuda:N` → N; `auto` → GPU 0 in a build with CUDA support (the GPU rules then watch GPU 0,
    /// and a machine without one has nothing to watch anyway); `cpu`, or `auto` without CUDA
    /// support → none.
    pub fn gpu(self) -> Option<u32> {
        match self {
            DeviceChoice::Cuda(n) => Some(n),
            DeviceChoice::Auto if Self::CUDA_BUILD => Some(0),
            DeviceChoice::Auto | DeviceChoice::Cpu => None,
        }
    }

    /// Checks that this build can honour the choice: `cuda:N` needs the `cuda` feature.
    pub fn check_supported(self) -> Result<Self, String> {
        match self {
            DeviceChoice::Cuda(n) if !Self::CUDA_BUILD => Err(format!(
                "`cuda:{n}` cannot be used: this build of Apiary has no CUDA support (built without \
                 the `cuda` feature); choose `auto` or `cpu`"
            )),
            other => Ok(other),
        }
    }
}

impl std::str::FromStr for DeviceChoice {
    type Err = BadDevice;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let bad = || BadDevice {
            text: text.chars().take(64).collect(),
        };
        match text {
            "auto" => Ok(DeviceChoice::Auto),
            "cpu" => Ok(DeviceChoice::Cpu),
            other => {
                let digits = other.strip_prefix("cuda:").ok_or_else(bad)?;
                // digits only: no sign, no spaces
                if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(bad());
                }
                match digits.parse::<u32>() {
                    Ok(n) if n <= MAX_GPU_INDEX => Ok(DeviceChoice::Cuda(n)),
                    _ => Err(bad()),
                }
            }
        }
    }
}

impl std::fmt::Display for DeviceChoice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DeviceChoice::Auto => f.write_str("auto"),
            DeviceChoice::Cpu => f.write_str("cpu"),
            DeviceChoice::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

impl Serialize for DeviceChoice {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for DeviceChoice {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

impl Default for NodeConfig {
    fn default() -> Self {
        NodeConfig {
            data_dir: dirs::data_dir().map_or_else(|| PathBuf::from("apiary"), |d| d.join("apiary")),
            listen_maddrs: vec!["/ip4/0.0.0.0/tcp/0".to_owned()],
            initial_peers: apiary_catalog::bundled::bootstrap_peers(),
            client_mode: false,
            update_period: Duration::from_secs(30),
            catalog_check_period: Duration::from_secs(60),
            start_paused: true,
            max_experts: None,
            policy: PolicyConfig::default(),
            device: DeviceChoice::Auto,
            network: NetworkConfig::default(),
        }
    }
}

/// Why the settings could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file exists but could not be read, or could not be written.
    #[error("cannot {what} {}: {source}", path.display())]
    Io {
        /// `read` or `write`.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML or has a field of the wrong type (the message names the line).
    #[error("{} is not a valid node config: {message}", path.display())]
    Malformed {
        /// The file.
        path: PathBuf,
        /// The parser's message, with the line and column.
        message: String,
    },
    /// The settings could not be written as TOML.
    #[error("cannot write the node config as TOML: {0}")]
    Serialize(#[from] toml::ser::Error),
    /// The platform has no config folder.
    #[error("this system has no config folder")]
    NoConfigDir,
}

impl NodeConfig {
    /// `<platform config folder>/apiary/node.toml` (`$XDG_CONFIG_HOME/apiary/node.toml` on Linux).
    pub fn default_path() -> Result<PathBuf, ConfigError> {
        dirs::config_dir()
            .map(|d| d.join("apiary").join(CONFIG_FILE))
            .ok_or(ConfigError::NoConfigDir)
    }

    /// Reads `path`; a missing file is the defaults, a malformed one an error naming the file and line.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Self::default()),
            Err(source) => {
                return Err(ConfigError::Io {
                    what: "read",
                    path: path.to_owned(),
                    source,
                });
            }
        };
        Self::from_toml(&text).map_err(|message| ConfigError::Malformed {
            path: path.to_owned(),
            message,
        })
    }

    /// Parses TOML text (the error is the parser's message, with line and column).
    pub fn from_toml(text: &str) -> Result<Self, String> {
        toml::from_str(text).map_err(|e| e.to_string().trim_end().to_owned())
    }

    /// Writes the settings to `path` atomically (a temporary file beside it, then a rename), creating
    /// the folder when missing.
    pub fn save(&self, path: &Path) -> Result<(), ConfigError> {
        let text = toml::to_string_pretty(self)?;
        write_atomic(path, text.as_bytes()).map_err(|source| ConfigError::Io {
            what: "write",
            path: path.to_owned(),
            source,
        })
    }

    /// The memory budget join planning uses for the governor's mode.
    pub fn planning_mode(&self) -> apiary_catalog::Mode {
        planning_mode(self.policy.mode)
    }
}

/// The catalog's planning mode for a governor mode: Quiet → Quiet, Balanced and Only-when-away →
/// Balanced, Max → Max.
pub fn planning_mode(mode: apiary_governor::Mode) -> apiary_catalog::Mode {
    match mode {
        apiary_governor::Mode::Quiet => apiary_catalog::Mode::Quiet,
        apiary_governor::Mode::Balanced | apiary_governor::Mode::OnlyWhenAway => {
            apiary_catalog::Mode::Balanced
        }
        apiary_governor::Mode::Max => apiary_catalog::Mode::Max,
    }
}

/// Writes `bytes` to `path` through a temporary file in the same folder and a rename, so readers
/// see the old or the new content, never a part.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_owned(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&dir)?;
    let name = path
        .file_name()
        .map_or_else(|| "file".into(), |n| n.to_string_lossy().into_owned());
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// `Duration` as a float of seconds.
mod seconds {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_f64(d.as_secs_f64())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let secs = f64::deserialize(d)?;
        if !(secs.is_finite() && secs > 0.0 && secs <= 86_400.0) {
            return Err(serde::de::Error::custom(format!(
                "{secs} is not a number of seconds in (0, 86400]"
            )));
        }
        Ok(Duration::from_secs_f64(secs))
    }
}

/// The longest snooze a UI may ask for (a year), in seconds.
pub const MAX_SNOOZE_S: f64 = 365.0 * 86_400.0;

/// Checks a snooze length from a UI: a number of seconds in (0, [`MAX_SNOOZE_S`]].
pub fn check_snooze(seconds: f64) -> Result<Duration, String> {
    if seconds.is_finite() && seconds > 0.0 && seconds <= MAX_SNOOZE_S {
        Ok(Duration::from_secs_f64(seconds))
    } else {
        Err(format!("`seconds` must be a number in (0, {MAX_SNOOZE_S}]"))
    }
}

/// Checks an experiment id from a UI: 1 to 256 characters, none of them control characters.
pub fn check_experiment_id(id: &str) -> Result<(), String> {
    if id.is_empty() || id.len() > 256 || id.chars().any(char::is_control) {
        return Err("an experiment id is 1 to 256 printable characters".to_owned());
    }
    Ok(())
}

/// The range `temperature_target_c` may take (°C): GPUs throttle themselves above ≈ 83–90 °C.
pub const TEMPERATURE_TARGET_C: (f64, f64) = (40.0, 95.0);

/// Checks a policy from a UI before it is applied: every number finite and ≥ 0, the temperature
/// target within [`TEMPERATURE_TARGET_C`]. The message names the field.
pub fn check_policy(policy: &apiary_governor::PolicyConfig) -> Result<(), String> {
    let numbers = [
        ("idle_threshold_s", policy.idle_threshold_s),
        ("in_use_level", policy.in_use_level),
        ("away_level", policy.away_level),
        ("quiet_in_use_level", policy.quiet_in_use_level),
        ("quiet_away_level", policy.quiet_away_level),
        ("manual_in_use_level", policy.manual_in_use_level),
        ("gpu_other_threshold", policy.gpu_other_threshold),
        ("min_battery_percent", policy.min_battery_percent),
        ("cooldown_s", policy.cooldown_s),
        ("finish_timeout_s", policy.finish_timeout_s),
        ("away_start_delay_s", policy.away_start_delay_s),
    ];
    if let Some((name, v)) = numbers.iter().find(|(_, v)| !(v.is_finite() && *v >= 0.0)) {
        return Err(format!("`{name}` must be a number ≥ 0, not {v}"));
    }
    let t = policy.temperature_target_c;
    let (low, high) = TEMPERATURE_TARGET_C;
    if !(t.is_finite() && (low..=high).contains(&t)) {
        return Err(format!(
            "`temperature_target_c` must be within {low}..={high} °C, not {t}"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn defaults_round_trip_and_partial_files_fill_in() {
        let c = NodeConfig::default();
        assert_eq!(c.update_period, Duration::from_secs(30));
        assert!(c.start_paused);
        let text = toml::to_string_pretty(&c).unwrap();
        assert_eq!(NodeConfig::from_toml(&text).unwrap(), c);
        let partial = NodeConfig::from_toml("update_period = 2.5\n[policy]\nmode = \"max\"\n").unwrap();
        assert_eq!(partial.update_period, Duration::from_millis(2500));
        assert_eq!(partial.policy.mode, apiary_governor::Mode::Max);
        assert_eq!(partial.planning_mode(), apiary_catalog::Mode::Max);
        assert!(NodeConfig::from_toml("update_period = -1").is_err());
    }

    #[test]
    fn device_settings_parse_print_and_refuse_bad_text() {
        assert_eq!(NodeConfig::default().device, DeviceChoice::Auto);
        for (text, want) in [
            ("auto", DeviceChoice::Auto),
            ("cpu", DeviceChoice::Cpu),
            ("cuda:0", DeviceChoice::Cuda(0)),
            ("cuda:7", DeviceChoice::Cuda(7)),
        ] {
            assert_eq!(text.parse::<DeviceChoice>().unwrap(), want);
            assert_eq!(want.to_string(), text);
        }
        for bad in [
            "",
            "gpu",
            "CPU",
            "cuda",
            "cuda:",
            "cuda:-1",
            "cuda:+1",
            "cuda: 1",
            "cuda:x",
            "cuda:64",
            "cuda:99999999999",
            " cpu",
        ] {
            let e = bad.parse::<DeviceChoice>().unwrap_err();
            assert!(
                e.to_string().contains("expected `auto`, `cpu` or `cuda:N`"),
                "{bad}: {e}"
            );
        }
        // in the TOML file
        let c = NodeConfig::from_toml("device = \"cuda:1\"\n").unwrap();
        assert_eq!(c.device, DeviceChoice::Cuda(1));
        let text = toml::to_string_pretty(&c).unwrap();
        assert!(text.contains("device = \"cuda:1\""), "{text}");
        assert_eq!(NodeConfig::from_toml(&text).unwrap(), c);
        let e = NodeConfig::from_toml("device = \"tpu\"\n").unwrap_err();
        assert!(e.contains("`tpu` is not a device") && e.contains("line 1"), "{e}");
        // what this build supports
        assert_eq!(DeviceChoice::Cpu.check_supported(), Ok(DeviceChoice::Cpu));
        assert_eq!(DeviceChoice::Auto.check_supported(), Ok(DeviceChoice::Auto));
        assert_eq!(DeviceChoice::Cpu.gpu(), None);
        assert_eq!(DeviceChoice::Cuda(2).gpu(), Some(2));
        if DeviceChoice::CUDA_BUILD {
            assert!(DeviceChoice::Cuda(0).check_supported().is_ok());
            assert_eq!(DeviceChoice::Auto.gpu(), Some(0));
        } else {
            let e = DeviceChoice::Cuda(0).check_supported().unwrap_err();
            assert!(e.contains("no CUDA support"), "{e}");
            assert_eq!(DeviceChoice::Auto.gpu(), None);
        }
    }
}
