import { afterEach, beforeEach, describe, expect, it, vi } from "vitest";
import { ApiError, backoffDelay, dispatchFrame, HttpApi, loadToken, takeTokenFromLocation, toApiError } from "./api";
import { fx } from "./test/fixtures";

type Call = { url: string; init: RequestInit };

function fakeFetch(respond: (url: string, init: RequestInit) => Response | Promise<Response>) {
  const calls: Call[] = [];
  const f = vi.fn(async (url: string, init: RequestInit = {}) => {
    calls.push({ url, init });
    return respond(url, init);
  });
  return { f, calls };
}

const json = (body: unknown, status = 200) =>
  new Response(JSON.stringify(body), { status, headers: { "content-type": "application/json" } });

describe("HttpApi requests", () => {
  it("sends the bearer token and parses JSON", async () => {
    const { f, calls } = fakeFetch(() => json(fx.status()));
    const api = new HttpApi({ token: "tok123", baseUrl: "http://127.0.0.1:7787", fetch: f });
    const s = await api.status();
    expect(s.state).toBe("running");
    expect(calls[0].url).toBe("http://127.0.0.1:7787/api/status");
    expect((calls[0].init.headers as Record<string, string>).Authorization).toBe("Bearer tok123");
    expect(calls[0].init.method).toBe("GET");
  });

  it("uses the documented routes, methods and bodies", async () => {
    const { f, calls } = fakeFetch((url) => (url.includes("export.csv") ? new Response("x,y\n") : json({ ok: true })));
    const api = new HttpApi({ token: "t", baseUrl: "http://h:1/", fetch: f });
    await api.pause();
    await api.resume();
    await api.finish();
    await api.cancelStart();
    await api.snooze(900);
    await api.setMode("quiet");
    await api.setPolicy(fx.policy());
    await api.experiments();
    await api.showExperiment("local demo", "6e6c");
    await api.showExperiment("x");
    await api.join("local-demo", { maxExperts: 3, publisher: "6e6c" });
    await api.join("y");
    await api.leave("local-demo");
    await api.contributions({ experiment: "local-demo" });
    await api.history({ experiment: "e", from: 10, to: 20 }, "day");
    expect(await api.exportCsv(undefined, "hour")).toBe("x,y\n");
    await api.log(50);
    const seen = calls.map((c) => `${c.init.method} ${c.url.replace("http://h:1", "")}${c.init.body ? ` ${String(c.init.body)}` : ""}`);
    expect(seen).toEqual([
      "POST /api/pause",
      "POST /api/resume",
      "POST /api/finish",
      "POST /api/cancel-start",
      'POST /api/snooze {"seconds":900}',
      'PUT /api/mode {"mode":"quiet"}',
      `PUT /api/policy ${JSON.stringify(fx.policy())}`,
      "GET /api/experiments",
      "GET /api/experiments/local%20demo?publisher=6e6c",
      "GET /api/experiments/x",
      'POST /api/experiments/local-demo/join {"max_experts":3,"publisher":"6e6c"}',
      "POST /api/experiments/y/join {}",
      "POST /api/experiments/local-demo/leave",
      "GET /api/contributions?experiment=local-demo",
      "GET /api/history?bucket=day&experiment=e&from=10&to=20",
      "GET /api/export.csv?bucket=hour",
      "GET /api/log?limit=50",
    ]);
    const put = calls.find((c) => c.init.method === "PUT")!;
    expect((put.init.headers as Record<string, string>)["Content-Type"]).toBe("application/json");
  });
});

