import { beforeEach, describe, expect, it } from "vitest";
import { Store } from "../store";
import { byTestId, fakeApi, flush } from "../test/fake-api";
import { fx } from "../test/fixtures";
import { mountExperiments } from "./experiments";

async function setup(joined: boolean) {
  const { api } = fakeApi();
  const store = new Store();
  const s = fx.status();
  if (!joined) s.experiments = [];
  store.setStatus(s);
  const root = document.createElement("div");
  document.body.replaceChildren(root);
  mountExperiments(root, { api, store, charts: false });
  await flush();
  return { api, store, root };
}

describe("Experiments", () => {
  beforeEach(() => document.body.replaceChildren());

  it("renders a card per experiment with what it needs and how it fits", async () => {
    const { root } = await setup(false);
    const card = fx.experiments()[0];
    const el = byTestId(root, `card-${card.id}`);
    const text = el.textContent!;
    expect(text).toContain(card.manifest.title);
    expect(text).toContain(card.manifest.summary);
    expect(text).toContain(card.publisher);
    expect(text).toContain(card.fingerprint!);
    expect(text).toContain(card.status);
    expect(text).toContain(card.source);
    expect(text).toContain(`${card.covered} of ${card.need.grid_experts} experts`);
    expect(text).toContain("4 MiB RAM"); // min_ram_mb_per_expert
    expect(text).toContain("Fits this PC");
    expect(text).toContain(`Needs you: ${card.need.label}`);
    expect(text).toContain(card.fit.reasons[0]);
    expect(root.querySelector(`[data-testid="join-${card.id}"]`)).not.toBeNull();
    expect(root.querySelector(`[data-testid="leave-${card.id}"]`)).toBeNull();
  });

  it("shows the plan before joining, then joins with the publisher", async () => {
    const { api, root } = await setup(false);
    const card = fx.experiments()[0];
    byTestId(root, `join-${card.id}`).click();
    await flush();
    expect(api.showExperiment).toHaveBeenCalledWith(card.id, card.fingerprint);
    expect(api.join).not.toHaveBeenCalled();
    const uids = byTestId(root, "plan-uids");
    const plan = fx.preview().plan!;
    expect([...uids.querySelectorAll("li")].map((li) => li.textContent)).toEqual(plan.uids);
    expect(byTestId(root, "plan-explanation").textContent).toContain(plan.explanation[0]);
    (byTestId(root, "join-max-experts") as HTMLInputElement).value = "4";
    byTestId(root, "join-confirm").click();
    await flush();
    expect(api.join).toHaveBeenCalledWith(card.id, { maxExperts: 4, publisher: card.fingerprint });
    expect(byTestId(root, "join-done").textContent).toContain("hosting 4 experts");
  });

  it("shows join errors inline", async () => {
    const { api, root } = await setup(false);
    api.join.mockRejectedValueOnce({ code: "cannot_plan", message: "no memory left for experts" });
    byTestId(root, "join-local-demo").click();
    await flush();
    byTestId(root, "join-confirm").click();
    await flush();
    expect(byTestId(root, "experiment-details").textContent).toContain("no memory left for experts (cannot_plan)");
  });

  it("refuses a bad max-experts value before calling the node", async () => {
    const { api, root } = await setup(false);
    byTestId(root, "join-local-demo").click();
    await flush();
    (byTestId(root, "join-max-experts") as HTMLInputElement).value = "0";
    byTestId(root, "join-confirm").click();
    await flush();
    expect(api.join).not.toHaveBeenCalled();
    expect(byTestId(root, "experiment-details").textContent).toContain("whole number");
  });

  it("offers Leave for a joined experiment", async () => {
    const { api, root } = await setup(true);
    const leave = byTestId(root, "leave-local-demo");
    expect(root.querySelector('[data-testid="join-local-demo"]')).toBeNull();
    leave.click();
    await flush();
    expect(api.leave).toHaveBeenCalledWith("local-demo");
  });

  it("shows a catalog error", async () => {
    const { api } = fakeApi();
    api.experiments.mockRejectedValueOnce({ code: "stopped", message: "the node has stopped" });
    const root = document.createElement("div");
    mountExperiments(root, { api, store: new Store(), charts: false });
    await flush();
    expect(root.textContent).toContain("the node has stopped");
  });
});
