//! The host's transports, security choices, relay, reachability, peer routing and server-side handler
//! limits, with Apiary hosts on 127.0.0.1.

#![allow(clippy::unwrap_used)] // test helpers as well as tests

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use apiary_p2p::{
    CallError, Host, Multiaddr, P2pConfig, P2pHandle, Reachability, RelayLimits, Security, UnaryHandler,
};
use bytes::Bytes;
use futures::FutureExt;
use libp2p::multiaddr::Protocol;

const T: Duration = Duration::from_secs(20);

async fn host_on(config: P2pConfig, listen: &str) -> (P2pHandle, Multiaddr) {
    let (handle, _task) = Host::spawn(config).unwrap();
    let addr = handle.listen(listen.parse().unwrap()).await.unwrap();
    (handle, addr)
}

fn echo() -> UnaryHandler {
    Arc::new(|peer, bytes: Bytes| {
        async move {
            let mut out = peer.to_bytes();
            out.extend_from_slice(&bytes);
            Ok(Bytes::from(out))
        }
        .boxed()
    })
}

/// Calls `Echo.rpc_echo` on `server` from `client` and checks the reply names the client.
async fn check_echo(client: &P2pHandle, server: &P2pHandle) {
    let reply = client
        .call_unary(
            server.local_peer_id(),
            "Echo.rpc_echo",
            Bytes::from_static(b"hi"),
            T,
        )
        .await
        .unwrap();
    let mut expected = client.local_peer_id().to_bytes();
    expected.extend_from_slice(b"hi");
    assert_eq!(reply.as_ref(), expected.as_slice());
}

#[tokio::test]
async fn quic_v1_between_two_hosts() {
    let (server, addr) = host_on(P2pConfig::default(), "/ip4/127.0.0.1/udp/0/quic-v1").await;
    assert!(addr.iter().any(|p| p == Protocol::QuicV1), "{addr}");
    server.add_unary_handler("Echo.rpc_echo", echo()).unwrap();
    let (client, _) = Host::spawn(P2pConfig::default()).unwrap();
    let full = addr.with_p2p(server.local_peer_id()).unwrap();
    assert_eq!(client.dial(full).await.unwrap(), server.local_peer_id());
    check_echo(&client, &server).await;
    // QUIC off: the address cannot be listened on.
    let (no_quic, _) = Host::spawn(P2pConfig {
        quic: false,
        ..P2pConfig::default()
    })
    .unwrap();
    assert!(
        no_quic
            .listen("/ip4/127.0.0.1/udp/0/quic-v1".parse().unwrap())
            .await
            .is_err()
    );
}

#[tokio::test]
async fn security_choices() {
    let tls_only = || P2pConfig {
        security: Security::Tls,
        ..P2pConfig::default()
    };
    let noise_only = || P2pConfig {
        security: Security::Noise,
        ..P2pConfig::default()
    };
    // TLS-only server: a TLS-only client and a default (Noise, then TLS) client both get through.
    let (server, addr) = host_on(tls_only(), "/ip4/127.0.0.1/tcp/0").await;
    server.add_unary_handler("Echo.rpc_echo", echo()).unwrap();
    let full = addr.with_p2p(server.local_peer_id()).unwrap();
    for config in [tls_only(), P2pConfig::default()] {
        let (client, _) = Host::spawn(config).unwrap();
        client.dial(full.clone()).await.unwrap();
        check_echo(&client, &server).await;
    }
    // A Noise-only client shares no security protocol with a TLS-only server.
    let (client, _) = Host::spawn(noise_only()).unwrap();
    assert!(client.dial(full).await.is_err());
}

/// A relay service announcing its loopback address as external (a relay serves only with one); returns it
/// and its full `/p2p/` address.
async fn relay() -> (P2pHandle, Multiaddr) {
    let relay_config = P2pConfig {
        relay_service: Some(RelayLimits::default()),
        ..P2pConfig::default()
    };
    let (relay, relay_addr) = host_on(relay_config, "/ip4/127.0.0.1/tcp/0").await;
    relay.add_external_address(relay_addr.clone()).await.unwrap();
    let relay_full = relay_addr.with_p2p(relay.local_peer_id()).unwrap();
    (relay, relay_full)
}

