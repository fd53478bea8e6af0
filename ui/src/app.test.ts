import { afterEach, describe, expect, it, vi } from "vitest";
import { boot, routeFromHash, startApp } from "./app";
import { byTestId, fakeApi, flush } from "./test/fake-api";
import { fx } from "./test/fixtures";

class NoWS {
  static urls: string[] = [];
  onopen = null;
  onmessage = null;
  onclose = null;
  onerror = null;
  constructor(url: string) {
    NoWS.urls.push(url);
  }
  close() {}
}

describe("app shell", () => {
  afterEach(() => {
    vi.unstubAllGlobals();
    sessionStorage.clear();
    history.replaceState(null, "", "/");
  });

  it("routes by hash", () => {
    expect(routeFromHash("")).toBe("overview");
    expect(routeFromHash("#/experiments")).toBe("experiments");
    expect(routeFromHash("#/log?x=1")).toBe("log");
    expect(routeFromHash("#/nope")).toBe("overview");
  });

  it("reports the first paint once, after the first status is on screen", async () => {
    const { api, handlers } = fakeApi();
    const root = document.createElement("div");
    document.body.replaceChildren(root);
    const onPainted = vi.fn();
    vi.stubGlobal("requestAnimationFrame", (f: FrameRequestCallback) => setTimeout(() => f(0), 0));
    let resolveStatus: (s: ReturnType<typeof fx.status>) => void = () => {};
    api.status.mockImplementation(() => new Promise((r) => (resolveStatus = r)));
    const stop = startApp(root, api, { charts: false, onPainted });
    await flush();
    await new Promise((r) => setTimeout(r, 5));
    expect(onPainted).not.toHaveBeenCalled();
    resolveStatus(fx.status());
    await flush();
    await new Promise((r) => setTimeout(r, 5));
    expect(onPainted).toHaveBeenCalledTimes(1);
    expect(byTestId(root, "state").textContent).not.toBe("");
    for (const h of handlers) h.status?.(fx.status());
    await new Promise((r) => setTimeout(r, 5));
    expect(onPainted).toHaveBeenCalledTimes(1);
    stop();
  });

  it("has the navigation hooks and switches pages", async () => {
    const { api, handlers } = fakeApi();
    const root = document.createElement("div");
    document.body.replaceChildren(root);
    const stop = startApp(root, api, { charts: false });
    await flush();
    for (const r of ["overview", "experiments", "contributions", "settings", "log"]) {
      expect(byTestId(root, `nav-${r}`).getAttribute("href")).toBe(`#/${r}`);
    }
    expect(byTestId(root, "nav-overview").getAttribute("aria-current")).toBe("page");
    expect(byTestId(root, "state").textContent).toBe("running");
    location.hash = "#/settings";
    window.dispatchEvent(new Event("hashchange"));
    await flush();
    expect(byTestId(root, "nav-settings").getAttribute("aria-current")).toBe("page");
    expect(root.querySelector('[data-testid="setting-mode"]')).not.toBeNull();
    // live status arrives through the stream
    handlers[0].connection?.("open");
    expect(byTestId(root, "connection").textContent).toBe("live");
    stop();
  });

  it("opens the wizard on a first run; #/welcome is not in the navigation", async () => {
    const { api } = fakeApi();
    api.firstRun.mockResolvedValue(true);
    const root = document.createElement("div");
    document.body.replaceChildren(root);
    const stop = startApp(root, api, { charts: false });
    await flush();
    expect(api.firstRun).toHaveBeenCalledTimes(1);
    expect(location.hash).toBe("#/welcome");
    expect(routeFromHash("#/welcome")).toBe("welcome");
    expect(root.querySelector('[data-testid="wizard-step-1"]')).not.toBeNull();
    expect(root.querySelector('[data-testid="nav-welcome"]')).toBeNull();
    expect(root.querySelectorAll(".nav-link").length).toBe(5);
    expect(document.title).toBe("Welcome · Apiary");
    stop();
  });

  it("stays on the page asked for when it is not a first run, or already on the wizard", async () => {
    const { api } = fakeApi();
    history.replaceState(null, "", "/#/settings");
    const root = document.createElement("div");
    document.body.replaceChildren(root);
    let stop = startApp(root, api, { charts: false });
    await flush();
    expect(api.firstRun).toHaveBeenCalledTimes(1);
    expect(location.hash).toBe("#/settings");
    expect(root.querySelector('[data-testid="wizard-step-1"]')).toBeNull();
    stop();

    const second = fakeApi().api;
    second.firstRun.mockResolvedValue(true);
    history.replaceState(null, "", "/#/welcome");
    stop = startApp(root, second, { charts: false });
    await flush();
    expect(location.hash).toBe("#/welcome");
    expect(second.machine).toHaveBeenCalledTimes(1); // the wizard mounted once
    stop();
  });

  it("without a token, asks for one; the token screen starts the app; a 401 returns to it", async () => {
    const seen: string[] = [];
    let accept = true;
    vi.stubGlobal("fetch", async (_url: string, init: RequestInit) => {
      seen.push((init.headers as Record<string, string>).Authorization);
      return accept
        ? new Response(JSON.stringify(fx.status()), { status: 200 })
        : new Response(JSON.stringify({ code: "unauthorized", message: "missing or wrong token" }), { status: 401 });
    });
    vi.stubGlobal("WebSocket", NoWS);
    const root = document.createElement("div");
    document.body.replaceChildren(root);
    boot(root);
    const input = byTestId(root, "token-input") as HTMLInputElement;
    expect(root.textContent).toContain("api-token");
    expect(root.querySelector('label[for="token-input"]')).not.toBeNull();
    input.value = "  abc  ";
    byTestId(root, "token-submit").click();
    expect(sessionStorage.getItem("apiary.token")).toBe("abc");
    await flush();
    expect(byTestId(root, "state").textContent).toBe("running");
    expect(seen[0]).toBe("Bearer abc");
    expect(NoWS.urls[0]).toContain("/api/events?token=abc");
    // the node refuses the token: back to the token screen
    accept = false;
    location.hash = "#/settings";
    window.dispatchEvent(new Event("hashchange"));
    await flush();
    expect(root.querySelector('[data-testid="token-input"]')).not.toBeNull();
    expect(root.textContent).toContain("refused this token");
    expect(sessionStorage.getItem("apiary.token")).toBeNull();
  });

  it("takes the token from the fragment", async () => {
    vi.stubGlobal("fetch", async () => new Response(JSON.stringify(fx.status()), { status: 200 }));
    vi.stubGlobal("WebSocket", NoWS);
    history.replaceState(null, "", "/#token=frag");
    const root = document.createElement("div");
    document.body.replaceChildren(root);
    boot(root);
    await flush();
    expect(location.hash).toBe("");
    expect(root.querySelector('[data-testid="token-input"]')).toBeNull();
    expect(byTestId(root, "state").textContent).toBe("running");
  });
});
