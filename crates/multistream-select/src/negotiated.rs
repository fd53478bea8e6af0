//! [`Negotiated`]: the stream handed out once a protocol is chosen.

use std::{
    fmt,
    future::Future,
    io,
    pin::Pin,
    task::{Context, Poll, ready},
};

use futures::{
    AsyncRead, AsyncWrite,
    io::{IoSlice, IoSliceMut},
};

use crate::{
    NegotiationError, ProtocolError,
    io::MessageIo,
    message::{self, HEADER, NA},
};

/// How many bytes of application data a [`Version::V1Lazy`](crate::Version::V1Lazy) dialer
/// coalesces with its pending negotiation messages, so that the header, the proposal and the
/// first protocol message leave in one write.
const MAX_COALESCED_WRITE: usize = 8 * 1024;

/// An I/O stream on which a protocol has been chosen.
///
/// The protocol is fully determined, but the last negotiation messages may not have been
/// exchanged yet: a [`Version::V1Lazy`](crate::Version::V1Lazy) dialer gets a `Negotiated`
/// before it has even sent its proposal. In that state
///
/// * writes are buffered behind the pending negotiation messages (up to 8 KiB, so that the
///   first message of the protocol can share a packet with the proposal), or written right
///   after them;
/// * the first read (and [`poll_close`](AsyncWrite::poll_close), and [`Negotiated::complete`])
///   flushes the pending messages, then reads the listener's confirmation before any
///   protocol data. If the listener answered `na` (or garbage), that read fails with an
///   [`io::Error`] converted from the [`NegotiationError`], and every later operation fails too.
///
/// Bytes that arrived together with the last negotiation message are kept and returned by the
/// first reads, so nothing of the protocol is lost.
pub struct Negotiated<T> {
    io: MessageIo<T>,
    state: State,
}

#[derive(Debug)]
enum State {
    /// The confirmation of `protocol` (preceded by the header if `header` is set) is still to
    /// be read.
    Expecting { header: bool, protocol: String },
    /// Negotiation is over; the stream carries the protocol.
    Completed,
    /// The lazy negotiation failed; the stream is unusable.
    Failed,
}

impl<T> Negotiated<T> {
    /// A stream whose negotiation is over, with the bytes already read past it.
    pub(crate) fn completed(mut io: MessageIo<T>) -> Self {
        io.shrink_read_buffer();
        Negotiated {
            io,
            state: State::Completed,
        }
    }

    /// A lazily negotiated dialer stream that still has to send what is in `io`'s write buffer
    /// and then read the confirmation of `protocol`.
    pub(crate) fn expecting(io: MessageIo<T>, header: bool, protocol: String) -> Self {
        Negotiated {
            io,
            state: State::Expecting { header, protocol },
        }
    }

    /// Returns a future that resolves once negotiation is complete: at once for a stream that is
    /// already complete, after sending the pending proposal and reading the listener's
    /// confirmation for a lazily negotiated one.
    pub fn complete(self) -> NegotiatedComplete<T> {
        NegotiatedComplete { inner: Some(self) }
    }

