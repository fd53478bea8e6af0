//! The Windows and macOS installer configuration in `tauri.conf.json` (`bundle`) and the NSIS hooks it
//! names (`installers/windows/hooks.nsh`). Neither installer can be built on Linux
//! (`installers/README.md`), so this test is what notices when the configuration regresses: a
//! per-machine NSIS installer, hooks that no longer clean up, a committed signing setup or
//! updater-artifact switch, a changed MSI upgrade code.

use std::path::{Path, PathBuf};

use serde_json::Value;

fn src_tauri() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn config() -> Value {
    let path = src_tauri().join("tauri.conf.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).expect("tauri.conf.json is JSON")
}

fn string<'a>(value: &'a Value, what: &str) -> &'a str {
    value
        .as_str()
        .unwrap_or_else(|| panic!("{what} is missing or not a string: {value}"))
}

/// The NSIS hooks file the configuration names, resolved the way the bundler does (relative to
/// `src-tauri/`, the folder `tauri.conf.json` is in), and its text.
fn hooks(conf: &Value) -> (PathBuf, String) {
    let relative = string(
        &conf["bundle"]["windows"]["nsis"]["installerHooks"],
        "bundle.windows.nsis.installerHooks",
    );
    let path = src_tauri().join(relative);
    let path = path
        .canonicalize()
        .unwrap_or_else(|e| panic!("the NSIS hooks file {}: {e}", path.display()));
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("the NSIS hooks file {}: {e}", path.display()));
    (path, text)
}

/// The body of `!macro NAME` … `!macroend` in an NSIS file (comments left out).
fn macro_body(text: &str, name: &str) -> Option<String> {
    let mut lines = text.lines().map(str::trim);
    lines.find(|l| l.split_whitespace().collect::<Vec<_>>() == ["!macro", name])?;
    let body: Vec<&str> = lines
        .take_while(|l| *l != "!macroend")
        .filter(|l| !l.starts_with(';'))
        .collect();
    Some(body.join("\n"))
}

