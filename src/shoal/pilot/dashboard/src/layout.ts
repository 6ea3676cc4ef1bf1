// layout.ts: a left-to-right layered layout for the topology, so callers sit left of
// what they call and the picture stays put between refreshes (the same nodes always get
// the same places). Cycles are broken where the depth-first walk finds them.

export interface Placed {
  x: number;
  y: number;
}

export const COLUMN = 300;
export const ROW = 110;

/** Positions for `nodes` given directed `edges` ([source, destination]). A node's column
 * is the longest path to it from a node nobody calls; nodes with no edges at all stack
 * in a column of their own at the right. Within a column nodes are ordered to cross few
 * edges (see `untangle`) and centred on y = 0. */
export function layered(nodes: string[], edges: [string, string][]): Map<string, Placed> {
  const out = new Map<string, string[]>();
  const incoming = new Map<string, number>();
  const linked = new Set<string>();
  for (const id of nodes) {
    out.set(id, []);
    incoming.set(id, 0);
  }
  for (const [source, destination] of edges) {
    if (!out.has(source) || !out.has(destination) || source === destination) continue;
    out.get(source)?.push(destination);
    incoming.set(destination, (incoming.get(destination) ?? 0) + 1);
    linked.add(source).add(destination);
  }
  // Drop the edges that close a cycle (found as edges back to a node on the DFS stack).
  const state = new Map<string, "open" | "done">();
  const forward = new Map<string, string[]>();
  const visit = (id: string): void => {
    state.set(id, "open");
    const kept: string[] = [];
    for (const next of [...(out.get(id) ?? [])].sort()) {
      if (state.get(next) === "open") continue;
      kept.push(next);
      if (!state.has(next)) visit(next);
    }
    forward.set(id, kept);
    state.set(id, "done");
  };
  const sorted = [...nodes].sort();
  for (const id of sorted.filter((n) => (incoming.get(n) ?? 0) === 0)) visit(id);
  for (const id of sorted) if (!state.has(id)) visit(id);
  // Longest-path depth over the acyclic rest, in topological order.
  const depth = new Map<string, number>(sorted.map((id) => [id, 0]));
  const order: string[] = [];
  const seen = new Set<string>();
  const topo = (id: string): void => {
    seen.add(id);
    for (const next of forward.get(id) ?? []) if (!seen.has(next)) topo(next);
    order.push(id);
  };
  for (const id of sorted) if (!seen.has(id)) topo(id);
  for (const id of order.reverse()) {
    for (const next of forward.get(id) ?? []) {
      depth.set(next, Math.max(depth.get(next) ?? 0, (depth.get(id) ?? 0) + 1));
    }
  }
  const maxDepth = Math.max(0, ...[...linked].map((id) => depth.get(id) ?? 0));
  const columns = new Map<number, string[]>();
  for (const id of sorted) {
    const column = linked.has(id) ? (depth.get(id) ?? 0) : linked.size ? maxDepth + 1 : 0;
    columns.set(column, [...(columns.get(column) ?? []), id]);
  }
  untangle(columns, edges);
  const placed = new Map<string, Placed>();
  for (const [column, ids] of columns) {
    ids.forEach((id, i) => {
      placed.set(id, { x: column * COLUMN, y: (i - (ids.length - 1) / 2) * ROW });
    });
  }
  return placed;
}

/** Reorder each column by the barycentre heuristic: a node moves towards the mean row of
 * its neighbours in the column before (sweeping right), then in the column after
 * (sweeping left), which removes most crossings in graphs of this size. Ties keep the
 * name order, so the result is deterministic. */
function untangle(columns: Map<number, string[]>, edges: [string, string][]): void {
  const keys = [...columns.keys()].sort((a, b) => a - b);
  const row = new Map<string, number>();
  const column = new Map<string, number>();
  const number = (): void => {
    for (const key of keys) {
      (columns.get(key) ?? []).forEach((id, i, ids) => {
        row.set(id, i - (ids.length - 1) / 2);
        column.set(id, key);
      });
    }
  };
  const neighbours = (id: string, side: -1 | 1): number[] => {
    const here = column.get(id) ?? 0;
    const found: number[] = [];
    for (const [source, destination] of edges) {
      const other = source === id ? destination : destination === id ? source : null;
      if (other === null || !column.has(other)) continue;
      if (Math.sign((column.get(other) ?? 0) - here) === side) found.push(row.get(other) ?? 0);
    }
    return found;
  };
  const reorder = (key: number, side: -1 | 1): void => {
    const ids = columns.get(key) ?? [];
    const weight = new Map(
      ids.map((id) => {
        const rows = neighbours(id, side);
        const mean = rows.length ? rows.reduce((a, b) => a + b, 0) / rows.length : row.get(id) ?? 0;
        return [id, mean];
      }),
    );
    ids.sort((a, b) => (weight.get(a) ?? 0) - (weight.get(b) ?? 0) || a.localeCompare(b));
    number();
  };
  number();
  for (let pass = 0; pass < 2; pass++) {
    for (const key of keys.slice(1)) reorder(key, -1);
    for (const key of keys.slice(0, -1).reverse()) reorder(key, 1);
  }
}
