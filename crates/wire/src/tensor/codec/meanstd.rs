//! MEANSTD_16BIT (`ScaledFloat16Compression`): every row along the last axis is centred and divided by
//! its standard deviation, then sent as float16, followed by the rows' float32 means and stds.
//!
//! Buffer: `float16[numel] ‖ float32 means[rows] ‖ float32 stds[rows]`, where `rows` is the product of
//! the shape with its last dimension replaced by 1. 0-d tensors are refused, as by hivemind.

use bytes::Bytes;
use half::f16;
use half::slice::HalfFloatSliceExt;

use crate::proto::runtime::CompressionType;
use crate::tensor::cast::{self, view};
use crate::tensor::pool::Buffer;
use crate::tensor::{DType, DeserializeError, SerializeError, Tensor, par};

use super::{Ctx, Shape, float16::float32_values, stats};

const CODEC: CompressionType = CompressionType::Meanstd16bit;

/// Elements per parallel piece.
const GRAIN: usize = 1 << 16;

/// Elements converted per step through stack scratch.
const STEP: usize = 1024;

/// `torch.finfo(torch.float32).eps`, the floor of a row's std.
const FP32_EPS: f32 = f32::EPSILON;

/// `(row length, row count)` for a shape with at least one dimension.
fn rows_of(dims: &[usize], numel: usize) -> (usize, usize) {
    let (&last, lead) = dims.split_last().unwrap_or((&1, &[]));
    let rows = numel.checked_div(last).unwrap_or_else(|| lead.iter().product());
    (last, rows)
}

/// Calls `f(row, range)` for every row segment inside `off..off + len`.
fn for_row_segments(
    off: usize,
    len: usize,
    row_len: usize,
    mut f: impl FnMut(usize, std::ops::Range<usize>),
) {
    let end = off + len;
    let mut i = off;
    while i < end {
        let row = i / row_len;
        let seg_end = ((row + 1) * row_len).min(end);
        f(row, i - off..seg_end - off);
        i = seg_end;
    }
}

pub(super) fn encode(t: &Tensor, ctx: &Ctx) -> Result<Bytes, SerializeError> {
    if !matches!(t.dtype(), DType::Float16 | DType::Float32 | DType::Float64) {
        return Err(SerializeError::UnsupportedDType {
            codec: CODEC,
            dtype: t.dtype(),
        });
    }
    if t.shape().is_empty() {
        return Err(SerializeError::ScalarNotSupported { codec: CODEC });
    }
    let x = float32_values(t);
    let numel = x.len();
    let (row_len, rows) = rows_of(t.shape(), numel);

    // Per-row statistics: large rows are summed in parallel, many small rows in parallel batches.
    let stats: Vec<(f32, f32)> = if row_len == 0 {
        vec![(stats::default_nan(), stats::default_nan()); rows]
    } else {
        let row_stats = |row: &[f32], threads: usize| {
            let mean = stats::mean(row, threads);
            let norm = stats::centered_norm(row, mean, threads);
            let std = norm / (row_len as f64).sqrt() as f32;
            (mean, if std < FP32_EPS { FP32_EPS } else { std })
        };
        if row_len >= GRAIN {
            (0..rows)
                .map(|r| row_stats(&x[r * row_len..(r + 1) * row_len], ctx.threads))
                .collect()
        } else {
            let rows_per_piece = (GRAIN / row_len).max(1);
            par::map_ranges(rows, rows_per_piece, par::threads_for(numel, ctx.threads), |rs| {
                rs.map(|r| row_stats(&x[r * row_len..(r + 1) * row_len], 1))
                    .collect::<Vec<_>>()
            })
            .into_iter()
            .flatten()
            .collect()
        }
    };

    let mut out = Buffer::new(2 * numel + 8 * rows);
    let (halves, tail) = out.as_mut::<u16>().split_at_mut(numel);
    par::for_each_mut(
        halves,
        GRAIN,
        par::threads_for(numel, ctx.threads),
        |off, piece| {
            let mut tmp = [0f32; STEP];
            for_row_segments(off, piece.len(), row_len.max(1), |row, seg| {
                let (mean, std) = stats[row];
                let src = &x[off + seg.start..off + seg.end];
                for (s, d) in src.chunks(STEP).zip(piece[seg].chunks_mut(STEP)) {
                    let z = &mut tmp[..s.len()];
                    for (z, &v) in z.iter_mut().zip(s) {
                        *z = (v - mean) / std;
                    }
                    cast::f32_to_f16_clamped(z, d);
                }
            });
        },
    );
    let tail: &mut [u8] = bytemuck::cast_slice_mut(tail);
    let (means, stds) = tail.split_at_mut(4 * rows);
    for ((&(mean, std), m), s) in stats
        .iter()
        .zip(means.chunks_exact_mut(4))
        .zip(stds.chunks_exact_mut(4))
    {
        m.copy_from_slice(&mean.to_le_bytes());
        s.copy_from_slice(&std.to_le_bytes());
    }
    Ok(out.into_bytes())
}

