//! How a trainer reaches one expert: the [`ExpertTransport`] seam, its two implementations, and
//! [`RemoteExpert`], hivemind's `RemoteExpert` (`moe/client/expert.py`) without autograd.
//!
//! - [`P2pTransport`]: hivemind's `ConnectionHandler` RPCs over an [`apiary_p2p::P2pHandle`] — `rpc_info`
//!   (cached per expert), `rpc_forward` / `rpc_backward` when the request's raw payload is at most
//!   [`MAX_UNARY_PAYLOAD_SIZE`], `rpc_forward_stream` / `rpc_backward_stream` (parts of at most
//!   [`STREAM_CHUNK_SIZE`]) above it. Each input is compressed as the expert's `forward_schema` declares,
//!   each output gradient as its `outputs_schema` declares. Serves against hivemind 1.1.12 servers and
//!   Apiary's own [`apiary_expert::server::ExpertServer`].
//! - [`LocalTransport`]: experts in this process (an [`apiary_expert::RuntimeHandle`] or
//!   [`apiary_expert::ExpertBackend`]s), with injectable faults ([`Fault`]) for testing routing.
//!
//! Every call is bounded by a per-call timeout ([`TransportConfig`]) and every reply is checked (tensor
//! count, shape, dtype, sizes decoded within limits derived from the request) before it is returned:
//! a bad reply is a [`TransportError`], never a panic.
//!
//! ```no_run
//! use std::sync::Arc;
//! use apiary_moe::transport::{ExpertAddr, ExpertTransport, P2pTransport, RemoteExpert, TransportConfig};
//! # async fn demo(p2p: apiary_p2p::P2pHandle, server: apiary_p2p::PeerId) -> Result<(), Box<dyn std::error::Error>> {
//! let transport: Arc<dyn ExpertTransport> = Arc::new(P2pTransport::new(p2p, TransportConfig::default()));
//! let expert = RemoteExpert::new(ExpertAddr::new("ffn.0.3", server), transport);
//! let hidden = expert.info().await?.inputs[0].instance_size[0] as usize;
//! let x = candle_core::Tensor::zeros((4, hidden), candle_core::DType::F32, &candle_core::Device::Cpu)?;
//! let y = expert.forward(vec![x.clone()]).await?;
//! let dx = expert.backward(vec![x], vec![y[0].ones_like()?]).await?; // the expert takes an optimizer step
//! # Ok(()) }
//! ```

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use apiary_expert::ExpertError;
use apiary_p2p::PeerId;
use apiary_wire::msgpack::{self, BatchTensorDescriptor, RpcInfo, Value};
use apiary_wire::proto::runtime::CompressionType;
use apiary_wire::tensor::DType;
use candle_core::Tensor;
use futures::future::BoxFuture;

mod convert;
mod local;
mod p2p;

pub use local::{CallCounts, Fault, FaultKind, LocalTransport};
pub use p2p::P2pTransport;

/// hivemind's `MAX_UNARY_PAYLOAD_SIZE` (`DEFAULT_MAX_MSG_SIZE // 2`, 2 MiB): a request whose tensors
/// hold more raw bytes (`element_size · nelement`, summed) goes over the `*_stream` RPCs.
pub const MAX_UNARY_PAYLOAD_SIZE: usize = 2 << 20;

/// The part size of streamed requests: hivemind's `DEFAULT_MAX_MSG_SIZE` (4 MiB), which its
/// `RemoteExpert` passes to `split_for_streaming`.
pub const STREAM_CHUNK_SIZE: usize = apiary_wire::tensor::DEFAULT_MAX_MSG_SIZE;

/// The most experts whose `rpc_info` a [`P2pTransport`] keeps; past it the cache starts over.
pub const MAX_CACHED_INFOS: usize = 4096;

/// Where an expert lives: its uid (`ffn.3.7`) and the peer that serves it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ExpertAddr {
    /// The expert's uid, as declared in the DHT.
    pub uid: String,
    /// The server's peer id (ignored by [`LocalTransport`]).
    pub peer: PeerId,
}

