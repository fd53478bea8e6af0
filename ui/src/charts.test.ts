import { describe, expect, it } from "vitest";
import { compactNumber } from "./charts";

describe("chart tick labels", () => {
  it("stay short enough for the axis", () => {
    expect(compactNumber(0)).toBe("0");
    expect(compactNumber(950)).toBe("950");
    expect(compactNumber(1500)).toBe("1.5k");
    expect(compactNumber(20000)).toBe("20k");
    expect(compactNumber(3_200_000)).toBe("3.2M");
    expect(compactNumber(12.5)).toBe("12.5");
    expect(compactNumber(-2000)).toBe("-2k");
    for (const v of [0, 99.5, 999, 12_345, 987_654, 12_345_678, 4.2e9]) {
      expect(compactNumber(v).length).toBeLessThanOrEqual(5);
    }
  });
});
