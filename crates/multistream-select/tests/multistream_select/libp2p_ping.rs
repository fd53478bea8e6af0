//! A real rust-libp2p 0.57 stack negotiating through this crate.
//!
//! The workspace's `[patch.crates-io]` replaces the crates.io `multistream-select` in
//! libp2p-core and libp2p-swarm with this crate, so two TCP swarms pinging each other negotiate
//! noise and yamux (with [`Version::V1Lazy`], as the builder does) and `/ipfs/ping/1.0.0` (with
//! [`Version::V1`], as the swarm does for substreams) with the code under test.

use std::time::Duration;

use futures::StreamExt;
use libp2p::{Multiaddr, Swarm, noise, ping, swarm::SwarmEvent, tcp, yamux};
use multistream_select::Version;

#[test]
fn libp2p_uses_this_crate() {
    // These only compile if libp2p-core re-exports *this* crate's types, i.e. if the patch is in
    // effect: with the crates.io crate they would be distinct types of the same name.
    let _: multistream_select::NegotiationError = libp2p::core::upgrade::NegotiationError::Failed;
    let _: libp2p::core::upgrade::ProtocolError = multistream_select::ProtocolError::InvalidProtocol;
    let _: libp2p::core::upgrade::Version = Version::V1Lazy;
    fn same<T>(_: Option<T>, _: Option<T>) {}
    same::<libp2p::core::Negotiated<tokio::net::TcpStream>>(
        None,
        None::<multistream_select::Negotiated<tokio::net::TcpStream>>,
    );
}

fn new_swarm() -> Swarm<ping::Behaviour> {
    libp2p::SwarmBuilder::with_new_identity()
        .with_tokio()
        .with_tcp(tcp::Config::default(), noise::Config::new, yamux::Config::default)
        .expect("tcp transport")
        .with_behaviour(|_| {
            ping::Behaviour::new(ping::Config::new().with_interval(Duration::from_millis(100)))
        })
        .expect("ping behaviour")
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(30)))
        .build()
}

#[tokio::test]
async fn two_swarms_ping_over_tcp_noise_yamux() {
    let mut listener = new_swarm();
    let mut dialer = new_swarm();
    let listener_id = *listener.local_peer_id();
    let dialer_id = *dialer.local_peer_id();

    listener
        .listen_on("/ip4/127.0.0.1/tcp/0".parse::<Multiaddr>().unwrap())
        .unwrap();
    let addr = loop {
        if let SwarmEvent::NewListenAddr { address, .. } = listener.select_next_some().await {
            break address;
        }
    };
    dialer.dial(addr).unwrap();

    // Each side must see a successful ping of the other: that needs noise and yamux negotiated
    // on the connection and `/ipfs/ping/1.0.0` on a substream, in both directions.
    let mut dialer_pinged = false;
    let mut listener_pinged = false;
    let outcome = tokio::time::timeout(Duration::from_secs(30), async {
        while !(dialer_pinged && listener_pinged) {
            tokio::select! {
                event = dialer.select_next_some() => match event {
                    SwarmEvent::Behaviour(ping::Event { peer, result: Ok(rtt), .. }) => {
                        assert_eq!(peer, listener_id);
                        assert!(rtt < Duration::from_secs(5));
                        dialer_pinged = true;
                    }
                    SwarmEvent::Behaviour(ping::Event { result: Err(e), .. }) => panic!("dialer ping failed: {e}"),
                    SwarmEvent::OutgoingConnectionError { error, .. } => panic!("dial failed: {error}"),
                    _ => {}
                },
                event = listener.select_next_some() => match event {
                    SwarmEvent::Behaviour(ping::Event { peer, result: Ok(_), .. }) => {
                        assert_eq!(peer, dialer_id);
                        listener_pinged = true;
                    }
                    SwarmEvent::Behaviour(ping::Event { result: Err(e), .. }) => panic!("listener ping failed: {e}"),
                    SwarmEvent::IncomingConnectionError { error, .. } => panic!("incoming connection failed: {error}"),
                    _ => {}
                },
            }
        }
    })
    .await;
    assert!(outcome.is_ok(), "no ping round trip within 30 s");
}