impl ExpertAddr {
    /// The expert `uid` served by `peer`.
    pub fn new(uid: impl Into<String>, peer: PeerId) -> Self {
        Self {
            uid: uid.into(),
            peer,
        }
    }
}

impl fmt::Display for ExpertAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.uid, self.peer)
    }
}

/// Per-call time limits. Each bounds one whole call (opening the stream, sending, computing, and
/// receiving every reply part); a call that takes longer fails with [`TransportError::Timeout`].
///
/// hivemind's `RemoteExpert` sets none (`RemoteMixtureOfExperts` bounds the whole mixture with its
/// `forward_timeout` / `backward_timeout`); these defaults are generous for CPU experts on 4096-row batches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TransportConfig {
    /// `rpc_info`. Default 10 s.
    pub info_timeout: Duration,
    /// `rpc_forward` / `rpc_forward_stream`. Default 60 s.
    pub forward_timeout: Duration,
    /// `rpc_backward` / `rpc_backward_stream`. Default 120 s.
    pub backward_timeout: Duration,
}

impl Default for TransportConfig {
    fn default() -> Self {
        Self {
            info_timeout: Duration::from_secs(10),
            forward_timeout: Duration::from_secs(60),
            backward_timeout: Duration::from_secs(120),
        }
    }
}

/// Which of an expert's RPCs a call is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Rpc {
    /// `rpc_info`: the expert's schemas.
    Info,
    /// `rpc_forward` (or `rpc_forward_stream`): outputs for inputs.
    Forward,
    /// `rpc_backward` (or `rpc_backward_stream`): input gradients, and one optimizer step.
    Backward,
}

impl fmt::Display for Rpc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Rpc::Info => "rpc_info",
            Rpc::Forward => "rpc_forward",
            Rpc::Backward => "rpc_backward",
        })
    }
}

/// Why a call to an expert failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TransportError {
    /// The server could not be reached (no known address, dial failed, or it does not serve expert RPCs).
    #[error("expert {uid}: its server is unreachable: {reason}")]
    Unreachable {
        /// The expert.
        uid: String,
        /// What failed (naming the server's peer id).
        reason: String,
    },
    /// The call took longer than its [`TransportConfig`] limit.
    #[error("expert {uid}: {rpc} timed out after {after:?}")]
    Timeout {
        /// The expert.
        uid: String,
        /// The call.
        rpc: Rpc,
        /// The limit that ran out.
        after: Duration,
    },
    /// The server answered with an error (an unknown uid, a request that does not fit the schema, an
    /// overloaded or paused runtime, …): its error text.
    #[error("expert {uid}: {rpc} failed on the server: {message}")]
    Remote {
        /// The expert.
        uid: String,
        /// The call.
        rpc: Rpc,
        /// The server's error text (hivemind sends `repr(exception)` or `str(exception)`).
        message: String,
    },
    /// The reply does not have the shape the call expects (tensor count, shape, dtype, size, encoding).
    #[error("expert {uid}: bad {rpc} reply: {reason}")]
    BadReply {
        /// The expert.
        uid: String,
        /// The call.
        rpc: Rpc,
        /// What is wrong with it.
        reason: String,
    },
    /// The expert's `rpc_info` could not be read as hivemind's `get_info()` dict.
    #[error("expert {uid}: unusable rpc_info: {reason}")]
    BadInfo {
        /// The expert.
        uid: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The tensors given do not fit the expert's schema (count, trailing dimensions, dtype).
    #[error("expert {uid}: {rpc} inputs do not fit the expert's schema: {reason}")]
    BadInput {
        /// The expert.
        uid: String,
        /// The call.
        rpc: Rpc,
        /// What does not fit.
        reason: String,
    },
    /// The call was refused locally before anything was sent (too many calls in flight, the host is
    /// shut down).
    #[error("expert {uid}: {rpc} refused locally: {reason}")]
    Refused {
        /// The expert.
        uid: String,
        /// The call.
        rpc: Rpc,
        /// Why.
        reason: String,
    },
    /// [`LocalTransport`] serves no expert with this uid.
    #[error("expert {uid}: not served by this local transport")]
    UnknownExpert {
        /// The uid asked for.
        uid: String,
    },
    /// A [`LocalTransport`] expert failed to compute.
    #[error("expert {uid}: {rpc} failed: {source}")]
    Local {
        /// The expert.
        uid: String,
        /// The call.
        rpc: Rpc,
        /// The expert's error.
        #[source]
        source: Box<ExpertError>,
    },
    /// A failure injected with [`LocalTransport::set_fault`].
    #[error("expert {uid}: injected {rpc} failure")]
    Injected {
        /// The expert.
        uid: String,
        /// The call.
        rpc: Rpc,
    },
}

