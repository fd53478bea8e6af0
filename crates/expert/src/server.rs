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
use std::sync::Arc;
use std::time::Duration;

use apiary_dht::{DhtHandle, StoreEntry, get_dht_time};
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

/// Serves experts' RPCs from a [`RuntimeHandle`].
#[derive(Debug)]
pub struct ExpertServer {
    runtime: RuntimeHandle,
    schemas: HashMap<String, ExpertSchema>,
    infos: HashMap<String, Bytes>,
}

#[derive(Clone, Copy)]
enum Pass {
    Forward,
    Backward,
}

impl ExpertServer {
    /// A server for the experts of `runtime`, each described by its schema.
    pub fn new(runtime: RuntimeHandle, schemas: HashMap<String, ExpertSchema>) -> Arc<Self> {
        let infos = schemas
            .iter()
            .map(|(uid, s)| (uid.clone(), Bytes::from(s.rpc_info())))
            .collect();
        Arc::new(Self {
            runtime,
            schemas,
            infos,
        })
    }

    /// The hosted expert uids, sorted.
    pub fn uids(&self) -> Vec<String> {
        let mut uids: Vec<String> = self.schemas.keys().cloned().collect();
        uids.sort();
        uids
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

    fn schema(&self, uid: &str) -> Result<&ExpertSchema, String> {
        self.schemas
            .get(uid)
            .ok_or_else(|| ExpertError::UnknownExpert(uid.to_owned()).to_string())
    }

    fn info(&self, bytes: &[u8]) -> Result<Bytes, String> {
        let request = ExpertUid::decode(bytes).map_err(|e| format!("malformed ExpertUID: {e}"))?;
        let info = self
            .infos
            .get(&request.uid)
            .ok_or_else(|| ExpertError::UnknownExpert(request.uid.clone()).to_string())?;
        Ok(Bytes::from(
            ExpertInfo {
                serialized_info: info.clone(),
            }
            .encode_to_vec(),
        ))
    }

    async fn unary(&self, pass: Pass, bytes: Bytes) -> Result<Bytes, String> {
        let request = ExpertRequest::decode(bytes).map_err(|e| format!("malformed ExpertRequest: {e}"))?;
        let schema = self.schema(&request.uid)?;
        let limits = limits_for(schema);
        let tensors = request
            .tensors
            .iter()
            .map(|t| tensor::deserialize(t, &limits).map_err(|e| format!("bad tensor: {e}")))
            .collect::<Result<Vec<_>, _>>()?;
        let outputs = self.compute(pass, &request.uid, schema, tensors).await?;
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
        let mut uid: Option<String> = None;
        let mut combiner: Option<StreamCombiner> = None;
        let mut tensors = Vec::new();
        while let Some(bytes) = requests.next().await {
            let request =
                ExpertRequest::decode(bytes).map_err(|e| format!("malformed ExpertRequest: {e}"))?;
            let schema = match &uid {
                None => {
                    let schema = self.schema(&request.uid)?;
                    uid = Some(request.uid.clone());
                    combiner = Some(StreamCombiner::new(limits_for(schema)));
                    schema
                }
                Some(u) if *u != request.uid => return Err("Expert uids differ in one request".into()),
                Some(u) => self.schema(u)?,
            };
            let combiner = combiner.as_mut().ok_or("no stream state")?;
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
        let uid = uid.ok_or("empty request stream")?;
        if let Some(c) = combiner {
            c.finish().map_err(|e| format!("bad tensor stream: {e}"))?;
        }
        let schema = self.schema(&uid)?;
        let outputs = self.compute(pass, &uid, schema, tensors).await?;
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

    async fn compute(
        &self,
        pass: Pass,
        uid: &str,
        schema: &ExpertSchema,
        tensors: Vec<WireTensor>,
    ) -> Result<Vec<apiary_wire::proto::runtime::Tensor>, String> {
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
                let out = self.runtime.forward(uid, inputs).await.map_err(text)?;
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
                let grads = self
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
/// A withdrawal overwrites every record with an empty value that outlives the last declaration: DHT nodes
/// refuse a store whose expiration is earlier than the one they hold, so "expire it now" has to be a newer
/// record. Trainers that read the DHT after it stop routing here at once.
#[derive(Debug)]
pub struct Declarer {
    shared: Arc<DeclarerShared>,
    task: tokio::task::JoinHandle<()>,
}

#[derive(Debug)]
struct DeclarerShared {
    dht: DhtHandle,
    uids: Vec<String>,
    peer: String,
    expiration: Duration,
    /// Serializes declaring and withdrawing, so a late re-declaration never lands after a withdrawal.
    state: tokio::sync::Mutex<DeclareState>,
}

#[derive(Debug, Default)]
struct DeclareState {
    /// The expiration of the newest record written (declaration or withdrawal).
    until: f64,
    withdrawn: bool,
}

impl DeclarerShared {
    /// Declares now (unless withdrawn); returns how many records were stored.
    async fn declare(&self, force: bool) -> usize {
        let mut state = self.state.lock().await;
        if state.withdrawn && !force {
            return 0;
        }
        // never below a withdrawal's expiration, or nodes would refuse the new declaration
        let exp = (get_dht_time() + self.expiration.as_secs_f64()).max(state.until + 1.0);
        let entries = declarations(&self.uids, &self.peer, exp);
        let ok = self.dht.store_many(entries, false).await.unwrap_or_default();
        state.until = exp;
        state.withdrawn = false;
        ok.iter().filter(|o| **o).count()
    }

    async fn withdraw(&self) {
        let mut state = self.state.lock().await;
        if state.withdrawn {
            return;
        }
        let exp = state.until + 1.0;
        let entries: Vec<StoreEntry> = declarations(&self.uids, &self.peer, exp)
            .into_iter()
            .map(|e| StoreEntry {
                value: Value::Nil,
                ..e
            })
            .collect();
        if let Err(e) = self.dht.store_many(entries, false).await {
            tracing::warn!(error = %e, "could not withdraw the expert declarations");
        }
        state.until = exp;
        state.withdrawn = true;
    }
}

impl Declarer {
    /// Starts declaring; the first round is stored before this returns (its success count is returned too).
    pub async fn start(
        dht: DhtHandle,
        uids: Vec<String>,
        update_period: Duration,
        expiration: Duration,
    ) -> (Self, usize) {
        let shared = Arc::new(DeclarerShared {
            peer: dht.peer_id().to_base58(),
            dht,
            uids,
            expiration,
            state: tokio::sync::Mutex::new(DeclareState::default()),
        });
        let stored = shared.declare(true).await;
        let weak = Arc::downgrade(&shared);
        let task = tokio::spawn(async move {
            loop {
                tokio::time::sleep(update_period).await;
                let Some(shared) = weak.upgrade() else { return };
                let stored = shared.declare(false).await;
                tracing::debug!(stored, "re-declared experts");
            }
        });
        (Self { shared, task }, stored)
    }

    /// Withdraws the declarations and stops refreshing them until [`Declarer::resume`] (e.g. while the
    /// volunteer's PC is in use and the runtime's gate is closed).
    pub async fn pause(&self) {
        self.shared.withdraw().await;
    }

    /// Declares again at once and goes on refreshing.
    pub async fn resume(&self) -> usize {
        self.shared.declare(true).await
    }

    /// Stops refreshing and withdraws the declarations for good.
    pub async fn withdraw(self) {
        self.task.abort();
        self.shared.withdraw().await;
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
