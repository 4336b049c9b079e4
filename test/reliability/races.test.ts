/**
 * Swap races against the file checks: while calls run, another process keeps swapping what a checked
 * path leads to: a directory on the path for a symlink to a folder outside, a mask for a symlink to
 * an outside mask, an image for a FIFO. At least 300 calls each; not one may read outside the
 * allowed folders, and not one may hang.
 */

import { type ChildProcess, execFileSync, spawn } from "node:child_process";
import { mkdir, mkdtemp, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import path from "node:path";
import type { CallToolResult } from "@modelcontextprotocol/client";
import sharp from "sharp";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { createConfig } from "../../src/config.js";
import { silentLogger } from "../../src/logger.js";
import type {
  DescribeRequest,
  DescribeResult,
  GroundRequest,
  GroundResult,
} from "../../src/runtime/types.js";
import { createServer } from "../../src/server.js";
import { connectInMemory, ERAS, type Era } from "../helpers/clients.js";
import { FakeEngine } from "../helpers/fake-engine.js";

const CALLS = 300;

let root: string;
let allowed: string;
let outside: string;
let insideImage: Buffer;
let outsideImage: Buffer;

/** An engine that remembers the image bytes and regions it was given. */
class RecordingEngine extends FakeEngine {
  readonly images: Uint8Array[] = [];
  readonly regions: number[][] = [];
  override ground(req: GroundRequest): Promise<GroundResult> {
    this.images.push(req.image.bytes);
    return super.ground(req);
  }
  override describe(req: DescribeRequest): Promise<DescribeResult> {
    this.regions.push([...req.box]);
    return super.describe(req);
  }
}

async function mask(file: string, box: [number, number, number, number]): Promise<void> {
  const px = Buffer.alloc(64 * 48);
  for (let y = box[1]; y < box[3]; y++) px.fill(255, y * 64 + box[0], y * 64 + box[2]);
  await sharp(px, { raw: { width: 64, height: 48, channels: 1 } })
    .png()
    .toFile(file);
}

beforeAll(async () => {
  root = await mkdtemp(path.join(tmpdir(), "qvs-races-"));
  allowed = path.join(root, "allowed");
  outside = path.join(root, "outside");
  for (const d of ["dir", "m", "f"]) await mkdir(path.join(allowed, d), { recursive: true });
  await mkdir(path.join(outside, "dir"), { recursive: true });
  const png = (colour: string) =>
    sharp({ create: { width: 64, height: 48, channels: 3, background: colour } })
      .png()
      .toBuffer();
  insideImage = await png("#c33");
  outsideImage = await png("#33c");
  await writeFile(path.join(allowed, "dir", "img.png"), insideImage);
  await writeFile(path.join(outside, "dir", "img.png"), outsideImage);
  await writeFile(path.join(allowed, "cat.png"), insideImage);
  await mask(path.join(allowed, "m", "mask.png"), [10, 10, 40, 30]);
  await mask(path.join(outside, "mask.png"), [0, 0, 64, 48]);
  await writeFile(path.join(allowed, "f", "img.png"), insideImage);
  execFileSync("mkfifo", [path.join(allowed, "f", "fifo")]);
});

afterAll(async () => {
  await rm(root, { recursive: true, force: true });
});

/** A process that runs `body` (Node, with fs) in a loop until killed. */
function racer(body: string): ChildProcess {
  const script = `const fs = require("node:fs"); for (;;) { try { ${body} } catch {} }`;
  return spawn(process.execPath, ["-e", script], { stdio: "ignore" });
}

async function connect(era: Era, engine: FakeEngine) {
  const config = createConfig({
    cwd: allowed,
    allowDirs: [allowed],
    outDir: path.join(root, "out"),
    logLevel: "silent",
  });
  const client = await connectInMemory(era, (ctx) =>
    createServer(config, engine, silentLogger, { trustRoots: true, era: ctx.era }),
  );
  return {
    call: (name: string, args: Record<string, unknown>) =>
      Promise.race([
        client.callTool(name, args),
        new Promise<never>((_, reject) => setTimeout(() => reject(new Error("a call hung")), 30_000)),
      ]),
    close: () => client.close(),
  };
}

function codes(results: CallToolResult[]): Record<string, number> {
  const out: Record<string, number> = {};
  for (const r of results) {
    const first = r.content[0];
    const key = r.isError ? (first?.type === "text" ? first.text.split(":")[0] : "error") : "ok";
    out[key as string] = (out[key as string] ?? 0) + 1;
  }
  return out;
}

describe.each(ERAS)("swap races (%s client)", (era) => {
  it("a directory on the path swapped for a symlink leading outside: nothing outside is read", async () => {
    const dir = JSON.stringify(path.join(allowed, "dir"));
    const real = JSON.stringify(path.join(allowed, "dir.real"));
    const out = JSON.stringify(path.join(outside, "dir"));
    const swap = racer(
      `fs.renameSync(${dir}, ${real}); fs.symlinkSync(${out}, ${dir}); fs.unlinkSync(${dir}); fs.renameSync(${real}, ${dir});`,
    );
    const engine = new RecordingEngine();
    const conn = await connect(era, engine);
    try {
      const results: CallToolResult[] = [];
      for (let i = 0; i < CALLS; i++)
        results.push(await conn.call("ground", { image: "dir/img.png", expression: "x" }));
      const leaked = engine.images.filter((b) => Buffer.from(b).equals(outsideImage)).length;
      process.stderr.write(`directory swap: ${JSON.stringify(codes(results))}, outside reads ${leaked}\n`);
      expect(leaked).toBe(0);
      expect(results).toHaveLength(CALLS);
    } finally {
      swap.kill();
      await conn.close();
    }
  });

  it("a mask swapped for a symlink to an outside mask: the outside mask is never used", async () => {
    const m = JSON.stringify(path.join(allowed, "m", "mask.png"));
    const kept = JSON.stringify(path.join(allowed, "m", "kept.png"));
    const out = JSON.stringify(path.join(outside, "mask.png"));
    const swap = racer(
      `fs.renameSync(${m}, ${kept}); fs.symlinkSync(${out}, ${m}); fs.unlinkSync(${m}); fs.renameSync(${kept}, ${m});`,
    );
    const engine = new RecordingEngine();
    const conn = await connect(era, engine);
    try {
      const results: CallToolResult[] = [];
      for (let i = 0; i < CALLS; i++)
        results.push(await conn.call("describe_region", { image: "cat.png", mask: "m/mask.png" }));
      const leaked = engine.regions.filter((b) => b.join() === "0,0,64,48").length;
      process.stderr.write(`mask swap: ${JSON.stringify(codes(results))}, outside masks used ${leaked}\n`);
      expect(leaked).toBe(0);
      expect(engine.regions.every((b) => b.join() === "10,10,40,30")).toBe(true);
    } finally {
      swap.kill();
      await conn.close();
    }
  });

  it("an image swapped for a FIFO: every call answers, none blocks", async () => {
    const img = JSON.stringify(path.join(allowed, "f", "img.png"));
    const regular = JSON.stringify(path.join(allowed, "f", "regular"));
    const fifo = JSON.stringify(path.join(allowed, "f", "fifo"));
    const swap = racer(
      `fs.renameSync(${img}, ${regular}); fs.renameSync(${fifo}, ${img}); fs.renameSync(${img}, ${fifo}); fs.renameSync(${regular}, ${img});`,
    );
    const engine = new RecordingEngine();
    const conn = await connect(era, engine);
    try {
      const results: CallToolResult[] = [];
      for (let i = 0; i < CALLS; i++)
        results.push(await conn.call("ground", { image: "f/img.png", expression: "x" }));
      process.stderr.write(`FIFO swap: ${JSON.stringify(codes(results))}\n`);
      expect(results).toHaveLength(CALLS);
      for (const b of engine.images) expect(Buffer.from(b).equals(insideImage)).toBe(true);
    } finally {
      swap.kill();
      await conn.close();
    }
  });
});
