#!/usr/bin/env node
/**
 * `npm run bundle`: the MCP bundle (.mcpb) for Claude Desktop and other MCPB hosts,
 * build/mcpb/qwen3-vl-seg-mcp-<version>-<platform>-<arch>.mcpb.
 *
 * The bundle is the npm package (`npm pack`: the built server, models/shapes, README, LICENSE), its
 * production dependencies installed from package-lock.json, a manifest.json and the entry point
 * server/index.js (scripts/mcpb-server.mjs). sharp and onnxruntime-node are native modules: the
 * bundle carries them for the platform and architecture it is built on only (onnxruntime-node's
 * binaries for the others are removed), so build one bundle per target on that target.
 *
 * Options: --out-dir DIR (default build/mcpb), --keep-stage (keep the unpacked folder).
 */

import { execFileSync } from "node:child_process";
import {
  cpSync,
  existsSync,
  mkdirSync,
  readdirSync,
  readFileSync,
  rmSync,
  statSync,
  writeFileSync,
} from "node:fs";
import path from "node:path";
import { fileURLToPath, pathToFileURL } from "node:url";
import { parseArgs } from "node:util";
import { packExtension } from "@anthropic-ai/mcpb";

const repo = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "..");
const { values } = parseArgs({
  options: { "out-dir": { type: "string" }, "keep-stage": { type: "boolean" } },
});
const outDir = path.resolve(values["out-dir"] ?? path.join(repo, "build", "mcpb"));
const pkg = JSON.parse(readFileSync(path.join(repo, "package.json"), "utf8"));
const platform = `${process.platform}-${process.arch}`;
const bundleName = `${pkg.name}-${pkg.version}-${platform}.mcpb`;
const stage = path.join(outDir, `stage-${platform}`);
const npm = process.platform === "win32" ? "npm.cmd" : "npm";
const log = (line) => console.error(`bundle: ${line}`);

function run(command, args, cwd) {
  log(`${path.relative(repo, cwd) || "."}$ ${command} ${args.join(" ")}`);
  return execFileSync(command, args, {
    cwd,
    encoding: "utf8",
    stdio: ["ignore", "pipe", "inherit"],
    shell: process.platform === "win32",
  });
}

function sizeOf(target) {
  const stat = statSync(target);
  if (!stat.isDirectory()) return stat.size;
  return readdirSync(target).reduce((sum, name) => sum + sizeOf(path.join(target, name)), 0);
}

const mb = (bytes) => `${(bytes / 1e6).toFixed(1)} MB`;

// 1. The npm package, exactly as published (prepack builds and prunes dist/).
rmSync(stage, { recursive: true, force: true });
mkdirSync(stage, { recursive: true });
const packed = JSON.parse(run(npm, ["pack", "--json", "--pack-destination", outDir], repo));
const tarball = path.join(outDir, packed[0].filename);
run("tar", ["-xzf", tarball, "-C", stage, "--strip-components=1"], repo);
rmSync(tarball);

// 2. Production dependencies from the lockfile, for this platform. No install scripts: the only one,
// onnxruntime-node's, would download CUDA binaries from outside npm (users opt in, see README: GPU).
cpSync(path.join(repo, "package-lock.json"), path.join(stage, "package-lock.json"));
run(
  npm,
  ["ci", "--omit=dev", "--ignore-scripts", "--no-audit", "--no-fund", "--prefer-offline", "--loglevel=error"],
  stage,
);
rmSync(path.join(stage, "package-lock.json"));
const ortBin = path.join(stage, "node_modules", "onnxruntime-node", "bin", "napi-v6");
for (const os of readdirSync(ortBin)) {
  for (const arch of readdirSync(path.join(ortBin, os))) {
    if (os !== process.platform || arch !== process.arch)
      rmSync(path.join(ortBin, os, arch), { recursive: true });
  }
  if (readdirSync(path.join(ortBin, os)).length === 0) rmSync(path.join(ortBin, os), { recursive: true });
}
if (!existsSync(path.join(ortBin, process.platform, process.arch))) {
  throw new Error(`onnxruntime-node ${pkg.dependencies["onnxruntime-node"]} has no binaries for ${platform}`);
}

// 3. A package.json for the runtime only (the server finds its root, and the default pack, by it).
const runtimePkg = {
  name: pkg.name,
  version: pkg.version,
  description: pkg.description,
  license: pkg.license,
  type: pkg.type,
  engines: pkg.engines,
  dependencies: pkg.dependencies,
};
writeFileSync(path.join(stage, "package.json"), `${JSON.stringify(runtimePkg, null, 2)}\n`);

// 4. Entry point, and what it was built for (it names the mismatch if a native module fails to load).
mkdirSync(path.join(stage, "server"), { recursive: true });
cpSync(path.join(repo, "scripts", "mcpb-server.mjs"), path.join(stage, "server", "index.js"));
writeFileSync(
  path.join(stage, "server", "build.json"),
  `${JSON.stringify({ platform, node: process.version }, null, 2)}\n`,
);

// 5. The manifest: scripts/mcpb-manifest.json (server command, user_config) + package.json + the tools,
// taken from the built server with the bundled pack so names and descriptions are the server's own.
const built = (file) => import(pathToFileURL(path.join(stage, "dist", "src", file)).href);
const { packTools } = await built("server.js");
const { defaultPackDir } = await built("config.js"); // the stage's own models/<default>
const tools = packTools(defaultPackDir()).map((t) => ({
  name: t.name,
  description: t.description,
}));
const template = JSON.parse(readFileSync(path.join(repo, "scripts", "mcpb-manifest.json"), "utf8"));
const manifest = {
  manifest_version: template.manifest_version,
  name: pkg.name,
  display_name: template.display_name,
  version: pkg.version,
  description: pkg.description,
  long_description: `${template.long_description} This bundle carries native modules (sharp, onnxruntime-node) built for ${platform} only.`,
  author: { name: `${pkg.name} contributors` },
  license: pkg.license,
  keywords: template.keywords,
  server: template.server,
  tools,
  tools_generated: template.tools_generated,
  compatibility: { platforms: [process.platform], runtimes: { node: pkg.engines.node } },
  user_config: template.user_config,
};
if (tools.length !== 3) throw new Error(`expected 3 tool definitions, found ${tools.length}`);
writeFileSync(path.join(stage, "manifest.json"), `${JSON.stringify(manifest, null, 2)}\n`);

// 6. Zip it (mcpb validates the manifest first and leaves out *.map, *.d.ts, .bin links, lockfiles).
const output = path.join(outDir, bundleName);
const staged = sizeOf(stage);
if (!(await packExtension({ extensionPath: stage, outputPath: output, silent: true }))) {
  throw new Error("mcpb pack failed (see above)");
}
if (!values["keep-stage"]) rmSync(stage, { recursive: true, force: true });
log(`${output}: ${mb(statSync(output).size)} (${mb(staged)} unpacked, ${platform})`);
console.log(output);
