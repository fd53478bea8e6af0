//! The node's status and events, forwarded to the dashboard (`node://status`, `node://event`), to the
//! tray, and, for the ones a user wants to hear about, to desktop notifications.

use apiary_node::{NodeEvent, NodeHandle, NodeStatus};
use tauri::{AppHandle, Emitter, Manager};
use tauri_plugin_notification::{Action, ActionType, NotificationExt};
use tokio::sync::broadcast::error::RecvError;

use crate::tray::{self, Tray};

/// The dashboard's event names.
pub const STATUS: &str = "node://status";
pub const EVENT: &str = "node://event";
pub const LAGGED: &str = "node://lagged";

/// The action type of the "Starting in 10 s because you are away" notification.
pub const STARTING_SOON: &str = "starting-soon";

/// Registers the notifications' buttons and what a click on them does, through the tray's actions:
/// "Cancel" on "Starting in 10 s because you are away" is the tray's "Don't start now"
/// ([`tray::CANCEL_START`]), a click on a notification is "Open dashboard".
fn register_actions(app: &AppHandle) {
    let notifications = app.notification();
    let types = vec![
        ActionType::builder(STARTING_SOON)
            .actions(vec![Action::builder(tray::CANCEL_START, "Cancel").build()])
            .build(),
    ];
    if let Err(e) = notifications.register_action_types(types) {
        tracing::warn!("notification buttons unavailable: {e}");
    }
    let app = app.clone();
    let registered = notifications.on_action(move |performed| {
        let action = performed.action_id();
        tracing::info!(%action, "notification action");
        let tray_action = match action {
            tray::CANCEL_START => tray::CANCEL_START,
            "tap" => "open",
            _ => return,
        };
        let app = app.clone();
        tauri::async_runtime::spawn(async move {
            if let Err(e) = tray::act(&app, tray_action).await {
                tracing::warn!(action = tray_action, "notification action failed: {e}");
            }
        });
    });
    if let Err(e) = registered {
        tracing::warn!("notification clicks unavailable: {e}");
    }
}

/// Forwards until the node stops.
pub fn spawn(app: AppHandle, node: NodeHandle) {
    register_actions(&app);
    tauri::async_runtime::spawn(async move {
        let mut status = node.status();
        let mut events = node.events();
        let mut error = false;
        let mut starting_soon = false;
        show(&app, &node, error);
        loop {
            tokio::select! {
                changed = status.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    let now = status.borrow_and_update().clone();
                    let _ = app.emit(STATUS, &now);
                    let soon = crate::tray::starting_soon(&now);
                    if soon && !starting_soon {
                        let (title, body) = starting_soon_notification(&now);
                        let shown = app
                            .notification()
                            .builder()
                            .title(title)
                            .body(body)
                            .action_type_id(STARTING_SOON)
                            .show();
                        if let Err(e) = shown {
                            tracing::warn!("cannot show a notification: {e}");
                        }
                    }
                    starting_soon = soon;
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

/// "Starting in 10 s because you are away", with a Cancel button (notification servers without
/// buttons show the text alone: the tray menu and the dashboard offer the same).
pub fn starting_soon_notification(status: &NodeStatus) -> (String, String) {
    (
        status.reason.clone(),
        "Cancel to stay paused until you are back (also \u{201c}Don't start now\u{201d} in the tray menu)."
            .to_owned(),
    )
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
