// Settings: the policy. PUT replaces the whole policy (missing fields take their defaults), so the
// form starts from the policy the node gave and sends all of it back, changed.

import { toApiError } from "../api";
import { h, replace } from "../dom";
import { formatMb, formatMode } from "../format";
import type { Ctx } from "../store";
import { MODES, type DeviceSetting, type GpuProfile, type PolicyConfig, type Schedule, type ScheduleWindow } from "../types";

type NumField = {
  key: keyof PolicyConfig;
  label: string;
  help: string;
  min?: number;
  max?: number;
  step?: string;
  unit?: string;
  /** Shown and edited as a percentage of a 0..1 fraction. */
  percent?: boolean;
};

export const NUMBER_FIELDS: NumField[] = [
  { key: "idle_threshold_s", label: "Away after", unit: "s without input", help: "Seconds without keyboard or mouse after which you count as away.", min: 0, step: "1" },
  { key: "in_use_level", label: "Balanced: level while you use the PC", unit: "%", percent: true, help: "0 % = no work while you are at the PC.", min: 0, max: 1 },
  { key: "away_level", label: "Balanced and only-when-away: level while away", unit: "%", percent: true, help: "", min: 0, max: 1 },
  { key: "quiet_in_use_level", label: "Quiet: level while you use the PC", unit: "%", percent: true, help: "", min: 0, max: 1 },
  { key: "quiet_away_level", label: "Quiet: level while away", unit: "%", percent: true, help: "", min: 0, max: 1 },
  { key: "manual_in_use_level", label: "Started by hand while in use", unit: "%", percent: true, help: "Level of a manual start while you use the PC, where the mode's in-use level is 0.", min: 0, max: 1 },
  { key: "gpu_other_threshold", label: "Pause when other programs use a GPU above", unit: "%", percent: true, help: "Games, video editing…", min: 0, max: 1 },
  { key: "min_battery_percent", label: "Pause below battery", unit: "%", help: "", min: 0, max: 100, step: "1" },
  { key: "temperature_target_c", label: "GPU temperature target", unit: "°C", help: "The hottest GPU is held at this temperature (40 to 95 °C).", min: 40, max: 95, step: "1" },
  { key: "cooldown_s", label: "Wait after a fullscreen or GPU pause", unit: "s", help: "How long such a pause lasts after the condition clears.", min: 0, step: "1" },
  { key: "finish_timeout_s", label: "Longest “finish, then pause”", unit: "s", help: "", min: 0, step: "1" },
  { key: "away_start_delay_s", label: "Notice before starting because you are away", unit: "s", help: "Where work waits while you use the PC: time to cancel a start (0 = start at once).", min: 0, step: "1" },
];

export const BOOL_FIELDS: { key: keyof PolicyConfig; label: string }[] = [
  { key: "pause_on_fullscreen", label: "Pause while a fullscreen window is in front" },
  { key: "pause_on_battery", label: "Pause while on battery" },
];

const DAYS = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"] as const;

function minutesToTime(m: number): string {
  const c = Math.max(0, Math.min(1440, Math.round(m)));
  if (c === 1440) return "24:00";
  return `${String(Math.floor(c / 60)).padStart(2, "0")}:${String(c % 60).padStart(2, "0")}`;
}

function timeToMinutes(s: string): number | null {
  const m = /^(\d{1,2}):(\d{2})$/.exec(s.trim());
  if (!m) return null;
  const v = Number(m[1]) * 60 + Number(m[2]);
  return v >= 0 && v <= 1440 ? v : null;
}

/** Checks the form's values before they go to the node; answers messages per field. */
export function validatePolicy(p: PolicyConfig): Partial<Record<keyof PolicyConfig, string>> {
  const errs: Partial<Record<keyof PolicyConfig, string>> = {};
  for (const f of NUMBER_FIELDS) {
    const v = p[f.key] as number;
    if (typeof v !== "number" || !Number.isFinite(v)) errs[f.key] = "Enter a number.";
    else if (v < 0) errs[f.key] = "Must be 0 or more.";
    else if (f.key === "temperature_target_c" && (v < 40 || v > 95)) errs[f.key] = "Between 40 and 95 °C.";
  }
  if (p.schedule) {
    for (const w of p.schedule.windows) {
      if (!w.days.length) errs.schedule = "Each window needs at least one day.";
    }
  }
  return errs;
}

