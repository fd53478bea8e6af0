//! BLOCKWISE_8BIT (`BlockwiseQuantization`, bitsandbytes' `quantize_blockwise` with 4096-element
//! blocks and the signed 8-bit dynamic code): each block is divided by its absolute maximum and every
//! value is replaced by the index of the nearest code entry.
//!
//! Buffer: `int64 len(absmax) ‖ int64 len(code) ‖ float32 absmax[] ‖ float32 code[] ‖ uint8 q[numel]`;
//! a value decodes as `code[q] · absmax[block]` in float32 (`dequantize_blockwise`), then converts to
//! the tensor's dtype. Every dtype is accepted (hivemind converts the input to float32 first).
//!
//! The encoder reproduces bitsandbytes 0.50's CPU kernel exactly: NaN-ignoring absmax, a zero block
//! quantized to index 0, and nearest-entry search through its 65536-entry lookup table
//! (`build_quantize_lut` / `norm_to_lut_index`). Older bitsandbytes releases searched the code
//! exactly instead; they can differ from this by one code step on values within ~1.5e-5 (relative to
//! the block's absmax) of the midpoint between two code entries.

use std::sync::OnceLock;

use bytes::Bytes;

use crate::proto::runtime::CompressionType;
use crate::tensor::cast::{self, view};
use crate::tensor::pool::Buffer;
use crate::tensor::{DType, DeserializeError, Tensor, par};

use super::quantization::{N_BINS, check_indices, read_count};
use super::{Ctx, Shape, float16::float32_values};

const CODEC: CompressionType = CompressionType::Blockwise8bit;

/// `_BLOCKWISE_QUANTIZATION_BLOCKSIZE`.
pub const BLOCK: usize = 4096;

/// Blocks per parallel piece.
const BLOCKS_PER_PIECE: usize = 16;

/// Entries of bitsandbytes' quantization lookup table.
const LUT_SIZE: usize = 1 << 16;

