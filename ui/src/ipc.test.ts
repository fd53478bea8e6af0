import { beforeEach, describe, expect, it, vi } from "vitest";

const invoke = vi.fn();
const listeners = new Map<string, (e: { payload: unknown }) => void>();
const unlisten = vi.fn();
vi.mock("@tauri-apps/api/core", () => ({ invoke: (...a: unknown[]) => invoke(...a) }));
vi.mock("@tauri-apps/api/event", () => ({
  listen: vi.fn(async (name: string, cb: (e: { payload: unknown }) => void) => {
    listeners.set(name, cb);
    return unlisten;
  }),
}));

import { createApi, IpcApi, isTauri } from "./api";
import { fx } from "./test/fixtures";
import { flush } from "./test/fake-api";

describe("Tauri IPC transport", () => {
  beforeEach(() => {
    invoke.mockReset();
    listeners.clear();
    unlisten.mockReset();
  });

  it("is chosen when __TAURI_INTERNALS__ exists", () => {
    expect(isTauri({})).toBe(false);
    expect(isTauri({ __TAURI_INTERNALS__: {} })).toBe(true);
    (window as unknown as Record<string, unknown>).__TAURI_INTERNALS__ = {};
    try {
      expect(createApi().kind).toBe("ipc");
    } finally {
      delete (window as unknown as Record<string, unknown>).__TAURI_INTERNALS__;
    }
    expect(createApi({ token: "t" }).kind).toBe("http");
  });

  it("invokes the documented commands with their arguments", async () => {
    invoke.mockResolvedValue({ ok: true });
    const api = new IpcApi();
    await api.status();
    await api.pause();
    await api.resume();
    await api.finish();
    await api.cancelStart();
    await api.snooze(3600);
    await api.setMode("max");
    await api.policy();
    await api.setPolicy(fx.policy());
    await api.experiments();
    await api.showExperiment("local-demo", "6e6c");
    await api.join("local-demo", { maxExperts: 2, publisher: "6e6c" });
    await api.join("b");
    await api.leave("local-demo");
    await api.contributions({ experiment: "e" });
    await api.history(undefined, "hour");
    await api.exportCsv({ uid: "u" }, "day");
    await api.log(10);
    expect(invoke.mock.calls).toEqual([
      ["status", undefined],
      ["pause", undefined],
      ["resume", undefined],
      ["finish", undefined],
      ["cancel_start", undefined],
      ["snooze", { seconds: 3600 }],
      ["set_mode", { mode: "max" }],
      ["policy", undefined],
      ["set_policy", { policy: fx.policy() }],
      ["experiments", undefined],
      ["show_experiment", { id: "local-demo", publisher: "6e6c" }],
      ["join", { id: "local-demo", maxExperts: 2, publisher: "6e6c" }],
      ["join", { id: "b", maxExperts: null, publisher: null }],
      ["leave", { id: "local-demo" }],
      ["contributions", { filter: { experiment: "e" } }],
      ["history", { filter: {}, bucket: "hour" }],
      ["export_csv", { filter: { uid: "u" }, bucket: "day" }],
      ["log", { limit: 10 }],
    ]);
  });

  it("invokes the first-run commands", async () => {
    const api = new IpcApi();
    invoke.mockResolvedValueOnce(fx.machine());
    expect(await api.machine()).toEqual(fx.machine());
    invoke.mockResolvedValueOnce(true);
    expect(await api.firstRun()).toBe(true);
    invoke.mockResolvedValueOnce(null);
    await expect(api.completeSetup(true)).resolves.toBeUndefined();
    invoke.mockResolvedValueOnce(null);
    await api.completeSetup(false);
    invoke.mockResolvedValueOnce(false);
    expect(await api.autostart()).toBe(false);
    invoke.mockResolvedValueOnce(true);
    expect(await api.setAutostart(true)).toBe(true);
    invoke.mockResolvedValueOnce(false);
    expect(await api.setAutostart(false)).toBe(false);
    expect(invoke.mock.calls).toEqual([
      ["machine", undefined],
      ["first_run", undefined],
      ["complete_setup", { start: true }],
      ["complete_setup", { start: false }],
      ["autostart", undefined],
      ["set_autostart", { enabled: true }],
      ["set_autostart", { enabled: false }],
    ]);
    invoke.mockRejectedValueOnce({ code: "internal", message: "no autostart entry" });
    await expect(api.setAutostart(true)).rejects.toMatchObject({ name: "ApiError", code: "internal", message: "no autostart entry" });
  });

  it("invokes the app's own commands: updates, paths, first paint", async () => {
    const api = new IpcApi();
    const update = { version: "9.9.9", current_version: "0.1.0", notes: null, date: null };
    invoke.mockResolvedValueOnce(update);
    expect(await api.checkUpdate()).toEqual(update);
    invoke.mockResolvedValueOnce(true);
    expect(await api.installUpdate()).toBe(true);
    const paths = { config_file: "/c/node.toml", data_dir: "/d", log_dir: "/l" };
    invoke.mockResolvedValueOnce(paths);
    expect(await api.paths()).toEqual(paths);
    invoke.mockResolvedValueOnce(null);
    await api.painted();
    expect(invoke.mock.calls).toEqual([["check_update", undefined], ["install_update", undefined], ["paths", undefined], ["painted", undefined]]);
    invoke.mockRejectedValueOnce({ code: "update_failed", message: "update check failed: offline" });
    await expect(api.checkUpdate()).rejects.toMatchObject({ name: "ApiError", code: "update_failed" });
  });

  it("turns command errors into ApiError", async () => {
    invoke.mockRejectedValueOnce({ code: "already_joined", message: "already hosting local-demo" });
    await expect(new IpcApi().join("local-demo")).rejects.toMatchObject({ name: "ApiError", code: "already_joined" });
    invoke.mockRejectedValueOnce("the node has stopped");
    await expect(new IpcApi().status()).rejects.toMatchObject({ code: "internal", message: "the node has stopped" });
  });

  it("listens to node://status and node://event, and starts from the status now", async () => {
    invoke.mockResolvedValue(fx.status());
    const status = vi.fn();
    const event = vi.fn();
    const connection = vi.fn();
    const stop = new IpcApi().subscribe({ status, event, connection });
    await flush();
    expect([...listeners.keys()].sort()).toEqual(["node://event", "node://status"]);
    expect(status).toHaveBeenCalledTimes(1); // the initial `status` command
    const s = fx.status();
    s.state = "paused";
    listeners.get("node://status")!({ payload: s });
    listeners.get("node://event")!({ payload: { event: "notice", message: "hello" } });
    expect(status.mock.calls[1][0].state).toBe("paused");
    expect(event).toHaveBeenCalledWith({ event: "notice", message: "hello" });
    expect(connection.mock.calls.map((c) => c[0])).toEqual(["connecting", "open"]);
    stop();
    expect(unlisten).toHaveBeenCalledTimes(2);
  });
});
