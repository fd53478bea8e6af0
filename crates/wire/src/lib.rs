//! `apiary-wire`: everything that crosses the wire between Apiary and hivemind 1.1.12 peers, as pure
//! data code (no I/O, no async runtime).
//!
//! - [`proto`]: hivemind's protobufs (`dht`, `runtime`, `averaging`, `auth`, `crypto`) and the p2pd
//!   envelope messages, generated with prost from the `.proto` files in `proto/` (no system `protoc`).
//! - [`msgpack`]: hivemind's `MSGPackSerializer`, byte for byte (ext 0x40 tuples, 0x50
//!   `DictionaryDHTValue`, 0x51 `BatchTensorDescriptor`).
//! - [`dhtid`]: `DHTID`, the 160-bit xor-metric key id (`sha1(msgpack(key))`).
//! - [`tensor`]: `runtime.proto` tensors with all six codecs and stream chunking.
//! - [`rpc`]: the unary envelope and stream frames of hivemind RPCs, with proto2 `required` checks.
//! - [`signature`]: hivemind's `RSASignatureValidator` record signatures.
//!
//! Every decoder returns a typed error on truncated, oversized or inconsistent input; none panics.

pub mod dhtid;
pub mod msgpack;
pub mod proto;
pub mod rpc;
pub mod signature;
pub mod tensor;