describe("HttpApi first-run calls", () => {
  it("reads the machine from GET /api/machine", async () => {
    const { f, calls } = fakeFetch(() => json(fx.machine()));
    const api = new HttpApi({ token: "t", baseUrl: "http://h:1", fetch: f });
    expect(await api.machine()).toEqual(fx.machine());
    expect(calls.map((c) => `${c.init.method} ${c.url}`)).toEqual(["GET http://h:1/api/machine"]);
    expect((calls[0].init.headers as Record<string, string>).Authorization).toBe("Bearer t");
  });

  it("never has a first run, has no autostart, and finishing the setup resumes only when asked", async () => {
    const { f, calls } = fakeFetch(() => json({ ok: true }));
    const api = new HttpApi({ token: "t", baseUrl: "http://h:1", fetch: f });
    expect(await api.firstRun()).toBe(false);
    expect(await api.autostart()).toBeNull();
    expect(calls).toEqual([]);
    const e = await api.setAutostart(true).catch((x: unknown) => x);
    expect(e).toBeInstanceOf(ApiError);
    expect(e).toMatchObject({ code: "unsupported" });
    expect(calls).toEqual([]);
    await expect(api.completeSetup(false)).resolves.toBeUndefined();
    expect(calls).toEqual([]);
    await expect(api.completeSetup(true)).resolves.toBeUndefined();
    expect(calls.map((c) => `${c.init.method} ${c.url}`)).toEqual(["POST http://h:1/api/resume"]);
  });

  it("has no updates or app paths over HTTP (they are the desktop app's)", async () => {
    const { f, calls } = fakeFetch(() => json({ ok: true }));
    const api = new HttpApi({ token: "t", baseUrl: "http://h:1", fetch: f });
    await expect(api.checkUpdate()).rejects.toMatchObject({ name: "ApiError", code: "unsupported" });
    await expect(api.installUpdate()).rejects.toMatchObject({ name: "ApiError", code: "unsupported" });
    expect(await api.paths()).toBeNull();
    expect(calls).toEqual([]);
  });

  it("a failed resume fails completeSetup with the node's error", async () => {
    const { f } = fakeFetch(() => json({ code: "stopped", message: "the node has stopped" }, 503));
    const api = new HttpApi({ token: "t", baseUrl: "http://h", fetch: f });
    await expect(api.completeSetup(true)).rejects.toMatchObject({ code: "stopped", message: "the node has stopped" });
  });
});

describe("errors become ApiError", () => {
  it("keeps the node's code and message", async () => {
    const { f } = fakeFetch(() => json({ code: "not_found", message: "no experiment `nope`" }, 404));
    const api = new HttpApi({ token: "t", baseUrl: "http://h", fetch: f });
    const e = await api.join("nope").catch((x: unknown) => x);
    expect(e).toBeInstanceOf(ApiError);
    expect(e).toMatchObject({ code: "not_found", message: "no experiment `nope`", status: 404 });
  });

  it("maps a non-JSON error body", async () => {
    const { f } = fakeFetch(() => new Response("gateway down", { status: 502, statusText: "Bad Gateway" }));
    const api = new HttpApi({ token: "t", baseUrl: "http://h", fetch: f });
    await expect(api.status()).rejects.toMatchObject({ code: "http_502", message: "gateway down" });
  });

  it("maps a network failure", async () => {
    const f = vi.fn(async () => {
      throw new TypeError("Failed to fetch");
    });
    const api = new HttpApi({ token: "t", baseUrl: "http://h", fetch: f });
    await expect(api.status()).rejects.toMatchObject({ code: "network" });
  });

  it("calls onUnauthorized on 401", async () => {
    const { f } = fakeFetch(() => json({ code: "unauthorized", message: "missing or wrong token" }, 401));
    const onUnauthorized = vi.fn();
    const api = new HttpApi({ token: "bad", baseUrl: "http://h", fetch: f, onUnauthorized });
    await expect(api.policy()).rejects.toMatchObject({ code: "unauthorized", status: 401 });
    expect(onUnauthorized).toHaveBeenCalledOnce();
  });

  it("toApiError handles Tauri-style rejections", () => {
    expect(toApiError({ code: "already_joined", message: "already" })).toMatchObject({ code: "already_joined", message: "already" });
    expect(toApiError('{"code":"busy","message":"later"}')).toMatchObject({ code: "busy", message: "later" });
    expect(toApiError("plain text")).toMatchObject({ code: "internal", message: "plain text" });
    expect(toApiError(new Error("boom"))).toMatchObject({ code: "internal", message: "boom" });
    const same = new ApiError("x", "y");
    expect(toApiError(same)).toBe(same);
  });
});

describe("token from the URL fragment", () => {
  beforeEach(() => {
    sessionStorage.clear();
    history.replaceState(null, "", "/");
  });

  it("reads #token=, stores it and removes it from the address bar", () => {
    history.replaceState(null, "", "/#token=abc%2F123");
    expect(takeTokenFromLocation()).toBe("abc/123");
    expect(loadToken()).toBe("abc/123");
    expect(location.hash).toBe("");
    expect(location.href).not.toContain("abc");
  });

  it("keeps the route when the token rides along", () => {
    history.replaceState(null, "", "/#/settings?token=zzz");
    expect(takeTokenFromLocation()).toBe("zzz");
    expect(location.hash).toBe("#/settings");
  });

  it("falls back to the stored token, or null", () => {
    expect(takeTokenFromLocation()).toBeNull();
    sessionStorage.setItem("apiary.token", "stored");
    expect(takeTokenFromLocation()).toBe("stored");
  });
});

