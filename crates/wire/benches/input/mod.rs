//! Shared by the codec benchmark and the `codec_throughput` example: the codecs and the seeded input.

use apiary_wire::proto::runtime::CompressionType;

/// Every codec hivemind 1.1.12 has, in `runtime.proto` order of the benchmark table.
pub const CODECS: [CompressionType; 6] = [
    CompressionType::None,
    CompressionType::Float16,
    CompressionType::Meanstd16bit,
    CompressionType::Uniform8bit,
    CompressionType::Quantile8bit,
    CompressionType::Blockwise8bit,
];

/// splitmix64 + Box–Muller: seeded standard normals without a dependency.
pub fn randn(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed;
    let mut next = move || {
        s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = s;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
    };
    (0..n)
        .map(|_| {
            let (u, v) = (next().max(1e-300), next());
            ((-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()) as f32
        })
        .collect()
}
