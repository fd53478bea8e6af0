//! The exact bytes on the wire, against a hand-driven remote.

use futures::{AsyncReadExt, AsyncWriteExt, future::join};
use multistream_select::{Version, dialer_select_proto, listener_select_proto};

use crate::{HEADER, line, lines, pipe::duplex, within};

/// `0x13 "/multistream/1.0.0\n" 0x15 "DHTProtocol.rpc_find\n"`, spelled out.
const HEADER_AND_RPC_FIND: &[u8] = b"\x13/multistream/1.0.0\n\x15DHTProtocol.rpc_find\n";

#[tokio::test]
async fn v1_dialer_first_write_is_header_and_proposal() {
    let (a, mut raw) = duplex(4096, 64 * 1024);
    let log = a.write_log();
    let dialer = dialer_select_proto(a, ["DHTProtocol.rpc_find"], Version::V1);
    let remote = async move {
        let mut got = vec![0u8; HEADER_AND_RPC_FIND.len()];
        raw.read_exact(&mut got).await.unwrap();
        assert_eq!(got, HEADER_AND_RPC_FIND);
        raw.write_all(HEADER_AND_RPC_FIND).await.unwrap();
        raw
    };
    let (dialed, _raw) = within(join(dialer, remote)).await;
    assert_eq!(dialed.unwrap().0, "DHTProtocol.rpc_find");
    assert_eq!(
        log.writes(),
        vec![HEADER_AND_RPC_FIND.to_vec()],
        "one write, exactly the spec bytes"
    );
}

#[tokio::test]
async fn v1_dialer_sends_next_proposal_after_na_without_repeating_header() {
    let (a, mut raw) = duplex(4096, 64 * 1024);
    let dialer = dialer_select_proto(a, ["/yamux/1.0.0", "DHTProtocol.rpc_find"], Version::V1);
    let remote = async move {
        let first = lines(&[HEADER, "/yamux/1.0.0"]);
        let mut got = vec![0u8; first.len()];
        raw.read_exact(&mut got).await.unwrap();
        assert_eq!(got, first);
        raw.write_all(b"\x13/multistream/1.0.0\n\x03na\n").await.unwrap();
        let mut got = vec![0u8; 22];
        raw.read_exact(&mut got).await.unwrap();
        assert_eq!(got, b"\x15DHTProtocol.rpc_find\n");
        raw.write_all(b"\x15DHTProtocol.rpc_find\n").await.unwrap();
        raw
    };
    let (dialed, _raw) = within(join(dialer, remote)).await;
    assert_eq!(dialed.unwrap().0, "DHTProtocol.rpc_find");
}

#[tokio::test]
async fn lazy_dialer_sends_the_same_bytes() {
    let (a, mut raw) = duplex(4096, 64 * 1024);
    let (_, mut dialer) = within(dialer_select_proto(a, ["DHTProtocol.rpc_find"], Version::V1Lazy))
        .await
        .unwrap();
    within(dialer.flush()).await.unwrap();
    let mut got = vec![0u8; HEADER_AND_RPC_FIND.len()];
    within(raw.read_exact(&mut got)).await.unwrap();
    assert_eq!(got, HEADER_AND_RPC_FIND);
}

#[tokio::test]
async fn listener_answers_with_spec_bytes() {
    let (mut raw, b) = duplex(4096, 64 * 1024);
    let log = b.write_log();
    let listener = listener_select_proto(b, ["DHTProtocol.rpc_find"]);
    let remote = async move {
        raw.write_all(HEADER_AND_RPC_FIND).await.unwrap();
        let mut got = vec![0u8; HEADER_AND_RPC_FIND.len()];
        raw.read_exact(&mut got).await.unwrap();
        assert_eq!(got, HEADER_AND_RPC_FIND);
        raw
    };
    let (listened, _raw) = within(join(listener, remote)).await;
    assert_eq!(listened.unwrap().0, "DHTProtocol.rpc_find");
    // Header and echo were coalesced into a single write.
    assert_eq!(log.writes(), vec![HEADER_AND_RPC_FIND.to_vec()]);
}

