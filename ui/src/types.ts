// TypeScript types for the node's local API, written from crates/node/openapi.json
// (components.schemas). Names follow the schema names. Keep them in step with that file:
// src/schema.test.ts validates the fixtures (real responses) against it.

/** A value read from the system, or why it could not be. */
export type Reading<T> = { known: T } | { unknown: string };

export type RunState = "running" | "throttled" | "draining" | "paused";
export type Mode = "quiet" | "balanced" | "max" | "only_when_away";
export const MODES: readonly Mode[] = ["quiet", "balanced", "max", "only_when_away"];
export type Reachability = "unknown" | "public" | "private";
/** How others reach the node now (`NetworkStatus.path`). */
export type NetworkPath = "checking" | "direct" | "relayed" | "unreachable" | "offline";
export const NETWORK_PATHS: readonly NetworkPath[] = ["checking", "direct", "relayed", "unreachable", "offline"];
export type PauseCause =
  | "starting"
  | "user"
  | "snoozed"
  | "finished"
  | "in_use"
  | "idle_unknown"
  | "fullscreen"
  | "other_gpu_use"
  | "on_battery"
  | "low_battery"
  | "schedule"
  | "starting_soon"
  | "start_cancelled";

export type Directive =
  | { kind: "run"; level: number; reason: string; until: number | null }
  | { kind: "pace"; duty: number; reason: string; until: number | null }
  | { kind: "drain"; reason: string; until: number | null }
  | { kind: "paused"; cause: PauseCause; reason: string; until: number | null };

export interface HostedStatus {
  id: string;
  title: string;
  publisher: string | null;
  uids: string[];
  forward_samples: number;
  backward_samples: number;
  optimizer_steps: number;
  queued_rows: number;
  accepting: boolean;
  withdrawn: boolean;
  /** Each hosted expert's counters and load, in the order of `uids`. */
  experts: ExpertLoad[];
}

/** One hosted expert's work and load; the rates cover the last status period (about a second). */
export interface ExpertLoad {
  uid: string;
  forward_rows: number;
  backward_rows: number;
  optimizer_steps: number;
  queued_rows: number;
  /** Share of the last period spent computing, 0–1. */
  busy_fraction: number;
  /** Forward + backward batches per second over the last period. */
  requests_per_s: number;
}

/** Where experts compute (`GET/PUT /api/device`): `auto`, `cpu` or `cuda:N` (N = index in `MachineProfile.gpus`). */
/** A newer release the desktop app's update feed offers (`check_update`). */
export interface UpdateInfo {
  version: string;
  current_version: string;
  notes: string | null;
  date: string | null;
}

/** Where the desktop app keeps its settings, data and logs (`paths`). */
export interface AppPaths {
  config_file: string;
  data_dir: string;
  log_dir: string | null;
}

export interface DeviceSetting {
  device: string;
  /** Whether this build can compute on CUDA GPUs (else only `auto` = the CPU, and `cpu`). */
  cuda_supported: boolean;
  /** When a change takes effect, in words. */
  note: string;
}

export interface ActivitySample {
  idle_s: Reading<number>;
  locked: Reading<boolean>;
  fullscreen: Reading<boolean>;
  inhibited: Reading<boolean>;
}

export interface GpuSample {
  index: number;
  name: Reading<string>;
  /** 0..1 */
  utilization: Reading<number>;
  /** 0..1 */
  other_utilization: Reading<number>;
  memory_total: Reading<number>;
  memory_used: Reading<number>;
  memory_ours: Reading<number>;
  memory_others: Reading<number>;
  temperature_c: Reading<number>;
  power_w: Reading<number>;
  fan_percent: Reading<number>;
}

export interface PowerSample {
  on_ac: Reading<boolean>;
  battery_percent: Reading<number>;
}

export interface SystemSample {
  cpu_percent: Reading<number>;
  memory_used: Reading<number>;
  memory_total: Reading<number>;
  load_1m: Reading<number>;
}

export interface Sample {
  taken_at: number;
  activity: ActivitySample;
  gpus: Reading<GpuSample[]>;
  power: PowerSample;
  system: SystemSample;
  in_flight: Reading<number>;
}

