// views/topology.ts: the service graph. Nodes are services and workloads, edges are who
// calls whom with their rps, success rate and p99 over the chosen window, coloured by
// success rate; below it the same numbers per service as a table (the graph's
// accessible alternative). Refreshes every 3 s.

import cytoscape from "cytoscape";
import { api, type Edges, type GraphEdge, type ServiceStat, type Stat } from "../api";
import { debugHandle, countRefresh } from "../debug";
import { h, replace, table } from "../dom";
import * as fmt from "../format";
import { COLUMN, layered } from "../layout";
import type { Route } from "../router";
import { href, serviceHref } from "../router";
import type { Scope } from "../scope";
import { setSource } from "../status";
import { windowPicker } from "./common";

const REFRESH_MS = 3000;
const MESH_REFRESH_MS = 15000;
const MAX_FIT_ZOOM = 1.2;

// Cytoscape accepts only double quotes in a font list.
const FONT = 'system-ui, "DejaVu Sans", "Liberation Sans", sans-serif';

const GRAPH_STYLE: cytoscape.StylesheetJson = [
  {
    selector: "node",
    style: {
      shape: "round-rectangle",
      width: 168,
      height: 58,
      "background-color": "#ffffff",
      "border-width": 3,
      "border-color": "data(colour)",
      label: "data(label)",
      "text-wrap": "wrap",
      "text-max-width": "160px",
      "text-valign": "center",
      "text-halign": "center",
      "font-family": FONT,
      "font-size": 13,
      color: "#1d2430",
      "line-height": 1.35,
    },
  },
  { selector: 'node[kind = "workload"]', style: { shape: "ellipse" } },
  {
    selector: 'node[kind = "unknown"]',
    style: { shape: "cut-rectangle", "border-style": "dashed", color: "#4a5563" },
  },
  { selector: "node:selected", style: { "overlay-opacity": 0.08, "border-width": 5 } },
  {
    selector: "edge",
    style: {
      width: "data(width)",
      "curve-style": "bezier",
      "line-color": "data(colour)",
      "target-arrow-color": "data(colour)",
      "target-arrow-shape": "triangle",
      "arrow-scale": 1.1,
      label: "data(label)",
      "font-family": FONT,
      "font-size": 11,
      color: "#1d2430",
      "text-wrap": "wrap",
      "text-background-color": "#ffffff",
      "text-background-opacity": 0.92,
      "text-background-padding": "3px",
      "text-background-shape": "roundrectangle",
      "text-border-color": "data(colour)",
      "text-border-width": 1,
      "text-border-opacity": 1,
    },
  },
  { selector: 'edge[health = "idle"]', style: { "line-style": "dashed" } },
  // An edge that skips a column would run through the nodes in between: arc it.
  {
    selector: "edge[span > 1]",
    style: {
      "curve-style": "unbundled-bezier",
      "control-point-distances": "data(bend)",
      "control-point-weights": 0.5,
    },
  },
];

export function edgeLabel(edge: GraphEdge): string {
  const numbers = `${fmt.rps(edge.rps)} rps · ${fmt.percent(edge.success_rate)}`;
  return `${numbers}\np99 ${fmt.ms(edge.p99_ms)}`;
}

function edgeWidth(rps: number): number {
  return Math.min(9, 1.5 + Math.log10(1 + Math.max(0, rps)) * 2.5);
}