#[tokio::test]
async fn call_through_a_relay() {
    // A: the relay.
    let (_relay, relay_full) = relay().await;

    // B: listens only through the relay.
    let client_config = || P2pConfig {
        relay_client: true,
        ..P2pConfig::default()
    };
    let (b, _) = Host::spawn(client_config()).unwrap();
    b.add_unary_handler("Echo.rpc_echo", echo()).unwrap();
    let circuit = relay_full.clone().with(Protocol::P2pCircuit);
    let listened = b.listen(circuit).await.unwrap();
    assert!(listened.iter().any(|p| p == Protocol::P2pCircuit), "{listened}");
    let mut visible = b.visible_addrs();
    tokio::time::timeout(
        T,
        visible.wait_for(|a| a.iter().any(|a| a.iter().any(|p| p == Protocol::P2pCircuit))),
    )
    .await
    .unwrap()
    .unwrap();

    // C: dials B by its relayed address and calls it.
    let (c, _) = Host::spawn(client_config()).unwrap();
    let b_via_relay = relay_full
        .with(Protocol::P2pCircuit)
        .with(Protocol::P2p(b.local_peer_id()));
    assert_eq!(c.dial(b_via_relay).await.unwrap(), b.local_peer_id());
    check_echo(&c, &b).await;
    assert!(c.connected_peers().borrow().contains(&b.local_peer_id()));
    // 1 MiB each way: past libp2p's default 128 KiB per circuit, within the relay's explicit limits.
    let big = Bytes::from(vec![7u8; 1024 * 1024]);
    let reply = c
        .call_unary(b.local_peer_id(), "Echo.rpc_echo", big.clone(), T)
        .await
        .unwrap();
    assert!(reply.ends_with(&big));
}

#[test]
fn optional_parts_default_off() {
    let config = P2pConfig::default();
    assert!(config.quic);
    assert_eq!(config.security, Security::NoiseAndTls);
    assert!(!config.relay_client && config.relay_service.is_none());
    assert!(!config.dcutr && !config.autonat && !config.upnp);
    assert!(config.trusted_relays.is_empty() && config.force_reachability.is_none());
    let limits = RelayLimits::default();
    assert_eq!((limits.max_reservations, limits.max_circuits_per_peer), (128, 16));
    assert_eq!(limits.max_circuit_duration, Duration::from_secs(30 * 60));
    assert!(limits.max_circuit_bytes >= 4 << 30);
}

#[tokio::test]
async fn reachability_and_visible_addrs() {
    let (plain, addr) = host_on(P2pConfig::default(), "/ip4/127.0.0.1/tcp/0").await;
    assert_eq!(*plain.reachability().borrow(), Reachability::Unknown);
    assert_eq!(*plain.visible_addrs().borrow(), vec![addr.clone()]);
    let announced: Multiaddr = "/ip4/203.0.113.7/tcp/4001".parse().unwrap();
    plain.add_external_address(announced.clone()).await.unwrap();
    let mut visible = plain.visible_addrs();
    let now = tokio::time::timeout(T, visible.wait_for(|a| a.contains(&announced)))
        .await
        .unwrap()
        .unwrap()
        .clone();
    assert!(now.contains(&addr));
    assert_eq!(*plain.listen_addrs().borrow(), vec![addr]);

    // The optional behaviours (all but UPnP, which would touch a real gateway) on at once build and serve
    // calls; on loopback AutoNAT stays Unknown.
    let everything = P2pConfig {
        relay_client: true,
        relay_service: Some(RelayLimits::default()),
        dcutr: true,
        autonat: true,
        external_addrs: vec![announced],
        ..P2pConfig::default()
    };
    let (full, full_addr) = host_on(everything, "/ip4/127.0.0.1/tcp/0").await;
    full.add_unary_handler("Echo.rpc_echo", echo()).unwrap();
    assert_eq!(*full.reachability().borrow(), Reachability::Unknown);
    plain
        .dial(full_addr.with_p2p(full.local_peer_id()).unwrap())
        .await
        .unwrap();
    check_echo(&plain, &full).await;
}

