//! [`P2pTransport`]: hivemind's `ConnectionHandler` RPCs over libp2p, as `RemoteExpert` makes them.

use std::collections::HashMap;
use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use apiary_expert::server::{RPC_BACKWARD, RPC_BACKWARD_STREAM, RPC_FORWARD, RPC_FORWARD_STREAM, RPC_INFO};
use apiary_p2p::{CallError, Multiaddr, OpenError, P2pHandle, PeerId};
use apiary_wire::proto::runtime::{
    ExpertInfo as ProtoExpertInfo, ExpertRequest, ExpertResponse, ExpertUid, Tensor as ProtoTensor,
};
use apiary_wire::tensor::{self, StreamCombiner};
use bytes::Bytes;
use candle_core::Tensor;
use futures::future::BoxFuture;
use futures::{FutureExt, StreamExt};
use prost::Message;

use super::convert::{self, Expected};
use super::{
    ExpertAddr, ExpertInfo, ExpertTransport, MAX_CACHED_INFOS, MAX_UNARY_PAYLOAD_SIZE, Rpc,
    STREAM_CHUNK_SIZE, TransportConfig, TransportError,
};

/// Calls experts over libp2p with hivemind's `ConnectionHandler` RPCs (see [the module](super)).
///
/// A peer with no known address is looked up once per call with [`P2pHandle::find_peer`] (hivemind's
/// p2pd does the same through its DHT); add addresses learned elsewhere with
/// [`P2pTransport::add_address`].
#[derive(Debug, Clone)]
pub struct P2pTransport {
    p2p: P2pHandle,
    config: TransportConfig,
    infos: Arc<InfoCache>,
}

/// `rpc_info` per (server, uid).
type InfoCache = Mutex<HashMap<(PeerId, String), Arc<ExpertInfo>>>;

impl P2pTransport {
    /// A transport calling from `p2p` with `config`'s time limits.
    pub fn new(p2p: P2pHandle, config: TransportConfig) -> Self {
        Self {
            p2p,
            config,
            infos: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    /// The host calls go out from.
    pub fn p2p(&self) -> &P2pHandle {
        &self.p2p
    }

    /// The time limits.
    pub fn config(&self) -> &TransportConfig {
        &self.config
    }

    /// Records an address of an expert server, for calls to dial.
    pub async fn add_address(&self, peer: PeerId, addr: Multiaddr) -> Result<(), apiary_p2p::HostError> {
        self.p2p.add_address(peer, addr).await
    }

    /// Forgets the cached `rpc_info` of `expert` (e.g. after its server restarted with other schemas).
    pub fn forget_info(&self, expert: &ExpertAddr) {
        self.infos
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&(expert.peer, expert.uid.clone()));
    }

    fn cached(&self, expert: &ExpertAddr) -> Option<Arc<ExpertInfo>> {
        self.infos
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&(expert.peer, expert.uid.clone()))
            .cloned()
    }

    async fn fetch_info(&self, expert: &ExpertAddr) -> Result<Arc<ExpertInfo>, TransportError> {
        if let Some(info) = self.cached(expert) {
            return Ok(info);
        }
        let request = Bytes::from(
            ExpertUid {
                uid: expert.uid.clone(),
            }
            .encode_to_vec(),
        );
        let timeout = self.config.info_timeout;
        let reply = self
            .with_deadline(expert, Rpc::Info, timeout, async {
                self.unary(expert, Rpc::Info, RPC_INFO, request, timeout).await
            })
            .await?;
        let bad_info = |reason: String| TransportError::BadInfo {
            uid: expert.uid.clone(),
            reason,
        };
        let reply =
            ProtoExpertInfo::decode(reply).map_err(|e| bad_info(format!("malformed ExpertInfo: {e}")))?;
        let info = Arc::new(ExpertInfo::from_msgpack(&reply.serialized_info).map_err(bad_info)?);
        let mut infos = self.infos.lock().unwrap_or_else(PoisonError::into_inner);
        if infos.len() >= MAX_CACHED_INFOS {
            infos.clear();
        }
        infos.insert((expert.peer, expert.uid.clone()), info.clone());
        Ok(info)
    }

    /// Runs `call` within `timeout`, as a [`TransportError::Timeout`] past it.
    async fn with_deadline<T>(
        &self,
        expert: &ExpertAddr,
        rpc: Rpc,
        timeout: Duration,
        call: impl Future<Output = Result<T, TransportError>>,
    ) -> Result<T, TransportError> {
        tokio::time::timeout(timeout, call).await.unwrap_or_else(|_| {
            Err(TransportError::Timeout {
                uid: expert.uid.clone(),
                rpc,
                after: timeout,
            })
        })
    }