pub(super) fn decode(buf: &Bytes, shape: &Shape, dtype: DType, ctx: &Ctx) -> Result<Bytes, DeserializeError> {
    // hivemind decodes through numpy (no bfloat16) and multiplies in place (integers fail).
    if !matches!(dtype, DType::Float16 | DType::Float32 | DType::Float64) {
        return Err(DeserializeError::UnsupportedDType { codec: CODEC, dtype });
    }
    if shape.dims.is_empty() {
        return Err(DeserializeError::ScalarNotSupported { codec: CODEC });
    }
    let numel = shape.numel;
    let (row_len, rows) = rows_of(&shape.dims, numel);
    let expected = numel as u64 * 2 + rows as u64 * 8;
    if buf.len() as u64 != expected {
        return Err(DeserializeError::BufferLength {
            codec: CODEC,
            expected,
            actual: buf.len(),
        });
    }
    let (halves, tail) = buf.split_at(numel * 2);
    let h = view::<u16>(halves);
    let (means, stds) = tail.split_at(rows * 4);
    let means = view::<f32>(means);
    let stds = view::<f32>(stds);
    let threads = par::threads_for(numel, ctx.threads);
    let row_len = row_len.max(1);
    match dtype {
        DType::Float32 => {
            let mut out = Buffer::new(4 * numel);
            par::for_each_mut(out.as_mut::<f32>(), GRAIN, threads, |off, piece| {
                cast::f16_to_f32(&h[off..off + piece.len()], piece);
                for_row_segments(off, piece.len(), row_len, |row, seg| {
                    let (m, s) = (means[row], stds[row]);
                    for v in &mut piece[seg] {
                        *v = *v * s + m;
                    }
                });
            });
            Ok(out.into_bytes())
        }
        DType::Float64 => {
            let mut out = Buffer::new(8 * numel);
            par::for_each_mut(out.as_mut::<f64>(), GRAIN, threads, |off, piece| {
                let mut tmp = [0f32; STEP];
                for_row_segments(off, piece.len(), row_len, |row, seg| {
                    let (m, s) = (f64::from(means[row]), f64::from(stds[row]));
                    let src = &h[off + seg.start..off + seg.end];
                    for (hs, d) in src.chunks(STEP).zip(piece[seg].chunks_mut(STEP)) {
                        let t = &mut tmp[..hs.len()];
                        cast::f16_to_f32(hs, t);
                        for (d, &v) in d.iter_mut().zip(t.iter()) {
                            *d = f64::from(v) * s + m;
                        }
                    }
                });
            });
            Ok(out.into_bytes())
        }
        _ => {
            // float16: torch computes each in-place op in float32 and rounds back to float16.
            let mut out = Buffer::new(2 * numel);
            par::for_each_mut(out.as_mut::<f16>(), GRAIN, threads, |off, piece| {
                let mut tmp = [0f32; STEP];
                for_row_segments(off, piece.len(), row_len, |row, seg| {
                    let (m, s) = (means[row], stds[row]);
                    let src = &h[off + seg.start..off + seg.end];
                    for (hs, d) in src.chunks(STEP).zip(piece[seg].chunks_mut(STEP)) {
                        let t = &mut tmp[..hs.len()];
                        cast::f16_to_f32(hs, t);
                        t.iter_mut().for_each(|v| *v *= s);
                        d.convert_from_f32_slice(t);
                        d.convert_to_f32_slice(t);
                        t.iter_mut().for_each(|v| *v += m);
                        d.convert_from_f32_slice(t);
                    }
                });
            });
            Ok(out.into_bytes())
        }
    }
}
