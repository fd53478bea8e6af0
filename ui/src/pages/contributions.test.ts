import { describe, expect, it, vi } from "vitest";
import { Store } from "../store";
import { byTestId, fakeApi, flush } from "../test/fake-api";
import { fx } from "../test/fixtures";
import type { Row } from "../types";
import { aggregateRows, mountContributions } from "./contributions";

describe("Contributions", () => {
  it("shows totals, energy, cost and the history", async () => {
    const { api } = fakeApi();
    const t = fx.contributions();
    t.counters.forward_samples = 12345;
    t.energy_kwh = 0.25;
    t.cost = 0.08;
    api.contributions.mockResolvedValueOnce(t);
    const root = document.createElement("div");
    document.body.replaceChildren(root);
    mountContributions(root, { api, store: new Store(), charts: false });
    await flush();
    expect(byTestId(root, "total-forward").textContent).toBe("12,345");
    expect(byTestId(root, "total-energy").textContent).toContain("0.250 kWh");
    expect(byTestId(root, "total-cost").textContent).toBe("0.08 EUR");
    expect(byTestId(root, "history-table").querySelectorAll("tbody tr").length).toBe(1);
    // experiments seen in the history can be picked
    const sel = byTestId(root, "contrib-experiment") as HTMLSelectElement;
    expect([...sel.options].map((o) => o.value)).toContain("local-demo");
    sel.value = "local-demo";
    sel.dispatchEvent(new Event("change"));
    const bucket = byTestId(root, "contrib-bucket") as HTMLSelectElement;
    bucket.value = "day";
    bucket.dispatchEvent(new Event("change"));
    await flush();
    expect(api.history).toHaveBeenLastCalledWith({ experiment: "local-demo" }, "day");
    expect(api.contributions).toHaveBeenLastCalledWith({ experiment: "local-demo" });
  });

  it("exports CSV as a download of a Blob", async () => {
    const { api } = fakeApi();
    const created = vi.fn(() => "blob:x");
    URL.createObjectURL = created as never;
    URL.revokeObjectURL = vi.fn() as never;
    const root = document.createElement("div");
    document.body.replaceChildren(root);
    mountContributions(root, { api, store: new Store(), charts: false });
    await flush();
    byTestId(root, "export-csv").click();
    await flush();
    expect(api.exportCsv).toHaveBeenCalledWith({}, "hour");
    expect(created).toHaveBeenCalledOnce();
  });

  it("sums rows per bucket", () => {
    const base = fx.history()[0];
    const row = (start: number, experiment: string | null, f: number): Row => ({
      ...base,
      start,
      experiment,
      counters: { ...base.counters, forward_samples: f, backward_samples: 1 },
      energy_kwh: 0.5,
    });
    expect(aggregateRows([row(7200, "a", 10), row(3600, null, 0), row(7200, "b", 5)])).toEqual([
      { start: 3600, rows: 1, energy: 0.5, uptime: base.uptime_seconds },
      { start: 7200, rows: 17, energy: 1, uptime: 0 },
    ]);
  });
});
