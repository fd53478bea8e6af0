; Apiary's hooks into Tauri's NSIS installer (`bundle.windows.nsis.installerHooks` in
; src-tauri/tauri.conf.json, a path relative to src-tauri/). Tauri's template (installer.nsi of
; the bundler inside tauri-cli 2.12.5) `!include`s this file near its top and inserts each
; NSIS_HOOK_* macro with `!ifmacrodef`. All four are defined, even the empty ones, so that
; src-tauri/tests/bundle_config.rs can hold this file to its job.
;
; Where Apiary keeps things on Windows. All of it is per user: the installer runs with
; `installMode: currentUser` (RequestExecutionLevel user: no administrator rights, nothing written
; under HKLM, the app in %LOCALAPPDATA%\Apiary).
;   - settings: %APPDATA%\apiary\node.toml (dirs::config_dir() + "apiary")
;   - data:     %APPDATA%\apiary\ (dirs::data_dir() + "apiary", the same folder on Windows): the
;               ledger (ledger.sqlite), policy-state.json, joined.json, checkpoints\, the node's
;               identity key, api-token, api-url, and the first-run wizard's `setup-done` marker
;   - logs:     %LOCALAPPDATA%\org.apiary.desktop\logs (tauri-plugin-log, the app's log folder)
;   - WebView2: %LOCALAPPDATA%\org.apiary.desktop\EBWebView (the dashboard's web storage)
;   - autostart, only if the user turned it on (in the first-run wizard or in Settings): the
;     value "Apiary" under HKCU\Software\Microsoft\Windows\CurrentVersion\Run, and a value of the
;     same name under ...\Explorer\StartupApproved\Run (Task Manager's Startup switch). The name
;     is the productName: tauri-plugin-autostart 2.7 passes package_info().name to auto-launch
;     0.6, which writes both values (HKCU for a user without administrator rights).
;
; What Tauri's template does already, so this file does not repeat it:
;   - before copying files and before removing them, `CheckIfAppIsRunning` uses Windows' Restart
;     Manager to find a running apiary-desktop.exe and asks (OK / Cancel) to close it; silent and
;     passive runs close it without asking. That close is a forced shutdown, not Apiary's Quit, so
;     the two PRE hooks below first ask the user to quit Apiary the clean way.
;   - the uninstaller's confirm page has the "Delete the application data" checkbox
;     ($DeleteAppDataCheckboxState = 1 when ticked). When it is ticked, and this is not an update,
;     the template removes %APPDATA%\org.apiary.desktop and %LOCALAPPDATA%\org.apiary.desktop
;     (logs, WebView2 storage). Apiary's own folder is named `apiary`, not after the identifier:
;     NSIS_HOOK_POSTUNINSTALL removes it under the same condition.
;   - when not updating, it deletes the HKCU Run value named after the productName.
;
; $UpdateMode is 1 when the installer or uninstaller runs with /UPDATE, which is what
; tauri-plugin-updater passes to the NSIS installer: the user's data and autostart choice are
; never touched then. $PassiveMode is 1 with /P. The checkbox variable stays empty in silent and
; passive uninstalls (they skip the confirm page), so those keep the data.

; The keys of the autostart entries written by auto-launch (see above); their value name is
; ${PRODUCTNAME}. The template defines PRODUCTNAME and BUNDLEID only after including this file,
; so they are used inside the macros (expanded where the template inserts them), never in a
; !define here.
!define APIARY_RUN_KEY "Software\Microsoft\Windows\CurrentVersion\Run"
!define APIARY_STARTUP_APPROVED_KEY "Software\Microsoft\Windows\CurrentVersion\Explorer\StartupApproved\Run"

; APIARY_ASK_TO_QUIT: while Apiary runs in this session, asks the user to quit it from its
; tray (Quit leaves the experiments, withdraws the declarations and saves the checkpoints) before
; files are replaced or removed. A running app is recognised by the hidden window that
; tauri-plugin-single-instance 2.5 creates for its whole lifetime: class "<identifier>-sic",
; title "<identifier>-siw" (no `semver` feature). Retry checks again; Ignore goes on, and the
; template's CheckIfAppIsRunning then offers to close it by force; Abort stops the
; (un)installer. Only interactive runs ask: silent, passive and update runs go straight on (an
; update is started by the app itself, which exits to let it run).
!macro APIARY_ASK_TO_QUIT
  !define APIARY_ID ${__LINE__}
  ${If} $UpdateMode <> 1
  ${AndIf} $PassiveMode <> 1
  ${AndIfNot} ${Silent}
    apiary_check_${APIARY_ID}:
      FindWindow $R9 "${BUNDLEID}-sic" "${BUNDLEID}-siw"
      ${If} $R9 <> 0
        MessageBox MB_ABORTRETRYIGNORE|MB_ICONINFORMATION \
          "${PRODUCTNAME} is running.$\r$\n$\r$\nPlease quit it from its tray icon (Quit leaves the experiments cleanly and saves the checkpoints), then choose Retry.$\r$\n$\r$\nIgnore: go on; ${PRODUCTNAME} will be closed without leaving cleanly.$\r$\nAbort: stop here." \
          /SD IDIGNORE IDRETRY apiary_check_${APIARY_ID} IDIGNORE apiary_done_${APIARY_ID}
        Abort
      ${EndIf}
    apiary_done_${APIARY_ID}:
  ${EndIf}
  !undef APIARY_ID
!macroend

; NSIS_HOOK_PREINSTALL: runs before files are copied and before the template's running-app
; check. Reinstalling or upgrading over a running Apiary: ask the user to quit it cleanly first.
; Settings, data and the autostart choice are left as they are.
!macro NSIS_HOOK_PREINSTALL
  !insertmacro APIARY_ASK_TO_QUIT
!macroend

; NSIS_HOOK_POSTINSTALL: runs after the files, registry keys and shortcuts are in place.
; Deliberately empty: the installer does not turn autostart on (the app's first-run wizard asks),
; installs no service and no scheduled task, and does not start computing. The finish page's
; "Run Apiary" checkbox starts the app in the user's session, where the wizard opens, paused.
!macro NSIS_HOOK_POSTINSTALL
!macroend

; NSIS_HOOK_PREUNINSTALL: runs first in the uninstall section, before the template's
; running-app check: ask the user to quit Apiary cleanly first (see APIARY_ASK_TO_QUIT).
!macro NSIS_HOOK_PREUNINSTALL
  !insertmacro APIARY_ASK_TO_QUIT
!macroend

; NSIS_HOOK_POSTUNINSTALL: runs after the template has removed the files, the shortcuts, the
; uninstall registry key and (checkbox ticked) the identifier's folders. Never during an update.
!macro NSIS_HOOK_POSTUNINSTALL
  ${If} $UpdateMode <> 1
    ; Autostart, whether or not the box was ticked: no entry may start a program that is gone.
    ; The template deletes the Run value too (deleting a missing value only sets the error
    ; flag); the StartupApproved value is not the template's concern.
    DeleteRegValue HKCU "${APIARY_RUN_KEY}" "${PRODUCTNAME}"
    DeleteRegValue HKCU "${APIARY_STARTUP_APPROVED_KEY}" "${PRODUCTNAME}"

    ; User data, only when "Delete the application data" was ticked. Otherwise
    ; %APPDATA%\apiary stays: a reinstall finds the contribution ledger, the joined experiments,
    ; their checkpoints and the settings where they were.
    ${If} $DeleteAppDataCheckboxState = 1
      SetShellVarContext current
      RmDir /r "$APPDATA\apiary"
    ${EndIf}
  ${EndIf}
!macroend
