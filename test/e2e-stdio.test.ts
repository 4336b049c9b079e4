/**
 * End to end: the built binary spawned by SDK clients of both protocol revisions — a 2025-11-25
 * client (v1 SDK) and a 2026-07-28 client (v2 SDK) — over stdio and over Streamable HTTP (stateless,
 * the default, and --sessions), with the real engine and the bundled pack. Each connection must
 * negotiate its revision, and a `segment` call must report progress, return structuredContent and
 * write a mask PNG of the input's size that reads back as a resource.
 */

import { type ChildProcess, execFileSync, spawn } from "node:child_process";
import { existsSync } from "node:fs";
import { mkdtemp, readFile, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";
import sharp from "sharp";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { DEFAULT_PACK_NAME } from "../src/config.js";
import { segmentTool } from "../src/tools/segment.js";
import {
  type ClientOptions,
  connectClient,
  ERAS,
  type Era,
  httpTransport,
  REVISION,
  stdioTransport,
  type TestClient,
} from "./helpers/clients.js";

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

async function segmentWritesMask(client: TestClient, era: Era): Promise<void> {
  expect(client.protocolVersion()).toBe(REVISION[era]);
  const { tools } = await client.listTools();
  expect(tools.map((t) => t.name).sort()).toEqual(["describe_region", "ground", "segment"]);
  const progress: number[] = [];
  const result = await client.callTool(
    "segment",
    { image: "photo.jpg", box: [10, 5, 70, 50] },
    { onprogress: (p) => progress.push(p.progress) },
  );
  expect(result.isError, JSON.stringify(result.content)).toBeFalsy();
  const out = segmentTool.output.parse(result.structuredContent);
  expect(out.model).toBe(DEFAULT_PACK_NAME);
  const mask = out.instances[0]?.mask;
  expect(mask?.path.startsWith(path.join(dir, "out"))).toBe(true);
  const meta = await sharp(mask?.path ?? "").metadata();
  expect([meta.format, meta.width, meta.height]).toEqual(["png", 96, 60]);
  expect(progress.length).toBeGreaterThan(0);
  expect(progress).toEqual([...progress].sort((a, b) => a - b));
  // The resource link in the result, read back over MCP: the same bytes as the file.
  const link = result.content.find((c) => c.type === "resource_link");
  expect(link?.type === "resource_link" && link.uri).toBe(mask?.uri);
  const read = await client.readResource(mask?.uri ?? "");
  const content = read.contents[0];
  const blob = content && "blob" in content ? content.blob : "";
  expect(Buffer.from(blob, "base64").equals(await readFile(mask?.path ?? ""))).toBe(true);
}

async function overStdio(era: Era, options: ClientOptions = {}): Promise<void> {
  const t = stdioTransport(era, {
    command: process.execPath,
    args: [bin, "--out", "out", "--ep", "cpu", "--log-level", "warn"],
    cwd: dir,
  });
  let stderr = "";
  t.stderr?.on("data", (chunk: Buffer) => {
    stderr += chunk.toString();
  });
  const client = await connectClient(t, options);
  try {
    await segmentWritesMask(client, era);
    // anything that is not a protocol message on stdout would have surfaced here
    expect(client.errors, stderr).toEqual([]);
  } finally {
    await client.close();
  }
}

describe.each(ERAS)("built binary, %s client", (era) => {
  it(`over stdio: ${REVISION[era]}`, async () => {
    await overStdio(era);
  });

  it.each([
    ["stateless", []],
    ["sessions", ["--sessions"]],
  ])(`over Streamable HTTP (%s): ${REVISION[era]}`, async (mode, flags) => {
    const child: ChildProcess = spawn(
      process.execPath,
      [bin, "serve", "--http", "127.0.0.1:0", "--out", "out", "--ep", "cpu", "--log-level", "info", ...flags],
      { cwd: dir, stdio: ["ignore", "pipe", "pipe"] },
    );
    try {
      const url = await new Promise<string>((resolve, reject) => {
        let stderr = "";
        const timer = setTimeout(() => reject(new Error(`no URL announced; stderr: ${stderr}`)), 30_000);
        child.stderr?.on("data", (chunk: Buffer) => {
          stderr += chunk.toString();
          const m = /serving Streamable HTTP at (http:\/\/\S+) \((\w+)/.exec(stderr);
          if (m?.[1]) {
            clearTimeout(timer);
            expect(m[2]).toBe(mode);
            resolve(m[1]);
          }
        });
        child.once("exit", (code) => reject(new Error(`server exited with ${code}; stderr: ${stderr}`)));
      });
      const transport = httpTransport(era, url);
      const client = await connectClient(transport, { negotiation: "auto" });
      await segmentWritesMask(client, era);
      // 2025 with --sessions: a session to end; otherwise nothing to end (405, which the SDK accepts).
      if (era === "legacy" && mode === "sessions") expect(transport.sessionId()).toBeDefined();
      else if (era === "modern") expect(transport.sessionId()).toBeUndefined();
      await transport.terminateSession();
      await client.close();
    } finally {
      const exited = new Promise((resolve) => child.once("exit", resolve));
      child.kill("SIGTERM");
      await exited;
    }
  });
});

it("a v2 client left to negotiate (auto) over stdio probes with server/discover and gets 2026-07-28", async () => {
  await overStdio("modern", { negotiation: "auto" });
});
