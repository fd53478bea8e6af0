//! [`Tensor`]: a shape, an element type and little-endian data in a [`Bytes`].

use std::borrow::Cow;
use std::fmt;

use bytes::Bytes;

use super::cast::{self, view};
use super::pool::Buffer;
use super::{DType, Element, TensorError};

/// A dense, C-ordered tensor as it crosses the wire: shape, [`DType`], little-endian element data and
/// `requires_grad`.
///
/// The data is a [`Bytes`], so a tensor decoded from a protobuf with [`deserialize`](super::deserialize)
/// (NONE codec) shares the message's buffer instead of copying it, cloning a tensor is cheap, and
/// [`Tensor::from_vec`] wraps a `Vec` without copying. Reading the values back ([`Tensor::as_slice`])
/// borrows them when the bytes are aligned for the element type and copies otherwise.
///
/// ```
/// use apiary_wire::tensor::{DType, Tensor};
///
/// let t = Tensor::from_vec([2, 3], vec![1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0])?.with_requires_grad(true);
/// assert_eq!(t.shape(), &[2, 3]);
/// assert_eq!(t.dtype(), DType::Float32);
/// assert_eq!(t.as_slice::<f32>()?[4], 5.0);
/// # Ok::<(), apiary_wire::tensor::TensorError>(())
/// ```
#[derive(Clone, PartialEq, Eq)]
pub struct Tensor {
    shape: Vec<usize>,
    dtype: DType,
    data: Bytes,
    requires_grad: bool,
}

impl fmt::Debug for Tensor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tensor")
            .field("shape", &self.shape)
            .field("dtype", &self.dtype)
            .field("requires_grad", &self.requires_grad)
            .field("nbytes", &self.data.len())
            .finish()
    }
}

/// The number of elements of a shape, or `None` when it overflows `usize`.
pub(crate) fn numel_of(shape: &[usize]) -> Option<usize> {
    shape.iter().try_fold(1usize, |n, &d| n.checked_mul(d))
}

impl Tensor {
    /// A tensor over existing little-endian data; `data.len()` must be `numel × dtype.size()`.
    pub fn from_bytes(
        shape: impl Into<Vec<usize>>,
        dtype: DType,
        data: Bytes,
    ) -> Result<Tensor, TensorError> {
        let shape = shape.into();
        let expected = numel_of(&shape)
            .and_then(|n| n.checked_mul(dtype.size()))
            .ok_or_else(|| TensorError::ShapeOverflow { shape: shape.clone() })?;
        if data.len() != expected {
            return Err(TensorError::LengthMismatch {
                dtype,
                shape,
                expected,
                actual: data.len(),
            });
        }
        Ok(Tensor {
            shape,
            dtype,
            data,
            requires_grad: false,
        })
    }

    /// A tensor that takes ownership of `values` without copying them.
    pub fn from_vec<T: Element>(shape: impl Into<Vec<usize>>, values: Vec<T>) -> Result<Tensor, TensorError> {
        Tensor::from_bytes(shape, T::DTYPE, cast::bytes_from_vec(values))
    }

    /// A tensor holding a copy of `values`.
    pub fn from_slice<T: Element>(shape: impl Into<Vec<usize>>, values: &[T]) -> Result<Tensor, TensorError> {
        Tensor::from_bytes(
            shape,
            T::DTYPE,
            Buffer::copy_of(bytemuck::cast_slice(values)).into_bytes(),
        )
    }

    /// A `bool` tensor (one byte per element, 0 or 1).
    pub fn from_bools(shape: impl Into<Vec<usize>>, values: &[bool]) -> Result<Tensor, TensorError> {
        let data: Vec<u8> = values.iter().map(|&b| u8::from(b)).collect();
        Tensor::from_bytes(shape, DType::Bool, Bytes::from(data))
    }

    /// A 0-d tensor holding one value.
    pub fn scalar<T: Element>(value: T) -> Tensor {
        Tensor {
            shape: Vec::new(),
            dtype: T::DTYPE,
            data: Bytes::copy_from_slice(bytemuck::bytes_of(&value)),
            requires_grad: false,
        }
    }

    /// A tensor of zeros.
    pub fn zeros(shape: impl Into<Vec<usize>>, dtype: DType) -> Result<Tensor, TensorError> {
        let shape = shape.into();
        let len = numel_of(&shape)
            .and_then(|n| n.checked_mul(dtype.size()))
            .ok_or_else(|| TensorError::ShapeOverflow { shape: shape.clone() })?;
        Tensor::from_bytes(shape, dtype, Bytes::from(vec![0u8; len]))
    }

    /// For decoders that have already checked the length.
    pub(crate) fn from_parts(shape: Vec<usize>, dtype: DType, data: Bytes, requires_grad: bool) -> Tensor {
        debug_assert_eq!(numel_of(&shape).map(|n| n * dtype.size()), Some(data.len()));
        Tensor {
            shape,
            dtype,
            data,
            requires_grad,
        }
    }

