//! The multistream-select 1.0 message format, as pure functions over byte slices.
//!
//! Every message is `uvarint(len) || payload`, where `payload` is `len` bytes and ends with
//! `'\n'` (counted in `len`). Single-line messages carry one line of UTF-8 text: the header
//! `/multistream/1.0.0`, a protocol name, `na` or `ls`. The answer to `ls` is one message whose
//! payload is a sequence of `uvarint(len) || name '\n'` entries, terminated by a lone `'\n'`
//! (go-multistream omits the terminator; both forms are accepted).
//!
//! Messages are classified by *context*, never by their shape: the dialer knows that the answer
//! to a proposal is either the echo of that proposal or `na`. That is what lets names without
//! a leading `/` through, where a context-free decoder has to guess "starts with `/`, so it is
//! a protocol".

use crate::ProtocolError;

/// The multistream-select 1.0 header line (without its `'\n'`).
pub(crate) const HEADER: &str = "/multistream/1.0.0";
/// "Not available": the listener's answer to a protocol it does not support.
pub(crate) const NA: &str = "na";
/// A request for the listener's protocol list.
pub(crate) const LS: &str = "ls";

/// Longest payload (text plus `'\n'`) of a single-line message that is read or written.
pub(crate) const MAX_LINE_LEN: usize = 1024;
/// Longest protocol name, in bytes.
pub(crate) const MAX_NAME_LEN: usize = MAX_LINE_LEN - 1;
/// Longest `ls` response payload that is written or parsed.
pub(crate) const MAX_LS_LEN: usize = 16 * 1024;
/// Most protocols in an `ls` response that is written or parsed.
pub(crate) const MAX_LS_PROTOCOLS: usize = 1000;

/// Checks that `name` may be proposed, listed or accepted as a protocol name.
///
/// Any non-empty UTF-8 text of at most [`MAX_NAME_LEN`] bytes without control characters is
/// fine, with or without a leading `/`; the reserved words `na`, `ls` and the header are not.
pub(crate) fn validate_name(name: &str) -> Result<(), ProtocolError> {
    let reserved = name == NA || name == LS || name == HEADER;
    if name.is_empty() || name.len() > MAX_NAME_LEN || reserved || name.chars().any(char::is_control) {
        return Err(ProtocolError::InvalidProtocol);
    }
    Ok(())
}

/// Appends `uvarint(len) || line '\n'` to `out`.
///
/// Callers pass constants or names that passed [`validate_name`], so the line always fits.
pub(crate) fn encode_line(out: &mut Vec<u8>, line: &str) {
    debug_assert!(line.len() < MAX_LINE_LEN);
    let mut prefix = unsigned_varint::encode::usize_buffer();
    out.extend_from_slice(unsigned_varint::encode::usize(line.len() + 1, &mut prefix));
    out.extend_from_slice(line.as_bytes());
    out.push(b'\n');
}

/// Result of looking for one length-prefixed frame at the start of a buffer.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Frame {
    /// More bytes are needed.
    Incomplete,
    /// A complete frame: its payload is `buf[payload_start..end]`, and it occupies `buf[..end]`.
    Complete { payload_start: usize, end: usize },
}

/// Finds the frame at the start of `buf`, rejecting payloads longer than `max_len` as soon as
/// the length prefix is known (without waiting for the payload).
pub(crate) fn parse_frame(buf: &[u8], max_len: usize) -> Result<Frame, ProtocolError> {
    // The length prefix of a payload of at most `max_len` bytes needs this many bytes.
    let max_prefix_len = varint_len(max_len);
    match unsigned_varint::decode::usize(buf) {
        Ok((len, rest)) => {
            if len > max_len {
                return Err(ProtocolError::InvalidMessage);
            }
            let payload_start = buf.len() - rest.len();
            if rest.len() < len {
                return Ok(Frame::Incomplete);
            }
            Ok(Frame::Complete {
                payload_start,
                end: payload_start + len,
            })
        }
        Err(unsigned_varint::decode::Error::Insufficient) if buf.len() < max_prefix_len => {
            Ok(Frame::Incomplete)
        }
        // A longer prefix (or a malformed one) cannot encode an acceptable length.
        Err(_) => Err(ProtocolError::InvalidMessage),
    }
}

/// Number of bytes of the unsigned varint encoding of `n`.
fn varint_len(n: usize) -> usize {
    let mut buf = unsigned_varint::encode::usize_buffer();
    unsigned_varint::encode::usize(n, &mut buf).len()
}

/// Decodes the payload of a single-line message into its text (without the `'\n'`).
pub(crate) fn decode_line(payload: &[u8]) -> Result<&str, ProtocolError> {
    let Some((b'\n', text)) = payload.split_last() else {
        return Err(ProtocolError::InvalidMessage);
    };
    let text = std::str::from_utf8(text).map_err(|_| ProtocolError::InvalidMessage)?;
    if text.contains('\n') {
        return Err(ProtocolError::InvalidMessage);
    }
    Ok(text)
}

