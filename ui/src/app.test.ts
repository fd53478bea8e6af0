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