    /// One unary call; looks the peer up and retries once if no address of it is known or dialing failed.
    async fn unary(
        &self,
        expert: &ExpertAddr,
        rpc: Rpc,
        name: &str,
        request: Bytes,
        timeout: Duration,
    ) -> Result<Bytes, TransportError> {
        let first = self
            .p2p
            .call_unary(expert.peer, name, request.clone(), timeout)
            .await;
        let result = match first {
            Err(CallError::Open(e)) if self.looked_up(expert, &e).await => {
                self.p2p.call_unary(expert.peer, name, request, timeout).await
            }
            other => other,
        };
        result.map_err(|e| call_error(expert, rpc, timeout, e))
    }

    /// One stream call, collecting every reply part into whole tensors (at most `expected`).
    async fn stream(
        &self,
        expert: &ExpertAddr,
        rpc: Rpc,
        name: &str,
        messages: Vec<Bytes>,
        expected: &[Expected],
        timeout: Duration,
    ) -> Result<Vec<ProtoTensor>, TransportError> {
        let open = |messages: Vec<Bytes>| {
            self.p2p.call_stream(
                expert.peer,
                name,
                futures::stream::iter(messages).boxed(),
                timeout,
            )
        };
        let replies = match open(messages.clone()).await {
            Err(CallError::Open(e)) if self.looked_up(expert, &e).await => open(messages).await,
            other => other,
        };
        let mut replies = replies.map_err(|e| call_error(expert, rpc, timeout, e))?;
        let bad = |reason: String| TransportError::BadReply {
            uid: expert.uid.clone(),
            rpc,
            reason,
        };
        let mut combiner = StreamCombiner::new(convert::reply_limits(expected));
        let mut tensors = Vec::with_capacity(expected.len());
        while let Some(reply) = replies.next().await {
            let reply = reply.map_err(|e| call_error(expert, rpc, timeout, e))?;
            let response =
                ExpertResponse::decode(reply).map_err(|e| bad(format!("malformed ExpertResponse: {e}")))?;
            for part in response.tensors {
                if let Some(whole) = combiner
                    .push(part)
                    .map_err(|e| bad(format!("bad tensor stream: {e}")))?
                {
                    if tensors.len() >= expected.len() {
                        return Err(bad(format!("more than the {} tensors expected", expected.len())));
                    }
                    tensors.push(whole);
                }
            }
        }
        combiner
            .finish()
            .map_err(|e| bad(format!("bad tensor stream: {e}")))?;
        Ok(tensors)
    }

    /// After a failed open: whether looking the peer up found an address worth retrying with.
    async fn looked_up(&self, expert: &ExpertAddr, error: &OpenError) -> bool {
        if !matches!(error, OpenError::NoAddresses | OpenError::Dial(_)) {
            return false;
        }
        let lookup = tokio::time::timeout(self.config.info_timeout, self.p2p.find_peer(expert.peer)).await;
        matches!(lookup, Ok(Ok(addrs)) if !addrs.is_empty())
    }

    /// A forward or backward call: unary or streamed as hivemind's `expert_forward` / `expert_backward`
    /// choose, checked against `expected`.
    #[allow(clippy::too_many_arguments)]
    async fn compute(
        &self,
        expert: &ExpertAddr,
        rpc: Rpc,
        tensors: &[Tensor],
        wire: Vec<ProtoTensor>,
        expected: &[Expected],
        timeout: Duration,
    ) -> Result<Vec<Tensor>, TransportError> {
        let raw: usize = tensors.iter().map(convert::raw_bytes).sum();
        // hivemind streams when the raw payload exceeds 2 MiB; a compressed payload that grew past it (the
        // float32 form of bfloat16, codec headers on tiny tensors) is streamed too, lest the 4 MiB unary
        // envelope overflow.
        let serialized: usize = wire.iter().map(|t| t.buffer.len()).sum();
        let streamed = raw > MAX_UNARY_PAYLOAD_SIZE || serialized > MAX_UNARY_PAYLOAD_SIZE;
        let (unary_name, stream_name) = match rpc {
            Rpc::Backward => (RPC_BACKWARD, RPC_BACKWARD_STREAM),
            Rpc::Forward | Rpc::Info => (RPC_FORWARD, RPC_FORWARD_STREAM),
        };
        let bad = |reason: String| TransportError::BadReply {
            uid: expert.uid.clone(),
            rpc,
            reason,
        };
        let limits = convert::reply_limits(expected);
        let reply_tensors = if streamed {
            let chunk = NonZeroUsize::new(STREAM_CHUNK_SIZE).unwrap_or(NonZeroUsize::MIN);
            let mut messages = Vec::new();
            for t in &wire {
                let parts = tensor::split_for_streaming(t, chunk).map_err(|e| TransportError::BadInput {
                    uid: expert.uid.clone(),
                    rpc,
                    reason: e.to_string(),
                })?;
                for part in parts {
                    messages.push(Bytes::from(
                        ExpertRequest {
                            uid: expert.uid.clone(),
                            tensors: vec![part],
                            ..Default::default()
                        }
                        .encode_to_vec(),
                    ));
                }
            }
            drop(wire);
            self.stream(expert, rpc, stream_name, messages, expected, timeout)
                .await?
        } else {
            let request = Bytes::from(
                ExpertRequest {
                    uid: expert.uid.clone(),
                    tensors: wire,
                    ..Default::default()
                }
                .encode_to_vec(),
            );
            let reply = self.unary(expert, rpc, unary_name, request, timeout).await?;
            ExpertResponse::decode(reply)
                .map_err(|e| bad(format!("malformed ExpertResponse: {e}")))?
                .tensors
        };
        convert::decode_reply(&reply_tensors, expected, &limits).map_err(bad)
    }

