//! Dialer against listener, both from this crate, over in-memory pipes.

use std::{future::Future, io};

use futures::{
    AsyncReadExt, AsyncWriteExt,
    future::{join, try_join},
    io::{IoSlice, IoSliceMut},
};
use multistream_select::{
    DialerSelectFuture, ListenerSelectFuture, Negotiated, NegotiationError, Version, dialer_select_proto,
    listener_select_proto,
};

use crate::{
    HEADER, line, lines,
    pipe::{Endpoint, duplex},
    within,
};

const VERSIONS: [Version; 2] = [Version::V1, Version::V1Lazy];
/// Whole-message transfers and byte-at-a-time transfers.
const CHUNKS: [usize; 3] = [1, 7, 64 * 1024];

/// Exchanges a request and a response over a negotiated pair, in both directions at once.
async fn exchange(mut dialer: Negotiated<Endpoint>, mut listener: Negotiated<Endpoint>) {
    let request: Vec<u8> = (0..20_000u32).map(|i| (i % 251) as u8).collect();
    let response: Vec<u8> = (0..30_000u32).map(|i| (i % 241) as u8).collect();
    let dialer_side = async {
        dialer.write_all(&request).await.unwrap();
        dialer.flush().await.unwrap();
        let mut got = vec![0; response.len()];
        dialer.read_exact(&mut got).await.unwrap();
        assert_eq!(got, response, "listener → dialer data corrupted");
        dialer.close().await.unwrap();
    };
    let listener_side = async {
        let mut got = vec![0; request.len()];
        listener.read_exact(&mut got).await.unwrap();
        assert_eq!(got, request, "dialer → listener data corrupted");
        listener.write_all(&response).await.unwrap();
        listener.flush().await.unwrap();
        let mut rest = Vec::new();
        listener.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty(), "unexpected trailing bytes {rest:?}");
    };
    join(dialer_side, listener_side).await;
}

/// Runs a dialer and a listener to completion against each other.
///
/// A lazy dialer resolves before sending anything (its messages leave with the first write,
/// flush or read of the stream), so the dialer's stream is flushed once, as any protocol on top
/// of it would do by writing or reading.
async fn dial_and_listen<D, L, A, B>(
    dialer: D,
    listener: L,
) -> ((A, Negotiated<Endpoint>), (B, Negotiated<Endpoint>))
where
    D: Future<Output = Result<(A, Negotiated<Endpoint>), NegotiationError>>,
    L: Future<Output = Result<(B, Negotiated<Endpoint>), NegotiationError>>,
{
    let dialer = async {
        let (name, mut stream) = dialer.await?;
        stream.flush().await?;
        Ok((name, stream))
    };
    within(try_join(dialer, listener)).await.unwrap()
}

#[tokio::test]
async fn slashless_protocol_is_negotiated_and_carries_data() {
    for version in VERSIONS {
        for chunk in CHUNKS {
            let (a, b) = duplex(4096, chunk);
            let dialer = dialer_select_proto(a, ["DHTProtocol.rpc_find"], version);
            let listener = listener_select_proto(b, ["DHTProtocol.rpc_ping", "DHTProtocol.rpc_find"]);
            let ((chosen, d), (accepted, l)) = dial_and_listen(dialer, listener).await;
            assert_eq!(chosen, "DHTProtocol.rpc_find", "{version:?} chunk {chunk}");
            assert_eq!(accepted, "DHTProtocol.rpc_find", "{version:?} chunk {chunk}");
            within(exchange(d, l)).await;
        }
    }
}

#[tokio::test]
async fn slashed_protocols_still_work() {
    for version in VERSIONS {
        let (a, b) = duplex(4096, 64 * 1024);
        let dialer = dialer_select_proto(a, vec!["/ipfs/ping/1.0.0".to_owned()], version);
        let listener = listener_select_proto(
            b,
            vec!["/ipfs/id/1.0.0".to_owned(), "/ipfs/ping/1.0.0".to_owned()],
        );
        let ((chosen, d), (accepted, l)) = dial_and_listen(dialer, listener).await;
        assert_eq!(chosen, "/ipfs/ping/1.0.0");
        assert_eq!(accepted, "/ipfs/ping/1.0.0");
        within(exchange(d, l)).await;
    }
}

