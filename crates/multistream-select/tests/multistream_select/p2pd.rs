//! Against go-libp2p: a real hivemind 1.1.12 peer (its bundled p2pd) and a rust-libp2p swarm negotiate
//! noise, yamux and `/ipfs/ping/1.0.0` through this crate, in both dial directions. (Slashless
//! hivemind handler ids need the hivemind RPC behaviour of `apiary-p2p`, which tests them end to end.)

use std::process::{Command, Stdio};
use std::time::Duration;

use apiary_testkit::{HivemindPeer, hivemind_python, interop_dir};
use futures::StreamExt;
use libp2p::{Multiaddr, PeerId, Swarm, core::ConnectedPoint, noise, ping, swarm::SwarmEvent, tcp, yamux};

fn new_swarm() -> Swarm<ping::Behaviour> {
    libp2p::SwarmBuilder::with_new_identity()
        .with_tokio()
        .with_tcp(tcp::Config::default(), noise::Config::new, yamux::Config::default)
        .unwrap()
        .with_behaviour(|_| {
            ping::Behaviour::new(ping::Config::new().with_interval(Duration::from_millis(200)))
        })
        .unwrap()
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(60)))
        .build()
}

/// Waits for a successful ping with `peer`; returns whether we dialed, if the connection was
/// established while waiting.
async fn ping_ok(swarm: &mut Swarm<ping::Behaviour>, peer: PeerId) -> Option<bool> {
    let mut dialer = None;
    tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            match swarm.select_next_some().await {
                SwarmEvent::ConnectionEstablished {
                    peer_id, endpoint, ..
                } if peer_id == peer => {
                    dialer = Some(matches!(endpoint, ConnectedPoint::Dialer { .. }));
                }
                SwarmEvent::Behaviour(ping::Event {
                    peer: p,
                    result: Ok(_),
                    ..
                }) if p == peer => break,
                SwarmEvent::OutgoingConnectionError { error, .. } => panic!("dial failed: {error}"),
                SwarmEvent::IncomingConnectionError { error, .. } => {
                    panic!("incoming connection failed: {error}")
                }
                _ => {}
            }
        }
    })
    .await
    .expect("no ping round trip with p2pd within 60 s");
    dialer
}

#[tokio::test]
async fn rust_dials_hivemind_p2pd() {
    let hivemind = HivemindPeer::spawn("dht", &[], Duration::from_secs(120));
    let addr: Multiaddr = hivemind.maddr().parse().unwrap();
    let peer: PeerId = hivemind.peer_id().parse().unwrap();
    let mut swarm = new_swarm();
    swarm.dial(addr).unwrap();
    assert_eq!(
        ping_ok(&mut swarm, peer).await,
        Some(true),
        "we dialed, so the connection must be outbound"
    );
}

#[tokio::test]
async fn hivemind_p2pd_dials_rust() {
    let mut swarm = new_swarm();
    swarm.listen_on("/ip4/127.0.0.1/tcp/0".parse().unwrap()).unwrap();
    let addr = loop {
        if let SwarmEvent::NewListenAddr { address, .. } = swarm.select_next_some().await {
            break address;
        }
    };
    let full = format!("{addr}/p2p/{}", swarm.local_peer_id());
    // p2pd connects to its bootstrap peers itself (noise and yamux negotiated by our listener); the
    // hivemind DHT then gives up, as nothing here answers `DHTProtocol.rpc_ping` yet.
    let mut child = Command::new(hivemind_python())
        .arg(interop_dir().join("hivemind_peer.py"))
        .args(["dht", "--stop-on-stdin-eof", "--initial-peers", &full])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let peer = tokio::time::timeout(Duration::from_secs(120), async {
        loop {
            if let SwarmEvent::ConnectionEstablished {
                peer_id, endpoint, ..
            } = swarm.select_next_some().await
            {
                assert!(
                    matches!(endpoint, ConnectedPoint::Listener { .. }),
                    "p2pd must have dialed us"
                );
                break peer_id;
            }
        }
    })
    .await
    .expect("p2pd never connected");
    ping_ok(&mut swarm, peer).await;
    let _ = child.kill();
    let _ = child.wait();
}
