//! Round trips, refusals and a garbage-input fuzz loop for the tensor code.

use std::num::NonZeroUsize;

use bytes::Bytes;
use half::{bf16, f16};

use super::*;
use crate::proto::runtime::{CompressionType, Tensor as WireTensor};

const CODECS: [CompressionType; 6] = [
    CompressionType::None,
    CompressionType::Float16,
    CompressionType::Meanstd16bit,
    CompressionType::Uniform8bit,
    CompressionType::Quantile8bit,
    CompressionType::Blockwise8bit,
];

/// splitmix64: a seeded generator for test data without a dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn uniform(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
    /// Box–Muller.
    fn normal(&mut self) -> f32 {
        let (u, v) = (self.uniform().max(1e-300), self.uniform());
        ((-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()) as f32
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

fn randn(rng: &mut Rng, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.normal()).collect()
}

fn round_trip(t: &Tensor, codec: CompressionType) -> Tensor {
    let wire = serialize(t, codec).unwrap();
    let back = deserialize(&wire, &Limits::default()).unwrap();
    assert_eq!(back.shape(), t.shape());
    assert_eq!(back.dtype(), t.dtype());
    assert_eq!(back.requires_grad(), t.requires_grad());
    back
}

#[test]
fn every_codec_round_trips_float32_within_its_error() {
    let mut rng = Rng(1);
    let x = randn(&mut rng, 3 * 5 * 11 * 40);
    let t = Tensor::from_vec([3 * 5, 11 * 40], x.clone())
        .unwrap()
        .with_requires_grad(true);
    for codec in CODECS {
        let y = round_trip(&t, codec).to_vec::<f32>().unwrap();
        let max_err = x.iter().zip(&y).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        let bound = match codec {
            CompressionType::None => 0.0,
            CompressionType::Float16 | CompressionType::Meanstd16bit => 4.0 / 2048.0,
            CompressionType::Blockwise8bit => 0.02 * 4.5,
            // beyond ±3σ UNIFORM clips; QUANTILE's tails are wide buckets
            _ => 1.5,
        };
        assert!(max_err <= bound, "{codec:?}: max error {max_err}");
    }
}

#[test]
fn none_is_zero_copy_and_exact_for_every_dtype() {
    let data = Bytes::from((0..48u8).collect::<Vec<_>>());
    for dtype in DType::ALL {
        let n = 48 / dtype.size();
        let t = Tensor::from_bytes([n], dtype, data.clone()).unwrap();
        let wire = serialize_with(
            &t,
            CompressionType::None,
            &SerializeOptions::default().with_legacy_bfloat16(false),
        )
        .unwrap();
        assert_eq!(wire.dtype, dtype.name());
        let back = deserialize(&wire, &Limits::default()).unwrap();
        assert_eq!(back.bytes(), &data);
        if dtype != DType::BFloat16 {
            assert_eq!(back.bytes().as_ptr(), data.as_ptr(), "NONE decode must not copy");
        }
    }
}

#[test]
fn bfloat16_legacy_and_raw() {
    let vals = [1.0f32, -2.5, 3.140625, 0.0, 65280.0];
    let t = Tensor::from_vec([5], vals.iter().map(|&v| bf16::from_f32(v)).collect::<Vec<_>>()).unwrap();
    let legacy = serialize(&t, CompressionType::None).unwrap();
    assert_eq!(legacy.buffer.len(), 20);
    assert_eq!(legacy.dtype, "bfloat16");
    assert_eq!(&legacy.buffer[..4], &1.0f32.to_le_bytes());
    let raw = serialize_with(
        &t,
        CompressionType::None,
        &SerializeOptions::default().with_legacy_bfloat16(false),
    )
    .unwrap();
    assert_eq!(raw.buffer.len(), 10);
    for w in [legacy, raw] {
        assert_eq!(deserialize(&w, &Limits::default()).unwrap(), t);
    }
}

#[test]
fn float16_clamps_and_keeps_dtype() {
    let t = Tensor::from_vec([4], vec![1e6f64, -1e6, 0.1, f64::INFINITY]).unwrap();
    let wire = serialize(&t, CompressionType::Float16).unwrap();
    assert_eq!(wire.dtype, "float64");
    let back = deserialize(&wire, &Limits::default())
        .unwrap()
        .to_vec::<f64>()
        .unwrap();
    assert_eq!(
        back,
        vec![65504.0, -65504.0, f64::from(f16::from_f32(0.1).to_f32()), 65504.0]
    );
}

#[test]
fn codecs_refuse_what_hivemind_refuses() {
    let ints = Tensor::from_vec([3], vec![1i64, 2, 3]).unwrap();
    let bools = Tensor::from_bools([2], &[true, false]).unwrap();
    let bf = Tensor::from_vec([2], vec![bf16::ONE, bf16::ZERO]).unwrap();
    let f64s = Tensor::from_vec([2], vec![1.0f64, 2.0]).unwrap();
    for codec in [
        CompressionType::Float16,
        CompressionType::Meanstd16bit,
        CompressionType::Uniform8bit,
        CompressionType::Quantile8bit,
    ] {
        for t in [&ints, &bools] {
            assert!(
                matches!(serialize(t, codec), Err(SerializeError::UnsupportedDType { .. })),
                "{codec:?}"
            );
        }
    }
    for codec in [CompressionType::Float16, CompressionType::Meanstd16bit] {
        assert!(matches!(
            serialize(&bf, codec),
            Err(SerializeError::UnsupportedDType { .. })
        ));
    }
    // UNIFORM takes float64 except 0-d (where torch keeps `tensor - shift` in float64)
    assert!(serialize(&f64s, CompressionType::Uniform8bit).is_ok());
    assert!(matches!(
        serialize(&Tensor::scalar(1.0f64), CompressionType::Uniform8bit),
        Err(SerializeError::UnsupportedDType { .. })
    ));
    assert!(serialize(&f64s, CompressionType::Quantile8bit).is_ok());
    assert!(matches!(
        serialize(&Tensor::scalar(1.0f32), CompressionType::Meanstd16bit),
        Err(SerializeError::ScalarNotSupported { .. })
    ));
    let empty = Tensor::from_vec([0], Vec::<f32>::new()).unwrap();
    for codec in [CompressionType::Uniform8bit, CompressionType::Quantile8bit] {
        assert!(matches!(
            serialize(&empty, codec),
            Err(SerializeError::EmptyNotSupported { .. })
        ));
    }
    // everything else takes the edge cases
    for codec in [
        CompressionType::None,
        CompressionType::Float16,
        CompressionType::Meanstd16bit,
        CompressionType::Blockwise8bit,
    ] {
        assert_eq!(round_trip(&empty, codec).numel(), 0);
    }
    // BLOCKWISE takes every dtype through float32; integers come back truncated toward zero, as
    // torch's `.to(int64)` does (1 of [1, 2, 3] decodes as 0.996 → 0).
    for t in [&ints, &bools, &bf, &f64s] {
        let back = round_trip(t, CompressionType::Blockwise8bit).to_f64_vec();
        for (a, b) in back.iter().zip(t.to_f64_vec()) {
            assert!((a - b).abs() <= 1.0, "{:?}: {back:?}", t.dtype());
        }
    }
    assert_eq!(
        round_trip(&ints, CompressionType::Blockwise8bit)
            .to_vec::<i64>()
            .unwrap(),
        vec![0, 2, 3]
    );
}

#[test]
fn serialize_refuses_dimensions_beyond_u32() {
    let t = Tensor::from_vec([1usize << 33, 0], Vec::<u8>::new()).unwrap();
    assert!(matches!(
        serialize(&t, CompressionType::None),
        Err(SerializeError::DimensionTooLarge { .. })
    ));
}

#[test]
fn output_does_not_depend_on_threads() {
    let mut rng = Rng(7);
    let x = randn(&mut rng, (1 << 20) + 12_345);
    let t = Tensor::from_vec([x.len()], x).unwrap();
    for codec in CODECS {
        let one = serialize_with(&t, codec, &SerializeOptions::default().with_max_threads(1)).unwrap();
        let many = serialize_with(&t, codec, &SerializeOptions::default().with_max_threads(5)).unwrap();
        assert_eq!(one, many, "{codec:?}");
        let a = deserialize(&one, &Limits::default().with_max_threads(1)).unwrap();
        let b = deserialize(&one, &Limits::default().with_max_threads(5)).unwrap();
        assert_eq!(a, b, "{codec:?}");
    }
}

fn wire(codec: CompressionType, dtype: &str, size: Vec<u32>, buffer: Vec<u8>) -> WireTensor {
    WireTensor {
        buffer: Bytes::from(buffer),
        size,
        requires_grad: false,
        dtype: dtype.into(),
        compression: codec as i32,
        chunks: 0,
    }
}

#[test]
fn malformed_buffers_are_typed_errors() {
    let l = Limits::default();
    let err = |w: &WireTensor| deserialize(w, &l).unwrap_err();
    assert_eq!(
        err(&WireTensor {
            compression: 9,
            ..wire(CompressionType::None, "float32", vec![], vec![0; 4])
        }),
        DeserializeError::UnknownCompression(9)
    );
    assert!(matches!(
        err(&wire(CompressionType::None, "complex64", vec![1], vec![0; 8])),
        DeserializeError::UnknownDType(_)
    ));
    assert!(matches!(
        err(&wire(CompressionType::None, "float32", vec![2], vec![0; 7])),
        DeserializeError::BufferLength {
            expected: 8,
            actual: 7,
            ..
        }
    ));
    assert!(matches!(
        err(&wire(CompressionType::None, "bfloat16", vec![2], vec![0; 9])),
        DeserializeError::BufferLength { expected: 8, .. }
    ));
    assert!(matches!(
        err(&wire(CompressionType::Float16, "bfloat16", vec![1], vec![0; 2])),
        DeserializeError::UnsupportedDType { .. }
    ));
    assert!(matches!(
        err(&wire(
            CompressionType::Meanstd16bit,
            "float32",
            vec![],
            vec![0; 10]
        )),
        DeserializeError::ScalarNotSupported { .. }
    ));
    assert!(matches!(
        err(&wire(
            CompressionType::Meanstd16bit,
            "int64",
            vec![1],
            vec![0; 10]
        )),
        DeserializeError::UnsupportedDType { .. }
    ));
    assert!(matches!(
        err(&wire(
            CompressionType::Meanstd16bit,
            "float32",
            vec![2, 3],
            vec![0; 27]
        )),
        DeserializeError::BufferLength { expected: 28, .. }
    ));
    assert!(matches!(
        err(&wire(
            CompressionType::Uniform8bit,
            "float32",
            vec![1],
            vec![0; 5]
        )),
        DeserializeError::Truncated { .. }
    ));
    let mut neg = (-1i64).to_le_bytes().to_vec();
    neg.push(0);
    assert!(matches!(
        err(&wire(CompressionType::Quantile8bit, "float32", vec![1], neg)),
        DeserializeError::InvalidCount { size: -1, .. }
    ));
    let mut big = i64::MAX.to_le_bytes().to_vec();
    big.push(0);
    assert!(matches!(
        err(&wire(CompressionType::Quantile8bit, "float32", vec![1], big)),
        DeserializeError::Truncated { .. }
    ));
    let mut small_book = 2i64.to_le_bytes().to_vec();
    small_book.extend_from_slice(&[0; 8]);
    small_book.extend_from_slice(&[1, 2]);
    assert!(matches!(
        err(&wire(
            CompressionType::Quantile8bit,
            "float32",
            vec![2],
            small_book.clone()
        )),
        DeserializeError::IndexOutOfCodebook {
            index: 2,
            codebook_len: 2,
            ..
        }
    ));
    small_book.truncate(small_book.len() - 1);
    assert!(matches!(
        err(&wire(
            CompressionType::Quantile8bit,
            "float32",
            vec![2],
            small_book
        )),
        DeserializeError::BufferLength { .. }
    ));
    // BLOCKWISE: 2 blocks of elements but one scale
    let mut bw = 1i64.to_le_bytes().to_vec();
    bw.extend_from_slice(&256i64.to_le_bytes());
    bw.extend_from_slice(&[0; 4 + 1024]);
    bw.extend_from_slice(&vec![0; 4097]);
    assert!(matches!(
        err(&wire(CompressionType::Blockwise8bit, "float32", vec![4097], bw)),
        DeserializeError::TooFewScales { needed: 2, actual: 1 }
    ));
    // limits
    assert!(matches!(
        err(&wire(CompressionType::None, "uint8", vec![1; 33], vec![0])),
        DeserializeError::TooManyDims { dims: 33, .. }
    ));
    assert!(matches!(
        err(&wire(CompressionType::None, "uint8", vec![u32::MAX; 3], vec![])),
        DeserializeError::ShapeOverflow { .. }
    ));
    assert!(matches!(
        err(&wire(
            CompressionType::None,
            "uint8",
            vec![1 << 20, 1 << 10],
            vec![]
        )),
        DeserializeError::TooManyElements { .. }
    ));
    let tight = Limits::default().with_max_bytes(16);
    assert!(matches!(
        deserialize(
            &wire(CompressionType::None, "float64", vec![3], vec![0; 24]),
            &tight
        ),
        Err(DeserializeError::TooLarge { .. })
    ));
    assert!(matches!(
        deserialize(
            &wire(CompressionType::Blockwise8bit, "float64", vec![3], vec![0; 8]),
            &tight
        ),
        Err(DeserializeError::TooLarge {
            what: "decoded tensor",
            ..
        })
    ));
}

/// Garbage protos, and valid ones with bytes flipped, cut or appended: every outcome must be a value
/// or a typed error, never a panic.
#[test]
fn fuzz_garbage_never_panics() {
    let mut rng = Rng(0xA11CE);
    let names = [
        "float32",
        "float16",
        "bfloat16",
        "float64",
        "int64",
        "int32",
        "int16",
        "int8",
        "uint8",
        "bool",
        "",
        "float",
        "complex64",
    ];
    let limits = Limits::default()
        .with_max_elements(1 << 16)
        .with_max_bytes(1 << 20)
        .with_max_threads(2);
    let mut seeds: Vec<WireTensor> = Vec::new();
    for codec in CODECS {
        for shape in [vec![], vec![0], vec![7], vec![3, 5], vec![4100]] {
            let n: usize = shape.iter().product();
            let t = Tensor::from_vec(shape, randn(&mut rng, n)).unwrap();
            if let Ok(w) = serialize(&t, codec) {
                seeds.push(w);
            }
        }
    }
    let mut ok = 0;
    for i in 0..20_000 {
        let mut w = if i % 2 == 0 {
            seeds[rng.below(seeds.len() as u64) as usize].clone()
        } else {
            let dims = rng.below(5) as usize;
            let size = (0..dims)
                .map(|_| match rng.below(10) {
                    0 => u32::MAX,
                    1 => 0,
                    _ => rng.below(40) as u32,
                })
                .collect();
            let len = rng.below(2048) as usize;
            WireTensor {
                buffer: Bytes::from(rng.bytes(len)),
                size,
                requires_grad: rng.below(2) == 1,
                dtype: names[rng.below(names.len() as u64) as usize].into(),
                compression: rng.below(8) as i32 - 1,
                chunks: 0,
            }
        };
        match rng.below(6) {
            0 if !w.buffer.is_empty() => {
                let mut b = w.buffer.to_vec();
                let at = rng.below(b.len() as u64) as usize;
                b[at] = rng.next() as u8;
                // sometimes poke the int64 headers of the 8-bit codecs
                if b.len() >= 16 && rng.below(2) == 0 {
                    let at = rng.below(2) as usize * 8;
                    b[at..at + 8].copy_from_slice(&(rng.next() as i64 >> rng.below(64)).to_le_bytes());
                }
                w.buffer = Bytes::from(b);
            }
            1 => w.buffer = w.buffer.slice(..rng.below(w.buffer.len() as u64 + 1) as usize),
            2 => {
                let mut b = w.buffer.to_vec();
                let extra = rng.below(9) as usize;
                b.extend(rng.bytes(extra));
                w.buffer = Bytes::from(b);
            }
            3 => w.dtype = names[rng.below(names.len() as u64) as usize].into(),
            4 if !w.size.is_empty() => {
                let d = rng.below(w.size.len() as u64) as usize;
                w.size[d] = w.size[d].wrapping_add(rng.below(3) as u32).wrapping_sub(1);
            }
            _ => {}
        }
        if let Ok(t) = deserialize(&w, &limits) {
            ok += 1;
            assert_eq!(t.nbytes(), t.numel() * t.dtype().size());
        }
        // the same bytes through the stream code
        let chunk = NonZeroUsize::new(rng.below(64) as usize + 1).unwrap();
        if let Ok(mut parts) = split_for_streaming(&w, chunk) {
            if rng.below(3) == 0 && parts.len() > 1 {
                let drop = rng.below(parts.len() as u64) as usize;
                parts.remove(drop);
            }
            let _ = combine_from_streaming(parts, &limits);
        }
    }
    assert!(
        ok > 1000,
        "only {ok} inputs decoded: the fuzz loop is not reaching the decoders"
    );
}
