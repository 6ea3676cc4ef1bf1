// views/tap.ts: a live tap of requests through the mesh's proxies (pilot fans the tap
// out to every proxy and merges their streams). Filters go to pilot, so only matching
// requests cross the wire; the table keeps the newest MAX_ROWS.

import { tap, type TapFilters, type TapRecord } from "../api";
import { h, replace } from "../dom";
import * as fmt from "../format";
import type { Route } from "../router";
import type { Scope } from "../scope";
import { messageOf, TAP_HEADERS, tapRow } from "./common";

const MAX_ROWS = 500;

function field(id: string, label: string, value: string, extra: Record<string, string> = {}) {
  const input = h("input", { id, name: id, value, autocomplete: "off", ...extra });
  return { input, element: h("div", { class: "field" }, h("label", { for: id }, label), input) };
}

export function tapView(root: HTMLElement, route: Route, scope: Scope): string {
  const service = field("tap-service", "Service", route.params.get("service") ?? "", {
    placeholder: "any",
  });
  const method = field("tap-method", "Method", route.params.get("method") ?? "", {
    placeholder: "any",
  });
  const prefix = field("tap-path", "Path prefix", route.params.get("path_prefix") ?? "", {
    placeholder: "any, e.g. /orders",
  });
  const max = field("tap-max", "Max requests", route.params.get("max") ?? "1000", {
    type: "number",
    min: "1",
    max: "10000",
  });
  const duration = field("tap-duration", "Seconds", route.params.get("duration") ?? "60", {
    type: "number",
    min: "1",
    max: "300",
  });
  const start = h("button", { type: "submit" }, "Start");
  const stop = h("button", { type: "button", class: "secondary", disabled: true }, "Stop");
  const clear = h("button", { type: "button", class: "secondary" }, "Clear");
  const state = h("p", { class: "tap-state", role: "status" }, "Not running.");
  const body = h("tbody");
  const counts = { shown: 0, errors: 0 };

  let running: AbortController | null = null;
  scope.onDispose(() => running?.abort());

  const form = h(
    "form",
    { class: "tap-form", "aria-label": "Tap filters" },
    service.element,
    method.element,
    prefix.element,
    max.element,
    duration.element,
    h("div", { class: "buttons" }, start, stop, clear),
  );
  const summary = (): string =>
    `${counts.shown} request${counts.shown === 1 ? "" : "s"}` +
    (counts.errors ? `, ${counts.errors} with status ≥ 500 or none` : "");

  const onRecord = (record: TapRecord): void => {
    counts.shown += 1;
    if (fmt.statusClass(record.status) === "bad") counts.errors += 1;
    body.prepend(tapRow(record));
    while (body.children.length > MAX_ROWS) body.lastElementChild?.remove();
    replace(state, `● Tapping… ${summary()}`);
  };

  form.addEventListener("submit", (event) => {
    event.preventDefault();
    running?.abort();
    const filters: TapFilters = {
      service: service.input.value.trim() || undefined,
      method: method.input.value.trim().toUpperCase() || undefined,
      path_prefix: prefix.input.value.trim() || undefined,
      max: Number(max.input.value) || undefined,
      duration: Number(duration.input.value) || undefined,
    };
    const controller = new AbortController();
    running = controller;
    start.disabled = true;
    stop.disabled = false;
    replace(state, "● Tapping… waiting for requests");
    tap(filters, onRecord, controller.signal)
      .then((dropped) => {
        const lost = dropped ? `; ${dropped} dropped (the reader fell behind)` : "";
        replace(state, `Finished: ${summary()}${lost}.`);
      })
      .catch((error: unknown) => {
        if (controller.signal.aborted) replace(state, `Stopped: ${summary()}.`);
        else replace(state, `Tap failed: ${messageOf(error)}`);
      })
      .finally(() => {
        if (running === controller) running = null;
        start.disabled = false;
        stop.disabled = true;
      });
  });
  stop.addEventListener("click", () => running?.abort());
  clear.addEventListener("click", () => {
    replace(body);
    counts.shown = counts.errors = 0;
  });

  replace(
    root,
    h("div", { class: "view-head" }, h("h1", {}, "Tap")),
    h(
      "p",
      { class: "lede" },
      "Watch requests as the proxies finish them. Pilot opens a tap on every proxy and ",
      "merges the streams; it ends after the maximum number of requests or seconds.",
    ),
    form,
    state,
    h(
      "table",
      { class: "data tap" },
      h("caption", { class: "visually-hidden" }, "Tapped requests, newest first"),
      h("thead", {}, h("tr", {}, ...TAP_HEADERS.map((name) => h("th", { scope: "col" }, name)))),
      body,
    ),
  );
  if (route.params.get("service") || route.params.get("start") === "1") form.requestSubmit();
  return "Tap";
}
