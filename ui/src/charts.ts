// uPlot charts sized to their container, themed from CSS variables.

import uPlot from "uplot";
import "uplot/dist/uPlot.min.css";

export interface SeriesSpec {
  label: string;
  color: string;
  scale?: string;
  unit?: string;
  /** Bars instead of a line (history). */
  bars?: boolean;
}

export interface ChartSpec {
  title: string;
  series: SeriesSpec[];
  /** y range of the default scale, e.g. [0, 100] for percents. */
  range?: [number, number];
  /** Label of a second y axis on the right (scale "r"). */
  rightAxis?: string;
  leftAxis?: string;
  height?: number;
  /** x values are times (unix seconds); default true. */
  time?: boolean;
  /** The x range from the data's min and max (e.g. the last 5 minutes up to the newest point). */
  xRange?: (min: number, max: number) => [number, number];
}

function cssVar(name: string, fallback: string): string {
  try {
    const v = getComputedStyle(document.documentElement).getPropertyValue(name).trim();
    return v || fallback;
  } catch {
    return fallback;
  }
}

let drawable: boolean | null = null;
/** Whether canvas 2D works here (not in DOM emulators). */
function canDraw(): boolean {
  if (drawable === null) {
    try {
      drawable = !!document.createElement("canvas").getContext("2d");
    } catch {
      drawable = false;
    }
  }
  return drawable;
}

export interface Chart {
  setData(data: uPlot.AlignedData): void;
  destroy(): void;
}

/** Makes a chart in `container`; falls back to nothing (returns null) where canvas is missing. */
export function makeChart(container: HTMLElement, spec: ChartSpec): Chart | null {
  if (!canDraw()) return null;
  const axisColor = cssVar("--muted", "#666");
  const gridColor = cssVar("--grid", "rgba(128,128,128,0.2)");
  const fmt = (unit?: string) => (_u: uPlot, v: number | null) =>
    v === null || v === undefined ? "—" : `${Number.isInteger(v) ? v : v.toFixed(1)}${unit ? ` ${unit}` : ""}`;
  const scales: uPlot.Scales = { x: { time: spec.time !== false } };
  const xRange = spec.xRange;
  if (xRange) scales.x.range = (_u, min, max) => xRange(min, max);
  if (spec.range) scales.y = { range: spec.range };
  // tick labels stay short enough for the axis' 50 px: 20000 → "20k"
  const ticks = (_u: uPlot, splits: number[]) => splits.map(compactNumber);
  const axes: uPlot.Axis[] = [
    { stroke: axisColor, grid: { stroke: gridColor, width: 1 }, ticks: { stroke: gridColor } },
    {
      stroke: axisColor,
      grid: { stroke: gridColor, width: 1 },
      ticks: { stroke: gridColor },
      label: spec.leftAxis,
      size: 50,
      values: ticks,
    },
  ];
  if (spec.rightAxis) {
    axes.push({ scale: "r", side: 1, stroke: axisColor, grid: { show: false }, label: spec.rightAxis, size: 50, values: ticks });
  }
  const opts: uPlot.Options = {
    title: spec.title,
    width: Math.max(200, container.clientWidth || 360),
    height: spec.height ?? 160,
    scales,
    axes,
    legend: { live: true },
    cursor: { drag: { x: false, y: false } },
    series: [
      {},
      ...spec.series.map(
        (s): uPlot.Series => ({
          label: s.label,
          stroke: s.color,
          fill: s.bars ? s.color + "99" : undefined,
          width: 2,
          scale: s.scale ?? "y",
          spanGaps: false,
          value: fmt(s.unit),
          paths: s.bars && uPlot.paths.bars ? uPlot.paths.bars({ size: [0.6, 40] }) : undefined,
          points: { show: false },
        }),
      ),
    ],
  };
  let plot: uPlot;
  try {
    const empty: uPlot.AlignedData = [[], ...spec.series.map(() => [])];
    plot = new uPlot(opts, empty, container);
  } catch {
    return null;
  }
  let ro: ResizeObserver | null = null;
  if (typeof ResizeObserver !== "undefined") {
    ro = new ResizeObserver(() => {
      const w = Math.max(200, container.clientWidth);
      if (w !== plot.width) plot.setSize({ width: w, height: plot.height });
    });
    ro.observe(container);
  }
  return {
    setData(data) {
      plot.setData(data);
    },
    destroy() {
      ro?.disconnect();
      plot.destroy();
    },
  };
}

/** A tick label of at most about five characters: 950, 1.5k, 20k, 3.2M. */
export function compactNumber(v: number): string {
  const a = Math.abs(v);
  const [scaled, suffix] = a >= 1e9 ? [v / 1e9, "G"] : a >= 1e6 ? [v / 1e6, "M"] : a >= 1e3 ? [v / 1e3, "k"] : [v, ""];
  const digits = Math.abs(scaled) >= 100 || Number.isInteger(scaled) ? 0 : 1;
  return `${scaled.toFixed(digits)}${suffix}`;
}
