// Builds the visualizer into the Python package (parrot/server/ui_static),
// so `pip install parrot-serve` ships it and needs no Node.
// Usage: npm run build   (or: npm run watch)
import * as esbuild from "esbuild";
import { copyFileSync, mkdirSync } from "node:fs";

const out = "../parrot/server/ui_static";
mkdirSync(out, { recursive: true });

const options = {
  entryPoints: [{ in: "src/main.js", out: "app" }, { in: "src/app.css", out: "app" }],
  outdir: out,
  bundle: true,
  minify: true,
  format: "iife",
  target: ["es2020"],
  legalComments: "eof",
  logLevel: "info",
};

copyFileSync("src/index.html", `${out}/index.html`);
if (process.argv.includes("--watch")) {
  const ctx = await esbuild.context(options);
  await ctx.watch();
} else {
  await esbuild.build(options);
}
