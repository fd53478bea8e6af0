// The first-run wizard (`#/welcome`): 1. what this computer has and what it can host, 2. pick an
// experiment (the join plan first, then Join; or skip), 3. the mode and autostart, then start
// contributing or stay paused.
//
// The wizard's choices live in one state object that outlives the step views, so Back, Next, a
// failed call and its retry never lose anything.

import { toApiError } from "../api";
import { h, replace, setText } from "../dom";
import { formatInt, formatMb, formatMode } from "../format";
import type { Ctx } from "../store";
import { MODES, type Card, type MachineProfile, type Mode, type Preview } from "../types";
import { errorBox, FIT_TEXT, joinedText, renderPlan } from "./experiments";

type Step = 1 | 2 | 3;
const STEP_NAMES: Record<Step, string> = { 1: "This computer", 2: "An experiment", 3: "How much to lend" };

/** One line per mode (the governor's table: crates/governor/src/policy.rs). */
export const MODE_HELP: Record<Mode, string> = {
  quiet: "A trickle while you use the PC, half speed when you are away: little heat and fan noise.",
  balanced: "Some work while you use the PC, full speed when you are away. The default.",
  max: "Full speed all the time; still yields to games, the battery and heat.",
  only_when_away: "Nothing while you use the PC, full speed when you are away.",
};

/** "This PC can host experts of 2 of 3 experiments." */
export function capacityText(cards: Card[]): string {
  if (!cards.length) return "No experiments found yet: you can pick one later on the Experiments page.";
  const fit = cards.filter((c) => c.fit.level !== "does_not_fit").length;
  const total = `${cards.length} experiment${cards.length === 1 ? "" : "s"}`;
  if (fit === 0) return `This PC cannot host experts of any of the ${total} found now.`;
  return `This PC can host experts of ${fit} of ${total}.`;
}

function machineFacts(m: MachineProfile): HTMLElement {
  return h(
    "dl",
    { class: "facts" },
    h("dt", null, "Computer"),
    h("dd", null, m.name),
    h("dt", null, "CPU"),
    h("dd", null, `${formatInt(m.cpu_cores)} logical core${m.cpu_cores === 1 ? "" : "s"}`),
    h("dt", null, "Memory"),
    h("dd", null, `${formatMb(m.ram_total_mb)}, ${formatMb(m.ram_available_mb)} available now`),
    h("dt", null, "Free disk"),
    h("dd", null, `${formatMb(m.disk_free_mb)} where Apiary keeps its data`),
    h("dt", null, "GPU"),
    h(
      "dd",
      { "data-testid": "wizard-gpus" },
      m.gpus.length
        ? h(
            "ul",
            { class: "plain" },
            m.gpus.map((g) => h("li", null, `${g.name}: ${formatMb(g.vram_total_mb)} (${formatMb(g.vram_free_mb)} free)`)),
          )
        : "No usable GPU: experts run on the CPU",
    ),
    h("dt", null, "Bandwidth"),
    h("dd", null, m.bandwidth_mbps === null ? "not measured yet" : `${formatInt(m.bandwidth_mbps)} Mbit/s`),
  );
}

