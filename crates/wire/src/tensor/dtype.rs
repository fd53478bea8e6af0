//! Element types, named as hivemind writes them in `Tensor.dtype`.

use std::fmt;
use std::str::FromStr;

use half::{bf16, f16};

/// The element type of a tensor.
///
/// [`DType::name`] is the string hivemind puts in `runtime.proto`'s `Tensor.dtype`: the numpy name of the
/// type (`str(torch_dtype).replace("torch.", "")`, which is the same string for every type listed here).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum DType {
    /// `float32`, IEEE binary32.
    Float32,
    /// `float16`, IEEE binary16.
    Float16,
    /// `bfloat16`, the upper half of a binary32.
    BFloat16,
    /// `float64`, IEEE binary64.
    Float64,
    /// `int64`.
    Int64,
    /// `int32`.
    Int32,
    /// `int16`.
    Int16,
    /// `int8`.
    Int8,
    /// `uint8`.
    UInt8,
    /// `bool`, one byte per element (0 or 1).
    Bool,
}

impl DType {
    /// Every dtype, in declaration order.
    pub const ALL: [DType; 10] = [
        DType::Float32,
        DType::Float16,
        DType::BFloat16,
        DType::Float64,
        DType::Int64,
        DType::Int32,
        DType::Int16,
        DType::Int8,
        DType::UInt8,
        DType::Bool,
    ];

    /// The name on the wire (`"float32"`, `"bfloat16"`, `"bool"`, …).
    pub const fn name(self) -> &'static str {
        match self {
            DType::Float32 => "float32",
            DType::Float16 => "float16",
            DType::BFloat16 => "bfloat16",
            DType::Float64 => "float64",
            DType::Int64 => "int64",
            DType::Int32 => "int32",
            DType::Int16 => "int16",
            DType::Int8 => "int8",
            DType::UInt8 => "uint8",
            DType::Bool => "bool",
        }
    }

    /// The dtype with this wire name, or `None` (only the canonical names hivemind writes are accepted).
    pub fn from_name(name: &str) -> Option<DType> {
        DType::ALL.into_iter().find(|d| d.name() == name)
    }

    /// Bytes per element.
    pub const fn size(self) -> usize {
        match self {
            DType::Float64 | DType::Int64 => 8,
            DType::Float32 | DType::Int32 => 4,
            DType::Float16 | DType::BFloat16 | DType::Int16 => 2,
            DType::Int8 | DType::UInt8 | DType::Bool => 1,
        }
    }

    /// `torch.is_floating_point`: `float16`, `bfloat16`, `float32`, `float64`.
    pub const fn is_floating_point(self) -> bool {
        matches!(
            self,
            DType::Float32 | DType::Float16 | DType::BFloat16 | DType::Float64
        )
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The error of parsing an unknown dtype name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown dtype {0:?}")]
pub struct UnknownDType(pub String);

impl FromStr for DType {
    type Err = UnknownDType;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        DType::from_name(s).ok_or_else(|| UnknownDType(s.to_owned()))
    }
}

mod sealed {
    pub trait Sealed {}
}

/// A Rust type that is the in-memory form of one [`DType`] (little-endian, as on the wire).
///
/// Implemented for `f32`, `f64`, [`half::f16`], [`half::bf16`], `i64`, `i32`, `i16`, `i8` and `u8`. `bool`
/// tensors are built and read with [`Tensor::from_bools`](super::Tensor::from_bools) and
/// [`Tensor::to_bools`](super::Tensor::to_bools), since not every byte is a valid Rust `bool`.
pub trait Element: bytemuck::Pod + Send + Sync + sealed::Sealed {
    /// The dtype this type stores.
    const DTYPE: DType;
}

macro_rules! element {
    ($($t:ty => $d:ident),* $(,)?) => {$(
        impl sealed::Sealed for $t {}
        impl Element for $t {
            const DTYPE: DType = DType::$d;
        }
    )*};
}

element! {
    f32 => Float32,
    f16 => Float16,
    bf16 => BFloat16,
    f64 => Float64,
    i64 => Int64,
    i32 => Int32,
    i16 => Int16,
    i8 => Int8,
    u8 => UInt8,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for d in DType::ALL {
            assert_eq!(DType::from_name(d.name()), Some(d));
            assert_eq!(d.name().parse::<DType>().unwrap(), d);
        }
        assert_eq!(DType::from_name("float"), None);
        assert!("complex64".parse::<DType>().is_err());
    }

    #[test]
    fn sizes_match_rust_types() {
        assert_eq!(DType::Float32.size(), size_of::<f32>());
        assert_eq!(DType::BFloat16.size(), size_of::<bf16>());
        assert_eq!(DType::Int64.size(), size_of::<i64>());
        assert_eq!(DType::Bool.size(), 1);
        assert!(DType::BFloat16.is_floating_point());
        assert!(!DType::Int8.is_floating_point());
    }
}
