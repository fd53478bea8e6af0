import { afterEach, beforeEach, describe, expect, it } from "vitest";
import { Store } from "../store";
import { byTestId, fakeApi, flush } from "../test/fake-api";
import { fx } from "../test/fixtures";
import type { Card } from "../types";
import { MODE_HELP, mountWizard } from "./wizard";

/** The fixture's card and two more: one tight, one that does not fit. */
function threeCards(): Card[] {
  const a = fx.experiments()[0];
  const b = structuredClone(a);
  b.id = "tight-one";
  b.manifest.title = "Tight one";
  b.fingerprint = "beef";
  b.fit.level = "tight";
  b.fit.reasons = ["room for 3 experts only"];
  const c = structuredClone(a);
  c.id = "too-big";
  c.manifest.title = "Too big";
  c.fingerprint = null;
  c.fit.level = "does_not_fit";
  c.fit.reasons = ["an expert needs 40 GiB of VRAM; this PC has no usable GPU"];
  return [a, b, c];
}

async function setup(opts: { joined?: boolean; cards?: Card[] } = {}) {
  const { api } = fakeApi();
  if (opts.cards) api.experiments.mockResolvedValue(opts.cards);
  const store = new Store();
  const s = fx.status();
  s.mode = "quiet";
  if (!opts.joined) s.experiments = [];
  store.setStatus(s);
  api.status.mockResolvedValue(s);
  const root = document.createElement("div");
  document.body.replaceChildren(root);
  const unmount = mountWizard(root, { api, store, charts: false });
  await flush();
  return { api, store, root, unmount };
}

const q = (root: ParentNode, id: string) => root.querySelector<HTMLElement>(`[data-testid="${id}"]`);
const input = (root: ParentNode, id: string) => byTestId(root, id) as HTMLInputElement;
function choose(root: ParentNode, id: string) {
  const el = input(root, id);
  el.checked = true;
  el.dispatchEvent(new Event("change", { bubbles: true }));
}

/** Picks `id` on step 2 and presses Next `times` times (1: show the plan, 2: join). */
async function pickAndNext(root: HTMLElement, id: string, times: number) {
  choose(root, id);
  for (let i = 0; i < times; i++) {
    byTestId(root, "wizard-next").click();
    await flush();
  }
}

async function toStep2(root: HTMLElement) {
  byTestId(root, "wizard-next").click();
  await flush();
  expect(q(root, "wizard-step-2")).not.toBeNull();
}