    fn failed_error() -> io::Error {
        io::Error::other(NegotiationError::Failed)
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> Negotiated<T> {
    /// Drives a pending negotiation to its end: flushes the queued messages, then reads and
    /// checks the confirmation.
    fn poll_negotiated(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), NegotiationError>> {
        loop {
            let (header, protocol) = match &mut self.state {
                State::Completed => return Poll::Ready(Ok(())),
                State::Failed => return Poll::Ready(Err(NegotiationError::Failed)),
                State::Expecting { header, protocol } => (header, protocol),
            };
            // Our proposal must be on its way before we wait for the answer to it.
            if let Err(e) = ready!(self.io.poll_flush_buffer(cx)) {
                self.state = State::Failed;
                return Poll::Ready(Err(e.into()));
            }
            let outcome = match ready!(self.io.poll_message(cx)) {
                Ok(Some(payload)) => match message::decode_line(&payload) {
                    Ok(line) if *header && line == HEADER => {
                        *header = false;
                        continue;
                    }
                    Ok(_) if *header => Err(NegotiationError::Failed),
                    Ok(line) if line == protocol.as_str() => Ok(()),
                    Ok(NA) => Err(NegotiationError::Failed),
                    Ok(_) => Err(ProtocolError::InvalidMessage.into()),
                    Err(e) => Err(e.into()),
                },
                Ok(None) => Err(NegotiationError::from(io::Error::from(
                    io::ErrorKind::UnexpectedEof,
                ))),
                Err(e) => Err(e.into()),
            };
            return Poll::Ready(match outcome {
                Ok(()) => {
                    tracing::trace!(%protocol, "multistream-select: lazy proposal confirmed");
                    self.state = State::Completed;
                    self.io.shrink_read_buffer();
                    Ok(())
                }
                Err(e) => {
                    tracing::debug!(%protocol, error = %e, "multistream-select: lazy proposal failed");
                    self.state = State::Failed;
                    Err(e)
                }
            });
        }
    }

    /// Completes a pending negotiation, as an I/O operation.
    fn poll_ready_for_io(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.poll_negotiated(cx).map_err(io::Error::from)
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> AsyncRead for Negotiated<T> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut [u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        ready!(this.poll_ready_for_io(cx))?;
        if !this.io.buffered().is_empty() {
            return Poll::Ready(Ok(this.io.read_buffered(buf)));
        }
        Pin::new(&mut this.io.inner).poll_read(cx, buf)
    }

    fn poll_read_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &mut [IoSliceMut<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        ready!(this.poll_ready_for_io(cx))?;
        if !this.io.buffered().is_empty() {
            let mut total = 0;
            for buf in bufs.iter_mut() {
                let n = this.io.read_buffered(buf);
                total += n;
                if n < buf.len() {
                    break;
                }
            }
            return Poll::Ready(Ok(total));
        }
        Pin::new(&mut this.io.inner).poll_read_vectored(cx, bufs)
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> AsyncWrite for Negotiated<T> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if matches!(this.state, State::Failed) {
            return Poll::Ready(Err(Self::failed_error()));
        }
        if !this.io.write_buf.is_empty() {
            if this.io.write_buf.len() + buf.len() <= MAX_COALESCED_WRITE {
                this.io.write_buf.extend_from_slice(buf);
                return Poll::Ready(Ok(buf.len()));
            }
            ready!(this.io.poll_write_buffer(cx))?;
        }
        Pin::new(&mut this.io.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if matches!(this.state, State::Failed) {
            return Poll::Ready(Err(Self::failed_error()));
        }
        if !this.io.write_buf.is_empty() {
            let total: usize = bufs.iter().map(|b| b.len()).sum();
            if this.io.write_buf.len() + total <= MAX_COALESCED_WRITE {
                for buf in bufs {
                    this.io.write_buf.extend_from_slice(buf);
                }
                return Poll::Ready(Ok(total));
            }
            ready!(this.io.poll_write_buffer(cx))?;
        }
        Pin::new(&mut this.io.inner).poll_write_vectored(cx, bufs)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if matches!(this.state, State::Failed) {
            return Poll::Ready(Err(Self::failed_error()));
        }
        this.io.poll_flush_all(cx)
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        // Closing a lazily negotiated stream first waits for the confirmation, so that a
        // rejected proposal is reported instead of silently dropping what was written.
        ready!(this.poll_ready_for_io(cx))?;
        ready!(this.io.poll_flush_all(cx))?;
        Pin::new(&mut this.io.inner).poll_close(cx)
    }
}

impl<T: fmt::Debug> fmt::Debug for Negotiated<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Negotiated")
            .field("io", &self.io)
            .field("state", &self.state)
            .finish()
    }
}

/// Future returned by [`Negotiated::complete`]: resolves to the stream once its negotiation
/// is complete, or to the reason it failed.
#[derive(Debug)]
#[must_use = "futures do nothing unless polled"]
pub struct NegotiatedComplete<T> {
    inner: Option<Negotiated<T>>,
}

impl<T: AsyncRead + AsyncWrite + Unpin> Future for NegotiatedComplete<T> {
    type Output = Result<Negotiated<T>, NegotiationError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        let Some(negotiated) = this.inner.as_mut() else {
            // Polled after completion: report it as an error rather than panicking.
            return Poll::Ready(Err(NegotiationError::Failed));
        };
        ready!(negotiated.poll_negotiated(cx))?;
        match this.inner.take() {
            Some(negotiated) => Poll::Ready(Ok(negotiated)),
            None => Poll::Ready(Err(NegotiationError::Failed)),
        }
    }
}