/** A relay the node holds a circuit reservation on. */
export interface RelayStatus {
  peer_id: string;
  /** Round trip to it, ms; null: not measured yet. */
  rtt_ms: number | null;
}

/** The node's network path (`NodeStatus.network`): how others reach it, why, and what it measured. */
export interface NetworkStatus {
  reachability: Reachability;
  /** Whether `reachability` was set by `--force-reachability` rather than found by AutoNAT. */
  forced: boolean;
  path: NetworkPath;
  /** Why, in words for people. */
  reason: string;
  /** To the relay when relayed, else the median ping to connected peers; null: not measured yet. */
  rtt_ms: number | null;
  relays: RelayStatus[];
  /** `/…/p2p/<relay>/p2p-circuit/p2p/<this node>` */
  relayed_addrs: string[];
  /** Its addresses as peers see them. */
  observed_addrs: string[];
  /** The external address a UPnP mapping gave, or null. */
  port_mapping: string | null;
  connections: { direct: number; relayed: number };
  /** Hole punching (DCUtR) since start: relayed connections made direct, failed tries. */
  hole_punches: { succeeded: number; failed: number };
}

export interface NodeStatus {
  state: RunState;
  reason: string;
  until: number | null;
  directive: Directive;
  /** The mode in effect (the settings' `policy.mode`). */
  mode: Mode;
  experiments: HostedStatus[];
  peer_id: string;
  maddrs: string[];
  peers: number;
  reachability: Reachability;
  network: NetworkStatus;
  telemetry: Sample | null;
}

/** What the node emits (tagged by `event`). */
export type NodeEvent =
  | { event: "joined"; id: string; uids: string[] }
  | { event: "left"; id: string; reason: string }
  | { event: "paused"; reason: string }
  | { event: "resumed"; reason: string }
  | { event: "error"; message: string }
  | { event: "notice"; message: string };
export type EventKind = NodeEvent["event"];
export const EVENT_KINDS: readonly EventKind[] = ["joined", "left", "paused", "resumed", "error", "notice"];

/** A `NodeEvent` with `at` (unix seconds), as `/api/log` keeps it. */
export type LoggedEvent = NodeEvent & { at: number };

/** One text frame of `/api/events`. */
export type EventsFrame =
  | ({ type: "status" } & NodeStatus)
  | ({ type: "event" } & NodeEvent)
  | { type: "lagged"; missed: number };

export interface Ok {
  ok: true;
}

export interface ScheduleWindow {
  days: ("mon" | "tue" | "wed" | "thu" | "fri" | "sat" | "sun")[];
  /** minutes after local midnight, 0..=1440 */
  start_minute: number;
  end_minute: number;
}

export interface Schedule {
  utc_offset_minutes: number;
  windows: ScheduleWindow[];
}

export interface PolicyConfig {
  mode: Mode;
  idle_threshold_s: number;
  in_use_level: number;
  away_level: number;
  quiet_in_use_level: number;
  quiet_away_level: number;
  manual_in_use_level: number;
  gpu_other_threshold: number;
  pause_on_fullscreen: boolean;
  pause_on_battery: boolean;
  min_battery_percent: number;
  temperature_target_c: number;
  cooldown_s: number;
  finish_timeout_s: number;
  away_start_delay_s: number;
  schedule: Schedule | null;
}

export type ExperimentStatus = "recruiting" | "training" | "finished";
export type Placement = "cpu" | { gpu: { index: number } };

export interface StatusRecord {
  experiment: string;
  volunteers: number;
  experts_covered: number;
  grid_experts: number;
  samples_per_s: number;
  loss?: number;
  step: number;
  updated_at: number;
}

export interface Fit {
  level: "fits" | "tight" | "does_not_fit";
  placement: Placement | null;
  per_expert_mb: number;
  budget_mb: number;
  max_experts: number;
  reasons: string[];
}

export interface Need {
  grid_experts: number;
  covered: number;
  uncovered_share: number;
  min_replicas: number;
  mean_replicas: number;
  score: number;
  label: "high" | "moderate" | "low";
}

