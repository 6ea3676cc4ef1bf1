// debug.ts: `window.shoal`, a handle on the live dashboard for tests and for poking at
// it from the browser console: the cytoscape graph, the uPlot charts, the current route
// and how many refreshes each view has applied.

import type { Core } from "cytoscape";
import type uPlot from "uplot";

export interface DebugHandle {
  graph: Core | null;
  charts: Record<string, uPlot>;
  route: string;
  refreshes: Record<string, number>;
}

declare global {
  interface Window {
    shoal: DebugHandle;
  }
}

export function debugHandle(): DebugHandle {
  if (!window.shoal) window.shoal = { graph: null, charts: {}, route: "", refreshes: {} };
  return window.shoal;
}

export function countRefresh(view: string): void {
  const refreshes = debugHandle().refreshes;
  refreshes[view] = (refreshes[view] ?? 0) + 1;
}