export type DeviceOption = { value: string; label: string; disabled: boolean };

/** The "Compute on" choices: Automatic, the CPU, and each GPU the machine profile lists (`gpus[i]` is
 *  `cuda:i`; not selectable in a build without CUDA support). A setting naming a GPU not found now
 *  stays listed, so the select shows what is in effect. */
export function deviceOptions(gpus: GpuProfile[], setting: DeviceSetting): DeviceOption[] {
  const opts: DeviceOption[] = [
    {
      value: "auto",
      label: setting.cuda_supported ? "Automatic (the first GPU if there is one, else the CPU)" : "Automatic (the CPU in this build)",
      disabled: false,
    },
    { value: "cpu", label: "CPU", disabled: false },
    ...gpus.map((g, i) => ({
      value: `cuda:${i}`,
      label: `GPU ${i}: ${g.name}${g.vram_total_mb > 0 ? ` (${formatMb(g.vram_total_mb)})` : ""}${setting.cuda_supported ? "" : " (needs a build with GPU support)"}`,
      disabled: !setting.cuda_supported,
    })),
  ];
  if (!opts.some((o) => o.value === setting.device)) {
    opts.push({ value: setting.device, label: `${setting.device.replace(/^cuda:/, "GPU ")} (not found now)`, disabled: false });
  }
  return opts;
}

/** The "Compute on" setting: saved at once on change (its own endpoint, not the policy form). */
function mountDevice(ctx: Ctx, alive: () => boolean): HTMLElement {
  const { api } = ctx;
  const sel = h("select", { id: "setting-device", name: "device", "data-testid": "setting-device", disabled: true, "aria-describedby": "help-device" }, h("option", null, "Loading…"));
  const note = h("small", { id: "help-device", class: "muted", "data-testid": "device-note" });
  const msg = h("div", { role: "status", "aria-live": "polite", "data-testid": "device-status" });
  let setting: DeviceSetting | null = null;
  let gpus: GpuProfile[] = [];

  const render = () => {
    if (!setting) return;
    replace(
      sel,
      deviceOptions(gpus, setting).map((o) => h("option", { value: o.value, disabled: o.disabled, selected: o.value === setting!.device }, o.label)),
    );
    sel.value = setting.device;
    sel.disabled = false;
    const lines: string[] = [];
    if (!gpus.length) lines.push("No GPU found: experts compute on the CPU.");
    else if (!setting.cuda_supported) lines.push("This build computes on the CPU only.");
    const n = setting.note.trim();
    if (n) lines.push(`${n[0].toUpperCase()}${n.slice(1)}${n.endsWith(".") ? "" : "."}`);
    note.textContent = lines.join(" ");
  };

  sel.addEventListener("change", async () => {
    if (!setting) return;
    const want = sel.value;
    const before = setting.device;
    sel.disabled = true;
    msg.replaceChildren();
    try {
      setting = await api.setDevice(want);
      if (!alive()) return;
      msg.replaceChildren(h("p", { class: "ok", "data-testid": "device-saved" }, "Saved: experts joined from now on compute there."));
    } catch (e) {
      if (!alive()) return;
      const err = toApiError(e);
      setting = { ...setting, device: before };
      msg.replaceChildren(h("p", { class: "error", role: "alert", "data-testid": "device-error" }, `Not saved: ${err.message}`));
    }
    render();
  });

  void (async () => {
    const [d, m] = await Promise.allSettled([api.device(), api.machine()]);
    if (!alive()) return;
    gpus = m.status === "fulfilled" ? m.value.gpus : [];
    if (d.status === "fulfilled") {
      setting = d.value;
      render();
    } else {
      const err = toApiError(d.reason);
      replace(sel, h("option", null, "unknown"));
      msg.replaceChildren(h("p", { class: "error", role: "alert", "data-testid": "device-error" }, `${err.message} (${err.code})`));
    }
  })();

  return h(
    "div",
    { class: "settings" },
    h(
      "fieldset",
      { class: "device" },
      h("legend", null, "GPU selection"),
      h("div", { class: "field" }, h("label", { for: "setting-device" }, "Compute on"), sel, note),
      msg,
    ),
  );
}

/**
 * The desktop app's own settings (shown when the transport has them, i.e. inside the app): start with
 * the session, signed updates (checked only when asked), where settings, data and logs are kept.
 */
