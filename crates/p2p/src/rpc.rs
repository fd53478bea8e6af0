//! The bytes of hivemind RPCs on a negotiated stream (hivemind-wire.md §2.4, §2.5), run in tasks outside
//! the swarm. Encoding and decoding are `apiary_wire::rpc`'s; this module adds the I/O, the size caps
//! while reading, and the handler types.

use std::sync::Arc;
use std::time::Duration;

use apiary_wire::proto::p2pd;
use apiary_wire::rpc::{self as wire, FRAME_HEADER_LEN, FrameHeader, FrameKind, MESSAGE_MARKER, RpcError};
use bytes::{BufMut, Bytes, BytesMut};
use futures::future::{BoxFuture, Either};
use futures::stream::BoxStream;
use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, StreamExt};
use libp2p::PeerId;
use prost::Message;

/// A unary handler: the caller's peer id and request bytes in, response bytes or error text out.
pub type UnaryHandler = Arc<dyn Fn(PeerId, Bytes) -> BoxFuture<'static, Result<Bytes, String>> + Send + Sync>;

/// A stream handler: the caller's peer id and its request messages in, response messages out; an `Err`
/// ends the call with an error frame carrying its text.
pub type StreamHandler =
    Arc<dyn Fn(PeerId, BoxStream<'static, Bytes>) -> BoxStream<'static, Result<Bytes, String>> + Send + Sync>;

/// A registered server handler.
#[derive(Clone)]
pub enum Handler {
    /// One request envelope, one reply envelope.
    Unary(UnaryHandler),
    /// Framed messages both ways.
    Stream(StreamHandler),
}

impl std::fmt::Debug for Handler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Unary(_) => "Handler::Unary",
            Self::Stream(_) => "Handler::Stream",
        })
    }
}

/// Why a handler name was refused: `Class.rpc_method`, optionally prefixed with `namespace::`.
#[derive(Debug, thiserror::Error)]
#[error("invalid hivemind handler name `{0}`: expected `Class.rpc_method` or `namespace::Class.rpc_method`")]
pub struct InvalidName(pub String);

/// Checks a hivemind handler name (`Class.rpc_method` with an optional `namespace::` prefix).
pub fn validate_name(name: &str) -> Result<(), InvalidName> {
    let bad = || InvalidName(name.to_owned());
    let method = name
        .rsplit_once("::")
        .map_or(name, |(ns, rest)| if ns.is_empty() { "" } else { rest });
    let (class, method) = method.split_once('.').ok_or_else(bad)?;
    let ok = !class.is_empty()
        && method.starts_with("rpc_")
        && !name.contains(['\n', '/'])
        && name.len() < 1024
        && class
            .chars()
            .chain(method.chars())
            .all(|c| c.is_alphanumeric() || c == '_');
    if ok { Ok(()) } else { Err(bad()) }
}

