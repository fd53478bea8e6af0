//! Malformed and hostile input: typed errors, never panics, never hangs.

use std::io;

use futures::{AsyncReadExt, AsyncWriteExt, future::join};
use multistream_select::{
    NegotiationError, ProtocolError, Version, dialer_select_proto, listener_select_proto,
};

use crate::{HEADER, line, lines, pipe::duplex, within};

/// Feeds `input` to a listener (then closes the pipe) and returns its result.
async fn listen_to(input: &[u8], chunk: usize) -> Result<String, NegotiationError> {
    let (mut raw, b) = duplex(64 * 1024, chunk);
    let listener = async {
        // Drop the negotiated stream at once, so that the remote sees the end of the stream.
        let (name, _) = listener_select_proto(b, ["DHTProtocol.rpc_find", "/ipfs/ping/1.0.0"]).await?;
        Ok(name.to_owned())
    };
    let remote = async move {
        // The listener may fail before reading everything; a broken pipe is fine then.
        let _ = raw.write_all(input).await;
        let _ = raw.close().await;
        let mut sink = Vec::new();
        let _ = raw.read_to_end(&mut sink).await;
    };
    let (result, ()) = within(join(listener, remote)).await;
    result
}

/// Runs a dialer against a remote that answers with `answer` (then closes the pipe).
async fn dial_against(answer: &[u8], chunk: usize, version: Version) -> Result<String, NegotiationError> {
    let (a, mut raw) = duplex(64 * 1024, chunk);
    let remote = async move {
        let _ = raw.write_all(answer).await;
        let _ = raw.close().await;
        let mut sink = Vec::new();
        let _ = raw.read_to_end(&mut sink).await;
    };
    let dialer = async move {
        let (name, negotiated) = dialer_select_proto(a, ["DHTProtocol.rpc_find"], version).await?;
        // Lazily negotiated streams only find out on completion.
        negotiated.complete().await?;
        Ok(name.to_owned())
    };
    let (result, ()) = within(join(dialer, remote)).await;
    result
}

fn is_invalid_message(r: &Result<String, NegotiationError>) -> bool {
    matches!(
        r,
        Err(NegotiationError::ProtocolError(ProtocolError::InvalidMessage))
    )
}

fn is_eof(r: &Result<String, NegotiationError>) -> bool {
    matches!(r, Err(NegotiationError::ProtocolError(ProtocolError::IoError(e))) if e.kind() == io::ErrorKind::UnexpectedEof)
}

#[tokio::test]
async fn listener_rejects_bad_frames() {
    let header = line(HEADER);
    let after_header = |rest: &[u8]| [&header[..], rest].concat();
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("overflowing varint", vec![0xff; 12]),
        ("varint too long for a line", vec![0xff, 0xff, 0x01]),
        ("non-minimal varint", vec![0x93, 0x00]),
        (
            "length over 1024",
            [&[0x81u8, 0x08][..], &[b'a'; 1025][..]].concat(),
        ),
        ("zero length", vec![0x00]),
        ("missing newline in header", b"\x12/multistream/1.0.0".to_vec()),
        (
            "missing newline in proposal",
            after_header(b"\x14DHTProtocol.rpc_find"),
        ),
        ("non-UTF-8 proposal", after_header(b"\x04\xff\xfe\xfd\n")),
        ("newline inside proposal", after_header(b"\x06ab\ncd\n")),
    ];
    for chunk in [1, 64 * 1024] {
        for (what, input) in &cases {
            let result = listen_to(input, chunk).await;
            assert!(is_invalid_message(&result), "{what} (chunk {chunk}): {result:?}");
        }
    }
}

#[tokio::test]
async fn listener_rejects_oversized_line_without_reading_it() {
    // A prefix announcing 1 MiB: rejected from the prefix alone, the payload is never awaited.
    let (mut raw, b) = duplex(64 * 1024, 64 * 1024);
    let listener = listener_select_proto(b, ["DHTProtocol.rpc_find"]);
    within(raw.write_all(&[0x80, 0x80, 0x40])).await.unwrap();
    let result = within(listener).await.map(|(n, _)| n);
    assert!(
        matches!(
            result,
            Err(NegotiationError::ProtocolError(ProtocolError::InvalidMessage))
        ),
        "{result:?}"
    );
    drop(raw);
}

