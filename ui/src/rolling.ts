// The live charts' data: a rolling window of points taken from status updates, and the
// requests/s (rows/s) derived from the hosted experiments' forward+backward row counters.

import { known } from "./format";
import type { GpuSample, NodeStatus } from "./types";

/** Time-stamped points (unix seconds) kept for the last `windowS` seconds; `null` = a gap. */
export class RollingBuffer {
  readonly windowS: number;
  readonly width: number;
  private t: number[] = [];
  private cols: (number | null)[][];

  constructor(width: number, windowS = 300) {
    this.width = width;
    this.windowS = windowS;
    this.cols = Array.from({ length: width }, () => []);
  }

  /** Adds a point; a time at or before the last one replaces nothing and is ignored. */
  push(t: number, values: (number | null)[]): void {
    const last = this.t.length ? this.t[this.t.length - 1] : -Infinity;
    if (!(t > last)) return;
    this.t.push(t);
    for (let i = 0; i < this.width; i++) {
      const v = values[i];
      this.cols[i].push(v === undefined || v === null || !Number.isFinite(v) ? null : v);
    }
    this.trim(t);
  }

  private trim(now: number): void {
    const cutoff = now - this.windowS;
    let drop = 0;
    while (drop < this.t.length && this.t[drop] < cutoff) drop++;
    if (drop) {
      this.t.splice(0, drop);
      for (const c of this.cols) c.splice(0, drop);
    }
  }

  get length(): number {
    return this.t.length;
  }

  /** uPlot's data layout: `[xs, ys1, ys2, ...]`. */
  data(): [number[], ...(number | null)[][]] {
    return [this.t.slice(), ...this.cols.map((c) => c.slice())];
  }

  /** The latest value of a series (null when none or a gap). */
  latest(i: number): number | null {
    const c = this.cols[i];
    return c.length ? c[c.length - 1] : null;
  }

  clear(): void {
    this.t = [];
    this.cols = Array.from({ length: this.width }, () => []);
  }
}

/** Forward rows over all hosted experiments (the `forward-samples` figure). */
export function totalForwardRows(s: NodeStatus): number {
  return s.experiments.reduce((a, e) => a + e.forward_samples, 0);
}

/**
 * Rows per second from successive statuses: the change of forward+backward rows per experiment
 * over the change of time. An experiment that appears, disappears or whose counters went back
 * (the node restarted) counts from its new value; the first status gives null.
 */
export class RateTracker {
  private prev: { t: number; rows: Map<string, number> } | null = null;

  update(t: number, s: NodeStatus): number | null {
    const rows = new Map<string, number>();
    for (const e of s.experiments) rows.set(e.id, e.forward_samples + e.backward_samples);
    const prev = this.prev;
    if (prev && !(t > prev.t)) return null; // same or older sample: no new information
    this.prev = { t, rows };
    if (!prev) return null;
    const dt = t - prev.t;
    let delta = 0;
    for (const [id, n] of rows) {
      const before = prev.rows.get(id);
      if (before !== undefined && n >= before) delta += n - before;
    }
    return delta / dt;
  }

  reset(): void {
    this.prev = null;
  }
}

/** Series of the overview charts, in this order. */
export const SERIES = [
  "cpu", // CPU %
  "gpu_ours", // GPU utilization by us, %
  "gpu_others", // by other processes, %
  "vram_ours", // GiB
  "vram_others", // GiB
  "temp", // hottest GPU °C
  "power", // W, all GPUs
  "rps", // rows/s
] as const;
export type SeriesName = (typeof SERIES)[number];
export const S: Record<SeriesName, number> = Object.fromEntries(SERIES.map((n, i) => [n, i])) as Record<
  SeriesName,
  number
>;

function sumKnown(gpus: GpuSample[], f: (g: GpuSample) => number | null): number | null {
  let total = 0;
  let any = false;
  for (const g of gpus) {
    const v = f(g);
    if (v !== null) {
      total += v;
      any = true;
    }
  }
  return any ? total : null;
}

/** One chart point from a status (values unknown to the node are null, never 0). */
export function chartPoint(s: NodeStatus, rowsPerS: number | null): (number | null)[] {
  const t = s.telemetry;
  const out: (number | null)[] = new Array(SERIES.length).fill(null);
  out[S.rps] = rowsPerS;
  if (!t) return out;
  out[S.cpu] = known(t.system.cpu_percent);
  const gpus = known(t.gpus);
  if (gpus && gpus.length) {
    const n = gpus.length;
    const util = sumKnown(gpus, (g) => known(g.utilization));
    const other = sumKnown(gpus, (g) => known(g.other_utilization));
    if (other !== null) out[S.gpu_others] = (other / n) * 100;
    if (util !== null) out[S.gpu_ours] = (Math.max(0, util - (other ?? 0)) / n) * 100;
    const GiB = 1024 ** 3;
    const ours = sumKnown(gpus, (g) => known(g.memory_ours));
    const others = sumKnown(gpus, (g) => known(g.memory_others));
    if (ours !== null) out[S.vram_ours] = ours / GiB;
    if (others !== null) out[S.vram_others] = others / GiB;
    const temps = gpus.map((g) => known(g.temperature_c)).filter((v): v is number => v !== null);
    if (temps.length) out[S.temp] = Math.max(...temps);
    out[S.power] = sumKnown(gpus, (g) => known(g.power_w));
  }
  return out;
}
