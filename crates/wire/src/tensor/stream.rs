//! Stream chunking of serialized tensors, as hivemind's `utils/streaming.py`.
//!
//! [`split_for_streaming`] cuts a tensor's buffer into `chunk_size` pieces: the first part carries
//! `compression`, `size`, `dtype`, `requires_grad` and `chunks = N` (the number of pieces, 0 for an
//! empty buffer) with the first piece; every following part carries only its piece of `buffer`. A
//! receiver starts a new tensor at each part with a non-empty `dtype`
//! (`deserialize_tensor_stream`). [`combine_from_streaming`] puts one tensor back together, and
//! [`StreamCombiner`] does it incrementally for a stream of parts holding several tensors.

use std::num::NonZeroUsize;

use bytes::{Bytes, BytesMut};

use crate::proto::runtime::Tensor as WireTensor;

use super::{Limits, StreamError};

/// hivemind's `STREAMING_CHUNK_SIZE_BYTES` (2^16), the chunk size of averaging state downloads.
pub const STREAMING_CHUNK_SIZE_BYTES: usize = 1 << 16;

/// hivemind's `DEFAULT_MAX_MSG_SIZE` (4 MiB), the chunk size of expert (MoE) streams.
pub const DEFAULT_MAX_MSG_SIZE: usize = 4 << 20;

/// Splits a serialized tensor into stream parts exactly as hivemind's `split_for_streaming` does.
///
/// The parts share `tensor.buffer` (no copy). An empty buffer still gives one part (with `chunks = 0`).
/// Fails only when the part count does not fit the `int32` `chunks` field.
pub fn split_for_streaming(
    tensor: &WireTensor,
    chunk_size: NonZeroUsize,
) -> Result<Vec<WireTensor>, StreamError> {
    let chunk = chunk_size.get();
    let buf = &tensor.buffer;
    let n = buf.len().div_ceil(chunk);
    let chunks = i32::try_from(n).map_err(|_| StreamError::TooManyChunks { chunks: n })?;
    let mut parts = Vec::with_capacity(n.max(1));
    parts.push(WireTensor {
        buffer: buf.slice(..chunk.min(buf.len())),
        size: tensor.size.clone(),
        requires_grad: tensor.requires_grad,
        dtype: tensor.dtype.clone(),
        compression: tensor.compression,
        chunks,
    });
    let mut start = chunk;
    while start < buf.len() {
        let end = start.saturating_add(chunk).min(buf.len());
        parts.push(WireTensor {
            buffer: buf.slice(start..end),
            ..WireTensor::default()
        });
        start = end;
    }
    Ok(parts)
}

/// Puts the parts of one tensor back together, as hivemind's `combine_from_streaming` (the result
/// keeps the first part's metadata, `chunks` included).
///
/// Stricter than hivemind, which concatenates whatever it is given: the first part must carry a dtype,
/// the part count must equal its `chunks` (1 part for `chunks = 0`), continuation parts must not carry a
/// dtype or be empty, and the total must stay within [`Limits::max_bytes`].
pub fn combine_from_streaming(
    parts: impl IntoIterator<Item = WireTensor>,
    limits: &Limits,
) -> Result<WireTensor, StreamError> {
    let mut combiner = StreamCombiner::new(*limits);
    let mut done = None;
    let mut count = 0usize;
    for part in parts {
        count += 1;
        if let Some(t) = done.take() {
            // Anything after a complete tensor is one part too many.
            let t: WireTensor = t;
            return Err(StreamError::ChunkCountMismatch {
                declared: t.chunks,
                received: count,
            });
        }
        done = combiner.push(part)?;
    }
    match done {
        Some(t) => Ok(t),
        None if count == 0 => Err(StreamError::Empty),
        None => Err(combiner.incomplete_error()),
    }
}

/// A tensor being reassembled.
#[derive(Debug)]
struct Pending {
    /// The first part, its buffer moved into `pieces`.
    head: WireTensor,
    pieces: Vec<Bytes>,
    bytes: usize,
    expected: usize,
}

