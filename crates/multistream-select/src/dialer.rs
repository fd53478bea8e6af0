//! The dialer (initiator) side: propose protocols one after the other until one is accepted.

use std::{
    fmt,
    future::Future,
    pin::Pin,
    task::{Context, Poll, ready},
};

use futures::{AsyncRead, AsyncWrite};

use crate::{
    Negotiated, NegotiationError, ProtocolError, Version,
    io::MessageIo,
    message::{self, HEADER, NA},
};

/// Returns a future that negotiates a protocol on `inner` as the dialer (initiator).
///
/// `protocols` are proposed in order; the first one the listener accepts wins, and the future
/// resolves to it together with the [`Negotiated`] stream. Names need no leading `/`
/// (`"DHTProtocol.rpc_find"` works); names that can never be valid (empty, over 1023 bytes,
/// control characters, `na`, `ls`) are skipped.
///
/// With [`Version::V1`], every proposal waits for the listener's answer. With
/// [`Version::V1Lazy`], the *last* proposal (the only one, when there is one protocol) does not
/// wait: the future resolves at once, the header and the proposal are sent with the first
/// write, flush or read of the [`Negotiated`] stream, and the confirmation is checked on its
/// first read. A rejection then surfaces as an I/O error on that stream.
///
/// The future fails with [`NegotiationError::Failed`] when the listener rejects every
/// proposal, and with a [`ProtocolError`] when the stream fails or the listener breaks the
/// protocol.
pub fn dialer_select_proto<R, I>(
    inner: R,
    protocols: I,
    version: Version,
) -> DialerSelectFuture<R, I::IntoIter>
where
    R: AsyncRead + AsyncWrite,
    I: IntoIterator,
    I::Item: AsRef<str>,
{
    DialerSelectFuture {
        io: Some(MessageIo::new(inner)),
        version,
        protocols: protocols.into_iter(),
        upcoming: None,
        current: None,
        header_sent: false,
        header_confirmed: false,
        proposed_any: false,
        skipped_invalid: false,
        state: DialerState::Propose,
    }
}

