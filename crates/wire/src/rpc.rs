//! The bytes of hivemind's RPCs between peers, as pure data code:
//!
//! - **unary calls**: one varint-delimited `p2pd.PersistentConnectionRequest{callId, callUnary}` per stream
//!   from the caller, answered by one `PersistentConnectionRequest{callId, unaryResponse{response|error}}`,
//!   each at most [`MAX_UNARY_ENVELOPE`] bytes (p2pd's `persistentConnMaxMsgSize`);
//! - **stream calls**: frames of `marker (0 message | 1 error) ‖ u64 big-endian length ‖ protobuf`, the
//!   caller ending its side with an empty error frame ([`END_OF_STREAM`]);
//! - **proto2 `required`** semantics for p2pd's and libp2p's proto2 messages: prost decodes a message with
//!   a missing required field as if it held the default, whereas p2pd (gogo-protobuf) rejects it. The
//!   [`Proto2`] trait checks the wire bytes first, so Apiary accepts exactly what p2pd accepts.

use bytes::{Buf, BufMut, Bytes};
use prost::Message;

use crate::proto::{crypto, p2pd};

/// p2pd's `-persistentConnMaxMsgSize` default: the largest unary envelope either side reads (4 MiB).
pub const MAX_UNARY_ENVELOPE: usize = 4 * 1024 * 1024;

/// Stream frame marker for a message.
pub const MESSAGE_MARKER: u8 = 0x00;
/// Stream frame marker for an error (`p2pd.RPCError`); an empty one ends the caller's stream.
pub const ERROR_MARKER: u8 = 0x01;
/// Marker byte plus the u64 big-endian length.
pub const FRAME_HEADER_LEN: usize = 9;
/// The caller's end-of-stream frame: an error frame carrying an empty `RPCError`.
pub const END_OF_STREAM: [u8; FRAME_HEADER_LEN] = [ERROR_MARKER, 0, 0, 0, 0, 0, 0, 0, 0];