    async fn forward_impl(
        &self,
        expert: &ExpertAddr,
        inputs: Vec<Tensor>,
    ) -> Result<Vec<Tensor>, TransportError> {
        let info = self.fetch_info(expert).await?;
        let rpc = Rpc::Forward;
        let bad_input = |reason: String| TransportError::BadInput {
            uid: expert.uid.clone(),
            rpc,
            reason,
        };
        let rows = convert::check_against(&inputs, &info.inputs, "input").map_err(bad_input)?;
        let expected = Expected::outputs(rows, &info.outputs).map_err(|reason| TransportError::BadInfo {
            uid: expert.uid.clone(),
            reason: reason.to_owned(),
        })?;
        let wire =
            convert::serialize_all(&inputs, &info.inputs, &info.input_compressions()).map_err(bad_input)?;
        let timeout = self.config.forward_timeout;
        self.with_deadline(
            expert,
            rpc,
            timeout,
            self.compute(expert, rpc, &inputs, wire, &expected, timeout),
        )
        .await
    }

    async fn backward_impl(
        &self,
        expert: &ExpertAddr,
        inputs: Vec<Tensor>,
        grad_outputs: Vec<Tensor>,
    ) -> Result<Vec<Tensor>, TransportError> {
        let info = self.fetch_info(expert).await?;
        let rpc = Rpc::Backward;
        let bad_input = |reason: String| TransportError::BadInput {
            uid: expert.uid.clone(),
            rpc,
            reason,
        };
        let rows = convert::check_against(&inputs, &info.inputs, "input").map_err(bad_input)?;
        let grad_rows =
            convert::check_against(&grad_outputs, &info.outputs, "output gradient").map_err(bad_input)?;
        if rows != grad_rows {
            return Err(bad_input(format!(
                "the inputs have {rows} rows, the output gradients {grad_rows}"
            )));
        }
        // hivemind: flatten((inputs, grad_outputs)) with flatten((forward_schema, outputs_schema))'s compressions
        let mut wire =
            convert::serialize_all(&inputs, &info.inputs, &info.input_compressions()).map_err(bad_input)?;
        wire.extend(
            convert::serialize_all(&grad_outputs, &info.outputs, &info.grad_output_compressions())
                .map_err(bad_input)?,
        );
        let expected = Expected::grads(&inputs);
        let mut all = inputs;
        all.extend(grad_outputs);
        let timeout = self.config.backward_timeout;
        self.with_deadline(
            expert,
            rpc,
            timeout,
            self.compute(expert, rpc, &all, wire, &expected, timeout),
        )
        .await
    }
}

/// A [`CallError`] as the [`TransportError`] a caller can act on.
fn call_error(expert: &ExpertAddr, rpc: Rpc, timeout: Duration, e: CallError) -> TransportError {
    let uid = expert.uid.clone();
    match e {
        CallError::Open(e) => TransportError::Unreachable {
            uid,
            reason: format!("peer {}: {e}", expert.peer),
        },
        CallError::Timeout => TransportError::Timeout {
            uid,
            rpc,
            after: timeout,
        },
        CallError::Remote(message) => TransportError::Remote { uid, rpc, message },
        e @ (CallError::Reply(_) | CallError::CallIdMismatch) => TransportError::BadReply {
            uid,
            rpc,
            reason: e.to_string(),
        },
        e => TransportError::Refused {
            uid,
            rpc,
            reason: e.to_string(),
        },
    }
}

impl ExpertTransport for P2pTransport {
    fn info<'a>(&'a self, expert: &'a ExpertAddr) -> BoxFuture<'a, Result<Arc<ExpertInfo>, TransportError>> {
        self.fetch_info(expert).boxed()
    }

    fn forward<'a>(
        &'a self,
        expert: &'a ExpertAddr,
        inputs: Vec<Tensor>,
    ) -> BoxFuture<'a, Result<Vec<Tensor>, TransportError>> {
        self.forward_impl(expert, inputs).boxed()
    }

    fn backward<'a>(
        &'a self,
        expert: &'a ExpertAddr,
        inputs: Vec<Tensor>,
        grad_outputs: Vec<Tensor>,
    ) -> BoxFuture<'a, Result<Vec<Tensor>, TransportError>> {
        self.backward_impl(expert, inputs, grad_outputs).boxed()
    }
}
