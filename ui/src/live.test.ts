// Opt-in: the whole dashboard against a real node (skipped unless APIARY_LIVE_URL and
// APIARY_LIVE_TOKEN are set). For example, with `apiary node run --api-port 7790 ...`:
//   APIARY_LIVE_URL=http://127.0.0.1:7790/ APIARY_LIVE_TOKEN=$(cat DATA/api-token) npx vitest run src/live.test.ts
import { describe, expect, it } from "vitest";
import { boot } from "./app";
import { HttpApi } from "./api";
import { ref, validate } from "./test/schema";

const url = process.env.APIARY_LIVE_URL;
const token = process.env.APIARY_LIVE_TOKEN;

async function until(f: () => boolean, ms = 8000): Promise<void> {
  const t0 = Date.now();
  while (!f()) {
    if (Date.now() - t0 > ms) throw new Error("timed out");
    await new Promise((r) => setTimeout(r, 50));
  }
}
const q = (id: string) => document.querySelector<HTMLElement>(`[data-testid="${id}"]`);

describe.skipIf(!url || !token)("against a real node", () => {
  it("answers what the schema says", async () => {
    const api = new HttpApi({ token: token!, baseUrl: new URL(url!).origin });
    expect(validate(ref("NodeStatus"), await api.status())).toEqual([]);
    expect(validate(ref("PolicyConfig"), await api.policy())).toEqual([]);
    expect(validate({ type: "array", items: ref("Card") }, await api.experiments())).toEqual([]);
    expect(validate(ref("Totals"), await api.contributions())).toEqual([]);
    expect(validate({ type: "array", items: ref("Row") }, await api.history({}, "day"))).toEqual([]);
    expect(validate({ type: "array", items: ref("LoggedEvent") }, await api.log(20))).toEqual([]);
    expect(await api.exportCsv({}, "hour")).toMatch(/^bucket_start_utc,/);
    await expect(api.showExperiment("no-such-experiment")).rejects.toMatchObject({ code: "not_found", status: 404 });
    const bad = new HttpApi({ token: "wrong", baseUrl: new URL(url!).origin });
    await expect(bad.status()).rejects.toMatchObject({ code: "unauthorized" });
  });

  it("runs the dashboard: overview, live stream, settings, log", async () => {
    history.replaceState(null, "", `/#/overview&token=${token}`);
    const root = document.createElement("div");
    document.body.replaceChildren(root);
    boot(root);
    expect(location.hash).toBe("#/overview");
    await until(() => !!q("state") && q("state")!.textContent !== "…");
    expect(["running", "throttled", "draining", "paused"]).toContain(q("state")!.textContent);
    expect(q("reason")!.textContent!.length).toBeGreaterThan(0);
    expect(q("forward-samples")!.textContent).toMatch(/^\d+$/);
    expect(q("cpu-percent")!.textContent).toMatch(/^(\d+|unknown)$/);
    await until(() => q("connection")!.textContent === "live");

    // pause and resume
    const wasPaused = q("pause-button")!.hidden;
    if (!wasPaused) {
      q("pause-button")!.click();
      await until(() => q("state")!.textContent === "paused");
      expect(q("resume-button")!.hidden).toBe(false);
      q("resume-button")!.click();
      await until(() => q("state")!.textContent !== "paused");
    }

    // experiments: leave a joined one, or join the first, through the plan
    location.hash = "#/experiments";
    window.dispatchEvent(new Event("hashchange"));
    await until(() => !!document.querySelector('[data-testid^="card-"]'));
    const card = document.querySelector<HTMLElement>('[data-testid^="card-"]')!;
    const id = card.dataset.testid!.slice("card-".length);
    if (q(`leave-${id}`)) {
      q(`leave-${id}`)!.click();
      await until(() => !!q(`join-${id}`));
    }
    q(`join-${id}`)!.click();
    await until(() => !!q("join-confirm"));
    expect(q("plan-uids")!.querySelectorAll("li").length).toBeGreaterThan(0);
    (q("join-max-experts") as HTMLInputElement).value = "2";
    q("join-confirm")!.click();
    await until(() => !!q(`leave-${id}`));

    location.hash = "#/settings";
    window.dispatchEvent(new Event("hashchange"));
    await until(() => !!q("settings-save"));
    const idle = q("setting-idle_threshold_s") as HTMLInputElement;
    const before = idle.value;
    idle.value = String(Number(before) + 1);
    q("settings-save")!.click();
    await until(() => !!q("settings-saved"));
    expect((q("setting-idle_threshold_s") as HTMLInputElement).value).toBe(String(Number(before) + 1));
    (q("setting-idle_threshold_s") as HTMLInputElement).value = before;
    q("settings-save")!.click();
    await until(() => !!q("settings-saved"));

    location.hash = "#/log";
    window.dispatchEvent(new Event("hashchange"));
    await until(() => document.querySelectorAll('[data-testid="log-row"]').length > 0);
  }, 20000);
});
