//! Buffered, bounded message I/O shared by the dialer, the listener and [`crate::Negotiated`].

use std::{
    fmt, io,
    pin::Pin,
    task::{Context, Poll, ready},
};

use futures::{AsyncRead, AsyncWrite};

use crate::{
    ProtocolError,
    message::{self, Frame},
};

/// Capacity of the read buffer while negotiating. A whole single-line message (at most a
/// two-byte prefix plus [`message::MAX_LINE_LEN`]) always fits, with room to read ahead.
const READ_CAPACITY: usize = 2 * message::MAX_LINE_LEN;

/// A stream plus the bytes read from it but not consumed yet, and the negotiation bytes
/// queued for it but not written yet.
///
/// Both buffers are bounded: at most [`READ_CAPACITY`] bytes are ever read ahead, and the
/// write buffer only holds the messages of one negotiation step (callers write it out before
/// queueing more), plus whatever [`crate::Negotiated`] coalesces under its own cap.
pub(crate) struct MessageIo<R> {
    pub(crate) inner: R,
    /// Bytes read from `inner`; `read_buf[read_pos..]` are not consumed yet.
    read_buf: Vec<u8>,
    read_pos: usize,
    /// Bytes to write to `inner` before anything else.
    pub(crate) write_buf: Vec<u8>,
    /// Whether bytes were written to `inner` since its last successful flush.
    unflushed: bool,
}

impl<R> MessageIo<R> {
    pub(crate) fn new(inner: R) -> Self {
        MessageIo {
            inner,
            read_buf: Vec::new(),
            read_pos: 0,
            write_buf: Vec::new(),
            unflushed: false,
        }
    }

    /// Bytes read from the stream that no message consumed: they belong to the negotiated
    /// protocol.
    pub(crate) fn buffered(&self) -> &[u8] {
        &self.read_buf[self.read_pos..]
    }

    /// Marks `n` bytes of [`Self::buffered`] as consumed, releasing the buffer once it is empty.
    pub(crate) fn consume(&mut self, n: usize) {
        self.read_pos += n;
        if self.read_pos >= self.read_buf.len() {
            self.read_buf = Vec::new();
            self.read_pos = 0;
        }
    }

    /// Shrinks the read buffer to the unconsumed bytes, once negotiation is over and no more
    /// messages will be read through it.
    pub(crate) fn shrink_read_buffer(&mut self) {
        if self.read_pos > 0 || self.read_buf.capacity() > self.read_buf.len() {
            self.read_buf = self.buffered().to_vec();
            self.read_pos = 0;
        }
    }

    /// Copies buffered bytes into `buf`, returning how many were copied.
    pub(crate) fn read_buffered(&mut self, buf: &mut [u8]) -> usize {
        let available = self.buffered();
        let n = available.len().min(buf.len());
        buf[..n].copy_from_slice(&available[..n]);
        self.consume(n);
        n
    }
}

impl<R: AsyncRead + Unpin> MessageIo<R> {
    /// Reads the next single-line message and returns its payload (with the `'\n'`).
    ///
    /// `Ok(None)` means the stream ended cleanly before the first byte of a message; an end in
    /// the middle of one is an [`io::ErrorKind::UnexpectedEof`] error.
    pub(crate) fn poll_message(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Option<Vec<u8>>, ProtocolError>> {
        loop {
            if let Frame::Complete { payload_start, end } =
                message::parse_frame(self.buffered(), message::MAX_LINE_LEN)?
            {
                let payload = self.buffered()[payload_start..end].to_vec();
                self.consume(end);
                return Poll::Ready(Ok(Some(payload)));
            }
            if ready!(self.poll_fill(cx))? == 0 {
                return Poll::Ready(if self.buffered().is_empty() {
                    Ok(None)
                } else {
                    Err(ProtocolError::IoError(io::ErrorKind::UnexpectedEof.into()))
                });
            }
        }
    }

    /// Reads more bytes into the read buffer; `Ok(0)` means end of stream.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        if self.read_pos > 0 {
            self.read_buf.drain(..self.read_pos);
            self.read_pos = 0;
        }
        let filled = self.read_buf.len();
        // `parse_frame` has rejected anything that would not fit, so there is always room.
        debug_assert!(filled < READ_CAPACITY);
        self.read_buf.resize(READ_CAPACITY, 0);
        let result = Pin::new(&mut self.inner).poll_read(cx, &mut self.read_buf[filled..]);
        let n = match &result {
            Poll::Ready(Ok(n)) => (*n).min(READ_CAPACITY - filled),
            _ => 0,
        };
        self.read_buf.truncate(filled + n);
        result.map_ok(|_| n)
    }
}

impl<R: AsyncWrite + Unpin> MessageIo<R> {
    /// Whether queued bytes are not written yet, or written but not flushed.
    pub(crate) fn needs_flush(&self) -> bool {
        !self.write_buf.is_empty() || self.unflushed
    }

    /// Writes out the whole write buffer (without flushing `inner`).
    pub(crate) fn poll_write_buffer(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.write_buf.is_empty() {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &self.write_buf))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.unflushed = true;
            self.write_buf.drain(..n.min(self.write_buf.len()));
        }
        Poll::Ready(Ok(()))
    }

    /// Writes out the write buffer and flushes `inner` if anything was written through this
    /// `MessageIo` since the last flush.
    pub(crate) fn poll_flush_buffer(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_write_buffer(cx))?;
        if self.unflushed {
            ready!(Pin::new(&mut self.inner).poll_flush(cx))?;
            self.unflushed = false;
        }
        Poll::Ready(Ok(()))
    }

    /// Writes out the write buffer and flushes `inner` unconditionally.
    pub(crate) fn poll_flush_all(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_write_buffer(cx))?;
        ready!(Pin::new(&mut self.inner).poll_flush(cx))?;
        self.unflushed = false;
        Poll::Ready(Ok(()))
    }
}

impl<R: fmt::Debug> fmt::Debug for MessageIo<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MessageIo")
            .field("inner", &self.inner)
            .field("read_buffered", &self.buffered().len())
            .field("write_buffered", &self.write_buf.len())
            .finish()
    }
}
