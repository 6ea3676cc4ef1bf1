// views/rules.ts: the traffic rules pilot is running and the errors of the ones it
// rejected (file, resource, field and reason, from /debug/mesh), plus the push counters.
// A rejected file keeps its last valid resources in force, so both lists matter.

import { api, type DebugMesh } from "../api";
import { countRefresh } from "../debug";
import { h, replace, table } from "../dom";
import type { Route } from "../router";
import type { Scope } from "../scope";
import { notice, text } from "./common";

const REFRESH_MS = 5000;

export interface Rule {
  kind: string;
  name: string;
  namespace: string;
  file: string;
  body: unknown;
}

/** Rules out of /debug/mesh's `rules`, which may be a list of resources or an object of
 * lists by kind; each resource as Istio writes it (kind, metadata, spec) or flattened. */
export function normalizeRules(raw: unknown): Rule[] | null {
  if (raw === undefined || raw === null) return null;
  const items: [string, Record<string, unknown>][] = [];
  if (Array.isArray(raw)) {
    for (const item of raw) if (item && typeof item === "object") items.push(["", item]);
  } else if (typeof raw === "object") {
    for (const [kind, list] of Object.entries(raw as Record<string, unknown>)) {
      if (Array.isArray(list)) for (const item of list) items.push([kind, item]);
    }
  }
  return items.map(([kindKey, item]) => {
    const metadata = (item.metadata ?? {}) as Record<string, unknown>;
    return {
      kind: String(item.kind ?? kindKey ?? "?"),
      name: String(metadata.name ?? item.name ?? "?"),
      namespace: String(metadata.namespace ?? item.namespace ?? ""),
      file: String(item.file ?? item.source ?? metadata.annotations ?? ""),
      body: item.spec ?? item,
    };
  });
}

/** Whether `rule` names `service` anywhere as a host (`api`, `api.ns`, `api:80`...). */
export function mentions(rule: Rule, service: string): boolean {
  const walk = (value: unknown): boolean => {
    if (typeof value === "string") {
      return (
        value === service || value.startsWith(`${service}.`) || value.startsWith(`${service}:`)
      );
    }
    if (Array.isArray(value)) return value.some(walk);
    if (value && typeof value === "object") return Object.values(value).some(walk);
    return false;
  };
  return walk(rule.body);
}

export function ruleList(rules: Rule[]): HTMLElement {
  if (!rules.length) return h("p", { class: "empty" }, "No rules.");
  return h(
    "ul",
    { class: "rules" },
    ...rules.map((rule) =>
      h(
        "li",
        {},
        h(
          "details",
          {},
          h(
            "summary",
            {},
            h("span", { class: "kind" }, rule.kind),
            " ",
            h("strong", {}, rule.namespace ? `${rule.namespace}/${rule.name}` : rule.name),
            rule.file && rule.file !== "{}" ? h("span", { class: "file" }, ` ${rule.file}`) : null,
          ),
          h("pre", {}, JSON.stringify(rule.body, null, 2)),
        ),
      ),
    ),
  );
}

export function errorList(errors: string[]): HTMLElement {
  if (!errors.length) {
    return h("p", { class: "notice ok" }, "✓ Every rule file is valid: nothing rejected.");
  }
  return h(
    "ul",
    { class: "errors", role: "alert" },
    ...errors.map((error) => h("li", {}, h("code", {}, error))),
  );
}

export function rulesView(root: HTMLElement, _route: Route, scope: Scope): string {
  const summary = h("div", { class: "cards" });
  const errors = h("section", { "aria-labelledby": "errors-h" });
  const rules = h("section", { "aria-labelledby": "rules-h" });
  replace(
    root,
    h("div", { class: "view-head" }, h("h1", {}, "Rules")),
    h(
      "p",
      { class: "lede" },
      "Istio-style traffic rules from pilot's config directory. A file with an error is ",
      "rejected and its last valid resources stay in force, so a typo never reaches a proxy.",
    ),
    summary,
    errors,
    rules,
  );
  scope.every(REFRESH_MS, async (signal) => {
    const mesh: DebugMesh = await api.mesh(signal);
    const errorsNow = mesh.rule_errors ?? [];
    replace(
      summary,
      card("Config version", text(mesh.version)),
      card("Pushes", text(mesh.pushes)),
      card("NACKs", text(mesh.nacks), mesh.nacks ? "bad" : undefined),
      card("Rejected", String(errorsNow.length), errorsNow.length ? "bad" : "good"),
    );
    replace(
      errors,
      h("h2", { id: "errors-h" }, `Validation errors (${errorsNow.length})`),
      errorList(errorsNow),
    );
    const list = normalizeRules(mesh.rules);
    replace(
      rules,
      h("h2", { id: "rules-h" }, list ? `Rules in force (${list.length})` : "Rules in force"),
      list
        ? ruleList(list)
        : notice(
            "info",
            "This pilot's /debug/mesh does not list the rules themselves, only their errors. ",
            "The rule files are in pilot's --config-dir.",
          ),
      table(
        "Proxies and their last push",
        ["Proxy", "Peer", "In sync", "Rejected"],
        (mesh.streams ?? []).map((s) => [
          s.node,
          s.peer,
          h("span", { class: `badge ${s.in_sync ? "good" : "warn"}` }, s.in_sync ? "yes" : "no"),
          Object.keys(s.rejected ?? {}).length ? text(s.rejected) : "",
        ]),
        "No proxy is connected.",
      ),
    );
    countRefresh("rules");
  });
  return "Rules";
}

export function card(label: string, value: string, band?: string): HTMLElement {
  return h(
    "div",
    { class: `card${band ? ` ${band}` : ""}` },
    h("span", { class: "card-label" }, label),
    h("span", { class: "card-value" }, value),
  );
}
