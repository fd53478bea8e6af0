// The live state every page reads: the latest status, the rolling chart window, live events.

import { chartPoint, RateTracker, RollingBuffer, SERIES } from "./rolling";
import type { Api, ConnectionState } from "./api";
import type { LoggedEvent, NodeEvent, NodeStatus } from "./types";

type Listener = () => void;

export class Store {
  status: NodeStatus | null = null;
  connection: ConnectionState = "connecting";
  readonly buffer = new RollingBuffer(SERIES.length, 300);
  readonly rate = new RateTracker();
  /** The latest rows/s, null before two statuses. */
  rowsPerS: number | null = null;
  /** Rows/s per experiment id. */
  readonly rowsPerSByExperiment = new Map<string, number>();
  private readonly prevRows = new Map<string, { t: number; rows: number }>();
  /** Events received live, oldest first (with `at` = when received). */
  readonly events: LoggedEvent[] = [];
  /** Events dropped because the stream lagged. */
  missed = 0;
  private listeners = new Set<Listener>();
  private eventListeners = new Set<(e: LoggedEvent) => void>();
  now: () => number = () => Date.now() / 1000;

  onChange(f: Listener): () => void {
    this.listeners.add(f);
    return () => this.listeners.delete(f);
  }

  onEvent(f: (e: LoggedEvent) => void): () => void {
    this.eventListeners.add(f);
    return () => this.eventListeners.delete(f);
  }

  private emit(): void {
    for (const f of [...this.listeners]) f();
  }

  setStatus(s: NodeStatus): void {
    const t = s.telemetry?.taken_at ?? this.now();
    const rate = this.rate.update(t, s);
    if (rate !== null) this.rowsPerS = rate;
    for (const e of s.experiments) {
      const rows = e.forward_samples + e.backward_samples;
      const p = this.prevRows.get(e.id);
      if (p && t > p.t && rows >= p.rows) this.rowsPerSByExperiment.set(e.id, (rows - p.rows) / (t - p.t));
      if (!p || t > p.t) this.prevRows.set(e.id, { t, rows });
    }
    for (const id of [...this.prevRows.keys()]) {
      if (!s.experiments.some((e) => e.id === id)) {
        this.prevRows.delete(id);
        this.rowsPerSByExperiment.delete(id);
      }
    }
    this.buffer.push(t, chartPoint(s, rate));
    this.status = s;
    this.emit();
  }

  addEvent(e: NodeEvent): void {
    const logged = { ...e, at: this.now() } as LoggedEvent;
    this.events.push(logged);
    if (this.events.length > 500) this.events.splice(0, this.events.length - 500);
    for (const f of [...this.eventListeners]) f(logged);
  }

  setConnection(c: ConnectionState): void {
    this.connection = c;
    this.emit();
  }

  /** Follows `api`'s stream; returns the stop function. */
  follow(api: Api, onError: (e: unknown) => void): () => void {
    return api.subscribe({
      status: (s) => this.setStatus(s),
      event: (e) => this.addEvent(e),
      lagged: (n) => {
        this.missed += n;
        this.emit();
      },
      connection: (c) => this.setConnection(c),
      error: onError,
    });
  }
}

/** What every page gets. */
export interface Ctx {
  api: Api;
  store: Store;
  /** Draw uPlot charts (off in component tests: no canvas there). */
  charts: boolean;
}
