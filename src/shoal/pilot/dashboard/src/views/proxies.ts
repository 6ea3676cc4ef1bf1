// views/proxies.ts: the proxies connected to pilot: their service and labels, admin
// address, when pilot last scraped their metrics, and whether they have taken the latest
// xDS push (from /debug/mesh's streams).

import { api, listOf, type ProxyInfo, type StreamStatus } from "../api";
import { countRefresh } from "../debug";
import { h, replace, table } from "../dom";
import * as fmt from "../format";
import type { Route } from "../router";
import { serviceHref } from "../router";
import type { Scope } from "../scope";
import { labels, pick, text } from "./common";

const REFRESH_MS = 5000;

/** A timestamp as unix seconds: numbers pass, ISO strings are parsed. */
function unixSeconds(value: unknown): number | null {
  if (typeof value === "number") return value > 1e12 ? value / 1000 : value;
  if (typeof value === "string") {
    const parsed = Date.parse(value);
    return Number.isNaN(parsed) ? null : parsed / 1000;
  }
  return null;
}

export function proxiesView(root: HTMLElement, _route: Route, scope: Scope): string {
  const box = h("div", { class: "table-box" });
  replace(
    root,
    h("div", { class: "view-head" }, h("h1", {}, "Proxies")),
    h(
      "p",
      { class: "lede" },
      "Sidecars connected to pilot over xDS. Their admin pages (stats, clusters with ",
      "endpoint health and ejections) are on their admin addresses.",
    ),
    box,
  );
  scope.every(REFRESH_MS, async (signal) => {
    const [answer, mesh] = await Promise.all([api.proxies(signal), api.mesh(signal)]);
    if (scope.disposed) return;
    const proxies = listOf<ProxyInfo>(answer, "proxies");
    const streams = new Map<string, StreamStatus>((mesh.streams ?? []).map((s) => [s.node, s]));
    const rows = proxies.map((proxy) => {
      const node = text(pick(proxy, "node_id", "node", "id"));
      const service = pick(proxy, "service");
      const stream = streams.get(node);
      const scraped = unixSeconds(pick(proxy, "last_scrape", "last_scrape_at", "scraped_at"));
      const scrapeError = pick(proxy, "scrape_error", "last_error", "error");
      const admin = text(pick(proxy, "admin_address", "admin"));
      return [
        h("strong", {}, node),
        typeof service === "string" && service
          ? h("a", { href: serviceHref(service.replace(/:\d+$/, "")) }, service)
          : fmt.DASH,
        labels(pick(proxy, "labels")),
        h("code", {}, admin),
        scrapeError
          ? h("span", { class: "badge bad" }, `failed: ${text(scrapeError)}`)
          : h("span", { class: scraped ? "" : "subtle" }, fmt.age(scraped)),
        stream
          ? h(
              "span",
              { class: `badge ${stream.in_sync ? "good" : "warn"}` },
              stream.in_sync ? "in sync" : "behind",
            )
          : h("span", { class: "subtle" }, "not on xDS"),
        stream && Object.keys(stream.rejected ?? {}).length ? text(stream.rejected) : "",
      ];
    });
    const info = (answer ?? {}) as Record<string, unknown>;
    const store =
      typeof info.series === "number"
        ? `Metrics: pilot's embedded store, ${fmt.count(info.series)} series ` +
          `(at most ${fmt.count(Number(info.max_series))}, ` +
          `${fmt.count(Number(info.series_dropped))} dropped).`
        : typeof info.source === "string"
          ? `Metrics: ${info.source}.`
          : "";
    replace(
      box,
      store ? h("p", { class: "chart-note" }, store) : null,
      table(
        `${proxies.length} connected prox${proxies.length === 1 ? "y" : "ies"}`,
        ["Node", "Service", "Labels", "Admin", "Last scrape", "xDS", "Rejected config"],
        rows,
        "No proxy is connected to this pilot.",
      ),
    );
    countRefresh("proxies");
  });
  return "Proxies";
}
