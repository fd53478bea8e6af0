//! QUANTILE_8BIT (`Quantile8BitQuantization`): bucket borders at approximate quantiles
//! (a quantile of per-chunk quantiles, `quantile_qq_approximation`), indices by `torch.bucketize`,
//! each bucket sent as the mean of its values.
//!
//! Every step is reproduced bit for bit: numpy's linear-interpolation `np.quantile` (including where it
//! computes in float64 and where in float32), torch's `bucketize` against float64 borders, and the
//! in-order float32 sums of `scatter_add_`. Apiary's buffer is therefore byte-identical to hivemind's.

use std::cmp::Ordering;

use bytes::Bytes;

use crate::proto::runtime::CompressionType;
use crate::tensor::pool::Buffer;
use crate::tensor::{SerializeError, Tensor, par};

use super::quantization::{HEADER, N_BINS, average_buckets, write_header};
use super::{Ctx, float16::float32_values};

const CODEC: CompressionType = CompressionType::Quantile8bit;

/// `quantile_qq_approximation`'s `min_chunk_size`.
const MIN_CHUNK: usize = 100_000;

/// Quantiles taken: the bucket borders and both ends.
const N_QUANTILES: usize = N_BINS + 1;

/// Elements per parallel piece of `bucketize`.
const GRAIN: usize = 1 << 16;

pub(super) fn encode(t: &Tensor, ctx: &Ctx) -> Result<Bytes, SerializeError> {
    if !t.dtype().is_floating_point() {
        return Err(SerializeError::UnsupportedDType {
            codec: CODEC,
            dtype: t.dtype(),
        });
    }
    if t.numel() == 0 {
        return Err(SerializeError::EmptyNotSupported { codec: CODEC });
    }
    let x = float32_values(t);
    let quantiles = quantile_qq_approximation(&x, ctx.threads);
    let mut buf = Buffer::new(HEADER + x.len());
    let (head, q) = buf.bytes_mut().split_at_mut(HEADER);
    bucketize(&x, &quantiles[1..N_QUANTILES - 1], q, ctx.threads);
    let codebook = average_buckets(&x, q, ctx.threads);
    write_header(head, &codebook);
    Ok(buf.into_bytes())
}

/// hivemind's `get_chunk_size`: chunks of at least `min_chunk` elements, evened out.
fn get_chunk_size(n: usize, min_chunk: usize) -> usize {
    if min_chunk >= n {
        return min_chunk;
    }
    let leftover = n % min_chunk;
    if leftover == 0 {
        min_chunk
    } else {
        min_chunk + (leftover - 1) / (n / min_chunk) + 1
    }
}

/// `quantile_qq_approximation(x, 257)` for a non-empty `x`: 257 uniform quantiles of each chunk (float32
/// results), then 257 uniform quantiles of all of those (float64 results, as numpy returns them).
fn quantile_qq_approximation(x: &[f32], threads: usize) -> [f64; N_QUANTILES] {
    let chunk = get_chunk_size(x.len(), MIN_CHUNK);
    let chunks = (x.len() - 1) / chunk + 1;
    let per_chunk = par::map_ranges(chunks, 1, par::threads_for(x.len(), threads), |r| {
        let c = &x[r.start * chunk..((r.start + 1) * chunk).min(x.len())];
        let mut out = [0f32; N_QUANTILES];
        match sorted(c) {
            Some(s) => {
                for (i, o) in out.iter_mut().enumerate() {
                    *o = interpolate_f32(&s, i);
                }
            }
            None => out.fill(f32::NAN),
        }
        out
    });
    let all: Vec<f32> = per_chunk.iter().flatten().copied().collect();
    let mut out = [f64::NAN; N_QUANTILES];
    if let Some(s) = sorted(&all) {
        for (i, o) in out.iter_mut().enumerate() {
            *o = interpolate_f64(&s, i);
        }
    }
    out
}

/// Position of quantile `i / 256` among `n` sorted values: `(previous, next, gamma)` as numpy's
/// `_get_indexes` / `_get_gamma` give them (the virtual index `(n - 1) · i / 256` is exact in the
/// float32 or float64 numpy computes it in).
fn position(n: usize, i: usize) -> (usize, usize, f64) {
    let v = (n - 1) as f64 * i as f64 / N_BINS as f64;
    if v >= (n - 1) as f64 {
        // above the last index numpy takes index -1 and gamma = v - (-1)
        (n - 1, n - 1, v + 1.0)
    } else {
        let p = v.floor();
        (p as usize, p as usize + 1, v - p)
    }
}