/// Why RPC bytes were refused.
#[derive(Debug, thiserror::Error)]
pub enum RpcError {
    #[error("{what} of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge { what: &'static str, len: u64, max: u64 },
    #[error("malformed protobuf: {0}")]
    Decode(#[from] prost::DecodeError),
    #[error("malformed protobuf wire data: {0}")]
    Wire(&'static str),
    #[error("{message}: required field {field} is missing")]
    MissingRequired { message: &'static str, field: u32 },
    #[error("unknown stream frame marker {0:#04x}")]
    UnknownMarker(u8),
    #[error("unary envelope carries no {0}")]
    UnexpectedEnvelope(&'static str),
}

/// Checks the required fields of one embedded message's bytes.
pub type RequiredCheck = fn(&[u8]) -> Result<(), RpcError>;

/// A proto2 message with `required` fields: [`Proto2::decode_strict`] rejects bytes that lack one,
/// at any depth, as gogo-protobuf does.
pub trait Proto2: Message + Default + Sized {
    /// The message's name in errors.
    const NAME: &'static str;
    /// Field numbers marked `required`.
    const REQUIRED: &'static [u32];
    /// Embedded message fields whose own required fields must be present: (field number, check).
    const NESTED: &'static [(u32, RequiredCheck)] = &[];

    /// Checks the required fields of `buf`, then decodes it.
    fn decode_strict(buf: &[u8]) -> Result<Self, RpcError> {
        check_required::<Self>(buf)?;
        Ok(Self::decode(buf)?)
    }
}

/// Checks that every required field of `M` (and of its listed embedded messages) is in `buf`.
pub fn check_required<M: Proto2>(mut buf: &[u8]) -> Result<(), RpcError> {
    let mut seen = 0u64;
    while !buf.is_empty() {
        let key = read_varint(&mut buf)?;
        let field = u32::try_from(key >> 3).map_err(|_| RpcError::Wire("field number out of range"))?;
        let value: &[u8] = match key & 7 {
            0 => {
                read_varint(&mut buf)?;
                &[]
            }
            1 => take(&mut buf, 8)?,
            5 => take(&mut buf, 4)?,
            2 => {
                let len = read_varint(&mut buf)?;
                let len = usize::try_from(len).map_err(|_| RpcError::Wire("length out of range"))?;
                take(&mut buf, len)?
            }
            _ => return Err(RpcError::Wire("unsupported wire type")),
        };
        if field < 64 {
            seen |= 1 << field;
        }
        if let Some((_, nested)) = M::NESTED.iter().find(|(f, _)| *f == field) {
            nested(value)?;
        }
    }
    match M::REQUIRED.iter().find(|f| seen & (1 << **f) == 0) {
        Some(&field) => Err(RpcError::MissingRequired {
            message: M::NAME,
            field,
        }),
        None => Ok(()),
    }
}

fn read_varint(buf: &mut &[u8]) -> Result<u64, RpcError> {
    prost::encoding::decode_varint(buf).map_err(RpcError::Decode)
}

fn take<'a>(buf: &mut &'a [u8], n: usize) -> Result<&'a [u8], RpcError> {
    if buf.len() < n {
        return Err(RpcError::Wire("truncated field"));
    }
    let (head, tail) = buf.split_at(n);
    *buf = tail;
    Ok(head)
}

macro_rules! proto2 {
    ($ty:ty, $name:literal, [$($req:literal),*] $(, nested [$(($f:literal, $n:ty)),*])?) => {
        impl Proto2 for $ty {
            const NAME: &'static str = $name;
            const REQUIRED: &'static [u32] = &[$($req),*];
            $(const NESTED: &'static [(u32, RequiredCheck)] =
                &[$(($f, check_required::<$n>)),*];)?
        }
    };
}

proto2!(p2pd::CallUnaryRequest, "CallUnaryRequest", [1, 2, 3]);
proto2!(p2pd::AddUnaryHandlerRequest, "AddUnaryHandlerRequest", [1, 2]);
proto2!(p2pd::RemoveUnaryHandlerRequest, "RemoveUnaryHandlerRequest", [1]);
proto2!(p2pd::CallUnaryResponse, "CallUnaryResponse", []);
proto2!(p2pd::Cancel, "Cancel", []);
proto2!(p2pd::DaemonError, "DaemonError", []);
proto2!(p2pd::RpcError, "RPCError", []);
proto2!(
    p2pd::PersistentConnectionRequest,
    "PersistentConnectionRequest",
    [1],
    nested [(2, p2pd::AddUnaryHandlerRequest), (3, p2pd::CallUnaryRequest), (6, p2pd::RemoveUnaryHandlerRequest)]
);
proto2!(
    p2pd::PersistentConnectionResponse,
    "PersistentConnectionResponse",
    [1],
    nested[(3, p2pd::CallUnaryRequest)]
);
proto2!(p2pd::StreamInfo, "StreamInfo", [1, 2, 3]);
proto2!(p2pd::StreamOpenRequest, "StreamOpenRequest", [1]);
proto2!(p2pd::IdentifyResponse, "IdentifyResponse", [1]);
proto2!(p2pd::ErrorResponse, "ErrorResponse", [1]);
proto2!(
    p2pd::Request,
    "Request",
    [1],
    nested[(3, p2pd::StreamOpenRequest)]
);
proto2!(
    p2pd::Response,
    "Response",
    [1],
    nested [(2, p2pd::ErrorResponse), (3, p2pd::StreamInfo), (4, p2pd::IdentifyResponse)]
);
proto2!(crypto::PublicKey, "PublicKey", [1, 2]);
proto2!(crypto::PrivateKey, "PrivateKey", [1, 2]);

/// A unary call as the caller sends it: `uvarint(len) ‖ PersistentConnectionRequest{callId, callUnary}`.
///
/// `peer` is the *target's* peer id bytes (p2pd's convention; the callee ignores it and uses the
/// connection's remote peer). Fails with [`RpcError::TooLarge`] above [`MAX_UNARY_ENVELOPE`], which p2pd
/// would silently stop reading.
pub fn encode_unary_call(call_id: Bytes, peer: Bytes, proto: &str, data: Bytes) -> Result<Vec<u8>, RpcError> {
    use p2pd::persistent_connection_request::Message as M;
    let request = p2pd::CallUnaryRequest {
        peer,
        proto: proto.to_owned(),
        data,
    };
    encode_envelope(&p2pd::PersistentConnectionRequest {
        call_id,
        message: Some(M::CallUnary(request)),
    })
}

/// A unary reply: `uvarint(len) ‖ PersistentConnectionRequest{callId, unaryResponse{response | error}}`.
pub fn encode_unary_response(call_id: Bytes, result: Result<Bytes, String>) -> Result<Vec<u8>, RpcError> {
    use p2pd::call_unary_response::Result as R;
    use p2pd::persistent_connection_request::Message as M;
    let result = match result {
        Ok(response) => R::Response(response),
        Err(error) => R::Error(Bytes::from(error.into_bytes())),
    };
    let response = p2pd::CallUnaryResponse { result: Some(result) };
    encode_envelope(&p2pd::PersistentConnectionRequest {
        call_id,
        message: Some(M::UnaryResponse(response)),
    })
}

fn encode_envelope(envelope: &p2pd::PersistentConnectionRequest) -> Result<Vec<u8>, RpcError> {
    let len = envelope.encoded_len();
    if len > MAX_UNARY_ENVELOPE {
        return Err(RpcError::TooLarge {
            what: "unary envelope",
            len: len as u64,
            max: MAX_UNARY_ENVELOPE as u64,
        });
    }
    Ok(envelope.encode_length_delimited_to_vec())
}

/// Splits one varint-delimited envelope off the front of `buf`: `Ok(None)` while more bytes are needed,
/// otherwise the envelope's bytes and the number of bytes consumed. Refuses lengths over `max` before
/// they are buffered.
pub fn split_delimited(buf: &[u8], max: usize) -> Result<Option<(&[u8], usize)>, RpcError> {
    let mut len: u64 = 0;
    for (i, byte) in buf.iter().enumerate().take(10) {
        len |= u64::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            if len > max as u64 {
                return Err(RpcError::TooLarge {
                    what: "unary envelope",
                    len,
                    max: max as u64,
                });
            }
            let start = i + 1;
            let end = start + len as usize;
            return Ok((buf.len() >= end).then(|| (&buf[start..end], end)));
        }
    }
    if buf.len() >= 10 {
        return Err(RpcError::Wire("length prefix is not a valid varint"));
    }
    Ok(None)
}

/// A decoded unary call, as the callee sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct UnaryCall {
    pub call_id: Bytes,
    pub proto: String,
    pub data: Bytes,
}

