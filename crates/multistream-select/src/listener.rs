//! The listener (responder) side: answer proposals until one names a supported protocol.

use std::{
    fmt,
    future::Future,
    pin::Pin,
    task::{Context, Poll, ready},
};

use futures::{AsyncRead, AsyncWrite};

use crate::{
    Negotiated, NegotiationError, ProtocolError,
    io::MessageIo,
    message::{self, HEADER, LS, NA},
};

/// Returns a future that negotiates a protocol on `inner` as the listener (responder).
///
/// The listener answers the dialer's header with its own, then answers each proposal: with an
/// echo if the name is in `protocols` (the future then resolves to that entry and the
/// [`Negotiated`] stream), with `na` otherwise. `ls` is answered with the list of `protocols`.
/// Names need no leading `/`; entries that can never be valid names (empty, over 1023 bytes,
/// control characters, `na`, `ls`) are ignored.
///
/// The future fails with [`NegotiationError::Failed`] when the dialer sends another
/// multistream version or gives up (closes the stream) after a `na`, and with a
/// [`ProtocolError`] on I/O errors or malformed messages.
pub fn listener_select_proto<R, I>(inner: R, protocols: I) -> ListenerSelectFuture<R, I::Item>
where
    R: AsyncRead + AsyncWrite,
    I: IntoIterator,
    I::Item: AsRef<str>,
{
    let protocols = protocols
        .into_iter()
        .filter(|p| match message::validate_name(p.as_ref()) {
            Ok(()) => true,
            Err(_) => {
                tracing::debug!(
                    protocol = p.as_ref(),
                    "multistream-select: not listening on invalid protocol name"
                );
                false
            }
        })
        .collect();
    ListenerSelectFuture {
        io: Some(MessageIo::new(inner)),
        protocols,
        state: ListenerState::AwaitHeader,
        rejected_any: false,
    }
}

/// Future returned by [`listener_select_proto`].
///
/// Resolves to the entry of the supported protocols that the dialer chose, and the
/// [`Negotiated`] stream. It is `Unpin` when `R` is, and `Send` when `R` and `N` are.
#[must_use = "futures do nothing unless polled"]
pub struct ListenerSelectFuture<R, N> {
    /// `None` once the future has resolved.
    io: Option<MessageIo<R>>,
    protocols: Vec<N>,
    state: ListenerState,
    /// Whether some proposal was answered with `na`.
    rejected_any: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ListenerState {
    /// Read the dialer's header.
    AwaitHeader,
    /// Read a proposal or `ls` (first sending our header if the dialer waits for it).
    AwaitMessage,
    /// Write and flush the answer, then read the next message.
    Answer,
    /// Write and flush the echo of `protocols[index]`, then resolve to it.
    Accept { index: usize },
    /// Resolved.
    Done,
}

// `protocols` is a `Vec` (always `Unpin`) and `R` is only pinned via `Pin::new`.
impl<R: Unpin, N> Unpin for ListenerSelectFuture<R, N> {}

impl<R, N> ListenerSelectFuture<R, N> {
    fn fail(&mut self, e: NegotiationError) -> NegotiationError {
        tracing::debug!(error = %e, "multistream-select: listener negotiation failed");
        self.state = ListenerState::Done;
        self.io = None;
        e
    }
}

impl<R, N> Future for ListenerSelectFuture<R, N>
where
    R: AsyncRead + AsyncWrite + Unpin,
    N: AsRef<str>,
{
    type Output = Result<(N, Negotiated<R>), NegotiationError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        loop {
            let state = this.state;
            let Some(io) = this.io.as_mut() else {
                // Polled after resolving: report it instead of panicking.
                return Poll::Ready(Err(NegotiationError::Failed));
            };
            match state {
                ListenerState::AwaitHeader | ListenerState::AwaitMessage => {
                    let polled = io.poll_message(cx);
                    if polled.is_pending() && io.needs_flush() {
                        // Nothing more to read yet: send our header now rather than waiting to
                        // coalesce it with the answer, in case the dialer waits for it.
                        if let Poll::Ready(Err(e)) = io.poll_flush_buffer(cx) {
                            return Poll::Ready(Err(this.fail(e.into())));
                        }
                    }
                    let payload = match ready!(polled) {
                        Ok(Some(payload)) => payload,
                        Ok(None) if this.rejected_any => {
                            // The dialer gave up after our `na`.
                            return Poll::Ready(Err(this.fail(NegotiationError::Failed)));
                        }
                        Ok(None) => {
                            let eof = std::io::Error::from(std::io::ErrorKind::UnexpectedEof);
                            return Poll::Ready(Err(this.fail(eof.into())));
                        }
                        Err(e) => return Poll::Ready(Err(this.fail(e.into()))),
                    };
                    let line = match message::decode_line(&payload) {
                        Ok(line) => line,
                        Err(e) => return Poll::Ready(Err(this.fail(e.into()))),
                    };
                    if state == ListenerState::AwaitHeader {
                        if line != HEADER {
                            tracing::debug!(header = line, "multistream-select: unexpected header");
                            return Poll::Ready(Err(this.fail(NegotiationError::Failed)));
                        }
                        message::encode_line(&mut io.write_buf, HEADER);
                        this.state = ListenerState::AwaitMessage;
                        continue;
                    }
                    if line == LS {
                        tracing::trace!("multistream-select: answering `ls`");
                        message::encode_ls_message(
                            &mut io.write_buf,
                            this.protocols.iter().map(AsRef::as_ref),
                        );
                        this.state = ListenerState::Answer;
                        continue;
                    }
                    if let Err(e) = message::validate_name(line) {
                        return Poll::Ready(Err(this.fail(e.into())));
                    }
                    match this.protocols.iter().position(|p| p.as_ref() == line) {
                        Some(index) => {
                            tracing::trace!(protocol = line, "multistream-select: accepting");
                            message::encode_line(&mut io.write_buf, line);
                            this.state = ListenerState::Accept { index };
                        }
                        None => {
                            tracing::trace!(protocol = line, "multistream-select: rejecting");
                            message::encode_line(&mut io.write_buf, NA);
                            this.rejected_any = true;
                            this.state = ListenerState::Answer;
                        }
                    }
                }
                ListenerState::Answer | ListenerState::Accept { .. } => {
                    // The answer goes out in full before the next message is read, which keeps
                    // the write buffer bounded whatever the dialer sends.
                    if let Err(e) = ready!(io.poll_flush_all(cx)) {
                        return Poll::Ready(Err(this.fail(e.into())));
                    }
                    let ListenerState::Accept { index } = state else {
                        this.state = ListenerState::AwaitMessage;
                        continue;
                    };
                    let Some(io) = this.io.take() else {
                        return Poll::Ready(Err(this.fail(NegotiationError::Failed)));
                    };
                    if index >= this.protocols.len() {
                        return Poll::Ready(Err(this.fail(ProtocolError::InvalidProtocol.into())));
                    }
                    this.state = ListenerState::Done;
                    let protocol = this.protocols.swap_remove(index);
                    return Poll::Ready(Ok((protocol, Negotiated::completed(io))));
                }
                ListenerState::Done => return Poll::Ready(Err(NegotiationError::Failed)),
            }
        }
    }
}

impl<R, N> fmt::Debug for ListenerSelectFuture<R, N> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ListenerSelectFuture")
            .field("state", &self.state)
            .field("protocols", &self.protocols.len())
            .field("rejected_any", &self.rejected_any)
            .finish_non_exhaustive()
    }
}
