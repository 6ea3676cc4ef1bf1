// main.ts: the dashboard's shell. Builds the header and navigation, maps the hash route
// to a view, and gives each view a fresh Scope that is disposed when the route changes.

import "uplot/dist/uPlot.min.css";
import "./style.css";

import { debugHandle } from "./debug";
import { h, replace } from "./dom";
import { parseHash, type Route } from "./router";
import { Scope } from "./scope";
import { mountStatus, resetStatus } from "./status";
import { proxiesView } from "./views/proxies";
import { rulesView } from "./views/rules";
import { serviceView } from "./views/service";
import { tapView } from "./views/tap";
import { topologyView } from "./views/topology";

/** A view renders into `root` and starts its work in `scope`; it returns its title. */
export type View = (root: HTMLElement, route: Route, scope: Scope) => string;

const VIEWS: Record<string, View> = {
  topology: topologyView,
  service: serviceView,
  tap: tapView,
  rules: rulesView,
  proxies: proxiesView,
};

const NAV: [string, string][] = [
  ["topology", "Topology"],
  ["tap", "Tap"],
  ["rules", "Rules"],
  ["proxies", "Proxies"],
];

function shell(): { main: HTMLElement; links: Map<string, HTMLAnchorElement> } {
  const links = new Map<string, HTMLAnchorElement>();
  const nav = h(
    "nav",
    { "aria-label": "Views" },
    h(
      "ul",
      {},
      ...NAV.map(([name, label]) => {
        const link = h("a", { href: `#/${name}` }, label);
        links.set(name, link);
        return h("li", {}, link);
      }),
    ),
  );
  const status = h("p", { class: "status", role: "status", "aria-live": "polite" });
  const main = h("main", { id: "view", tabindex: "-1" });
  // The hash is the route, so the skip link moves focus itself instead of setting it.
  const skip = (event: Event): void => {
    event.preventDefault();
    main.focus();
  };
  replace(
    document.body,
    h("a", { class: "skip", href: "#/", onclick: skip }, "Skip to content"),
    h(
      "header",
      { class: "top" },
      h(
        "a",
        { class: "brand", href: "#/topology" },
        h("span", { "aria-hidden": "true" }, "◆"),
        " Shoal",
      ),
      nav,
      status,
    ),
    main,
  );
  mountStatus(status);
  return { main, links };
}

function start(): void {
  const { main, links } = shell();
  let scope: Scope | null = null;
  const show = (): void => {
    const route = parseHash(window.location.hash);
    scope?.dispose();
    scope = new Scope();
    resetStatus();
    const view = VIEWS[route.name];
    const section = route.name === "service" ? "topology" : route.name;
    for (const [name, link] of links) {
      if (name === section) link.setAttribute("aria-current", "page");
      else link.removeAttribute("aria-current");
    }
    debugHandle().route = route.name;
    replace(main);
    const title = view
      ? view(main, route, scope)
      : (replace(main, h("h1", {}, "Not found"), h("p", {}, `No view called “${route.name}”.`)),
        "Not found");
    document.title = `${title} · Shoal`;
  };
  window.addEventListener("hashchange", show);
  show();
}

debugHandle();
start();