#[tokio::test]
async fn listener_rejects_invalid_protocol_names() {
    for name in ["", "na", "tab\tname"] {
        let input = [line(HEADER), line(name)].concat();
        let result = listen_to(&input, 64 * 1024).await;
        assert!(
            matches!(
                result,
                Err(NegotiationError::ProtocolError(ProtocolError::InvalidProtocol))
            ),
            "{name:?}: {result:?}"
        );
    }
}

#[tokio::test]
async fn listener_fails_on_other_multistream_versions() {
    for header in ["/multistream/2.0.0", "hello", "DHTProtocol.rpc_find"] {
        let result = listen_to(&line(header), 64 * 1024).await;
        assert!(
            matches!(result, Err(NegotiationError::Failed)),
            "{header}: {result:?}"
        );
    }
}

#[tokio::test]
async fn listener_reports_truncated_input_as_eof() {
    let full = lines(&[HEADER, "DHTProtocol.rpc_find"]);
    for cut in 1..full.len() {
        let result = listen_to(&full[..cut], 1).await;
        assert!(is_eof(&result), "cut at {cut}: {result:?}");
    }
    assert_eq!(listen_to(&full, 1).await.unwrap(), "DHTProtocol.rpc_find");
}

#[tokio::test]
async fn dialer_rejects_bad_answers() {
    let header = line(HEADER);
    let after_header = |rest: &[u8]| [&header[..], rest].concat();
    let invalid: Vec<(&str, Vec<u8>)> = vec![
        ("garbage varint", vec![0xff; 12]),
        ("non-UTF-8 header", b"\x03\xc3\x28\n".to_vec()),
        ("header without newline", b"\x13/multistream/1.0.0x".to_vec()),
        (
            "answer for another protocol",
            after_header(&line("DHTProtocol.rpc_store")),
        ),
        (
            "ls-style answer",
            after_header(&[&[22u8][..], &line("DHTProtocol.rpc_find"), b"\n"].concat()),
        ),
        ("oversized answer", after_header(&[0x90, 0x4e])),
        ("non-UTF-8 answer", after_header(b"\x03\xff\xff\n")),
    ];
    for version in [Version::V1, Version::V1Lazy] {
        for chunk in [1, 64 * 1024] {
            for (what, answer) in &invalid {
                let result = dial_against(answer, chunk, version).await;
                assert!(
                    is_invalid_message(&result),
                    "{what} ({version:?}, chunk {chunk}): {result:?}"
                );
            }
            let other_version = dial_against(&line("/multistream/2.0.0"), chunk, version).await;
            assert!(
                matches!(other_version, Err(NegotiationError::Failed)),
                "{other_version:?}"
            );
            let na = dial_against(&after_header(b"\x03na\n"), chunk, version).await;
            assert!(matches!(na, Err(NegotiationError::Failed)), "{na:?}");
            let truncated = dial_against(&header[..5], chunk, version).await;
            assert!(is_eof(&truncated), "{truncated:?}");
            let silent = dial_against(b"", chunk, version).await;
            assert!(is_eof(&silent), "{silent:?}");
            let good = dial_against(&after_header(&line("DHTProtocol.rpc_find")), chunk, version).await;
            assert_eq!(good.unwrap(), "DHTProtocol.rpc_find");
        }
    }
}

/// A small deterministic generator (xorshift), so failures reproduce.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> usize {
        (self.next() % n) as usize
    }

    /// Random bytes, often built from plausible pieces so that parsing gets deep.
    fn input(&mut self) -> Vec<u8> {
        let pieces: [&[u8]; 8] = [
            b"\x13/multistream/1.0.0\n",
            b"\x15DHTProtocol.rpc_find\n",
            b"\x03na\n",
            b"\x03ls\n",
            b"\x01\n",
            b"\xff",
            b"\x80",
            b"\n",
        ];
        let mut out = Vec::new();
        for _ in 0..self.below(8) {
            if self.below(2) == 0 {
                out.extend_from_slice(pieces[self.below(pieces.len() as u64)]);
            } else {
                for _ in 0..self.below(40) {
                    out.push(self.next() as u8);
                }
            }
        }
        out
    }
}

#[tokio::test]
async fn random_input_never_panics_or_hangs() {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    for _ in 0..1500 {
        let input = rng.input();
        let chunk = 1 + rng.below(16);
        // Any outcome is fine as long as it is an outcome.
        let _ = listen_to(&input, chunk).await;
        let version = if rng.below(2) == 0 {
            Version::V1
        } else {
            Version::V1Lazy
        };
        let _ = dial_against(&input, chunk, version).await;
    }
}
