import { beforeEach, describe, expect, it } from "vitest";
import { Store } from "../store";
import { byTestId, fakeApi, flush } from "../test/fake-api";
import { fx } from "../test/fixtures";
import { BOOL_FIELDS, deviceOptions, mountSettings, NUMBER_FIELDS, validatePolicy } from "./settings";

async function setup() {
  const { api } = fakeApi();
  const root = document.createElement("div");
  document.body.replaceChildren(root);
  mountSettings(root, { api, store: new Store(), charts: false });
  await flush();
  return { api, root };
}

const input = (root: HTMLElement, id: string) => byTestId(root, id) as HTMLInputElement;

describe("Settings", () => {
  beforeEach(() => document.body.replaceChildren());

  it("has a labelled input for every policy field", async () => {
    const { root } = await setup();
    const p = fx.policy();
    for (const key of [...NUMBER_FIELDS.map((f) => f.key), ...BOOL_FIELDS.map((f) => f.key), "mode", "schedule"]) {
      const el = input(root, `setting-${key}`);
      expect(root.querySelector(`label[for="${el.id}"]`), key).not.toBeNull();
    }
    expect(input(root, "setting-idle_threshold_s").value).toBe(String(p.idle_threshold_s));
    expect(input(root, "setting-in_use_level").value).toBe("30"); // shown as a percentage
    expect((byTestId(root, "setting-mode") as HTMLSelectElement).value).toBe(p.mode);
    expect(input(root, "setting-pause_on_battery").checked).toBe(true);
    expect(input(root, "setting-schedule").checked).toBe(false);
  });

  it("sends the whole policy, changed, and says it saved", async () => {
    const { api, root } = await setup();
    input(root, "setting-idle_threshold_s").value = "300";
    input(root, "setting-in_use_level").value = "10";
    input(root, "setting-pause_on_fullscreen").checked = false;
    (byTestId(root, "setting-mode") as HTMLSelectElement).value = "quiet";
    byTestId(root, "settings-save").click();
    await flush();
    expect(api.setPolicy).toHaveBeenCalledOnce();
    const sent = api.setPolicy.mock.calls[0][0];
    expect(sent).toEqual({ ...fx.policy(), idle_threshold_s: 300, in_use_level: 0.1, pause_on_fullscreen: false, mode: "quiet" });
    expect(byTestId(root, "settings-saved").textContent).toBe("Saved.");
  });

  it("validates before sending", async () => {
    const { api, root } = await setup();
    input(root, "setting-temperature_target_c").value = "120";
    input(root, "setting-cooldown_s").value = "";
    byTestId(root, "settings-save").click();
    await flush();
    expect(api.setPolicy).not.toHaveBeenCalled();
    expect(root.textContent).toContain("Between 40 and 95 °C.");
    expect(root.textContent).toContain("Enter a number.");
    expect(root.querySelector('[data-testid="settings-saved"]')).toBeNull();
  });

  it("shows the node's validation message", async () => {
    const { api, root } = await setup();
    api.setPolicy.mockRejectedValueOnce({ code: "bad_request", message: "`idle_threshold_s` must be finite and ≥ 0" });
    byTestId(root, "settings-save").click();
    await flush();
    expect(byTestId(root, "settings-error").textContent).toContain("`idle_threshold_s` must be finite");
    expect(root.querySelector("#err-idle_threshold_s")!.textContent).toContain("must be finite");
  });

  it("edits a schedule", async () => {
    const { api, root } = await setup();
    const on = input(root, "setting-schedule");
    on.checked = true;
    on.dispatchEvent(new Event("change"));
    expect(root.querySelector('[data-testid="schedule-window-0"]')).not.toBeNull();
    byTestId(root, "settings-save").click();
    await flush();
    const sent = api.setPolicy.mock.calls[0][0];
    expect(sent.schedule).toEqual({
      utc_offset_minutes: -new Date().getTimezoneOffset(),
      windows: [{ days: ["mon", "tue", "wed", "thu", "fri", "sat", "sun"], start_minute: 1320, end_minute: 420 }],
    });
  });

  it("validatePolicy", () => {
    expect(validatePolicy(fx.policy())).toEqual({});
    expect(validatePolicy({ ...fx.policy(), idle_threshold_s: -1 })).toHaveProperty("idle_threshold_s");
  });
});