/// bitsandbytes' `create_dynamic_map(signed=True)`: 256 sorted float32 values in `[-0.99297, 1]`.
const DYNAMIC_CODE: [u32; N_BINS] = [
    0xBF7E3333, 0xBF7A999A, 0xBF770000, 0xBF736666, 0xBF6FCCCD, 0xBF6C3333, 0xBF68999A, 0xBF650000,
    0xBF616666, 0xBF5DCCCD, 0xBF5A3333, 0xBF56999A, 0xBF530000, 0xBF4F6666, 0xBF4BCCCD, 0xBF483333,
    0xBF44999A, 0xBF410000, 0xBF3D6666, 0xBF39CCCD, 0xBF363334, 0xBF32999A, 0xBF2F0000, 0xBF2B6666,
    0xBF27CCCD, 0xBF243334, 0xBF20999A, 0xBF1D0000, 0xBF196666, 0xBF15CCCD, 0xBF123334, 0xBF0E999A,
    0xBF0B0000, 0xBF076666, 0xBF03CCCC, 0xBF003333, 0xBEF93332, 0xBEF20000, 0xBEEACCCC, 0xBEE3999A,
    0xBEDC6666, 0xBED53333, 0xBECE0000, 0xBEC6CCCC, 0xBEBF999A, 0xBEB86666, 0xBEB13333, 0xBEAA0000,
    0xBEA2CCCC, 0xBE9B999A, 0xBE946666, 0xBE8D3334, 0xBE860000, 0xBE7D9999, 0xBE6F3333, 0xBE60CCCD,
    0xBE526666, 0xBE440000, 0xBE35999A, 0xBE273333, 0xBE18CCCD, 0xBE0A6666, 0xBDF80000, 0xBDDB3334,
    0xBDC9EB85, 0xBDC428F7, 0xBDBE6667, 0xBDB8A3D7, 0xBDB2E148, 0xBDAD1EB8, 0xBDA75C2A, 0xBDA1999A,
    0xBD9BD70A, 0xBD96147B, 0xBD9051EB, 0xBD8A8F5D, 0xBD84CCCD, 0xBD7E147B, 0xBD728F5D, 0xBD670A3D,
    0xBD5B851F, 0xBD500000, 0xBD447AE1, 0xBD38F5C3, 0xBD2D70A3, 0xBD21EB85, 0xBD166667, 0xBD0AE148,
    0xBCFEB852, 0xBCE7AE15, 0xBCD0A3D7, 0xBCB9999A, 0xBCA28F5D, 0xBC8B851F, 0xBC68F5C3, 0xBC3AE148,
    0xBC1F3B64, 0xBC160418, 0xBC0CCCCD, 0xBC039581, 0xBBF4BC6A, 0xBBE24DD3, 0xBBCFDF3B, 0xBBBD70A4,
    0xBBAB020D, 0xBB989374, 0xBB8624DD, 0xBB676C8A, 0xBB428F5C, 0xBB1DB22D, 0xBAF1A9FC, 0xBAA7EF9D,
    0xBA7765FF, 0xBA59E83E, 0xBA3C6A80, 0xBA1EECC1, 0xBA016F01, 0xB9C7E283, 0xB98CE705, 0xB923D70B,
    0xB8BA1F4B, 0xB88AEFB3, 0xB8378034, 0xB7B24206, 0xB70205FF, 0xB65A1A94, 0xB513A3B7, 0x00000000,
    0x3513A3B7, 0x365A1A94, 0x370205FF, 0x37B24206, 0x38378034, 0x388AEFB3, 0x38BA1F4B, 0x3923D70B,
    0x398CE705, 0x39C7E283, 0x3A016F01, 0x3A1EECC1, 0x3A3C6A80, 0x3A59E83E, 0x3A7765FF, 0x3AA7EF9D,
    0x3AF1A9FC, 0x3B1DB22D, 0x3B428F5C, 0x3B676C8A, 0x3B8624DD, 0x3B989374, 0x3BAB020D, 0x3BBD70A4,
    0x3BCFDF3B, 0x3BE24DD3, 0x3BF4BC6A, 0x3C039581, 0x3C0CCCCD, 0x3C160418, 0x3C1F3B64, 0x3C3AE148,
    0x3C68F5C3, 0x3C8B851F, 0x3CA28F5D, 0x3CB9999A, 0x3CD0A3D7, 0x3CE7AE15, 0x3CFEB852, 0x3D0AE148,
    0x3D166667, 0x3D21EB85, 0x3D2D70A3, 0x3D38F5C3, 0x3D447AE1, 0x3D500000, 0x3D5B851F, 0x3D670A3D,
    0x3D728F5D, 0x3D7E147B, 0x3D84CCCD, 0x3D8A8F5D, 0x3D9051EB, 0x3D96147B, 0x3D9BD70A, 0x3DA1999A,
    0x3DA75C2A, 0x3DAD1EB8, 0x3DB2E148, 0x3DB8A3D7, 0x3DBE6667, 0x3DC428F7, 0x3DC9EB85, 0x3DDB3334,
    0x3DF80000, 0x3E0A6666, 0x3E18CCCD, 0x3E273333, 0x3E35999A, 0x3E440000, 0x3E526666, 0x3E60CCCD,
    0x3E6F3333, 0x3E7D9999, 0x3E860000, 0x3E8D3334, 0x3E946666, 0x3E9B999A, 0x3EA2CCCC, 0x3EAA0000,
    0x3EB13333, 0x3EB86666, 0x3EBF999A, 0x3EC6CCCC, 0x3ECE0000, 0x3ED53333, 0x3EDC6666, 0x3EE3999A,
    0x3EEACCCC, 0x3EF20000, 0x3EF93332, 0x3F003333, 0x3F03CCCC, 0x3F076666, 0x3F0B0000, 0x3F0E999A,
    0x3F123334, 0x3F15CCCD, 0x3F196666, 0x3F1D0000, 0x3F20999A, 0x3F243334, 0x3F27CCCD, 0x3F2B6666,
    0x3F2F0000, 0x3F32999A, 0x3F363334, 0x3F39CCCD, 0x3F3D6666, 0x3F410000, 0x3F44999A, 0x3F483333,
    0x3F4BCCCD, 0x3F4F6666, 0x3F530000, 0x3F56999A, 0x3F5A3333, 0x3F5DCCCD, 0x3F616666, 0x3F650000,
    0x3F68999A, 0x3F6C3333, 0x3F6FCCCD, 0x3F736666, 0x3F770000, 0x3F7A999A, 0x3F7E3333, 0x3F800000,
];

