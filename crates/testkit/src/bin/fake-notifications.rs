//! A fake desktop notification server for end-to-end tests (`tests/e2e/desktop.mjs`).
//!
//! Owns `org.freedesktop.Notifications` on the session bus (`DBUS_SESSION_BUS_ADDRESS`, e.g. inside
//! `dbus-run-session`) and serves the Desktop Notifications Specification's interface at
//! `/org/freedesktop/Notifications`:
//!
//! - `GetCapabilities() → as`: `["actions", "body"]`
//! - `GetServerInformation() → ssss`
//! - `Notify(susssasa{sv}i) → u`: ids 1, 2, 3, … (a non-zero `replaces_id` is kept)
//! - `CloseNotification(u)`: emits `NotificationClosed(id, 3)` (closed by a call)
//! - signals `ActionInvoked(us)` and `NotificationClosed(uu)`
//!
//! Stdout carries one JSON object per line: `{"ready":true}` once the name is owned, then one line per
//! `Notify` (`id`, `app_name`, `replaces_id`, `summary`, `body`, `actions` as the flat key/label array
//! the client sent, `hints` as the hint keys, `expire_timeout`), `{"closed":id,"reason":r}` per closing
//! and `{"invoked":id,"action":key}` per invoked action.
//!
//! Stdin takes commands, one per line, as a user at the server would act:
//!
//! - `invoke ID KEY`: the user clicked the action `KEY` (`default` for the notification's body): emits
//!   `ActionInvoked(ID, KEY)`, then `NotificationClosed(ID, 2)` (dismissed), as real servers do.
//! - `close ID [REASON]`: emits `NotificationClosed(ID, REASON)` (1 expired, 2 dismissed; default 2).
//!
//! Lines it cannot read are reported as `{"error":…}` and ignored. It exits when stdin closes.

/// The server (the specification is the Linux and BSD desktops').
#[cfg(target_os = "linux")]
mod linux {
    use std::collections::HashMap;
    use std::io::{BufRead, Write};

    use serde_json::{Value, json};
    use zbus::object_server::SignalEmitter;
    use zbus::zvariant::OwnedValue;

    const NAME: &str = "org.freedesktop.Notifications";
    const PATH: &str = "/org/freedesktop/Notifications";

    /// `NotificationClosed` reasons (the specification's).
    const DISMISSED: u32 = 2;
    const CLOSED_BY_CALL: u32 = 3;

    /// One JSON line on stdout (line-buffered, so the test sees it at once).
    fn say(line: &Value) {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{line}");
        let _ = out.flush();
    }

    /// The server's state: the last id handed out.
    #[derive(Debug, Default)]
    struct Server {
        last_id: u32,
    }

    #[zbus::interface(name = "org.freedesktop.Notifications")]
    impl Server {
        fn get_capabilities(&self) -> Vec<String> {
            vec!["actions".to_owned(), "body".to_owned()]
        }

        #[zbus(out_args("name", "vendor", "version", "spec_version"))]
        fn get_server_information(&self) -> (String, String, String, String) {
            (
                "fake-notifications".to_owned(),
                "Apiary tests".to_owned(),
                env!("CARGO_PKG_VERSION").to_owned(),
                "1.2".to_owned(),
            )
        }

        #[allow(clippy::too_many_arguments)] // the specification's signature
        fn notify(
            &mut self,
            app_name: String,
            replaces_id: u32,
            app_icon: String,
            summary: String,
            body: String,
            actions: Vec<String>,
            hints: HashMap<String, OwnedValue>,
            expire_timeout: i32,
        ) -> u32 {
            let id = if replaces_id != 0 {
                replaces_id
            } else {
                self.last_id += 1;
                self.last_id
            };
            let mut hint_keys: Vec<&String> = hints.keys().collect();
            hint_keys.sort();
            say(&json!({
                "id": id,
                "app_name": app_name,
                "replaces_id": replaces_id,
                "app_icon": app_icon,
                "summary": summary,
                "body": body,
                "actions": actions,
                "hints": hint_keys,
                "expire_timeout": expire_timeout,
            }));
            id
        }

        async fn close_notification(
            &self,
            id: u32,
            #[zbus(signal_emitter)] emitter: SignalEmitter<'_>,
        ) -> zbus::fdo::Result<()> {
            Self::notification_closed(&emitter, id, CLOSED_BY_CALL).await?;
            say(&json!({ "closed": id, "reason": CLOSED_BY_CALL }));
            Ok(())
        }

