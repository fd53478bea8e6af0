//! hivemind's `ConnectionHandler` and `DHTHandlerThread`: the five expert RPCs served on the p2p host, and
//! the DHT declarations that let trainers find the experts.
//!
//! - `ConnectionHandler.rpc_info(ExpertUID) -> ExpertInfo`: the expert's schema ([`ExpertSchema::rpc_info`]).
//! - `rpc_forward(ExpertRequest) -> ExpertResponse` and `rpc_backward` (tensors = inputs, then the output's
//!   gradient; answers the input gradients), unary; `rpc_forward_stream` / `rpc_backward_stream`: the same
//!   with every tensor split into parts of at most 4 MiB (hivemind's `split_for_streaming`), one part per
//!   message, both ways.
//!
//! Every request is decoded within limits derived from the expert's schema and checked against it (count,
//! dtypes, trailing dims, batch size) before it reaches the runtime; a bad request gets an error text and
//! nothing else happens. Outputs are compressed as the schema declares (`NONE` for outputs, the inputs'
//! compression for input gradients).

use std::collections::HashMap;
use std::num::NonZeroUsize;
use std::sync::{Arc, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::Duration;

use apiary_dht::{DhtHandle, KeptRecord, Refresher, StoreEntry};
use apiary_p2p::{InvalidName, P2pHandle, StreamHandler, UnaryHandler};
use apiary_wire::msgpack::Value;
use apiary_wire::proto::runtime::{CompressionType, ExpertInfo, ExpertRequest, ExpertResponse, ExpertUid};
use apiary_wire::tensor::{self, Limits, StreamCombiner, Tensor as WireTensor};
use bytes::Bytes;
use futures::{FutureExt, StreamExt};
use prost::Message;

use crate::ExpertError;
use crate::runtime::RuntimeHandle;
use crate::schema::{ExpertSchema, from_candle, to_candle};

/// hivemind's `DEFAULT_MAX_MSG_SIZE`: the largest stream part.
pub const STREAM_CHUNK: usize = 4 * 1024 * 1024;

/// The handler names, as hivemind's `ConnectionHandler` registers them (no namespace).
pub const RPC_INFO: &str = "ConnectionHandler.rpc_info";
/// See [`RPC_INFO`].
pub const RPC_FORWARD: &str = "ConnectionHandler.rpc_forward";
/// See [`RPC_INFO`].
pub const RPC_BACKWARD: &str = "ConnectionHandler.rpc_backward";
/// See [`RPC_INFO`].
pub const RPC_FORWARD_STREAM: &str = "ConnectionHandler.rpc_forward_stream";
/// See [`RPC_INFO`].
pub const RPC_BACKWARD_STREAM: &str = "ConnectionHandler.rpc_backward_stream";

/// Serves experts' RPCs, each expert from the [`RuntimeHandle`] it was attached with.
///
/// The set of hosted experts can change while the server is registered on a p2p host
/// ([`ExpertServer::attach`], [`ExpertServer::detach`]), so a node can join and leave experiments without
/// re-registering the handlers (a p2p host takes one `ConnectionHandler`, as hivemind names it).
///
/// A request looks its expert up once, when it arrives (a stream: at its first message), and keeps that
/// expert's runtime and schema until it is answered: a detach stops new requests for the expert at once
/// while requests already in flight finish on the detached runtime (unless that runtime is shut down).
#[derive(Debug)]
pub struct ExpertServer {
    experts: RwLock<HashMap<String, Arc<Hosted>>>,
}

/// One hosted expert: the runtime that computes it, its schema, and its encoded `rpc_info` answer.
#[derive(Debug)]
struct Hosted {
    runtime: RuntimeHandle,
    schema: ExpertSchema,
    info: Bytes,
}

impl Hosted {
    fn new(runtime: RuntimeHandle, schema: ExpertSchema) -> Arc<Self> {
        let info = Bytes::from(schema.rpc_info());
        Arc::new(Self {
            runtime,
            schema,
            info,
        })
    }
}

#[derive(Clone, Copy)]
enum Pass {
    Forward,
    Backward,
}

impl ExpertServer {
    /// A server for the experts of `runtime`, each described by its schema. (A uid the runtime does not
    /// serve is accepted here, and its requests get the runtime's unknown-expert error; use
    /// [`Self::empty`] and [`Self::attach`] to have it refused.)
    pub fn new(runtime: RuntimeHandle, schemas: HashMap<String, ExpertSchema>) -> Arc<Self> {
        let experts = schemas
            .into_iter()
            .map(|(uid, schema)| (uid, Hosted::new(runtime.clone(), schema)))
            .collect();
        Arc::new(Self {
            experts: RwLock::new(experts),
        })
    }

    /// A server hosting no experts yet; see [`Self::attach`].
    pub fn empty() -> Arc<Self> {
        Arc::new(Self {
            experts: RwLock::new(HashMap::new()),
        })
    }

    /// Starts hosting the experts of `schemas` (uid → schema), each computed by `runtime`; they are served
    /// from the next request on.
    ///
    /// All or nothing: fails with [`ExpertError::UnknownExpert`] if `runtime` does not serve a uid, or
    /// [`ExpertError::BadConfig`] ("… is already hosted …") if a uid is hosted already (by any runtime),
    /// and then hosts none of them.
    pub fn attach(
        &self,
        runtime: RuntimeHandle,
        schemas: HashMap<String, ExpertSchema>,
    ) -> Result<(), ExpertError> {
        let served = runtime.uids();
        let mut hosted: Vec<(String, Arc<Hosted>)> = schemas
            .into_iter()
            .map(|(uid, schema)| (uid, Hosted::new(runtime.clone(), schema)))
            .collect();
        hosted.sort_by(|a, b| a.0.cmp(&b.0)); // a deterministic error for several bad uids
        if let Some((uid, _)) = hosted.iter().find(|(uid, _)| !served.contains(uid)) {
            return Err(ExpertError::UnknownExpert(uid.clone()));
        }
        let mut experts = self.write();
        if let Some((uid, _)) = hosted.iter().find(|(uid, _)| experts.contains_key(uid)) {
            return Err(already_hosted(uid));
        }
        experts.extend(hosted);
        Ok(())
    }

    /// Stops hosting `uids` at once: later requests for them get the unknown-expert error, while requests
    /// already in flight finish. Returns the uids that were hosted, in the order given; the others are
    /// ignored. The runtimes are not shut down (the server drops its handles once their last request
    /// ends).
    pub fn detach(&self, uids: &[String]) -> Vec<String> {
        let mut experts = self.write();
        uids.iter()
            .filter(|uid| experts.remove(uid.as_str()).is_some())
            .cloned()
            .collect()
    }

    /// The hosted expert uids, sorted.
    pub fn uids(&self) -> Vec<String> {
        let mut uids: Vec<String> = self.read().keys().cloned().collect();
        uids.sort();
        uids
    }

    // Nothing that can panic runs while the lock is held (updates follow all checks), so a poisoned lock
    // still holds a consistent map and is used as it is.
    fn read(&self) -> RwLockReadGuard<'_, HashMap<String, Arc<Hosted>>> {
        self.experts.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self) -> RwLockWriteGuard<'_, HashMap<String, Arc<Hosted>>> {
        self.experts.write().unwrap_or_else(PoisonError::into_inner)
    }

    /// Registers the five `ConnectionHandler.rpc_*` handlers on `p2p`.
    pub fn register(self: &Arc<Self>, p2p: &P2pHandle) -> Result<(), InvalidName> {
        let this = self.clone();
        let info: UnaryHandler = Arc::new(move |_peer, bytes: Bytes| {
            let this = this.clone();
            async move { this.info(&bytes) }.boxed()
        });
        p2p.add_unary_handler(RPC_INFO, info)?;
        for (name, pass) in [(RPC_FORWARD, Pass::Forward), (RPC_BACKWARD, Pass::Backward)] {
            let this = self.clone();
            let handler: UnaryHandler = Arc::new(move |_peer, bytes: Bytes| {
                let this = this.clone();
                async move { this.unary(pass, bytes).await }.boxed()
            });
            p2p.add_unary_handler(name, handler)?;
        }
        for (name, pass) in [
            (RPC_FORWARD_STREAM, Pass::Forward),
            (RPC_BACKWARD_STREAM, Pass::Backward),
        ] {
            let this = self.clone();
            let handler: StreamHandler = Arc::new(move |_peer, requests| {
                let this = this.clone();
                async move {
                    match this.stream(pass, requests).await {
                        Ok(parts) => futures::stream::iter(parts.into_iter().map(Ok)).boxed(),
                        Err(e) => futures::stream::once(async move { Err(e) }).boxed(),
                    }
                }
                .flatten_stream()
                .boxed()
            });
            p2p.add_stream_handler(name, handler)?;
        }
        Ok(())
    }

    /// Stops serving the RPCs on `p2p`.
    pub fn unregister(p2p: &P2pHandle) {
        for name in [
            RPC_INFO,
            RPC_FORWARD,
            RPC_BACKWARD,
            RPC_FORWARD_STREAM,
            RPC_BACKWARD_STREAM,
        ] {
            p2p.remove_handler(name);
        }
    }

    /// The hosted expert `uid`, or the unknown-expert error text. The lock is released on return, so the
    /// caller may hold the `Arc` across awaits.
    fn hosted(&self, uid: &str) -> Result<Arc<Hosted>, String> {
        self.read()
            .get(uid)
            .cloned()
            .ok_or_else(|| ExpertError::UnknownExpert(uid.to_owned()).to_string())
    }

    fn info(&self, bytes: &[u8]) -> Result<Bytes, String> {
        let request = ExpertUid::decode(bytes).map_err(|e| format!("malformed ExpertUID: {e}"))?;
        let hosted = self.hosted(&request.uid)?;
        Ok(Bytes::from(
            ExpertInfo {
                serialized_info: hosted.info.clone(),
            }
            .encode_to_vec(),
        ))
    }

    async fn unary(&self, pass: Pass, bytes: Bytes) -> Result<Bytes, String> {
        let request = ExpertRequest::decode(bytes).map_err(|e| format!("malformed ExpertRequest: {e}"))?;
        let hosted = self.hosted(&request.uid)?;
        let limits = limits_for(&hosted.schema);
        let tensors = request
            .tensors
            .iter()
            .map(|t| tensor::deserialize(t, &limits).map_err(|e| format!("bad tensor: {e}")))
            .collect::<Result<Vec<_>, _>>()?;
        let outputs = compute(pass, &request.uid, &hosted, tensors).await?;
        Ok(Bytes::from(
            ExpertResponse {
                tensors: outputs,
                ..Default::default()
            }
            .encode_to_vec(),
        ))
    }

    async fn stream(
        &self,
        pass: Pass,
        mut requests: futures::stream::BoxStream<'static, Bytes>,
    ) -> Result<Vec<Bytes>, String> {
        // the expert, looked up at the first message and kept to the end
        let mut current: Option<(String, Arc<Hosted>, StreamCombiner)> = None;
        let mut tensors = Vec::new();
        while let Some(bytes) = requests.next().await {
            let request =
                ExpertRequest::decode(bytes).map_err(|e| format!("malformed ExpertRequest: {e}"))?;
            let (uid, hosted, combiner) = match &mut current {
                None => {
                    let hosted = self.hosted(&request.uid)?;
                    let combiner = StreamCombiner::new(limits_for(&hosted.schema));
                    current.insert((request.uid.clone(), hosted, combiner))
                }
                Some(c) => c,
            };
            if *uid != request.uid {
                return Err("Expert uids differ in one request".into());
            }
            let schema = &hosted.schema;
            for part in request.tensors {
                if let Some(whole) = combiner
                    .push(part)
                    .map_err(|e| format!("bad tensor stream: {e}"))?
                {
                    if tensors.len() > schema.inputs.len() {
                        return Err("too many tensors in the request".into());
                    }
                    tensors.push(
                        tensor::deserialize(&whole, &limits_for(schema))
                            .map_err(|e| format!("bad tensor: {e}"))?,
                    );
                }
            }
        }
        let (uid, hosted, combiner) = current.ok_or("empty request stream")?;
        combiner.finish().map_err(|e| format!("bad tensor stream: {e}"))?;
        let outputs = compute(pass, &uid, &hosted, tensors).await?;
        let mut messages = Vec::new();
        let chunk = NonZeroUsize::new(STREAM_CHUNK).ok_or("zero chunk")?;
        for output in &outputs {
            for part in tensor::split_for_streaming(output, chunk).map_err(|e| e.to_string())? {
                messages.push(Bytes::from(
                    ExpertResponse {
                        tensors: vec![part],
                        ..Default::default()
                    }
                    .encode_to_vec(),
                ));
            }
        }
        Ok(messages)
    }
}