fn code() -> [f32; N_BINS] {
    DYNAMIC_CODE.map(f32::from_bits)
}

/// bitsandbytes' `build_quantize_lut`: for 65536 evenly spaced values of `[-1, 1]`, the index of the
/// nearest code entry (by float32 midpoints between neighbours).
fn lut() -> &'static [u8; LUT_SIZE] {
    static LUT: OnceLock<Box<[u8; LUT_SIZE]>> = OnceLock::new();
    LUT.get_or_init(|| {
        let code = code();
        let mid: Vec<f32> = code.windows(2).map(|w| 0.5 * (w[0] + w[1])).collect();
        let mut lut = Box::new([0u8; LUT_SIZE]);
        let mut idx = 0usize;
        for (i, e) in lut.iter_mut().enumerate() {
            let val = -1.0f32 + (2.0 * i as f32) / (LUT_SIZE - 1) as f32;
            while idx < N_BINS - 1 && mid[idx] < val {
                idx += 1;
            }
            *e = idx as u8;
        }
        lut
    })
}

/// bitsandbytes' `norm_to_lut_index`: clamp to [-1, 1], scale to [0, 65535], round half up; NaN → 0 (the
/// low bits of x86's `cvttss2si` of NaN). Branch-free, so that it vectorises.
#[inline]
fn lut_index(v: f32) -> u32 {
    let c = if v < -1.0 { -1.0 } else { v };
    let c = if c > 1.0 { 1.0 } else { c };
    ((((c + 1.0) * 0.5) * (LUT_SIZE - 1) as f32 + 0.5) as i32 as u32) & (LUT_SIZE as u32 - 1)
}

/// Elements whose table indices are computed together (vectorised) before the table lookups.
const LANES: usize = 16;

/// The NaN-ignoring absolute maximum of a block (`std::max(absmax, fabs(x))` from 0).
fn absmax(x: &[f32]) -> f32 {
    #[inline]
    fn step(m: f32, v: f32) -> f32 {
        let a = v.abs();
        if a > m { a } else { m }
    }
    let mut lanes = [0f32; LANES];
    let (chunks, tail) = x.as_chunks::<LANES>();
    for c in chunks {
        for j in 0..LANES {
            lanes[j] = step(lanes[j], c[j]);
        }
    }
    lanes.iter().chain(tail).fold(0f32, |m, &v| step(m, v))
}

fn quantize_block(x: &[f32], q: &mut [u8], lut: &[u8; LUT_SIZE]) -> f32 {
    let am = absmax(x);
    if am == 0.0 {
        q.fill(0);
        return am;
    }
    let inv = 1.0 / am;
    let (xs, x_tail) = x.as_chunks::<LANES>();
    let (qs, q_tail) = q.as_chunks_mut::<LANES>();
    let mut idx = [0u32; LANES];
    for (o, v) in qs.iter_mut().zip(xs) {
        for j in 0..LANES {
            idx[j] = lut_index(v[j] * inv);
        }
        for j in 0..LANES {
            o[j] = lut[idx[j] as usize & (LUT_SIZE - 1)];
        }
    }
    for (o, &v) in q_tail.iter_mut().zip(x_tail) {
        *o = lut[lut_index(v * inv) as usize];
    }
    am
}

pub(super) fn encode(t: &Tensor, ctx: &Ctx) -> Bytes {
    let x = float32_values(t);
    let n = x.len();
    let blocks = n.div_ceil(BLOCK);
    let code = code();
    let lut = lut();

    let header = 16 + 4 * blocks + 4 * N_BINS;
    let mut buf = Buffer::new(header + n);
    let (head, q) = buf.bytes_mut().split_at_mut(header);
    let mut scales = vec![0f32; blocks];
    {
        let mut jobs: Vec<(&mut [u8], &mut f32)> = q.chunks_mut(BLOCK).zip(scales.iter_mut()).collect();
        par::for_each_mut(
            &mut jobs,
            BLOCKS_PER_PIECE,
            par::threads_for(n, ctx.threads),
            |first, piece| {
                for (j, (qb, scale)) in piece.iter_mut().enumerate() {
                    let start = (first + j) * BLOCK;
                    **scale = quantize_block(&x[start..start + qb.len()], qb, lut);
                }
            },
        );
    }
    head[..8].copy_from_slice(&(blocks as i64).to_le_bytes());
    head[8..16].copy_from_slice(&(N_BINS as i64).to_le_bytes());
    for (dst, s) in head[16..]
        .chunks_exact_mut(4)
        .zip(scales.iter().chain(code.iter()))
    {
        dst.copy_from_slice(&s.to_le_bytes());
    }
    buf.into_bytes()
}

