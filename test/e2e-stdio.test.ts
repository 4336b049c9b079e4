/**
 * End to end: the built binary spawned by an SDK client, once over stdio and once over Streamable
 * HTTP, with the real engine and the bundled tiny pack. A `segment` call must write a mask PNG of
 * the input's size.
 */

import { type ChildProcess, execFileSync, spawn } from "node:child_process";
import { existsSync } from "node:fs";
import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { Client } from "@modelcontextprotocol/sdk/client/index.js";
import { StdioClientTransport } from "@modelcontextprotocol/sdk/client/stdio.js";
import { StreamableHTTPClientTransport } from "@modelcontextprotocol/sdk/client/streamableHttp.js";
import type { CallToolResult } from "@modelcontextprotocol/sdk/types.js";
import sharp from "sharp";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { DEFAULT_PACK_NAME } from "../src/config.js";
import { segmentTool } from "../src/tools/segment.js";

const repo = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "..");
const bin = path.join(repo, "dist", "src", "cli.js");
let dir: string;

beforeAll(async () => {
  // `npm test` builds first; build here too when vitest runs on its own.
  if (!existsSync(bin))
    execFileSync("npx", ["tsc", "-p", "tsconfig.build.json"], { cwd: repo, stdio: "inherit" });
  dir = await mkdtemp(path.join(tmpdir(), "seg-e2e-"));
  await sharp({ create: { width: 96, height: 60, channels: 3, background: "#c33" } })
    .jpeg()
    .toFile(path.join(dir, "photo.jpg"));
});

afterAll(async () => {
  await rm(dir, { recursive: true, force: true });
});

async function segmentWritesMask(client: Client): Promise<void> {
  const { tools } = await client.listTools();
  expect(tools.map((t) => t.name).sort()).toEqual(["describe_region", "ground", "segment"]);
  const progress: number[] = [];
  const result = (await client.callTool(
    { name: "segment", arguments: { image: "photo.jpg", box: [10, 5, 70, 50] } },
    undefined,
    { onprogress: (p) => progress.push(p.progress) },
  )) as CallToolResult;
  expect(result.isError, JSON.stringify(result.content)).toBeFalsy();
  const out = segmentTool.output.parse(result.structuredContent);
  expect(out.model).toBe(DEFAULT_PACK_NAME);
  const mask = out.instances[0]?.mask;
  expect(mask?.path.startsWith(path.join(dir, "out"))).toBe(true);
  const meta = await sharp(mask?.path ?? "").metadata();
  expect([meta.format, meta.width, meta.height]).toEqual(["png", 96, 60]);
  expect(progress.length).toBeGreaterThan(0);
}

describe("built binary", () => {
  it("over stdio", async () => {
    const transport = new StdioClientTransport({
      command: process.execPath,
      args: [bin, "--out", "out", "--ep", "cpu", "--log-level", "warn"],
      cwd: dir,
      stderr: "pipe",
    });
    let stderr = "";
    transport.stderr?.on("data", (chunk: Buffer) => {
      stderr += chunk.toString();
    });
    const client = new Client({ name: "e2e-stdio", version: "1" });
    const protocolErrors: Error[] = [];
    client.onerror = (error) => protocolErrors.push(error);
    await client.connect(transport);
    try {
      await segmentWritesMask(client);
      // anything that is not a protocol message on stdout would have surfaced here
      expect(protocolErrors, stderr).toEqual([]);
    } finally {
      await client.close();
    }
  });

  it("over Streamable HTTP", async () => {
    const child: ChildProcess = spawn(
      process.execPath,
      [bin, "serve", "--http", "127.0.0.1:0", "--out", "out", "--ep", "cpu", "--log-level", "info"],
      { cwd: dir, stdio: ["ignore", "pipe", "pipe"] },
    );
    try {
      const url = await new Promise<string>((resolve, reject) => {
        let stderr = "";
        const timer = setTimeout(() => reject(new Error(`no URL announced; stderr: ${stderr}`)), 30_000);
        child.stderr?.on("data", (chunk: Buffer) => {
          stderr += chunk.toString();
          const m = /serving Streamable HTTP at (http:\/\/\S+)/.exec(stderr);
          if (m?.[1]) {
            clearTimeout(timer);
            resolve(m[1]);
          }
        });
        child.once("exit", (code) => reject(new Error(`server exited with ${code}; stderr: ${stderr}`)));
      });
      const client = new Client({ name: "e2e-http", version: "1" });
      const transport = new StreamableHTTPClientTransport(new URL(url));
      await client.connect(transport);
      await segmentWritesMask(client);
      await transport.terminateSession();
      await client.close();
    } finally {
      const exited = new Promise((resolve) => child.once("exit", resolve));
      child.kill("SIGTERM");
      await exited;
    }
  });
});
