import { beforeEach, describe, expect, it } from "vitest";
import { Store } from "../store";
import { byTestId, fakeApi, flush } from "../test/fake-api";
import { fx, statusRelayed, statusWithGpu } from "../test/fixtures";
import type { NetworkPath } from "../types";
import { mountOverview } from "./overview";

function setup() {
  const { api } = fakeApi();
  const store = new Store();
  const root = document.createElement("div");
  document.body.replaceChildren(root);
  const stop = mountOverview(root, { api, store, charts: false });
  return { api, store, root, stop };
}

describe("Overview", () => {
  beforeEach(() => document.body.replaceChildren());

  it("shows the state word, the reason and the figures from a status", async () => {
    const { store, root } = setup();
    const s = fx.status();
    s.experiments[0].forward_samples = 1234;
    s.experiments[0].backward_samples = 1000;
    s.telemetry!.system.cpu_percent = { known: 37.6 };
    store.setStatus(s);
    expect(byTestId(root, "state").textContent).toBe("running");
    expect(byTestId(root, "reason").textContent).toBe(s.reason);
    expect(byTestId(root, "forward-samples").textContent).toBe("1234");
    expect(byTestId(root, "cpu-percent").textContent).toBe("38");
    expect(byTestId(root, "peers").textContent).toBe(String(s.peers));
    expect(byTestId(root, "reachability").textContent).toBe(s.reachability);
    expect(byTestId(root, "pause-button").hidden).toBe(false);
    expect(byTestId(root, "resume-button").hidden).toBe(true);
    // the state line is announced
    expect(byTestId(root, "state").closest("[aria-live]")).not.toBeNull();
    // hosted experiments with their load
    const row = byTestId(root, `hosted-${s.experiments[0].id}`);
    expect(row.textContent).toContain(s.experiments[0].title);
    expect(row.textContent).toContain("1,234");
  });

  it("shows unknown readings with their reason, never 0", async () => {
    const { store, root } = setup();
    const s = fx.status();
    s.telemetry!.system.cpu_percent = { unknown: "sysinfo not ready" };
    store.setStatus(s);
    expect(byTestId(root, "cpu-percent").textContent).toBe("unknown");
    expect(root.textContent).toContain("sysinfo not ready");
    expect(byTestId(root, "gpu").textContent).toBe("unknown");
    expect(root.textContent).toContain("no NVIDIA driver");
  });

  it("shows GPU readings when known", () => {
    const { store, root } = setup();
    store.setStatus(statusWithGpu());
    expect(byTestId(root, "gpu").textContent).toBe("80 %");
    expect(root.textContent).toContain("71 °C");
    expect(root.textContent).toContain("power readings not supported");
  });

  it("offers Resume when paused, with the until text, and calls the API", async () => {
    const { api, store, root } = setup();
    const s = fx.status();
    s.state = "paused";
    s.reason = "Snoozed by you";
    s.until = store.now() + 12 * 60 + 5;
    store.setStatus(s);
    expect(byTestId(root, "state").textContent).toBe("paused");
    expect(byTestId(root, "until").textContent).toBe("resumes in 12 min");
    expect(byTestId(root, "resume-button").hidden).toBe(false);
    expect(byTestId(root, "pause-button").hidden).toBe(true);
    byTestId(root, "resume-button").click();
    await flush();
    expect(api.resume).toHaveBeenCalledOnce();
    expect(api.status).toHaveBeenCalled();
    // the fresh status (running) flips the buttons back
    expect(byTestId(root, "state").textContent).toBe("running");
  });

  it("offers to call off a start because you are away, and only then", async () => {
    const { api, store, root } = setup();
    store.setStatus(fx.status());
    expect(byTestId(root, "cancel-start-button").hidden).toBe(true);
    const s = fx.status();
    s.state = "paused";
    s.reason = "Starting in 10 s because you are away";
    s.until = store.now() + 10;
    s.directive = { kind: "paused", cause: "starting_soon", reason: s.reason, until: s.until };
    store.setStatus(s);
    expect(byTestId(root, "reason").textContent).toBe("Starting in 10 s because you are away");
    const cancel = byTestId(root, "cancel-start-button");
    expect(cancel.hidden).toBe(false);
    expect(byTestId(root, "resume-button").hidden).toBe(false);
    cancel.click();
    await flush();
    expect(api.cancelStart).toHaveBeenCalledOnce();
    // another pause (by you) offers no such button
    s.directive = { kind: "paused", cause: "user", reason: "Paused by you", until: null };
    store.setStatus(s);
    expect(byTestId(root, "cancel-start-button").hidden).toBe(true);
  });

  it("pauses, snoozes and sets the mode", async () => {
    const { api, store, root } = setup();
    store.setStatus(fx.status());
    await flush();
    byTestId(root, "pause-button").click();
    await flush();
    expect(api.pause).toHaveBeenCalledOnce();
    byTestId(root, "snooze-1").click();
    await flush();
    expect(api.snooze).toHaveBeenCalledWith(3600);
    const sel = byTestId(root, "mode-select") as HTMLSelectElement;
    expect(sel.value).toBe("balanced"); // from GET /api/policy
    sel.value = "quiet";
    sel.dispatchEvent(new Event("change"));
    await flush();
    expect(api.setMode).toHaveBeenCalledWith("quiet");
  });

  it("shows an error from the API inline", async () => {
    const { api, store, root } = setup();
    store.setStatus(fx.status());
    api.finish.mockRejectedValueOnce({ code: "stopped", message: "the node has stopped" });
    byTestId(root, "finish-button").click();
    await flush();
    const alert = root.querySelector('[role="alert"]')!;
    expect(alert.textContent).toContain("the node has stopped");
  });

  it("derives rows/s between statuses", () => {
    const { store, root } = setup();
    const a = fx.status();
    a.telemetry!.taken_at = 1000;
    store.setStatus(a);
    const b = fx.status();
    b.telemetry!.taken_at = 1002;
    b.experiments[0].forward_samples = 300;
    b.experiments[0].backward_samples = 100;
    store.setStatus(b);
    expect(byTestId(root, "rows-per-s").textContent).toBe("200.0");
    expect(store.buffer.length).toBe(2);
  });
});

