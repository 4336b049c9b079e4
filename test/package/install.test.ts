/**
 * The npm package as a user gets it: `npm pack`, then `npm install -g` of the tarball into a temporary
 * prefix with ONNXRUNTIME_NODE_INSTALL=skip (the repository's .npmrc does not travel in a tarball, and
 * onnxruntime-node's install script would otherwise download CUDA binaries from outside npm), run from
 * a folder outside the repository. The installed binary must segment the README's example from another
 * directory and serve MCP over stdio to an SDK client, started by its absolute path as the README's
 * client configs start it.
 */

import { existsSync, readdirSync } from "node:fs";
import { mkdir, mkdtemp, realpath, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import path from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { DEFAULT_PACK_NAME, PACKAGE_NAME } from "../../src/config.js";
import { connectClient, ERAS, stdioTransport } from "../helpers/clients.js";
import {
  exampleBox,
  exampleImage,
  expectStarMask,
  explain,
  repo,
  run,
  segmentOverMcp,
  userEnv,
} from "./shared.js";

interface PackResult {
  filename: string;
  size: number;
  unpackedSize: number;
  files: { path: string; size: number }[];
}

let work: string;
let tarball: string | undefined;
let prefix: string;
let installed: string;
let bin: string;
/** A folder outside the repository that the user works in. */
let elsewhere: string;

beforeAll(async () => {
  work = await realpath(await mkdtemp(path.join(tmpdir(), "seg-package-")));
  prefix = path.join(work, "prefix");
  installed = path.join(prefix, "lib", "node_modules", PACKAGE_NAME);
  bin = path.join(prefix, "bin", PACKAGE_NAME);
  elsewhere = path.join(work, "elsewhere");
  await mkdir(elsewhere);
});

afterAll(async () => {
  await rm(work, { recursive: true, force: true });
});

describe("npm package", () => {
  it("npm pack holds the built server, the default pack, README and LICENSE, and nothing test-only", async () => {
    // prepack builds and prunes dist/ first
    const r = await run("npm", ["pack", "--json", "--pack-destination", work], { cwd: repo });
    expect(r.code, explain("npm pack", r)).toBe(0);
    const [packed] = JSON.parse(r.stdout) as PackResult[];
    if (!packed) throw new Error(`npm pack printed no result: ${r.stdout}`);
    tarball = path.join(work, packed.filename);
    const files = packed.files.map((f) => f.path);
    console.log(
      `tarball ${packed.filename}: ${(packed.size / 1e6).toFixed(1)} MB packed, ${(packed.unpackedSize / 1e6).toFixed(1)} MB unpacked, ${files.length} files`,
    );
    for (const needed of [
      "package.json",
      "README.md",
      "LICENSE",
      "dist/src/cli.js",
      "dist/src/runtime/worker.js",
      `models/${DEFAULT_PACK_NAME}/pack.json`,
      `models/${DEFAULT_PACK_NAME}/decoder_model_merged.onnx`,
    ]) {
      expect(files).toContain(needed);
    }
    const unwanted = files.filter(
      (f) =>
        !/^dist\/src\/.*\.js$/.test(f) &&
        !f.startsWith(`models/${DEFAULT_PACK_NAME}/`) &&
        !["package.json", "README.md", "LICENSE", "models/README.md"].includes(f),
    );
    expect(unwanted, "only the server, the default pack and the docs").toEqual([]);
    expect(files.filter((f) => /tiny-random|^test\/|^dist\/bench\//.test(f))).toEqual([]);
  });

  it("npm install -g --prefix <tmp> <tarball> with ONNXRUNTIME_NODE_INSTALL=skip, from outside the repository", async () => {
    expect(tarball, "npm pack ran").toBeDefined();
    const r = await run(
      "npm",
      ["install", "-g", "--prefix", prefix, tarball ?? "", "--no-audit", "--no-fund", "--prefer-offline"],
      { cwd: elsewhere, env: userEnv({ ONNXRUNTIME_NODE_INSTALL: "skip" }) },
    );
    expect(r.code, explain("npm install -g", r)).toBe(0);
    expect(existsSync(bin), `${bin} exists`).toBe(true);
    expect(existsSync(path.join(installed, "models", DEFAULT_PACK_NAME, "pack.json"))).toBe(true);
    expect(existsSync(path.join(installed, "models", "tiny-random"))).toBe(false);
    // The install script skipped its download: the bundled CPU (and WebGPU) binaries only.
    const ortDir = path.join(
      installed,
      "node_modules",
      "onnxruntime-node",
      "bin",
      "napi-v6",
      process.platform,
      process.arch,
    );
    expect(readdirSync(ortDir).filter((f) => /providers_cuda/.test(f))).toEqual([]);
  });

  it("the installed binary segments the README's example from another directory", async () => {
    expect(existsSync(bin), "installed").toBe(true);
    const r = await run(bin, ["segment", exampleImage, "--box", exampleBox.join(","), "--json"], {
      cwd: elsewhere,
    });
    expect(r.code, explain("qwen3-vl-seg-mcp segment", r)).toBe(0);
    // written into ./qwen3-vl-seg-out of the working directory
    await expectStarMask(JSON.parse(r.stdout), path.join(elsewhere, "qwen3-vl-seg-out"));
  });

  it.each(ERAS)(
    "the installed binary serves MCP over stdio to a %s client (started by its absolute path)",
    async (era) => {
      expect(existsSync(bin), "installed").toBe(true);
      const out = path.join(work, `masks-${era}`);
      // As a desktop client starts it: the SDK's default environment (HOME, PATH, ...), not this shell's.
      const transport = stdioTransport(era, {
        command: bin,
        args: ["--allow-dir", path.dirname(exampleImage), "--out", out],
        cwd: elsewhere,
      });
      let stderr = "";
      transport.stderr?.on("data", (chunk: Buffer) => {
        stderr += chunk.toString();
      });
      const client = await connectClient(transport, { name: "package-test" });
      try {
        await segmentOverMcp(client, era, out);
        expect(client.errors, stderr).toEqual([]);
      } finally {
        await client.close();
      }
    },
  );
});