describe("first-run wizard", () => {
  beforeEach(() => history.replaceState(null, "", "/#/welcome"));
  afterEach(() => {
    document.body.replaceChildren();
    history.replaceState(null, "", "/");
  });

  it("step 1 shows the machine and what it can host", async () => {
    const { api, root } = await setup({ cards: threeCards() });
    expect(api.machine).toHaveBeenCalledTimes(1);
    expect(api.experiments).toHaveBeenCalledTimes(1);
    expect(q(root, "wizard-step-1")).not.toBeNull();
    expect(byTestId(root, "wizard-progress").textContent).toBe("Step 1 of 3");
    const steps = [...root.querySelectorAll(".wizard-steps li")];
    expect(steps.map((li) => li.getAttribute("aria-current"))).toEqual(["step", null, null]);
    const m = byTestId(root, "wizard-machine").textContent!;
    expect(m).toContain("8 logical cores");
    expect(m).toContain("31.1 GiB"); // ram_total_mb 31828
    expect(m).toContain("22.3 GiB available now"); // ram_available_mb 22792
    expect(m).toContain("177 GiB"); // disk_free_mb 181234
    expect(m).toContain("No usable GPU: experts run on the CPU");
    expect(m).toContain("This PC can host experts of 2 of 3 experiments.");
    expect(byTestId(root, "wizard-capacity").textContent).toBe("This PC can host experts of 2 of 3 experiments.");
  });

  it("lists the GPUs when there are some", async () => {
    const { api } = fakeApi();
    const m = fx.machine();
    m.gpus = [{ name: "NVIDIA GeForce RTX 3060", vram_total_mb: 12288, vram_free_mb: 10240 }];
    m.bandwidth_mbps = 100;
    api.machine.mockResolvedValue(m);
    const root = document.createElement("div");
    mountWizard(root, { api, store: new Store(), charts: false });
    await flush();
    const gpus = byTestId(root, "wizard-gpus").textContent!;
    expect(gpus).toContain("NVIDIA GeForce RTX 3060: 12 GiB (10 GiB free)");
    expect(gpus).not.toContain("No usable GPU");
    expect(byTestId(root, "wizard-machine").textContent).toContain("100 Mbit/s");
  });

  it("shows a machine error inline and retries", async () => {
    const { api } = fakeApi();
    api.machine.mockRejectedValueOnce({ code: "stopped", message: "the node has stopped" });
    const root = document.createElement("div");
    document.body.replaceChildren(root);
    mountWizard(root, { api, store: new Store(), charts: false });
    await flush();
    const alert = byTestId(root, "wizard-machine").querySelector('[role="alert"]')!;
    expect(alert.textContent).toContain("the node has stopped");
    const retry = [...byTestId(root, "wizard-machine").querySelectorAll("button")].find((b) => b.textContent === "Check again")!;
    retry.click();
    await flush();
    expect(api.machine).toHaveBeenCalledTimes(2);
    expect(byTestId(root, "wizard-machine").textContent).toContain("8 logical cores");
    expect(byTestId(root, "wizard-machine").querySelector('[role="alert"]')).toBeNull();
  });

  it("step 2 lists the experiments as radios, shows the plan, then joins like the Experiments page", async () => {
    const { api, root } = await setup({ cards: threeCards() });
    await toStep2(root);
    expect(byTestId(root, "wizard-progress").textContent).toBe("Step 2 of 3");
    expect([...root.querySelectorAll(".wizard-steps li")].map((li) => li.getAttribute("aria-current"))).toEqual([null, "step", null]);
    // focus moved to the step's heading
    expect(document.activeElement?.id).toBe("wizard-h");
    expect(document.activeElement?.textContent).toBe("Pick an experiment");
    const radios = [...root.querySelectorAll<HTMLInputElement>('input[type="radio"][name="wizard-experiment"]')];
    expect(radios.map((r) => r.value)).toEqual(["local-demo", "tight-one", "too-big"]);
    for (const r of radios) expect(root.querySelector(`label[for="${r.id}"]`)).not.toBeNull();
    const card = fx.experiments()[0];
    const choice = input(root, "wizard-pick-local-demo").closest(".wizard-choice")!.textContent!;
    expect(choice).toContain(card.manifest.title);
    expect(choice).toContain(card.fingerprint!);
    expect(choice).toContain("Fits this PC");
    expect(choice).toContain(card.fit.reasons[0]);
    expect(input(root, "wizard-pick-too-big").closest(".wizard-choice")!.textContent).toContain("Does not fit");
    expect(byTestId(root, "wizard-plan").hidden).toBe(true);

    // Next without a choice: says so, calls nothing
    byTestId(root, "wizard-next").click();
    await flush();
    expect(byTestId(root, "wizard-step-2").querySelector('[role="alert"]:not([hidden])')!.textContent).toContain("Pick an experiment");
    expect(api.showExperiment).not.toHaveBeenCalled();

    await pickAndNext(root, "wizard-pick-local-demo", 1);
    expect(api.showExperiment).toHaveBeenCalledWith("local-demo", card.fingerprint);
    expect(api.join).not.toHaveBeenCalled();
    const plan = byTestId(root, "wizard-plan");
    expect(plan.hidden).toBe(false);
    const expected = fx.preview().plan!;
    expect([...byTestId(plan, "plan-uids").querySelectorAll("li")].map((li) => li.textContent)).toEqual(expected.uids);
    expect(byTestId(plan, "plan-explanation").textContent).toContain(expected.explanation[0]);
    expect(byTestId(root, "wizard-next").textContent).toBe("Join and continue");

    byTestId(root, "wizard-next").click();
    await flush();
    expect(api.join).toHaveBeenCalledTimes(1);
    expect(api.join).toHaveBeenCalledWith("local-demo", { publisher: card.fingerprint });
    expect(q(root, "wizard-step-3")).not.toBeNull();
    expect(byTestId(root, "wizard-joined").textContent).toBe(`Joined ${card.manifest.title}: hosting 4 experts on the CPU.`);
    // the hosted list is read again after the join
    expect(api.status).toHaveBeenCalled();
    expect(document.activeElement?.textContent).toBe("How much to lend");
  });

  it("changing the choice hides the plan of the old one", async () => {
    const { api, root } = await setup({ cards: threeCards() });
    await toStep2(root);
    await pickAndNext(root, "wizard-pick-local-demo", 1);
    expect(byTestId(root, "wizard-plan").hidden).toBe(false);
    choose(root, "wizard-pick-tight-one");
    expect(byTestId(root, "wizard-plan").hidden).toBe(true);
    expect(byTestId(root, "wizard-next").textContent).toBe("Next");
    byTestId(root, "wizard-next").click();
    await flush();
    expect(api.showExperiment).toHaveBeenLastCalledWith("tight-one", "beef");
    expect(api.join).not.toHaveBeenCalled();
  });

  it("cannot join without a plan", async () => {
    const { api, root } = await setup();
    const p = fx.preview();
    p.plan = null;
    p.why_not = "not running in the swarm now";
    api.showExperiment.mockResolvedValueOnce(p);
    await toStep2(root);
    await pickAndNext(root, "wizard-pick-local-demo", 1);
    expect(byTestId(root, "wizard-plan").textContent).toContain("not running in the swarm now");
    expect((byTestId(root, "wizard-next") as HTMLButtonElement).disabled).toBe(true);
    // skipping is still possible
    byTestId(root, "wizard-skip").click();
    await flush();
    expect(q(root, "wizard-step-3")).not.toBeNull();
    expect(api.join).not.toHaveBeenCalled();
  });

  it("shows a join error inline, keeps the choice and retries", async () => {
    const { api, root } = await setup();
    api.join.mockRejectedValueOnce({ code: "cannot_plan", message: "no memory left for experts" });
    await toStep2(root);
    await pickAndNext(root, "wizard-pick-local-demo", 2);
    const step = byTestId(root, "wizard-step-2");
    expect(step.querySelector('[role="alert"]:not([hidden])')!.textContent).toContain("no memory left for experts (cannot_plan)");
    expect(input(root, "wizard-pick-local-demo").checked).toBe(true);
    expect((byTestId(root, "wizard-next") as HTMLButtonElement).disabled).toBe(false);
    byTestId(root, "wizard-next").click();
    await flush();
    expect(api.join).toHaveBeenCalledTimes(2);
    expect(q(root, "wizard-step-3")).not.toBeNull();
  });

  it("a join answered already_joined goes on to step 3", async () => {
    const { api, root } = await setup();
    api.join.mockRejectedValueOnce({ code: "already_joined", message: "already hosting local-demo" });
    await toStep2(root);
    await pickAndNext(root, "wizard-pick-local-demo", 2);
    expect(q(root, "wizard-step-3")).not.toBeNull();
    expect(byTestId(root, "wizard-joined").textContent).toContain("already joined");
  });

  it("an experiment already hosted is not joined again", async () => {
    const { api, root } = await setup({ joined: true });
    await toStep2(root);
    expect(input(root, "wizard-pick-local-demo").closest(".wizard-choice")!.textContent).toContain("joined");
    await pickAndNext(root, "wizard-pick-local-demo", 1);
    expect(q(root, "wizard-step-3")).not.toBeNull();
    expect(api.showExperiment).not.toHaveBeenCalled();
    expect(api.join).not.toHaveBeenCalled();
  });

  it("shows a catalog error in step 2 and retries", async () => {
    const { api } = fakeApi();
    api.experiments.mockRejectedValueOnce({ code: "busy", message: "the catalog is loading" });
    const root = document.createElement("div");
    document.body.replaceChildren(root);
    mountWizard(root, { api, store: new Store(), charts: false });
    await flush();
    expect(byTestId(root, "wizard-capacity").textContent).toContain("the catalog is loading");
    await toStep2(root);
    const step = byTestId(root, "wizard-step-2");
    expect(step.querySelector('[role="alert"]')!.textContent).toContain("the catalog is loading (busy)");
    [...step.querySelectorAll("button")].find((b) => b.textContent === "Load the experiments again")!.click();
    await flush();
    expect(api.experiments).toHaveBeenCalledTimes(2);
    expect(q(root, "wizard-pick-local-demo")).not.toBeNull();
  });

  it("Back and Skip keep what was chosen", async () => {
    const { api, root } = await setup({ cards: threeCards() });
    await toStep2(root);
    choose(root, "wizard-pick-tight-one");
    byTestId(root, "wizard-back").click();
    await flush();
    expect(q(root, "wizard-step-1")).not.toBeNull();
    expect(document.activeElement?.textContent).toBe("Check this computer");
    await toStep2(root);
    expect(input(root, "wizard-pick-tight-one").checked).toBe(true);
    byTestId(root, "wizard-skip").click();
    await flush();
    expect(q(root, "wizard-step-3")).not.toBeNull();
    expect(byTestId(root, "wizard-step-3").textContent).toContain("No experiment joined");
    choose(root, "wizard-mode-max");
    byTestId(root, "wizard-back").click();
    await flush();
    expect(q(root, "wizard-step-2")).not.toBeNull();
    byTestId(root, "wizard-skip").click();
    await flush();
    expect(input(root, "wizard-mode-max").checked).toBe(true);
    expect(api.join).not.toHaveBeenCalled();
  });

  it("step 3: the four modes, no autostart over HTTP; Start contributing sets the mode and resumes", async () => {
    const { api, root } = await setup();
    await toStep2(root);
    byTestId(root, "wizard-skip").click();
    await flush();
    expect(byTestId(root, "wizard-progress").textContent).toBe("Step 3 of 3");
    const modes = [...root.querySelectorAll<HTMLInputElement>('input[type="radio"][name="wizard-mode"]')];
    expect(modes.map((m) => m.dataset.testid)).toEqual(["wizard-mode-quiet", "wizard-mode-balanced", "wizard-mode-max", "wizard-mode-only_when_away"]);
    // starts from the mode in effect
    expect(input(root, "wizard-mode-quiet").checked).toBe(true);
    const text = byTestId(root, "wizard-step-3").textContent!;
    for (const help of Object.values(MODE_HELP)) expect(text).toContain(help);
    expect(text).toContain("Only when away");
    // autostart() answered null: no checkbox
    expect(api.autostart).toHaveBeenCalled();
    expect(q(root, "wizard-autostart")).toBeNull();
    choose(root, "wizard-mode-only_when_away");
    byTestId(root, "wizard-finish").click();
    await flush();
    expect(api.setMode).toHaveBeenCalledWith("only_when_away");
    expect(api.setAutostart).not.toHaveBeenCalled();
    expect(api.completeSetup).toHaveBeenCalledWith(true);
    expect(api.setMode.mock.invocationCallOrder[0]).toBeLessThan(api.completeSetup.mock.invocationCallOrder[0]);
    expect(location.hash).toBe("#/overview");
  });

  it("step 3 with autostart: the checkbox, then mode, autostart and stay paused, in that order", async () => {
    const { api } = fakeApi();
    api.autostart.mockResolvedValue(false);
    const root = document.createElement("div");
    document.body.replaceChildren(root);
    mountWizard(root, { api, store: new Store(), charts: false });
    await flush();
    await toStep2(root);
    byTestId(root, "wizard-skip").click();
    await flush();
    // no status yet: the default mode
    expect(input(root, "wizard-mode-balanced").checked).toBe(true);
    const box = input(root, "wizard-autostart");
    expect(box.type).toBe("checkbox");
    expect(box.checked).toBe(false);
    expect(box.closest("label")!.textContent).toBe("Start Apiary when I log in");
    box.checked = true;
    box.dispatchEvent(new Event("change", { bubbles: true }));
    byTestId(root, "wizard-finish-paused").click();
    await flush();
    expect(api.setMode).toHaveBeenCalledWith("balanced");
    expect(api.setAutostart).toHaveBeenCalledWith(true);
    expect(api.completeSetup).toHaveBeenCalledWith(false);
    const order = [api.setMode, api.setAutostart, api.completeSetup].map((f) => f.mock.invocationCallOrder[0]);
    expect(order).toEqual([...order].sort((a, b) => a - b));
    expect(location.hash).toBe("#/overview");
  });

  it("a failed finish shows the error, stays, keeps the choices and retries", async () => {
    const { api } = fakeApi();
    api.autostart.mockResolvedValue(true);
    api.setAutostart.mockRejectedValueOnce({ code: "internal", message: "cannot write the login item" });
    const root = document.createElement("div");
    document.body.replaceChildren(root);
    mountWizard(root, { api, store: new Store(), charts: false });
    await flush();
    await toStep2(root);
    byTestId(root, "wizard-skip").click();
    await flush();
    choose(root, "wizard-mode-max");
    expect(input(root, "wizard-autostart").checked).toBe(true);
    byTestId(root, "wizard-finish").click();
    await flush();
    const alert = byTestId(root, "wizard-step-3").querySelector('[role="alert"]:not([hidden])')!;
    expect(alert.textContent).toContain("cannot write the login item");
    expect(api.completeSetup).not.toHaveBeenCalled();
    expect(location.hash).toBe("#/welcome");
    expect(input(root, "wizard-mode-max").checked).toBe(true);
    expect((byTestId(root, "wizard-finish") as HTMLButtonElement).disabled).toBe(false);
    byTestId(root, "wizard-finish").click();
    await flush();
    expect(api.setMode.mock.calls).toEqual([["max"], ["max"]]);
    expect(api.setAutostart).toHaveBeenLastCalledWith(true);
    expect(api.completeSetup).toHaveBeenCalledWith(true);
    expect(location.hash).toBe("#/overview");
  });

  it("an autostart check that fails can be retried", async () => {
    const { api } = fakeApi();
    api.autostart.mockRejectedValueOnce({ code: "internal", message: "no session bus" }).mockResolvedValueOnce(true);
    const root = document.createElement("div");
    document.body.replaceChildren(root);
    mountWizard(root, { api, store: new Store(), charts: false });
    await flush();
    await toStep2(root);
    byTestId(root, "wizard-skip").click();
    await flush();
    const step = byTestId(root, "wizard-step-3");
    expect(step.querySelector('[role="alert"]')!.textContent).toContain("no session bus");
    [...step.querySelectorAll("button")].find((b) => b.textContent === "Check again")!.click();
    await flush();
    expect(input(root, "wizard-autostart").checked).toBe(true);
  });
});
