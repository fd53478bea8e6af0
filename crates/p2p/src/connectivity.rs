//! How peers reach this host and how it reaches them: reachability (AutoNAT or forced), relay
//! reservations, hole punching, port mapping, each peer's connections (direct or relayed) and round
//! trips. The host's event loop keeps it; [`crate::P2pHandle::connectivity`] and
//! [`crate::P2pHandle::link`] read it.

use std::collections::HashMap;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use libp2p::swarm::ConnectionId;
use libp2p::{Multiaddr, PeerId};

use crate::Reachability;

/// How other peers get to this host, in one word.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NetPath {
    /// Not known yet: AutoNAT is still asking peers to dial back.
    Checking,
    /// Peers dial this host directly.
    Direct,
    /// Peers cannot dial it directly, but reach it through a relay it holds a reservation on.
    Relayed,
    /// Peers cannot dial it and it holds no relay reservation: it can call out, but nobody can call in.
    Unreachable,
    /// No peer is connected at all (the network is down, or no bootstrap peer answers).
    Offline,
}

impl NetPath {
    /// The word the status uses (`checking`, `direct`, `relayed`, `unreachable`, `offline`).
    pub fn as_str(self) -> &'static str {
        match self {
            NetPath::Checking => "checking",
            NetPath::Direct => "direct",
            NetPath::Relayed => "relayed",
            NetPath::Unreachable => "unreachable",
            NetPath::Offline => "offline",
        }
    }
}

/// A relay this host holds a circuit reservation on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelayStatus {
    /// The relay.
    pub peer: PeerId,
    /// The latest ping round trip to it.
    pub rtt: Option<Duration>,
}

/// DCUtR hole punching attempts since start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct HolePunches {
    /// Relayed connections upgraded to direct ones.
    pub succeeded: u64,
    /// Attempts that failed (the NAT maps ports per destination, or both sides are behind such NATs).
    pub failed: u64,
}

/// The host's reachability as a whole.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Connectivity {
    /// Whether peers can dial this host, as AutoNAT finds it or as forced.
    pub reachability: Reachability,
    /// Whether [`Connectivity::reachability`] was set by the user (`force_reachability`).
    pub forced: bool,
    /// Whether AutoNAT runs.
    pub autonat: bool,
    /// Whether this host reserves circuits on relays when private (trusted relays or auto relay).
    pub seeks_relays: bool,
    /// The relays holding a reservation for this host.
    pub relays: Vec<RelayStatus>,
    /// This host's `/p2p-circuit` addresses.
    pub relayed_addrs: Vec<Multiaddr>,
    /// Its addresses as peers see them (identify's observations and confirmed external addresses).
    pub observed_addrs: Vec<Multiaddr>,
    /// The address a UPnP gateway mapped for it, if any.
    pub port_mapping: Option<Multiaddr>,
    /// Open direct connections.
    pub direct_connections: usize,
    /// Open relayed connections.
    pub relayed_connections: usize,
    /// Connected peers.
    pub peers: usize,
    /// The median of the latest ping round trips to connected peers.
    pub median_rtt: Option<Duration>,
    /// Hole punching so far.
    pub hole_punches: HolePunches,
}

impl Connectivity {
    /// How peers get to this host now.
    pub fn path(&self) -> NetPath {
        if self.peers == 0 {
            return NetPath::Offline;
        }
        match self.reachability {
            Reachability::Public => NetPath::Direct,
            _ if !self.relays.is_empty() => NetPath::Relayed,
            Reachability::Private => NetPath::Unreachable,
            Reachability::Unknown => NetPath::Checking,
        }
    }

