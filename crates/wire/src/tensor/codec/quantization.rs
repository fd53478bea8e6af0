//! What UNIFORM_8BIT and QUANTILE_8BIT share (hivemind's `Quantization` base class): the buffer
//! `int64 codebook_len ‖ float32 codebook[codebook_len] ‖ uint8 indices[numel]`, bucket averages as
//! codebooks, and decoding by table lookup.

use bytes::Bytes;

use crate::proto::runtime::CompressionType;
use crate::tensor::cast::{self, view};
use crate::tensor::pool::Buffer;
use crate::tensor::{DType, DeserializeError, par};

use super::{Ctx, Shape};

/// Buckets of an 8-bit codebook.
pub(super) const N_BINS: usize = 256;

/// Elements per parallel piece.
const GRAIN: usize = 1 << 16;

/// hivemind's `average_buckets`: the mean of the values in each bucket (0 for empty buckets).
///
/// The sums run in element order in float32, exactly as torch's single-threaded `scatter_add_` does
/// them, so the codebook is bit-identical to hivemind's whenever the indices are.
pub(super) fn average_buckets(x: &[f32], q: &[u8], threads: usize) -> [f32; N_BINS] {
    let mut sums = [0f32; N_BINS];
    for (&v, &i) in x.iter().zip(q) {
        let s = &mut sums[usize::from(i)];
        *s = add_x86(*s, v);
    }
    let counts = par::map_ranges(q.len(), GRAIN, par::threads_for(q.len(), threads), |r| {
        let mut c = [0u64; N_BINS];
        for &i in &q[r] {
            c[usize::from(i)] += 1;
        }
        c
    });
    let mut lookup = [0f32; N_BINS];
    for (b, l) in lookup.iter_mut().enumerate() {
        let count: u64 = counts.iter().map(|c| c[b]).sum();
        *l = sums[b] / count.max(1) as f32;
    }
    lookup
}

/// `a + b` with x86 SSE's NaN rules (`addss a, b`: a's NaN wins over b's, quieted; inf − inf gives the
/// default NaN `0xFFC00000`), which Rust's commutative `+` leaves open. Keeps NaN codebook entries
/// identical to torch's.
#[inline]
fn add_x86(a: f32, b: f32) -> f32 {
    let s = a + b;
    if !s.is_nan() {
        s
    } else if a.is_nan() {
        f32::from_bits(a.to_bits() | 0x0040_0000)
    } else if b.is_nan() {
        f32::from_bits(b.to_bits() | 0x0040_0000)
    } else {
        f32::from_bits(0xFFC0_0000)
    }
}

/// Bytes before the indices: the codebook length and a 256-entry codebook.
pub(super) const HEADER: usize = 8 + 4 * N_BINS;

/// Writes the codebook length and codebook in front of the indices.
pub(super) fn write_header(head: &mut [u8], codebook: &[f32; N_BINS]) {
    head[..8].copy_from_slice(&(N_BINS as i64).to_le_bytes());
    for (dst, c) in head[8..HEADER].chunks_exact_mut(4).zip(codebook) {
        dst.copy_from_slice(&c.to_le_bytes());
    }
}

/// Reads an int64 count at `at`, checking it fits and is not negative.
pub(super) fn read_count(
    codec: CompressionType,
    buf: &[u8],
    at: usize,
    what: &'static str,
) -> Result<u64, DeserializeError> {
    let bytes: [u8; 8] =
        buf.get(at..at + 8)
            .and_then(|b| b.try_into().ok())
            .ok_or(DeserializeError::Truncated {
                codec,
                what,
                needed: at as u64 + 8,
                actual: buf.len(),
            })?;
    let n = i64::from_le_bytes(bytes);
    u64::try_from(n).map_err(|_| DeserializeError::InvalidCount { codec, what, size: n })
}

/// Checks every index is inside a codebook of `len` entries (always true from 256 entries up).
pub(super) fn check_indices(codec: CompressionType, q: &[u8], len: usize) -> Result<(), DeserializeError> {
    if len >= N_BINS {
        return Ok(());
    }
    let max = q.iter().copied().max().unwrap_or(0);
    if usize::from(max) >= len {
        return Err(DeserializeError::IndexOutOfCodebook {
            codec,
            index: max,
            codebook_len: len,
        });
    }
    Ok(())
}

/// `codebook.to(dtype)[indices]`: converts the (at most 256 useful) codebook entries to `dtype` once,
/// then gathers. Indices must have been checked against the codebook length.
pub(super) fn lookup(codebook: &[f32], q: &[u8], dtype: DType, ctx: &Ctx) -> Bytes {
    let mut table = Vec::with_capacity(N_BINS * dtype.size());
    for i in 0..N_BINS {
        cast::f32_to_le(dtype, codebook.get(i).copied().unwrap_or(0.0), &mut table);
    }
    let threads = par::threads_for(q.len(), ctx.threads);
    match dtype.size() {
        1 => gather::<u8>(&table, q, threads),
        2 => gather::<u16>(&table, q, threads),
        4 => gather::<u32>(&table, q, threads),
        _ => gather::<u64>(&table, q, threads),
    }
}

fn gather<T: bytemuck::Pod + Send + Sync>(table: &[u8], q: &[u8], threads: usize) -> Bytes {
    let mut entries = [T::zeroed(); N_BINS];
    for (e, b) in entries.iter_mut().zip(table.chunks_exact(size_of::<T>())) {
        *e = bytemuck::pod_read_unaligned(b);
    }
    let mut out = Buffer::new(q.len() * size_of::<T>());
    par::for_each_mut(out.as_mut::<T>(), GRAIN, threads, |off, piece| {
        for (o, &i) in piece.iter_mut().zip(&q[off..]) {
            *o = entries[usize::from(i)];
        }
    });
    out.into_bytes()
}

/// Splits a `Quantization` buffer into `(codebook, indices)` and checks both against the shape. Only
/// the first 256 codebook entries can be indexed, so only they are read.
pub(super) fn split(
    codec: CompressionType,
    buf: &Bytes,
    shape: &Shape,
) -> Result<(Vec<f32>, Bytes), DeserializeError> {
    let len = read_count(codec, buf, 0, "codebook")?;
    let end = len
        .checked_mul(4)
        .and_then(|b| b.checked_add(8))
        .filter(|&e| e <= buf.len() as u64)
        .ok_or(DeserializeError::Truncated {
            codec,
            what: "codebook",
            needed: len.saturating_mul(4).saturating_add(8),
            actual: buf.len(),
        })? as usize;
    let codebook = view::<f32>(&buf[8..end.min(8 + 4 * N_BINS)]).into_owned();
    let q = buf.slice(end..);
    if q.len() != shape.numel {
        return Err(DeserializeError::BufferLength {
            codec,
            expected: end as u64 + shape.numel as u64,
            actual: buf.len(),
        });
    }
    check_indices(codec, &q, len.min(N_BINS as u64) as usize)?;
    Ok((codebook, q))
}

/// Decodes a UNIFORM_8BIT or QUANTILE_8BIT buffer (any dtype: hivemind converts the codebook with
/// `codebook.to(dtype)`).
pub(super) fn decode(
    codec: CompressionType,
    buf: &Bytes,
    shape: &Shape,
    dtype: DType,
    ctx: &Ctx,
) -> Result<Bytes, DeserializeError> {
    let (codebook, q) = split(codec, buf, shape)?;
    Ok(lookup(&codebook, &q, dtype, ctx))
}
