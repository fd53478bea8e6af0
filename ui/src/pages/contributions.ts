// Contributions: totals, history per hour/day, per-experiment filter, energy and cost, CSV export.

import type { Api } from "../api";
import { toApiError } from "../api";
import { makeChart, type Chart } from "../charts";
import { h, replace } from "../dom";
import { formatBytes, formatCompact, formatDuration, formatInt, formatTime } from "../format";
import type { Ctx } from "../store";
import type { Bucket, Filter, Row, Totals } from "../types";

/** Sums history rows per bucket start (rows of several experiments share a bucket). */
export function aggregateRows(rows: Row[]): { start: number; rows: number; energy: number; uptime: number }[] {
  const by = new Map<number, { start: number; rows: number; energy: number; uptime: number }>();
  for (const r of rows) {
    const a = by.get(r.start) ?? { start: r.start, rows: 0, energy: 0, uptime: 0 };
    a.rows += r.counters.forward_samples + r.counters.backward_samples;
    a.energy += r.energy_kwh;
    if (r.experiment === null) a.uptime += r.uptime_seconds;
    by.set(r.start, a);
  }
  return [...by.values()].sort((x, y) => x.start - y.start);
}

/** Downloads the CSV export (fetched with the token, saved from a Blob). */
export async function downloadCsv(api: Api, filter: Filter, bucket: Bucket): Promise<void> {
  const text = await api.exportCsv(filter, bucket);
  const blob = new Blob([text], { type: "text/csv" });
  const url = URL.createObjectURL(blob);
  const a = h("a", { href: url, download: `apiary-contributions-${bucket}${filter.experiment ? `-${filter.experiment}` : ""}.csv` });
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10_000);
}

/** 0 → "0 FLOP", 3.2e12 → "3.2 TFLOP". */
export function formatFlops(n: number): string {
  const s = formatCompact(n);
  return / [kMGTP]$/.test(s) ? `${s}FLOP` : `${s} FLOP`;
}

function totalsView(t: Totals): HTMLElement {
  const c = t.counters;
  const item = (label: string, value: string, testid?: string) =>
    h("div", { class: "fig" }, h("span", { class: "fig-label" }, label), h("span", { class: "fig-value", "data-testid": testid }, value));
  return h(
    "div",
    { class: "figs", "data-testid": "totals" },
    item("Forward rows", formatInt(c.forward_samples), "total-forward"),
    item("Backward rows", formatInt(c.backward_samples), "total-backward"),
    item("Calls", `${formatInt(c.forward_calls)} fwd · ${formatInt(c.backward_calls)} bwd`),
    item("Optimizer steps", formatInt(c.optimizer_steps)),
    item("Uptime", formatDuration(t.uptime_seconds)),
    item("CPU time", formatDuration(c.cpu_seconds)),
    item("GPU time", formatDuration(c.gpu_seconds)),
    item("Compute", formatFlops(c.flops)),
    item("Traffic", `${formatBytes(c.bytes_in)} in · ${formatBytes(c.bytes_out)} out`),
    item("Failed calls", formatInt(c.errors)),
    item(
      "Energy",
      `${t.energy_kwh.toFixed(3)} kWh estimated` + (t.measured_energy_kwh > 0 ? ` (${t.measured_energy_kwh.toFixed(3)} kWh measured)` : ""),
      "total-energy",
    ),
    item("Cost", t.cost === null ? "no electricity price set" : `${t.cost.toFixed(2)} ${t.currency}`, "total-cost"),
  );
}