    /// The same tensor with `requires_grad` set (hivemind restores it on the receiver).
    #[must_use]
    pub fn with_requires_grad(mut self, requires_grad: bool) -> Tensor {
        self.requires_grad = requires_grad;
        self
    }

    /// Sets `requires_grad`.
    pub fn set_requires_grad(&mut self, requires_grad: bool) {
        self.requires_grad = requires_grad;
    }

    /// The same data under another shape with the same number of elements.
    pub fn reshape(self, shape: impl Into<Vec<usize>>) -> Result<Tensor, TensorError> {
        let requires_grad = self.requires_grad;
        Ok(Tensor::from_bytes(shape, self.dtype, self.data)?.with_requires_grad(requires_grad))
    }

    /// The dimensions (empty for a 0-d tensor).
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// The element type.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Whether the tensor requires grad.
    pub fn requires_grad(&self) -> bool {
        self.requires_grad
    }

    /// The number of elements (1 for a 0-d tensor).
    pub fn numel(&self) -> usize {
        self.data.len() / self.dtype.size()
    }

    /// The size of the data in bytes.
    pub fn nbytes(&self) -> usize {
        self.data.len()
    }

    /// The little-endian element data.
    pub fn bytes(&self) -> &Bytes {
        &self.data
    }

    /// Gives up the tensor for its data.
    pub fn into_bytes(self) -> Bytes {
        self.data
    }

    /// The elements as `T`, which must be the tensor's own element type; borrowed when the data is
    /// aligned for `T`, copied when not.
    pub fn as_slice<T: Element>(&self) -> Result<Cow<'_, [T]>, TensorError> {
        self.check_dtype(T::DTYPE)?;
        Ok(view::<T>(&self.data))
    }

    /// The elements copied into a vector of the tensor's own element type.
    pub fn to_vec<T: Element>(&self) -> Result<Vec<T>, TensorError> {
        Ok(self.as_slice::<T>()?.into_owned())
    }

    /// The elements of a `bool` tensor (any non-zero byte reads as `true`).
    pub fn to_bools(&self) -> Result<Vec<bool>, TensorError> {
        self.check_dtype(DType::Bool)?;
        Ok(self.data.iter().map(|&b| b != 0).collect())
    }

    /// The elements converted to `f32` from any dtype, as torch's `.float()` does it.
    pub fn to_f32_vec(&self) -> Vec<f32> {
        cast::to_f32(self.dtype, &self.data)
    }

    /// The elements converted to `f64` from any dtype (exact for every dtype but int64 beyond 2^53).
    pub fn to_f64_vec(&self) -> Vec<f64> {
        match self.dtype {
            DType::Float64 => view::<f64>(&self.data).into_owned(),
            DType::Int64 => view::<i64>(&self.data).iter().map(|&x| x as f64).collect(),
            _ => self.to_f32_vec().into_iter().map(f64::from).collect(),
        }
    }

    fn check_dtype(&self, requested: DType) -> Result<(), TensorError> {
        if self.dtype == requested {
            Ok(())
        } else {
            Err(TensorError::DTypeMismatch {
                requested,
                actual: self.dtype,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use half::bf16;

    use super::*;

    #[test]
    fn constructors_check_lengths() {
        assert!(Tensor::from_vec([2, 2], vec![1.0f32; 4]).is_ok());
        assert!(matches!(
            Tensor::from_vec([2, 3], vec![1.0f32; 4]),
            Err(TensorError::LengthMismatch {
                expected: 24,
                actual: 16,
                ..
            })
        ));
        assert!(matches!(
            Tensor::zeros([usize::MAX, 2], DType::Float32),
            Err(TensorError::ShapeOverflow { .. })
        ));
        let empty = Tensor::from_vec([3, 0], Vec::<i64>::new()).unwrap();
        assert_eq!(empty.numel(), 0);
        assert_eq!(Tensor::scalar(2.5f64).numel(), 1);
    }

    #[test]
    fn typed_access() {
        let t = Tensor::from_slice([3], &[bf16::from_f32(1.0), bf16::ONE, bf16::ZERO]).unwrap();
        assert_eq!(t.to_f32_vec(), vec![1.0, 1.0, 0.0]);
        assert!(matches!(
            t.as_slice::<f32>(),
            Err(TensorError::DTypeMismatch { .. })
        ));
        let b = Tensor::from_bools([2], &[true, false]).unwrap();
        assert_eq!(b.to_bools().unwrap(), vec![true, false]);
        assert_eq!(b.to_f64_vec(), vec![1.0, 0.0]);
        let r = Tensor::from_vec([4], vec![1i32, 2, 3, 4])
            .unwrap()
            .with_requires_grad(true);
        let r = r.reshape([2, 2]).unwrap();
        assert!(r.requires_grad());
        assert_eq!(r.to_vec::<i32>().unwrap(), vec![1, 2, 3, 4]);
    }
}
