// format.ts: how numbers read on screen (rates, percentages, durations, ages) and the
// success-rate colour bands shared by the graph, the tables and the charts.

export const DASH = "–";

export function rps(value: number | null | undefined): string {
  if (value === null || value === undefined) return DASH;
  if (value === 0) return "0";
  if (value < 0.1) return value.toFixed(3);
  if (value < 10) return value.toFixed(2);
  if (value < 1000) return value.toFixed(1);
  return Math.round(value).toLocaleString("en");
}

/** A 0..1 success rate as a percentage: 99.95% stays 99.95%, not a rounded 100%. */
export function percent(value: number | null | undefined): string {
  if (value === null || value === undefined) return DASH;
  const pct = value * 100;
  if (pct === 100 || pct === 0) return `${pct}%`;
  const digits = pct >= 99 ? 2 : 1;
  return `${Math.min(pct, 100 - 10 ** -digits).toFixed(digits)}%`;
}

export function ms(value: number | null | undefined): string {
  if (value === null || value === undefined) return DASH;
  if (value === 0) return "0 ms";
  if (value < 1) return `${value.toFixed(2)} ms`;
  if (value < 100) return `${value.toFixed(1)} ms`;
  if (value < 10_000) return `${Math.round(value)} ms`;
  return `${(value / 1000).toFixed(1)} s`;
}

export function count(value: number | null | undefined): string {
  if (value === null || value === undefined) return DASH;
  return Math.round(value).toLocaleString("en");
}

/** Seconds ago, as "4s ago" / "3m ago"; input is unix seconds. */
export function age(unixSeconds: number | null | undefined, now = Date.now() / 1000): string {
  if (unixSeconds === null || unixSeconds === undefined) return "never";
  const s = Math.max(0, now - unixSeconds);
  if (s < 1) return "just now";
  if (s < 90) return `${Math.round(s)}s ago`;
  if (s < 5400) return `${Math.round(s / 60)}m ago`;
  return `${Math.round(s / 3600)}h ago`;
}

export type Health = "good" | "warn" | "bad" | "idle";

/** The success-rate band: ≥ 99% good, ≥ 95% warn, below bad; no traffic is idle. */
export function health(successRate: number | null | undefined): Health {
  if (successRate === null || successRate === undefined) return "idle";
  if (successRate >= 0.99) return "good";
  if (successRate >= 0.95) return "warn";
  return "bad";
}

/** Colours of the bands, chosen for contrast on white and for colour-blind readers
 * (blue-green / amber / vermilion rather than green / red). Text always accompanies them. */
export const HEALTH_COLOURS: Record<Health, string> = {
  good: "#0b7a5a",
  warn: "#b26b00",
  bad: "#c8321c",
  idle: "#8a94a3",
};

export const HEALTH_LABELS: Record<Health, string> = {
  good: "healthy",
  warn: "degraded",
  bad: "failing",
  idle: "no traffic",
};

/** An HTTP status's class for styling: 2xx ok, 3xx/4xx warn, 5xx (and none) bad. */
export function statusClass(status: number | null | undefined): Health {
  if (status === null || status === undefined || status === 0) return "bad";
  if (status < 300) return "good";
  if (status < 500) return "warn";
  return "bad";
}
