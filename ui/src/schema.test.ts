// Checks that the fixtures (real responses) match crates/node/openapi.json.
import { describe, expect, it } from "vitest";
import { fx, statusRelayed, statusWithGpu } from "./test/fixtures";
import { doc, ref, validate } from "./test/schema";


describe("fixtures follow openapi.json", () => {
  it.each([
    ["NodeStatus", () => fx.status()],
    ["NodeStatus", () => statusWithGpu()],
    ["NodeStatus", () => statusRelayed()],
    ["PolicyConfig", () => fx.policy()],
    ["Preview", () => fx.preview()],
    ["JoinPlan", () => fx.joinPlan()],
    ["Totals", () => fx.contributions()],
    ["MachineProfile", () => fx.machine()],
  ])("%s", (name, make) => {
    expect(validate(ref(name), make())).toEqual([]);
  });

  it.each([
    ["Card", () => fx.experiments()],
    ["Row", () => fx.history()],
    ["LoggedEvent", () => fx.log()],
  ])("%s[]", (name, make) => {
    expect(validate({ type: "array", items: ref(name) }, make())).toEqual([]);
  });

  it("the validator rejects what the schema forbids", () => {
    const s = fx.status() as unknown as Record<string, unknown>;
    s.state = "sleeping";
    s.extra = 1;
    const errs = validate(ref("NodeStatus"), s);
    expect(errs.some((e) => e.includes("not in enum"))).toBe(true);
    expect(errs.some((e) => e.includes("unexpected property extra"))).toBe(true);
    const n = fx.status() as unknown as { network: Record<string, unknown> };
    n.network.path = "sideways";
    expect(validate(ref("NodeStatus"), n).some((e) => e.includes("$.network.path"))).toBe(true);
    const noNet = fx.status() as unknown as Record<string, unknown>;
    delete noNet.network;
    expect(validate(ref("NodeStatus"), noNet)).toContain("$: missing network");
    expect(validate(ref("ReadingNumber"), { known: 0 })).toEqual([]);
    expect(validate(ref("ReadingNumber"), { known: "0" }).length).toBeGreaterThan(0);
  });

  it("the events frames the UI understands are the documented ones", () => {
    const frame = { type: "status", ...fx.status() };
    expect(validate(ref("EventsFrame"), frame)).toEqual([]);
    expect(validate(ref("EventsFrame"), { type: "lagged", missed: 3 })).toEqual([]);
    expect(validate(ref("EventsFrame"), { type: "event", event: "notice", message: "hi" })).toEqual([]);
  });

  it("every route the UI calls is documented", () => {
    for (const p of [
      "/api/status",
      "/api/events",
      "/api/pause",
      "/api/resume",
      "/api/finish",
      "/api/snooze",
      "/api/mode",
      "/api/policy",
      "/api/experiments",
      "/api/experiments/{id}",
      "/api/experiments/{id}/join",
      "/api/experiments/{id}/leave",
      "/api/contributions",
      "/api/history",
      "/api/export.csv",
      "/api/log",
      "/api/machine",
      "/api/device",
    ]) {
      expect(doc.paths, p).toHaveProperty([p]);
    }
  });
});