        #[zbus(signal)]
        async fn action_invoked(emitter: &SignalEmitter<'_>, id: u32, action_key: &str) -> zbus::Result<()>;

        #[zbus(signal)]
        async fn notification_closed(emitter: &SignalEmitter<'_>, id: u32, reason: u32) -> zbus::Result<()>;
    }

    /// A command read from stdin.
    #[derive(Debug, PartialEq, Eq)]
    pub(crate) enum Command {
        Invoke { id: u32, action: String },
        Close { id: u32, reason: u32 },
    }

    pub(crate) fn parse(line: &str) -> Result<Command, String> {
        let words: Vec<&str> = line.split_whitespace().collect();
        let id = |word: Option<&&str>| -> Result<u32, String> {
            word.ok_or("no notification id")?
                .parse()
                .map_err(|e| format!("bad notification id: {e}"))
        };
        match words.first().copied() {
            Some("invoke") if words.len() == 3 => Ok(Command::Invoke {
                id: id(words.get(1))?,
                action: words[2].to_owned(),
            }),
            Some("close") if matches!(words.len(), 2 | 3) => Ok(Command::Close {
                id: id(words.get(1))?,
                reason: match words.get(2) {
                    Some(r) => r.parse().map_err(|e| format!("bad reason: {e}"))?,
                    None => DISMISSED,
                },
            }),
            _ => Err("expected `invoke ID KEY` or `close ID [REASON]`".to_owned()),
        }
    }

    async fn run(command: Command, emitter: &SignalEmitter<'_>) -> zbus::Result<()> {
        match command {
            Command::Invoke { id, action } => {
                Server::action_invoked(emitter, id, &action).await?;
                say(&json!({ "invoked": id, "action": action }));
                Server::notification_closed(emitter, id, DISMISSED).await?;
                say(&json!({ "closed": id, "reason": DISMISSED }));
            }
            Command::Close { id, reason } => {
                Server::notification_closed(emitter, id, reason).await?;
                say(&json!({ "closed": id, "reason": reason }));
            }
        }
        Ok(())
    }

    pub fn main() -> Result<(), Box<dyn std::error::Error>> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        runtime.block_on(async {
            let connection = zbus::connection::Builder::session()?
                .name(NAME)?
                .serve_at(PATH, Server::default())?
                .build()
                .await?;
            say(&json!({ "ready": true }));

            // stdin is read on a thread of its own (blocking reads), handed over one line at a time
            let (lines, mut commands) = tokio::sync::mpsc::channel::<String>(16);
            std::thread::spawn(move || {
                for line in std::io::stdin().lock().lines() {
                    let Ok(line) = line else { break };
                    if lines.blocking_send(line).is_err() {
                        break;
                    }
                }
            });
            let emitter = SignalEmitter::new(&connection, PATH)?;
            while let Some(line) = commands.recv().await {
                if line.trim().is_empty() {
                    continue;
                }
                let done = match parse(&line) {
                    Ok(command) => run(command, &emitter).await.map_err(|e| e.to_string()),
                    Err(e) => Err(e),
                };
                if let Err(e) = done {
                    say(&json!({ "error": e, "line": line }));
                }
            }
            Ok(())
        })
    }
}

#[cfg(target_os = "linux")]
fn main() -> Result<(), Box<dyn std::error::Error>> {
    linux::main()
}

#[cfg(not(target_os = "linux"))]
fn main() {
    eprintln!("fake-notifications: Linux only (a session-bus service)");
    std::process::exit(2);
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::linux::{Command, parse};

    #[test]
    fn commands() {
        assert_eq!(
            parse("invoke 3 cancel_start"),
            Ok(Command::Invoke {
                id: 3,
                action: "cancel_start".into()
            })
        );
        assert_eq!(parse(" close 4 "), Ok(Command::Close { id: 4, reason: 2 }));
        assert_eq!(parse("close 4 1"), Ok(Command::Close { id: 4, reason: 1 }));
        for bad in [
            "",
            "invoke",
            "invoke x default",
            "invoke 1",
            "close",
            "close 1 x",
            "hello 1 2",
            "invoke -1 a",
        ] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
    }
}
