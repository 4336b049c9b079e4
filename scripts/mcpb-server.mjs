#!/usr/bin/env node
/**
 * Entry point of the MCP bundle (copied to server/index.js by scripts/bundle.mjs). The host (Claude
 * Desktop or another MCPB app) starts it as manifest.json's mcp_config says:
 *
 *   node server/index.js --out <output folder> --pack <pack folder> -- <allowed folder>...
 *
 * and it runs the server on stdio with the equivalent flags (`serve --out .. --pack ..
 * --allow-dir .. --allow-dir ..`). Hosts pass a setting the user left empty as the literal
 * `${user_config.KEY}`, and folder defaults may still hold `${HOME}`-style variables: unset settings
 * are dropped (the server's defaults apply) and the variables are expanded here.
 */

import { readFileSync } from "node:fs";
import os from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";

const UNSET = /^\$\{user_config\.[^}]*\}$/;

/** The folder variables of the MCPB spec, for defaults a host passed through unexpanded. */
function expandFolders(value) {
  const home = os.homedir();
  const folders = {
    HOME: home,
    DESKTOP: path.join(home, "Desktop"),
    DOCUMENTS: path.join(home, "Documents"),
    DOWNLOADS: path.join(home, "Downloads"),
  };
  return value.replace(/\$\{(HOME|DESKTOP|DOCUMENTS|DOWNLOADS)\}/g, (_, name) => folders[name]);
}

const isSet = (value) => value !== undefined && value.trim() !== "" && !UNSET.test(value);

/** Host arguments -> the server's own command line. */
function serverArgs(argv) {
  const split = argv.indexOf("--");
  const head = split === -1 ? argv : argv.slice(0, split);
  const folders = split === -1 ? [] : argv.slice(split + 1);
  const args = ["serve"];
  for (let i = 0; i < head.length; i++) {
    const flag = head[i];
    const value = head[i + 1];
    if (flag.startsWith("--") && value !== undefined && !value.startsWith("--")) {
      i++;
      if (isSet(value)) args.push(flag, expandFolders(value));
    } else {
      args.push(flag);
    }
  }
  for (const folder of folders) if (isSet(folder)) args.push("--allow-dir", expandFolders(folder));
  return args;
}

/** What this bundle was built for (written by scripts/bundle.mjs), to explain a native-module failure. */
function builtFor() {
  try {
    const file = fileURLToPath(new URL("./build.json", import.meta.url));
    return JSON.parse(readFileSync(file, "utf8"));
  } catch {
    return undefined;
  }
}

async function main() {
  let runCli;
  try {
    ({ runCli } = await import("../dist/src/cli.js"));
  } catch (error) {
    const build = builtFor();
    const here = `${process.platform}-${process.arch}`;
    const hint =
      build && build.platform !== here
        ? ` This bundle was built for ${build.platform}, this machine is ${here}: install the bundle built for ${here}.`
        : "";
    process.stderr.write(
      `MODEL_LOAD_FAILED: cannot load the server (a native module, sharp or onnxruntime-node, may not match this machine): ${
        error instanceof Error ? error.message : String(error)
      }.${hint}\n`,
    );
    return 1;
  }
  return runCli(serverArgs(process.argv.slice(2)), {
    stdout: (text) => process.stdout.write(text),
    stderr: (text) => process.stderr.write(text),
    cwd: process.cwd(),
    env: process.env,
  });
}

process.exitCode = await main();
