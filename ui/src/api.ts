// The one API module: the same `Api` interface over two transports.
//
// - HTTP + WebSocket (`HttpApi`): a headless node serves this dashboard and its API on the same
//   origin. Every request carries `Authorization: Bearer <token>`; the event stream is the WebSocket
//   `/api/events?token=<token>` (browsers cannot set headers on WebSockets), reconnected with
//   exponential backoff.
// - Tauri IPC (`IpcApi`): inside the desktop window (`window.__TAURI_INTERNALS__` exists), commands
//   go through `invoke` and the stream arrives as the `node://status` / `node://event` events.
//
// Errors from either become an `ApiError {code, message}`.

import { invoke } from "@tauri-apps/api/core";
import { listen, type UnlistenFn } from "@tauri-apps/api/event";
import type {
  AppPaths,
  Bucket,
  Card,
  DeviceSetting,
  EventsFrame,
  Filter,
  JoinOptions,
  JoinPlan,
  LoggedEvent,
  MachineProfile,
  Mode,
  NodeEvent,
  NodeStatus,
  Ok,
  PolicyConfig,
  Preview,
  Row,
  Totals,
  UpdateInfo,
} from "./types";

/** An error from the node (its JSON `{code, message}`) or from getting there (`network`, ...). */
export class ApiError extends Error {
  readonly code: string;
  /** The HTTP status, when there was one. */
  readonly status?: number;
  constructor(code: string, message: string, status?: number) {
    super(message);
    this.name = "ApiError";
    this.code = code;
    this.status = status;
  }
}

/** Turns anything thrown by a transport into an `ApiError`. */
export function toApiError(e: unknown): ApiError {
  if (e instanceof ApiError) return e;
  if (e && typeof e === "object") {
    const o = e as Record<string, unknown>;
    if (typeof o.code === "string" && typeof o.message === "string") return new ApiError(o.code, o.message);
    if (typeof o.message === "string") return new ApiError("internal", o.message);
  }
  if (typeof e === "string") {
    // A Tauri command error may arrive as a JSON string of `UiError`.
    try {
      const parsed: unknown = JSON.parse(e);
      if (parsed && typeof parsed === "object" && "code" in parsed && "message" in parsed) return toApiError(parsed);
    } catch {
      /* not JSON */
    }
    return new ApiError("internal", e);
  }
  return new ApiError("internal", String(e));
}

export type ConnectionState = "connecting" | "open" | "closed";

export interface StreamHandlers {
  status?: (s: NodeStatus) => void;
  event?: (e: NodeEvent) => void;
  lagged?: (missed: number) => void;
  connection?: (state: ConnectionState) => void;
  /** The stream could not be set up or the node refused it (for example `unauthorized`). */
  error?: (e: ApiError) => void;
}

export interface Api {
  readonly kind: "http" | "ipc";
  status(): Promise<NodeStatus>;
  pause(): Promise<Ok>;
  resume(): Promise<Ok>;
  finish(): Promise<Ok>;
  /** Cancels a start that is due because you are away (cause `starting_soon`). */
  cancelStart(): Promise<Ok>;
  snooze(seconds: number): Promise<Ok>;
  setMode(mode: Mode): Promise<Ok>;
  policy(): Promise<PolicyConfig>;
  /** Replaces the whole policy; answers the policy in effect. */
  setPolicy(policy: PolicyConfig): Promise<PolicyConfig>;
  /** Where experts joined from now on compute (`auto`, `cpu` or `cuda:N`). */
  device(): Promise<DeviceSetting>;
  /** Changes where experts compute; applies to experts joined after the change. */
  setDevice(device: string): Promise<DeviceSetting>;
  experiments(): Promise<Card[]>;
  showExperiment(id: string, publisher?: string | null): Promise<Preview>;
  join(id: string, options?: JoinOptions): Promise<JoinPlan>;
  leave(id: string): Promise<Ok>;
  contributions(filter?: Filter): Promise<Totals>;
  history(filter: Filter | undefined, bucket: Bucket): Promise<Row[]>;
  /** The history as CSV text. */
  exportCsv(filter: Filter | undefined, bucket: Bucket): Promise<string>;
  log(limit?: number): Promise<LoggedEvent[]>;
  /** This computer as the hardware fit sees it (cores, RAM, free disk, GPUs). */
  machine(): Promise<MachineProfile>;
  /** Whether the first-run wizard should be shown (desktop app only; a headless node: always false). */
  firstRun(): Promise<boolean>;
  /** Marks the first run as done; `start`: resume contributing now (else stay paused). */
  completeSetup(start: boolean): Promise<void>;
  /** Whether the app starts with the user's session; null where that is not supported (HTTP). */
  autostart(): Promise<boolean | null>;
  /** Turns starting with the session on or off; answers the state now. HTTP: `unsupported`. */
  setAutostart(enabled: boolean): Promise<boolean>;
  /** Asks the desktop app's signed update feed for a newer release (null: up to date). Desktop app only. */
  checkUpdate(): Promise<UpdateInfo | null>;
  /** Installs the newer release and restarts the app (false: nothing newer). Desktop app only. */
  installUpdate(): Promise<boolean>;
  /** Where the desktop app keeps its settings, data and logs; null over HTTP. */
  paths(): Promise<AppPaths | null>;
  /** Follows the status and the events; returns a function that stops. */
  subscribe(handlers: StreamHandlers): () => void;
}

