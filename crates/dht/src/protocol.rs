//! hivemind's `DHTProtocol` (`hivemind/dht/protocol.py`) as pure logic.
//!
//! Server side: [`ProtocolState`] answers `rpc_ping`, `rpc_store` and `rpc_find` given the sender's
//! `PeerId`, the decoded request and the time, and tells the caller what hivemind would do next
//! asynchronously ([`ProtocolState::update_routing_table`]: keys to hand off to a newly met node, a
//! least-recently-seen node to ping). The caller owns the network: it pings back when a ping asks to be
//! validated, sends the hand-off `StoreRequest`, and so on.
//!
//! Client side: [`build_store_request`], [`build_find_request`] and [`parse_find_response`] /
//! [`parse_store_response`], which check every length and decode every value from the peer and return
//! [`ResponseError`] instead of panicking.

use apiary_wire::dhtid::DhtId;
use apiary_wire::msgpack::{self, DictionaryDhtValue, Value};
use apiary_wire::proto::dht::{
    FindRequest, FindResponse, FindResult, NodeInfo, PingRequest, PingResponse, ResultType, StoreRequest,
    StoreResponse,
};
use apiary_wire::signature::{DhtRecord, IS_DICTIONARY, IS_REGULAR_VALUE};
use bytes::Bytes;
use libp2p_identity::PeerId;

use crate::DhtExpiration;
use crate::routing::RoutingTable;
use crate::storage::{DhtLocalStorage, StoredValue, ValueWithExpiration};
use crate::validation::{CompositeValidator, ValidatorError};

/// Most nearest peers accepted per key in a `FindResult` (hivemind sends `bucket_size`, 20).
pub const MAX_NEAREST_PER_RESULT: usize = 256;

/// A request this node cannot serve; hivemind raises, so the caller answers with an RPC error.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RequestError {
    /// The parallel arrays of a `StoreRequest` differ in length.
    #[error(
        "store request is not aligned: {keys} keys, {values} values, {expirations} expirations, {in_cache} in_cache"
    )]
    NotAligned {
        /// `keys.len()`
        keys: usize,
        /// `values.len()`
        values: usize,
        /// `expiration_time.len()`
        expirations: usize,
        /// `in_cache.len()`
        in_cache: usize,
    },
    /// A key or node id is not 20 bytes.
    #[error("malformed DHT id ({len} bytes)")]
    BadId {
        /// Its length.
        len: usize,
    },
    /// A sub-key or dictionary value is not valid msgpack of the expected kind.
    #[error("malformed value: {0}")]
    BadValue(&'static str),
    /// A validator raised.
    #[error(transparent)]
    Validator(#[from] ValidatorError),
}

/// A peer's response that cannot be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ResponseError {
    /// Not one result per key asked.
    #[error("expected {expected} results, got {got}")]
    WrongResultCount {
        /// Keys asked.
        expected: usize,
        /// Results received.
        got: usize,
    },
    /// `nearest_node_ids` and `nearest_peer_ids` differ in length, or are too long.
    #[error("bad nearest-peer arrays: {node_ids} node ids, {peer_ids} peer ids")]
    BadNearest {
        /// `nearest_node_ids.len()`
        node_ids: usize,
        /// `nearest_peer_ids.len()`
        peer_ids: usize,
    },
    /// A node id is not 20 bytes.
    #[error("malformed node id ({len} bytes)")]
    BadNodeId {
        /// Its length.
        len: usize,
    },
    /// A peer id does not parse.
    #[error("malformed peer id")]
    BadPeerId,
    /// A `FOUND_DICTIONARY` value is not a msgpack `DictionaryDHTValue`.
    #[error("malformed dictionary value")]
    BadDictionary,
    /// An unknown `ResultType`.
    #[error("unknown result type {0}")]
    UnknownResultType(i32),
    /// A validator raised.
    #[error(transparent)]
    Validator(#[from] ValidatorError),
}

fn dht_id(bytes: &[u8]) -> Result<DhtId, RequestError> {
    DhtId::from_bytes(bytes).map_err(|_| RequestError::BadId { len: bytes.len() })
}

/// The sender's node id from a request's `NodeInfo`, if it asked to be added (`None` for clients).
pub fn sender_node_id(peer: Option<&NodeInfo>) -> Result<Option<DhtId>, RequestError> {
    match peer {
        Some(info) if !info.node_id.is_empty() => dht_id(&info.node_id).map(Some),
        _ => Ok(None),
    }
}

/// A node that contacted us and should go into the routing table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IncomingPeer {
    /// Its DHT node id.
    pub node_id: DhtId,
    /// Its libp2p peer id.
    pub peer_id: PeerId,
}