#[tokio::test]
async fn dialer_falls_back_after_na() {
    for version in VERSIONS {
        for chunk in CHUNKS {
            let (a, b) = duplex(4096, chunk);
            let log = a.write_log();
            let dialer = dialer_select_proto(
                a,
                [
                    "ExampleServicer.rpc_square",
                    "/yamux/1.0.0",
                    "ns::GradientAverager.rpc_join_group",
                ],
                version,
            );
            let listener = listener_select_proto(b, ["ns::GradientAverager.rpc_join_group"]);
            let ((chosen, d), (accepted, l)) = dial_and_listen(dialer, listener).await;
            assert_eq!(chosen, "ns::GradientAverager.rpc_join_group");
            assert_eq!(accepted, "ns::GradientAverager.rpc_join_group");
            within(exchange(d, l)).await;
            // Proposals went out in order, the header only once.
            let sent = log.bytes();
            let expected = lines(&[
                HEADER,
                "ExampleServicer.rpc_square",
                "/yamux/1.0.0",
                "ns::GradientAverager.rpc_join_group",
            ]);
            assert_eq!(
                &sent[..expected.len()],
                &expected[..],
                "{version:?} chunk {chunk}"
            );
        }
    }
}

#[tokio::test]
async fn both_sides_fail_when_nothing_matches() {
    let (a, b) = duplex(4096, 64 * 1024);
    let dialer = dialer_select_proto(a, ["DHTProtocol.rpc_store", "/ipfs/ping/1.0.0"], Version::V1);
    let listener = listener_select_proto(b, ["DHTProtocol.rpc_find"]);
    let (dialed, listened) = within(join(dialer, listener)).await;
    assert!(matches!(dialed, Err(NegotiationError::Failed)), "{dialed:?}");
    // The listener answered `na` twice, then the dialer gave up and dropped the stream.
    assert!(matches!(listened, Err(NegotiationError::Failed)), "{listened:?}");
}

#[tokio::test]
async fn lazy_rejection_surfaces_on_the_stream() {
    let (a, b) = duplex(4096, 64 * 1024);
    // The lazy dialer resolves before the listener even runs.
    let (chosen, negotiated) = within(dialer_select_proto(a, ["DHTProtocol.rpc_find"], Version::V1Lazy))
        .await
        .unwrap();
    assert_eq!(chosen, "DHTProtocol.rpc_find");
    let listener = listener_select_proto(b, ["DHTProtocol.rpc_ping"]);
    let (completed, listened) = within(join(negotiated.complete(), listener)).await;
    assert!(
        matches!(completed, Err(NegotiationError::Failed)),
        "{completed:?}"
    );
    assert!(matches!(listened, Err(NegotiationError::Failed)), "{listened:?}");
}

#[tokio::test]
async fn lazy_rejection_fails_reads_writes_and_close() {
    let (a, b) = duplex(4096, 64 * 1024);
    let (_, mut negotiated) = within(dialer_select_proto(a, ["DHTProtocol.rpc_find"], Version::V1Lazy))
        .await
        .unwrap();
    let listener = async move {
        let result = listener_select_proto(b, ["DHTProtocol.rpc_ping"]).await;
        assert!(result.is_err());
    };
    // The dialer's stream must be dropped at the end, or the listener waits for more.
    let dialer = async move {
        let mut buf = [0u8; 16];
        let err = negotiated.read(&mut buf).await.unwrap_err();
        let inner = err.get_ref().and_then(|e| e.downcast_ref::<NegotiationError>());
        assert!(matches!(inner, Some(NegotiationError::Failed)), "{err:?}");
        assert!(negotiated.write(b"more").await.is_err());
        assert!(negotiated.close().await.is_err());
    };
    within(join(dialer, listener)).await;
}

#[tokio::test]
async fn lazy_dialer_writes_before_confirmation() {
    for chunk in CHUNKS {
        let (a, b) = duplex(64 * 1024, chunk);
        let log = a.write_log();
        let (_, mut dialer) = within(dialer_select_proto(a, ["DHTProtocol.rpc_find"], Version::V1Lazy))
            .await
            .unwrap();
        // Nothing was sent by the dialer future itself.
        assert!(log.writes().is_empty());
        // Data written now travels behind the pending proposal, before any confirmation.
        within(async {
            dialer.write_all(b"request-before-confirmation").await.unwrap();
            dialer.flush().await.unwrap();
        })
        .await;
        let mut expected = lines(&[HEADER, "DHTProtocol.rpc_find"]);
        expected.extend_from_slice(b"request-before-confirmation");
        assert_eq!(log.bytes(), expected, "chunk {chunk}");

        let (accepted, mut listener) = within(listener_select_proto(b, ["DHTProtocol.rpc_find"]))
            .await
            .unwrap();
        assert_eq!(accepted, "DHTProtocol.rpc_find");
        let mut got = [0u8; 27];
        within(listener.read_exact(&mut got)).await.unwrap();
        assert_eq!(&got, b"request-before-confirmation");
        within(async {
            listener.write_all(b"response").await.unwrap();
            listener.flush().await.unwrap();
        })
        .await;
        let mut got = [0u8; 8];
        within(dialer.read_exact(&mut got)).await.unwrap();
        assert_eq!(&got, b"response");
    }
}

