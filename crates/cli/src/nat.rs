//! The NAT options every long-running command takes (`apiary dht|server|call|node run`), with
//! hivemind's names in kebab-case; they override [`NetworkConfig`]'s values only where given.

use apiary_node::{ForceReachability, NetworkConfig};
use apiary_p2p::Multiaddr;
use clap::Args;

/// How the node gets through NAT.
#[derive(Debug, Args, Clone, Default)]
pub(crate) struct NatArgs {
    /// Dial peers through circuit relays and hole-punch relayed connections to direct ones (on by
    /// default, as hivemind's `use_relay`).
    #[arg(long, overrides_with = "no_relay")]
    use_relay: bool,
    /// No circuit relays: only direct connections.
    #[arg(long)]
    no_relay: bool,
    /// When behind NAT, hold reservations on relays (--trusted-relays, and up to two connected peers that
    /// offer relaying) so that peers can call in, as hivemind's `use_auto_relay`.
    #[arg(long, overrides_with = "no_auto_relay")]
    use_auto_relay: bool,
    /// Hold no relay reservations.
    #[arg(long)]
    no_auto_relay: bool,
    /// Full multiaddrs (with /p2p/) of relays to reserve circuits on at once; implies --use-auto-relay.
    #[arg(long, num_args = 1..)]
    trusted_relays: Vec<Multiaddr>,
    /// Relay for other peers (circuit relay v2 service: 128 reservations, 16 circuits per peer, 30 min and
    /// 8 GiB per circuit); it serves once this node is known to be reachable.
    #[arg(long, overrides_with = "no_relay_service")]
    relay_service: bool,
    /// Relay for nobody.
    #[arg(long)]
    no_relay_service: bool,
    /// Skip AutoNAT: `public` (peers dial this node directly) or `private` (behind NAT: reserve relays
    /// at once).
    #[arg(long)]
    force_reachability: Option<ForceReachability>,
    /// Ask the router for a port mapping (UPnP) where this node listens on a private or unspecified IPv4
    /// address (hivemind's `nat_port_map`). Off by default in `apiary dht|server|call|train` (set up with
    /// known ports); `apiary node run` follows the settings file (default on).
    #[arg(long, overrides_with = "no_nat_port_map")]
    nat_port_map: bool,
    /// No UPnP port mapping.
    #[arg(long)]
    no_nat_port_map: bool,
    /// Keep relayed connections relayed (no DCUtR hole punching).
    #[arg(long)]
    no_hole_punching: bool,
    /// Multiaddrs to announce instead of the listening ones (explicit ports), e.g. a forwarded port.
    #[arg(long, num_args = 1..)]
    pub(crate) announce_maddrs: Vec<Multiaddr>,
}

impl NatArgs {
    /// `base` with the options given on the command line applied.
    pub(crate) fn network(&self, mut base: NetworkConfig) -> NetworkConfig {
        let flag = |on: bool, off: bool, value: &mut bool| {
            if on {
                *value = true;
            } else if off {
                *value = false;
            }
        };
        flag(self.use_relay, self.no_relay, &mut base.use_relay);
        flag(self.use_auto_relay, self.no_auto_relay, &mut base.use_auto_relay);
        flag(self.relay_service, self.no_relay_service, &mut base.relay_service);
        flag(self.nat_port_map, self.no_nat_port_map, &mut base.nat_port_map);
        if self.no_hole_punching {
            base.hole_punching = false;
        }
        if !self.trusted_relays.is_empty() {
            base.trusted_relays = self.trusted_relays.iter().map(ToString::to_string).collect();
        }
        if self.force_reachability.is_some() {
            base.force_reachability = self.force_reachability;
        }
        if !self.announce_maddrs.is_empty() {
            base.announce_maddrs = self.announce_maddrs.iter().map(ToString::to_string).collect();
        }
        base
    }
}

/// The defaults of hivemind's CLIs: relay client on, no auto relay; the relay service only where asked
/// (`apiary dht` passes `true`: bootstrap nodes are public and relay for home PCs). UPnP is off unless
/// asked (hivemind's is on): these commands run on servers with known ports, and in tests, where a
/// gateway search would send multicast beyond loopback.
pub(crate) fn hivemind_defaults(relay_service: bool) -> NetworkConfig {
    NetworkConfig {
        use_auto_relay: false,
        relay_service,
        nat_port_map: false,
        ..NetworkConfig::default()
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        nat: NatArgs,
    }

    fn parse(args: &[&str]) -> NetworkConfig {
        let cli = Cli::try_parse_from(std::iter::once("apiary").chain(args.iter().copied())).unwrap();
        cli.nat.network(hivemind_defaults(false))
    }

    #[test]
    fn flags_override_only_what_they_name() {
        assert_eq!(parse(&[]), hivemind_defaults(false));
        let relay = "/ip4/11.0.0.1/tcp/4001/p2p/12D3KooWJWoaqZhDaoEFshF7Rh1bpY9ohihFhzcW6d69Lr2NASuq";
        let n = parse(&[
            "--no-relay",
            "--use-auto-relay",
            "--trusted-relays",
            relay,
            "--force-reachability",
            "private",
            "--no-nat-port-map",
            "--no-hole-punching",
            "--relay-service",
        ]);
        assert!(!n.use_relay && n.use_auto_relay && n.relay_service && !n.nat_port_map && !n.hole_punching);
        assert!(parse(&["--nat-port-map"]).nat_port_map);
        assert_eq!(n.trusted_relays, vec![relay.to_owned()]);
        assert_eq!(n.force_reachability, Some(ForceReachability::Private));
        // the last of a pair wins
        assert!(parse(&["--no-relay", "--use-relay"]).use_relay);
        assert!(!parse(&["--relay-service", "--no-relay-service"]).relay_service);
        assert!(Cli::try_parse_from(["apiary", "--force-reachability", "maybe"]).is_err());
    }
}
