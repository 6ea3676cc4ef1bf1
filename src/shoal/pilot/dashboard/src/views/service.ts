// views/service.ts: one service. Its golden metrics now (cards) and over time (rps,
// success rate, p50/p99 charts, refreshed live), who it calls and who calls it, the
// rules that route to it, its endpoints with health, and a live tap of its requests.

import {
  api,
  listOf,
  tap,
  type DebugMesh,
  type EndpointInfo,
  type GraphEdge,
  type RouteStat,
  type Series,
  type TapRecord,
} from "../api";
import { compact, TimeChart } from "../charts";
import { countRefresh } from "../debug";
import { h, replace, table } from "../dom";
import * as fmt from "../format";
import type { Route } from "../router";
import { href, serviceHref } from "../router";
import { isMissing, type Scope } from "../scope";
import { setSource } from "../status";
import { card, mentions, normalizeRules, ruleList } from "./rules";
import {
  labels,
  messageOf,
  notice,
  pick,
  TAP_HEADERS,
  tapRow,
  text,
  windowPicker,
} from "./common";

const REFRESH_MS = 3000;
const MESH_REFRESH_MS = 5000;
const TAP_ROWS = 15;

/** Set when pilot answered 404 to /api/v1/endpoints: the registry's view is shown. */
let endpointsMissing = false;

/** The series step for a window: about 60–120 points. */
export function stepFor(windowS: number): number {
  for (const step of [1, 2, 5, 10, 15, 30, 60]) if (windowS / step <= 120) return step;
  return 120;
}

export function serviceView(root: HTMLElement, route: Route, scope: Scope): string {
  const service = route.arg;
  const windowS = Number(route.params.get("window")) || 300;
  const step = stepFor(windowS);

  const cards = h("div", { class: "cards", "aria-live": "off" });
  const charts = {
    rps: new TimeChart({
      key: "rps",
      title: "Requests per second",
      lines: [{ label: "rps", colour: "#2360c4" }],
      format: fmt.rps,
      tick: compact,
    }),
    success: new TimeChart({
      key: "success",
      title: "Success rate",
      lines: [{ label: "success", colour: "#0b7a5a" }],
      format: (v) => (v === null || v === undefined ? fmt.DASH : `${+v.toFixed(2)}%`),
      tick: (v) => `${compact(v)}%`,
      range: [0, 100],
    }),
    latency: new TimeChart({
      key: "latency",
      title: "Latency",
      lines: [
        { label: "p50", colour: "#2360c4" },
        { label: "p99", colour: "#b5179e", dash: [6, 3] },
      ],
      format: fmt.ms,
      tick: (v) => (v === 0 ? "0" : `${compact(v)} ms`),
    }),
  };
  scope.onDispose(() => Object.values(charts).forEach((chart) => chart.destroy()));
  const chartNote = h("p", { class: "chart-note" });
  const connections = h("section", { "aria-labelledby": "conn-h" });
  const traffic = h("section", { "aria-labelledby": "traffic-h" });
  const routes = h("section", { "aria-labelledby": "routes-h" });
  const endpoints = h("section", { "aria-labelledby": "ep-h" });
  const tapBody = h("tbody");
  const tapState = h("span", { class: "tap-state", role: "status" });
  const pause = h(
    "button",
    { type: "button", class: "secondary", "aria-pressed": "false" },
    "Pause",
  );

  replace(
    root,
    h(
      "nav",
      { class: "crumbs", "aria-label": "Breadcrumb" },
      h("a", { href: "#/topology" }, "Topology"),
      " › ",
      h("span", { "aria-current": "page" }, service),
    ),
    h(
      "div",
      { class: "view-head" },
      h("h1", {}, service, h("span", { class: "subtle" }, " service")),
      windowPicker(windowS, (value) => {
        window.location.hash = href("service", service, { window: String(value) });
      }),
    ),
    cards,
    h(
      "section",
      { class: "charts", "aria-label": "Golden metrics over time" },
      charts.rps.element,
      charts.success.element,
      charts.latency.element,
    ),
    chartNote,
    h("div", { class: "columns" }, connections, routes),
    traffic,
    endpoints,
    h(
      "section",
      { "aria-labelledby": "tap-h" },
      h(
        "div",
        { class: "section-head" },
        h("h2", { id: "tap-h" }, "Live requests"),
        tapState,
        pause,
        h("a", { href: href("tap", "", { service }) }, "Open in Tap"),
      ),
      h(
        "table",
        { class: "data tap" },
        h("caption", { class: "visually-hidden" }, `Recent requests to ${service}`),
        h("thead", {}, h("tr", {}, ...TAP_HEADERS.map((name) => h("th", { scope: "col" }, name)))),
        tapBody,
      ),
    ),
  );

  scope.every(REFRESH_MS, async (signal) => {
    const [stat, series, edges, routeStats] = await Promise.all([
      api.stat(60, service, signal),
      api.series(service, windowS, step, signal),
      api.edges(60, signal),
      api.routes(60, service, signal),
    ]);
    if (scope.disposed) return;
    setSource(stat.source);
    const s = stat.services.find((item) => item.service === service);
    const band = fmt.health(s && s.requests > 0 ? s.success_rate : null);
    replace(
      cards,
      card("RPS (1 min)", fmt.rps(s?.rps)),
      card("Success", fmt.percent(s?.success_rate), band),
      card("p50", fmt.ms(s?.p50_ms)),
      card("p95", fmt.ms(s?.p95_ms)),
      card("p99", fmt.ms(s?.p99_ms)),
      card("Requests (1 min)", fmt.count(s?.requests)),
      card("Protocol", s?.protocol ?? fmt.DASH),
    );
    drawSeries(charts, series);
    replace(
      chartNote,
      `${series.points.length} points, one per ${step} s over the last ${windowS / 60} min; `,
      `metrics from ${stat.source}. Gaps mean no requests.`,
    );
    const incoming = edges.edges.filter((e) => e.destination === service);
    const outgoing = edges.edges.filter((e) => e.source === service);
    replace(
      connections,
      h("h2", { id: "conn-h" }, "Connections (1 min)"),
      table(
        "Called by",
        ["Caller", "RPS", "Success", "p99"],
        incoming.map((e) => edgeCells(e, e.source)),
        "No callers seen.",
      ),
      table(
        "Calls",
        ["Destination", "RPS", "Success", "p99"],
        outgoing.map((e) => edgeCells(e, e.destination)),
        "No calls seen.",
      ),
    );
    replace(
      traffic,
      h("h2", { id: "traffic-h" }, "Traffic by route (1 min)"),
      table(
        `Golden metrics of each route to ${service}, as its callers' sidecars saw them`,
        ["Route", "Virtual host", "RPS", "Success", "p50", "p99", "Requests"],
        routeStats.routes.map(routeCells),
        "No requests on this service's routes in the last minute.",
      ),
    );
    countRefresh("service");
  });

  scope.every(MESH_REFRESH_MS, async (signal) => {
    const mesh = await api.mesh(signal);
    let live: EndpointInfo[] | null = null;
    if (!endpointsMissing) {
      try {
        live = listOf<EndpointInfo>(await api.endpoints(service, signal), "endpoints");
      } catch (error) {
        if (!isMissing(error)) throw error;
        endpointsMissing = true; // this pilot has no endpoints API: don't ask again
      }
    }
    if (scope.disposed) return;
    renderRoutes(routes, service, mesh);
    renderEndpoints(endpoints, service, mesh, live);
  });

  runTap(service, scope, tapBody, tapState, pause);
  return service;
}