    /// Why, in words for people.
    pub fn reason(&self) -> String {
        let relays = match self.relays.len() {
            1 => "a relay".to_owned(),
            n => format!("{n} relays"),
        };
        match self.path() {
            NetPath::Offline => "No peer is connected: the network is down or no bootstrap peer answers; \
                                 retrying"
                .to_owned(),
            NetPath::Direct if self.forced => {
                "Reachability set to public: peers dial this node directly".to_owned()
            }
            NetPath::Direct => match self.observed_addrs.first() {
                Some(addr) => format!("Peers dialed this node back at {addr}"),
                None => "Peers dialed this node back".to_owned(),
            },
            NetPath::Relayed if self.reachability == Reachability::Unknown => {
                format!("Reachable through {relays}; checking whether peers can dial it directly")
            }
            NetPath::Relayed => {
                let punched = if self.hole_punches.succeeded > 0 {
                    format!(
                        "; hole punching made {} direct connection{}",
                        self.hole_punches.succeeded,
                        if self.hole_punches.succeeded == 1 { "" } else { "s" }
                    )
                } else {
                    String::new()
                };
                format!("Behind NAT or a firewall; reachable through {relays}{punched}")
            }
            NetPath::Unreachable if self.seeks_relays => {
                "Behind NAT or a firewall; looking for a relay (none holds a reservation yet)".to_owned()
            }
            NetPath::Unreachable => "Behind NAT or a firewall and not using relays: peers cannot call in \
                                     (turn on auto relay or add trusted relays)"
                .to_owned(),
            NetPath::Checking if self.autonat => {
                "Checking whether peers can dial this node (AutoNAT asks connected peers)".to_owned()
            }
            NetPath::Checking => "Not known: AutoNAT is off".to_owned(),
        }
    }

    /// The round trip that matters for the path: to the nearest relay when relayed, else the median to
    /// connected peers.
    pub fn rtt(&self) -> Option<Duration> {
        match self.path() {
            NetPath::Relayed => self.relays.iter().filter_map(|r| r.rtt).min(),
            _ => self.median_rtt,
        }
    }
}

/// One peer's connections to this host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Link {
    /// Open direct connections.
    pub direct: usize,
    /// Open connections through a relay.
    pub relayed: usize,
    /// The latest ping round trip on any of them.
    pub rtt: Option<Duration>,
}

impl Link {
    /// Whether calls to the peer go over a direct connection (they use one whenever there is one).
    pub fn is_direct(&self) -> bool {
        self.direct > 0
    }
}

#[derive(Debug, Default)]
struct PeerLinks {
    connections: HashMap<ConnectionId, bool>,
    rtt: Option<Duration>,
}

/// Every connected peer's connections; written by the event loop, read by handles.
#[derive(Debug, Clone, Default)]
pub(crate) struct Links(Arc<RwLock<HashMap<PeerId, PeerLinks>>>);

impl Links {
    pub fn opened(&self, peer: PeerId, connection: ConnectionId, relayed: bool) {
        let mut map = self.0.write().unwrap_or_else(PoisonError::into_inner);
        map.entry(peer)
            .or_default()
            .connections
            .insert(connection, relayed);
    }

    pub fn closed(&self, peer: PeerId, connection: ConnectionId) {
        let mut map = self.0.write().unwrap_or_else(PoisonError::into_inner);
        if let Some(links) = map.get_mut(&peer) {
            links.connections.remove(&connection);
            if links.connections.is_empty() {
                map.remove(&peer);
            }
        }
    }

    pub fn pinged(&self, peer: PeerId, rtt: Duration) {
        let mut map = self.0.write().unwrap_or_else(PoisonError::into_inner);
        if let Some(links) = map.get_mut(&peer) {
            links.rtt = Some(rtt);
        }
    }

    pub fn get(&self, peer: &PeerId) -> Option<Link> {
        let map = self.0.read().unwrap_or_else(PoisonError::into_inner);
        map.get(peer).map(|links| {
            let relayed = links.connections.values().filter(|r| **r).count();
            Link {
                direct: links.connections.len() - relayed,
                relayed,
                rtt: links.rtt,
            }
        })
    }