// ---------------------------------------------------------------------------------------------
// Token (browser transport only)

const TOKEN_KEY = "apiary.token";

/**
 * Reads `#token=…` from the URL fragment (also `#/page?token=…` / `&token=`), keeps it in
 * sessionStorage, and removes it from the address bar. Returns the token to use (the fragment's or
 * the stored one), or null.
 */
export function takeTokenFromLocation(win: Window = window): string | null {
  const hash = win.location.hash;
  const m = /(^#|[?&#])token=([^&]*)/.exec(hash);
  if (m) {
    const token = decodeURIComponent(m[2]).trim();
    // What is left of the fragment: a route, if any.
    let rest = hash.slice(0, m.index) + hash.slice(m.index + m[0].length);
    rest = rest.replace(/[?&]$/, "").replace(/^#[?&]/, "#");
    if (rest === "#" || rest === "") rest = "";
    const url = win.location.pathname + win.location.search + rest;
    win.history.replaceState(win.history.state, "", url);
    if (token) {
      storeToken(token, win);
      return token;
    }
  }
  return loadToken(win);
}

export function storeToken(token: string, win: Window = window): void {
  try {
    win.sessionStorage.setItem(TOKEN_KEY, token);
  } catch {
    /* storage disabled: the token lives for this page only */
  }
}

export function loadToken(win: Window = window): string | null {
  try {
    return win.sessionStorage.getItem(TOKEN_KEY);
  } catch {
    return null;
  }
}

export function clearToken(win: Window = window): void {
  try {
    win.sessionStorage.removeItem(TOKEN_KEY);
  } catch {
    /* ignore */
  }
}

// ---------------------------------------------------------------------------------------------
// HTTP + WebSocket

type FetchFn = (input: string, init?: RequestInit) => Promise<Response>;
type WebSocketCtor = new (url: string) => WebSocket;

export interface HttpApiOptions {
  token: string;
  /** Origin (and optional path) the API lives under; default the page's origin. */
  baseUrl?: string;
  fetch?: FetchFn;
  WebSocket?: WebSocketCtor;
  /** Called on every 401, before the promise rejects. */
  onUnauthorized?: () => void;
  /** Reconnect delays: first, and the cap (ms). */
  backoffMs?: { first: number; max: number };
  setTimeout?: (f: () => void, ms: number) => unknown;
  clearTimeout?: (h: unknown) => void;
}

function query(params: Record<string, string | number | undefined | null>): string {
  const q = new URLSearchParams();
  for (const [k, v] of Object.entries(params)) {
    if (v !== undefined && v !== null && v !== "") q.set(k, String(v));
  }
  const s = q.toString();
  return s ? `?${s}` : "";
}

function filterParams(f: Filter | undefined): Record<string, string | number | undefined> {
  return { experiment: f?.experiment, uid: f?.uid, from: f?.from, to: f?.to };
}

/** Splits an `/api/events` frame into what it carries. */
export function dispatchFrame(frame: EventsFrame, h: StreamHandlers): void {
  if (frame.type === "status") {
    const { type: _t, ...status } = frame;
    h.status?.(status as NodeStatus);
  } else if (frame.type === "event") {
    const { type: _t, ...event } = frame;
    h.event?.(event as NodeEvent);
  } else if (frame.type === "lagged") {
    h.lagged?.(frame.missed);
  }
}

/** The next reconnect delay: doubled each failure, capped, with ±20 % jitter. */
export function backoffDelay(attempt: number, first: number, max: number, rand: () => number = Math.random): number {
  const base = Math.min(max, first * 2 ** Math.max(0, attempt));
  return Math.round(base * (0.8 + 0.4 * rand()));
}

export class HttpApi implements Api {
  readonly kind = "http" as const;
  private readonly token: string;
  private readonly base: string;
  private readonly fetchFn: FetchFn;
  private readonly WS: WebSocketCtor | undefined;
  private readonly onUnauthorized?: () => void;
  private readonly backoff: { first: number; max: number };
  private readonly setT: (f: () => void, ms: number) => unknown;
  private readonly clearT: (h: unknown) => void;

  constructor(o: HttpApiOptions) {
    this.token = o.token;
    this.base = (o.baseUrl ?? (typeof location !== "undefined" ? location.origin : "")).replace(/\/$/, "");
    this.fetchFn = o.fetch ?? ((i, init) => fetch(i, init));
    this.WS = o.WebSocket ?? (typeof WebSocket !== "undefined" ? WebSocket : undefined);
    this.onUnauthorized = o.onUnauthorized;
    this.backoff = o.backoffMs ?? { first: 1000, max: 30000 };
    this.setT = o.setTimeout ?? ((f, ms) => setTimeout(f, ms));
    this.clearT = o.clearTimeout ?? ((h) => clearTimeout(h as ReturnType<typeof setTimeout>));
  }

  /** Sends one request; answers the raw response when it is a success, else throws `ApiError`. */
  private async raw(method: string, path: string, body?: unknown): Promise<Response> {
    const headers: Record<string, string> = { Authorization: `Bearer ${this.token}` };
    const init: RequestInit = { method, headers, cache: "no-store" };
    if (body !== undefined) {
      headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    let res: Response;
    try {
      res = await this.fetchFn(this.base + path, init);
    } catch (e) {
      throw new ApiError("network", `cannot reach the node: ${e instanceof Error ? e.message : String(e)}`);
    }
    if (res.ok) return res;
    let code = res.status === 401 ? "unauthorized" : `http_${res.status}`;
    let message = res.statusText || `HTTP ${res.status}`;
    try {
      const text = await res.text();
      try {
        const j = JSON.parse(text) as { code?: unknown; message?: unknown };
        if (typeof j.code === "string") code = j.code;
        if (typeof j.message === "string") message = j.message;
      } catch {
        if (text.trim()) message = text.trim();
      }
    } catch {
      /* no body */
    }
    if (res.status === 401) this.onUnauthorized?.();
    throw new ApiError(code, message, res.status);
  }

  private async json<T>(method: string, path: string, body?: unknown): Promise<T> {
    const res = await this.raw(method, path, body);
    try {
      return (await res.json()) as T;
    } catch (e) {
      throw new ApiError("bad_response", `the node's answer is not JSON: ${String(e)}`, res.status);
    }
  }

  status() {
    return this.json<NodeStatus>("GET", "/api/status");
  }
  pause() {
    return this.json<Ok>("POST", "/api/pause");
  }
  resume() {
    return this.json<Ok>("POST", "/api/resume");
  }
  finish() {
    return this.json<Ok>("POST", "/api/finish");
  }
  cancelStart() {
    return this.json<Ok>("POST", "/api/cancel-start");
  }
  snooze(seconds: number) {
    return this.json<Ok>("POST", "/api/snooze", { seconds });
  }
  setMode(mode: Mode) {
    return this.json<Ok>("PUT", "/api/mode", { mode });
  }
  policy() {
    return this.json<PolicyConfig>("GET", "/api/policy");
  }
  setPolicy(policy: PolicyConfig) {
    return this.json<PolicyConfig>("PUT", "/api/policy", policy);
  }
  device() {
    return this.json<DeviceSetting>("GET", "/api/device");
  }
  setDevice(device: string) {
    return this.json<DeviceSetting>("PUT", "/api/device", { device });
  }
  experiments() {
    return this.json<Card[]>("GET", "/api/experiments");
  }
  showExperiment(id: string, publisher?: string | null) {
    return this.json<Preview>("GET", `/api/experiments/${encodeURIComponent(id)}${query({ publisher })}`);
  }
  join(id: string, options: JoinOptions = {}) {
    const body: { max_experts?: number; publisher?: string } = {};
    if (options.maxExperts !== undefined && options.maxExperts !== null) body.max_experts = options.maxExperts;
    if (options.publisher) body.publisher = options.publisher;
    return this.json<JoinPlan>("POST", `/api/experiments/${encodeURIComponent(id)}/join`, body);
  }
  leave(id: string) {
    return this.json<Ok>("POST", `/api/experiments/${encodeURIComponent(id)}/leave`);
  }
  contributions(filter?: Filter) {
    return this.json<Totals>("GET", `/api/contributions${query(filterParams(filter))}`);
  }
  history(filter: Filter | undefined, bucket: Bucket) {
    return this.json<Row[]>("GET", `/api/history${query({ bucket, ...filterParams(filter) })}`);
  }
  async exportCsv(filter: Filter | undefined, bucket: Bucket) {
    const res = await this.raw("GET", `/api/export.csv${query({ bucket, ...filterParams(filter) })}`);
    return res.text();
  }
  log(limit?: number) {
    return this.json<LoggedEvent[]>("GET", `/api/log${query({ limit })}`);
  }
  machine() {
    return this.json<MachineProfile>("GET", "/api/machine");
  }
  /** A headless node is configured by its admin: never a first run here. */
  async firstRun() {
    return false;
  }
  async completeSetup(start: boolean) {
    if (start) await this.resume();
  }
  async autostart(): Promise<boolean | null> {
    return null;
  }
  async setAutostart(_enabled: boolean): Promise<boolean> {
    throw new ApiError("unsupported", "starting with the session is a setting of the desktop app, not of a headless node");
  }
  async checkUpdate(): Promise<UpdateInfo | null> {
    throw new ApiError("unsupported", "updates are the desktop app's; a headless node is updated with its package");
  }
  async installUpdate(): Promise<boolean> {
    throw new ApiError("unsupported", "updates are the desktop app's; a headless node is updated with its package");
  }
  async paths(): Promise<AppPaths | null> {
    return null;
  }

  /** The WebSocket URL of the event stream. */
  eventsUrl(): string {
    const u = new URL(this.base + "/api/events");
    u.protocol = u.protocol === "https:" ? "wss:" : "ws:";
    u.searchParams.set("token", this.token);
    return u.toString();
  }

  subscribe(h: StreamHandlers): () => void {
    const WS = this.WS;
    if (!WS) {
      h.error?.(new ApiError("unsupported", "this browser has no WebSocket"));
      return () => {};
    }
    let stopped = false;
    let attempt = 0;
    let socket: WebSocket | null = null;
    let timer: unknown = null;

    const connect = () => {
      if (stopped) return;
      h.connection?.("connecting");
      let opened = false;
      const ws = new WS(this.eventsUrl());
      socket = ws;
      ws.onopen = () => {
        opened = true;
        attempt = 0;
        h.connection?.("open");
      };
      ws.onmessage = (m: MessageEvent) => {
        let frame: EventsFrame;
        try {
          frame = JSON.parse(String(m.data)) as EventsFrame;
        } catch {
          return;
        }
        dispatchFrame(frame, h);
      };
      ws.onclose = () => {
        if (socket === ws) socket = null;
        if (stopped) return;
        h.connection?.("closed");
        if (!opened) {
          // The upgrade failed: ask over HTTP why (a wrong token is a 401 there too).
          this.status().catch((e: unknown) => {
            const err = toApiError(e);
            if (err.code === "unauthorized") {
              stopped = true;
              h.error?.(err);
            }
          });
        }
        const delay = backoffDelay(attempt++, this.backoff.first, this.backoff.max);
        timer = this.setT(() => {
          timer = null;
          connect();
        }, delay);
      };
      ws.onerror = () => {
        /* onclose follows */
      };
    };
    connect();
    return () => {
      stopped = true;
      if (timer !== null) this.clearT(timer);
      socket?.close();
      socket = null;
    };
  }
}

// ---------------------------------------------------------------------------------------------
// Tauri IPC

/** Whether this page runs inside the Tauri window. */
export function isTauri(win: unknown = typeof window !== "undefined" ? window : undefined): boolean {
  return !!win && typeof win === "object" && "__TAURI_INTERNALS__" in win;
}

export class IpcApi implements Api {
  readonly kind = "ipc" as const;

  private async call<T>(cmd: string, args?: Record<string, unknown>): Promise<T> {
    try {
      return await invoke<T>(cmd, args);
    } catch (e) {
      throw toApiError(e);
    }
  }

  status() {
    return this.call<NodeStatus>("status");
  }
  pause() {
    return this.call<Ok>("pause");
  }
  resume() {
    return this.call<Ok>("resume");
  }
  finish() {
    return this.call<Ok>("finish");
  }
  cancelStart() {
    return this.call<Ok>("cancel_start");
  }
  snooze(seconds: number) {
    return this.call<Ok>("snooze", { seconds });
  }
  setMode(mode: Mode) {
    return this.call<Ok>("set_mode", { mode });
  }
  policy() {
    return this.call<PolicyConfig>("policy");
  }
  setPolicy(policy: PolicyConfig) {
    return this.call<PolicyConfig>("set_policy", { policy });
  }
  device() {
    return this.call<DeviceSetting>("device");
  }
  setDevice(device: string) {
    return this.call<DeviceSetting>("set_device", { device });
  }
  experiments() {
    return this.call<Card[]>("experiments");
  }
  showExperiment(id: string, publisher?: string | null) {
    return this.call<Preview>("show_experiment", { id, publisher: publisher || null });
  }
  join(id: string, options: JoinOptions = {}) {
    return this.call<JoinPlan>("join", {
      id,
      maxExperts: options.maxExperts ?? null,
      publisher: options.publisher || null,
    });
  }
  leave(id: string) {
    return this.call<Ok>("leave", { id });
  }
  contributions(filter: Filter = {}) {
    return this.call<Totals>("contributions", { filter });
  }
  history(filter: Filter | undefined, bucket: Bucket) {
    return this.call<Row[]>("history", { filter: filter ?? {}, bucket });
  }
  exportCsv(filter: Filter | undefined, bucket: Bucket) {
    return this.call<string>("export_csv", { filter: filter ?? {}, bucket });
  }
  log(limit?: number) {
    return this.call<LoggedEvent[]>("log", { limit: limit ?? null });
  }
  machine() {
    return this.call<MachineProfile>("machine");
  }
  firstRun() {
    return this.call<boolean>("first_run");
  }
  /** Tells the app its dashboard painted its first screen (logged once, as the cold-start time). */
  async painted() {
    await this.call<unknown>("painted");
  }
  async completeSetup(start: boolean) {
    await this.call<unknown>("complete_setup", { start });
  }
  autostart(): Promise<boolean | null> {
    return this.call<boolean>("autostart");
  }
  setAutostart(enabled: boolean) {
    return this.call<boolean>("set_autostart", { enabled });
  }
  checkUpdate() {
    return this.call<UpdateInfo | null>("check_update");
  }
  installUpdate() {
    return this.call<boolean>("install_update");
  }
  paths(): Promise<AppPaths | null> {
    return this.call<AppPaths>("paths");
  }

  subscribe(h: StreamHandlers): () => void {
    let stopped = false;
    const unlisten: UnlistenFn[] = [];
    h.connection?.("connecting");
    Promise.all([
      listen<NodeStatus>("node://status", (e) => h.status?.(e.payload)),
      listen<NodeEvent>("node://event", (e) => h.event?.(e.payload)),
    ])
      .then((fns) => {
        if (stopped) {
          fns.forEach((f) => f());
          return;
        }
        unlisten.push(...fns);
        h.connection?.("open");
        // The events carry changes; start from the status now.
        return this.status().then((s) => {
          if (!stopped) h.status?.(s);
        });
      })
      .catch((e: unknown) => h.error?.(toApiError(e)));
    return () => {
      stopped = true;
      unlisten.splice(0).forEach((f) => f());
    };
  }
}

/** The transport for where this page runs. */
export function createApi(o: { token?: string | null; onUnauthorized?: () => void } = {}): Api {
  if (isTauri()) return new IpcApi();
  return new HttpApi({ token: o.token ?? "", onUnauthorized: o.onUnauthorized });
}