#[tokio::test]
async fn lazy_dialer_coalesces_first_write_with_proposal() {
    let (a, b) = duplex(64 * 1024, 64 * 1024);
    let log = a.write_log();
    let (_, mut dialer) = within(dialer_select_proto(a, ["/noise"], Version::V1Lazy))
        .await
        .unwrap();
    within(async {
        dialer.write_all(&[0xaa; 32]).await.unwrap();
        dialer.flush().await.unwrap();
    })
    .await;
    let mut expected = lines(&[HEADER, "/noise"]);
    expected.extend_from_slice(&[0xaa; 32]);
    assert_eq!(
        log.writes(),
        vec![expected],
        "header, proposal and data must leave in one write"
    );
    drop(b);
}

#[tokio::test]
async fn lazy_dialer_large_first_write_is_not_buffered_whole() {
    let (a, b) = duplex(1024 * 1024, 1024 * 1024);
    let log = a.write_log();
    let (_, mut dialer) = within(dialer_select_proto(a, ["/noise"], Version::V1Lazy))
        .await
        .unwrap();
    let big = vec![0x55; 100 * 1024];
    within(async {
        dialer.write_all(&big).await.unwrap();
        dialer.flush().await.unwrap();
    })
    .await;
    let writes = log.writes();
    assert_eq!(
        writes[0],
        lines(&[HEADER, "/noise"]),
        "pending messages go out first"
    );
    assert_eq!(writes[1..].concat(), big);
    drop(b);
}

#[tokio::test]
async fn lazy_close_waits_for_confirmation() {
    let (a, b) = duplex(4096, 64 * 1024);
    let (_, mut dialer) = within(dialer_select_proto(a, ["DHTProtocol.rpc_find"], Version::V1Lazy))
        .await
        .unwrap();
    let listener = async move {
        let (_, mut l) = listener_select_proto(b, ["DHTProtocol.rpc_find"]).await.unwrap();
        let mut got = Vec::new();
        l.read_to_end(&mut got).await.unwrap();
        got
    };
    let dialer_side = async {
        dialer.write_all(b"one-way").await.unwrap();
        dialer.close().await.unwrap();
    };
    let (_, got) = within(join(dialer_side, listener)).await;
    assert_eq!(got, b"one-way");
}

#[tokio::test]
async fn complete_resolves_after_confirmation() {
    let (a, b) = duplex(4096, 3);
    let (_, dialer) = within(dialer_select_proto(a, ["DHTProtocol.rpc_find"], Version::V1Lazy))
        .await
        .unwrap();
    let listener = listener_select_proto(b, ["DHTProtocol.rpc_find"]);
    let (completed, listened) = within(join(dialer.complete(), listener)).await;
    let dialer = completed.unwrap();
    let (_, mut listener) = listened.unwrap();
    // A completed stream completes again at once.
    let mut dialer = within(dialer.complete()).await.unwrap();
    within(async {
        listener.write_all(b"ok").await.unwrap();
        listener.flush().await.unwrap();
        let mut got = [0u8; 2];
        dialer.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"ok");
    })
    .await;
}

#[tokio::test]
async fn protocol_bytes_read_with_the_confirmation_are_kept() {
    // The listener's answer and its first protocol bytes arrive in one chunk; the dialer must
    // hand the protocol bytes out, not swallow them with the negotiation.
    let (a, mut raw) = duplex(4096, 64 * 1024);
    let dialer = dialer_select_proto(a, ["DHTProtocol.rpc_find"], Version::V1);
    let remote = async move {
        let mut proposal = vec![0u8; lines(&[HEADER, "DHTProtocol.rpc_find"]).len()];
        raw.read_exact(&mut proposal).await.unwrap();
        let mut answer = lines(&[HEADER, "DHTProtocol.rpc_find"]);
        answer.extend_from_slice(b"early protocol bytes");
        raw.write_all(&answer).await.unwrap();
        raw.close().await.unwrap();
        raw
    };
    let (dialed, _raw) = within(join(dialer, remote)).await;
    let (_, mut dialer) = dialed.unwrap();
    let mut got = Vec::new();
    within(dialer.read_to_end(&mut got)).await.unwrap();
    assert_eq!(got, b"early protocol bytes");
}