export interface OptimizerSpec {
  name: string;
  lr: number;
  betas?: number[];
  eps?: number;
  weight_decay?: number;
  momentum?: number;
  dampening?: number;
  nesterov?: boolean;
}

export interface ExpertSpec {
  kind: string;
  hidden_dim: number;
  max_batch_size: number;
  optimizer: OptimizerSpec;
  schedule: { name: string; warmup_steps?: number; training_steps?: number };
  clip_grad_norm?: number;
  dtype: string;
  init_seed: number;
}

export interface Requirements {
  min_ram_mb_per_expert: number;
  min_vram_mb_per_expert: number;
  bandwidth_mbps: number;
  disk_mb: number;
}

export interface Manifest {
  schema_version: number;
  id: string;
  title: string;
  summary: string;
  description: string;
  homepage?: string;
  created: number;
  expires: number;
  status: ExperimentStatus;
  uid_prefix: string;
  grid: number[];
  bootstrap_peers: string[];
  trainer_status_url?: string;
  publisher: { name: string; public_key: string };
  expert: ExpertSpec;
  requirements: Requirements;
}

export interface Card {
  id: string;
  source: "bundled" | "dht";
  publisher: string;
  fingerprint: string | null;
  status: ExperimentStatus;
  volunteers: number;
  covered: number;
  live: StatusRecord | null;
  fit: Fit;
  need: Need;
  manifest: Manifest;
}

export interface JoinPlan {
  experiment: string;
  uids: string[];
  placement: Placement;
  per_expert_mb: number;
  total_mb: number;
  budget_mb: number;
  expected_share: number;
  explanation: string[];
}

export interface Preview {
  card: Card;
  plan: JoinPlan | null;
  why_not: string | null;
}

export interface JoinOptions {
  maxExperts?: number | null;
  publisher?: string | null;
}

/** A GPU experts can compute on (`GpuProfile`). */
export interface GpuProfile {
  name: string;
  vram_total_mb: number;
  vram_free_mb: number;
}

/** This computer as the catalog's hardware fit sees it (`GET /api/machine`, `MachineProfile`). */
export interface MachineProfile {
  /** A name for people (`this computer`). */
  name: string;
  /** Logical CPU cores. */
  cpu_cores: number;
  ram_total_mb: number;
  ram_available_mb: number;
  /** Free space on the disk of the data folder, MiB. */
  disk_free_mb: number;
  /** Mbit/s; null: not measured. */
  bandwidth_mbps: number | null;
  /** The GPUs NVML finds, in index order: `gpus[i]` is the device setting `cuda:i` (empty without an NVIDIA driver). */
  gpus: GpuProfile[];
}

export interface Counters {
  forward_calls: number;
  backward_calls: number;
  forward_samples: number;
  backward_samples: number;
  optimizer_steps: number;
  cpu_seconds: number;
  gpu_seconds: number;
  flops: number;
  bytes_in: number;
  bytes_out: number;
  errors: number;
}

export interface Totals {
  counters: Counters;
  uptime_seconds: number;
  energy_kwh: number;
  measured_energy_kwh: number;
  cost: number | null;
  currency: string;
}

export interface Row {
  start: number;
  experiment: string | null;
  counters: Counters;
  uptime_seconds: number;
  energy_kwh: number;
  measured_energy_kwh: number;
  cost: number | null;
}

export type Bucket = "hour" | "day";

/** The ledger filter (query parameters of /api/contributions, /api/history, /api/export.csv). */
export interface Filter {
  experiment?: string;
  uid?: string;
  /** unix seconds, inclusive */
  from?: number;
  /** unix seconds */
  to?: number;
}

export type ErrorCode =
  | "bad_request"
  | "websocket_required"
  | "unauthorized"
  | "forbidden"
  | "not_found"
  | "method_not_allowed"
  | "already_joined"
  | "not_joined"
  | "ambiguous_publisher"
  | "too_large"
  | "cannot_plan"
  | "bad_manifest"
  | "stopped"
  | "busy"
  | "internal";