/// Decodes the callee's side of a unary call (the envelope without its length prefix).
pub fn decode_unary_call(envelope: &[u8]) -> Result<UnaryCall, RpcError> {
    use p2pd::persistent_connection_request::Message as M;
    let request = p2pd::PersistentConnectionRequest::decode_strict(envelope)?;
    match request.message {
        Some(M::CallUnary(call)) => Ok(UnaryCall {
            call_id: request.call_id,
            proto: call.proto,
            data: call.data,
        }),
        _ => Err(RpcError::UnexpectedEnvelope("callUnary")),
    }
}

/// Decodes the caller's side of a reply: the call id and the handler's response bytes or error text.
pub fn decode_unary_response(envelope: &[u8]) -> Result<(Bytes, Result<Bytes, String>), RpcError> {
    use p2pd::call_unary_response::Result as R;
    use p2pd::persistent_connection_request::Message as M;
    let reply = p2pd::PersistentConnectionRequest::decode_strict(envelope)?;
    match reply.message {
        Some(M::UnaryResponse(p2pd::CallUnaryResponse {
            result: Some(R::Response(r)),
        })) => Ok((reply.call_id, Ok(r))),
        Some(M::UnaryResponse(p2pd::CallUnaryResponse {
            result: Some(R::Error(e)),
        })) => Ok((reply.call_id, Err(String::from_utf8_lossy(&e).into_owned()))),
        _ => Err(RpcError::UnexpectedEnvelope("unaryResponse")),
    }
}

/// The kind of a stream frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameKind {
    Message,
    Error,
}

/// A parsed stream frame header: what follows and how many bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    pub kind: FrameKind,
    pub len: u64,
}

