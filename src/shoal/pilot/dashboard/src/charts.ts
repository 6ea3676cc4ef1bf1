// charts.ts: a live time-series chart on uPlot: fixed series, data replaced on each
// refresh, width following its container. Every chart is also listed in
// `window.shoal.charts` under its key, so tests (and curious users) can read its data.

import uPlot from "uplot";
import { h } from "./dom";
import { debugHandle } from "./debug";

export interface Line {
  label: string;
  colour: string;
  dash?: number[];
}

export interface ChartOptions {
  key: string; // name in window.shoal.charts
  title: string;
  lines: Line[];
  format: (value: number | null | undefined) => string;
  /** Axis ticks: short, e.g. "40 ms" rather than "40.0 ms". */
  tick: (value: number) => string;
  /** Fixed y range (success rate: 0..100); default: from zero to the data's max. */
  range?: [number, number];
  height?: number;
}

/** A tick's time of day, 24-hour, with seconds when ticks are less than a minute apart. */
function clock(unixSeconds: number, spacingS: number): string {
  const date = new Date(unixSeconds * 1000);
  const pad = (n: number): string => String(n).padStart(2, "0");
  const hm = `${pad(date.getHours())}:${pad(date.getMinutes())}`;
  return spacingS < 60 ? `${hm}:${pad(date.getSeconds())}` : hm;
}

/** A compact tick number: 0, 2.5, 40, 1.2k. */
export function compact(value: number): string {
  if (value === 0) return "0";
  if (Math.abs(value) >= 1000) return `${+(value / 1000).toFixed(1)}k`;
  return String(+value.toPrecision(3));
}

export class TimeChart {
  readonly element: HTMLElement;
  private readonly plot: uPlot;
  private readonly resize: ResizeObserver;
  private readonly summary: HTMLElement;

  constructor(private readonly options: ChartOptions) {
    const body = h("div", { class: "chart-body" });
    this.summary = h("p", { class: "visually-hidden", "aria-live": "off" });
    this.element = h(
      "figure",
      { class: "chart", "data-chart": options.key },
      h("figcaption", {}, options.title),
      body,
      this.summary,
    );
    const format = options.format;
    const opts: uPlot.Options = {
      width: 600,
      height: options.height ?? 180,
      cursor: { drag: { x: false, y: false } },
      legend: { live: true },
      scales: {
        x: { time: true },
        y: {
          range: options.range
            ? () => options.range as [number, number]
            : (_u, _min, max) => [0, max > 0 ? max * 1.15 : 1],
        },
      },
      axes: [
        {
          stroke: "#4a5563",
          grid: { stroke: "#e7eaef" },
          ticks: { stroke: "#d5dae1" },
          space: 64, // px between time ticks: "12:04:30" needs room
          values: (_u, splits, _axis, _space, incr) => splits.map((t) => clock(t, incr)),
        },
        {
          stroke: "#4a5563",
          grid: { stroke: "#e7eaef" },
          ticks: { stroke: "#d5dae1" },
          size: 60,
          values: (_u, splits) => splits.map((v) => options.tick(v)),
        },
      ],
      series: [
        { label: "time", value: (_u, t) => (t === null ? "–" : clock(t, 1)) },
        ...options.lines.map((line) => ({
          label: line.label,
          stroke: line.colour,
          width: 2,
          dash: line.dash,
          spanGaps: false,
          points: { show: false },
          value: (_u: uPlot, v: number | null) => format(v),
        })),
      ],
    };
    this.plot = new uPlot(opts, [[], ...options.lines.map(() => [])], body);
    this.resize = new ResizeObserver(() => {
      const width = Math.floor(body.clientWidth);
      if (width > 0 && width !== this.plot.width) {
        this.plot.setSize({ width, height: options.height ?? 180 });
      }
    });
    this.resize.observe(body);
    debugHandle().charts[options.key] = this.plot;
  }

  /** Replace the data: `times` in unix seconds, one array per line. */
  update(times: number[], values: (number | null)[][]): void {
    this.plot.setData([times, ...values] as uPlot.AlignedData);
    const last = times.length - 1;
    this.summary.textContent =
      last < 0
        ? `${this.options.title}: no data yet`
        : `${this.options.title}, latest: ` +
          this.options.lines
            .map((line, i) => `${line.label} ${this.options.format(values[i][last])}`)
            .join(", ");
  }

  destroy(): void {
    this.resize.disconnect();
    this.plot.destroy();
    const charts = debugHandle().charts;
    if (charts[this.options.key] === this.plot) delete charts[this.options.key];
  }
}