describe("Overview: load per expert", () => {
  beforeEach(() => document.body.replaceChildren());

  it("shows a row per hosted expert with requests/s and a busy bar", () => {
    const { store, root } = setup();
    const s = fx.status();
    const [a, b] = s.experiments[0].experts;
    a.requests_per_s = 6.54;
    a.busy_fraction = 0.42;
    a.forward_rows = 51200;
    b.busy_fraction = 1.7; // out of range: clamped
    store.setStatus(s);
    for (const x of s.experiments[0].experts) expect(byTestId(root, `expert-load-${x.uid}`)).toBeTruthy();
    const row = byTestId(root, `expert-load-${a.uid}`);
    expect(byTestId(root, `expert-rps-${a.uid}`).textContent).toBe("6.5");
    expect(row.textContent).toContain("42 %");
    expect(row.textContent).toContain("51,200");
    const bar = row.querySelector<HTMLElement>("[role=meter]")!;
    expect(bar.getAttribute("aria-valuenow")).toBe("42");
    expect((bar.firstChild as HTMLElement).style.width).toBe("42%");
    const other = byTestId(root, `expert-load-${b.uid}`).querySelector<HTMLElement>("[role=meter]")!;
    expect(other.getAttribute("aria-valuenow")).toBe("100");
    // the next status updates the row
    const next = fx.status();
    next.experiments[0].experts[0].requests_per_s = 0;
    next.experiments[0].experts[0].busy_fraction = 0;
    store.setStatus(next);
    expect(byTestId(root, `expert-rps-${a.uid}`).textContent).toBe("0.0");
    expect(byTestId(root, `expert-load-${a.uid}`).textContent).toContain("0 %");
  });

  it("shows no expert rows when nothing is joined, and tolerates a node without per-expert load", () => {
    const { store, root } = setup();
    const s = fx.status();
    const old = s.experiments[0] as unknown as Record<string, unknown>;
    delete old.experts;
    store.setStatus(s);
    expect(root.querySelector("[data-testid^=expert-load-]")).toBeNull();
    expect(byTestId(root, `hosted-${s.experiments[0].id}`)).toBeTruthy();
    const none = fx.status();
    none.experiments = [];
    store.setStatus(none);
    expect(root.querySelector("[data-testid^=expert-load-]")).toBeNull();
  });
});

