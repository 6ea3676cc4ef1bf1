// router.ts: hash routing. `#/service/api?window=300` is the route
// {name: "service", arg: "api", params: window=300}; an empty hash is the topology.

export interface Route {
  name: string;
  arg: string;
  params: URLSearchParams;
}

export function parseHash(hash: string): Route {
  const text = hash.replace(/^#\/?/, "");
  const [path, search = ""] = text.split("?", 2);
  const [name = "", ...rest] = path.split("/");
  return {
    name: name || "topology",
    arg: decodeURIComponent(rest.join("/")),
    params: new URLSearchParams(search),
  };
}

export function href(name: string, arg = "", params: Record<string, string> = {}): string {
  const search = new URLSearchParams(params).toString();
  return `#/${name}${arg ? `/${encodeURIComponent(arg)}` : ""}${search ? `?${search}` : ""}`;
}

export function serviceHref(service: string): string {
  return href("service", service);
}