/// Checks `tensors` against the expert's schema, computes the pass on its runtime, and serializes the
/// results as the schema declares.
async fn compute(
    pass: Pass,
    uid: &str,
    hosted: &Hosted,
    tensors: Vec<WireTensor>,
) -> Result<Vec<apiary_wire::proto::runtime::Tensor>, String> {
    let schema = &hosted.schema;
    let text = |e: ExpertError| e.to_string();
    let (results, specs): (
        Vec<candle_core::Tensor>,
        Vec<(apiary_wire::tensor::DType, CompressionType)>,
    ) = match pass {
        Pass::Forward => {
            schema.check_forward(&tensors).map_err(text)?;
            let inputs = tensors
                .iter()
                .map(to_candle)
                .collect::<Result<Vec<_>, _>>()
                .map_err(text)?;
            let out = hosted.runtime.forward(uid, inputs).await.map_err(text)?;
            (out, vec![(schema.output.dtype, schema.output.compression)])
        }
        Pass::Backward => {
            schema.check_backward(&tensors).map_err(text)?;
            let mut all = tensors
                .iter()
                .map(to_candle)
                .collect::<Result<Vec<_>, _>>()
                .map_err(text)?;
            let grad_outputs = all.split_off(schema.inputs.len());
            let grads = hosted
                .runtime
                .backward(uid, all, grad_outputs)
                .await
                .map_err(text)?;
            let specs = schema.inputs.iter().map(|s| (s.dtype, s.compression)).collect();
            (grads, specs)
        }
    };
    if results.len() != specs.len() {
        return Err(format!(
            "the expert returned {} tensors, expected {}",
            results.len(),
            specs.len()
        ));
    }
    results
        .iter()
        .zip(specs)
        .map(|(t, (dtype, compression))| {
            let wire = from_candle(t, dtype).map_err(text)?;
            tensor::serialize(&wire, compression).map_err(|e| e.to_string())
        })
        .collect()
}