/// Reads one varint-delimited envelope of at most `max` bytes; the buffer never grows past the cap.
pub(crate) async fn read_envelope<R: AsyncRead + Unpin>(
    io: &mut R,
    max: usize,
) -> Result<Vec<u8>, ReadError> {
    let mut buf = Vec::with_capacity(64);
    let mut chunk = vec![0u8; 16 * 1024];
    loop {
        if let Some((envelope, _)) = wire::split_delimited(&buf, max)? {
            return Ok(envelope.to_vec());
        }
        // Never read past the end of a complete envelope's worth of bytes.
        let room = (max + 10).saturating_sub(buf.len()).clamp(1, chunk.len());
        let n = io.read(&mut chunk[..room]).await?;
        if n == 0 {
            return Err(ReadError::Eof);
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// A stream frame as read.
#[derive(Debug)]
pub(crate) enum Frame {
    Message(Bytes),
    /// An error frame; an empty message is the caller's end of stream.
    Error(String),
}

/// Reads one stream frame of at most `max` payload bytes; `Ok(None)` at a clean end of stream.
pub(crate) async fn read_frame<R: AsyncRead + Unpin>(
    io: &mut R,
    max: u64,
) -> Result<Option<Frame>, ReadError> {
    let mut header = [0u8; FRAME_HEADER_LEN];
    let mut got = 0;
    while got < FRAME_HEADER_LEN {
        let n = io.read(&mut header[got..]).await?;
        if n == 0 {
            return if got == 0 { Ok(None) } else { Err(ReadError::Eof) };
        }
        got += n;
    }
    let header = FrameHeader::parse(header, max)?;
    let len = usize::try_from(header.len).map_err(|_| ReadError::Eof)?;
    let mut payload = vec![0u8; len];
    io.read_exact(&mut payload).await?;
    Ok(Some(match header.kind {
        FrameKind::Message => Frame::Message(Bytes::from(payload)),
        FrameKind::Error => {
            let error = p2pd::RpcError::decode(payload.as_slice()).map_err(RpcError::from)?;
            Frame::Error(error.message.unwrap_or_default())
        }
    }))
}

/// `0x00 ‖ u64 BE len ‖ bytes`: [`wire::encode_message_frame`] for bytes that are already encoded.
pub(crate) fn message_frame(bytes: &[u8]) -> Vec<u8> {
    let mut out = BytesMut::with_capacity(FRAME_HEADER_LEN + bytes.len());
    out.put_u8(MESSAGE_MARKER);
    out.put_u64(bytes.len() as u64);
    out.put_slice(bytes);
    out.to_vec()
}

/// Why reading from a stream failed.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The bytes were refused (too large, malformed).
    #[error(transparent)]
    Wire(#[from] RpcError),
    /// The stream failed.
    #[error("stream error: {0}")]
    Io(#[from] std::io::Error),
    /// The stream ended in the middle of a message.
    #[error("stream ended early")]
    Eof,
}

/// Serves one inbound unary call: one envelope in, one reply envelope out. The handler gets at most
/// `timeout` (an error reply after it) and is dropped, cancelling it, if the caller resets the stream.
pub(crate) async fn serve_unary<S>(
    mut io: S,
    peer: PeerId,
    handler: UnaryHandler,
    timeout: Option<Duration>,
) -> Result<(), ReadError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let envelope = read_envelope(&mut io, wire::MAX_UNARY_ENVELOPE).await?;
    let call = wire::decode_unary_call(&envelope)?;
    drop(envelope);
    let work = handler(peer, call.data);
    let work = async move {
        match timeout {
            Some(t) => tokio::time::timeout(t, work)
                .await
                .unwrap_or_else(|_| Err(format!("handler timed out after {t:?}"))),
            None => work.await,
        }
    };
    // Anything but a reset from the caller (a half-close, stray bytes) leaves the handler running.
    let result = {
        let reset = async {
            let mut byte = [0u8; 1];
            loop {
                match io.read(&mut byte).await {
                    Err(e) => return e,
                    // yamux reads a reset as the end of the stream; only a write tells it from the
                    // caller's half-close (an empty write puts nothing on the wire but an empty frame).
                    Ok(0) => match io.write(&[]).await {
                        Err(e) => return e,
                        Ok(_) => std::future::pending::<()>().await,
                    },
                    Ok(_) => {}
                }
            }
        };
        futures::pin_mut!(work, reset);
        match futures::future::select(work, reset).await {
            Either::Left((result, _)) => result,
            Either::Right((error, _)) => {
                tracing::debug!(%peer, %error, "caller went away; handler cancelled");
                return Err(ReadError::Io(error));
            }
        }
    };
    let reply = match wire::encode_unary_response(call.call_id.clone(), result) {
        Ok(reply) => reply,
        Err(e) => wire::encode_unary_response(call.call_id, Err(format!("response refused: {e}")))?,
    };
    io.write_all(&reply).await?;
    io.flush().await?;
    io.close().await?;
    Ok(())
}

/// Serves one inbound stream call: request frames in until the caller's end of stream, the handler's
/// responses out as frames, then close (or an error frame).
pub(crate) async fn serve_stream<S>(
    io: S,
    peer: PeerId,
    handler: StreamHandler,
    max_frame: u64,
) -> Result<(), ReadError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (read, mut write) = io.split();
    let requests = futures::stream::unfold(Some(read), move |read| async move {
        let mut read = read?;
        match read_frame(&mut read, max_frame).await {
            Ok(Some(Frame::Message(m))) => Some((m, Some(read))),
            Ok(Some(Frame::Error(e))) => {
                if !e.is_empty() {
                    tracing::debug!(%peer, error = %e, "caller sent an error frame");
                }
                None
            }
            Ok(None) => None,
            Err(e) => {
                tracing::debug!(%peer, error = %e, "bad request frame; ending the request stream");
                None
            }
        }
    })
    .boxed();
    let mut responses = handler(peer, requests);
    while let Some(response) = responses.next().await {
        match response {
            Ok(bytes) => write.write_all(&message_frame(&bytes)).await?,
            Err(e) => {
                write.write_all(&wire::encode_error_frame(&e)).await?;
                break;
            }
        }
    }
    write.flush().await?;
    write.close().await?;
    Ok(())
}
