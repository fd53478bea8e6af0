// Formatting for people: durations, "until" text, bytes, readings that may be unknown.

import type { Reading } from "./types";

/** "45 s", "12 min", "1 h 5 min", "2 d 3 h". */
export function formatDuration(seconds: number): string {
  if (!Number.isFinite(seconds)) return "—";
  const s = Math.max(0, Math.round(seconds));
  if (s < 60) return `${s} s`;
  const m = Math.round(s / 60);
  if (m < 60) return `${m} min`;
  const hTotal = Math.floor(s / 3600);
  if (hTotal < 24) {
    const rest = Math.round((s - hTotal * 3600) / 60);
    if (rest === 60) return `${hTotal + 1} h`;
    return rest ? `${hTotal} h ${rest} min` : `${hTotal} h`;
  }
  const d = Math.floor(s / 86400);
  const hRest = Math.round((s - d * 86400) / 3600);
  if (hRest === 24) return `${d + 1} d`;
  return hRest ? `${d} d ${hRest} h` : `${d} d`;
}

/** A measured round trip or latency: "0.4 ms", "12 ms", "1.3 s"; "—" when not measured (null). */
export function formatMs(ms: number | null | undefined): string {
  if (ms === null || ms === undefined || !Number.isFinite(ms)) return "—";
  const v = Math.max(0, ms);
  if (v < 10) return `${v.toFixed(1).replace(/\.0$/, "")} ms`;
  if (v < 999.5) return `${Math.round(v)} ms`;
  if (v < 60_000) return `${(v / 1000).toFixed(1).replace(/\.0$/, "")} s`;
  return formatDuration(v / 1000);
}

/** "in 12 min" / "12 min ago". */
export function formatRelative(targetUnixS: number, nowUnixS: number): string {
  const d = targetUnixS - nowUnixS;
  if (Math.abs(d) < 1) return "now";
  return d > 0 ? `in ${formatDuration(d)}` : `${formatDuration(-d)} ago`;
}

/** What the state's `until` means, in words: "resumes in 12 min", "pauses in 3 min", ... */
export function formatUntil(state: string, until: number | null | undefined, nowUnixS: number): string {
  if (until === null || until === undefined || !Number.isFinite(until)) {
    return state === "paused" ? "until you resume" : "";
  }
  const rel = formatRelative(until, nowUnixS);
  switch (state) {
    case "paused":
      return until <= nowUnixS ? "resuming…" : `resumes ${rel}`;
    case "draining":
      return until <= nowUnixS ? "pausing…" : `pauses at the latest ${rel}`;
    default:
      return until <= nowUnixS ? "changing…" : `changes ${rel}`;
  }
}

const UNITS = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];

/** 1536 → "1.5 KiB" (binary units). */
export function formatBytes(n: number): string {
  if (!Number.isFinite(n)) return "—";
  let v = Math.abs(n);
  let i = 0;
  while (v >= 1024 && i < UNITS.length - 1) {
    v /= 1024;
    i++;
  }
  const sign = n < 0 ? "-" : "";
  const digits = i === 0 || v >= 100 ? 0 : v >= 10 ? 1 : 2;
  return `${sign}${v.toFixed(digits).replace(/\.0+$|(\.\d*[1-9])0+$/, "$1")} ${UNITS[i]}`;
}

/** Mebibytes as the catalog gives them (`per_expert_mb`). */
export function formatMb(mb: number): string {
  return formatBytes(mb * 1024 * 1024);
}

/** 1234567 → "1,234,567" (locale-free, stable in tests). */
export function formatInt(n: number): string {
  return Math.round(n).toString().replace(/\B(?=(\d{3})+(?!\d))/g, ",");
}

/** A compact number: 1234 → "1.2 k", 3.2e9 → "3.2 G". */
export function formatCompact(n: number): string {
  if (!Number.isFinite(n)) return "—";
  const a = Math.abs(n);
  const units: [number, string][] = [
    [1e15, "P"],
    [1e12, "T"],
    [1e9, "G"],
    [1e6, "M"],
    [1e3, "k"],
  ];
  for (const [v, u] of units) if (a >= v) return `${(n / v).toFixed(1).replace(/\.0$/, "")} ${u}`;
  return Number.isInteger(n) ? String(n) : n.toFixed(1);
}

/** 0.621 → "62 %". */
export function formatPercent(fraction: number): string {
  return `${Math.round(fraction * 100)} %`;
}

export function isKnown<T>(r: Reading<T> | null | undefined): r is { known: T } {
  return !!r && typeof r === "object" && "known" in r;
}

/** The value, or null when unknown. */
export function known<T>(r: Reading<T> | null | undefined): T | null {
  return isKnown(r) ? r.known : null;
}

/** Why a reading is unknown (or null when known). */
export function unknownWhy<T>(r: Reading<T> | null | undefined): string | null {
  if (!r) return "no reading yet";
  return "unknown" in r ? r.unknown : null;
}

/** A reading as text: the formatted value, or "unknown (why)". Never a fake 0. */
export function formatReading<T>(r: Reading<T> | null | undefined, fmt: (v: T) => string = (v) => String(v)): string {
  if (isKnown(r)) return fmt(r.known);
  return `unknown (${unknownWhy(r)})`;
}

/** A local date-time for logs and tables: "2026-11-27 20:31:24". */
export function formatTime(unixS: number, withSeconds = true): string {
  const d = new Date(unixS * 1000);
  const p = (n: number) => String(n).padStart(2, "0");
  const date = `${d.getFullYear()}-${p(d.getMonth() + 1)}-${p(d.getDate())}`;
  const time = `${p(d.getHours())}:${p(d.getMinutes())}${withSeconds ? `:${p(d.getSeconds())}` : ""}`;
  return `${date} ${time}`;
}

/** Seconds from `now` until the next local `hour`:00 tomorrow ("until tomorrow 08:00"). */
export function secondsUntilTomorrowAt(now: Date, hour = 8): number {
  const t = new Date(now.getFullYear(), now.getMonth(), now.getDate() + 1, hour, 0, 0, 0);
  return Math.max(1, Math.round((t.getTime() - now.getTime()) / 1000));
}

/** A peer id short enough for a line: "12D3KooW…59Xhv9" (the full id belongs in a `title`). */
export function shortPeerId(id: string): string {
  return id.length > 16 ? `${id.slice(0, 8)}…${id.slice(-6)}` : id;
}

export function formatMode(mode: string): string {
  switch (mode) {
    case "quiet":
      return "Quiet";
    case "balanced":
      return "Balanced";
    case "max":
      return "Max";
    case "only_when_away":
      return "Only when away";
    default:
      return mode;
  }
}
