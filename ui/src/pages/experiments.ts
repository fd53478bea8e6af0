// Experiments: cards from the catalog; a details view shows the join plan before Join.

import { toApiError } from "../api";
import { h, replace, type Child } from "../dom";
import { formatInt, formatMb, formatPercent, formatRelative } from "../format";
import type { Ctx } from "../store";
import type { Card, JoinPlan, Placement, Preview } from "../types";

export function placementText(p: Placement | null): string {
  if (p === null) return "nowhere";
  return p === "cpu" ? "the CPU" : `GPU ${p.gpu.index}`;
}

export const FIT_TEXT = { fits: "Fits this PC", tight: "Tight fit", does_not_fit: "Does not fit" } as const;
const NEED_TEXT = { high: "Needs you: high", moderate: "Needs you: moderate", low: "Needs you: low" } as const;

/** An inline error (role=alert), hidden until `show`. */
export function errorBox(): { el: HTMLElement; show: (e: unknown) => void; clear: () => void } {
  const el = h("p", { class: "error", role: "alert", hidden: true });
  return {
    el,
    show(e) {
      const err = toApiError(e);
      el.textContent = `${err.message} (${err.code})`;
      el.hidden = false;
    },
    clear() {
      el.textContent = "";
      el.hidden = true;
    },
  };
}

/**
 * What joining would do (the plan of a preview): the explanation, the placement and budget, the
 * planned experts; or why there is no plan. Shared by the Experiments page and the first-run wizard.
 * Hooks: `plan-explanation`, `plan-uids` (one `li` per uid), `why-not`.
 */
export function renderPlan(p: Preview, idPrefix = "plan"): Child[] {
  const plan: JoinPlan | null = p.plan;
  return [
    plan
      ? [
          h("ul", { class: "explanation", "data-testid": "plan-explanation" }, plan.explanation.map((x) => h("li", null, x))),
          h(
            "p",
            null,
            `${plan.uids.length} expert${plan.uids.length === 1 ? "" : "s"} on ${placementText(plan.placement)}, ` +
              `${formatMb(plan.total_mb)} of a ${formatMb(plan.budget_mb)} budget, about ${formatPercent(plan.expected_share)} of the calls.`,
          ),
          h("h4", { id: `${idPrefix}-uids-h` }, `Planned experts (${plan.uids.length}), most needed first`),
          h(
            "ul",
            { class: "uids plan-uids", "data-testid": "plan-uids", "aria-labelledby": `${idPrefix}-uids-h` },
            plan.uids.map((u) => h("li", null, h("code", null, u))),
          ),
        ]
      : h("p", { class: "muted" }, "No plan: this experiment is not running in the swarm now."),
    p.why_not && h("p", { class: "error", "data-testid": "why-not" }, p.why_not),
  ];
}

/** "Joined: hosting 4 experts on the CPU." (with a title: "Joined Local demo: hosting …") */
export function joinedText(plan: JoinPlan, title?: string): string {
  return `Joined${title ? ` ${title}` : ""}: hosting ${plan.uids.length} expert${plan.uids.length === 1 ? "" : "s"} on ${placementText(plan.placement)}.`;
}

