//! Element conversions with torch's CPU semantics (round-to-nearest-even everywhere; NaN and
//! out-of-range float → int casts as x86 does them, which is what torch on x86 produces), plus
//! zero-copy helpers between typed vectors and [`Bytes`].

use std::borrow::Cow;

use bytemuck::Pod;
use bytes::Bytes;
use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};

use super::DType;
use super::pool::Buffer;

/// The largest finite float16, `torch.finfo(torch.float16).max`.
pub(crate) const FP16_MAX: f32 = 65504.0;

/// Elements converted per step through stack scratch buffers.
const STEP: usize = 2048;

/// Owns a typed vector and lends it out as bytes, so `Bytes::from_owner` can wrap it without a copy.
struct PodOwner<T>(Vec<T>);

impl<T: Pod> AsRef<[u8]> for PodOwner<T> {
    fn as_ref(&self) -> &[u8] {
        bytemuck::cast_slice(&self.0)
    }
}

/// Wraps a typed vector as little-endian bytes without copying.
pub(crate) fn bytes_from_vec<T: Pod + Send + Sync>(v: Vec<T>) -> Bytes {
    if v.is_empty() {
        return Bytes::new();
    }
    Bytes::from_owner(PodOwner(v))
}

/// Reads `bytes` as a slice of `T`: borrowed when aligned (a decoded protobuf's `Bytes` usually is
/// not guaranteed to be), copied otherwise. `bytes.len()` must be a multiple of `size_of::<T>()`.
pub(crate) fn view<T: Pod>(bytes: &[u8]) -> Cow<'_, [T]> {
    match bytemuck::try_cast_slice(bytes) {
        Ok(s) => Cow::Borrowed(s),
        Err(_) => Cow::Owned(bytemuck::pod_collect_to_vec(bytes)),
    }
}

/// float32 → bfloat16, as torch's vectorised CPU conversion: round to nearest even; every NaN
/// becomes `0xFFFF` (torch's AVX2/AVX-512 kernels blend in that pattern).
#[inline]
pub(crate) fn f32_to_bf16_bits(x: f32) -> u16 {
    if x.is_nan() {
        return 0xFFFF;
    }
    let u = x.to_bits();
    let bias = 0x7FFF + ((u >> 16) & 1);
    (u.wrapping_add(bias) >> 16) as u16
}

/// bfloat16 → float32 (exact).
#[inline]
pub(crate) fn bf16_bits_to_f32(b: u16) -> f32 {
    f32::from_bits(u32::from(b) << 16)
}

/// float32 → int64 as `cvttss2si` does it: truncation; NaN and out-of-range give `i64::MIN`.
#[inline]
pub(crate) fn f32_to_i64(x: f32) -> i64 {
    if (-9_223_372_036_854_775_808.0..9_223_372_036_854_775_808.0).contains(&x) {
        x as i64
    } else {
        i64::MIN
    }
}

/// float32 → int32 as `cvttss2si` does it; narrower integer types take the low bits of this.
#[inline]
pub(crate) fn f32_to_i32(x: f32) -> i32 {
    if (-2_147_483_648.0..2_147_483_648.0).contains(&x) {
        x as i32
    } else {
        i32::MIN
    }
}

/// float32 values → float16 bit patterns, after clamping to ±65504 (hivemind's `clamp_(FP16_MIN,
/// FP16_MAX).to(torch.float16)`; NaN stays NaN). Hardware F16C when the CPU has it.
pub(crate) fn f32_to_f16_clamped(src: &[f32], dst: &mut [u16]) {
    let mut tmp = [0f32; STEP];
    for (s, d) in src.chunks(STEP).zip(dst.chunks_mut(STEP)) {
        let t = &mut tmp[..s.len()];
        for (t, &x) in t.iter_mut().zip(s) {
            *t = x.clamp(-FP16_MAX, FP16_MAX);
        }
        let d: &mut [f16] = bytemuck::cast_slice_mut(d);
        d.convert_from_f32_slice(t);
    }
}

/// float16 bit patterns → float32 (exact). Hardware F16C when the CPU has it.
pub(crate) fn f16_to_f32(src: &[u16], dst: &mut [f32]) {
    let s: &[f16] = bytemuck::cast_slice(src);
    s.convert_to_f32_slice(dst);
}

/// Any dtype's little-endian data → float32, as torch's `.to(torch.float32)` (`bool` → 0/1; float64 and
/// wide integers round to nearest even).
pub(crate) fn to_f32(dtype: DType, data: &[u8]) -> Vec<f32> {
    match dtype {
        DType::Float32 => view::<f32>(data).into_owned(),
        DType::Float16 => {
            let h = view::<u16>(data);
            let mut out = vec![0f32; h.len()];
            f16_to_f32(&h, &mut out);
            out
        }
        DType::BFloat16 => view::<u16>(data).iter().map(|&b| bf16_bits_to_f32(b)).collect(),
        DType::Float64 => view::<f64>(data).iter().map(|&x| x as f32).collect(),
        DType::Int64 => view::<i64>(data).iter().map(|&x| x as f32).collect(),
        DType::Int32 => view::<i32>(data).iter().map(|&x| x as f32).collect(),
        DType::Int16 => view::<i16>(data).iter().map(|&x| f32::from(x)).collect(),
        DType::Int8 => data.iter().map(|&x| f32::from(x as i8)).collect(),
        DType::UInt8 => data.iter().map(|&x| f32::from(x)).collect(),
        DType::Bool => data.iter().map(|&x| if x != 0 { 1.0 } else { 0.0 }).collect(),
    }
}

