// Overview: what the node does and why, the controls, live charts, hosted experts, network.

import { toApiError } from "../api";
import { makeChart, type Chart } from "../charts";
import { h, replace, setText } from "../dom";
import {
  formatBytes,
  formatInt,
  formatMode,
  formatMs,
  formatReading,
  formatUntil,
  known,
  secondsUntilTomorrowAt,
  shortPeerId,
  unknownWhy,
} from "../format";
import { S, totalForwardRows } from "../rolling";
import type { Ctx } from "../store";
import { MODES, type Mode, type NetworkStatus, type NodeStatus } from "../types";

export const SNOOZES: { label: string; seconds: () => number }[] = [
  { label: "15 min", seconds: () => 15 * 60 },
  { label: "1 h", seconds: () => 3600 },
  { label: "3 h", seconds: () => 3 * 3600 },
  { label: "Until tomorrow 08:00", seconds: () => secondsUntilTomorrowAt(new Date(), 8) },
];

const REACH_TEXT: Record<string, string> = {
  unknown: "not known yet (asks peers from 15 s after start)",
  public: "reachable directly",
  private: "behind NAT or a firewall (others reach it only through relays)",
};

/** The round trip's meaning for each path (`NetworkStatus.rtt_ms`). */
function rttWhy(n: NetworkStatus): string {
  if (n.rtt_ms === null) return n.path === "offline" ? "no peer to measure" : "not measured yet";
  return n.path === "relayed" ? "to the relay" : "median ping to connected peers";
}

/** A list of addresses as code, or a muted "none". */
function addrList(addrs: string[], none = "none"): HTMLElement {
  if (!addrs.length) return h("span", { class: "muted" }, none);
  return h("ul", { class: "addrs" }, addrs.map((a) => h("li", null, h("code", null, a))));
}

/** A busy share (0–1) as a bar with its percentage; out-of-range values are clamped. */
function busyBar(fraction: number): HTMLElement {
  const f = Number.isFinite(fraction) ? Math.min(1, Math.max(0, fraction)) : 0;
  const pct = Math.round(f * 100);
  return h(
    "span",
    { class: "busy" },
    h(
      "span",
      {
        class: "busy-bar",
        role: "meter",
        "aria-label": "busy",
        "aria-valuemin": 0,
        "aria-valuemax": 100,
        "aria-valuenow": pct,
      },
      h("span", { class: "busy-fill", style: { width: `${pct}%` } }),
    ),
    h("span", { class: "busy-text" }, `${pct} %`),
  );
}

/** The hosted experts, one row each: requests/s, the busy share of the last period, counters. */
function expertLoads(s: NodeStatus): HTMLElement | null {
  const rows = s.experiments.flatMap((e) => (e.experts ?? []).map((x) => ({ e, x })));
  if (!rows.length) return null;
  return h(
    "div",
    { class: "table-wrap expert-loads" },
    h(
      "table",
      { class: "table", "aria-label": "Load per expert (last second)" },
      h(
        "thead",
        null,
        h("tr", null, ["Expert", "Requests/s", "Busy", "Forward rows", "Backward rows", "Steps", "Queued"].map((c) => h("th", { scope: "col" }, c))),
      ),
      h(
        "tbody",
        null,
        rows.map(({ e, x }) =>
          h(
            "tr",
            { "data-testid": `expert-load-${x.uid}` },
            h("th", { scope: "row" }, h("code", { title: `${e.title || e.id}: ${x.uid}` }, x.uid)),
            h("td", { class: "num", "data-testid": `expert-rps-${x.uid}` }, x.requests_per_s.toFixed(1)),
            h("td", null, busyBar(x.busy_fraction)),
            h("td", { class: "num" }, formatInt(x.forward_rows)),
            h("td", { class: "num" }, formatInt(x.backward_rows)),
            h("td", { class: "num" }, formatInt(x.optimizer_steps)),
            h("td", { class: "num" }, formatInt(x.queued_rows)),
          ),
        ),
      ),
    ),
  );
}