export function renderCard(card: Card, joined: boolean, actions: { onJoin: () => void; onLeave: () => void }, now: number): HTMLElement {
  const m = card.manifest;
  const req = m.requirements;
  const err = errorBox();
  const live = card.live;
  return h(
    "article",
    { class: `card fit-${card.fit.level}`, "data-testid": `card-${card.id}`, "aria-labelledby": `card-h-${card.id}` },
    h(
      "header",
      null,
      h("h2", { id: `card-h-${card.id}` }, m.title || card.id),
      h(
        "div",
        { class: "badges" },
        h("span", { class: `badge status-${card.status}` }, card.status),
        h("span", { class: "badge", title: card.source === "dht" ? "read from the DHT, signed" : "shipped with Apiary, not found in the DHT" }, card.source),
        joined && h("span", { class: "badge joined" }, "joined"),
      ),
    ),
    h("p", { class: "summary" }, m.summary),
    h(
      "p",
      { class: "publisher" },
      "By ",
      h("strong", null, card.publisher),
      card.fingerprint ? [" · key ", h("code", { "data-testid": `fingerprint-${card.id}` }, card.fingerprint)] : " · bundled, unsigned",
    ),
    h(
      "dl",
      { class: "facts" },
      h("dt", null, "Volunteers"),
      h("dd", null, formatInt(card.volunteers)),
      h("dt", null, "Coverage"),
      h("dd", null, `${card.covered} of ${card.need.grid_experts} experts (${formatPercent(1 - card.need.uncovered_share)})`),
      h("dt", null, "Needs per expert"),
      h(
        "dd",
        null,
        `${formatMb(req.min_ram_mb_per_expert)} RAM` + (req.min_vram_mb_per_expert ? `, ${formatMb(req.min_vram_mb_per_expert)} VRAM` : ""),
      ),
      h("dt", null, "Bandwidth, disk"),
      h("dd", null, `${req.bandwidth_mbps ? `${req.bandwidth_mbps} Mbit/s` : "any"}, ${formatMb(req.disk_mb)}`),
      live && [
        h("dt", null, "Training"),
        h(
          "dd",
          null,
          `step ${formatInt(live.step)}` +
            (live.loss !== undefined ? `, loss ${live.loss.toFixed(2)}` : "") +
            `, ${Math.round(live.samples_per_s)} samples/s (${formatRelative(live.updated_at, now)})`,
        ),
      ],
    ),
    h(
      "div",
      { class: "levels" },
      h("span", { class: `badge fit fit-${card.fit.level}`, "data-testid": `fit-${card.id}` }, FIT_TEXT[card.fit.level] ?? card.fit.level),
      h("span", { class: `badge need need-${card.need.label}`, "data-testid": `need-${card.id}` }, NEED_TEXT[card.need.label] ?? card.need.label),
    ),
    card.fit.reasons.length > 0 && h("ul", { class: "reasons" }, card.fit.reasons.map((r) => h("li", null, r))),
    h(
      "div",
      { class: "card-actions" },
      joined
        ? h("button", { "data-testid": `leave-${card.id}`, onclick: actions.onLeave }, "Leave")
        : h("button", { class: "primary", "data-testid": `join-${card.id}`, onclick: actions.onJoin }, "Join…"),
    ),
    err.el,
  );
}