/// numpy's `_lerp(a, b, gamma)` written into a float32 `out`: float32 `diff`, the first form in
/// float64 rounded to float32, the second form (for gamma ≥ 0.5) in float32.
fn interpolate_f32(s: &[f32], i: usize) -> f32 {
    let (p, nx, t) = position(s.len(), i);
    let (a, b) = (s[p], s[nx]);
    let diff = b - a;
    if t >= 0.5 {
        b - (f64::from(diff) * (1.0 - t)) as f32
    } else {
        (f64::from(a) + f64::from(diff) * t) as f32
    }
}

/// numpy's `_lerp` with a float64 result (no `out`): both forms in float64.
fn interpolate_f64(s: &[f32], i: usize) -> f64 {
    let (p, nx, t) = position(s.len(), i);
    let (a, b) = (s[p], s[nx]);
    let diff = f64::from(b - a);
    if t >= 0.5 {
        f64::from(b) - diff * (1.0 - t)
    } else {
        f64::from(a) + diff * t
    }
}

/// The values sorted ascending (zeros all positive), or `None` if any is NaN (numpy then returns NaN
/// for every quantile of that array).
fn sorted(x: &[f32]) -> Option<Vec<f32>> {
    if x.iter().any(|v| v.is_nan()) {
        return None;
    }
    let keys: Vec<u32> = x.iter().map(|&v| sort_key(v)).collect();
    Some(radix_sort(keys).into_iter().map(from_sort_key).collect())
}

/// An order-preserving map of non-NaN floats to integers; -0.0 maps like +0.0 (they compare equal).
#[inline]
fn sort_key(v: f32) -> u32 {
    let b = (v + 0.0).to_bits();
    if b >> 31 == 1 { !b } else { b | 0x8000_0000 }
}

#[inline]
fn from_sort_key(k: u32) -> f32 {
    f32::from_bits(if k >> 31 == 1 { k & 0x7FFF_FFFF } else { !k })
}

/// LSD radix sort, three 11-bit digits; a digit every key shares is skipped.
fn radix_sort(mut keys: Vec<u32>) -> Vec<u32> {
    const BITS: u32 = 11;
    const BUCKETS: usize = 1 << BITS;
    let mut hist = vec![[0usize; BUCKETS]; 3];
    for &k in &keys {
        for (d, h) in hist.iter_mut().enumerate() {
            h[((k >> (BITS * d as u32)) as usize) & (BUCKETS - 1)] += 1;
        }
    }
    let mut scratch = vec![0u32; keys.len()];
    for (d, h) in hist.iter().enumerate() {
        if h.contains(&keys.len()) {
            continue;
        }
        let mut offsets = [0usize; BUCKETS];
        let mut acc = 0;
        for (o, &c) in offsets.iter_mut().zip(h.iter()) {
            *o = acc;
            acc += c;
        }
        let shift = BITS * d as u32;
        for &k in &keys {
            let b = ((k >> shift) as usize) & (BUCKETS - 1);
            scratch[offsets[b]] = k;
            offsets[b] += 1;
        }
        std::mem::swap(&mut keys, &mut scratch);
    }
    keys
}

/// The largest float32 not above `b`: for any float32 `x`, `b < x` exactly when `round_down(b) < x`.
fn round_down(b: f64) -> f32 {
    let r = b as f32;
    if f64::from(r) > b { r.next_down() } else { r }
}