impl TransportError {
    /// The uid of the expert the failed call was for.
    pub fn uid(&self) -> &str {
        match self {
            Self::Unreachable { uid, .. }
            | Self::Timeout { uid, .. }
            | Self::Remote { uid, .. }
            | Self::BadReply { uid, .. }
            | Self::BadInfo { uid, .. }
            | Self::BadInput { uid, .. }
            | Self::Refused { uid, .. }
            | Self::UnknownExpert { uid }
            | Self::Local { uid, .. }
            | Self::Injected { uid, .. } => uid,
        }
    }
}

/// An expert's schemas, from its `rpc_info`, flattened as hivemind's `nested_flatten` walks them.
#[derive(Debug, Clone, PartialEq)]
pub struct ExpertInfo {
    /// The decoded `get_info()` dict.
    pub rpc_info: RpcInfo,
    /// `nested_flatten(forward_schema)`: positional inputs in order, then keyword inputs sorted by name.
    /// `forward` takes one tensor per descriptor, compressed as its `compression` says.
    pub inputs: Vec<BatchTensorDescriptor>,
    /// `nested_flatten(outputs_schema)`: what `forward` returns, one tensor per descriptor; `backward`
    /// takes one output gradient per descriptor, compressed as its `compression` says.
    pub outputs: Vec<BatchTensorDescriptor>,
}

/// The most descriptors a schema may hold (inputs or outputs), and how deep it may nest.
const MAX_SCHEMA_LEAVES: usize = 256;
const MAX_SCHEMA_DEPTH: usize = 16;

impl ExpertInfo {
    /// Reads `ExpertInfo.serialized_info` (the msgpack of `ModuleBackend.get_info()`), within
    /// [`msgpack::Limits::DEFAULT`].
    pub fn from_msgpack(bytes: &[u8]) -> Result<Self, String> {
        let value = msgpack::decode_with(bytes, &msgpack::Limits::DEFAULT).map_err(|e| e.to_string())?;
        let rpc_info = RpcInfo::from_value(&value).map_err(|e| e.to_string())?;
        Self::from_rpc_info(rpc_info)
    }

    /// Flattens the schemas of `rpc_info`; fails if a leaf is not a `BatchTensorDescriptor`, a
    /// compression is unknown, or there are no inputs or no outputs.
    pub fn from_rpc_info(rpc_info: RpcInfo) -> Result<Self, String> {
        let mut inputs = Vec::new();
        for v in &rpc_info.args_schema {
            flatten(v, &mut inputs, 0)?;
        }
        let mut kwargs: Vec<&(String, Value)> = rpc_info.kwargs_schema.iter().collect();
        kwargs.sort_by(|a, b| a.0.cmp(&b.0));
        for (_, v) in kwargs {
            flatten(v, &mut inputs, 0)?;
        }
        let mut outputs = Vec::new();
        flatten(&rpc_info.outputs_schema, &mut outputs, 0)?;
        if inputs.is_empty() {
            return Err("the forward_schema holds no tensor".into());
        }
        if outputs.is_empty() {
            return Err("the outputs_schema holds no tensor".into());
        }
        for d in inputs.iter().chain(&outputs) {
            CompressionType::try_from(d.compression)
                .map_err(|_| format!("unknown compression {}", d.compression))?;
        }
        Ok(Self {
            rpc_info,
            inputs,
            outputs,
        })
    }