/// Builds the payload of an `ls` response listing `names`, which must have passed
/// [`validate_name`]. Names that would push the payload past [`MAX_LS_LEN`] or the count past
/// [`MAX_LS_PROTOCOLS`] are left out (and logged).
pub(crate) fn encode_ls_payload<'a>(names: impl IntoIterator<Item = &'a str>) -> Vec<u8> {
    let mut payload = Vec::new();
    let mut listed = 0usize;
    let mut omitted = 0usize;
    for name in names {
        let entry_len = varint_len(name.len() + 1) + name.len() + 1;
        // Keep one byte for the final '\n'.
        if listed == MAX_LS_PROTOCOLS || payload.len() + entry_len + 1 > MAX_LS_LEN {
            omitted += 1;
            continue;
        }
        encode_line(&mut payload, name);
        listed += 1;
    }
    if omitted > 0 {
        tracing::debug!(listed, omitted, "multistream-select: `ls` response truncated");
    }
    payload.push(b'\n');
    payload
}

/// Appends a whole `ls` response message (`uvarint(len) || payload`) listing `names` to `out`;
/// see [`encode_ls_payload`].
pub(crate) fn encode_ls_message<'a>(out: &mut Vec<u8>, names: impl IntoIterator<Item = &'a str>) {
    let payload = encode_ls_payload(names);
    let mut prefix = unsigned_varint::encode::usize_buffer();
    out.extend_from_slice(unsigned_varint::encode::usize(payload.len(), &mut prefix));
    out.extend_from_slice(&payload);
}