/// Future returned by [`dialer_select_proto`].
///
/// Resolves to the accepted protocol and the [`Negotiated`] stream. It is `Unpin` when `R` is,
/// and `Send` when `R`, the iterator and its items are.
#[must_use = "futures do nothing unless polled"]
pub struct DialerSelectFuture<R, I: Iterator> {
    /// `None` once the future has resolved.
    io: Option<MessageIo<R>>,
    version: Version,
    protocols: I,
    /// The next valid protocol, pulled early to know whether the current one is the last.
    upcoming: Option<I::Item>,
    /// The protocol proposed last, awaiting an answer.
    current: Option<I::Item>,
    header_sent: bool,
    header_confirmed: bool,
    proposed_any: bool,
    skipped_invalid: bool,
    state: DialerState,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DialerState {
    /// Queue the next proposal (and the header before the first one).
    Propose,
    /// Write and flush the queued messages.
    Flush,
    /// Read the listener's header.
    AwaitHeader,
    /// Read the listener's answer to `current`.
    AwaitAnswer,
    /// Resolved.
    Done,
}

// Nothing is ever pinned through the future: the iterator and its items are only moved or
// used through `&mut`, and `R` is only pinned via `Pin::new`, which requires `R: Unpin`.
impl<R: Unpin, I: Iterator> Unpin for DialerSelectFuture<R, I> {}

impl<R, I> DialerSelectFuture<R, I>
where
    I: Iterator,
    I::Item: AsRef<str>,
{
    /// Next protocol name from the iterator that can be proposed at all.
    fn pull_valid(&mut self) -> Option<I::Item> {
        for protocol in self.protocols.by_ref() {
            match message::validate_name(protocol.as_ref()) {
                Ok(()) => return Some(protocol),
                Err(_) => {
                    tracing::debug!(
                        protocol = protocol.as_ref(),
                        "multistream-select: not proposing invalid protocol name"
                    );
                    self.skipped_invalid = true;
                }
            }
        }
        None
    }

    fn fail(&mut self, e: NegotiationError) -> NegotiationError {
        tracing::debug!(error = %e, "multistream-select: dialer negotiation failed");
        self.state = DialerState::Done;
        self.io = None;
        e
    }
}

impl<R, I> Future for DialerSelectFuture<R, I>
where
    R: AsyncRead + AsyncWrite + Unpin,
    I: Iterator,
    I::Item: AsRef<str>,
{
    type Output = Result<(I::Item, Negotiated<R>), NegotiationError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        loop {
            match this.state {
                DialerState::Propose => {
                    let next = match this.upcoming.take() {
                        Some(p) => Some(p),
                        None => this.pull_valid(),
                    };
                    let Some(protocol) = next else {
                        let e = if !this.proposed_any && this.skipped_invalid {
                            ProtocolError::InvalidProtocol.into()
                        } else {
                            NegotiationError::Failed
                        };
                        return Poll::Ready(Err(this.fail(e)));
                    };
                    this.upcoming = this.pull_valid();
                    let Some(io) = this.io.as_mut() else {
                        return Poll::Ready(Err(this.fail(NegotiationError::Failed)));
                    };
                    if !this.header_sent {
                        message::encode_line(&mut io.write_buf, HEADER);
                        this.header_sent = true;
                    }
                    message::encode_line(&mut io.write_buf, protocol.as_ref());
                    this.proposed_any = true;
                    tracing::trace!(protocol = protocol.as_ref(), "multistream-select: proposing");

                    if this.version == Version::V1Lazy && this.upcoming.is_none() {
                        let Some(io) = this.io.take() else {
                            return Poll::Ready(Err(this.fail(NegotiationError::Failed)));
                        };
                        this.state = DialerState::Done;
                        let name = protocol.as_ref().to_owned();
                        let negotiated = Negotiated::expecting(io, !this.header_confirmed, name);
                        return Poll::Ready(Ok((protocol, negotiated)));
                    }
                    this.current = Some(protocol);
                    this.state = DialerState::Flush;
                }
                DialerState::Flush => {
                    let Some(io) = this.io.as_mut() else {
                        return Poll::Ready(Err(this.fail(NegotiationError::Failed)));
                    };
                    if let Err(e) = ready!(io.poll_flush_all(cx)) {
                        return Poll::Ready(Err(this.fail(e.into())));
                    }
                    this.state = if this.header_confirmed {
                        DialerState::AwaitAnswer
                    } else {
                        DialerState::AwaitHeader
                    };
                }
                DialerState::AwaitHeader | DialerState::AwaitAnswer => {
                    let Some(io) = this.io.as_mut() else {
                        return Poll::Ready(Err(this.fail(NegotiationError::Failed)));
                    };
                    let payload = match ready!(io.poll_message(cx)) {
                        Ok(Some(payload)) => payload,
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
                    if this.state == DialerState::AwaitHeader {
                        if line != HEADER {
                            // Another multistream version, or not multistream-select at all.
                            tracing::debug!(header = line, "multistream-select: unexpected header");
                            return Poll::Ready(Err(this.fail(NegotiationError::Failed)));
                        }
                        this.header_confirmed = true;
                        this.state = DialerState::AwaitAnswer;
                        continue;
                    }
                    let Some(current) = this.current.take() else {
                        return Poll::Ready(Err(this.fail(NegotiationError::Failed)));
                    };
                    if line == current.as_ref() {
                        tracing::trace!(protocol = line, "multistream-select: proposal accepted");
                        let Some(io) = this.io.take() else {
                            return Poll::Ready(Err(this.fail(NegotiationError::Failed)));
                        };
                        this.state = DialerState::Done;
                        return Poll::Ready(Ok((current, Negotiated::completed(io))));
                    }
                    if line == NA {
                        tracing::trace!(
                            protocol = current.as_ref(),
                            "multistream-select: proposal rejected"
                        );
                        this.state = DialerState::Propose;
                        continue;
                    }
                    return Poll::Ready(Err(this.fail(ProtocolError::InvalidMessage.into())));
                }
                // Polled after resolving: report it instead of panicking.
                DialerState::Done => return Poll::Ready(Err(NegotiationError::Failed)),
            }
        }
    }
}

impl<R, I: Iterator> fmt::Debug for DialerSelectFuture<R, I> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DialerSelectFuture")
            .field("version", &self.version)
            .field("state", &self.state)
            .field("header_confirmed", &self.header_confirmed)
            .finish_non_exhaustive()
    }
}