/// `torch.clamp(torch.bucketize(x, borders), 0, 255)` with float64 `borders` (x is promoted to
/// float64): the number of borders below each value, by torch's binary search.
fn bucketize(x: &[f32], borders: &[f64], q: &mut [u8], threads: usize) {
    let threads = par::threads_for(x.len(), threads);
    let sorted = borders.iter().all(|b| !b.is_nan()) && borders.windows(2).all(|w| w[0] <= w[1]);
    if sorted && borders.len() == N_BINS - 1 {
        // Equivalent float32 thresholds, padded to 256 with +inf, searched branch-free.
        let mut th = [f32::INFINITY; N_BINS];
        for (t, &b) in th.iter_mut().zip(borders) {
            *t = round_down(b);
        }
        par::for_each_mut(q, GRAIN, threads, |off, piece| {
            let (ins, in_tail) = x[off..off + piece.len()].as_chunks::<LANES>();
            let (outs, out_tail) = piece.as_chunks_mut::<LANES>();
            for (o, v) in outs.iter_mut().zip(ins) {
                *o = count_below(&th, v);
            }
            for (o, &v) in out_tail.iter_mut().zip(in_tail) {
                *o = count_below(&th, &[v; LANES])[0];
            }
        });
    } else {
        par::for_each_mut(q, GRAIN, threads, |off, piece| {
            for (o, &v) in piece.iter_mut().zip(&x[off..]) {
                *o = torch_lower_bound(borders, f64::from(v)).min(N_BINS - 1) as u8;
            }
        });
    }
}

/// Values searched in lockstep, so that the eight dependent table loads of one search overlap with
/// those of the others.
const LANES: usize = 8;

/// For each of `v`, how many of the sorted `th` are below it (at most 255: the last entry is +inf), by
/// a branch-free binary search; NaN gives 255, as torch's search does.
#[inline]
fn count_below(th: &[f32; N_BINS], v: &[f32; LANES]) -> [u8; LANES] {
    let mut base = [0usize; LANES];
    let mut step = N_BINS / 2;
    while step > 0 {
        for (b, &x) in base.iter_mut().zip(v) {
            *b += step * usize::from(th[(*b + step - 1) & (N_BINS - 1)] < x);
        }
        step /= 2;
    }
    let mut out = [0u8; LANES];
    for ((o, &b), &x) in out.iter_mut().zip(&base).zip(v) {
        *o = if x.is_nan() { (N_BINS - 1) as u8 } else { b as u8 };
    }
    out
}

/// torch's `cus_lower_bound` (`!(mid >= val)` moves right), exact for unsorted or NaN borders too.
fn torch_lower_bound(bd: &[f64], val: f64) -> usize {
    let (mut start, mut end) = (0usize, bd.len());
    while start < end {
        let mid = start + ((end - start) >> 1);
        // `!(mid >= val)`: true for NaN on either side
        let at_or_above = matches!(
            bd[mid].partial_cmp(&val),
            Some(Ordering::Greater | Ordering::Equal)
        );
        if !at_or_above {
            start = mid + 1;
        } else {
            end = mid;
        }
    }
    start
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_sizes_match_hivemind() {
        assert_eq!(get_chunk_size(7, MIN_CHUNK), 100_000);
        assert_eq!(get_chunk_size(100_000, MIN_CHUNK), 100_000);
        assert_eq!(get_chunk_size(200_000, MIN_CHUNK), 100_000);
        assert_eq!(get_chunk_size(250_000, MIN_CHUNK), 125_000);
        assert_eq!(get_chunk_size(1_000_001, MIN_CHUNK), 100_001);
    }

    #[test]
    fn radix_sort_sorts() {
        let x = [
            3.5f32,
            -0.0,
            0.0,
            -7.25,
            f32::INFINITY,
            f32::NEG_INFINITY,
            1e-40,
            -1e-40,
            2.0,
        ];
        let s = sorted(&x).unwrap();
        let mut expect = x.to_vec();
        expect.sort_by(f32::total_cmp);
        for (a, b) in s.iter().zip(&expect) {
            assert!(a == b, "{s:?} vs {expect:?}");
        }
        assert!(sorted(&[1.0, f32::NAN]).is_none());
    }

    #[test]
    fn fast_bucketize_equals_torch_search() {
        let borders: Vec<f64> = (0..255)
            .map(|i| (f64::from(i) - 127.0) / 31.0 + 1e-9 * f64::from(i % 3))
            .collect();
        let x: Vec<f32> = (0..20_000)
            .map(|i| ((i as f32) * 0.618).sin() * 5.0)
            .chain(borders.iter().map(|&b| b as f32))
            .chain([f32::INFINITY, f32::NEG_INFINITY, -0.0, f32::NAN])
            .collect();
        let mut fast = vec![0u8; x.len()];
        bucketize(&x, &borders, &mut fast, 1);
        let exact: Vec<u8> = x
            .iter()
            .map(|&v| torch_lower_bound(&borders, f64::from(v)).min(255) as u8)
            .collect();
        assert_eq!(fast, exact);
    }
}
