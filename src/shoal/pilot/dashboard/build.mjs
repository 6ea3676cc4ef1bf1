// build.mjs: bundle the dashboard into dist/ with esbuild: dist/index.html and
// dist/app.{js,css}, everything local (cytoscape and uPlot come from node_modules, nothing
// from a CDN). Pilot serves dist/index.html at / and dist/NAME at /static/NAME.
// Run by scripts/build_dashboard.py after `npm ci`.
//   node build.mjs           minified production build
//   node build.mjs --watch   rebuild on change (development)

import { createHash } from "node:crypto";
import { mkdir, readFile, rm, writeFile } from "node:fs/promises";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import * as esbuild from "esbuild";

const here = dirname(fileURLToPath(import.meta.url));
const dist = join(here, "dist");
const watch = process.argv.includes("--watch");

async function writeIndex() {
  const digest = createHash("sha256");
  for (const name of ["app.js", "app.css"]) digest.update(await readFile(join(dist, name)));
  const html = await readFile(join(here, "index.html"), "utf8");
  const hash = digest.digest("hex").slice(0, 12); // cache-busting: ?v=HASH on the assets
  await writeFile(join(dist, "index.html"), html.replaceAll("%HASH%", hash));
}

async function afterBuild(result) {
  if (!result.errors.length) await writeIndex();
}

const options = {
  entryPoints: { app: join(here, "src", "main.ts") },
  outdir: dist,
  bundle: true,
  format: "esm",
  target: ["es2022", "chrome110", "firefox110", "safari16"],
  minify: !watch,
  sourcemap: watch, // maps in development only: they would triple what pilot serves
  legalComments: "linked",
  logLevel: "warning",
  plugins: [{ name: "index", setup: (build) => build.onEnd(afterBuild) }],
};

await rm(dist, { recursive: true, force: true });
await mkdir(dist, { recursive: true });
if (watch) {
  const context = await esbuild.context(options);
  await context.watch();
  console.log("dashboard: watching src/ (Ctrl-C to stop)");
} else {
  await esbuild.build(options);
}