/// The refusal of [`ExpertServer::attach`] for a uid that is hosted already.
fn already_hosted(uid: &str) -> ExpertError {
    ExpertError::BadConfig(format!(
        "expert {uid:?} is already hosted by this expert server; detach it first"
    ))
}

/// Decoding limits for one request tensor of `schema`: its largest tensor at the largest batch.
fn limits_for(schema: &ExpertSchema) -> Limits {
    let per_row = schema
        .inputs
        .iter()
        .chain([&schema.output])
        .map(|s| s.trailing.iter().product::<usize>())
        .max()
        .unwrap_or(1)
        .max(1);
    let elements = per_row.saturating_mul(schema.max_batch_size.max(1));
    Limits::default()
        .with_max_dims(8)
        .with_max_elements(elements)
        .with_max_bytes(elements.saturating_mul(8))
}

/// hivemind's `declare_experts` records for `uids` hosted by `peer` (base58): `uid → peer`, and for every
/// proper prefix `prefix[coord] → (uid, peer)` (1-D uids under coordinate −1, hivemind's `FLAT_EXPERT`).
/// As in hivemind's dictionary of records, a `(prefix, coord)` that several uids share (grids of three or
/// more dimensions) is stored once, naming the last of them.
pub fn declarations(uids: &[String], peer: &str, expiration: f64) -> Vec<StoreEntry> {
    let mut out: Vec<StoreEntry> = Vec::new();
    let mut at: std::collections::HashMap<(String, i64), usize> = std::collections::HashMap::new();
    for uid in uids {
        out.push(StoreEntry {
            key: Value::str(uid.as_str()),
            subkey: None,
            value: Value::str(peer),
            expiration,
        });
        let mut prefix = if uid.matches('.').count() > 1 {
            uid.clone()
        } else {
            format!("{uid}.-1")
        };
        for _ in 0..prefix.matches('.').count().saturating_sub(1) {
            let Some((head, coord)) = split_uid(&prefix) else {
                break;
            };
            let entry = StoreEntry {
                key: Value::str(head.as_str()),
                subkey: Some(Value::from(coord)),
                value: Value::Tuple(vec![Value::str(uid.as_str()), Value::str(peer)]),
                expiration,
            };
            match at.entry((head.clone(), coord)) {
                std::collections::hash_map::Entry::Occupied(i) => out[*i.get()] = entry,
                std::collections::hash_map::Entry::Vacant(v) => {
                    v.insert(out.len());
                    out.push(entry);
                }
            }
            prefix = head;
        }
    }
    out
}

