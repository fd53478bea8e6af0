//! The host's transports: TCP with Noise and/or TLS and yamux, QUIC-v1, and the circuit-relay v2 client
//! transport, combined into one boxed transport.
//!
//! The security protocols are chosen at run time ([`Security`]), so the upgrade offering them is this
//! module's own ([`SecurityUpgrade`]) rather than libp2p's builder tuple; it offers Noise before TLS, in
//! the order p2pd offers them (hivemind-wire.md §2.1).

use std::io;
use std::time::Duration;

use futures::future::{BoxFuture, Either};
use futures::{AsyncRead, AsyncWrite, FutureExt};
use libp2p::core::muxing::StreamMuxerBox;
use libp2p::core::transport::{Boxed, OrTransport};
use libp2p::core::upgrade::{InboundConnectionUpgrade, OutboundConnectionUpgrade, UpgradeInfo, Version};
use libp2p::identity::Keypair;
use libp2p::{PeerId, Transport, noise, quic, relay, tcp, tls, yamux};

use crate::config::{P2pConfig, Security};
use crate::host::HostError;

const NOISE: &str = "/noise";
const TLS: &str = "/tls/1.0.0";

/// Noise and/or TLS, negotiated with multistream-select; Noise is offered first.
#[derive(Debug, Clone)]
pub(crate) struct SecurityUpgrade {
    key: Keypair,
    security: Security,
}

/// A connection secured by either protocol.
type Secured<C> = Either<noise::Output<C>, tls::TlsStream<C>>;

impl SecurityUpgrade {
    fn noise_config(&self) -> io::Result<noise::Config> {
        noise::Config::new(&self.key).map_err(io::Error::other)
    }

    fn tls_config(&self) -> io::Result<tls::Config> {
        tls::Config::new(&self.key).map_err(io::Error::other)
    }
}

impl UpgradeInfo for SecurityUpgrade {
    type Info = &'static str;
    type InfoIter = std::vec::IntoIter<&'static str>;

    fn protocol_info(&self) -> Self::InfoIter {
        match self.security {
            Security::NoiseAndTls => vec![NOISE, TLS],
            Security::Noise => vec![NOISE],
            Security::Tls => vec![TLS],
        }
        .into_iter()
    }
}

impl<C> InboundConnectionUpgrade<C> for SecurityUpgrade
where
    C: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Output = (PeerId, Secured<C>);
    type Error = io::Error;
    type Future = BoxFuture<'static, io::Result<Self::Output>>;

    fn upgrade_inbound(self, socket: C, info: &'static str) -> Self::Future {
        async move {
            if info == NOISE {
                let (peer, out) = self
                    .noise_config()?
                    .upgrade_inbound(socket, info)
                    .await
                    .map_err(io::Error::other)?;
                Ok((peer, Either::Left(out)))
            } else {
                let (peer, out) = self
                    .tls_config()?
                    .upgrade_inbound(socket, info)
                    .await
                    .map_err(io::Error::other)?;
                Ok((peer, Either::Right(out)))
            }
        }
        .boxed()
    }
}

impl<C> OutboundConnectionUpgrade<C> for SecurityUpgrade
where
    C: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Output = (PeerId, Secured<C>);
    type Error = io::Error;
    type Future = BoxFuture<'static, io::Result<Self::Output>>;

    fn upgrade_outbound(self, socket: C, info: &'static str) -> Self::Future {
        async move {
            if info == NOISE {
                let (peer, out) = self
                    .noise_config()?
                    .upgrade_outbound(socket, info)
                    .await
                    .map_err(io::Error::other)?;
                Ok((peer, Either::Left(out)))
            } else {
                let (peer, out) = self
                    .tls_config()?
                    .upgrade_outbound(socket, info)
                    .await
                    .map_err(io::Error::other)?;
                Ok((peer, Either::Right(out)))
            }
        }
        .boxed()
    }
}

/// The host's combined transport.
pub(crate) type HostTransport = Boxed<(PeerId, StreamMuxerBox)>;

/// How long the security and multiplexer upgrades of one connection may take.
const UPGRADE_TIMEOUT: Duration = Duration::from_secs(20);

/// Builds the host's transport; with `config.relay_client` also the relay client behaviour that drives
/// the circuit transport.
pub(crate) fn build(
    key: &Keypair,
    config: &P2pConfig,
) -> Result<(HostTransport, Option<relay::client::Behaviour>), HostError> {
    let security = SecurityUpgrade {
        key: key.clone(),
        security: config.security,
    };
    // Fail early (not per connection) if a key cannot make the chosen configurations.
    if config.security != Security::Tls {
        security
            .noise_config()
            .map_err(|e| HostError::Transport(e.to_string()))?;
    }
    if config.security != Security::Noise {
        security
            .tls_config()
            .map_err(|e| HostError::Transport(e.to_string()))?;
    }
    let mut transport = tcp::tokio::Transport::new(tcp::Config::default().nodelay(true))
        .upgrade(Version::V1Lazy)
        .authenticate(security.clone())
        .multiplex(yamux::Config::default())
        .timeout(UPGRADE_TIMEOUT)
        .map(|(peer, muxer), _| (peer, StreamMuxerBox::new(muxer)))
        .boxed();
    if config.quic {
        let quic = quic::tokio::Transport::new(quic::Config::new(key))
            .map(|(peer, muxer), _| (peer, StreamMuxerBox::new(muxer)))
            .boxed();
        transport = either_of(quic, transport);
    }
    let mut relay_behaviour = None;
    if config.relay_client {
        let (relay_transport, behaviour) = relay::client::new(key.public().to_peer_id());
        let relay_transport = relay_transport
            .upgrade(Version::V1Lazy)
            .authenticate(security)
            .multiplex(yamux::Config::default())
            .timeout(UPGRADE_TIMEOUT)
            .map(|(peer, muxer), _| (peer, StreamMuxerBox::new(muxer)))
            .boxed();
        transport = either_of(relay_transport, transport);
        relay_behaviour = Some(behaviour);
    }
    Ok((transport, relay_behaviour))
}

/// Tries `first`, then `second`.
fn either_of(first: HostTransport, second: HostTransport) -> HostTransport {
    OrTransport::new(first, second)
        .map(|out, _| out.into_inner())
        .boxed()
}
