// views/common.ts: pieces several views share: the time-window picker, notices, the
// tap table's columns, and lenient field access for API objects whose exact field names
// vary between pilot versions.

import type { TapRecord } from "../api";
import { h } from "../dom";
import * as fmt from "../format";

export const WINDOWS: [number, string][] = [
  [60, "1 min"],
  [300, "5 min"],
  [900, "15 min"], // pilot's embedded store keeps 15 min by default
];

export function windowPicker(current: number, onChange: (seconds: number) => void): HTMLElement {
  const select = h(
    "select",
    { id: "window", onchange: () => onChange(Number(select.value)) },
    ...WINDOWS.map(([seconds, label]) =>
      h("option", { value: seconds, selected: seconds === current }, label),
    ),
  );
  return h("div", { class: "picker" }, h("label", { for: "window" }, "Window"), select);
}

export function notice(kind: "info" | "error", ...text: (string | Node)[]): HTMLElement {
  return h("p", { class: `notice ${kind}`, role: kind === "error" ? "alert" : null }, ...text);
}

export function messageOf(error: unknown): string {
  return error instanceof Error ? error.message : String(error);
}

/** The first of `keys` that `obj` has (not null). */
export function pick(obj: Record<string, unknown>, ...keys: string[]): unknown {
  for (const key of keys) {
    const value = obj[key];
    if (value !== undefined && value !== null) return value;
  }
  return undefined;
}

export function text(value: unknown): string {
  if (value === undefined || value === null || value === "") return fmt.DASH;
  if (typeof value === "object") return JSON.stringify(value);
  return String(value);
}

export function labels(value: unknown): HTMLElement | string {
  if (!value || typeof value !== "object") return fmt.DASH;
  const entries = Object.entries(value as Record<string, unknown>);
  if (!entries.length) return fmt.DASH;
  return h(
    "span",
    { class: "labels" },
    ...entries.map(([k, v]) => h("code", { class: "label" }, `${k}=${String(v)}`)),
  );
}

export const TAP_HEADERS = [
  "Time",
  "Proxy",
  "Dir",
  "Method",
  "Authority",
  "Path",
  "Status",
  "Duration",
  "Upstream",
  "Flags",
];

export function tapCells(record: TapRecord): (Node | string)[] {
  const time = record.ts ? record.ts.replace(/^.*T/, "").replace(/Z$/, "") : fmt.DASH;
  const flags = record.response_flags && record.response_flags !== "-" ? record.response_flags : "";
  return [
    h("time", { datetime: record.ts }, time),
    text(record.proxy),
    text(record.direction),
    text(record.method ?? record.protocol),
    text(record.authority),
    h("span", { class: "path" }, text(record.path)),
    h(
      "span",
      { class: `badge ${fmt.statusClass(record.status)}` },
      record.status ? String(record.status) : "none",
    ),
    h("span", { class: "num" }, fmt.ms(record.duration_ms)),
    text(record.upstream_host ?? record.upstream_cluster),
    flags ? h("code", {}, flags) : "",
  ];
}

export function tapRow(record: TapRecord): HTMLTableRowElement {
  return h("tr", {}, ...tapCells(record).map((cell) => h("td", {}, cell)));
}
