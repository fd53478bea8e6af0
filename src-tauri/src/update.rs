//! Signed updates (tauri-plugin-updater). The release feed's address and the minisign public key that
//! every update must be signed with are in `tauri.conf.json` (`plugins.updater`); the private key is
//! the release manager's and never in the repository. Nothing is checked behind the user's back: the
//! dashboard's Settings and the tray's "Check for updates…" ask, and installing restarts the app after
//! the node has left its experiments cleanly.
//!
//! `APIARY_UPDATE_ENDPOINT` replaces the feed's address (a mirror, or a test's loopback server; plain
//! `http` is accepted for loopback addresses only, and only by debug builds: the plugin refuses it in
//! release builds).

use serde::Serialize;
use tauri::AppHandle;
use tauri_plugin_updater::{Updater, UpdaterExt};

use crate::error::UiError;

/// The environment variable that replaces the feed's address.
pub const ENDPOINT_ENV: &str = "APIARY_UPDATE_ENDPOINT";

/// A newer release the feed offers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct UpdateInfo {
    /// Its version.
    pub version: String,
    /// This app's version.
    pub current_version: String,
    /// Release notes, if the feed has them.
    pub notes: Option<String>,
    /// Its publication date (RFC 3339), if the feed has it.
    pub date: Option<String>,
}

fn failed(e: impl std::fmt::Display) -> UiError {
    UiError {
        code: "update_failed",
        message: format!("update check failed: {e}"),
    }
}

fn updater(app: &AppHandle) -> Result<Updater, UiError> {
    let mut builder = app.updater_builder();
    if let Ok(text) = std::env::var(ENDPOINT_ENV) {
        let url = endpoint(&text).map_err(UiError::bad_request)?;
        builder = builder.endpoints(vec![url]).map_err(failed)?;
    }
    builder.build().map_err(failed)
}

/// Parses an endpoint override: `https`, or `http` to a loopback address.
pub fn endpoint(text: &str) -> Result<url::Url, String> {
    let url = url::Url::parse(text).map_err(|e| format!("{ENDPOINT_ENV}: `{text}` is not a URL: {e}"))?;
    let loopback = match url.host() {
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        Some(url::Host::Domain(d)) => d == "localhost",
        None => false,
    };
    match url.scheme() {
        "https" => Ok(url),
        "http" if loopback => Ok(url),
        _ => Err(format!(
            "{ENDPOINT_ENV}: updates are fetched over https (plain http only from this computer), not `{text}`"
        )),
    }
}

/// Asks the feed whether a newer release exists.
pub async fn check(app: &AppHandle) -> Result<Option<UpdateInfo>, UiError> {
    let update = updater(app)?.check().await.map_err(failed)?;
    Ok(update.map(|u| UpdateInfo {
        version: u.version.clone(),
        current_version: u.current_version.clone(),
        notes: u.body.clone(),
        date: u.date.map(|d| d.to_string()),
    }))
}

/// Downloads the newer release, checks its signature, installs it, leaves the experiments cleanly and
/// restarts. `Ok(false)`: there was nothing newer.
pub async fn install(app: &AppHandle) -> Result<bool, UiError> {
    let Some(update) = updater(app)?.check().await.map_err(failed)? else {
        return Ok(false);
    };
    tracing::info!(version = %update.version, "downloading the update");
    let failed = |e: tauri_plugin_updater::Error| UiError {
        code: "update_failed",
        message: format!("the update was not installed: {e}"),
    };
    // download and verify first; leave the experiments before installing, because on Windows
    // `install` exits the process as soon as the installer has started
    let bytes = update
        .download(|_, _| {}, || tracing::info!("update downloaded and verified"))
        .await
        .map_err(failed)?;
    if let Some(state) = tauri::Manager::try_state::<crate::commands::AppState>(app)
        && let Err(e) = state.node.shutdown().await
    {
        tracing::warn!("stopping the node before installing: {e}");
    }
    if let Err(e) = update.install(bytes) {
        // the node is stopped already: restarting this version brings it back
        tracing::warn!("the update was not installed ({e}): restarting this version");
    }
    app.restart()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_overrides_are_https_or_loopback_http() {
        assert!(endpoint("https://updates.example.org/latest.json").is_ok());
        assert!(endpoint("http://127.0.0.1:8080/latest.json").is_ok());
        assert!(endpoint("http://[::1]:8080/latest.json").is_ok());
        assert!(endpoint("http://localhost:9/x").is_ok());
        let e = endpoint("http://updates.example.org/latest.json").unwrap_err();
        assert!(e.contains("https"), "{e}");
        assert!(endpoint("ftp://127.0.0.1/x").is_err());
        assert!(endpoint("not a url").unwrap_err().contains("not a URL"));
    }

    /// The shipped configuration: a well-formed minisign public key (updates signed with anything
    /// else are refused by the plugin) and an https feed.
    #[test]
    fn the_shipped_updater_config_has_a_minisign_key_and_an_https_feed() {
        let conf: serde_json::Value = serde_json::from_str(include_str!("../tauri.conf.json")).unwrap();
        let updater = &conf["plugins"]["updater"];
        let pubkey = updater["pubkey"].as_str().expect("plugins.updater.pubkey");
        let key = minisign_verify::PublicKey::decode(
            &String::from_utf8(base64_decode(pubkey)).expect("the key file is text"),
        )
        .expect("a minisign public key");
        drop(key);
        let endpoints = updater["endpoints"]
            .as_array()
            .expect("plugins.updater.endpoints");
        assert!(!endpoints.is_empty());
        for e in endpoints {
            let e = e.as_str().unwrap();
            assert!(e.starts_with("https://"), "{e}");
        }
    }

    fn base64_decode(text: &str) -> Vec<u8> {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD
            .decode(text.trim())
            .expect("base64")
    }
}
