// Fixtures: real responses of a node (captured from `apiary node run` against `apiary demo`),
// shaped exactly like openapi.json (src/schema.test.ts checks that).
import contributions from "../fixtures/contributions.json";
import experiments from "../fixtures/experiments.json";
import history from "../fixtures/history.json";
import joinPlan from "../fixtures/join-plan.json";
import log from "../fixtures/log.json";
import machine from "../fixtures/machine.json";
import policy from "../fixtures/policy.json";
import preview from "../fixtures/preview.json";
import status from "../fixtures/status.json";
import type { Card, JoinPlan, LoggedEvent, MachineProfile, NodeStatus, PolicyConfig, Preview, Row, Totals } from "../types";

const clone = <T>(x: unknown): T => structuredClone(x) as T;

export const fx = {
  status: () => clone<NodeStatus>(status),
  experiments: () => clone<Card[]>(experiments),
  preview: () => clone<Preview>(preview),
  joinPlan: () => clone<JoinPlan>(joinPlan),
  policy: () => clone<PolicyConfig>(policy),
  contributions: () => clone<Totals>(contributions),
  history: () => clone<Row[]>(history),
  log: () => clone<LoggedEvent[]>(log),
  machine: () => clone<MachineProfile>(machine),
};

/** A status with a GPU whose readings are known, for chart tests. */
export function statusWithGpu(): NodeStatus {
  const s = fx.status();
  s.telemetry!.gpus = {
    known: [
      {
        index: 0,
        name: { known: "NVIDIA GeForce RTX 4070" },
        utilization: { known: 0.8 },
        other_utilization: { known: 0.3 },
        memory_total: { known: 12 * 1024 ** 3 },
        memory_used: { known: 6 * 1024 ** 3 },
        memory_ours: { known: 4 * 1024 ** 3 },
        memory_others: { known: 2 * 1024 ** 3 },
        temperature_c: { known: 71 },
        power_w: { unknown: "power readings not supported on this board" },
        fan_percent: { known: 40 },
      },
    ],
  };
  return s;
}

/** A node behind NAT, reachable through one relay (the Network card's fuller case). */
export function statusRelayed(): NodeStatus {
  const s = fx.status();
  const relay = "12D3KooWKc4dNEFWmQgtsqsFBVR5ZrnvT2uZVsYSpxzZtYf7rfPB";
  s.reachability = "private";
  s.network = {
    reachability: "private",
    forced: false,
    path: "relayed",
    reason: "Behind NAT or a firewall; reachable through a relay; hole punching made 1 direct connection",
    rtt_ms: 38.4,
    relays: [{ peer_id: relay, rtt_ms: 38.4 }],
    relayed_addrs: [`/ip4/203.0.113.7/tcp/31337/p2p/${relay}/p2p-circuit/p2p/${s.peer_id}`],
    observed_addrs: ["/ip4/198.51.100.23/tcp/54012"],
    port_mapping: null,
    connections: { direct: 2, relayed: 1 },
    hole_punches: { succeeded: 1, failed: 2 },
  };
  return s;
}