/// hivemind's `split_uid`: `"ffn.1.2"` (or `"ffn.1.2."`) → `("ffn.1.", 2)`.
fn split_uid(uid_or_prefix: &str) -> Option<(String, i64)> {
    let s = uid_or_prefix.trim_end_matches('.');
    let pivot = s.rfind('.')? + 1;
    Some((s[..pivot].to_owned(), s[pivot..].parse().ok()?))
}

/// hivemind's `DHTHandlerThread`: declares `uids` now and every `update_period` with
/// `expiration = now + expiration`; [`Declarer::pause`] withdraws the declarations until
/// [`Declarer::resume`], [`Declarer::withdraw`] for good.
///
/// A withdrawal overwrites every record with an empty value that outlives the last declaration (see
/// [`Refresher`]): trainers that read the DHT after it stop routing here at once.
#[derive(Debug)]
pub struct Declarer {
    refresher: Refresher,
}

impl Declarer {
    /// Starts declaring; the first round is stored before this returns (its success count is returned too).
    pub async fn start(
        dht: DhtHandle,
        uids: Vec<String>,
        update_period: Duration,
        expiration: Duration,
    ) -> (Self, usize) {
        let peer = dht.peer_id().to_base58();
        let records = declarations(&uids, &peer, 0.0)
            .into_iter()
            .map(|e| KeptRecord {
                key: e.key,
                subkey: e.subkey,
                value: e.value,
            })
            .collect();
        let (refresher, stored) = Refresher::start(dht, records, update_period, expiration).await;
        (Self { refresher }, stored)
    }