#[tokio::test]
async fn listener_answers_na_then_accepts() {
    let (mut raw, b) = duplex(4096, 64 * 1024);
    let listener = listener_select_proto(b, ["ns::GradientAverager.rpc_join_group"]);
    let remote = async move {
        raw.write_all(HEADER_AND_RPC_FIND).await.unwrap();
        let expected = b"\x13/multistream/1.0.0\n\x03na\n";
        let mut got = vec![0u8; expected.len()];
        raw.read_exact(&mut got).await.unwrap();
        assert_eq!(got, expected);
        raw.write_all(&line("ns::GradientAverager.rpc_join_group"))
            .await
            .unwrap();
        let mut got = vec![0u8; line("ns::GradientAverager.rpc_join_group").len()];
        raw.read_exact(&mut got).await.unwrap();
        assert_eq!(got, b"\x24ns::GradientAverager.rpc_join_group\n");
        raw
    };
    let (listened, _raw) = within(join(listener, remote)).await;
    assert_eq!(listened.unwrap().0, "ns::GradientAverager.rpc_join_group");
}

#[tokio::test]
async fn listener_answers_ls_with_slashless_names() {
    let protocols = ["DHTProtocol.rpc_ping", "DHTProtocol.rpc_find", "/ipfs/ping/1.0.0"];
    let (mut raw, b) = duplex(4096, 64 * 1024);
    let listener = listener_select_proto(b, protocols);
    let remote = async move {
        let mut request = line(HEADER);
        request.extend_from_slice(b"\x03ls\n");
        raw.write_all(&request).await.unwrap();

        let mut header = vec![0u8; line(HEADER).len()];
        raw.read_exact(&mut header).await.unwrap();
        assert_eq!(header, line(HEADER));

        // One message: uvarint(len) || (uvarint(len) name '\n')* '\n'.
        let mut inner = lines(&protocols);
        inner.push(b'\n');
        assert!(inner.len() < 128);
        let mut expected = vec![inner.len() as u8];
        expected.extend_from_slice(&inner);
        let mut got = vec![0u8; expected.len()];
        raw.read_exact(&mut got).await.unwrap();
        assert_eq!(got, expected);
        // Parse it back the way a remote would, to be sure the names survive.
        let mut rest = &got[1..];
        let mut listed = Vec::new();
        while rest != b"\n" {
            let len = rest[0] as usize;
            let (entry, tail) = rest[1..].split_at(len);
            listed.push(std::str::from_utf8(&entry[..len - 1]).unwrap().to_owned());
            rest = tail;
        }
        assert_eq!(listed, protocols);

        // `ls` does not end the negotiation: a proposal still works afterwards.
        raw.write_all(&line("DHTProtocol.rpc_find")).await.unwrap();
        let mut echo = vec![0u8; line("DHTProtocol.rpc_find").len()];
        raw.read_exact(&mut echo).await.unwrap();
        assert_eq!(echo, line("DHTProtocol.rpc_find"));
        raw
    };
    let (listened, _raw) = within(join(listener, remote)).await;
    assert_eq!(listened.unwrap().0, "DHTProtocol.rpc_find");
}

#[tokio::test]
async fn repeated_ls_requests_are_answered_one_at_a_time() {
    // A burst of `ls` requests must not pile up answers in memory: each answer is written out
    // before the next request is read, so a listener whose answers nobody reads stops reading
    // requests, and the sender of the burst stalls too.
    let names: Vec<String> = (0..50).map(|i| format!("Servicer.rpc_{i:03}")).collect();
    let (mut raw, b) = duplex(1024, 64 * 1024);
    let listener = listener_select_proto(b, names);
    let mut burst = line(HEADER);
    for _ in 0..2000 {
        burst.extend_from_slice(&line("ls"));
    }
    let burst_sent = std::cell::Cell::new(false);
    let writer = async {
        raw.write_all(&burst).await.unwrap();
        burst_sent.set(true);
    };
    let stalled = tokio::time::timeout(std::time::Duration::from_millis(300), join(listener, writer)).await;
    assert!(stalled.is_err());
    assert!(
        !burst_sent.get(),
        "the listener kept reading requests while its answers were not read"
    );
}
