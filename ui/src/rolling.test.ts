import { describe, expect, it } from "vitest";
import { chartPoint, RateTracker, RollingBuffer, S, totalForwardRows } from "./rolling";
import { fx, statusWithGpu } from "./test/fixtures";
import type { NodeStatus } from "./types";

function withRows(rows: Record<string, [number, number]>): NodeStatus {
  const s = fx.status();
  const base = s.experiments[0];
  s.experiments = Object.entries(rows).map(([id, [f, b]]) => ({ ...base, id, forward_samples: f, backward_samples: b }));
  return s;
}

describe("RollingBuffer", () => {
  it("keeps the last window of points in uPlot's layout", () => {
    const b = new RollingBuffer(2, 300);
    for (let t = 0; t <= 400; t += 100) b.push(t, [t, t === 200 ? null : 1]);
    expect(b.data()).toEqual([
      [100, 200, 300, 400],
      [100, 200, 300, 400],
      [1, null, 1, 1],
    ]);
    expect(b.latest(0)).toBe(400);
  });

  it("ignores points out of order and turns non-finite values into gaps", () => {
    const b = new RollingBuffer(1, 300);
    b.push(10, [1]);
    b.push(10, [2]);
    b.push(5, [3]);
    b.push(11, [NaN]);
    expect(b.data()).toEqual([
      [10, 11],
      [1, null],
    ]);
    b.clear();
    expect(b.length).toBe(0);
  });
});

describe("requests/s from the rows counters", () => {
  it("derives rows per second from forward + backward", () => {
    const r = new RateTracker();
    expect(r.update(100, withRows({ a: [0, 0] }))).toBeNull();
    expect(r.update(102, withRows({ a: [300, 100] }))).toBe(200);
    expect(r.update(103, withRows({ a: [400, 100], b: [50, 0] }))).toBe(100); // b is new: counts from next time
    expect(r.update(104, withRows({ a: [400, 100], b: [60, 0] }))).toBe(10);
  });

  it("survives restarts and leaving (counters going back)", () => {
    const r = new RateTracker();
    r.update(0, withRows({ a: [1000, 1000] }));
    expect(r.update(1, withRows({ a: [10, 0] }))).toBe(0);
    expect(r.update(2, withRows({}))).toBe(0);
    expect(r.update(2, withRows({}))).toBeNull(); // same time: nothing new
  });

  it("totals forward rows", () => {
    expect(totalForwardRows(withRows({ a: [5, 1], b: [7, 2] }))).toBe(12);
  });
});

describe("chart points", () => {
  it("takes known readings and leaves unknown ones as gaps, not zeros", () => {
    const s = fx.status();
    s.telemetry!.system.cpu_percent = { known: 2.5 };
    const p = chartPoint(s, 4);
    expect(p[S.cpu]).toBe(2.5);
    expect(p[S.gpu_ours]).toBeNull(); // no NVML in the fixture
    expect(p[S.temp]).toBeNull();
    expect(p[S.rps]).toBe(4);
  });

  it("splits GPU use into ours and others", () => {
    const p = chartPoint(statusWithGpu(), null);
    expect(p[S.gpu_others]).toBeCloseTo(30);
    expect(p[S.gpu_ours]).toBeCloseTo(50);
    expect(p[S.vram_ours]).toBeCloseTo(4);
    expect(p[S.vram_others]).toBeCloseTo(2);
    expect(p[S.temp]).toBe(71);
    expect(p[S.power]).toBeNull(); // unknown power stays unknown
  });

  it("a status before the first sample gives gaps", () => {
    const s = fx.status();
    s.telemetry = null;
    expect(chartPoint(s, null).every((v) => v === null)).toBe(true);
  });
});