export function mountExperiments(root: HTMLElement, ctx: Ctx): () => void {
  const { api, store } = ctx;
  const listEl = h("div", { class: "cards", "aria-live": "polite", "aria-busy": "true" }, h("p", { class: "muted" }, "Loading the catalog…"));
  const detailsEl = h("section", { class: "panel details", hidden: true, "aria-labelledby": "details-h", "data-testid": "experiment-details" });
  const listErr = errorBox();
  let cards: Card[] = [];
  let alive = true;

  const joinedIds = () => new Set((store.status?.experiments ?? []).map((e) => e.id));

  const renderList = () => {
    const joined = joinedIds();
    listEl.setAttribute("aria-busy", "false");
    if (!cards.length) {
      replace(listEl, h("p", { class: "muted" }, "No experiments found. The node may have no bootstrap peers yet."));
      return;
    }
    replace(
      listEl,
      cards.map((c) => {
        const el: HTMLElement = renderCard(
          c,
          joined.has(c.id),
          {
            onJoin: () => void openDetails(c),
            onLeave: async () => {
              const box = el.querySelector<HTMLElement>(".error")!;
              box.hidden = true;
              try {
                await api.leave(c.id);
                store.setStatus(await api.status());
                await load();
              } catch (e) {
                const err = toApiError(e);
                box.textContent = `${err.message} (${err.code})`;
                box.hidden = false;
              }
            },
          },
          store.now(),
        );
        return el;
      }),
    );
  };

  const load = async () => {
    listErr.clear();
    try {
      const got = await api.experiments();
      if (!alive) return;
      cards = got;
      renderList();
    } catch (e) {
      listEl.setAttribute("aria-busy", "false");
      replace(listEl);
      listErr.show(e);
    }
  };

  const closeDetails = () => {
    detailsEl.hidden = true;
    replace(detailsEl);
  };

  const openDetails = async (card: Card) => {
    detailsEl.hidden = false;
    replace(detailsEl, h("h2", { id: "details-h" }, card.manifest.title || card.id), h("p", { class: "muted" }, "Planning…"));
    detailsEl.scrollIntoView?.({ block: "nearest" });
    let preview: Preview;
    try {
      preview = await api.showExperiment(card.id, card.fingerprint);
    } catch (e) {
      const err = errorBox();
      err.show(e);
      replace(detailsEl, h("h2", { id: "details-h" }, card.manifest.title || card.id), err.el, h("button", { onclick: closeDetails }, "Close"));
      return;
    }
    if (!alive) return;
    renderDetails(preview);
  };

  const renderDetails = (p: Preview) => {
    const c = p.card;
    const m = c.manifest;
    const err = errorBox();
    const done = h("p", { class: "ok", role: "status", hidden: true, "data-testid": "join-done" });
    const maxInput = h("input", {
      id: "join-max",
      type: "number",
      min: "1",
      step: "1",
      inputmode: "numeric",
      placeholder: p.plan ? String(p.plan.uids.length) : "",
      "data-testid": "join-max-experts",
    });
    const confirm = h(
      "button",
      {
        class: "primary",
        "data-testid": "join-confirm",
        disabled: !p.plan && !!p.why_not,
        onclick: async () => {
          err.clear();
          const raw = maxInput.value.trim();
          let maxExperts: number | undefined;
          if (raw) {
            const n = Number(raw);
            if (!Number.isInteger(n) || n < 1) {
              err.show({ code: "bad_request", message: "Host at most: a whole number, 1 or more" });
              return;
            }
            maxExperts = n;
          }
          confirm.disabled = true;
          try {
            const plan = await api.join(c.id, { maxExperts, publisher: c.fingerprint });
            done.hidden = false;
            done.textContent = joinedText(plan);
            store.setStatus(await api.status());
            await load();
          } catch (e) {
            err.show(e);
          } finally {
            confirm.disabled = false;
          }
        },
      },
      "Join",
    );
    replace(
      detailsEl,
      h("h2", { id: "details-h" }, m.title || c.id),
      h("p", null, m.summary),
      m.description && h("div", { class: "description" }, m.description.split("\n\n").map((para) => h("p", null, para))),
      h(
        "dl",
        { class: "facts" },
        h("dt", null, "Publisher"),
        h("dd", null, c.publisher, c.fingerprint ? [" · ", h("code", null, c.fingerprint)] : " (bundled)"),
        m.homepage && [h("dt", null, "Homepage"), h("dd", null, h("a", { href: m.homepage, target: "_blank", rel: "noopener noreferrer" }, m.homepage))],
        h("dt", null, "Expert"),
        h("dd", null, `${m.expert.kind}, hidden ${m.expert.hidden_dim}, ${m.expert.dtype}, grid ${m.grid.join("×")}`),
        h("dt", null, "Expires"),
        h("dd", null, formatRelative(m.expires, store.now())),
      ),
      h("h3", null, "What joining would do"),
      renderPlan(p),
      h(
        "div",
        { class: "controls" },
        h("label", { for: "join-max", class: "inline" }, "Host at most ", maxInput, " experts (optional)"),
        confirm,
        h("button", { onclick: closeDetails }, "Cancel"),
      ),
      err.el,
      done,
    );
    // Keyboard users land on the plan.
    (confirm.disabled ? detailsEl.querySelector<HTMLElement>("button") : confirm)?.focus();
  };

  root.append(
    h(
      "section",
      { class: "panel", "aria-labelledby": "exp-h" },
      h("div", { class: "row" }, h("h1", { id: "exp-h" }, "Experiments"), h("button", { onclick: () => void load() }, "Refresh")),
      h("p", { class: "muted" }, "Experiments announced in the swarm this node sees, and the ones shipped with Apiary. Join shows what this PC would host first."),
      listErr.el,
    ),
    detailsEl,
    listEl,
  );
  // Joined / left elsewhere: refresh the buttons.
  let lastJoined = [...joinedIds()].sort().join(",");
  const off = store.onChange(() => {
    const now = [...joinedIds()].sort().join(",");
    if (now !== lastJoined) {
      lastJoined = now;
      if (cards.length) renderList();
    }
  });
  void load();
  return () => {
    alive = false;
    off();
  };
}