function mountAppSettings(ctx: Ctx, alive: () => boolean): HTMLElement {
  const { api } = ctx;
  const box = h("div", { class: "settings", hidden: true, "data-testid": "app-settings" });
  const autostart = h("input", { type: "checkbox", id: "setting-autostart", "data-testid": "setting-autostart" }) as HTMLInputElement;
  const autostartMsg = h("span", { role: "status", "aria-live": "polite", class: "muted" });
  const check = h("button", { type: "button", "data-testid": "check-updates" }, "Check for updates");
  const updateMsg = h("div", { role: "status", "aria-live": "polite", "data-testid": "update-status" });
  const locations = h("dl", { class: "paths" });

  autostart.addEventListener("change", async () => {
    const want = autostart.checked;
    autostart.disabled = true;
    try {
      autostart.checked = await api.setAutostart(want);
      autostartMsg.textContent = autostart.checked ? "Apiary starts when you log in (in the tray, window closed)." : "Apiary starts when you open it.";
    } catch (e) {
      autostart.checked = !want;
      autostartMsg.textContent = `Not changed: ${toApiError(e).message}`;
    }
    autostart.disabled = false;
  });

  const install = async (button: HTMLButtonElement, progress: HTMLElement) => {
    button.disabled = true;
    progress.className = "";
    progress.removeAttribute("role");
    progress.textContent = "Downloading and checking its signature… the app restarts when it is installed.";
    try {
      const installed = await api.installUpdate();
      if (!installed) progress.textContent = "Nothing newer to install.";
    } catch (e) {
      progress.className = "error";
      progress.setAttribute("role", "alert");
      progress.textContent = toApiError(e).message;
      button.disabled = false;
    }
  };

  check.addEventListener("click", async () => {
    check.disabled = true;
    updateMsg.replaceChildren(h("p", { class: "muted" }, "Asking the update feed…"));
    try {
      const update = await api.checkUpdate();
      if (!alive()) return;
      if (!update) {
        updateMsg.replaceChildren(h("p", { class: "ok", "data-testid": "update-none" }, "Apiary is up to date."));
      } else {
        const button = h("button", { type: "button", class: "primary", "data-testid": "install-update" }, "Install and restart") as HTMLButtonElement;
        const progress = h("p", { "data-testid": "install-status" });
        button.addEventListener("click", () => void install(button, progress));
        updateMsg.replaceChildren(
          h("p", { "data-testid": "update-available" }, `Version ${update.version} is available (this is ${update.current_version}).`),
          ...(update.notes ? [h("p", { class: "muted" }, update.notes)] : []),
          button,
          progress,
        );
      }
    } catch (e) {
      if (!alive()) return;
      updateMsg.replaceChildren(h("p", { class: "error", role: "alert", "data-testid": "update-error" }, toApiError(e).message));
    }
    check.disabled = false;
  });

  void (async () => {
    const [paths, start] = await Promise.allSettled([api.paths(), api.autostart()]);
    if (!alive() || paths.status !== "fulfilled" || !paths.value) return;
    const p = paths.value;
    const row = (label: string, id: string, value: string | null) => [h("dt", null, label), h("dd", { "data-testid": id }, h("code", null, value ?? "unknown"))];
    replace(locations, ...row("Settings file", "path-config", p.config_file), ...row("Data folder", "path-data", p.data_dir), ...row("Log folder", "path-logs", p.log_dir));
    if (start.status === "fulfilled" && start.value !== null) autostart.checked = start.value;
    else autostart.disabled = true;
    box.hidden = false;
  })();

  box.append(
    h(
      "fieldset",
      null,
      h("legend", null, "This app"),
      h("div", { class: "field check" }, autostart, h("label", { for: "setting-autostart" }, "Start Apiary when I log in"), autostartMsg),
      h("div", { class: "field" }, check, h("small", { class: "muted" }, "Updates are signed; nothing is checked or installed unless you ask."), updateMsg),
      locations,
    ),
  );
  return box;
}