    /// The compression of each input, as the server expects it.
    pub fn input_compressions(&self) -> Vec<CompressionType> {
        self.inputs.iter().map(compression_of).collect()
    }

    /// The compression of each output gradient, as the server expects it.
    pub fn grad_output_compressions(&self) -> Vec<CompressionType> {
        self.outputs.iter().map(compression_of).collect()
    }
}

fn compression_of(d: &BatchTensorDescriptor) -> CompressionType {
    // checked in from_rpc_info
    CompressionType::try_from(d.compression).unwrap_or(CompressionType::None)
}

/// The wire dtype a descriptor declares, if it declares a known one.
fn declared_dtype(d: &BatchTensorDescriptor) -> Option<DType> {
    d.dtype_name().and_then(DType::from_name)
}

/// `nested_flatten`: tuples and lists in order, dicts by sorted key.
fn flatten(v: &Value, out: &mut Vec<BatchTensorDescriptor>, depth: usize) -> Result<(), String> {
    if depth > MAX_SCHEMA_DEPTH {
        return Err("the schema nests too deep".into());
    }
    if let Some(d) = v.as_tensor_descriptor() {
        if out.len() >= MAX_SCHEMA_LEAVES {
            return Err(format!("the schema holds more than {MAX_SCHEMA_LEAVES} tensors"));
        }
        out.push(d.clone());
        return Ok(());
    }
    if let Some(items) = v.as_seq() {
        for item in items {
            flatten(item, out, depth + 1)?;
        }
        return Ok(());
    }
    if let Some(entries) = v.as_map() {
        let mut sorted: Vec<&(Value, Value)> = entries.iter().collect();
        if sorted.iter().all(|(k, _)| k.as_str().is_some()) {
            sorted.sort_by(|a, b| a.0.as_str().cmp(&b.0.as_str()));
        } else if sorted.iter().all(|(k, _)| k.as_i64().is_some()) {
            sorted.sort_by_key(|(k, _)| k.as_i64());
        } else {
            return Err("a schema dict has keys that are neither all str nor all int".into());
        }
        for (_, item) in sorted {
            flatten(item, out, depth + 1)?;
        }
        return Ok(());
    }
    Err(format!(
        "a schema leaf is a {}, not a BatchTensorDescriptor",
        v.type_name()
    ))
}

/// How a trainer calls experts: over the network ([`P2pTransport`]) or in-process ([`LocalTransport`]).
///
/// Object-safe: hold it as `Arc<dyn ExpertTransport>`. Tensors are CPU candle tensors, one per flattened
/// schema entry ([`ExpertInfo::inputs`], [`ExpertInfo::outputs`]); floats travel as `f32`.
pub trait ExpertTransport: Send + Sync + fmt::Debug {
    /// The expert's schemas (`rpc_info`), cached after the first successful call.
    fn info<'a>(&'a self, expert: &'a ExpertAddr) -> BoxFuture<'a, Result<Arc<ExpertInfo>, TransportError>>;

    /// The expert's outputs for `inputs` (`rpc_forward`). No state changes on the server.
    fn forward<'a>(
        &'a self,
        expert: &'a ExpertAddr,
        inputs: Vec<Tensor>,
    ) -> BoxFuture<'a, Result<Vec<Tensor>, TransportError>>;

    /// The gradients of the expert's inputs given `inputs` and the gradients of its outputs
    /// (`rpc_backward`); the expert takes one optimizer step, as hivemind's `ModuleBackend` does.
    fn backward<'a>(
        &'a self,
        expert: &'a ExpertAddr,
        inputs: Vec<Tensor>,
        grad_outputs: Vec<Tensor>,
    ) -> BoxFuture<'a, Result<Vec<Tensor>, TransportError>>;
}