/// What a ping needs from the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PingFollowUp {
    /// Nothing (a client pinged, or nobody asked to be added).
    None,
    /// Call [`ProtocolState::update_routing_table`] with `responded = true`.
    AddToRoutingTable(IncomingPeer),
    /// The sender asked to be validated: ping it back (`validate = false`); set `response.available` iff
    /// it answers with this node id, then update the routing table with `responded = available`.
    PingBack(IncomingPeer),
}

/// Follow-up work from [`ProtocolState::update_routing_table`].
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RoutingUpdate {
    /// Keys the new node should store (`call_store(peer, …, in_cache=False)`).
    pub hand_off: Option<(PeerId, StoreRequest)>,
    /// A least-recently-seen node to ping (`call_ping(peer)`); if it does not answer it is removed.
    pub ping: Option<(DhtId, PeerId)>,
}

/// The state behind one node's `DHTProtocol`: routing table, storage and cache.
#[derive(Debug)]
pub struct ProtocolState {
    /// This node's id.
    pub node_id: DhtId,
    /// Client mode: `NodeInfo` goes out empty so that peers do not add us.
    pub client_mode: bool,
    /// `k`, how many nearest peers `rpc_find` returns.
    pub bucket_size: usize,
    /// How many nearest nodes decide key hand-off to new nodes.
    pub num_replicas: usize,
    /// The routing table.
    pub routing_table: RoutingTable,
    /// Values this node is responsible for.
    pub storage: DhtLocalStorage,
    /// Values cached for others (possibly bounded).
    pub cache: DhtLocalStorage,
    /// Record validator; `None` accepts everything.
    pub validator: Option<CompositeValidator>,
}

impl ProtocolState {
    /// A fresh state with an empty table, storage and cache (`cache_size` bounds the cache).
    pub fn new(
        node_id: DhtId,
        bucket_size: usize,
        depth_modulo: u32,
        num_replicas: usize,
        cache_size: Option<usize>,
        client_mode: bool,
        validator: Option<CompositeValidator>,
    ) -> Self {
        ProtocolState {
            node_id,
            client_mode,
            bucket_size,
            num_replicas,
            routing_table: RoutingTable::new(node_id, bucket_size, depth_modulo),
            storage: DhtLocalStorage::new(None),
            cache: DhtLocalStorage::new(cache_size),
            validator,
        }
    }

    /// The `NodeInfo` this node sends: its id, or empty in client mode.
    pub fn node_info(&self) -> NodeInfo {
        if self.client_mode {
            NodeInfo::default()
        } else {
            NodeInfo {
                node_id: Bytes::copy_from_slice(self.node_id.as_bytes()),
            }
        }
    }

    fn validate(&self, record: &DhtRecord) -> Result<bool, ValidatorError> {
        match &self.validator {
            None => Ok(true),
            Some(v) => v.validate(record),
        }
    }

