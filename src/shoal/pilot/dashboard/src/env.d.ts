// env.d.ts: CSS files are imported for their side effect; esbuild bundles them into
// dist/static/app.css.
declare module "*.css";