/// Reassembles tensors from a stream of parts, one part at a time (for RPC streams carrying several
/// tensors, as hivemind's `deserialize_tensor_stream`).
///
/// A part with a non-empty `dtype` starts a tensor of `max(chunks, 1)` parts; [`StreamCombiner::push`]
/// returns the tensor as soon as its last part arrives. Memory is bounded by [`Limits::max_bytes`] per
/// tensor.
///
/// ```
/// use std::num::NonZeroUsize;
/// use apiary_wire::proto::runtime::CompressionType;
/// use apiary_wire::tensor::{Limits, StreamCombiner, Tensor, serialize, split_for_streaming};
///
/// let wire = serialize(&Tensor::from_vec([1000], vec![0.5f32; 1000])?, CompressionType::None)?;
/// let mut combiner = StreamCombiner::new(Limits::default());
/// let mut out = Vec::new();
/// for part in split_for_streaming(&wire, NonZeroUsize::new(1024).unwrap())? {
///     out.extend(combiner.push(part)?);
/// }
/// combiner.finish()?;
/// assert_eq!(out.len(), 1);
/// assert_eq!(out[0].buffer, wire.buffer);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug)]
pub struct StreamCombiner {
    limits: Limits,
    pending: Option<Pending>,
}

impl StreamCombiner {
    /// A combiner that refuses tensors larger than `limits.max_bytes`.
    pub fn new(limits: Limits) -> StreamCombiner {
        StreamCombiner {
            limits,
            pending: None,
        }
    }

    /// Whether no tensor is half-received.
    pub fn is_idle(&self) -> bool {
        self.pending.is_none()
    }

    /// Takes the next part; returns a tensor when this part completes one.
    pub fn push(&mut self, mut part: WireTensor) -> Result<Option<WireTensor>, StreamError> {
        let max = self.limits.max_bytes;
        if !part.dtype.is_empty() {
            if self.pending.is_some() {
                return Err(self.incomplete_error());
            }
            if part.chunks < 0 {
                return Err(StreamError::NegativeChunks(part.chunks));
            }
            let expected = (part.chunks as usize).max(1);
            // Every continuation part carries at least one byte.
            if part.buffer.len() > max || expected - 1 > max - part.buffer.len() {
                return Err(StreamError::TooLarge { max });
            }
            let first = std::mem::take(&mut part.buffer);
            self.pending = Some(Pending {
                bytes: first.len(),
                pieces: vec![first],
                head: part,
                expected,
            });
        } else {
            let Some(p) = self.pending.as_mut() else {
                return Err(StreamError::UnexpectedContinuation);
            };
            if part.buffer.is_empty() {
                return Err(StreamError::EmptyChunk);
            }
            p.bytes = p.bytes.saturating_add(part.buffer.len());
            if p.bytes > max {
                return Err(StreamError::TooLarge { max });
            }
            p.pieces.push(part.buffer);
        }
        match &self.pending {
            Some(p) if p.pieces.len() == p.expected => Ok(self.pending.take().map(assemble)),
            _ => Ok(None),
        }
    }

    /// Ends the stream: an error if a tensor is still missing parts.
    pub fn finish(self) -> Result<(), StreamError> {
        if self.pending.is_some() {
            Err(self.incomplete_error())
        } else {
            Ok(())
        }
    }

    fn incomplete_error(&self) -> StreamError {
        match &self.pending {
            Some(p) => StreamError::ChunkCountMismatch {
                declared: p.head.chunks,
                received: p.pieces.len(),
            },
            None => StreamError::Empty,
        }
    }
}