    /// Withdraws the declarations and stops refreshing them until [`Declarer::resume`] (e.g. while the
    /// volunteer's PC is in use and the runtime's gate is closed).
    pub async fn pause(&self) {
        self.refresher.pause().await;
    }

    /// Declares again at once and goes on refreshing.
    pub async fn resume(&self) -> usize {
        self.refresher.resume().await
    }

    /// Stops refreshing and withdraws the declarations for good.
    pub async fn withdraw(self) {
        self.refresher.withdraw().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn declarations_follow_hivemind() {
        let d = declarations(&["ffn.1.2.3".into(), "ffn.5".into()], "QmPeer", 100.0);
        let keys: Vec<(String, Option<Value>, Value)> = d
            .into_iter()
            .map(|e| {
                assert_eq!(e.expiration, 100.0);
                (format!("{:?}", e.key), e.subkey, e.value)
            })
            .collect();
        let pair = |uid: &str| Value::Tuple(vec![Value::str(uid), Value::str("QmPeer")]);
        assert_eq!(
            keys,
            vec![
                (
                    format!("{:?}", Value::str("ffn.1.2.3")),
                    None,
                    Value::str("QmPeer")
                ),
                (
                    format!("{:?}", Value::str("ffn.1.2.")),
                    Some(Value::from(3)),
                    pair("ffn.1.2.3")
                ),
                (
                    format!("{:?}", Value::str("ffn.1.")),
                    Some(Value::from(2)),
                    pair("ffn.1.2.3")
                ),
                (format!("{:?}", Value::str("ffn.5")), None, Value::str("QmPeer")),
                (
                    format!("{:?}", Value::str("ffn.5.")),
                    Some(Value::from(-1)),
                    pair("ffn.5")
                ),
            ]
        );
        assert_eq!(split_uid("ffn.1.2."), Some(("ffn.1.".into(), 2)));
        assert_eq!(split_uid("nodots"), None);
    }

    fn nop_runtime(uids: &[&str]) -> RuntimeHandle {
        use crate::runtime::{Runtime, RuntimeConfig};
        use crate::{BackendConfig, Expert, ExpertBackend, ExpertConfig, ExpertKind};
        let experts = uids
            .iter()
            .map(|uid| {
                let expert = Expert::new(ExpertConfig::new(ExpertKind::Nop, 4), 0).unwrap();
                (
                    (*uid).to_owned(),
                    ExpertBackend::new(expert, BackendConfig::default()).unwrap(),
                )
            })
            .collect();
        Runtime::spawn(experts, RuntimeConfig::default()).unwrap()
    }

    fn schemas(uids: &[&str]) -> HashMap<String, ExpertSchema> {
        use crate::ExpertKind;
        uids.iter()
            .map(|uid| {
                let schema = ExpertSchema::server_create(ExpertKind::Nop, 4, CompressionType::None, 8);
                ((*uid).to_owned(), schema)
            })
            .collect()
    }

    /// `attach` is all or nothing: a uid hosted already, or one the runtime does not serve, refuses the
    /// whole set; `detach` reports what was hosted.
    #[test]
    fn attach_refuses_duplicates_and_foreign_uids() {
        let server = ExpertServer::empty();
        assert!(server.uids().is_empty());
        let a = nop_runtime(&["a.0", "a.1"]);
        server.attach(a.clone(), schemas(&["a.0", "a.1"])).unwrap();
        assert_eq!(server.uids(), ["a.0", "a.1"]);

        let b = nop_runtime(&["b.0", "a.1"]);
        let err = server.attach(b.clone(), schemas(&["b.0", "a.1"])).unwrap_err();
        assert!(
            matches!(&err, ExpertError::BadConfig(m) if m.contains("\"a.1\" is already hosted")),
            "{err}"
        );
        assert_eq!(server.uids(), ["a.0", "a.1"], "nothing attached");

        let err = server.attach(b.clone(), schemas(&["b.0", "b.9"])).unwrap_err();
        assert!(
            matches!(&err, ExpertError::UnknownExpert(u) if u == "b.9"),
            "{err}"
        );
        assert_eq!(server.uids(), ["a.0", "a.1"], "nothing attached");

        // an empty set attaches nothing and succeeds
        server.attach(b.clone(), HashMap::new()).unwrap();
        server.attach(b, schemas(&["b.0"])).unwrap();
        assert_eq!(server.uids(), ["a.0", "a.1", "b.0"]);

        let gone = server.detach(&["a.1".into(), "x.0".into(), "a.0".into(), "a.1".into()]);
        assert_eq!(gone, ["a.1", "a.0"]);
        assert_eq!(server.uids(), ["b.0"]);
        // a detached uid may be attached again (here from the same runtime)
        server.attach(a, schemas(&["a.0"])).unwrap();
        assert_eq!(server.uids(), ["a.0", "b.0"]);
        assert_eq!(
            server.hosted("a.1").unwrap_err(),
            ExpertError::UnknownExpert("a.1".into()).to_string()
        );
    }

    /// In a 3-D grid `ffn.1.2.` is the prefix of both `ffn.1.2.3` and `ffn.1.2.4`, and `ffn.1.[2]` is
    /// shared too: each record is stored once, naming the last uid, as hivemind's dictionary keeps it.
    #[test]
    fn shared_prefix_records_are_stored_once() {
        let d = declarations(&["ffn.1.2.3".into(), "ffn.1.2.4".into()], "QmPeer", 1.0);
        let shared: Vec<&StoreEntry> = d
            .iter()
            .filter(|e| e.key == Value::str("ffn.1.") && e.subkey == Some(Value::from(2)))
            .collect();
        assert_eq!(shared.len(), 1);
        assert_eq!(
            shared[0].value,
            Value::Tuple(vec![Value::str("ffn.1.2.4"), Value::str("QmPeer")])
        );
        // 2 uid records + 2 sub-keys of `ffn.1.2.` + 1 of `ffn.1.`
        assert_eq!(d.len(), 5);
    }
}
