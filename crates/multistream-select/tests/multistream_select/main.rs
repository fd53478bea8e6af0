//! Integration tests of the clean-room multistream-select: negotiations over in-memory pipes,
//! the exact bytes on the wire, malformed input, and a real libp2p swarm running on top of it.

// `allow-unwrap-in-tests` does not reach the helpers and the pipe, which are not `#[test]`s.
#![allow(clippy::unwrap_used)]

mod libp2p_ping;
mod malformed;
mod negotiation;
mod p2pd;
mod pipe;
mod wire;

use std::{future::Future, time::Duration};

/// Runs `fut` to completion, failing the test instead of hanging if it deadlocks.
async fn within<F: Future>(fut: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(20), fut)
        .await
        .expect("negotiation deadlocked or hung")
}

/// `uvarint(len(text) + 1) || text '\n'`, written independently of the crate's encoder.
fn line(text: &str) -> Vec<u8> {
    let mut out = Vec::new();
    let mut len = text.len() + 1;
    loop {
        let byte = (len & 0x7f) as u8;
        len >>= 7;
        if len == 0 {
            out.push(byte);
            break;
        }
        out.push(byte | 0x80);
    }
    out.extend_from_slice(text.as_bytes());
    out.push(b'\n');
    out
}

/// Concatenation of several [`line`]s.
fn lines(texts: &[&str]) -> Vec<u8> {
    texts.iter().flat_map(|t| line(t)).collect()
}

const HEADER: &str = "/multistream/1.0.0";
