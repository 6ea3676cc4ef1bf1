// api.ts: pilot's JSON API as the dashboard uses it (same origin, all GETs), with the
// shapes it expects. Errors carry the HTTP status so views can tell "pilot is down" from
// "this pilot has no such endpoint".

export interface ServiceStat {
  service: string;
  success_rate: number | null;
  rps: number;
  p50_ms: number | null;
  p95_ms: number | null;
  p99_ms: number | null;
  requests: number;
  protocol: string | null;
}

export interface Stat {
  window_s: number;
  source: "embedded" | "prometheus" | string;
  services: ServiceStat[];
}

/** One route's golden metrics (`/api/v1/stat?by=route`), from the callers' sidecars. */
export interface RouteStat {
  service: string;
  route: string;
  virtual_host: string;
  success_rate: number | null;
  rps: number;
  p50_ms: number | null;
  p95_ms: number | null;
  p99_ms: number | null;
  requests: number;
}

export interface RouteStats {
  window_s: number;
  source: string;
  routes: RouteStat[];
}

export interface GraphNode {
  id: string;
  kind: "service" | "workload" | "unknown" | string;
}

export interface GraphEdge {
  source: string;
  destination: string;
  rps: number;
  success_rate: number | null;
  p99_ms: number | null;
}

export interface Edges {
  nodes: GraphNode[];
  edges: GraphEdge[];
}

export interface SeriesPoint {
  t: number; // unix seconds
  rps: number | null;
  success_rate: number | null;
  p50_ms: number | null;
  p99_ms: number | null;
}

export interface Series {
  service: string;
  points: SeriesPoint[];
}

/** One connected proxy. Pilot's field names are read leniently (see `proxyFields`). */
export type ProxyInfo = Record<string, unknown>;

export interface Instance {
  address: string;
  port: number;
  service_port?: number;
  labels: Record<string, string>;
  weight?: number;
  locality?: string;
  healthy?: boolean;
  source?: string;
  id?: string;
  ttl?: number | null;
  expires_in?: number | null;
}

export interface RegistryService {
  host: string;
  ports: { number: number; name: string; protocol: string }[];
  resolution: string | null;
  source: string | null;
  instances: Instance[];
}

export interface StreamStatus {
  node: string;
  peer: string;
  variant: string;
  in_sync: boolean;
  rejected: Record<string, string>;
}

/** `/debug/mesh`. `rules` is optional: older pilots list only the errors. */
export interface DebugMesh {
  version: number;
  pushes: number;
  nacks: number;
  clients: string[];
  streams: StreamStatus[];
  rule_errors: string[];
  services: RegistryService[];
  rules?: unknown;
}

/** One endpoint as a proxy sees it (`/api/v1/endpoints`, when pilot has it). */
export type EndpointInfo = Record<string, unknown>;

/** One request from `/api/v1/tap` (a proxy's access-log record). */
export interface TapRecord {
  ts: string;
  proxy?: string;
  listener?: string;
  direction?: string;
  protocol?: string;
  method?: string | null;
  authority?: string | null;
  path?: string | null;
  status?: number | null;
  duration_ms?: number;
  upstream_cluster?: string | null;
  upstream_host?: string | null;
  response_flags?: string;
  [key: string]: unknown;
}

export class ApiError extends Error {
  constructor(
    readonly status: number,
    readonly path: string,
    message: string,
  ) {
    super(message);
  }
}

function query(params: Record<string, string | number | undefined>): string {
  const search = new URLSearchParams();
  for (const [key, value] of Object.entries(params)) {
    if (value !== undefined && value !== "") search.set(key, String(value));
  }
  const text = search.toString();
  return text ? `?${text}` : "";
}

export async function getJson<T>(path: string, signal?: AbortSignal): Promise<T> {
  let response: Response;
  try {
    response = await fetch(path, { signal, headers: { accept: "application/json" } });
  } catch (error) {
    if (signal?.aborted) throw error;
    throw new ApiError(0, path, `pilot did not answer (${String(error)})`);
  }
  if (!response.ok) {
    let message = `${response.status} ${response.statusText}`;
    try {
      const body = (await response.json()) as { error?: string };
      if (body.error) message = `${response.status}: ${body.error}`;
    } catch {
      // not JSON: keep the status line
    }
    throw new ApiError(response.status, path, message);
  }
  return (await response.json()) as T;
}

export const api = {
  stat: (windowS: number, service?: string, signal?: AbortSignal) =>
    getJson<Stat>(`/api/v1/stat${query({ window: `${windowS}s`, service })}`, signal),
  routes: (windowS: number, service: string, signal?: AbortSignal) =>
    getJson<RouteStats>(
      `/api/v1/stat${query({ window: `${windowS}s`, service, by: "route" })}`,
      signal,
    ),
  edges: (windowS: number, signal?: AbortSignal) =>
    getJson<Edges>(`/api/v1/edges${query({ window: `${windowS}s` })}`, signal),
  series: (service: string, windowS: number, stepS: number, signal?: AbortSignal) =>
    getJson<Series>(
      `/api/v1/series${query({ service, window: `${windowS}s`, step: `${stepS}s` })}`,
      signal,
    ),
  proxies: (signal?: AbortSignal) => getJson<unknown>(`/api/v1/proxies`, signal),
  endpoints: (service: string, signal?: AbortSignal) =>
    getJson<unknown>(`/api/v1/endpoints${query({ service })}`, signal),
  mesh: (signal?: AbortSignal) => getJson<DebugMesh>(`/debug/mesh`, signal),
};

/** A list out of an answer that is either the list or an object holding it under `key`. */
export function listOf<T>(answer: unknown, key: string): T[] {
  if (Array.isArray(answer)) return answer as T[];
  if (answer && typeof answer === "object") {
    const inner = (answer as Record<string, unknown>)[key];
    if (Array.isArray(inner)) return inner as T[];
  }
  return [];
}

export interface TapFilters {
  service?: string;
  method?: string;
  path_prefix?: string;
  authority?: string;
  max?: number;
  duration?: number;
}

/** Stream `/api/v1/tap` (ndjson): `onRecord` for each request, then the resolved value is
 * the `dropped` count of the closing line (null when the stream ended without one). Abort
 * `signal` to stop early. */
export async function tap(
  filters: TapFilters,
  onRecord: (record: TapRecord) => void,
  signal: AbortSignal,
): Promise<number | null> {
  const path = `/api/v1/tap${query({ ...filters })}`;
  const response = await fetch(path, { signal });
  if (!response.ok || !response.body) {
    let message = `${response.status} ${response.statusText}`;
    try {
      const text = await response.text();
      const body = JSON.parse(text) as { error?: string };
      if (body.error) message = `${response.status}: ${body.error}`;
    } catch {
      // keep the status line
    }
    throw new ApiError(response.status, path, message);
  }
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let pending = "";
  let dropped: number | null = null;
  const take = (line: string): void => {
    if (!line.trim()) return;
    let value: unknown;
    try {
      value = JSON.parse(line);
    } catch {
      return; // a torn line from an aborted stream
    }
    if (!value || typeof value !== "object") return;
    const record = value as Record<string, unknown>;
    if ("dropped" in record && !("ts" in record)) {
      dropped = Number(record.dropped) || 0;
    } else if (!("error" in record && !("ts" in record))) {
      onRecord(record as TapRecord);
    }
  };
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    pending += value;
    const lines = pending.split("\n");
    pending = lines.pop() ?? "";
    lines.forEach(take);
  }
  take(pending);
  return dropped;
}