impl FrameHeader {
    /// Parses the 9-byte header, refusing payloads over `max` bytes before anything is buffered.
    pub fn parse(header: [u8; FRAME_HEADER_LEN], max: u64) -> Result<Self, RpcError> {
        let kind = match header[0] {
            MESSAGE_MARKER => FrameKind::Message,
            ERROR_MARKER => FrameKind::Error,
            other => return Err(RpcError::UnknownMarker(other)),
        };
        let len = (&header[1..]).get_u64();
        if len > max {
            return Err(RpcError::TooLarge {
                what: "stream frame",
                len,
                max,
            });
        }
        Ok(Self { kind, len })
    }
}

/// A message frame: `0x00 ‖ u64 BE len ‖ message`.
pub fn encode_message_frame(message: &impl Message) -> Vec<u8> {
    frame(MESSAGE_MARKER, message)
}

/// An error frame carrying `RPCError{message}`; hivemind raises it as `P2PHandlerError` on the caller.
pub fn encode_error_frame(message: &str) -> Vec<u8> {
    frame(
        ERROR_MARKER,
        &p2pd::RpcError {
            message: Some(message.to_owned()),
        },
    )
}

fn frame(marker: u8, message: &impl Message) -> Vec<u8> {
    let len = message.encoded_len();
    let mut out = Vec::with_capacity(FRAME_HEADER_LEN + len);
    out.put_u8(marker);
    out.put_u64(len as u64);
    message.encode_raw(&mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::test::TestRequest;

    #[test]
    fn unary_call_round_trips_and_matches_p2pd_layout() {
        let bytes = encode_unary_call(
            Bytes::from_static(&[7; 16]),
            Bytes::from_static(b"peer"),
            "ExampleServicer.rpc_square",
            TestRequest { number: 9 }.encode_to_vec().into(),
        )
        .unwrap();
        // `1a02 0809` ends the frame: data field holding TestRequest{number: 9}, as observed from p2pd.
        assert!(bytes.ends_with(&[0x1a, 0x02, 0x08, 0x09]));
        let (envelope, used) = split_delimited(&bytes, MAX_UNARY_ENVELOPE).unwrap().unwrap();
        assert_eq!(used, bytes.len());
        let call = decode_unary_call(envelope).unwrap();
        assert_eq!(call.proto, "ExampleServicer.rpc_square");
        assert_eq!(TestRequest::decode(call.data).unwrap().number, 9);
    }

    #[test]
    fn empty_data_is_still_sent_because_it_is_required() {
        let bytes = encode_unary_call(Bytes::new(), Bytes::new(), "A.rpc_b", Bytes::new()).unwrap();
        let (envelope, _) = split_delimited(&bytes, MAX_UNARY_ENVELOPE).unwrap().unwrap();
        // callId (0a00), callUnary { peer (0a00), proto, data (1a00) }
        assert_eq!(&envelope[..2], &[0x0a, 0x00]);
        assert!(envelope.ends_with(&[0x1a, 0x00]));
        decode_unary_call(envelope).unwrap();
    }

    #[test]
    fn missing_required_fields_are_rejected_at_any_depth() {
        // callUnary without `data`: prost alone would accept it.
        let mut inner = Vec::new();
        prost::encoding::bytes::encode(1, &Bytes::from_static(b"p"), &mut inner);
        prost::encoding::string::encode(2, &"A.rpc_b".to_owned(), &mut inner);
        let mut outer = Vec::new();
        prost::encoding::bytes::encode(1, &Bytes::from_static(b"id"), &mut outer);
        prost::encoding::encode_key(3, prost::encoding::WireType::LengthDelimited, &mut outer);
        prost::encoding::encode_varint(inner.len() as u64, &mut outer);
        outer.extend_from_slice(&inner);
        assert!(p2pd::PersistentConnectionRequest::decode(outer.as_slice()).is_ok());
        match decode_unary_call(&outer) {
            Err(RpcError::MissingRequired {
                message: "CallUnaryRequest",
                field: 3,
            }) => {}
            other => panic!("expected a missing `data` error, got {other:?}"),
        }
        // No callId at all.
        assert!(matches!(
            p2pd::PersistentConnectionRequest::decode_strict(&[]),
            Err(RpcError::MissingRequired { field: 1, .. })
        ));
        assert!(matches!(
            crypto::PublicKey::decode_strict(&[0x08, 0x01]),
            Err(RpcError::MissingRequired {
                message: "PublicKey",
                field: 2
            })
        ));
    }

    #[test]
    fn oversized_envelopes_are_refused_both_ways() {
        let big = Bytes::from(vec![0u8; MAX_UNARY_ENVELOPE]);
        assert!(matches!(
            encode_unary_call(Bytes::new(), Bytes::new(), "A.rpc_b", big),
            Err(RpcError::TooLarge { .. })
        ));
        let mut prefix = Vec::new();
        prost::encoding::encode_varint(MAX_UNARY_ENVELOPE as u64 + 1, &mut prefix);
        assert!(matches!(
            split_delimited(&prefix, MAX_UNARY_ENVELOPE),
            Err(RpcError::TooLarge { .. })
        ));
        assert!(
            split_delimited(&[0x80, 0x80], MAX_UNARY_ENVELOPE)
                .unwrap()
                .is_none()
        );
        assert!(split_delimited(&[0xff; 11], MAX_UNARY_ENVELOPE).is_err());
    }

    #[test]
    fn reply_carries_response_or_error_text() {
        let ok =
            encode_unary_response(Bytes::from_static(b"id"), Ok(Bytes::from_static(b"\x08\x31"))).unwrap();
        let (env, _) = split_delimited(&ok, MAX_UNARY_ENVELOPE).unwrap().unwrap();
        assert_eq!(
            decode_unary_response(env).unwrap(),
            (Bytes::from_static(b"id"), Ok(Bytes::from_static(b"\x08\x31")))
        );
        let err = encode_unary_response(Bytes::from_static(b"id"), Err("ValueError('x')".into())).unwrap();
        let (env, _) = split_delimited(&err, MAX_UNARY_ENVELOPE).unwrap().unwrap();
        assert_eq!(
            decode_unary_response(env).unwrap().1,
            Err("ValueError('x')".to_owned())
        );
        // A call where a reply is expected.
        let call = encode_unary_call(Bytes::new(), Bytes::new(), "A.rpc_b", Bytes::new()).unwrap();
        let (env, _) = split_delimited(&call, MAX_UNARY_ENVELOPE).unwrap().unwrap();
        assert!(matches!(
            decode_unary_response(env),
            Err(RpcError::UnexpectedEnvelope(_))
        ));
    }

    #[test]
    fn stream_frames_follow_hivemind_layout() {
        let frame = encode_message_frame(&TestRequest { number: 9 });
        assert_eq!(frame, [0, 0, 0, 0, 0, 0, 0, 0, 2, 0x08, 0x09]);
        let header = FrameHeader::parse(frame[..9].try_into().unwrap(), 100).unwrap();
        assert_eq!(
            header,
            FrameHeader {
                kind: FrameKind::Message,
                len: 2
            }
        );
        let error = encode_error_frame("boom");
        assert_eq!(error[0], ERROR_MARKER);
        let parsed = p2pd::RpcError::decode(&error[9..]).unwrap();
        assert_eq!(parsed.message.as_deref(), Some("boom"));
        assert_eq!(
            FrameHeader::parse(END_OF_STREAM, 0).unwrap(),
            FrameHeader {
                kind: FrameKind::Error,
                len: 0
            }
        );
        assert!(matches!(
            FrameHeader::parse([2, 0, 0, 0, 0, 0, 0, 0, 0], 10),
            Err(RpcError::UnknownMarker(2))
        ));
        assert!(matches!(
            FrameHeader::parse([0, 0xff, 0, 0, 0, 0, 0, 0, 0], 4 << 20),
            Err(RpcError::TooLarge { .. })
        ));
    }

    #[test]
    fn garbage_never_panics() {
        let mut state = 0x2545_f491_4f6c_dd1d_u64;
        for len in 0..400 {
            let bytes: Vec<u8> = (0..len)
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    state as u8
                })
                .collect();
            let _ = decode_unary_call(&bytes);
            let _ = decode_unary_response(&bytes);
            let _ = split_delimited(&bytes, 64);
            let _ = p2pd::Response::decode_strict(&bytes);
        }
    }
}