export function mountContributions(root: HTMLElement, ctx: Ctx): () => void {
  const { api, store } = ctx;
  let alive = true;
  const expSel = h("select", { id: "contrib-exp", "data-testid": "contrib-experiment" }, h("option", { value: "" }, "All experiments"));
  const bucketSel = h(
    "select",
    { id: "contrib-bucket", "data-testid": "contrib-bucket" },
    h("option", { value: "hour" }, "Per hour"),
    h("option", { value: "day" }, "Per day"),
  );
  const err = h("p", { class: "error", role: "alert", hidden: true });
  const totalsEl = h("div", { "aria-live": "polite" });
  const chartBox = h("div", { class: "chart" });
  const tableEl = h("div", { class: "table-wrap" });
  let chart: Chart | null = null;
  let chartBucket = 0;
  const known = new Set<string>();

  const addExperiments = (ids: (string | null)[]) => {
    for (const id of ids) {
      if (!id || known.has(id)) continue;
      known.add(id);
      expSel.append(h("option", { value: id }, id));
    }
  };
  addExperiments((store.status?.experiments ?? []).map((e) => e.id));

  const filter = (): Filter => (expSel.value ? { experiment: expSel.value } : {});
  const bucket = () => bucketSel.value as Bucket;

  const load = async () => {
    err.hidden = true;
    try {
      const [totals, rows] = await Promise.all([api.contributions(filter()), api.history(filter(), bucket())]);
      if (!alive) return;
      addExperiments(rows.map((r) => r.experiment));
      replace(totalsEl, totalsView(totals));
      const agg = aggregateRows(rows);
      const span = bucket() === "day" ? 86400 : 3600;
      if (chart && chartBucket !== span) {
        chart.destroy();
        chart = null;
      }
      chartBucket = span;
      if (ctx.charts && !chart) chart = makeChart(chartBox, {
        title: "Rows served and energy",
        xRange: (min, max) => [min - span, max + span],
        leftAxis: "rows",
        rightAxis: "kWh",
        series: [
          { label: "rows", color: "#0891b2", bars: true },
          { label: "energy", color: "#ea580c", unit: "kWh", scale: "r" },
        ],
      });
      chart?.setData([agg.map((a) => a.start), agg.map((a) => a.rows), agg.map((a) => a.energy)]);
      replace(
        tableEl,
        agg.length
          ? h(
              "table",
              { class: "table", "data-testid": "history-table" },
              h("caption", { class: "visually-hidden" }, "History"),
              h("thead", null, h("tr", null, ["From", "Rows", "Energy (kWh)", "Uptime"].map((c) => h("th", { scope: "col" }, c)))),
              h(
                "tbody",
                null,
                agg
                  .slice()
                  .reverse()
                  .slice(0, 48)
                  .map((a) =>
                    h(
                      "tr",
                      null,
                      h("td", null, formatTime(a.start, false)),
                      h("td", { class: "num" }, formatInt(a.rows)),
                      h("td", { class: "num" }, a.energy.toFixed(3)),
                      h("td", { class: "num" }, a.uptime ? formatDuration(a.uptime) : "—"),
                    ),
                  ),
              ),
            )
          : h("p", { class: "muted" }, "Nothing recorded yet."),
      );
    } catch (e) {
      const x = toApiError(e);
      err.textContent = `${x.message} (${x.code})`;
      err.hidden = false;
    }
  };
  expSel.addEventListener("change", () => void load());
  bucketSel.addEventListener("change", () => void load());
  const exportBtn = h(
    "button",
    {
      "data-testid": "export-csv",
      onclick: async () => {
        err.hidden = true;
        try {
          await downloadCsv(api, filter(), bucket());
        } catch (e) {
          const x = toApiError(e);
          err.textContent = `${x.message} (${x.code})`;
          err.hidden = false;
        }
      },
    },
    "Export CSV",
  );

  root.append(
    h(
      "section",
      { class: "panel", "aria-labelledby": "contrib-h" },
      h("h1", { id: "contrib-h" }, "Contributions"),
      h(
        "div",
        { class: "controls" },
        h("label", { for: "contrib-exp", class: "inline" }, "Experiment ", expSel),
        h("label", { for: "contrib-bucket", class: "inline" }, "History ", bucketSel),
        h("button", { onclick: () => void load() }, "Refresh"),
        exportBtn,
      ),
      err,
      totalsEl,
      h("p", { class: "muted small" }, "Energy is an estimate from the compute time and the hardware's power; the cost uses the electricity price in the node's settings, when set."),
    ),
    h("section", { class: "panel", "aria-label": "History" }, h("figure", { class: "chart-wrap" }, chartBox), tableEl),
  );
  void load();
  return () => {
    alive = false;
    chart?.destroy();
  };
}