export function mountSettings(root: HTMLElement, ctx: Ctx): () => void {
  const { api } = ctx;
  let alive = true;
  const form = h("form", { class: "settings", novalidate: true, "aria-busy": "true" }, h("p", { class: "muted" }, "Loading…"));
  const topErr = h("p", { class: "error", role: "alert", hidden: true, "data-testid": "settings-error" });
  const savedSlot = h("div", { role: "status", "aria-live": "polite" });
  let current: PolicyConfig | null = null;

  const build = (p: PolicyConfig) => {
    current = structuredClone(p);
    form.setAttribute("aria-busy", "false");
    const fieldErr: Partial<Record<string, HTMLElement>> = {};
    const errEl = (key: string) => (fieldErr[key] = h("span", { class: "field-error", id: `err-${key}`, role: "alert" }));

    const modeSel = h(
      "select",
      { id: "setting-mode", name: "mode", "data-testid": "setting-mode" },
      MODES.map((m) => h("option", { value: m, selected: m === p.mode }, formatMode(m))),
    );
    modeSel.value = p.mode;

    const numInputs = NUMBER_FIELDS.map((f) => {
      const raw = p[f.key] as number;
      const shown = f.percent ? Math.round(raw * 1000) / 10 : raw;
      const input = h("input", {
        id: `setting-${f.key}`,
        name: f.key,
        type: "number",
        "data-testid": `setting-${f.key}`,
        value: String(shown),
        min: f.percent ? String((f.min ?? 0) * 100) : f.min !== undefined ? String(f.min) : undefined,
        max: f.percent ? String((f.max ?? 1) * 100) : f.max !== undefined ? String(f.max) : undefined,
        step: f.step ?? "any",
        "aria-describedby": `err-${f.key}${f.help ? ` help-${f.key}` : ""}`,
      });
      return {
        f,
        input,
        el: h(
          "div",
          { class: "field" },
          h("label", { for: `setting-${f.key}` }, f.label),
          h("div", { class: "with-unit" }, input, f.unit && h("span", { class: "unit" }, f.unit)),
          f.help && h("small", { id: `help-${f.key}`, class: "muted" }, f.help),
          errEl(f.key),
        ),
      };
    });

    const boolInputs = BOOL_FIELDS.map((b) => {
      const input = h("input", { id: `setting-${b.key}`, type: "checkbox", "data-testid": `setting-${b.key}`, checked: Boolean(p[b.key]) });
      return { b, input, el: h("div", { class: "field check" }, input, h("label", { for: `setting-${b.key}` }, b.label)) };
    });

    // schedule
    let schedule: Schedule | null = p.schedule ? structuredClone(p.schedule) : null;
    const schedOn = h("input", { id: "setting-schedule", type: "checkbox", "data-testid": "setting-schedule", checked: schedule !== null });
    const schedBox = h("div", { class: "schedule" });
    const renderSchedule = () => {
      if (!schedule) {
        replace(schedBox, h("p", { class: "muted small" }, "Automatic work may run at any time."));
        return;
      }
      const s = schedule;
      replace(
        schedBox,
        h("p", { class: "muted small" }, `Times are local (UTC${s.utc_offset_minutes >= 0 ? "+" : "−"}${minutesToTime(Math.abs(s.utc_offset_minutes))}). A window ending at or before its start ends the next day.`),
        s.windows.map((w: ScheduleWindow, i: number) =>
          h(
            "fieldset",
            { class: "window", "data-testid": `schedule-window-${i}` },
            h("legend", null, `Window ${i + 1}`),
            h(
              "div",
              { class: "days" },
              DAYS.map((d) =>
                h(
                  "label",
                  { class: "day" },
                  h("input", {
                    type: "checkbox",
                    checked: w.days.includes(d),
                    onchange: (e: Event) => {
                      const on = (e.target as HTMLInputElement).checked;
                      w.days = DAYS.filter((x) => (x === d ? on : w.days.includes(x)));
                    },
                  }),
                  d,
                ),
              ),
            ),
            h(
              "label",
              { class: "inline" },
              "From ",
              h("input", {
                type: "time",
                value: minutesToTime(w.start_minute),
                onchange: (e: Event) => {
                  const v = timeToMinutes((e.target as HTMLInputElement).value);
                  if (v !== null) w.start_minute = v;
                },
              }),
            ),
            h(
              "label",
              { class: "inline" },
              " to ",
              h("input", {
                type: "time",
                value: minutesToTime(w.end_minute),
                onchange: (e: Event) => {
                  const v = timeToMinutes((e.target as HTMLInputElement).value);
                  if (v !== null) w.end_minute = v;
                },
              }),
            ),
            h(
              "button",
              {
                type: "button",
                onclick: () => {
                  s.windows.splice(i, 1);
                  renderSchedule();
                },
              },
              "Remove",
            ),
          ),
        ),
        h(
          "button",
          {
            type: "button",
            onclick: () => {
              s.windows.push({ days: [...DAYS], start_minute: 22 * 60, end_minute: 7 * 60 });
              renderSchedule();
            },
          },
          "Add a window",
        ),
        errEl("schedule"),
      );
    };
    schedOn.addEventListener("change", () => {
      schedule = schedOn.checked ? { utc_offset_minutes: -new Date().getTimezoneOffset(), windows: [{ days: [...DAYS], start_minute: 22 * 60, end_minute: 7 * 60 }] } : null;
      renderSchedule();
    });
    renderSchedule();

    const saveBtn = h("button", { type: "submit", class: "primary", "data-testid": "settings-save" }, "Save");
    replace(
      form,
      h("fieldset", null, h("legend", null, "Mode"), h("div", { class: "field" }, h("label", { for: "setting-mode" }, "How hard to work"), modeSel, errEl("mode"))),
      h("fieldset", null, h("legend", null, "Levels and limits"), numInputs.map((n) => n.el)),
      h("fieldset", null, h("legend", null, "Pause"), boolInputs.map((b) => b.el)),
      h("fieldset", null, h("legend", null, "Schedule"), h("div", { class: "field check" }, schedOn, h("label", { for: "setting-schedule" }, "Only run automatically at these times")), schedBox),
      h("div", { class: "controls" }, saveBtn, h("button", { type: "button", onclick: () => void load() }, "Undo changes")),
    );

    form.oninput = () => savedSlot.replaceChildren();
    form.onsubmit = async (ev: Event) => {
      ev.preventDefault();
      topErr.hidden = true;
      savedSlot.replaceChildren();
      for (const el of Object.values(fieldErr)) if (el) el.textContent = "";
      const next: PolicyConfig = { ...structuredClone(current!), mode: modeSel.value as PolicyConfig["mode"], schedule };
      const bad: Partial<Record<string, string>> = {};
      for (const n of numInputs) {
        const txt = n.input.value.trim();
        const v = txt === "" ? NaN : Number(txt);
        (next as unknown as Record<string, unknown>)[n.f.key] = n.f.percent ? v / 100 : v;
        if (n.f.percent && Number.isFinite(v) && (v < 0 || v > 100)) bad[n.f.key] = "Between 0 and 100 %.";
      }
      for (const b of boolInputs) (next as unknown as Record<string, unknown>)[b.b.key] = b.input.checked;
      Object.assign(bad, validatePolicy(next), { ...bad });
      const keys = Object.keys(bad).filter((k) => bad[k]);
      if (keys.length) {
        for (const k of keys) if (fieldErr[k]) fieldErr[k]!.textContent = bad[k]!;
        topErr.textContent = "Some values need fixing.";
        topErr.hidden = false;
        form.querySelector<HTMLElement>(`#setting-${keys[0]}`)?.focus();
        return;
      }
      saveBtn.disabled = true;
      try {
        const saved = await api.setPolicy(next);
        if (!alive) return;
        build(saved);
        savedSlot.replaceChildren(h("p", { class: "ok", "data-testid": "settings-saved" }, "Saved."));
      } catch (e) {
        const err = toApiError(e);
        topErr.textContent = `Not saved: ${err.message}`;
        topErr.hidden = false;
        // Point at the field the node named, if any.
        const m = /`([a-z_]+)`/.exec(err.message);
        if (m && fieldErr[m[1]]) fieldErr[m[1]]!.textContent = err.message;
      } finally {
        saveBtn.disabled = false;
      }
    };
  };

  const load = async () => {
    topErr.hidden = true;
    try {
      const p = await api.policy();
      if (alive) build(p);
    } catch (e) {
      const err = toApiError(e);
      topErr.textContent = `${err.message} (${err.code})`;
      topErr.hidden = false;
    }
  };

  const deviceBox = mountDevice(ctx, () => alive);
  const appBox = mountAppSettings(ctx, () => alive);
  root.append(h("section", { class: "panel", "aria-labelledby": "settings-h" }, h("h1", { id: "settings-h" }, "Settings"), deviceBox, appBox, topErr, form, savedSlot));
  void load();
  return () => {
    alive = false;
  };
}
