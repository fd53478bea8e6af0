// The app shell: token handling, navigation (hash routes), the live store.

import { clearToken, HttpApi, IpcApi, isTauri, storeToken, takeTokenFromLocation, toApiError, type Api } from "./api";
import { h, setText } from "./dom";
import { mountContributions } from "./pages/contributions";
import { mountExperiments } from "./pages/experiments";
import { mountLog } from "./pages/log";
import { mountOverview } from "./pages/overview";
import { mountSettings } from "./pages/settings";
import { mountTokenScreen } from "./pages/token";
import { mountWizard } from "./pages/wizard";
import { Store, type Ctx } from "./store";

export const ROUTES = {
  overview: { title: "Overview", mount: mountOverview },
  experiments: { title: "Experiments", mount: mountExperiments },
  contributions: { title: "Contributions", mount: mountContributions },
  settings: { title: "Settings", mount: mountSettings },
  log: { title: "Log", mount: mountLog },
  // The first-run wizard: a page of its own, not in the navigation bar.
  welcome: { title: "Welcome", mount: mountWizard },
} as const;
export type Route = keyof typeof ROUTES;
/** The routes the navigation bar links to. */
export const NAV_ROUTES: readonly Route[] = (Object.keys(ROUTES) as Route[]).filter((r) => r !== "welcome");

export function routeFromHash(hash: string): Route {
  const name = hash.replace(/^#\/?/, "").split(/[/?&]/)[0];
  return (name in ROUTES ? name : "overview") as Route;
}

/** Runs the dashboard with `api` in `root`; returns a function that stops it. */
export function startApp(
  root: HTMLElement,
  api: Api,
  opts: { charts?: boolean; onUnauthorized?: () => void; onPainted?: () => void } = {},
): () => void {
  const store = new Store();
  const ctx: Ctx = { api, store, charts: opts.charts ?? true };
  const conn = h("span", { class: "conn", "data-testid": "connection", role: "status" }, "connecting…");
  const navLinks = NAV_ROUTES.map((r) =>
    h("a", { href: `#/${r}`, "data-testid": `nav-${r}`, class: "nav-link" }, ROUTES[r].title),
  );
  const main = h("main", { id: "main", tabindex: "-1" });
  root.replaceChildren(
    h("a", { class: "skip", href: "#main", onclick: (e: Event) => (e.preventDefault(), main.focus()) }, "Skip to content"),
    h(
      "header",
      { class: "top" },
      h("span", { class: "brand" }, h("span", { class: "logo", "aria-hidden": "true" }, "⬢"), " Apiary"),
      h("nav", { "aria-label": "Pages" }, navLinks),
      conn,
    ),
    main,
  );

  let unmount: (() => void) | null = null;
  let current: Route | null = null;
  const show = () => {
    const r = routeFromHash(location.hash);
    if (r === current) return;
    current = r;
    unmount?.();
    main.replaceChildren();
    main.classList.toggle("full-page", r === "welcome");
    for (const a of navLinks) {
      if (a.dataset.testid === `nav-${r}`) a.setAttribute("aria-current", "page");
      else a.removeAttribute("aria-current");
    }
    document.title = `${ROUTES[r].title} · Apiary`;
    unmount = ROUTES[r].mount(main, ctx);
  };
  window.addEventListener("hashchange", show);
  show();

  const offConn = store.onChange(() => {
    const c = store.connection;
    setText(conn, c === "open" ? "live" : c === "connecting" ? "connecting…" : "reconnecting…");
    conn.className = `conn conn-${c}`;
  });
  const fail = (e: unknown) => {
    const err = toApiError(e);
    if (err.code === "unauthorized") opts.onUnauthorized?.();
  };
  api.status().then((s) => store.setStatus(s), fail);
  const stopStream = store.follow(api, fail);
  // The first screen painted with the node's status (the desktop app logs it: its cold-start figure).
  if (opts.onPainted) {
    const painted = opts.onPainted;
    const offPaint = store.onChange(() => {
      if (!store.status) return;
      offPaint();
      requestAnimationFrame(() => requestAnimationFrame(painted));
    });
  }
  let stopped = false;
  // A first run of the desktop app opens the wizard (a headless node never has one).
  api.firstRun().then((first) => {
    if (!first || stopped || routeFromHash(location.hash) === "welcome") return;
    location.hash = "#/welcome";
    show(); // also where setting the hash fires no hashchange
  }, fail);

  return () => {
    stopped = true;
    window.removeEventListener("hashchange", show);
    offConn();
    stopStream();
    unmount?.();
  };
}

/** Entry point: picks the transport, asks for a token where needed. */
export function boot(root: HTMLElement): void {
  if (isTauri()) {
    const api = new IpcApi();
    startApp(root, api, { onPainted: () => void api.painted().catch(() => {}) });
    return;
  }
  let stop: (() => void) | null = null;
  const askToken = (problem?: string) => {
    stop?.();
    stop = null;
    mountTokenScreen(
      root,
      (t) => {
        storeToken(t);
        run(t);
      },
      problem,
    );
  };
  const run = (token: string) => {
    let refused = false;
    const onUnauthorized = () => {
      if (refused) return;
      refused = true;
      clearToken();
      askToken("The node refused this token. Check the api-token file of the node you are talking to (a new data folder makes a new token).");
    };
    const api = new HttpApi({ token, onUnauthorized });
    stop = startApp(root, api, { onUnauthorized });
  };
  const token = takeTokenFromLocation();
  if (token) run(token);
  else askToken();
}
