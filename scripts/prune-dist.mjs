#!/usr/bin/env node
/**
 * Remove build outputs whose TypeScript source is gone (tsc never deletes them), so `npm pack` and
 * `npm run bundle` ship only what `src/` compiles to. Runs as part of `prepack`, after the build;
 * it deletes files only, never the folder, so a test run reading dist/ at the same time is not hurt.
 */

import { existsSync, readdirSync, rmSync } from "node:fs";
import path from "node:path";
import { fileURLToPath } from "node:url";

const repo = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "..");
const dist = path.join(repo, "dist");
const OUTPUT = /(\.d\.ts\.map|\.d\.ts|\.js\.map|\.js)$/;

function walk(dir) {
  for (const entry of readdirSync(dir, { withFileTypes: true })) {
    const file = path.join(dir, entry.name);
    if (entry.isDirectory()) {
      walk(file);
      continue;
    }
    const rel = path.relative(dist, file);
    if (!OUTPUT.test(rel)) continue;
    const source = path.join(repo, rel.replace(OUTPUT, ".ts"));
    if (!existsSync(source)) {
      rmSync(file);
      console.error(`prune-dist: removed stale ${path.relative(repo, file)}`);
    }
  }
}

if (existsSync(dist)) walk(dist);
