//! stdout for machines (`--json`) or for people; everything else goes to stderr.

#![allow(clippy::print_stdout)]

use serde_json::{Value as Json, json};

/// Where a command's results go.
#[derive(Debug, Clone, Copy)]
pub struct Output {
    json: bool,
}

impl Output {
    pub fn new(json: bool) -> Self {
        Self { json }
    }

    /// The one `ready` line of a long-running command (`--json`), or its addresses one per line.
    pub fn ready(&self, peer_id: &str, maddrs: &[String], extra: Json) {
        if self.json {
            let mut line = json!({ "event": "ready", "peer_id": peer_id, "maddrs": maddrs });
            if let (Some(line), Json::Object(extra)) = (line.as_object_mut(), extra) {
                line.extend(extra);
            }
            println!("{line}");
        } else {
            for maddr in maddrs {
                println!("{maddr}");
            }
        }
    }

    /// Whether stdout is machine-readable.
    pub fn is_json(&self) -> bool {
        self.json
    }

    /// One JSON event line (`--json` only; people get [`Output::say`]'s text instead).
    pub fn event(&self, value: Json) {
        if self.json {
            println!("{value}");
        }
    }

    /// Text for people (nothing with `--json`).
    pub fn say(&self, text: &str) {
        if !self.json {
            println!("{text}");
        }
    }

    /// A progress bar of `len` steps on stderr (hidden with `--json`).
    pub fn progress(&self, len: u64) -> indicatif::ProgressBar {
        if self.json {
            return indicatif::ProgressBar::hidden();
        }
        let bar = indicatif::ProgressBar::new(len);
        bar.set_style(
            indicatif::ProgressStyle::with_template("{bar:30} step {pos}/{len} {msg} [{elapsed_precise}]")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        bar
    }

    /// The result of a one-shot command: one JSON line, or pretty JSON for people.
    pub fn result(&self, value: Json) {
        if self.json {
            println!("{value}");
        } else {
            println!(
                "{}",
                serde_json::to_string_pretty(&value).unwrap_or_else(|_| value.to_string())
            );
        }
    }
}
