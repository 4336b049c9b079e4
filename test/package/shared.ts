/**
 * Shared by the packaging tests (test/package): commands run as a user's shell would run them, and
 * one `segment` call over MCP on the README's example (the red star of examples/shapes-1.png).
 */

import { execFile } from "node:child_process";
import path from "node:path";
import { fileURLToPath } from "node:url";
import sharp from "sharp";
import { expect } from "vitest";
import { DEFAULT_PACK_NAME } from "../../src/config.js";
import { segmentTool } from "../../src/tools/segment.js";
import { type Era, REVISION, type TestClient } from "../helpers/clients.js";

export const repo = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "..", "..");
export const exampleImage = path.join(repo, "examples", "shapes-1.png");
/** The README's main command's box: the red star. */
export const exampleBox = [425, 92, 499, 163] as const;
export const TOOL_NAMES = ["describe_region", "ground", "segment"];

/**
 * The environment of a user's shell: this process's, less the npm_* variables that `npm test` sets
 * (they carry this repository's .npmrc, onnxruntime-node-install=skip included, into child npm runs).
 */
export function userEnv(extra: Record<string, string> = {}): NodeJS.ProcessEnv {
  const env: NodeJS.ProcessEnv = {};
  for (const [key, value] of Object.entries(process.env)) {
    if (!/^npm_/i.test(key) && key !== "ONNXRUNTIME_NODE_INSTALL") env[key] = value;
  }
  return { ...env, ...extra };
}

export interface Run {
  code: number;
  stdout: string;
  stderr: string;
  ms: number;
}

/** Run a command to the end (no time limit of its own: the test's timeout is the limit). */
export function run(
  command: string,
  args: string[],
  options: { cwd: string; env?: NodeJS.ProcessEnv },
): Promise<Run> {
  const start = performance.now();
  return new Promise((resolve) => {
    execFile(
      command,
      args,
      { cwd: options.cwd, env: options.env ?? userEnv(), maxBuffer: 64 * 1024 * 1024 },
      (error, stdout, stderr) => {
        const code = error ? (typeof error.code === "number" ? error.code : 1) : 0;
        resolve({ code, stdout, stderr, ms: performance.now() - start });
      },
    );
  });
}

/** A failed command's message: the command and the end of its output. */
export function explain(what: string, r: Run): string {
  return `${what} exited ${r.code}\nstdout: ${r.stdout.slice(-4000)}\nstderr: ${r.stderr.slice(-4000)}`;
}

/** The mask PNG is 1-bit, the input's size, and holds exactly area_px foreground pixels, most of the box. */
export async function expectStarMask(structured: unknown, outDir: string): Promise<void> {
  const out = segmentTool.output.parse(structured);
  expect(out.found).toBe(true);
  expect(out.model).toBe(DEFAULT_PACK_NAME);
  expect(out.image).toEqual({ width: 512, height: 384 });
  const instance = out.instances[0];
  expect(instance?.box).toEqual([...exampleBox]);
  const mask = instance?.mask;
  expect(mask?.path.startsWith(outDir + path.sep), `${mask?.path} is not in ${outDir}`).toBe(true);
  const { data, info } = await sharp(mask?.path ?? "")
    .greyscale()
    .raw()
    .toBuffer({ resolveWithObject: true });
  expect([info.width, info.height]).toEqual([512, 384]);
  const area = data.reduce((n, v) => n + (v > 127 ? 1 : 0), 0);
  expect(area).toBe(mask?.area_px);
  const boxArea = (exampleBox[2] - exampleBox[0]) * (exampleBox[3] - exampleBox[1]);
  // The star fills about 40% of its box (2155 px of 5254 on the reference machine).
  expect(area / boxArea).toBeGreaterThan(0.25);
  expect(area / boxArea).toBeLessThan(0.6);
}

/** Check the revision, list the tools, then segment the example's star over MCP and check the mask. */
export async function segmentOverMcp(
  client: TestClient,
  era: Era,
  outDir: string,
): Promise<{ name: string; description: string | undefined }[]> {
  expect(client.protocolVersion()).toBe(REVISION[era]);
  const { tools } = await client.listTools();
  expect(tools.map((t) => t.name).sort()).toEqual(TOOL_NAMES);
  const result = await client.callTool(
    "segment",
    { image: exampleImage, box: [...exampleBox] },
    // Model work on a busy machine: no tight limit (the SDK's default is 60 s).
    { timeout: 900_000 },
  );
  expect(result.isError, JSON.stringify(result.content)).toBeFalsy();
  await expectStarMask(result.structuredContent, outDir);
  return tools.map((t) => ({ name: t.name, description: t.description }));
}