describe("Settings: compute on (GPU selection)", () => {
  beforeEach(() => document.body.replaceChildren());

  const gpu = (name: string, mb: number) => ({ name, vram_total_mb: mb, vram_free_mb: mb });

  it("offers Automatic and CPU, with a note when no GPU is found", async () => {
    const { api, root } = await setup();
    const sel = byTestId(root, "setting-device") as HTMLSelectElement;
    expect(root.querySelector(`label[for="${sel.id}"]`)?.textContent).toBe("Compute on");
    expect([...sel.options].map((o) => o.value)).toEqual(["auto", "cpu"]);
    expect(sel.value).toBe("auto");
    expect(sel.disabled).toBe(false);
    expect(byTestId(root, "device-note").textContent).toContain("No GPU found");
    expect(byTestId(root, "device-note").textContent).toContain("Applies to experts joined after the change");
    expect(api.device).toHaveBeenCalledOnce();
    expect(api.machine).toHaveBeenCalledOnce();
  });

  it("lists each GPU and saves a choice at once", async () => {
    const { api } = fakeApi();
    api.device.mockResolvedValue({ device: "auto", cuda_supported: true, note: "applies to experts joined after the change" });
    api.setDevice.mockImplementation(async (device: string) => ({ device, cuda_supported: true, note: "applies to experts joined after the change" }));
    const m = fx.machine();
    m.gpus = [gpu("NVIDIA GeForce RTX 4070", 12282), gpu("NVIDIA RTX A2000", 6138)];
    api.machine.mockResolvedValue(m);
    const root = document.createElement("div");
    document.body.replaceChildren(root);
    mountSettings(root, { api, store: new Store(), charts: false });
    await flush();
    const sel = byTestId(root, "setting-device") as HTMLSelectElement;
    expect([...sel.options].map((o) => o.value)).toEqual(["auto", "cpu", "cuda:0", "cuda:1"]);
    expect(sel.options[2].textContent).toContain("RTX 4070");
    expect(sel.options[2].disabled).toBe(false);
    expect(byTestId(root, "device-note").textContent).not.toContain("No GPU found");
    sel.value = "cuda:1";
    sel.dispatchEvent(new Event("change"));
    await flush();
    expect(api.setDevice).toHaveBeenCalledWith("cuda:1");
    expect(byTestId(root, "device-saved").textContent).toContain("joined from now on");
    expect((byTestId(root, "setting-device") as HTMLSelectElement).value).toBe("cuda:1");
    // the policy form is not sent for it
    expect(api.setPolicy).not.toHaveBeenCalled();
  });

  it("shows a refusal and goes back to the setting in effect", async () => {
    const { api } = fakeApi();
    api.setDevice.mockRejectedValue({ code: "bad_request", message: "`cuda:0` cannot be used: this build of Apiary has no CUDA support" });
    const m = fx.machine();
    m.gpus = [gpu("NVIDIA GeForce RTX 3060", 12288)];
    api.machine.mockResolvedValue(m);
    const root = document.createElement("div");
    document.body.replaceChildren(root);
    mountSettings(root, { api, store: new Store(), charts: false });
    await flush();
    const sel = byTestId(root, "setting-device") as HTMLSelectElement;
    // a build without GPU support: the GPU is listed but cannot be chosen
    expect(sel.options[2].disabled).toBe(true);
    expect(byTestId(root, "device-note").textContent).toContain("CPU only");
    sel.value = "cpu";
    sel.dispatchEvent(new Event("change"));
    await flush();
    expect(byTestId(root, "device-error").textContent).toContain("no CUDA support");
    expect((byTestId(root, "setting-device") as HTMLSelectElement).value).toBe("auto");
  });

  it("keeps a GPU setting that names a GPU not found now", () => {
    const opts = deviceOptions([], { device: "cuda:2", cuda_supported: true, note: "" });
    expect(opts.map((o) => o.value)).toEqual(["auto", "cpu", "cuda:2"]);
    expect(opts[2].label).toContain("GPU 2 (not found now)");
  });
});

describe("Settings: this app (desktop only)", () => {
  beforeEach(() => document.body.replaceChildren());

  const paths = { config_file: "/home/u/.config/apiary/node.toml", data_dir: "/home/u/.local/share/apiary", log_dir: "/home/u/.local/share/org.apiary.desktop/logs" };

  async function desktop() {
    const { api } = fakeApi();
    api.paths.mockResolvedValue(paths);
    api.autostart.mockResolvedValue(false);
    const root = document.createElement("div");
    document.body.replaceChildren(root);
    mountSettings(root, { api, store: new Store(), charts: false });
    await flush();
    return { api, root };
  }

  it("is hidden over HTTP (no paths, no autostart, no updates there)", async () => {
    const { root } = await setup();
    expect(byTestId(root, "app-settings").hidden).toBe(true);
  });

  it("shows where things are kept and turns autostart on", async () => {
    const { api, root } = await desktop();
    expect(byTestId(root, "app-settings").hidden).toBe(false);
    expect(byTestId(root, "path-config").textContent).toBe(paths.config_file);
    expect(byTestId(root, "path-data").textContent).toBe(paths.data_dir);
    expect(byTestId(root, "path-logs").textContent).toBe(paths.log_dir);
    const box = input(root, "setting-autostart");
    expect(box.checked).toBe(false);
    expect(root.querySelector('label[for="setting-autostart"]')).not.toBeNull();
    box.checked = true;
    box.dispatchEvent(new Event("change"));
    await flush();
    expect(api.setAutostart).toHaveBeenCalledWith(true);
    expect(box.checked).toBe(true);
  });

  it("checks for updates only when asked, and offers a newer one", async () => {
    const { api, root } = await desktop();
    expect(api.checkUpdate).not.toHaveBeenCalled();
    byTestId(root, "check-updates").click();
    await flush();
    expect(byTestId(root, "update-none").textContent).toContain("up to date");
    api.checkUpdate.mockResolvedValueOnce({ version: "9.9.9", current_version: "0.1.0", notes: "Faster.", date: null });
    byTestId(root, "check-updates").click();
    await flush();
    expect(byTestId(root, "update-available").textContent).toBe("Version 9.9.9 is available (this is 0.1.0).");
    api.installUpdate.mockRejectedValueOnce({ code: "update_failed", message: "the update was not installed: bad signature" });
    byTestId(root, "install-update").click();
    await flush();
    expect(api.installUpdate).toHaveBeenCalledTimes(1);
    expect(byTestId(root, "update-status").textContent).toContain("bad signature");
    expect((byTestId(root, "install-update") as HTMLButtonElement).disabled).toBe(false);
  });

  it("shows a failed check", async () => {
    const { api, root } = await desktop();
    api.checkUpdate.mockRejectedValueOnce({ code: "update_failed", message: "update check failed: offline" });
    byTestId(root, "check-updates").click();
    await flush();
    expect(byTestId(root, "update-error").textContent).toBe("update check failed: offline");
  });
});