export function mountOverview(root: HTMLElement, ctx: Ctx): () => void {
  const { api, store } = ctx;
  const msg = h("p", { class: "error", role: "alert", hidden: true });
  const showError = (e: unknown) => {
    const err = toApiError(e);
    msg.hidden = false;
    msg.textContent = `${err.message} (${err.code})`;
  };
  const clearError = () => {
    msg.hidden = true;
    msg.textContent = "";
  };
  const act = (f: () => Promise<unknown>) => async () => {
    clearError();
    try {
      await f();
      // The stream brings the new status; ask now too so the button flips at once.
      store.setStatus(await api.status());
    } catch (e) {
      showError(e);
    }
  };

  // --- state line
  const stateEl = h("span", { class: "state-word", "data-testid": "state" }, "…");
  const reasonEl = h("span", { class: "reason", "data-testid": "reason" });
  const untilEl = h("span", { class: "until", "data-testid": "until" });
  const stateLine = h(
    "div",
    { class: "state-line", role: "status", "aria-live": "polite", "aria-atomic": "true" },
    stateEl,
    h("div", { class: "state-text" }, reasonEl, untilEl),
  );

  // --- controls
  const pauseBtn = h("button", { class: "big", "data-testid": "pause-button", onclick: act(() => api.pause()) }, "Pause");
  const resumeBtn = h(
    "button",
    { class: "big primary", "data-testid": "resume-button", hidden: true, onclick: act(() => api.resume()) },
    "Resume",
  );
  // "Starting in 10 s because you are away": the one moment a start can be called off
  const cancelStartBtn = h(
    "button",
    {
      class: "big",
      "data-testid": "cancel-start-button",
      hidden: true,
      title: "Stay paused until you are back at the PC and away again",
      onclick: act(() => api.cancelStart()),
    },
    "Don't start now",
  );
  const finishBtn = h(
    "button",
    { "data-testid": "finish-button", title: "Finish the work in flight, then pause", onclick: act(() => api.finish()) },
    "Finish, then pause",
  );
  const snoozeMenu = h(
    "details",
    { class: "menu", "data-testid": "snooze-menu" },
    h("summary", null, "Pause for…"),
    h(
      "div",
      { class: "menu-items" },
      SNOOZES.map((s) =>
        h(
          "button",
          {
            "data-testid": `snooze-${s.label.split(" ")[0].toLowerCase()}`,
            onclick: async () => {
              snoozeMenu.open = false;
              await act(() => api.snooze(s.seconds()))();
            },
          },
          s.label,
        ),
      ),
    ),
  );
  // The menu closes with Escape (focus back on its button) and when focus or a click goes elsewhere.
  snoozeMenu.addEventListener("keydown", (e: KeyboardEvent) => {
    if (e.key === "Escape" && snoozeMenu.open) {
      snoozeMenu.open = false;
      snoozeMenu.querySelector("summary")?.focus();
    }
  });
  snoozeMenu.addEventListener("focusout", (e: FocusEvent) => {
    if (!snoozeMenu.contains(e.relatedTarget as Node | null)) snoozeMenu.open = false;
  });
  const closeOnOutside = (e: MouseEvent) => {
    if (snoozeMenu.open && !snoozeMenu.contains(e.target as Node)) snoozeMenu.open = false;
  };
  document.addEventListener("click", closeOnOutside);
  const modeSel = h(
    "select",
    {
      id: "overview-mode",
      "data-testid": "mode-select",
      onchange: async () => {
        clearError();
        try {
          await api.setMode(modeSel.value as Mode);
        } catch (e) {
          showError(e);
        }
      },
    },
    MODES.map((m) => h("option", { value: m }, formatMode(m))),
  );
  api
    .policy()
    .then((p) => (modeSel.value = p.mode))
    .catch(() => {
      /* the selector still works */
    });

  // --- figures
  const fig = (label: string, testid: string) => {
    const v = h("span", { class: "fig-value", "data-testid": testid }, "…");
    const why = h("span", { class: "fig-why" });
    return { el: h("div", { class: "fig" }, h("span", { class: "fig-label" }, label), v, why), v, why };
  };
  const cpu = fig("CPU", "cpu-percent");
  const mem = fig("Memory", "memory");
  const gpu = fig("GPU", "gpu");
  const rows = fig("Forward rows", "forward-samples");
  const rps = fig("Rows/s served", "rows-per-s");
  const peers = fig("Peers", "peers");
  // the network path: the word (coloured like the state word) and why; the details in the Network panel
  const net = fig("Network", "network-path");
  net.why.dataset.testid = "network-reason";
  const inflight = fig("In flight", "in-flight");

  // --- charts
  const last5min = (_min: number, max: number): [number, number] => [max - 300, max];
  const chartDefs = [
    {
      key: "util",
      spec: {
        title: "CPU and GPU use (%)",
        xRange: last5min,
        range: [0, 100] as [number, number],
        series: [
          { label: "CPU", color: "#3b82f6", unit: "%" },
          { label: "GPU (ours)", color: "#16a34a", unit: "%" },
          { label: "GPU (others)", color: "#dc2626", unit: "%" },
        ],
      },
      cols: [S.cpu, S.gpu_ours, S.gpu_others],
    },
    {
      key: "rps",
      spec: { title: "Rows served per second", xRange: last5min, series: [{ label: "rows/s", color: "#0891b2", unit: "/s" }] },
      cols: [S.rps],
    },
    {
      key: "vram",
      spec: {
        title: "GPU memory (GiB)",
        xRange: last5min,
        series: [
          { label: "ours", color: "#16a34a", unit: "GiB" },
          { label: "others", color: "#dc2626", unit: "GiB" },
        ],
      },
      cols: [S.vram_ours, S.vram_others],
    },
    {
      key: "thermal",
      spec: {
        title: "GPU temperature and power",
        xRange: last5min,
        leftAxis: "°C",
        rightAxis: "W",
        series: [
          { label: "temperature", color: "#ea580c", unit: "°C" },
          { label: "power", color: "#9333ea", unit: "W", scale: "r" },
        ],
      },
      cols: [S.temp, S.power],
    },
  ];
  const chartBoxes = chartDefs.map((d) => {
    const box = h("div", { class: "chart", "data-testid": `chart-${d.key}` });
    const note = h("p", { class: "chart-note" });
    const caption = h("figcaption", { class: "chart-caption" }, d.spec.title);
    return { def: d, box, note, wrap: h("figure", { class: "chart-wrap" }, caption, box, note), chart: null as Chart | null };
  });

  // --- hosted experiments
  const hostedEl = h("div", { class: "hosted" });

  // --- network: the round trip, reachability, connections, relays; the addresses behind a disclosure
  // (the elements stay, so an open disclosure stays open across statuses)
  const netRtt = h("span", { "data-testid": "network-rtt" });
  const netRttWhy = h("span", { class: "muted" });
  const netReach = h("span", { "data-testid": "reachability" });
  const netReachWhy = h("span", { class: "muted" });
  const netConns = h("dd", { "data-testid": "network-connections" });
  const netPunches = h("dd", { "data-testid": "network-hole-punches" });
  const netRelays = h("dd", { "data-testid": "network-relays" });
  const netRelayed = h("dd", { "data-testid": "network-relayed-addrs" });
  const netObserved = h("dd", { "data-testid": "network-observed-addrs" });
  const netMapping = h("dd", { "data-testid": "network-port-mapping" });
  const netAddrs = h(
    "details",
    { class: "network-addrs", "data-testid": "network-addresses" },
    h("summary", null, "Addresses and port mapping"),
    h(
      "dl",
      { class: "facts" },
      h("dt", null, "Relayed addresses"),
      netRelayed,
      h("dt", null, "Seen by peers"),
      netObserved,
      h("dt", null, "Port mapping (UPnP)"),
      netMapping,
    ),
  );
  const netEl = h(
    "div",
    { class: "network" },
    h(
      "dl",
      { class: "facts" },
      h("dt", null, "Round trip"),
      h("dd", null, netRtt, " ", netRttWhy),
      h("dt", null, "Reachability"),
      h("dd", null, netReach, " ", netReachWhy),
      h("dt", null, "Connections"),
      netConns,
      h("dt", null, "Hole punching"),
      netPunches,
      h("dt", null, "Relays"),
      netRelays,
    ),
    netAddrs,
  );
  const netMissing = h("p", { class: "muted", hidden: true }, "This node does not report its network path.");

  root.append(
    h(
      "section",
      { class: "panel state-panel", "aria-labelledby": "ov-h" },
      h("h1", { id: "ov-h", class: "visually-hidden" }, "Overview"),
      stateLine,
      h(
        "div",
        { class: "controls" },
        pauseBtn,
        cancelStartBtn,
        resumeBtn,
        finishBtn,
        snoozeMenu,
        h("label", { class: "inline", for: "overview-mode" }, "Mode ", modeSel),
      ),
      msg,
    ),
    h("section", { class: "panel figs", "aria-label": "Readings" }, [cpu, mem, gpu, rows, rps, inflight, peers, net].map((f) => f.el)),
    h("section", { class: "panel charts", "aria-label": "Live charts, last 5 minutes" }, chartBoxes.map((c) => c.wrap)),
    h("section", { class: "panel", "aria-labelledby": "hosted-h" }, h("h2", { id: "hosted-h" }, "Experts hosted"), hostedEl),
    h("section", { class: "panel", "aria-labelledby": "net-h", "data-testid": "network" }, h("h2", { id: "net-h" }, "Network"), netMissing, netEl),
  );

  if (ctx.charts) {
    requestAnimationFrame(() => {
      for (const c of chartBoxes) c.chart = makeChart(c.box, c.def.spec);
      drawCharts();
    });
  }

  const drawCharts = () => {
    const data = store.buffer.data();
    for (const c of chartBoxes) {
      if (c.chart) c.chart.setData([data[0], ...c.def.cols.map((i) => data[i + 1])]);
    }
  };

  const render = () => {
    const s = store.status;
    if (!s) return;
    renderStatus(s);
    drawCharts();
  };

  const renderStatus = (s: NodeStatus) => {
    const now = store.now();
    setText(stateEl, s.state);
    stateEl.className = `state-word state-${s.state}`;
    setText(reasonEl, s.reason);
    setText(untilEl, formatUntil(s.state, s.until, now));
    const stopped = s.state === "paused" || s.state === "draining";
    pauseBtn.hidden = stopped;
    resumeBtn.hidden = !stopped;
    cancelStartBtn.hidden = !(s.directive.kind === "paused" && s.directive.cause === "starting_soon");
    finishBtn.hidden = stopped;
    // follow a mode changed elsewhere (the tray, `apiary node mode`), unless the user is choosing one
    if (s.mode && document.activeElement !== modeSel && modeSel.value !== s.mode) modeSel.value = s.mode;

    const t = s.telemetry;
    const cpuV = t ? known(t.system.cpu_percent) : null;
    setText(cpu.v, cpuV === null ? "unknown" : String(Math.round(cpuV)));
    setText(cpu.why, cpuV === null ? (t ? (unknownWhy(t.system.cpu_percent) ?? "") : "no reading yet") : "%");
    if (t) {
      const used = known(t.system.memory_used);
      const total = known(t.system.memory_total);
      setText(mem.v, used !== null ? formatBytes(used) : "unknown");
      setText(mem.why, used === null ? (unknownWhy(t.system.memory_used) ?? "") : total !== null ? `of ${formatBytes(total)}` : "");
      const gpus = known(t.gpus);
      if (gpus === null) {
        setText(gpu.v, "unknown");
        setText(gpu.why, unknownWhy(t.gpus) ?? "");
      } else if (gpus.length === 0) {
        setText(gpu.v, "none");
        setText(gpu.why, "");
      } else {
        setText(
          gpu.v,
          gpus
            .map((g) => formatReading(g.utilization, (u) => `${Math.round(u * 100)} %`))
            .join(" · "),
        );
        setText(
          gpu.why,
          gpus
            .map(
              (g) =>
                `${formatReading(g.name)}: ${formatReading(g.temperature_c, (c) => `${Math.round(c)} °C`)}, ` +
                `${formatReading(g.power_w, (w) => `${Math.round(w)} W`)}`,
            )
            .join("; "),
        );
      }
      setText(inflight.v, formatReading(t.in_flight, (n) => String(n)));
    } else {
      for (const f of [mem, gpu, inflight]) {
        setText(f.v, "unknown");
        setText(f.why, "no reading yet");
      }
    }
    setText(rows.v, String(totalForwardRows(s)));
    setText(
      rows.why,
      `backward ${formatInt(s.experiments.reduce((a, e) => a + e.backward_samples, 0))} (since start)`,
    );
    setText(rps.v, store.rowsPerS === null ? "—" : store.rowsPerS.toFixed(1));
    setText(rps.why, "forward + backward");
    setText(peers.v, String(s.peers));
    setText(peers.why, s.peers === 0 ? "no peers: is the network reachable?" : "in the routing table");
    renderNetwork(s);

    // why charts are empty
    const gpusR = t?.gpus;
    const gpuWhy = !t ? "no reading yet" : gpusR && "unknown" in gpusR ? `GPU unknown: ${gpusR.unknown}` : known(gpusR) && known(gpusR)!.length === 0 ? "no GPU" : "";
    for (const c of chartBoxes) {
      let note = "";
      if (c.def.key === "util") note = cpuV === null && t ? `CPU unknown: ${unknownWhy(t.system.cpu_percent)}` : gpuWhy;
      else if (c.def.key === "vram" || c.def.key === "thermal") {
        note = gpuWhy;
        if (!note && c.def.key === "thermal" && store.buffer.latest(S.power) === null) {
          const g = known(gpusR)?.[0];
          if (g && "unknown" in g.power_w) note = `power unknown: ${g.power_w.unknown}`;
        }
      } else if (c.def.key === "rps") note = s.experiments.length ? "" : "no experiment joined";
      setText(c.note, note);
      // A GPU chart with nothing to draw (no GPU, no driver) gives its room to the note.
      const gpuChart = c.def.key === "vram" || c.def.key === "thermal";
      const empty = c.def.cols.every((i) => store.buffer.data()[i + 1].every((v) => v === null));
      c.wrap.classList.toggle("no-data", gpuChart && !!gpuWhy && empty);
    }

    // hosted experiments
    if (!s.experiments.length) {
      replace(hostedEl, h("p", { class: "muted" }, "No experiment joined. ", h("a", { href: "#/experiments" }, "Browse experiments")));
    } else {
      const openIds = new Set(
        [...hostedEl.querySelectorAll<HTMLDetailsElement>("details[data-id]")].filter((d) => d.open).map((d) => d.dataset.id),
      );
      replace(
        hostedEl,
        h(
          "table",
          { class: "table" },
          h(
            "thead",
            null,
            h("tr", null, ["Experiment", "Experts", "Forward rows", "Backward rows", "Steps", "Queued", "Rows/s", "State"].map((c) => h("th", { scope: "col" }, c))),
          ),
          h(
            "tbody",
            null,
            s.experiments.map((e) => {
              const r = store.rowsPerSByExperiment.get(e.id);
              return h(
                "tr",
                { "data-testid": `hosted-${e.id}` },
                h("th", { scope: "row" }, h("span", { title: e.id }, e.title || e.id)),
                h("td", null, h("details", { "data-id": e.id, open: openIds.has(e.id) }, h("summary", null, String(e.uids.length)), h("ul", { class: "uids" }, e.uids.map((u) => h("li", null, h("code", null, u)))))),
                h("td", { class: "num" }, formatInt(e.forward_samples)),
                h("td", { class: "num" }, formatInt(e.backward_samples)),
                h("td", { class: "num" }, formatInt(e.optimizer_steps)),
                h("td", { class: "num" }, formatInt(e.queued_rows)),
                h("td", { class: "num" }, r === undefined ? "—" : r.toFixed(1)),
                h("td", null, e.withdrawn ? "withdrawn (paused)" : e.accepting ? "serving" : "not accepting"),
              );
            }),
          ),
        ),
        expertLoads(s),
      );
    }
  };

  const renderNetwork = (s: NodeStatus) => {
    const n = s.network as NetworkStatus | undefined;
    // an older node without `network`: the reachability it does report, and no path
    const reachability = n?.reachability ?? s.reachability;
    setText(netReach, reachability);
    setText(netReachWhy, (REACH_TEXT[reachability] ?? "") + (n?.forced ? " (forced by --force-reachability)" : ""));
    netMissing.hidden = !!n;
    netEl.hidden = !n;
    if (!n) {
      setText(net.v, "unknown");
      net.v.className = "fig-value net-path";
      setText(net.why, "not reported by this node");
      return;
    }
    setText(net.v, n.path);
    net.v.className = `fig-value net-path net-${n.path}`;
    setText(net.why, n.reason);
    setText(netRtt, formatMs(n.rtt_ms));
    setText(netRttWhy, rttWhy(n));
    setText(netConns, `${formatInt(n.connections.direct)} direct, ${formatInt(n.connections.relayed)} relayed`);
    const punches = n.hole_punches;
    setText(
      netPunches,
      punches ? `${formatInt(punches.succeeded)} made direct, ${formatInt(punches.failed)} failed (since start)` : "not reported",
    );
    const relaysKey = JSON.stringify(n.relays);
    if (netRelays.dataset.key !== relaysKey) {
      netRelays.dataset.key = relaysKey;
      replace(
        netRelays,
        n.relays.length
          ? h(
              "ul",
              { class: "relays" },
              n.relays.map((r) =>
                h(
                  "li",
                  { "data-testid": "network-relay" },
                  h("code", { title: r.peer_id }, shortPeerId(r.peer_id)),
                  r.rtt_ms === null ? " (round trip not measured yet)" : ` (${formatMs(r.rtt_ms)})`,
                ),
              ),
            )
          : h("span", { class: "muted" }, n.path === "direct" ? "none (not needed: reachable directly)" : "none"),
      );
    }
    const addrsKey = JSON.stringify([n.relayed_addrs, n.observed_addrs, n.port_mapping]);
    if (netAddrs.dataset.key !== addrsKey) {
      netAddrs.dataset.key = addrsKey;
      replace(netRelayed, addrList(n.relayed_addrs));
      replace(netObserved, addrList(n.observed_addrs, "none yet"));
      replace(netMapping, n.port_mapping ? h("code", null, n.port_mapping) : h("span", { class: "muted" }, "none"));
    }
  };

  const off = store.onChange(render);
  // the "until" text counts down between statuses
  const tick = setInterval(() => {
    if (store.status) setText(untilEl, formatUntil(store.status.state, store.status.until, store.now()));
  }, 1000);
  render();
  return () => {
    off();
    clearInterval(tick);
    document.removeEventListener("click", closeOnOutside);
    for (const c of chartBoxes) c.chart?.destroy();
  };
}