    fn validate_dictionary(&self, key: &[u8], d: &DictionaryDhtValue) -> Result<bool, ValidatorError> {
        if self.validator.is_none() {
            return Ok(true);
        }
        for e in d.iter() {
            let record = DhtRecord {
                key: key.to_vec(),
                subkey: msgpack::encode(&e.subkey),
                value: e.value.clone(),
                expiration_time: e.expiration_time.as_f64(),
            };
            if !self.validate(&record)? {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// `rpc_ping`. With [`PingFollowUp::PingBack`] the caller sets `available` before replying.
    pub fn rpc_ping(
        &self,
        sender: PeerId,
        request: &PingRequest,
        now: DhtExpiration,
    ) -> Result<(PingResponse, PingFollowUp), RequestError> {
        let response = PingResponse {
            auth: None,
            peer: Some(self.node_info()),
            dht_time: now,
            available: false,
        };
        let follow_up = match sender_node_id(request.peer.as_ref())? {
            None => PingFollowUp::None,
            Some(node_id) => {
                let incoming = IncomingPeer {
                    node_id,
                    peer_id: sender,
                };
                if request.validate {
                    PingFollowUp::PingBack(incoming)
                } else {
                    PingFollowUp::AddToRoutingTable(incoming)
                }
            }
        };
        Ok((response, follow_up))
    }

    /// `rpc_store`: the response, and the sender to add to the routing table (`responded = true`).
    pub fn rpc_store(
        &mut self,
        sender: PeerId,
        request: &StoreRequest,
        now: DhtExpiration,
    ) -> Result<(StoreResponse, Option<IncomingPeer>), RequestError> {
        let incoming = sender_node_id(request.peer.as_ref())?.map(|node_id| IncomingPeer {
            node_id,
            peer_id: sender,
        });
        let (keys, values, exps, in_cache) = (
            &request.keys,
            &request.values,
            &request.expiration_time,
            &request.in_cache,
        );
        if !(keys.len() == values.len() && values.len() == exps.len() && exps.len() == in_cache.len()) {
            return Err(RequestError::NotAligned {
                keys: keys.len(),
                values: values.len(),
                expirations: exps.len(),
                in_cache: in_cache.len(),
            });
        }
        // hivemind zips with `subkeys` too, so a short `subkeys` truncates the batch
        let n = keys.len().min(request.subkeys.len());
        let mut store_ok = Vec::with_capacity(n);
        for i in 0..n {
            let (key, tag, value, exp, cached) =
                (&keys[i], &request.subkeys[i], &values[i], exps[i], in_cache[i]);
            let key_id = dht_id(key)?;
            if tag.as_ref() == IS_DICTIONARY {
                let Ok(Value::DictionaryDhtValue(mut d)) = msgpack::decode(value) else {
                    return Err(RequestError::BadValue("expected a DictionaryDHTValue"));
                };
                if !self.validate_dictionary(key, &d)? {
                    store_ok.push(false);
                    continue;
                }
                d.remove_outdated(now);
                let storage = if cached {
                    &mut self.cache
                } else {
                    &mut self.storage
                };
                // `all(...)`: stops at the first rejected sub-key
                let ok = d.into_entries().into_iter().all(|e| {
                    storage.store_subkey(key_id, e.subkey, e.value, e.expiration_time.as_f64(), now)
                });
                store_ok.push(ok);
                continue;
            }
            let record = DhtRecord {
                key: key.to_vec(),
                subkey: tag.to_vec(),
                value: value.to_vec(),
                expiration_time: exp,
            };
            if !self.validate(&record)? {
                store_ok.push(false);
                continue;
            }
            let storage = if cached {
                &mut self.cache
            } else {
                &mut self.storage
            };
            if tag.as_ref() == IS_REGULAR_VALUE {
                store_ok.push(storage.store(key_id, value.to_vec(), exp, None, now));
            } else {
                let subkey =
                    msgpack::decode(tag).map_err(|_| RequestError::BadValue("sub-key is not msgpack"))?;
                store_ok.push(storage.store_subkey(key_id, subkey, value.to_vec(), exp, now));
            }
        }
        let response = StoreResponse {
            auth: None,
            store_ok,
            peer: Some(self.node_info()),
        };
        Ok((response, incoming))
    }

    /// `rpc_find`: for each key, the later of storage and cache, and the `bucket_size` nearest known
    /// nodes except the requester (hivemind excludes `DHTID.from_bytes(request.peer.node_id)`, which
    /// is id 0 for clients).
    pub fn rpc_find(
        &mut self,
        sender: PeerId,
        request: &FindRequest,
        now: DhtExpiration,
    ) -> Result<(FindResponse, Option<IncomingPeer>), RequestError> {
        let sender_id = sender_node_id(request.peer.as_ref())?;
        let incoming = sender_id.map(|node_id| IncomingPeer {
            node_id,
            peer_id: sender,
        });
        let exclude = sender_id.unwrap_or(DhtId::MIN);
        let mut results = Vec::with_capacity(request.keys.len());
        for key in &request.keys {
            let key_id = dht_id(key)?;
            let mut item = self.storage.get(&key_id, now);
            if let Some(cached) = self.cache.get(&key_id, now)
                && item
                    .as_ref()
                    .is_none_or(|i| cached.expiration_time > i.expiration_time)
            {
                item = Some(cached);
            }
            let mut result = match item {
                None => FindResult {
                    r#type: ResultType::NotFound as i32,
                    ..FindResult::default()
                },
                Some(ValueWithExpiration {
                    value: StoredValue::Dictionary(d),
                    expiration_time,
                }) => FindResult {
                    r#type: ResultType::FoundDictionary as i32,
                    value: msgpack::encode(&Value::DictionaryDhtValue(d)).into(),
                    expiration_time,
                    ..FindResult::default()
                },
                Some(ValueWithExpiration {
                    value: StoredValue::Regular(v),
                    expiration_time,
                }) => FindResult {
                    r#type: ResultType::FoundRegular as i32,
                    value: v.into(),
                    expiration_time,
                    ..FindResult::default()
                },
            };
            for (node_id, peer_id) in
                self.routing_table
                    .get_nearest_neighbors(&key_id, self.bucket_size, Some(&exclude))
            {
                result
                    .nearest_node_ids
                    .push(Bytes::copy_from_slice(node_id.as_bytes()));
                result.nearest_peer_ids.push(peer_id.to_bytes().into());
            }
            results.push(result);
        }
        let response = FindResponse {
            auth: None,
            results,
            peer: Some(self.node_info()),
        };
        Ok((response, incoming))
    }

    /// `update_routing_table`, called for every incoming request (`responded = true`) and every outgoing
    /// one. `node_id = None` looks the peer up in the table. A node met for the first time is offered
    /// the stored keys it should hold: those with no known neighbours, or where it is nearer than the
    /// farthest of the `num_replicas` nearest known nodes while this node is nearer than all of them.
    /// A peer that did not respond is removed.
    pub fn update_routing_table(
        &mut self,
        node_id: Option<DhtId>,
        peer_id: PeerId,
        responded: bool,
        now: DhtExpiration,
    ) -> RoutingUpdate {
        let mut update = RoutingUpdate::default();
        let Some(node_id) = node_id.or_else(|| self.routing_table.node_id_of(&peer_id)) else {
            return update;
        };
        if !responded {
            self.routing_table.remove(&node_id);
            return update;
        }
        if !self.routing_table.contains(&node_id) {
            let mut items = Vec::new();
            for (key, item) in self.storage.items(now) {
                let neighbors =
                    self.routing_table
                        .get_nearest_neighbors(&key, self.num_replicas, Some(&self.node_id));
                let send = match (neighbors.first(), neighbors.last()) {
                    (Some(nearest), Some(farthest)) => {
                        let new_node_should_store =
                            node_id.xor_distance(&key) < farthest.0.xor_distance(&key);
                        let this_node_is_responsible =
                            self.node_id.xor_distance(&key) < nearest.0.xor_distance(&key);
                        new_node_should_store && this_node_is_responsible
                    }
                    _ => true,
                };
                if send {
                    items.push(StoreItem {
                        key,
                        subkey: None,
                        value: item.value,
                        expiration_time: item.expiration_time,
                        in_cache: false,
                    });
                }
            }
            if !items.is_empty() {
                update.hand_off = Some((peer_id, build_store_request(self.node_info(), &items)));
            }
        }
        update.ping = self.routing_table.add_or_update_node(node_id, peer_id);
        update
    }
}

/// One item of a `StoreRequest`.
#[derive(Debug, Clone, PartialEq)]
pub struct StoreItem {
    /// The key's id.
    pub key: DhtId,
    /// `None` for a regular value or a whole dictionary; `Some` for one sub-key.
    pub subkey: Option<Value>,
    /// The value: bytes (already signed), or a whole dictionary.
    pub value: StoredValue,
    /// Expiration (DHT time).
    pub expiration_time: DhtExpiration,
    /// Store in the peer's cache rather than its storage.
    pub in_cache: bool,
}

/// `call_store`'s request: sub-keys become `msgpack(subkey)`, `0xc0` for regular values and `b""` for
/// whole dictionaries (serialized as ext `0x50`). A dictionary with a sub-key makes no sense (hivemind
/// asserts); its sub-key is ignored.
pub fn build_store_request(peer: NodeInfo, items: &[StoreItem]) -> StoreRequest {
    let mut request = StoreRequest {
        peer: Some(peer),
        ..StoreRequest::default()
    };
    for item in items {
        let (subkey, value): (Bytes, Bytes) = match (&item.value, &item.subkey) {
            (StoredValue::Dictionary(d), _) => (
                Bytes::from_static(IS_DICTIONARY),
                msgpack::encode(&Value::DictionaryDhtValue(d.clone())).into(),
            ),
            (StoredValue::Regular(v), None) => (Bytes::from_static(IS_REGULAR_VALUE), v.clone().into()),
            (StoredValue::Regular(v), Some(s)) => (msgpack::encode(s).into(), v.clone().into()),
        };
        request.keys.push(Bytes::copy_from_slice(item.key.as_bytes()));
        request.subkeys.push(subkey);
        request.values.push(value);
        request.expiration_time.push(item.expiration_time);
        request.in_cache.push(item.in_cache);
    }
    request
}

/// `call_ping`'s request.
pub fn build_ping_request(peer: NodeInfo, validate: bool) -> PingRequest {
    PingRequest {
        auth: None,
        peer: Some(peer),
        validate,
    }
}

/// `call_find`'s request.
pub fn build_find_request(peer: NodeInfo, keys: &[DhtId]) -> FindRequest {
    FindRequest {
        auth: None,
        keys: keys
            .iter()
            .map(|k| Bytes::copy_from_slice(k.as_bytes()))
            .collect(),
        peer: Some(peer),
    }
}

/// The responder's node id, if it sent one (`None` for clients).
pub fn responder_node_id(peer: Option<&NodeInfo>) -> Result<Option<DhtId>, ResponseError> {
    match peer {
        Some(info) if !info.node_id.is_empty() => {
            DhtId::from_bytes(&info.node_id)
                .map(Some)
                .map_err(|_| ResponseError::BadNodeId {
                    len: info.node_id.len(),
                })
        }
        _ => Ok(None),
    }
}

/// `store_ok` of a `StoreResponse`, checked to have one flag per item sent.
pub fn parse_store_response(response: &StoreResponse, items: usize) -> Result<Vec<bool>, ResponseError> {
    if response.store_ok.len() != items {
        return Err(ResponseError::WrongResultCount {
            expected: items,
            got: response.store_ok.len(),
        });
    }
    Ok(response.store_ok.clone())
}

/// What one peer said about one key.
#[derive(Debug, Clone, PartialEq)]
pub struct FindOutcome {
    /// The value it holds, if any and valid.
    pub value: Option<ValueWithExpiration<StoredValue>>,
    /// Nearest nodes it knows, nearest first.
    pub nearest: Vec<(DhtId, PeerId)>,
}

/// `call_find`'s reading of a `FindResponse`: one outcome per key, in order. Values failing validation
/// become `None` (as in hivemind); any malformed part fails the whole response.
pub fn parse_find_response(
    keys: &[DhtId],
    response: &FindResponse,
    validator: Option<&CompositeValidator>,
) -> Result<Vec<FindOutcome>, ResponseError> {
    if response.results.len() != keys.len() {
        return Err(ResponseError::WrongResultCount {
            expected: keys.len(),
            got: response.results.len(),
        });
    }
    let validate = |record: &DhtRecord| -> Result<bool, ValidatorError> {
        validator.map_or(Ok(true), |v| v.validate(record))
    };
    let mut out = Vec::with_capacity(keys.len());
    for (key, result) in keys.iter().zip(&response.results) {
        let (ids, peers) = (&result.nearest_node_ids, &result.nearest_peer_ids);
        if ids.len() != peers.len() || ids.len() > MAX_NEAREST_PER_RESULT {
            return Err(ResponseError::BadNearest {
                node_ids: ids.len(),
                peer_ids: peers.len(),
            });
        }
        let mut nearest = Vec::with_capacity(ids.len());
        for (id, peer) in ids.iter().zip(peers) {
            let id = DhtId::from_bytes(id).map_err(|_| ResponseError::BadNodeId { len: id.len() })?;
            let peer = PeerId::from_bytes(peer).map_err(|_| ResponseError::BadPeerId)?;
            nearest.push((id, peer));
        }
        let key_bytes = key.as_bytes().to_vec();
        let value = match ResultType::try_from(result.r#type) {
            Ok(ResultType::NotFound) => None,
            Ok(ResultType::FoundRegular) => {
                let record = DhtRecord {
                    key: key_bytes,
                    subkey: IS_REGULAR_VALUE.to_vec(),
                    value: result.value.to_vec(),
                    expiration_time: result.expiration_time,
                };
                let valid = validate(&record)?;
                valid.then_some(ValueWithExpiration {
                    value: StoredValue::Regular(record.value),
                    expiration_time: result.expiration_time,
                })
            }
            Ok(ResultType::FoundDictionary) => {
                let Ok(Value::DictionaryDhtValue(d)) = msgpack::decode(&result.value) else {
                    return Err(ResponseError::BadDictionary);
                };
                let mut valid = true;
                for e in d.iter() {
                    let record = DhtRecord {
                        key: key_bytes.clone(),
                        subkey: msgpack::encode(&e.subkey),
                        value: e.value.clone(),
                        expiration_time: e.expiration_time.as_f64(),
                    };
                    if !validate(&record)? {
                        valid = false;
                        break;
                    }
                }
                valid.then_some(ValueWithExpiration {
                    value: StoredValue::Dictionary(d),
                    expiration_time: result.expiration_time,
                })
            }
            Err(_) => return Err(ResponseError::UnknownResultType(result.r#type)),
        };
        out.push(FindOutcome { value, nearest });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u8) -> DhtId {
        let mut b = [0u8; 20];
        b[0] = n;
        DhtId::from(b)
    }

    fn state(n: u8) -> ProtocolState {
        ProtocolState::new(id(n), 20, 5, 5, None, false, None)
    }

    fn info(n: u8) -> NodeInfo {
        NodeInfo {
            node_id: Bytes::copy_from_slice(id(n).as_bytes()),
        }
    }

    #[test]
    fn ping_reports_follow_up() {
        let s = state(1);
        let peer = PeerId::random();
        let (resp, f) = s.rpc_ping(peer, &build_ping_request(info(2), true), 7.0).unwrap();
        assert_eq!(resp.dht_time, 7.0);
        assert!(!resp.available);
        assert_eq!(resp.peer.unwrap().node_id.as_ref(), id(1).as_bytes());
        assert_eq!(
            f,
            PingFollowUp::PingBack(IncomingPeer {
                node_id: id(2),
                peer_id: peer
            })
        );
        let (_, f) = s
            .rpc_ping(peer, &build_ping_request(NodeInfo::default(), false), 7.0)
            .unwrap();
        assert_eq!(f, PingFollowUp::None);
        let client = ProtocolState::new(id(3), 20, 5, 5, None, true, None);
        assert!(client.node_info().node_id.is_empty());
    }

    #[test]
    fn store_then_find_round_trip_with_subkeys_and_cache() {
        let now = 1000.0;
        let mut s = state(1);
        let requester = PeerId::random();
        let (k1, k2, k3) = (id(10), id(11), id(12));
        let mut whole = DictionaryDhtValue::new();
        whole.store(Value::from("x"), msgpack::encode(&Value::from(1)), 1500.0);
        whole.store(Value::from("gone"), msgpack::encode(&Value::from(2)), 900.0);
        let items = vec![
            StoreItem {
                key: k1,
                subkey: None,
                value: StoredValue::Regular(b"\x01".to_vec()),
                expiration_time: 1100.0,
                in_cache: false,
            },
            StoreItem {
                key: k1,
                subkey: None,
                value: StoredValue::Regular(b"\x02".to_vec()),
                expiration_time: 1050.0,
                in_cache: false,
            },
            StoreItem {
                key: k2,
                subkey: Some(Value::from("a")),
                value: StoredValue::Regular(b"\x03".to_vec()),
                expiration_time: 1200.0,
                in_cache: false,
            },
            StoreItem {
                key: k3,
                subkey: None,
                value: StoredValue::Dictionary(whole),
                expiration_time: 1500.0,
                in_cache: true,
            },
            StoreItem {
                key: k1,
                subkey: None,
                value: StoredValue::Regular(b"\x04".to_vec()),
                expiration_time: 1300.0,
                in_cache: true,
            },
        ];
        let request = build_store_request(info(2), &items);
        assert_eq!(request.subkeys[0].as_ref(), &[0xc0]);
        assert_eq!(request.subkeys[3].as_ref(), b"");
        let (resp, incoming) = s.rpc_store(requester, &request, now).unwrap();
        assert_eq!(
            parse_store_response(&resp, 5).unwrap(),
            vec![true, false, true, true, true]
        );
        assert_eq!(incoming.unwrap().node_id, id(2));
        let update = s.update_routing_table(Some(id(2)), requester, true, now);
        // the first node met gets every stored key (nobody else is known)
        let (to, handoff) = update.hand_off.unwrap();
        assert_eq!(to, requester);
        assert_eq!(handoff.keys.len(), 2);
        // a third node asks: it sees node 2 among the nearest, never itself
        let other = PeerId::random();
        let find = build_find_request(info(3), &[k1, k2, k3, id(99)]);
        let (resp, _) = s.rpc_find(other, &find, now).unwrap();
        let out = parse_find_response(&[k1, k2, k3, id(99)], &resp, None).unwrap();
        // the cache's later value wins over storage
        assert_eq!(
            out[0].value.as_ref().unwrap().value,
            StoredValue::Regular(b"\x04".to_vec())
        );
        assert_eq!(out[0].value.as_ref().unwrap().expiration_time, 1300.0);
        let Some(ValueWithExpiration {
            value: StoredValue::Dictionary(d),
            expiration_time,
        }) = &out[1].value
        else {
            panic!()
        };
        assert_eq!((d.len(), *expiration_time), (1, 1200.0));
        let Some(ValueWithExpiration {
            value: StoredValue::Dictionary(d),
            ..
        }) = &out[2].value
        else {
            panic!()
        };
        assert_eq!(d.len(), 1, "the expired sub-key was dropped");
        assert!(out[3].value.is_none());
        assert_eq!(out[3].nearest, vec![(id(2), requester)]);
        // node 2 asking does not get itself back
        let (resp, _) = s
            .rpc_find(requester, &build_find_request(info(2), &[k1]), now)
            .unwrap();
        assert!(resp.results[0].nearest_node_ids.is_empty());
    }

    #[test]
    fn malformed_requests_and_responses_are_errors() {
        let mut s = state(1);
        let p = PeerId::random();
        let mut r = build_store_request(info(2), &[]);
        r.keys.push(Bytes::from_static(&[1; 20]));
        assert!(matches!(
            s.rpc_store(p, &r, 0.0),
            Err(RequestError::NotAligned { .. })
        ));
        let mut r = build_store_request(
            info(2),
            &[StoreItem {
                key: id(5),
                subkey: None,
                value: StoredValue::Regular(vec![1]),
                expiration_time: 5.0,
                in_cache: false,
            }],
        );
        r.keys[0] = Bytes::from_static(&[1; 3]);
        assert!(matches!(
            s.rpc_store(p, &r, 0.0),
            Err(RequestError::BadId { len: 3 })
        ));
        r.keys[0] = Bytes::copy_from_slice(id(5).as_bytes());
        r.subkeys[0] = Bytes::from_static(b"");
        assert!(matches!(s.rpc_store(p, &r, 0.0), Err(RequestError::BadValue(_))));
        r.subkeys[0] = Bytes::from_static(&[0xc1]);
        assert!(matches!(s.rpc_store(p, &r, 0.0), Err(RequestError::BadValue(_))));
        let keys = [id(5)];
        let ok = FindResponse {
            results: vec![FindResult::default()],
            ..FindResponse::default()
        };
        assert!(parse_find_response(&keys, &ok, None).is_ok());
        assert!(matches!(
            parse_find_response(&[], &ok, None),
            Err(ResponseError::WrongResultCount { .. })
        ));
        let mut bad = ok.clone();
        bad.results[0].nearest_node_ids.push(Bytes::from_static(&[0; 20]));
        assert!(matches!(
            parse_find_response(&keys, &bad, None),
            Err(ResponseError::BadNearest { .. })
        ));
        bad.results[0].nearest_peer_ids.push(Bytes::from_static(b"junk"));
        assert!(matches!(
            parse_find_response(&keys, &bad, None),
            Err(ResponseError::BadPeerId)
        ));
        let mut bad = ok.clone();
        bad.results[0].r#type = ResultType::FoundDictionary as i32;
        bad.results[0].value = Bytes::from_static(&[0x05]);
        assert!(matches!(
            parse_find_response(&keys, &bad, None),
            Err(ResponseError::BadDictionary)
        ));
        bad.results[0].r#type = 7;
        assert!(matches!(
            parse_find_response(&keys, &bad, None),
            Err(ResponseError::UnknownResultType(7))
        ));
    }
}
