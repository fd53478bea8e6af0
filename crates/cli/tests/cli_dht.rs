//! The real `apiary` binary: `apiary dht` as a long-running node, `apiary dht get/store` one-shots, real
//! hivemind 1.1.12 peers reading and writing through it, exit codes and clean shutdown.

mod common;

use std::process::Command;
use std::time::Duration;

use apiary_testkit::HivemindPeer;
use common::{APIARY, Node, apiary, hivemind};
use serde_json::json;

#[test]
fn store_and_get_through_the_cli_and_with_hivemind() {
    let node = Node::start(&["dht"]);
    let m = node.maddr();
    let client = ["--host-maddrs", "/ip4/127.0.0.1/tcp/0", "--initial-peers", &m];

    // Apiary ⇄ Apiary, regular (a msgpack tuple) and dictionary values.
    let stored = apiary(
        &[
            &[
                "dht",
                "store",
                "expert.0.5",
                r#"{"tuple": ["expert.0.5", "QmPeer"]}"#,
            ][..],
            &client,
        ]
        .concat(),
    );
    assert_eq!(stored, json!({"ok": true}));
    let got = apiary(&[&["dht", "get", "expert.0.5"][..], &client].concat());
    assert_eq!(got["found"], true);
    assert_eq!(got["kind"], "regular");
    assert_eq!(got["value"], json!({"tuple": ["expert.0.5", "QmPeer"]}));
    assert!(got["expiration"].as_f64().unwrap() > 1.7e9);
    let stored = apiary(
        &[
            &[
                "dht",
                "store",
                "attendees",
                "5",
                "--subkey",
                r#""alice""#,
                "--ttl",
                "120",
            ][..],
            &client,
        ]
        .concat(),
    );
    assert_eq!(stored, json!({"ok": true}));

    // hivemind reads what Apiary stored, through the Apiary node, and writes beside it.
    let read = hivemind("dht-get", &["--initial-peers", &m, "--key", "attendees"]);
    assert_eq!(read["kind"], "dictionary");
    assert_eq!(read["value"], json!({"alice": 5}));
    let read = hivemind("dht-get", &["--initial-peers", &m, "--key", "expert.0.5"]);
    assert_eq!(
        read["value"],
        json!(["expert.0.5", "QmPeer"]),
        "a tuple, which JSON shows as a list"
    );
    let wrote = hivemind(
        "dht-store",
        &[
            "--initial-peers",
            &m,
            "--key",
            "attendees",
            "--subkey",
            r#""bob""#,
            "--value",
            "[1, 2.5, null]",
        ],
    );
    assert_eq!(wrote["ok"], true);

    // Apiary sees both sub-keys, hivemind's list staying a list.
    let got = apiary(&[&["dht", "get", "attendees"][..], &client].concat());
    assert_eq!(got["kind"], "dictionary");
    assert_eq!(got["value"], json!({"alice": 5, "bob": [1, 2.5, null]}));
    assert_eq!(
        apiary(&[&["dht", "get", "nobody-stored-this"][..], &client].concat()),
        json!({"found": false})
    );

    assert!(
        node.terminate().success(),
        "SIGTERM shuts the node down cleanly with exit code 0"
    );
}

#[test]
fn apiary_bootstraps_from_a_hivemind_node() {
    let hivemind_dht = HivemindPeer::spawn("dht", &[], Duration::from_secs(120));
    let m = hivemind_dht.maddr().to_owned();
    let client = ["--host-maddrs", "/ip4/127.0.0.1/tcp/0", "--initial-peers", &m];
    let wrote = hivemind(
        "dht-store",
        &[
            "--initial-peers",
            &m,
            "--key",
            "from-hivemind",
            "--value",
            r#""hello""#,
        ],
    );
    assert_eq!(wrote["ok"], true);
    let got = apiary(&[&["dht", "get", "from-hivemind"][..], &client].concat());
    assert_eq!(got["value"], "hello");
    assert_eq!(
        apiary(&[&["dht", "store", "from-apiary", "[1, 2]"][..], &client].concat()),
        json!({"ok": true})
    );
    let read = hivemind("dht-get", &["--initial-peers", &m, "--key", "from-apiary"]);
    assert_eq!(read["value"], json!([1, 2]));
}

#[test]
fn bad_input_exits_non_zero_with_one_line() {
    let out = Command::new(APIARY)
        .args([
            "--json",
            "dht",
            "store",
            "k",
            "{not json",
            "--host-maddrs",
            "/ip4/127.0.0.1/tcp/0",
        ])
        .output()
        .expect("apiary runs");
    assert!(!out.status.success());
    assert!(out.stdout.is_empty(), "nothing on stdout on failure");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let last = stderr.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("apiary: error:") && last.contains("JSON"),
        "one-line reason, got {stderr:?}"
    );

    let out = Command::new(APIARY)
        .args([
            "--json",
            "dht",
            "get",
            "k",
            "--host-maddrs",
            "/ip4/127.0.0.1/tcp/0",
        ])
        .args([
            "--initial-peers",
            "/ip4/127.0.0.1/tcp/1/p2p/12D3KooWMPymt3FNjWaRrvmrdB3rKj9hWn6av3FE7oApLZSvNjiH",
        ])
        .output()
        .expect("apiary runs");
    assert!(!out.status.success(), "no initial peer answered: a clear failure");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr
            .lines()
            .last()
            .unwrap_or_default()
            .starts_with("apiary: error:"),
        "{stderr}"
    );
}