/// Two hops: C knows only A, A knows only D, D knows B. A hint (D) makes it one question.
#[tokio::test]
async fn find_peer_over_two_hops_and_through_a_hint() {
    let (a, a_addr) = host_on(P2pConfig::default(), "/ip4/127.0.0.1/tcp/0").await;
    let (b, b_addr) = host_on(P2pConfig::default(), "/ip4/127.0.0.1/tcp/0").await;
    let (d, d_addr) = host_on(P2pConfig::default(), "/ip4/127.0.0.1/tcp/0").await;
    b.add_unary_handler("Echo.rpc_echo", echo()).unwrap();
    d.dial(b_addr.clone().with_p2p(b.local_peer_id()).unwrap())
        .await
        .unwrap();
    a.dial(d_addr.clone().with_p2p(d.local_peer_id()).unwrap())
        .await
        .unwrap();
    // Each dialer now holds the address it dialed: A has D's, D has B's.

    let (c, _) = host_on(P2pConfig::default(), "/ip4/127.0.0.1/tcp/0").await;
    c.dial(a_addr.clone().with_p2p(a.local_peer_id()).unwrap())
        .await
        .unwrap();
    let found = tokio::time::timeout(T, c.find_peer(b.local_peer_id()))
        .await
        .unwrap()
        .unwrap();
    assert!(found.contains(&b_addr), "{found:?} lacks {b_addr}");
    check_echo(&c, &b).await;

    // A fresh host told that D named B asks D first.
    let (e, _) = host_on(P2pConfig::default(), "/ip4/127.0.0.1/tcp/0").await;
    e.add_address(d.local_peer_id(), d_addr).await.unwrap();
    let found = tokio::time::timeout(T, e.find_peer_via(b.local_peer_id(), vec![d.local_peer_id()]))
        .await
        .unwrap()
        .unwrap();
    assert!(found.contains(&b_addr), "{found:?} lacks {b_addr}");
    check_echo(&e, &b).await;

    // A peer nobody knows: the lookup ends with an error, not a hang.
    let nobody = libp2p::PeerId::random();
    let err = tokio::time::timeout(T, c.find_peer(nobody))
        .await
        .unwrap()
        .unwrap_err();
    assert!(err.to_string().contains(&nobody.to_string()), "{err}");
}

#[tokio::test]
async fn handler_timeout_and_cancellation() {
    let config = P2pConfig {
        handler_timeout: Some(Duration::from_millis(300)),
        ..P2pConfig::default()
    };
    let (server, addr) = host_on(config, "/ip4/127.0.0.1/tcp/0").await;
    let finished = Arc::new(AtomicBool::new(false));
    let (started_tx, mut started_rx) = tokio::sync::mpsc::channel(4);
    let done = finished.clone();
    let slow: UnaryHandler = Arc::new(move |_peer, bytes: Bytes| {
        let done = done.clone();
        let started = started_tx.clone();
        async move {
            let _ = started.send(()).await;
            let wait = if bytes.as_ref() == b"long" { 3 } else { 60 };
            tokio::time::sleep(Duration::from_secs(wait)).await;
            done.store(true, Ordering::SeqCst);
            Ok(bytes)
        }
        .boxed()
    });
    server.add_unary_handler("Slow.rpc_wait", slow).unwrap();
    let (client, _) = Host::spawn(P2pConfig::default()).unwrap();
    client
        .dial(addr.with_p2p(server.local_peer_id()).unwrap())
        .await
        .unwrap();
    let peer = server.local_peer_id();
    match client
        .call_unary(peer, "Slow.rpc_wait", Bytes::from_static(b"x"), T)
        .await
    {
        Err(CallError::Remote(text)) => assert!(text.contains("timed out"), "{text}"),
        other => panic!("expected the server's timeout, got {other:?}"),
    }
    started_rx.recv().await.unwrap();

    // Without a server timeout, the caller giving up cancels the handler: it never finishes.
    let (server, addr) = host_on(P2pConfig::default(), "/ip4/127.0.0.1/tcp/0").await;
    let done = finished.clone();
    let (started_tx, mut started_rx) = tokio::sync::mpsc::channel(4);
    let slow: UnaryHandler = Arc::new(move |_peer, bytes: Bytes| {
        let done = done.clone();
        let started = started_tx.clone();
        async move {
            let _ = started.send(()).await;
            tokio::time::sleep(Duration::from_secs(2)).await;
            done.store(true, Ordering::SeqCst);
            Ok(bytes)
        }
        .boxed()
    });
    server.add_unary_handler("Slow.rpc_wait", slow).unwrap();
    client
        .dial(addr.with_p2p(server.local_peer_id()).unwrap())
        .await
        .unwrap();
    let call = client.call_unary(
        server.local_peer_id(),
        "Slow.rpc_wait",
        Bytes::from_static(b"x"),
        Duration::from_millis(500),
    );
    assert!(matches!(call.await, Err(CallError::Timeout)));
    started_rx.recv().await.unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        !finished.load(Ordering::SeqCst),
        "the handler ran to completion after its caller went away"
    );
}