export function mountWizard(root: HTMLElement, ctx: Ctx): () => void {
  const { api, store } = ctx;
  let alive = true;

  // What survives moving between steps.
  const st = {
    step: 1 as Step,
    machine: null as MachineProfile | null,
    machineError: null as unknown,
    cards: null as Card[] | null,
    cardsError: null as unknown,
    picked: null as string | null,
    /** The plan shown for `picked` (null: not asked yet). */
    preview: null as Preview | null,
    /** Joined from this wizard. */
    joined: new Set<string>(),
    joinedNote: "",
    mode: null as Mode | null,
    /** undefined: not known yet; null: not supported (HTTP). */
    autostart: undefined as boolean | null | undefined,
    autostartError: null as unknown,
    autostartChoice: null as boolean | null,
  };

  const progress = h("p", { class: "wizard-progress muted", "data-testid": "wizard-progress" });
  const stepItems = ([1, 2, 3] as Step[]).map((n) => h("li", { class: "wizard-step-name" }, STEP_NAMES[n]));
  const body = h("div", { class: "wizard-body" });
  root.append(
    h(
      "section",
      { class: "panel wizard", "aria-label": "Set up Apiary" },
      h("p", { class: "wizard-brand" }, "Welcome to Apiary"),
      h("div", { class: "wizard-progress-wrap" }, h("ol", { class: "wizard-steps", "aria-label": "Setup steps" }, stepItems), progress),
      body,
    ),
  );

  const isJoined = (id: string) => st.joined.has(id) || (store.status?.experiments ?? []).some((e) => e.id === id);

  // ------------------------------------------------------------------ loading

  const loadMachine = async () => {
    st.machineError = null;
    st.machine = null;
    refresh();
    try {
      const m = await api.machine();
      if (!alive) return;
      st.machine = m;
    } catch (e) {
      st.machineError = e;
    }
    refresh();
  };

  const loadCards = async () => {
    st.cardsError = null;
    st.cards = null;
    refresh();
    try {
      const c = await api.experiments();
      if (!alive) return;
      st.cards = c;
      if (st.picked && !c.some((x) => x.id === st.picked)) {
        st.picked = null;
        st.preview = null;
      }
    } catch (e) {
      st.cardsError = e;
    }
    refresh();
  };

  const loadAutostart = async () => {
    st.autostartError = null;
    st.autostart = undefined;
    refresh();
    try {
      const a = await api.autostart();
      if (!alive) return;
      st.autostart = a;
    } catch (e) {
      st.autostartError = e;
    }
    refresh();
  };

  /** Re-renders the parts of the current step that depend on loaded data. */
  let refresh = () => {};

  const retryButton = (label: string, onclick: () => void) => h("button", { onclick }, label);

  // ------------------------------------------------------------------ steps

  const heading = (text: string) => h("h1", { id: "wizard-h", tabindex: "-1", class: "wizard-h" }, text);

  const stepOne = (): HTMLElement => {
    const factsEl = h("div", { "aria-live": "polite" });
    const capacityEl = h("div", { class: "wizard-capacity", "data-testid": "wizard-capacity", "aria-live": "polite" });
    const machineEl = h("div", { class: "wizard-machine", "data-testid": "wizard-machine" }, factsEl, capacityEl);
    refresh = () => {
      if (st.machine) replace(factsEl, machineFacts(st.machine));
      else if (st.machineError) {
        const err = errorBox();
        err.show(st.machineError);
        replace(factsEl, err.el, retryButton("Check again", () => void loadMachine()));
      } else replace(factsEl, h("p", { class: "muted" }, "Checking this computer…"));
      if (st.cards) {
        replace(capacityEl, h("p", { class: "strong" }, capacityText(st.cards)));
      } else if (st.cardsError) {
        const err = errorBox();
        err.show(st.cardsError);
        replace(capacityEl, err.el, retryButton("Load the experiments again", () => void loadCards()));
      } else replace(capacityEl, h("p", { class: "muted" }, "Looking for experiments…"));
    };
    return h(
      "section",
      { "data-testid": "wizard-step-1", "aria-labelledby": "wizard-h" },
      heading("Check this computer"),
      h(
        "p",
        null,
        "Apiary lends this computer's spare time to open AI training experiments. It hosts a few “experts” of a " +
          "shared model and steps back when you need the PC. First, what this PC has:",
      ),
      machineEl,
      h("div", { class: "controls wizard-controls" }, h("button", { class: "primary", "data-testid": "wizard-next", onclick: () => go(2) }, "Next")),
    );
  };

  const stepTwo = (): HTMLElement => {
    const listEl = h("div", { class: "wizard-picks", "aria-live": "polite" });
    const planEl = h("div", { class: "wizard-plan", "data-testid": "wizard-plan", "aria-live": "polite", hidden: true });
    const err = errorBox();
    const done = h("p", { class: "ok", role: "status", hidden: true });
    const next = h("button", { class: "primary", "data-testid": "wizard-next" }, "Next");

    const updateNext = () => {
      const plan = st.picked && !isJoined(st.picked) && st.preview && st.preview.card.id === st.picked;
      setText(next, plan ? "Join and continue" : "Next");
      next.disabled = !!plan && !st.preview!.plan;
    };

    const showPlan = () => {
      const p = st.preview;
      if (!p || p.card.id !== st.picked) {
        planEl.hidden = true;
        replace(planEl);
      } else {
        planEl.hidden = false;
        replace(
          planEl,
          h("h2", { id: "wizard-plan-h" }, `What joining ${p.card.manifest.title || p.card.id} would do`),
          renderPlan(p, "wizard-plan"),
        );
      }
      updateNext();
    };

    const pick = (id: string) => {
      if (st.picked === id) return;
      st.picked = id;
      st.preview = null;
      err.clear();
      showPlan();
    };

    refresh = () => {
      if (st.cards) {
        if (!st.cards.length) {
          replace(listEl, h("p", { class: "muted" }, "No experiments found yet. Skip for now: the Experiments page lists them once the node finds some."));
        } else {
          replace(
            listEl,
            h(
              "fieldset",
              { class: "wizard-choices" },
              h("legend", null, "Experiments"),
              st.cards.map((c) => {
                const input = h("input", {
                  type: "radio",
                  name: "wizard-experiment",
                  value: c.id,
                  id: `wizard-pick-${c.id}`,
                  "data-testid": `wizard-pick-${c.id}`,
                  checked: st.picked === c.id,
                  "aria-describedby": `wizard-pick-d-${c.id}`,
                  onchange: () => pick(c.id),
                });
                return h(
                  "div",
                  { class: `wizard-choice fit-${c.fit.level}` },
                  input,
                  h(
                    "label",
                    { for: `wizard-pick-${c.id}` },
                    h("strong", null, c.manifest.title || c.id),
                    " ",
                    h("span", { class: `badge fit fit-${c.fit.level}` }, FIT_TEXT[c.fit.level] ?? c.fit.level),
                    isJoined(c.id) && [" ", h("span", { class: "badge joined" }, "joined")],
                  ),
                  h(
                    "div",
                    { class: "wizard-choice-details", id: `wizard-pick-d-${c.id}` },
                    h("p", { class: "summary" }, c.manifest.summary),
                    h(
                      "p",
                      { class: "publisher small" },
                      "By ",
                      c.publisher,
                      c.fingerprint ? [" · key ", h("code", null, c.fingerprint)] : " · bundled, unsigned",
                    ),
                    c.fit.reasons.length > 0 && h("ul", { class: "reasons" }, c.fit.reasons.map((r) => h("li", null, r))),
                  ),
                );
              }),
            ),
          );
        }
      } else if (st.cardsError) {
        const e = errorBox();
        e.show(st.cardsError);
        replace(listEl, e.el, retryButton("Load the experiments again", () => void loadCards()));
      } else replace(listEl, h("p", { class: "muted" }, "Loading the catalog…"));
      showPlan();
    };

    next.addEventListener("click", async () => {
      err.clear();
      const id = st.picked;
      const card = st.cards?.find((c) => c.id === id);
      if (!id || !card) {
        err.show({ code: "no_choice", message: "Pick an experiment, or Skip for now" });
        return;
      }
      if (isJoined(id)) {
        go(3);
        return;
      }
      next.disabled = true;
      try {
        if (!st.preview || st.preview.card.id !== id) {
          // First Next: the plan, like the Experiments page shows it before Join.
          const p = await api.showExperiment(id, card.fingerprint);
          if (!alive || st.picked !== id) return;
          st.preview = p;
          showPlan();
          planEl.scrollIntoView?.({ block: "nearest" });
          return;
        }
        // Second Next: join, with the same call as the Experiments page.
        try {
          const plan = await api.join(id, { publisher: card.fingerprint });
          st.joinedNote = joinedText(plan, card.manifest.title || id);
        } catch (e) {
          if (toApiError(e).code !== "already_joined") throw e;
          st.joinedNote = `Joined ${card.manifest.title || id} (it was already joined).`;
        }
        st.joined.add(id);
        setText(done, st.joinedNote);
        done.hidden = false;
        try {
          store.setStatus(await api.status());
        } catch {
          /* the stream brings it */
        }
        if (alive) go(3);
      } catch (e) {
        err.show(e);
      } finally {
        updateNext();
      }
    });

    return h(
      "section",
      { "data-testid": "wizard-step-2", "aria-labelledby": "wizard-h" },
      heading("Pick an experiment"),
      h(
        "p",
        null,
        "Each experiment trains one shared model; this PC hosts a few of its experts. The fit says whether they fit in the memory " +
          "your mode lends. Next shows what joining would do before anything is joined.",
      ),
      listEl,
      planEl,
      err.el,
      done,
      h(
        "div",
        { class: "controls wizard-controls" },
        h("button", { "data-testid": "wizard-back", onclick: () => go(1) }, "Back"),
        h("span", { class: "spacer" }),
        h(
          "button",
          {
            "data-testid": "wizard-skip",
            onclick: () => {
              st.picked = null;
              st.preview = null;
              go(3);
            },
          },
          "Skip for now",
        ),
        next,
      ),
    );
  };

  const stepThree = (): HTMLElement => {
    if (st.mode === null) st.mode = store.status?.mode ?? "balanced";
    const autoEl = h("div", { class: "wizard-autostart", "aria-live": "polite" });
    const err = errorBox();
    const finishButtons: HTMLButtonElement[] = [];

    const finish = async (start: boolean) => {
      err.clear();
      finishButtons.forEach((b) => (b.disabled = true));
      try {
        await api.setMode(st.mode ?? "balanced");
        if (st.autostart !== null && st.autostart !== undefined) {
          const want = st.autostartChoice ?? st.autostart;
          st.autostart = await api.setAutostart(want);
        }
        await api.completeSetup(start);
        if (!alive) return;
        location.hash = "#/overview";
      } catch (e) {
        err.show(e);
      } finally {
        finishButtons.forEach((b) => (b.disabled = false));
      }
    };

    refresh = () => {
      if (st.autostart === null) replace(autoEl);
      else if (st.autostart === undefined && !st.autostartError) replace(autoEl, h("p", { class: "muted small" }, "Checking the login items…"));
      else if (st.autostartError) {
        const e = errorBox();
        e.show(st.autostartError);
        replace(autoEl, e.el, retryButton("Check again", () => void loadAutostart()));
      } else {
        replace(
          autoEl,
          h(
            "label",
            { class: "inline check" },
            h("input", {
              type: "checkbox",
              "data-testid": "wizard-autostart",
              checked: st.autostartChoice ?? st.autostart,
              onchange: (ev: Event) => (st.autostartChoice = (ev.target as HTMLInputElement).checked),
            }),
            "Start Apiary when I log in",
          ),
        );
      }
    };

    const start = h("button", { class: "primary big", "data-testid": "wizard-finish", onclick: () => void finish(true) }, "Start contributing");
    const paused = h("button", { "data-testid": "wizard-finish-paused", onclick: () => void finish(false) }, "Finish, stay paused");
    finishButtons.push(start, paused);

    return h(
      "section",
      { "data-testid": "wizard-step-3", "aria-labelledby": "wizard-h" },
      heading("How much to lend"),
      st.joinedNote
        ? h("p", { class: "ok", "data-testid": "wizard-joined" }, st.joinedNote)
        : h("p", { class: "muted" }, "No experiment joined: you can join one later on the Experiments page."),
      h(
        "fieldset",
        { class: "wizard-choices" },
        h("legend", null, "Mode (you can change it any time on the Overview)"),
        MODES.map((m) =>
          h(
            "div",
            { class: "wizard-choice" },
            h("input", {
              type: "radio",
              name: "wizard-mode",
              value: m,
              id: `wizard-mode-${m}`,
              "data-testid": `wizard-mode-${m}`,
              checked: st.mode === m,
              "aria-describedby": `wizard-mode-d-${m}`,
              onchange: () => (st.mode = m),
            }),
            h("label", { for: `wizard-mode-${m}` }, h("strong", null, formatMode(m))),
            h("p", { class: "wizard-choice-details muted", id: `wizard-mode-d-${m}` }, MODE_HELP[m]),
          ),
        ),
      ),
      autoEl,
      err.el,
      h(
        "div",
        { class: "controls wizard-controls" },
        h("button", { "data-testid": "wizard-back", onclick: () => go(2) }, "Back"),
        h("span", { class: "spacer" }),
        paused,
        start,
      ),
    );
  };

  // ------------------------------------------------------------------ navigation

  const render = () => {
    const n = st.step;
    setText(progress, `Step ${n} of 3`);
    stepItems.forEach((li, i) => {
      if (i + 1 === n) li.setAttribute("aria-current", "step");
      else li.removeAttribute("aria-current");
      li.classList.toggle("done", i + 1 < n);
    });
    replace(body, n === 1 ? stepOne() : n === 2 ? stepTwo() : stepThree());
    refresh();
  };

  const go = (n: Step) => {
    if (!alive) return;
    st.step = n;
    render();
    body.querySelector<HTMLElement>("#wizard-h")?.focus();
  };

  render();
  void loadMachine();
  void loadCards();
  void loadAutostart();
  return () => {
    alive = false;
  };
}