    /// (direct connections, relayed connections, peers, median round trip)
    pub fn summary(&self) -> (usize, usize, usize, Option<Duration>) {
        let map = self.0.read().unwrap_or_else(PoisonError::into_inner);
        let relayed: usize = map
            .values()
            .map(|l| l.connections.values().filter(|r| **r).count())
            .sum();
        let total: usize = map.values().map(|l| l.connections.len()).sum();
        let mut rtts: Vec<Duration> = map.values().filter_map(|l| l.rtt).collect();
        rtts.sort();
        let median = (!rtts.is_empty()).then(|| rtts[rtts.len() / 2]);
        (total - relayed, relayed, map.len(), median)
    }

    pub fn rtt(&self, peer: &PeerId) -> Option<Duration> {
        let map = self.0.read().unwrap_or_else(PoisonError::into_inner);
        map.get(peer).and_then(|l| l.rtt)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn relay(rtt_ms: u64) -> RelayStatus {
        RelayStatus {
            peer: PeerId::random(),
            rtt: Some(Duration::from_millis(rtt_ms)),
        }
    }

    #[test]
    fn the_path_follows_peers_reachability_and_relays() {
        let mut c = Connectivity {
            autonat: true,
            seeks_relays: true,
            ..Connectivity::default()
        };
        assert_eq!(c.path(), NetPath::Offline);
        assert!(c.reason().contains("No peer is connected"));
        c.peers = 2;
        c.median_rtt = Some(Duration::from_millis(7));
        assert_eq!(c.path(), NetPath::Checking);
        assert!(c.reason().contains("AutoNAT"));
        c.reachability = Reachability::Private;
        assert_eq!(c.path(), NetPath::Unreachable);
        assert!(c.reason().contains("looking for a relay"), "{}", c.reason());
        c.seeks_relays = false;
        assert!(c.reason().contains("turn on auto relay"), "{}", c.reason());
        c.relays = vec![relay(30), relay(12)];
        assert_eq!(c.path(), NetPath::Relayed);
        assert_eq!(
            c.rtt(),
            Some(Duration::from_millis(12)),
            "the nearest relay's round trip"
        );
        assert!(c.reason().contains("through 2 relays"), "{}", c.reason());
        c.hole_punches.succeeded = 1;
        assert!(
            c.reason().contains("hole punching made 1 direct connection"),
            "{}",
            c.reason()
        );
        c.reachability = Reachability::Public;
        assert_eq!(c.path(), NetPath::Direct);
        assert_eq!(c.rtt(), Some(Duration::from_millis(7)), "the median to peers");
        c.forced = true;
        assert!(c.reason().contains("set to public"));
        c.peers = 0;
        assert_eq!(c.path(), NetPath::Offline, "no peers beats everything");
    }

    #[test]
    fn links_count_direct_and_relayed_connections() {
        let links = Links::default();
        let (a, b) = (PeerId::random(), PeerId::random());
        let (c1, c2, c3) = (
            ConnectionId::new_unchecked(1),
            ConnectionId::new_unchecked(2),
            ConnectionId::new_unchecked(3),
        );
        links.opened(a, c1, true);
        assert!(!links.get(&a).is_some_and(|l| l.is_direct()));
        links.opened(a, c2, false);
        links.opened(b, c3, true);
        links.pinged(a, Duration::from_millis(5));
        links.pinged(b, Duration::from_millis(9));
        let link = links.get(&a).expect("connected");
        assert!(link.is_direct());
        assert_eq!(
            (link.direct, link.relayed, link.rtt),
            (1, 1, Some(Duration::from_millis(5)))
        );
        assert_eq!(links.summary(), (1, 2, 2, Some(Duration::from_millis(9))));
        links.closed(a, c2);
        assert!(!links.get(&a).expect("still relayed").is_direct());
        links.closed(a, c1);
        assert_eq!(links.get(&a), None);
        assert_eq!(links.summary().2, 1);
    }
}
