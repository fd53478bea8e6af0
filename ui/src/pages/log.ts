// Log: the node's recent events (GET /api/log) and the live ones from the stream.

import { toApiError } from "../api";
import { h, replace } from "../dom";
import { formatTime } from "../format";
import type { Ctx } from "../store";
import { EVENT_KINDS, type LoggedEvent } from "../types";

/** The words of an event, for the row and for text search. */
export function eventText(e: LoggedEvent): string {
  switch (e.event) {
    case "joined":
      return `Joined ${e.id}: ${e.uids.length} expert${e.uids.length === 1 ? "" : "s"} (${e.uids.join(", ")})`;
    case "left":
      return `Left ${e.id}: ${e.reason}`;
    case "paused":
      return `Paused: ${e.reason}`;
    case "resumed":
      return `Resumed: ${e.reason}`;
    case "error":
      return e.message;
    case "notice":
      return e.message;
    default:
      return JSON.stringify(e);
  }
}

export function filterEvents(events: LoggedEvent[], kind: string, text: string): LoggedEvent[] {
  const q = text.trim().toLowerCase();
  return events.filter((e) => (!kind || e.event === kind) && (!q || eventText(e).toLowerCase().includes(q) || e.event.includes(q)));
}

export function mountLog(root: HTMLElement, ctx: Ctx): () => void {
  const { api, store } = ctx;
  let alive = true;
  let events: LoggedEvent[] = [];
  const kindSel = h("select", { id: "log-kind", "data-testid": "log-kind" }, h("option", { value: "" }, "All"), EVENT_KINDS.map((k) => h("option", { value: k }, k)));
  const search = h("input", { id: "log-search", type: "search", "data-testid": "log-search", placeholder: "text in the event" });
  const err = h("p", { class: "error", role: "alert", hidden: true });
  const list = h("ol", { class: "log", "aria-live": "polite", "aria-relevant": "additions" });
  const count = h("p", { class: "muted small" });

  const render = () => {
    const shown = filterEvents(events, kindSel.value, search.value).slice().reverse();
    count.textContent = `${shown.length} of ${events.length} events, newest first` + (store.missed ? ` (${store.missed} missed while the connection lagged)` : "");
    replace(
      list,
      shown.map((e) =>
        h(
          "li",
          { class: `log-row kind-${e.event}`, "data-testid": "log-row", "data-kind": e.event },
          h("time", { datetime: new Date(e.at * 1000).toISOString() }, formatTime(e.at)),
          h("span", { class: `badge kind kind-${e.event}` }, e.event),
          h("span", { class: "log-text" }, eventText(e)),
        ),
      ),
    );
  };

  const load = async () => {
    err.hidden = true;
    const since = store.now();
    try {
      const got = await api.log(500);
      if (!alive) return;
      // Live events that arrived while loading, and are not in the log yet.
      const live = store.events.filter((e) => e.at >= since);
      events = [...got, ...live];
      render();
    } catch (e) {
      const x = toApiError(e);
      err.textContent = `${x.message} (${x.code})`;
      err.hidden = false;
    }
  };
  const off = store.onEvent((e) => {
    events.push(e);
    if (events.length > 1000) events.splice(0, events.length - 1000);
    render();
  });
  kindSel.addEventListener("change", render);
  search.addEventListener("input", render);

  root.append(
    h(
      "section",
      { class: "panel", "aria-labelledby": "log-h" },
      h("div", { class: "row" }, h("h1", { id: "log-h" }, "Log"), h("button", { onclick: () => void load() }, "Reload")),
      h("div", { class: "controls" }, h("label", { for: "log-kind", class: "inline" }, "Kind ", kindSel), h("label", { for: "log-search", class: "inline" }, "Search ", search)),
      err,
      count,
      list,
    ),
  );
  void load();
  return () => {
    alive = false;
    off();
  };
}