#[test]
fn the_windows_installer_is_per_user_and_its_hooks_clean_up() {
    let conf = config();
    let windows = &conf["bundle"]["windows"];
    assert_eq!(
        string(&windows["nsis"]["installMode"], "bundle.windows.nsis.installMode"),
        "currentUser",
        "the NSIS installer must install for the current user, without administrator rights"
    );
    // the installer makes sure WebView2 is there (it is not skipped)
    assert_eq!(
        string(
            &windows["webviewInstallMode"]["type"],
            "bundle.windows.webviewInstallMode.type"
        ),
        "embedBootstrapper"
    );
    // Windows treats an MSI with another upgrade code as another product: it must never change
    // (this is the code Tauri derives from the productName "Apiary", pinned)
    assert_eq!(
        string(&windows["wix"]["upgradeCode"], "bundle.windows.wix.upgradeCode"),
        "1d20b71b-374f-5fcb-b15f-33538f7109b4"
    );
    // code signing is the release manager's setup (installers/README.md), not the repository's
    for key in ["certificateThumbprint", "signCommand"] {
        assert!(windows.get(key).is_none(), "bundle.windows.{key} is committed");
    }

    let (path, text) = hooks(&conf);
    assert!(
        path.starts_with(
            src_tauri()
                .parent()
                .unwrap()
                .join("installers")
                .canonicalize()
                .unwrap()
        ),
        "{}",
        path.display()
    );
    for hook in [
        "NSIS_HOOK_PREINSTALL",
        "NSIS_HOOK_POSTINSTALL",
        "NSIS_HOOK_PREUNINSTALL",
        "NSIS_HOOK_POSTUNINSTALL",
    ] {
        assert!(
            macro_body(&text, hook).is_some(),
            "{} does not define the macro {hook}",
            path.display()
        );
    }

    // before files are replaced or removed, a running Apiary is asked to quit cleanly
    for hook in ["NSIS_HOOK_PREINSTALL", "NSIS_HOOK_PREUNINSTALL"] {
        let body = macro_body(&text, hook).unwrap();
        assert!(body.contains("!insertmacro APIARY_ASK_TO_QUIT"), "{hook}: {body}");
    }
    let ask = macro_body(&text, "APIARY_ASK_TO_QUIT").expect("the APIARY_ASK_TO_QUIT macro");
    // the hidden window tauri-plugin-single-instance keeps while the app runs
    assert!(
        ask.contains(r#"FindWindow $R9 "${BUNDLEID}-sic" "${BUNDLEID}-siw""#),
        "{ask}"
    );

    let post = macro_body(&text, "NSIS_HOOK_POSTUNINSTALL").unwrap();
    // never during an update
    assert!(post.starts_with("${If} $UpdateMode <> 1"), "{post}");
    // the autostart entries go, whatever the user chose about the data
    assert!(
        post.contains(r#"DeleteRegValue HKCU "${APIARY_RUN_KEY}" "${PRODUCTNAME}""#),
        "{post}"
    );
    assert!(text.contains(r#"!define APIARY_RUN_KEY "Software\Microsoft\Windows\CurrentVersion\Run""#));
    assert!(
        post.contains(r#"DeleteRegValue HKCU "${APIARY_STARTUP_APPROVED_KEY}" "${PRODUCTNAME}""#),
        "{post}"
    );
    // Apiary's own folder (settings and data) goes only when "Delete the application data" is
    // ticked; the folder's name is the node's
    let data_folder = apiary_node::NodeConfig::default()
        .data_dir
        .file_name()
        .and_then(|n| n.to_str())
        .map(str::to_owned)
        .expect("the node's data folder has a name");
    let config_folder = apiary_node::NodeConfig::default_path()
        .unwrap()
        .parent()
        .and_then(Path::file_name)
        .and_then(|n| n.to_str())
        .map(str::to_owned)
        .unwrap();
    assert_eq!(data_folder, config_folder);
    let checkbox = post
        .find("${If} $DeleteAppDataCheckboxState = 1")
        .unwrap_or_else(|| panic!("POSTUNINSTALL does not look at the checkbox: {post}"));
    let remove = post
        .find(&format!(r#"RmDir /r "$APPDATA\{data_folder}""#))
        .unwrap_or_else(|| panic!("POSTUNINSTALL does not remove %APPDATA%\\{data_folder}: {post}"));
    assert!(
        checkbox < remove && !post[checkbox..remove].contains("${EndIf}"),
        "the removal is inside the checkbox's ${{If}}: {post}"
    );
}

#[test]
fn the_macos_bundle_is_configured_without_signing_secrets() {
    let conf = config();
    let mac = &conf["bundle"]["macOS"];
    assert_eq!(
        string(&mac["minimumSystemVersion"], "bundle.macOS.minimumSystemVersion"),
        "11.0"
    );
    // notarization needs the hardened runtime
    assert_eq!(mac["hardenedRuntime"], Value::Bool(true));
    let dmg = &mac["dmg"];
    for (key, fields) in [
        ("windowSize", ["width", "height"]),
        ("appPosition", ["x", "y"]),
        ("applicationFolderPosition", ["x", "y"]),
    ] {
        for field in fields {
            assert!(
                dmg[key][field].as_u64().is_some(),
                "bundle.macOS.dmg.{key}.{field}: {}",
                dmg[key][field]
            );
        }
    }
    // both icons inside the window
    let width = dmg["windowSize"]["width"].as_u64().unwrap();
    assert!(
        dmg["appPosition"]["x"].as_u64().unwrap() < dmg["applicationFolderPosition"]["x"].as_u64().unwrap()
    );
    assert!(dmg["applicationFolderPosition"]["x"].as_u64().unwrap() < width);
    // the signing identity and notarization credentials come from the environment
    // (APPLE_SIGNING_IDENTITY, APPLE_ID, …), never from the repository
    for key in [
        "signingIdentity",
        "providerShortName",
        "entitlements",
        "infoPlist",
    ] {
        assert!(mac.get(key).is_none(), "bundle.macOS.{key} is committed");
    }
    // the app has a Dock icon and a window: no LSUIElement (an Info.plist beside the config
    // would be merged into the bundle's)
    let plist = src_tauri().join("Info.plist");
    if let Ok(text) = std::fs::read_to_string(&plist) {
        assert!(!text.contains("LSUIElement"), "{}", plist.display());
    }
}

#[test]
fn the_bundle_metadata_matches_the_workspace_and_updater_artifacts_stay_off() {
    let conf = config();
    let bundle = &conf["bundle"];
    // release builds turn it on with the private key at hand (installers/README.md)
    assert_ne!(
        bundle.get("createUpdaterArtifacts"),
        Some(&Value::Bool(true)),
        "bundle.createUpdaterArtifacts must stay off in the committed configuration"
    );
    assert!(
        !matches!(bundle.get("createUpdaterArtifacts"), Some(Value::String(_))),
        "bundle.createUpdaterArtifacts must stay off in the committed configuration"
    );
    let targets: Vec<&str> = bundle["targets"]
        .as_array()
        .expect("bundle.targets")
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    // AppImage is configured; `cargo xtask bundle` leaves it out by default (its bundler downloads)
    for target in ["nsis", "msi", "app", "dmg", "deb", "rpm", "appimage"] {
        assert!(targets.contains(&target), "bundle.targets lacks {target}");
    }
    assert_eq!(
        string(&bundle["publisher"], "bundle.publisher"),
        "Apiary contributors"
    );
    let workspace = std::fs::read_to_string(src_tauri().join("../Cargo.toml")).unwrap();
    let field = |name: &str| {
        workspace
            .lines()
            .find_map(|l| {
                let (key, value) = l.split_once('=')?;
                (key.trim() == name).then(|| value.trim().trim_matches('"').to_owned())
            })
            .unwrap_or_else(|| panic!("the workspace Cargo.toml has no {name}"))
    };
    assert_eq!(string(&bundle["license"], "bundle.license"), field("license"));
    assert_eq!(
        string(&bundle["homepage"], "bundle.homepage"),
        field("repository")
    );
    assert!(!string(&bundle["longDescription"], "bundle.longDescription").is_empty());
}
