import { vi } from "vitest";
import type { Api, StreamHandlers } from "../api";
import type { AppPaths, UpdateInfo } from "../types";
import { fx } from "./fixtures";

/** An `Api` answering fixtures; every method is a `vi.fn` to inspect or override. */
export function fakeApi() {
  const handlers: StreamHandlers[] = [];
  const api = {
    kind: "http" as const,
    status: vi.fn(async () => fx.status()),
    pause: vi.fn(async () => ({ ok: true as const })),
    resume: vi.fn(async () => ({ ok: true as const })),
    finish: vi.fn(async () => ({ ok: true as const })),
    cancelStart: vi.fn(async () => ({ ok: true as const })),
    snooze: vi.fn(async (_s: number) => ({ ok: true as const })),
    setMode: vi.fn(async () => ({ ok: true as const })),
    policy: vi.fn(async () => fx.policy()),
    setPolicy: vi.fn(async (p) => p),
    device: vi.fn(async () => ({ device: "auto", cuda_supported: false, note: "applies to experts joined after the change" })),
    setDevice: vi.fn(async (device: string) => ({ device, cuda_supported: false, note: "applies to experts joined after the change" })),
    experiments: vi.fn(async () => fx.experiments()),
    showExperiment: vi.fn(async () => fx.preview()),
    join: vi.fn(async () => fx.joinPlan()),
    leave: vi.fn(async () => ({ ok: true as const })),
    contributions: vi.fn(async () => fx.contributions()),
    history: vi.fn(async () => fx.history()),
    exportCsv: vi.fn(async () => "a,b\n1,2\n"),
    log: vi.fn(async () => fx.log()),
    machine: vi.fn(async () => fx.machine()),
    firstRun: vi.fn(async () => false),
    completeSetup: vi.fn(async (_start: boolean) => {}),
    // like the HTTP transport: no autostart there
    autostart: vi.fn(async (): Promise<boolean | null> => null),
    setAutostart: vi.fn(async (enabled: boolean) => enabled),
    checkUpdate: vi.fn(async (): Promise<UpdateInfo | null> => null),
    installUpdate: vi.fn(async () => false),
    paths: vi.fn(async (): Promise<AppPaths | null> => null),
    subscribe: vi.fn((h: StreamHandlers) => {
      handlers.push(h);
      return () => {};
    }),
  } satisfies Api;
  return { api, handlers };
}

/** Lets pending promises (and their DOM updates) settle. */
export async function flush(times = 5): Promise<void> {
  for (let i = 0; i < times; i++) await new Promise((r) => setTimeout(r, 0));
}

export function byTestId(root: ParentNode, id: string): HTMLElement {
  const el = root.querySelector<HTMLElement>(`[data-testid="${id}"]`);
  if (!el) throw new Error(`no [data-testid="${id}"]`);
  return el;
}