/// One expert behind a transport: hivemind's `RemoteExpert`, without autograd.
#[derive(Debug, Clone)]
pub struct RemoteExpert {
    /// Where the expert lives.
    pub addr: ExpertAddr,
    /// How it is reached.
    pub transport: Arc<dyn ExpertTransport>,
}

impl RemoteExpert {
    /// The expert at `addr`, reached through `transport`.
    pub fn new(addr: ExpertAddr, transport: Arc<dyn ExpertTransport>) -> Self {
        Self { addr, transport }
    }

    /// The expert's uid.
    pub fn uid(&self) -> &str {
        &self.addr.uid
    }

    /// The peer serving the expert.
    pub fn peer(&self) -> PeerId {
        self.addr.peer
    }

    /// See [`ExpertTransport::info`].
    pub async fn info(&self) -> Result<Arc<ExpertInfo>, TransportError> {
        self.transport.info(&self.addr).await
    }

    /// See [`ExpertTransport::forward`].
    pub async fn forward(&self, inputs: Vec<Tensor>) -> Result<Vec<Tensor>, TransportError> {
        self.transport.forward(&self.addr, inputs).await
    }

    /// See [`ExpertTransport::backward`].
    pub async fn backward(
        &self,
        inputs: Vec<Tensor>,
        grad_outputs: Vec<Tensor>,
    ) -> Result<Vec<Tensor>, TransportError> {
        self.transport.backward(&self.addr, inputs, grad_outputs).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use apiary_expert::ExpertKind;
    use apiary_expert::schema::ExpertSchema;

    #[test]
    fn info_of_a_server_create_schema_flattens() {
        let schema = ExpertSchema::server_create(ExpertKind::Transformer, 16, CompressionType::Float16, 64);
        let info = ExpertInfo::from_msgpack(&schema.rpc_info()).unwrap();
        assert_eq!(info.inputs.len(), 2);
        assert_eq!(info.inputs[0].instance_size, vec![128, 16]);
        assert_eq!(
            info.input_compressions(),
            vec![CompressionType::Float16, CompressionType::None]
        );
        assert_eq!(info.outputs.len(), 1);
        assert_eq!(info.grad_output_compressions(), vec![CompressionType::None]);
        assert_eq!(declared_dtype(&info.inputs[1]), Some(DType::Bool));
    }

    #[test]
    fn kwargs_flatten_sorted_after_args() {
        let d = |n: u64| BatchTensorDescriptor::new([n]);
        let info = RpcInfo::new(
            [d(1)],
            [("b".to_owned(), d(3)), ("a".to_owned(), d(2))],
            Value::Tuple(vec![Value::TensorDescriptor(d(4)), Value::TensorDescriptor(d(5))]),
        );
        let info = ExpertInfo::from_rpc_info(info).unwrap();
        let sizes: Vec<u64> = info.inputs.iter().map(|d| d.instance_size[0]).collect();
        assert_eq!(sizes, vec![1, 2, 3]);
        assert_eq!(info.outputs.len(), 2);
    }

    #[test]
    fn bad_infos_are_errors() {
        assert!(ExpertInfo::from_msgpack(b"\xc1").is_err());
        assert!(ExpertInfo::from_msgpack(&msgpack::encode(&Value::from(3))).is_err());
        let no_tensors = RpcInfo::new([], [], Value::Tuple(vec![]));
        assert!(ExpertInfo::from_rpc_info(no_tensors).is_err());
        let weird = RpcInfo::new(
            [BatchTensorDescriptor::new([2]).with_compression(77)],
            [],
            Value::Nil,
        );
        assert!(ExpertInfo::from_rpc_info(weird).is_err());
    }
}
