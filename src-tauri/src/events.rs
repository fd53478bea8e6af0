//! The node's status and events, forwarded to the dashboard (`node://status`, `node://event`), to the
//! tray, and, for the ones a user wants to hear about, to desktop notifications.

use apiary_node::{NodeEvent, NodeHandle};
use tauri::{AppHandle, Emitter, Manager};
use tauri_plugin_notification::NotificationExt;
use tokio::sync::broadcast::error::RecvError;

use crate::tray::Tray;

/// The dashboard's event names.
pub const STATUS: &str = "node://status";
pub const EVENT: &str = "node://event";
pub const LAGGED: &str = "node://lagged";

/// Forwards until the node stops.
pub fn spawn(app: AppHandle, node: NodeHandle) {
    tauri::async_runtime::spawn(async move {
        let mut status = node.status();
        let mut events = node.events();
        let mut error = false;
        show(&app, &node, error);
        loop {
            tokio::select! {
                changed = status.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    let now = status.borrow_and_update().clone();
                    let _ = app.emit(STATUS, &now);
                    show(&app, &node, error);
                }
                event = events.recv() => match event {
                    Ok(event) => {
                        let _ = app.emit(EVENT, &event);
                        match &event {
                            NodeEvent::Error { .. } => error = true,
                            NodeEvent::Resumed { .. } | NodeEvent::Joined { .. } => error = false,
                            _ => {}
                        }
                        if let Some((title, body)) = notification(&event) {
                            let _ = app.notification().builder().title(title).body(body).show();
                        }
                        show(&app, &node, error);
                    }
                    Err(RecvError::Lagged(missed)) => {
                        let _ = app.emit(LAGGED, missed);
                    }
                    Err(RecvError::Closed) => return,
                },
            }
        }
    });
}

fn show(app: &AppHandle, node: &NodeHandle, error: bool) {
    if let Some(tray) = app.try_state::<Tray>() {
        let status = node.status().borrow().clone();
        tray.show(app, &status, node.config().policy.mode, error);
    }
}

/// The events worth a desktop notification, as (title, body).
pub fn notification(event: &NodeEvent) -> Option<(String, String)> {
    match event {
        NodeEvent::Left { id, reason } if reason != "you left" => {
            Some((format!("Left {id}"), capitalized(reason)))
        }
        NodeEvent::Paused { reason } if !reason.contains("by you") => {
            Some(("Apiary paused".to_owned(), capitalized(reason)))
        }
        NodeEvent::Error { message } => Some(("Apiary: something failed".to_owned(), message.clone())),
        _ => None,
    }
}

fn capitalized(text: &str) -> String {
    let mut chars = text.chars();
    match chars.next() {
        Some(c) => c.to_uppercase().chain(chars).collect(),
        None => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_is_worth_a_notification() {
        let finished = NodeEvent::Left {
            id: "local-demo".into(),
            reason: "the publisher marked the experiment finished".into(),
        };
        assert_eq!(
            notification(&finished),
            Some((
                "Left local-demo".into(),
                "The publisher marked the experiment finished".into()
            ))
        );
        let by_hand = NodeEvent::Left {
            id: "local-demo".into(),
            reason: "you left".into(),
        };
        assert_eq!(notification(&by_hand), None);
        let game = NodeEvent::Paused {
            reason: "A fullscreen app is in front".into(),
        };
        assert!(notification(&game).is_some());
        let mine = NodeEvent::Paused {
            reason: "Paused by you".into(),
        };
        assert_eq!(notification(&mine), None);
        assert_eq!(
            notification(&NodeEvent::Resumed {
                reason: "you are away".into()
            }),
            None
        );
    }
}