export function topologyView(root: HTMLElement, route: Route, scope: Scope): string {
  const windowS = Number(route.params.get("window")) || 60;
  const graphBox = h("div", {
    class: "graph",
    id: "graph",
    role: "img",
    "aria-label": "Service topology graph (loading)",
  });
  const empty = h("p", { class: "graph-empty", hidden: true });
  const tableBox = h("div", { class: "table-box" });
  replace(
    root,
    h(
      "div",
      { class: "view-head" },
      h("h1", {}, "Topology"),
      windowPicker(windowS, (value) => {
        window.location.hash = href("topology", "", { window: String(value) });
      }),
    ),
    h(
      "p",
      { class: "lede" },
      `Who calls whom over the last ${windowS} s. `,
      "Edge labels: requests per second, success rate, p99 latency. ",
      "Select a service for its charts, routes and endpoints.",
    ),
    h("div", { class: "graph-wrap" }, graphBox, empty, legend()),
    tableBox,
  );

  const cy = cytoscape({
    container: graphBox,
    style: GRAPH_STYLE,
    layout: { name: "preset" },
    minZoom: 0.3,
    maxZoom: 2.5,
    boxSelectionEnabled: false,
  });
  debugHandle().graph = cy;
  cy.on("tap", "node", (event) => {
    if (event.target.data("kind") !== "unknown") {
      window.location.hash = serviceHref(String(event.target.id()));
    }
  });
  cy.on("mouseover", "node", () => graphBox.classList.add("pointing"));
  cy.on("mouseout", "node", () => graphBox.classList.remove("pointing"));
  const resize = new ResizeObserver(() => {
    cy.resize();
    fit(cy);
  });
  resize.observe(graphBox);
  scope.onDispose(() => {
    resize.disconnect();
    if (debugHandle().graph === cy) debugHandle().graph = null;
    cy.destroy();
  });

  let registry: string[] = [];
  scope.every(MESH_REFRESH_MS, async (signal) => {
    const mesh = await api.mesh(signal);
    registry = mesh.services.map((service) => service.host);
  });

  let shape = "";
  scope.every(REFRESH_MS, async (signal) => {
    const [stat, edges] = await Promise.all([
      api.stat(windowS, undefined, signal),
      api.edges(windowS, signal),
    ]);
    if (scope.disposed) return;
    setSource(stat.source);
    const changed = updateGraph(cy, stat, edges, registry, shape);
    if (changed !== null) {
      shape = changed;
      fit(cy);
    }
    const nodes = cy.nodes().length;
    graphBox.setAttribute(
      "aria-label",
      `Service topology: ${nodes} nodes (${cy
        .nodes()
        .map((n) => n.id())
        .join(", ")}), ${cy.edges().length} connections. The table below has the same numbers.`,
    );
    empty.hidden = nodes > 0;
    replace(
      empty,
      "No services yet. They appear when sidecars connect to pilot or instances register; ",
      "edges appear once traffic flows through the sidecars.",
    );
    replace(tableBox, servicesTable(stat, edges));
    countRefresh("topology");
  });
  return "Topology";
}

/** Fit the graph in its box, but no larger than 1.2×: a two-node mesh should not fill
 * the screen with giant boxes. */
function fit(cy: cytoscape.Core): void {
  cy.fit(undefined, 40);
  if (cy.zoom() > MAX_FIT_ZOOM) {
    cy.zoom(MAX_FIT_ZOOM);
    cy.center();
  }
}

/** Bring the graph in line with the latest numbers; returns the new node/edge set's
 * signature when it changed (the caller then re-fits), null when only numbers changed. */