/// float32 values → `dtype`'s little-endian data, as torch's `.to(dtype)` on x86. Consumes the buffer so
/// that float32 output is not copied.
pub(crate) fn from_f32(dtype: DType, mut v: Buffer) -> Bytes {
    if dtype == DType::Float32 {
        return v.into_bytes();
    }
    let x: &[f32] = v.as_mut::<f32>();
    let mut out = Buffer::new(x.len() * dtype.size());
    fn fill<T: Pod>(out: &mut Buffer, x: &[f32], f: impl Fn(f32) -> T) {
        for (o, &v) in out.as_mut::<T>().iter_mut().zip(x) {
            *o = f(v);
        }
    }
    match dtype {
        DType::Float32 | DType::Float16 => {
            let d: &mut [f16] = out.as_mut();
            d.convert_from_f32_slice(x);
        }
        DType::BFloat16 => fill(&mut out, x, f32_to_bf16_bits),
        DType::Float64 => fill(&mut out, x, f64::from),
        DType::Int64 => fill(&mut out, x, f32_to_i64),
        DType::Int32 => fill(&mut out, x, f32_to_i32),
        DType::Int16 => fill(&mut out, x, |v| f32_to_i32(v) as i16),
        DType::Int8 | DType::UInt8 => fill(&mut out, x, |v| f32_to_i32(v) as u8),
        DType::Bool => fill(&mut out, x, |v| u8::from(v != 0.0)),
    }
    out.into_bytes()
}

/// One float32 value → `dtype`'s little-endian bytes (for 256-entry codebooks), same rules as [`from_f32`].
pub(crate) fn f32_to_le(dtype: DType, x: f32, out: &mut Vec<u8>) {
    match dtype {
        DType::Float32 => out.extend_from_slice(&x.to_le_bytes()),
        DType::Float16 => out.extend_from_slice(&f16::from_f32(x).to_bits().to_le_bytes()),
        DType::BFloat16 => out.extend_from_slice(&f32_to_bf16_bits(x).to_le_bytes()),
        DType::Float64 => out.extend_from_slice(&f64::from(x).to_le_bytes()),
        DType::Int64 => out.extend_from_slice(&f32_to_i64(x).to_le_bytes()),
        DType::Int32 => out.extend_from_slice(&f32_to_i32(x).to_le_bytes()),
        DType::Int16 => out.extend_from_slice(&(f32_to_i32(x) as i16).to_le_bytes()),
        DType::Int8 | DType::UInt8 => out.push(f32_to_i32(x) as u8),
        DType::Bool => out.push(u8::from(x != 0.0)),
    }
}

/// float32 → bfloat16 as a [`half::bf16`] (torch rounding, see [`f32_to_bf16_bits`]).
pub(crate) fn bf16_from_f32(x: f32) -> bf16 {
    bf16::from_bits(f32_to_bf16_bits(x))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bf16_rounds_to_nearest_even() {
        assert_eq!(f32_to_bf16_bits(1.0), 0x3F80);
        // 1 + 2^-8 is halfway between two bf16 values: ties to even (down).
        assert_eq!(f32_to_bf16_bits(f32::from_bits(0x3F80_8000)), 0x3F80);
        assert_eq!(f32_to_bf16_bits(f32::from_bits(0x3F81_8000)), 0x3F82);
        assert_eq!(f32_to_bf16_bits(f32::from_bits(0x3F80_8001)), 0x3F81);
        assert_eq!(f32_to_bf16_bits(f32::INFINITY), 0x7F80);
        assert_eq!(f32_to_bf16_bits(f32::MAX), 0x7F80);
        assert_eq!(f32_to_bf16_bits(f32::NAN), 0xFFFF);
        assert_eq!(bf16_bits_to_f32(0xC000), -2.0);
    }

    #[test]
    fn float_to_int_follows_x86() {
        assert_eq!(f32_to_i64(-2.9), -2);
        assert_eq!(f32_to_i64(f32::NAN), i64::MIN);
        assert_eq!(f32_to_i64(1e30), i64::MIN);
        assert_eq!(f32_to_i32(2_147_483_648.0), i32::MIN);
        assert_eq!(f32_to_i32(-2_147_483_648.0), i32::MIN);
        assert_eq!(f32_to_i32(-1.5) as u8, 255);
    }

    #[test]
    fn clamped_f16_conversion() {
        let src = [1.0f32, 70000.0, -1e9, f32::INFINITY, 0.1, -0.0];
        let mut dst = [0u16; 6];
        f32_to_f16_clamped(&src, &mut dst);
        assert_eq!(dst, [0x3C00, 0x7BFF, 0xFBFF, 0x7BFF, 0x2E66, 0x8000]);
        let mut back = [0f32; 6];
        f16_to_f32(&dst, &mut back);
        assert_eq!(back[0], 1.0);
        assert_eq!(back[1], 65504.0);
    }

    #[test]
    fn round_trips_through_bytes() {
        let b = bytes_from_vec(vec![1.5f32, -2.0]);
        assert_eq!(&b[..], &[0, 0, 0xC0, 0x3F, 0, 0, 0, 0xC0]);
        assert_eq!(to_f32(DType::Float32, &b), vec![1.5, -2.0]);
        // an odd offset forces the copying path of `view`
        let mut odd = vec![0u8];
        odd.extend_from_slice(&b);
        assert_eq!(&*view::<f32>(&odd[1..]), &[1.5, -2.0]);
    }
}