describe("Overview: network", () => {
  beforeEach(() => document.body.replaceChildren());

  it("shows each path as a coloured word with its reason", () => {
    const { store, root } = setup();
    const cases: [NetworkPath, string][] = [
      ["checking", "Checking whether peers can dial this node (AutoNAT asks connected peers)"],
      ["direct", "Peers dialed this node back at /ip4/198.51.100.23/tcp/31337"],
      ["relayed", "Behind NAT or a firewall; reachable through a relay"],
      ["unreachable", "Behind NAT or a firewall; looking for a relay (none holds a reservation yet)"],
      ["offline", "No peer is connected: the network is down or no bootstrap peer answers; retrying"],
    ];
    for (const [path, reason] of cases) {
      const s = fx.status();
      s.network.path = path;
      s.network.reason = reason;
      store.setStatus(s);
      const word = byTestId(root, "network-path");
      expect(word.textContent).toBe(path);
      expect(word.classList.contains(`net-${path}`)).toBe(true);
      // only the current path's class
      expect([...word.classList].filter((c) => c.startsWith("net-") && c !== "net-path")).toEqual([`net-${path}`]);
      expect(byTestId(root, "network-reason").textContent).toBe(reason);
    }
  });

  it("formats the round trip, and shows — when it was not measured", () => {
    const { store, root } = setup();
    const s = fx.status();
    s.network.path = "direct";
    s.network.rtt_ms = 23.6;
    store.setStatus(s);
    expect(byTestId(root, "network-rtt").textContent).toBe("24 ms");
    expect(byTestId(root, "network").textContent).toContain("median ping to connected peers");
    s.network.rtt_ms = 0.42;
    store.setStatus(s);
    expect(byTestId(root, "network-rtt").textContent).toBe("0.4 ms");
    s.network.rtt_ms = null;
    store.setStatus(s);
    expect(byTestId(root, "network-rtt").textContent).toBe("—");
    expect(byTestId(root, "network").textContent).toContain("not measured yet");
    const r = statusRelayed();
    store.setStatus(r);
    expect(byTestId(root, "network-rtt").textContent).toBe("38 ms");
    expect(byTestId(root, "network").textContent).toContain("to the relay");
  });

  it("lists the relays by short peer id, with the full id and round trip", () => {
    const { store, root } = setup();
    store.setStatus(fx.status());
    expect(root.querySelector("[data-testid=network-relay]")).toBeNull();
    expect(byTestId(root, "network-relays").textContent).toBe("none");
    const s = statusRelayed();
    const second = "12D3KooWPjceQrSwdWXPyLLeABRXmuqt69Rg3sBYbU1Nft9HyQ6X";
    s.network.relays.push({ peer_id: second, rtt_ms: null });
    store.setStatus(s);
    const items = root.querySelectorAll<HTMLElement>("[data-testid=network-relay]");
    expect(items.length).toBe(2);
    const first = s.network.relays[0].peer_id;
    expect(items[0].textContent).toBe(`12D3KooW…f7rfPB (38 ms)`);
    expect(items[0].querySelector("code")!.title).toBe(first);
    expect(items[1].textContent).toContain("12D3KooW…9HyQ6X");
    expect(items[1].textContent).toContain("not measured yet");
    expect(byTestId(root, "network-connections").textContent).toBe("2 direct, 1 relayed");
    expect(byTestId(root, "network-hole-punches").textContent).toBe("1 made direct, 2 failed (since start)");
    // a direct node needs none
    const d = fx.status();
    d.network.path = "direct";
    store.setStatus(d);
    expect(byTestId(root, "network-relays").textContent).toContain("not needed");
  });

  it("shows the relayed and observed addresses and the port mapping in a disclosure that stays open", () => {
    const { store, root } = setup();
    const s = statusRelayed();
    store.setStatus(s);
    const details = byTestId(root, "network-addresses") as HTMLDetailsElement;
    expect(details.tagName).toBe("DETAILS");
    expect(byTestId(root, "network-relayed-addrs").textContent).toBe(s.network.relayed_addrs[0]);
    expect(byTestId(root, "network-observed-addrs").textContent).toBe("/ip4/198.51.100.23/tcp/54012");
    expect(byTestId(root, "network-port-mapping").textContent).toBe("none");
    details.open = true;
    const next = statusRelayed();
    next.network.port_mapping = "/ip4/198.51.100.23/tcp/31337";
    next.network.relayed_addrs = [];
    store.setStatus(next);
    expect(details.isConnected).toBe(true);
    expect(details.open).toBe(true);
    expect(byTestId(root, "network-port-mapping").textContent).toBe("/ip4/198.51.100.23/tcp/31337");
    expect(byTestId(root, "network-relayed-addrs").textContent).toBe("none");
  });

  it("keeps the reachability word, says when it is forced, and tolerates a node without `network`", () => {
    const { store, root } = setup();
    const s = fx.status();
    s.reachability = "public";
    s.network.reachability = "public";
    s.network.forced = true;
    s.network.path = "direct";
    store.setStatus(s);
    expect(byTestId(root, "reachability").textContent).toBe("public");
    expect(byTestId(root, "network").textContent).toContain("forced by --force-reachability");
    const old = fx.status() as unknown as Record<string, unknown>;
    delete old.network;
    store.setStatus(old as unknown as ReturnType<typeof fx.status>);
    expect(byTestId(root, "network-path").textContent).toBe("unknown");
    expect(byTestId(root, "network-reason").textContent).toBe("not reported by this node");
    expect(byTestId(root, "reachability").textContent).toBe("unknown");
  });
});
