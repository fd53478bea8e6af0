//! Recycling of large tensor buffers.
//!
//! A fresh multi-megabyte allocation comes from `mmap`, and every one of its 4 KiB pages faults on first
//! write; on virtual machines that costs as much as copying the data several times (≈25 ms for 40 MB on
//! the 2-vCPU machines this project is measured on, against 5 ms for the copy itself). Training sends the
//! same tensor sizes every step, so the codecs write into buffers recycled from earlier tensors: when
//! the last [`Bytes`] of a large buffer made here is dropped, the memory goes back to a small pool
//! instead of the OS, already faulted in.
//!
//! The pool keeps at most [`buffer_pool_limit`] bytes idle (default 256 MiB; [`set_buffer_pool_limit`]
//! changes it, 0 turns recycling off) and only buffers of at least 1 MiB. A recycled buffer is only
//! handed out for a request of at least half its size.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytemuck::Pod;
use bytes::Bytes;

/// Smallest buffer worth recycling.
const MIN_POOLED: usize = 1 << 20;

static LIMIT: AtomicUsize = AtomicUsize::new(256 << 20);

/// Idle buffers, oldest first, and their total size in bytes.
static POOL: Mutex<(VecDeque<Vec<u64>>, usize)> = Mutex::new((VecDeque::new(), 0));

/// The most bytes of idle tensor buffers kept for reuse.
pub fn buffer_pool_limit() -> usize {
    LIMIT.load(Ordering::Relaxed)
}

/// Sets how many bytes of idle tensor buffers are kept for reuse (0 disables recycling and frees what
/// is held).
pub fn set_buffer_pool_limit(bytes: usize) {
    LIMIT.store(bytes, Ordering::Relaxed);
    if let Ok(mut pool) = POOL.lock() {
        let (free, idle) = &mut *pool;
        while *idle > bytes {
            match free.pop_front() {
                Some(v) => *idle -= v.len() * 8,
                None => break,
            }
        }
    }
}

/// An output buffer of `len` bytes, 8-byte aligned. Its contents are unspecified (a recycled buffer
/// holds old data): whoever fills it writes every byte.
pub(crate) struct Buffer {
    words: Vec<u64>,
    len: usize,
}

impl Buffer {
    /// A buffer of `len` bytes, recycled when one fits.
    pub(crate) fn new(len: usize) -> Buffer {
        let words = len.div_ceil(8);
        if len >= MIN_POOLED
            && let Some(v) = take(words)
        {
            return Buffer { words: v, len };
        }
        Buffer {
            words: vec![0u64; words],
            len,
        }
    }

    /// A buffer holding a copy of `data`.
    pub(crate) fn copy_of(data: &[u8]) -> Buffer {
        let mut b = Buffer::new(data.len());
        b.bytes_mut().copy_from_slice(data);
        b
    }

    /// The contents as elements of `T` (alignment at most 8; `len` a multiple of its size).
    pub(crate) fn as_mut<T: Pod>(&mut self) -> &mut [T] {
        let all: &mut [T] = bytemuck::cast_slice_mut(&mut self.words);
        &mut all[..self.len / size_of::<T>()]
    }

    /// The contents as bytes.
    pub(crate) fn bytes_mut(&mut self) -> &mut [u8] {
        let len = self.len;
        &mut bytemuck::cast_slice_mut(&mut self.words)[..len]
    }

    /// Hands the buffer over as [`Bytes`] (no copy); it returns to the pool when the last reference goes.
    pub(crate) fn into_bytes(self) -> Bytes {
        if self.len == 0 {
            return Bytes::new();
        }
        Bytes::from_owner(self)
    }
}

impl AsRef<[u8]> for Buffer {
    fn as_ref(&self) -> &[u8] {
        &bytemuck::cast_slice(&self.words)[..self.len]
    }
}

impl Drop for Buffer {
    fn drop(&mut self) {
        let size = self.words.len() * 8;
        if size < MIN_POOLED {
            return;
        }
        let limit = buffer_pool_limit();
        if size > limit {
            return;
        }
        if let Ok(mut pool) = POOL.lock() {
            let (free, idle) = &mut *pool;
            while *idle + size > limit {
                match free.pop_front() {
                    Some(v) => *idle -= v.len() * 8,
                    None => return,
                }
            }
            *idle += size;
            free.push_back(std::mem::take(&mut self.words));
        }
    }
}

/// The smallest idle buffer of at least `words` words and at most twice that, if any.
fn take(words: usize) -> Option<Vec<u64>> {
    let mut pool = POOL.lock().ok()?;
    let (free, idle) = &mut *pool;
    let (i, _) = free
        .iter()
        .enumerate()
        .filter(|(_, v)| v.len() >= words && v.len() <= 2 * words)
        .min_by_key(|(_, v)| v.len())?;
    let v = free.remove(i)?;
    *idle -= v.len() * 8;
    Some(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_recycled_and_sized() {
        let mut b = Buffer::new(3 << 20);
        b.as_mut::<f32>().fill(1.5);
        assert_eq!(b.as_mut::<f32>().len(), 3 << 18);
        let bytes = b.into_bytes();
        assert_eq!(bytes.len(), 3 << 20);
        let ptr = bytes.as_ptr();
        let clone = bytes.slice(8..16);
        drop(bytes);
        assert_eq!(&clone[..4], &1.5f32.to_le_bytes());
        drop(clone);
        // the same memory comes back for a request of similar size (other tests may race for it)
        let again = Buffer::new((3 << 20) - 100);
        let reused = again.as_ref().as_ptr() == ptr;
        assert_eq!(again.as_ref().len(), (3 << 20) - 100);
        drop(again);
        if reused {
            assert!(buffer_pool_limit() > 0);
        }
        let small = Buffer::copy_of(&[1, 2, 3]);
        assert_eq!(small.as_ref(), &[1, 2, 3]);
        assert!(Buffer::new(0).into_bytes().is_empty());
    }
}