// A scripted WebSocket.
class FakeWS {
  static all: FakeWS[] = [];
  url: string;
  onopen: (() => void) | null = null;
  onmessage: ((m: { data: string }) => void) | null = null;
  onclose: (() => void) | null = null;
  onerror: (() => void) | null = null;
  closed = false;
  constructor(url: string) {
    this.url = url;
    FakeWS.all.push(this);
  }
  open() {
    this.onopen?.();
  }
  send(frame: unknown) {
    this.onmessage?.({ data: JSON.stringify(frame) });
  }
  drop() {
    this.onclose?.();
  }
  close() {
    this.closed = true;
  }
}

describe("event stream over WebSocket", () => {
  afterEach(() => {
    FakeWS.all = [];
  });

  function setup(fetchStatus = 200) {
    const timers: { f: () => void; ms: number }[] = [];
    const { f } = fakeFetch(() =>
      fetchStatus === 200 ? json(fx.status()) : json({ code: "unauthorized", message: "no" }, fetchStatus),
    );
    const api = new HttpApi({
      token: "se cret",
      baseUrl: "http://127.0.0.1:7787",
      fetch: f,
      WebSocket: FakeWS as unknown as new (url: string) => WebSocket,
      backoffMs: { first: 100, max: 1000 },
      setTimeout: (fn, ms) => timers.push({ f: fn, ms }),
      clearTimeout: () => {},
    });
    return { api, timers };
  }

  it("connects with the token in the query and splits frames", () => {
    const { api } = setup();
    const status = vi.fn();
    const event = vi.fn();
    const lagged = vi.fn();
    const connection = vi.fn();
    api.subscribe({ status, event, lagged, connection });
    const ws = FakeWS.all[0];
    expect(ws.url).toBe("ws://127.0.0.1:7787/api/events?token=se+cret");
    ws.open();
    ws.send({ type: "status", ...fx.status() });
    ws.send({ type: "event", event: "paused", reason: "Paused by you" });
    ws.send({ type: "lagged", missed: 7 });
    ws.onmessage?.({ data: "not json" });
    expect(status).toHaveBeenCalledOnce();
    expect(status.mock.calls[0][0]).toEqual(fx.status());
    expect(status.mock.calls[0][0]).not.toHaveProperty("type");
    expect(event).toHaveBeenCalledWith({ event: "paused", reason: "Paused by you" });
    expect(lagged).toHaveBeenCalledWith(7);
    expect(connection.mock.calls.map((c) => c[0])).toEqual(["connecting", "open"]);
  });

  it("reconnects with growing backoff, reset after a success", () => {
    const { api, timers } = setup();
    const stop = api.subscribe({});
    FakeWS.all[0].drop(); // never opened
    expect(timers.length).toBe(1);
    timers[0].f();
    expect(FakeWS.all.length).toBe(2);
    FakeWS.all[1].drop();
    timers[1].f();
    FakeWS.all[2].drop();
    // 100, 200, 400 (±20 %)
    expect(timers[0].ms).toBeGreaterThanOrEqual(80);
    expect(timers[0].ms).toBeLessThanOrEqual(120);
    expect(timers[1].ms).toBeGreaterThanOrEqual(160);
    expect(timers[2].ms).toBeGreaterThanOrEqual(320);
    timers[2].f();
    FakeWS.all[3].open();
    FakeWS.all[3].drop();
    expect(timers[3].ms).toBeLessThanOrEqual(120); // reset after open
    stop();
    timers[3].f(); // stopped: no new socket
    expect(FakeWS.all.length).toBe(4);
  });

  it("stops and reports when the token is refused", async () => {
    const { api, timers } = setup(401);
    const error = vi.fn();
    api.subscribe({ error });
    FakeWS.all[0].drop();
    await new Promise((r) => setTimeout(r, 0));
    await new Promise((r) => setTimeout(r, 0));
    expect(error).toHaveBeenCalledOnce();
    expect(error.mock.calls[0][0]).toMatchObject({ code: "unauthorized" });
    timers[0]?.f();
    expect(FakeWS.all.length).toBe(1);
  });

  it("closes the socket when stopped", () => {
    const { api } = setup();
    const stop = api.subscribe({});
    FakeWS.all[0].open();
    stop();
    expect(FakeWS.all[0].closed).toBe(true);
  });

  it("backoff is capped", () => {
    expect(backoffDelay(20, 1000, 30000, () => 0.5)).toBe(30000);
    expect(backoffDelay(0, 1000, 30000, () => 0.5)).toBe(1000);
    expect(backoffDelay(3, 1000, 30000, () => 0.5)).toBe(8000);
  });

  it("dispatchFrame ignores unknown frames", () => {
    const h = { status: vi.fn(), event: vi.fn(), lagged: vi.fn() };
    dispatchFrame({ type: "other" } as never, h);
    expect(h.status).not.toHaveBeenCalled();
    expect(h.event).not.toHaveBeenCalled();
  });
});