fn assemble(p: Pending) -> WireTensor {
    let mut head = p.head;
    head.buffer = if p.pieces.len() == 1 {
        p.pieces.into_iter().next().unwrap_or_default()
    } else {
        let mut buf = BytesMut::with_capacity(p.bytes);
        for piece in &p.pieces {
            buf.extend_from_slice(piece);
        }
        buf.freeze()
    };
    head
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nz(n: usize) -> NonZeroUsize {
        NonZeroUsize::new(n).unwrap()
    }

    fn wire(len: usize) -> WireTensor {
        WireTensor {
            buffer: Bytes::from((0..len).map(|i| i as u8).collect::<Vec<u8>>()),
            size: vec![len as u32],
            requires_grad: true,
            dtype: "uint8".into(),
            compression: 0,
            chunks: 0,
        }
    }

    #[test]
    fn split_matches_hivemind_rules() {
        let parts = split_for_streaming(&wire(10), nz(4)).unwrap();
        assert_eq!(parts.len(), 3);
        assert_eq!(parts[0].chunks, 3);
        assert_eq!(parts[0].dtype, "uint8");
        assert_eq!(
            parts[1],
            WireTensor {
                buffer: Bytes::from_static(&[4, 5, 6, 7]),
                ..Default::default()
            }
        );
        assert_eq!(parts[2].buffer.len(), 2);

        let empty = split_for_streaming(&wire(0), nz(4)).unwrap();
        assert_eq!(empty.len(), 1);
        assert_eq!(empty[0].chunks, 0);

        let exact = split_for_streaming(&wire(8), nz(4)).unwrap();
        assert_eq!(exact.len(), 2);
        assert_eq!(split_for_streaming(&wire(8), nz(usize::MAX)).unwrap().len(), 1);
    }

    #[test]
    fn combine_round_trips() {
        let limits = Limits::default();
        for (len, chunk) in [(0, 1), (1, 1), (10, 3), (10, 10), (10, 100), (4097, 64)] {
            let w = wire(len);
            let parts = split_for_streaming(&w, nz(chunk)).unwrap();
            let expect_chunks = parts[0].chunks;
            let back = combine_from_streaming(parts, &limits).unwrap();
            assert_eq!(back.buffer, w.buffer);
            assert_eq!(back.chunks, expect_chunks);
            assert_eq!(WireTensor { chunks: 0, ..back }, w);
        }
    }

    #[test]
    fn combine_rejects_bad_streams() {
        let limits = Limits::default();
        let parts = split_for_streaming(&wire(10), nz(4)).unwrap();
        assert_eq!(
            combine_from_streaming(Vec::new(), &limits),
            Err(StreamError::Empty)
        );
        assert!(matches!(
            combine_from_streaming(parts[..2].to_vec(), &limits),
            Err(StreamError::ChunkCountMismatch {
                declared: 3,
                received: 2
            })
        ));
        let mut extra = parts.clone();
        extra.push(parts[1].clone());
        assert!(matches!(
            combine_from_streaming(extra, &limits),
            Err(StreamError::ChunkCountMismatch { .. })
        ));
        assert_eq!(
            combine_from_streaming(parts[1..].to_vec(), &limits),
            Err(StreamError::UnexpectedContinuation)
        );
        let mut neg = parts[0].clone();
        neg.chunks = -1;
        assert_eq!(
            combine_from_streaming([neg], &limits),
            Err(StreamError::NegativeChunks(-1))
        );
        let mut with_empty = parts.clone();
        with_empty[1].buffer = Bytes::new();
        assert_eq!(
            combine_from_streaming(with_empty, &limits),
            Err(StreamError::EmptyChunk)
        );
        let small = Limits::default().with_max_bytes(8);
        assert_eq!(
            combine_from_streaming(parts, &small),
            Err(StreamError::TooLarge { max: 8 })
        );
        let mut huge = wire(1);
        huge.chunks = i32::MAX;
        assert_eq!(
            combine_from_streaming([huge], &small),
            Err(StreamError::TooLarge { max: 8 })
        );
    }

    #[test]
    fn combiner_handles_several_tensors() {
        let mut c = StreamCombiner::new(Limits::default());
        let a = wire(9);
        let b = wire(0);
        let d = wire(5);
        let mut parts = split_for_streaming(&a, nz(2)).unwrap();
        parts.extend(split_for_streaming(&b, nz(2)).unwrap());
        parts.extend(split_for_streaming(&d, nz(100)).unwrap());
        let mut out = Vec::new();
        for p in parts {
            out.extend(c.push(p).unwrap());
        }
        assert!(c.is_idle());
        c.finish().unwrap();
        let bufs: Vec<_> = out.iter().map(|t| t.buffer.clone()).collect();
        assert_eq!(bufs, vec![a.buffer, b.buffer, d.buffer]);

        let mut c = StreamCombiner::new(Limits::default());
        let parts = split_for_streaming(&wire(9), nz(2)).unwrap();
        assert_eq!(c.push(parts[0].clone()), Ok(None));
        assert!(matches!(
            c.push(wire(3)),
            Err(StreamError::ChunkCountMismatch {
                declared: 5,
                received: 1
            })
        ));
        assert!(matches!(c.finish(), Err(StreamError::ChunkCountMismatch { .. })));
    }
}