pub(super) fn decode(buf: &Bytes, shape: &Shape, dtype: DType, ctx: &Ctx) -> Result<Bytes, DeserializeError> {
    let n_scales = read_count(CODEC, buf, 0, "absmax")?;
    let n_code = read_count(CODEC, buf, 8, "codebook")?;
    let truncated = |what, needed: u64| DeserializeError::Truncated {
        codec: CODEC,
        what,
        needed,
        actual: buf.len(),
    };
    let code_start = n_scales
        .checked_mul(4)
        .and_then(|b| b.checked_add(16))
        .filter(|&e| e <= buf.len() as u64)
        .ok_or(truncated("absmax", n_scales.saturating_mul(4).saturating_add(16)))?;
    let q_start = n_code
        .checked_mul(4)
        .and_then(|b| b.checked_add(code_start))
        .filter(|&e| e <= buf.len() as u64)
        .ok_or(truncated(
            "codebook",
            n_code.saturating_mul(4).saturating_add(code_start),
        ))?;
    let (code_start, q_start) = (code_start as usize, q_start as usize);
    let q = &buf[q_start..];
    let numel = shape.numel;
    if q.len() != numel {
        return Err(DeserializeError::BufferLength {
            codec: CODEC,
            expected: q_start as u64 + numel as u64,
            actual: buf.len(),
        });
    }
    let blocks = numel.div_ceil(BLOCK) as u64;
    if n_scales < blocks {
        return Err(DeserializeError::TooFewScales {
            needed: blocks,
            actual: n_scales,
        });
    }
    check_indices(CODEC, q, n_code.min(N_BINS as u64) as usize)?;
    let scales = view::<f32>(&buf[16..16 + 4 * blocks as usize]);
    let mut code = [0f32; N_BINS];
    let code_bytes = &buf[code_start..q_start.min(code_start + 4 * N_BINS)];
    for (c, b) in code.iter_mut().zip(code_bytes.chunks_exact(4)) {
        *c = bytemuck::pod_read_unaligned(b);
    }

    let mut out = Buffer::new(4 * numel);
    par::for_each_mut(
        out.as_mut::<f32>(),
        BLOCK,
        par::threads_for(numel, ctx.threads),
        |off, piece| {
            let scale = scales[off / BLOCK];
            for (o, &i) in piece.iter_mut().zip(&q[off..]) {
                *o = code[usize::from(i)] * scale;
            }
        },
    );
    Ok(cast::from_f32(dtype, out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lut_is_monotone_and_spans_the_code() {
        let lut = lut();
        assert_eq!(lut[0], 0);
        assert_eq!(lut[LUT_SIZE - 1], 255);
        assert!(lut.windows(2).all(|w| w[0] <= w[1]));
        assert_eq!(lut[lut_index(1.0) as usize], 255);
        // bitsandbytes' table puts 0.0 on entry 32768 (≈1.5e-5), whose nearest code is 2.125e-5 (index
        // 131), not the code's exact 0 (index 127): hivemind sends zeros in a non-zero block that way.
        assert_eq!(code()[127], 0.0);
        assert_eq!(lut[lut_index(0.0) as usize], 131);
        assert_eq!(lut_index(f32::NAN), 0);
        assert_eq!(lut_index(-3.0), 0);
    }

    #[test]
    fn zero_and_nan_blocks() {
        let mut q = [9u8; 4];
        assert_eq!(quantize_block(&[0.0, -0.0, 0.0, 0.0], &mut q, lut()), 0.0);
        assert_eq!(q, [0; 4]);
        let am = quantize_block(&[1.0, f32::NAN, 2.0, -2.0], &mut q, lut());
        assert_eq!(am, 2.0);
        assert_eq!(q, [219, 0, 255, 0]);
    }
}