/** One route's golden metrics as table cells. */
function routeCells(row: RouteStat): (Node | string)[] {
  const band = fmt.health(row.requests > 0 ? row.success_rate : null);
  return [
    h("code", {}, row.route),
    row.virtual_host,
    h("span", { class: "num" }, fmt.rps(row.rps)),
    h("span", { class: `badge ${band}` }, fmt.percent(row.success_rate)),
    h("span", { class: "num" }, fmt.ms(row.p50_ms)),
    h("span", { class: "num" }, fmt.ms(row.p99_ms)),
    h("span", { class: "num" }, fmt.count(row.requests)),
  ];
}

/** One edge as table cells, named after the service at its other end. */
function edgeCells(edge: GraphEdge, peer: string): (Node | string)[] {
  const band = fmt.health(edge.rps > 0 ? edge.success_rate : null);
  return [
    h("a", { href: serviceHref(peer) }, peer),
    h("span", { class: "num" }, fmt.rps(edge.rps)),
    h("span", { class: `badge ${band}` }, fmt.percent(edge.success_rate)),
    h("span", { class: "num" }, fmt.ms(edge.p99_ms)),
  ];
}

function drawSeries(
  charts: { rps: TimeChart; success: TimeChart; latency: TimeChart },
  series: Series,
): void {
  const points = [...series.points].sort((a, b) => a.t - b.t);
  const times = points.map((p) => p.t);
  charts.rps.update(times, [points.map((p) => p.rps)]);
  charts.success.update(times, [
    points.map((p) => (p.success_rate === null ? null : p.success_rate * 100)),
  ]);
  charts.latency.update(times, [points.map((p) => p.p50_ms), points.map((p) => p.p99_ms)]);
}