/// AutoNAT (LAN settings, so loopback counts): a host its peer can dial back is public; a host whose
/// only address refuses connections is behind NAT.
#[tokio::test]
async fn autonat_tells_public_from_private() {
    let lan = || P2pConfig {
        autonat: true,
        autonat_boot_delay: Duration::from_millis(200),
        autonat_only_global_ips: false,
        ..P2pConfig::default()
    };
    let (server, server_addr) = host_on(lan(), "/ip4/127.0.0.1/tcp/0").await;
    let server_full = server_addr.with_p2p(server.local_peer_id()).unwrap();

    let (open, _) = host_on(lan(), "/ip4/127.0.0.1/tcp/0").await;
    open.dial(server_full.clone()).await.unwrap();
    let mut status = open.reachability();
    tokio::time::timeout(T, status.wait_for(|r| *r == Reachability::Public))
        .await
        .expect("AutoNAT never reported the listening host public")
        .unwrap();

    // an address nothing listens on: bind a port, then free it
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let (hidden, _task) = Host::spawn(lan()).unwrap();
    hidden
        .add_external_address(format!("/ip4/127.0.0.1/tcp/{closed}").parse().unwrap())
        .await
        .unwrap();
    hidden.dial(server_full).await.unwrap();
    let mut status = hidden.reachability();
    tokio::time::timeout(T, status.wait_for(|r| *r == Reachability::Private))
        .await
        .expect("AutoNAT never reported the unreachable host private")
        .unwrap();
}

/// Auto relay: a host that only dialed a relay (found through identify) becomes reachable through it.
#[tokio::test]
async fn auto_relay_reserves_on_a_connected_relay() {
    let (_relay, relay_full) = relay().await;

    let (b, _) = Host::spawn(P2pConfig {
        relay_client: true,
        auto_relay_reservations: 2,
        ..P2pConfig::default()
    })
    .unwrap();
    b.add_unary_handler("Echo.rpc_echo", echo()).unwrap();
    b.dial(relay_full.clone()).await.unwrap();
    let mut visible = b.visible_addrs();
    tokio::time::timeout(
        T,
        visible.wait_for(|a| a.iter().any(|a| a.iter().any(|p| p == Protocol::P2pCircuit))),
    )
    .await
    .expect("no relayed address appeared")
    .unwrap();

    let (c, _) = Host::spawn(P2pConfig {
        relay_client: true,
        ..P2pConfig::default()
    })
    .unwrap();
    let b_via_relay = relay_full
        .with(Protocol::P2pCircuit)
        .with(Protocol::P2p(b.local_peer_id()));
    assert_eq!(c.dial(b_via_relay).await.unwrap(), b.local_peer_id());
    check_echo(&c, &b).await;
}

