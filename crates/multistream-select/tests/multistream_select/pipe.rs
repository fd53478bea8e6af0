//! A bounded in-memory duplex stream for driving negotiations without sockets.
//!
//! Each direction is a byte queue of fixed capacity; reads and writes move at most `chunk`
//! bytes per call, so a small `chunk` exercises every partial-read and partial-write path.
//! Every accepted write is logged, so tests can check exactly what went out in which call.

use std::{
    collections::VecDeque,
    io,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll, Waker},
};

use futures::{AsyncRead, AsyncWrite};

#[derive(Debug)]
struct Direction {
    buf: VecDeque<u8>,
    capacity: usize,
    /// The writing end closed or was dropped: readers see end of stream once `buf` is empty.
    write_closed: bool,
    /// The reading end was dropped: writers get `BrokenPipe`.
    reader_gone: bool,
    reader: Option<Waker>,
    writer: Option<Waker>,
}

impl Direction {
    fn new(capacity: usize) -> Arc<Mutex<Self>> {
        Arc::new(Mutex::new(Direction {
            buf: VecDeque::new(),
            capacity,
            write_closed: false,
            reader_gone: false,
            reader: None,
            writer: None,
        }))
    }
}

/// The log of every write call an [`Endpoint`] accepted, in order.
#[derive(Debug, Clone, Default)]
pub struct WriteLog(Arc<Mutex<Vec<Vec<u8>>>>);

impl WriteLog {
    /// The bytes of each accepted write call.
    pub fn writes(&self) -> Vec<Vec<u8>> {
        self.0.lock().unwrap().clone()
    }

    /// Everything written so far, concatenated.
    pub fn bytes(&self) -> Vec<u8> {
        self.writes().concat()
    }
}

/// One end of a [`duplex`] pipe.
#[derive(Debug)]
pub struct Endpoint {
    incoming: Arc<Mutex<Direction>>,
    outgoing: Arc<Mutex<Direction>>,
    chunk: usize,
    log: WriteLog,
}

impl Endpoint {
    /// A handle on the log of this end's writes, usable after the end was moved away.
    pub fn write_log(&self) -> WriteLog {
        self.log.clone()
    }
}

/// Two connected ends; each direction buffers up to `capacity` bytes, and each read or write
/// call moves at most `chunk` bytes.
pub fn duplex(capacity: usize, chunk: usize) -> (Endpoint, Endpoint) {
    assert!(capacity > 0 && chunk > 0);
    let a_to_b = Direction::new(capacity);
    let b_to_a = Direction::new(capacity);
    let a = Endpoint {
        incoming: b_to_a.clone(),
        outgoing: a_to_b.clone(),
        chunk,
        log: WriteLog::default(),
    };
    let b = Endpoint {
        incoming: a_to_b,
        outgoing: b_to_a,
        chunk,
        log: WriteLog::default(),
    };
    (a, b)
}

impl AsyncRead for Endpoint {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut [u8]) -> Poll<io::Result<usize>> {
        let mut dir = self.incoming.lock().unwrap();
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        if dir.buf.is_empty() {
            if dir.write_closed {
                return Poll::Ready(Ok(0));
            }
            dir.reader = Some(cx.waker().clone());
            return Poll::Pending;
        }
        let n = buf.len().min(dir.buf.len()).min(self.chunk);
        for (slot, byte) in buf.iter_mut().zip(dir.buf.drain(..n)) {
            *slot = byte;
        }
        if let Some(writer) = dir.writer.take() {
            writer.wake();
        }
        Poll::Ready(Ok(n))
    }
}

impl AsyncWrite for Endpoint {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let mut dir = self.outgoing.lock().unwrap();
        if dir.reader_gone {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        if dir.write_closed {
            return Poll::Ready(Err(io::Error::other("write after close")));
        }
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let space = dir.capacity - dir.buf.len();
        if space == 0 {
            dir.writer = Some(cx.waker().clone());
            return Poll::Pending;
        }
        let n = buf.len().min(space).min(self.chunk);
        dir.buf.extend(&buf[..n]);
        self.log.0.lock().unwrap().push(buf[..n].to_vec());
        if let Some(reader) = dir.reader.take() {
            reader.wake();
        }
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_close(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut dir = self.outgoing.lock().unwrap();
        dir.write_closed = true;
        if let Some(reader) = dir.reader.take() {
            reader.wake();
        }
        Poll::Ready(Ok(()))
    }
}

impl Drop for Endpoint {
    fn drop(&mut self) {
        if let Ok(mut dir) = self.outgoing.lock() {
            dir.write_closed = true;
            if let Some(reader) = dir.reader.take() {
                reader.wake();
            }
        }
        if let Ok(mut dir) = self.incoming.lock() {
            dir.reader_gone = true;
            if let Some(writer) = dir.writer.take() {
                writer.wake();
            }
        }
    }
}