function updateGraph(
  cy: cytoscape.Core,
  stat: Stat,
  edges: Edges,
  registry: string[],
  previous: string,
): string | null {
  const stats = new Map(stat.services.map((s) => [s.service, s]));
  const kinds = new Map<string, string>();
  for (const id of registry) kinds.set(id, "service");
  for (const s of stat.services) kinds.set(s.service, "service");
  for (const node of edges.nodes) kinds.set(node.id, node.kind);
  for (const edge of edges.edges) {
    if (!kinds.has(edge.source)) kinds.set(edge.source, "unknown");
    if (!kinds.has(edge.destination)) kinds.set(edge.destination, "unknown");
  }
  const ids = [...kinds.keys()].sort();
  const edgeIds = edges.edges.map((e) => `${e.source}->${e.destination}`).sort();
  const signature = JSON.stringify([ids, edgeIds]);

  cy.batch(() => {
    const wantedEdges = new Set(edgeIds);
    cy.edges().forEach((e) => {
      if (!wantedEdges.has(e.id())) cy.remove(e);
    });
    cy.nodes().forEach((n) => {
      if (!kinds.has(n.id())) cy.remove(n);
    });
    for (const id of ids) {
      const s = stats.get(id);
      const health = fmt.health(s?.success_rate);
      const numbers =
        s && s.requests > 0 ? `\n${fmt.rps(s.rps)} rps · ${fmt.percent(s.success_rate)}` : "";
      const name = kinds.get(id) === "unknown" ? `${id}\n(outside the mesh)` : id;
      const data = {
        id,
        kind: kinds.get(id),
        health,
        colour: fmt.HEALTH_COLOURS[health],
        label: `${name}${numbers}`,
      };
      const node = cy.getElementById(id);
      if (node.nonempty()) node.data(data);
      else cy.add({ group: "nodes", data });
    }
    for (const edge of edges.edges) {
      const health = fmt.health(edge.rps > 0 ? edge.success_rate : null);
      const data = {
        id: `${edge.source}->${edge.destination}`,
        source: edge.source,
        target: edge.destination,
        health,
        colour: fmt.HEALTH_COLOURS[health],
        width: edgeWidth(edge.rps),
        label: edgeLabel(edge),
        rps: edge.rps,
        success_rate: edge.success_rate,
        p99_ms: edge.p99_ms,
      };
      const existing = cy.getElementById(data.id);
      if (existing.nonempty()) existing.data(data);
      else cy.add({ group: "edges", data });
    }
  });
  if (signature === previous) return null;
  const positions = layered(
    ids,
    edges.edges.map((e) => [e.source, e.destination]),
  );
  cy.nodes().forEach((node) => {
    const place = positions.get(node.id());
    if (place) node.position(place);
  });
  cy.edges().forEach((edge) => {
    const from = positions.get(edge.source().id());
    const to = positions.get(edge.target().id());
    const span = from && to ? Math.round(Math.abs(to.x - from.x) / COLUMN) : 1;
    // Bend away from the row the skipped nodes sit in, more for longer jumps.
    const side = from && to && to.y > from.y ? 1 : -1;
    edge.data({ span, bend: side * Math.min(60 + 40 * span, 220) });
  });
  return signature;
}

function legend(): HTMLElement {
  const bands: fmt.Health[] = ["good", "warn", "bad", "idle"];
  const ranges: Record<fmt.Health, string> = {
    good: "≥ 99% success",
    warn: "95–99%",
    bad: "< 95%",
    idle: "no traffic",
  };
  return h(
    "ul",
    { class: "legend", "aria-label": "Colour legend" },
    ...bands.map((band) =>
      h(
        "li",
        {},
        h("span", { class: `swatch ${band}`, "aria-hidden": "true" }),
        ranges[band],
      ),
    ),
    h("li", {}, h("span", { class: "shape rect", "aria-hidden": "true" }), "service"),
    h("li", {}, h("span", { class: "shape ellipse", "aria-hidden": "true" }), "workload"),
    h("li", {}, h("span", { class: "shape unknown", "aria-hidden": "true" }), "outside the mesh"),
  );
}

function servicesTable(stat: Stat, edges: Edges): HTMLTableElement {
  const rows = [...stat.services]
    .sort((a, b) => a.service.localeCompare(b.service))
    .map((s: ServiceStat) => {
      const band = fmt.health(s.requests > 0 ? s.success_rate : null);
      const callers = edges.edges.filter((e) => e.destination === s.service).map((e) => e.source);
      return [
        h("a", { href: serviceHref(s.service) }, s.service),
        s.protocol ?? fmt.DASH,
        h("span", { class: "num" }, fmt.rps(s.rps)),
        h("span", { class: `badge ${band}` }, fmt.percent(s.success_rate)),
        h("span", { class: "num" }, fmt.ms(s.p50_ms)),
        h("span", { class: "num" }, fmt.ms(s.p95_ms)),
        h("span", { class: "num" }, fmt.ms(s.p99_ms)),
        h("span", { class: "num" }, fmt.count(s.requests)),
        callers.length ? callers.sort().join(", ") : fmt.DASH,
      ];
    });
  return table(
    `Services, last ${stat.window_s} s (metrics from ${stat.source})`,
    ["Service", "Protocol", "RPS", "Success", "p50", "p95", "p99", "Requests", "Called by"],
    rows,
    "No service has reported metrics yet.",
  );
}