function renderRoutes(box: HTMLElement, service: string, mesh: DebugMesh): void {
  const rules = normalizeRules(mesh.rules);
  const registered = mesh.services.find((s) => s.host === service);
  const ports = registered?.ports ?? [];
  const errors = (mesh.rule_errors ?? []).filter((error) => error.includes(service));
  replace(
    box,
    h("h2", { id: "routes-h" }, "Routes"),
    ports.length
      ? h(
          "p",
          {},
          "Ports: ",
          ports.map((p) => `${p.number}${p.name ? ` (${p.name})` : ""} ${p.protocol}`).join(", "),
        )
      : null,
    rules
      ? ruleList(rules.filter((rule) => mentions(rule, service)))
      : notice(
          "info",
          "Pilot's /debug/mesh does not list the rules themselves; without a VirtualService ",
          "the service's endpoints share its traffic. ",
          h("a", { href: "#/rules" }, "Rule errors"),
        ),
    errors.length
      ? h(
          "ul",
          { class: "errors", role: "alert" },
          ...errors.map((e) => h("li", {}, h("code", {}, e))),
        )
      : null,
  );
}

function renderEndpoints(
  box: HTMLElement,
  service: string,
  mesh: DebugMesh,
  live: EndpointInfo[] | null,
): void {
  if (live !== null) {
    replace(
      box,
      h("h2", { id: "ep-h" }, `Endpoints (${live.length})`),
      table(
        `Endpoints of ${service} as the proxies see them`,
        ["Address", "Proxy", "Cluster", "Health", "Ejected", "Weight", "Labels"],
        live.map((ep) => {
          const healthText = text(pick(ep, "health", "health_status", "healthy"));
          const healthy = /^(true|healthy)$/i.test(healthText);
          const ejected = Boolean(pick(ep, "ejected", "outlier_ejected"));
          return [
            h("code", {}, text(pick(ep, "address", "host"))),
            text(pick(ep, "proxy", "node")),
            text(pick(ep, "cluster")),
            h("span", { class: `badge ${healthy ? "good" : "bad"}` }, healthText),
            h("span", { class: `badge ${ejected ? "bad" : "good"}` }, ejected ? "ejected" : "no"),
            text(pick(ep, "weight")),
            labels(pick(ep, "labels")),
          ];
        }),
        "No endpoints.",
      ),
    );
    return;
  }
  const instances = mesh.services.find((s) => s.host === service)?.instances ?? [];
  replace(
    box,
    h("h2", { id: "ep-h" }, `Endpoints (${instances.length})`),
    table(
      `Endpoints of ${service} in pilot's registries`,
      ["Address", "Health", "Weight", "Locality", "Labels", "Source", "Expires in"],
      instances.map((i) => [
        h("code", {}, `${i.address}:${i.port}`),
        h(
          "span",
          { class: `badge ${i.healthy === false ? "bad" : "good"}` },
          i.healthy === false ? "unhealthy" : "healthy",
        ),
        text(i.weight),
        text(i.locality),
        labels(i.labels),
        text(i.source),
        i.expires_in === undefined || i.expires_in === null ? fmt.DASH : `${i.expires_in} s`,
      ]),
      "No endpoints registered.",
    ),
    notice(
      "info",
      "Health here is the registry's. Active health checks and outlier ejection happen in ",
      "each proxy and show on its admin /clusters page (see ",
      h("a", { href: "#/proxies" }, "Proxies"),
      ").",
    ),
  );
}

/** Keep a tap of `service` open while the page is shown (re-opened as each one ends),
 * showing the newest requests first. */
function runTap(
  service: string,
  scope: Scope,
  body: HTMLElement,
  state: HTMLElement,
  pause: HTMLButtonElement,
): void {
  let paused = false;
  let current: AbortController | null = null;
  let shown = 0;
  pause.addEventListener("click", () => {
    paused = !paused;
    pause.textContent = paused ? "Resume" : "Pause";
    pause.setAttribute("aria-pressed", String(paused));
    if (paused) current?.abort();
    else void loop();
  });
  scope.onDispose(() => current?.abort());
  const onRecord = (record: TapRecord): void => {
    if (!shown) replace(state, "● live");
    body.prepend(tapRow(record));
    while (body.children.length > TAP_ROWS) body.lastElementChild?.remove();
    shown += 1;
  };
  const loop = async (): Promise<void> => {
    while (!paused && !scope.disposed) {
      current = new AbortController(); // aborted by Pause, or by the scope's disposal
      replace(state, shown ? "● live" : "● waiting for requests…");
      try {
        await tap({ service, max: 500, duration: 30 }, onRecord, current.signal);
      } catch (error) {
        if (paused || scope.disposed) break;
        replace(state, `tap unavailable: ${messageOf(error)}`);
        await new Promise((resolve) => window.setTimeout(resolve, 10_000));
      }
    }
    if (paused) replace(state, "paused");
  };
  void loop();
}
