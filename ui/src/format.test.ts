import { describe, expect, it } from "vitest";
import {
  formatBytes,
  formatCompact,
  formatDuration,
  formatInt,
  formatMs,
  formatReading,
  formatRelative,
  formatUntil,
  known,
  secondsUntilTomorrowAt,
  shortPeerId,
  unknownWhy,
} from "./format";

describe("durations", () => {
  it("reads like a person would say it", () => {
    expect(formatDuration(0)).toBe("0 s");
    expect(formatDuration(45.4)).toBe("45 s");
    expect(formatDuration(60)).toBe("1 min");
    expect(formatDuration(12 * 60 + 10)).toBe("12 min");
    expect(formatDuration(3600)).toBe("1 h");
    expect(formatDuration(3900)).toBe("1 h 5 min");
    expect(formatDuration(2 * 86400 + 3 * 3600)).toBe("2 d 3 h");
    expect(formatDuration(-5)).toBe("0 s");
    expect(formatDuration(NaN)).toBe("—");
  });

  it("relative times", () => {
    expect(formatRelative(1000 + 720, 1000)).toBe("in 12 min");
    expect(formatRelative(1000 - 90, 1000)).toBe("2 min ago");
    expect(formatRelative(1000.4, 1000)).toBe("now");
  });
});

describe("until text", () => {
  const now = 1_800_000_000;
  it("says when a pause ends", () => {
    expect(formatUntil("paused", now + 720, now)).toBe("resumes in 12 min");
    expect(formatUntil("paused", null, now)).toBe("until you resume");
    expect(formatUntil("paused", now - 1, now)).toBe("resuming…");
  });
  it("says when a drain ends and when running changes", () => {
    expect(formatUntil("draining", now + 300, now)).toBe("pauses at the latest in 5 min");
    expect(formatUntil("running", now + 3600, now)).toBe("changes in 1 h");
    expect(formatUntil("running", null, now)).toBe("");
  });
});

describe("numbers", () => {
  it("bytes in binary units", () => {
    expect(formatBytes(0)).toBe("0 B");
    expect(formatBytes(1023)).toBe("1023 B");
    expect(formatBytes(1536)).toBe("1.5 KiB");
    expect(formatBytes(23 * 1024 * 1024)).toBe("23 MiB");
    expect(formatBytes(1539325952)).toBe("1.43 GiB");
    expect(formatBytes(11333 * 1024 * 1024)).toBe("11.1 GiB");
  });
  it("integers and compact numbers", () => {
    expect(formatInt(1234567)).toBe("1,234,567");
    expect(formatInt(12)).toBe("12");
    expect(formatCompact(1234)).toBe("1.2 k");
    expect(formatCompact(3.2e9)).toBe("3.2 G");
    expect(formatCompact(0)).toBe("0");
  });
});

describe("readings", () => {
  it("known values", () => {
    expect(known({ known: 2.5 })).toBe(2.5);
    expect(unknownWhy({ known: 0 })).toBeNull();
    expect(formatReading({ known: 71.2 }, (c) => `${Math.round(c)} °C`)).toBe("71 °C");
    expect(formatReading({ known: 0 })).toBe("0"); // a real 0 is shown
  });
  it("unknown values show why, never a fake 0", () => {
    const r = { unknown: "no NVIDIA driver (NVML not loaded)" };
    expect(known(r)).toBeNull();
    expect(unknownWhy(r)).toBe("no NVIDIA driver (NVML not loaded)");
    expect(formatReading(r)).toBe("unknown (no NVIDIA driver (NVML not loaded))");
    expect(formatReading(null)).toBe("unknown (no reading yet)");
  });
});

describe("snooze until tomorrow 08:00", () => {
  it("counts to 08:00 local time the next day", () => {
    const now = new Date(2026, 10, 27, 20, 30, 0);
    expect(secondsUntilTomorrowAt(now, 8)).toBe(11.5 * 3600);
    const early = new Date(2026, 10, 27, 1, 0, 0);
    expect(secondsUntilTomorrowAt(early, 8)).toBe(31 * 3600);
  });
});

describe("round trips and peer ids", () => {
  it("formats milliseconds like the other durations, and — when not measured", () => {
    expect(formatMs(0.42)).toBe("0.4 ms");
    expect(formatMs(3)).toBe("3 ms");
    expect(formatMs(12.6)).toBe("13 ms");
    expect(formatMs(999.7)).toBe("1 s");
    expect(formatMs(1340)).toBe("1.3 s");
    expect(formatMs(90_000)).toBe("2 min");
    expect(formatMs(-1)).toBe("0 ms");
    expect(formatMs(null)).toBe("—");
    expect(formatMs(undefined)).toBe("—");
    expect(formatMs(NaN)).toBe("—");
  });

  it("shortens a peer id to its head and tail", () => {
    expect(shortPeerId("12D3KooWRubXbWTUiXthv48VCByNRH3NQE93UgAtZ4BHbs59Xhv9")).toBe("12D3KooW…59Xhv9");
    expect(shortPeerId("QmShort")).toBe("QmShort");
  });
});