#[tokio::test]
async fn vectored_io_goes_through() {
    for version in VERSIONS {
        let (a, b) = duplex(4096, 64 * 1024);
        let dialer = dialer_select_proto(a, ["DHTProtocol.rpc_find"], version);
        let listener = listener_select_proto(b, ["DHTProtocol.rpc_find"]);
        let ((_, mut d), (_, mut l)) = dial_and_listen(dialer, listener).await;
        within(async {
            let bufs = [
                IoSlice::new(b"hello "),
                IoSlice::new(b"vectored "),
                IoSlice::new(b"world"),
            ];
            let n = d.write_vectored(&bufs).await.unwrap();
            assert!(n > 0);
            let all = b"hello vectored world";
            d.write_all(&all[n..]).await.unwrap();
            d.flush().await.unwrap();

            // Read into two buffers until both are full, whatever each call delivers.
            let mut out = [0u8; 20];
            let mut read = 0;
            while read < all.len() {
                let (first, second) = out.split_at_mut(6);
                let n = if read < 6 {
                    let mut bufs = [IoSliceMut::new(&mut first[read..]), IoSliceMut::new(second)];
                    l.read_vectored(&mut bufs).await.unwrap()
                } else {
                    let mut bufs = [IoSliceMut::new(&mut second[read - 6..])];
                    l.read_vectored(&mut bufs).await.unwrap()
                };
                assert!(n > 0, "{version:?}");
                read += n;
            }
            assert_eq!(&out, all, "{version:?}");
        })
        .await;
    }
}

#[tokio::test]
async fn listener_sends_header_to_a_dialer_that_waits_for_it() {
    // A strict dialer that sends only the header, then waits for the listener's header before
    // proposing: the listener must not hold its header back to coalesce it with an answer.
    let (mut raw, b) = duplex(4096, 64 * 1024);
    let listener = listener_select_proto(b, ["DHTProtocol.rpc_find"]);
    let dialer = async move {
        raw.write_all(&line(HEADER)).await.unwrap();
        let mut header = vec![0u8; line(HEADER).len()];
        raw.read_exact(&mut header).await.unwrap();
        assert_eq!(header, line(HEADER));
        raw.write_all(&line("DHTProtocol.rpc_find")).await.unwrap();
        let mut echo = vec![0u8; line("DHTProtocol.rpc_find").len()];
        raw.read_exact(&mut echo).await.unwrap();
        assert_eq!(echo, line("DHTProtocol.rpc_find"));
        raw
    };
    let (listened, _raw) = within(join(listener, dialer)).await;
    assert_eq!(listened.unwrap().0, "DHTProtocol.rpc_find");
}

#[tokio::test]
async fn invalid_names_are_skipped_by_dialer_and_listener() {
    let (a, b) = duplex(4096, 64 * 1024);
    let log = a.write_log();
    let dialer = dialer_select_proto(a, ["", "na", "bad\nname", "DHTProtocol.rpc_find"], Version::V1);
    let listener = listener_select_proto(b, ["", "ls", "DHTProtocol.rpc_find"]);
    let ((chosen, _), (accepted, _)) = dial_and_listen(dialer, listener).await;
    assert_eq!(
        (chosen, accepted),
        ("DHTProtocol.rpc_find", "DHTProtocol.rpc_find")
    );
    assert_eq!(log.writes()[0], lines(&[HEADER, "DHTProtocol.rpc_find"]));

    let (a, _b) = duplex(4096, 64 * 1024);
    let only_invalid = within(dialer_select_proto(a, ["", "na"], Version::V1)).await;
    assert!(
        matches!(
            only_invalid,
            Err(NegotiationError::ProtocolError(
                multistream_select::ProtocolError::InvalidProtocol
            ))
        ),
        "{only_invalid:?}"
    );
    let (a, _b) = duplex(4096, 64 * 1024);
    let empty = within(dialer_select_proto(a, Vec::<String>::new(), Version::V1)).await;
    assert!(matches!(empty, Err(NegotiationError::Failed)), "{empty:?}");
}

#[tokio::test]
async fn eof_before_anything_is_an_io_error() {
    let (a, b) = duplex(4096, 64 * 1024);
    drop(a);
    let result = within(listener_select_proto(b, ["DHTProtocol.rpc_find"])).await;
    match result {
        Err(NegotiationError::ProtocolError(multistream_select::ProtocolError::IoError(e))) => {
            assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof)
        }
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn futures_and_streams_are_send_and_unpin() {
    fn send_unpin<T: Send + Unpin>() {}
    send_unpin::<DialerSelectFuture<Endpoint, std::vec::IntoIter<String>>>();
    send_unpin::<DialerSelectFuture<Endpoint, std::array::IntoIter<&'static str, 2>>>();
    send_unpin::<ListenerSelectFuture<Endpoint, String>>();
    send_unpin::<ListenerSelectFuture<Endpoint, &'static str>>();
    send_unpin::<Negotiated<Endpoint>>();
    send_unpin::<multistream_select::NegotiatedComplete<Endpoint>>();
    fn error<T: std::error::Error + Send + Sync + 'static>() {}
    error::<NegotiationError>();
    error::<multistream_select::ProtocolError>();
    assert_eq!(Version::default(), Version::V1);
}