/// A relay service on a fixed port with a fixed key, so that it can be restarted where it was.
async fn relay_at(keypair: &apiary_p2p::Keypair, port: u16) -> P2pHandle {
    let config = P2pConfig {
        keypair: Some(keypair.clone()),
        relay_service: Some(RelayLimits::default()),
        ..P2pConfig::default()
    };
    let (relay, addr) = host_on(config, &format!("/ip4/127.0.0.1/tcp/{port}")).await;
    relay.add_external_address(addr).await.unwrap();
    relay
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A host forced private with a trusted relay reserves at once, says it is relayed (and why, with the
/// relay's round trip), callers reach it over a relayed link, and after the relay restarts the host
/// reserves again by itself.
#[tokio::test]
async fn a_trusted_relay_is_reserved_kept_and_reported() {
    use apiary_p2p::NetPath;
    let key = apiary_p2p::Keypair::generate_ed25519();
    let port = free_port();
    let relay = relay_at(&key, port).await;
    let relay_full: Multiaddr = format!("/ip4/127.0.0.1/tcp/{port}/p2p/{}", relay.local_peer_id())
        .parse()
        .unwrap();

    let (b, _) = Host::spawn(P2pConfig {
        relay_client: true,
        trusted_relays: vec![relay_full.clone()],
        force_reachability: Some(Reachability::Private),
        ..P2pConfig::default()
    })
    .unwrap();
    assert_eq!(
        *b.reachability().borrow(),
        Reachability::Private,
        "forced from the start"
    );
    b.add_unary_handler("Echo.rpc_echo", echo()).unwrap();
    let mut status = b.connectivity();
    tokio::time::timeout(
        T,
        status.wait_for(|c| c.path() == NetPath::Relayed && c.relays[0].rtt.is_some()),
    )
    .await
    .expect("never relayed")
    .unwrap();
    {
        let c = status.borrow();
        assert!(c.forced);
        assert_eq!(c.relays.len(), 1);
        assert_eq!(c.relays[0].peer, relay.local_peer_id());
        assert!(
            c.relayed_addrs
                .iter()
                .any(|a| a.iter().any(|p| p == Protocol::P2pCircuit))
        );
        assert!(c.reason().contains("through a relay"), "{}", c.reason());
        assert_eq!(c.rtt(), c.relays[0].rtt);
    }

    // a caller's link to B goes through the relay
    let (c, _) = Host::spawn(P2pConfig {
        relay_client: true,
        ..P2pConfig::default()
    })
    .unwrap();
    let b_via_relay = relay_full
        .clone()
        .with(Protocol::P2pCircuit)
        .with(Protocol::P2p(b.local_peer_id()));
    c.dial(b_via_relay).await.unwrap();
    check_echo(&c, &b).await;
    let link = c.link(&b.local_peer_id()).expect("connected");
    assert!(!link.is_direct() && link.relayed == 1, "{link:?}");
    tokio::time::timeout(T, status.wait_for(|s| s.relayed_connections >= 1))
        .await
        .unwrap()
        .unwrap();

    // the relay goes away: the reservation ends; it comes back: B reserves again by itself
    relay.shutdown().await;
    tokio::time::timeout(T, status.wait_for(|s| s.relays.is_empty()))
        .await
        .expect("the reservation outlived its relay")
        .unwrap();
    assert_ne!(status.borrow().path(), NetPath::Relayed);
    let _relay = relay_at(&key, port).await;
    tokio::time::timeout(
        apiary_p2p::RELAY_RETRY_MAX + T,
        status.wait_for(|s| s.path() == NetPath::Relayed),
    )
    .await
    .expect("no new reservation after the relay came back")
    .unwrap();
}

/// Connections between peers that keep each other alive outlive the idle timeout; others close (each
/// side closes a connection it finds idle, so a bootstrap node's side is kept by traffic: the DHT pings).
#[tokio::test]
async fn kept_alive_peers_stay_connected_while_idle() {
    let quick = || P2pConfig {
        idle_connection_timeout: Duration::from_millis(500),
        ..P2pConfig::default()
    };
    let (kept, kept_addr) = host_on(quick(), "/ip4/127.0.0.1/tcp/0").await;
    let (other, other_addr) = host_on(quick(), "/ip4/127.0.0.1/tcp/0").await;
    let (client, _) = Host::spawn(quick()).unwrap();
    client.keep_alive(kept.local_peer_id());
    kept.keep_alive(client.local_peer_id());
    client
        .dial(kept_addr.with_p2p(kept.local_peer_id()).unwrap())
        .await
        .unwrap();
    client
        .dial(other_addr.with_p2p(other.local_peer_id()).unwrap())
        .await
        .unwrap();
    let mut peers = client.connected_peers();
    tokio::time::timeout(T, peers.wait_for(|p| !p.contains(&other.local_peer_id())))
        .await
        .expect("the idle connection never closed")
        .unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(client.connected_peers().borrow().contains(&kept.local_peer_id()));
}

/// A relayed address that appears after a host joined (its reservation came later) reaches the relay's
/// peer routing through identify push, so a caller that looks the host up gets it.
#[tokio::test]
async fn a_later_relayed_address_reaches_peer_routing() {
    let (relay, relay_full) = relay().await;
    let client = || P2pConfig {
        relay_client: true,
        ..P2pConfig::default()
    };
    let (b, _) = Host::spawn(client()).unwrap();
    b.listen("/ip4/127.0.0.1/tcp/0".parse().unwrap()).await.unwrap();
    b.dial(relay_full.clone()).await.unwrap();
    // identify has run on the connection before the reservation
    tokio::time::sleep(Duration::from_millis(500)).await;
    b.listen(relay_full.clone().with(Protocol::P2pCircuit))
        .await
        .unwrap();
    let (c, _) = Host::spawn(client()).unwrap();
    c.dial(relay_full).await.unwrap();
    let mut found = Vec::new();
    for _ in 0..50 {
        found = c.find_peer(b.local_peer_id()).await.unwrap();
        if found.iter().any(|a| a.iter().any(|p| p == Protocol::P2pCircuit)) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        found.iter().any(|a| a.iter().any(|p| p == Protocol::P2pCircuit)),
        "the relay answered {found:?} for {}",
        relay.local_peer_id()
    );
}
