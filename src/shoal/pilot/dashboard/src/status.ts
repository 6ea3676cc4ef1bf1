// status.ts: the connection indicator in the header: when data last arrived, from which
// metrics source, and the last error when pilot stops answering.

import { ApiError } from "./api";
import { replace } from "./dom";

let element: HTMLElement | null = null;
let lastOk = 0;
let source = "";
let failing: string | null = null;

export function mountStatus(el: HTMLElement): void {
  element = el;
  window.setInterval(render, 1000);
  render();
}

/** A new view: nothing has arrived for it yet (views that don't poll show nothing). */
export function resetStatus(): void {
  lastOk = 0;
  failing = null;
  render();
}

export function setSource(value: string): void {
  source = value;
  render();
}

export function reportOk(): void {
  lastOk = Date.now();
  failing = null;
  render();
}

export function reportError(error: unknown): void {
  failing = error instanceof ApiError || error instanceof Error ? error.message : String(error);
  console.warn("dashboard:", error);
  render();
}

function render(): void {
  if (!element) return;
  element.classList.toggle("failing", failing !== null);
  if (failing !== null) {
    replace(element, `⚠ ${failing}`);
    return;
  }
  if (!lastOk) {
    replace(element);
    return;
  }
  const seconds = Math.round((Date.now() - lastOk) / 1000);
  const metrics = source ? `metrics: ${source} · ` : "";
  replace(element, `${metrics}updated ${seconds < 2 ? "just now" : `${seconds}s ago`}`);
}