/// Parses the payload of an `ls` response into the listed protocol names.
///
/// The dialer never sends `ls` (libp2p has no use for it), so only the tests parse listings:
/// the listener's own, and go-multistream's.
#[cfg(test)]
pub(crate) fn decode_ls_payload(payload: &[u8]) -> Result<Vec<String>, ProtocolError> {
    if payload.len() > MAX_LS_LEN {
        return Err(ProtocolError::InvalidMessage);
    }
    let mut names = Vec::new();
    let mut rest = payload;
    while !rest.is_empty() && rest != b"\n" {
        if names.len() == MAX_LS_PROTOCOLS {
            return Err(ProtocolError::TooManyProtocols);
        }
        let Frame::Complete { payload_start, end } = parse_frame(rest, MAX_LINE_LEN)? else {
            return Err(ProtocolError::InvalidMessage);
        };
        let name = decode_line(&rest[payload_start..end])?;
        validate_name(name)?;
        names.push(name.to_owned());
        rest = &rest[end..];
    }
    Ok(names)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(text: &str) -> Vec<u8> {
        let mut out = Vec::new();
        encode_line(&mut out, text);
        out
    }

    #[test]
    fn lines_have_the_spec_bytes() {
        assert_eq!(line(HEADER), b"\x13/multistream/1.0.0\n");
        assert_eq!(line(NA), b"\x03na\n");
        assert_eq!(line(LS), b"\x03ls\n");
        assert_eq!(line("DHTProtocol.rpc_find"), b"\x15DHTProtocol.rpc_find\n");
        // A 200-byte name needs a two-byte length prefix: 201 = 0xc9 0x01.
        let long = "x".repeat(200);
        assert_eq!(&line(&long)[..2], &[0xc9, 0x01]);
    }

    #[test]
    fn slashless_and_namespaced_names_are_valid() {
        for name in [
            "DHTProtocol.rpc_find",
            "ns::GradientAverager.rpc_join_group",
            "ExampleServicer.rpc_square",
            "/ipfs/ping/1.0.0",
            "/noise",
            "ünïcødé",
        ] {
            assert!(validate_name(name).is_ok(), "{name}");
        }
    }

    #[test]
    fn bad_names_are_rejected() {
        let too_long = "a".repeat(MAX_NAME_LEN + 1);
        for name in ["", "na", "ls", HEADER, "a\nb", "tab\there", "nul\0", &too_long] {
            assert!(
                matches!(validate_name(name), Err(ProtocolError::InvalidProtocol)),
                "{name:?}"
            );
        }
        assert!(validate_name(&"a".repeat(MAX_NAME_LEN)).is_ok());
    }

    #[test]
    fn frames_are_found_incrementally() {
        let bytes = line("DHTProtocol.rpc_find");
        for cut in 0..bytes.len() {
            assert_eq!(
                parse_frame(&bytes[..cut], MAX_LINE_LEN).unwrap(),
                Frame::Incomplete
            );
        }
        assert_eq!(
            parse_frame(&bytes, MAX_LINE_LEN).unwrap(),
            Frame::Complete {
                payload_start: 1,
                end: bytes.len()
            }
        );
        let mut two = bytes.clone();
        two.extend_from_slice(b"trailing application data");
        assert_eq!(
            parse_frame(&two, MAX_LINE_LEN).unwrap(),
            Frame::Complete {
                payload_start: 1,
                end: bytes.len()
            }
        );
    }

    #[test]
    fn oversized_and_malformed_prefixes_are_rejected_early() {
        // 1025 = 0x81 0x08: known to be too long before a single payload byte arrives.
        assert!(matches!(
            parse_frame(&[0x81, 0x08], MAX_LINE_LEN),
            Err(ProtocolError::InvalidMessage)
        ));
        // Two continuation bytes: at least 2^14, which no line may be.
        assert!(matches!(
            parse_frame(&[0xff, 0xff], MAX_LINE_LEN),
            Err(ProtocolError::InvalidMessage)
        ));
        // A prefix that overflows u64.
        assert!(matches!(
            parse_frame(&[0xff; 11], MAX_LINE_LEN),
            Err(ProtocolError::InvalidMessage)
        ));
        // Non-minimal encoding of 3.
        assert!(matches!(
            parse_frame(&[0x83, 0x00], MAX_LINE_LEN),
            Err(ProtocolError::InvalidMessage)
        ));
        // Exactly the limit is fine.
        assert_eq!(
            parse_frame(&[0x80, 0x08], MAX_LINE_LEN).unwrap(),
            Frame::Incomplete
        );
    }

    #[test]
    fn line_payloads_are_checked() {
        assert_eq!(
            decode_line(b"DHTProtocol.rpc_find\n").unwrap(),
            "DHTProtocol.rpc_find"
        );
        assert_eq!(decode_line(b"\n").unwrap(), "");
        for bad in [&b""[..], b"no newline", b"\xff\xfe\n", b"two\nlines\n"] {
            assert!(
                matches!(decode_line(bad), Err(ProtocolError::InvalidMessage)),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn ls_payload_round_trips_slashless_names() {
        let names = [
            "DHTProtocol.rpc_find",
            "ns::GradientAverager.rpc_join_group",
            "/ipfs/ping/1.0.0",
        ];
        let payload = encode_ls_payload(names);
        let mut expected = Vec::new();
        for name in names {
            expected.extend_from_slice(&line(name));
        }
        expected.push(b'\n');
        assert_eq!(payload, expected);
        assert_eq!(decode_ls_payload(&payload).unwrap(), names);
    }

    #[test]
    fn ls_payload_without_terminator_is_accepted() {
        // go-multistream writes the entries without the final lone '\n'.
        let mut payload = line("DHTProtocol.rpc_ping");
        payload.extend_from_slice(&line("DHTProtocol.rpc_store"));
        assert_eq!(
            decode_ls_payload(&payload).unwrap(),
            ["DHTProtocol.rpc_ping", "DHTProtocol.rpc_store"]
        );
        assert!(decode_ls_payload(b"\n").unwrap().is_empty());
        assert!(decode_ls_payload(b"").unwrap().is_empty());
    }

    #[test]
    fn bad_ls_payloads_are_rejected() {
        // (payload, whether the error is about the name rather than the framing)
        let cases: [(&[u8], bool); 5] = [
            // An entry cut short.
            (b"\x15DHTProtocol", false),
            // An entry without its '\n'.
            (b"\x03abc\n", false),
            // An empty name.
            (b"\x01\n\n", true),
            // Reserved word as a name.
            (b"\x03na\n\n", true),
            // Garbage prefix.
            (b"\xff\xff\xff\n", false),
        ];
        for (payload, name_error) in cases {
            let err = decode_ls_payload(payload).unwrap_err();
            if name_error {
                assert!(
                    matches!(err, ProtocolError::InvalidProtocol),
                    "{payload:?}: {err:?}"
                );
            } else {
                assert!(
                    matches!(err, ProtocolError::InvalidMessage),
                    "{payload:?}: {err:?}"
                );
            }
        }
    }

    #[test]
    fn ls_payload_limits_are_enforced() {
        let many: Vec<String> = (0..MAX_LS_PROTOCOLS + 5).map(|i| format!("p{i}")).collect();
        let payload = encode_ls_payload(many.iter().map(String::as_str));
        let listed = decode_ls_payload(&payload).unwrap();
        assert_eq!(listed.len(), MAX_LS_PROTOCOLS);
        assert_eq!(listed[..], many[..MAX_LS_PROTOCOLS]);

        let mut too_many = Vec::new();
        for name in &many {
            too_many.extend_from_slice(&line(name));
        }
        assert!(matches!(
            decode_ls_payload(&too_many),
            Err(ProtocolError::TooManyProtocols)
        ));

        let long: Vec<String> = (0..40).map(|i| format!("{i:0>1000}")).collect();
        let payload = encode_ls_payload(long.iter().map(String::as_str));
        assert!(payload.len() <= MAX_LS_LEN);
        let listed = decode_ls_payload(&payload).unwrap();
        assert!(!listed.is_empty() && listed.len() < long.len());
        assert!(matches!(
            decode_ls_payload(&vec![b'\n'; MAX_LS_LEN + 1]),
            Err(ProtocolError::InvalidMessage)
        ));
    }
}
