/**
 * The tool layer through a real MCP Client over an in-memory transport: schemas, results, progress,
 * cancellation and every refusal against the real engine and the committed tiny pack (its random
 * weights give meaningless but well-formed answers); error mapping, found: false, queueing and roots
 * with a scripted engine, because the real one cannot be made to fail or find nothing on demand.
 * Everything runs twice: with a 2025-11-25 client (v1 SDK) and a 2026-07-28 client (v2 SDK).
 */

import { mkdir, mkdtemp, readFile, realpath, rm, symlink, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import path from "node:path";
import type { CallToolResult } from "@modelcontextprotocol/client";
import sharp from "sharp";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { type Config, createConfig } from "../src/config.js";
import { SegError } from "../src/errors.js";
import { silentLogger } from "../src/logger.js";
import { createEngine, WorkerEngine } from "../src/runtime/engine.js";
import type { Engine } from "../src/runtime/types.js";
import { createServer } from "../src/server.js";
import { describeRegionTool } from "../src/tools/describe-region.js";
import { groundTool } from "../src/tools/ground.js";
import { segmentTool } from "../src/tools/segment.js";
import { connectInMemory, ERAS, type Era, REVISION } from "./helpers/clients.js";
import { FakeEngine } from "./helpers/fake-engine.js";

let root: string;
let work: string;
let outside: string;
let config: Config;

async function png(file: string, width: number, height: number): Promise<void> {
  await sharp({ create: { width, height, channels: 3, background: { r: 200, g: 40, b: 40 } } })
    .png()
    .toFile(file);
}

beforeAll(async () => {
  root = await mkdtemp(path.join(tmpdir(), "seg-tools-"));
  work = path.join(root, "work");
  outside = path.join(root, "outside");
  await mkdir(path.join(work, "folder.png"), { recursive: true });
  await mkdir(outside, { recursive: true });
  await png(path.join(work, "cat.png"), 64, 48);
  await png(path.join(work, "big.png"), 200, 100); // 20,000 px, over the 10,000 limit below
  await png(path.join(work, "small-mask.png"), 32, 32);
  await png(path.join(outside, "secret.png"), 64, 48);
  await symlink(path.join(outside, "secret.png"), path.join(work, "escape.png"));
  await writeFile(path.join(work, "empty.png"), "");
  // PNG signature, then garbage: looks like a PNG, cannot be decoded
  await writeFile(
    path.join(work, "corrupt.png"),
    Buffer.concat([Buffer.from([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a]), Buffer.alloc(64, 7)]),
  );
  await writeFile(
    path.join(work, "drawing.svg"),
    '<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>',
  );
  await writeFile(path.join(work, "notes.png"), "just some text, not an image");
  config = createConfig({
    cwd: work,
    outDir: path.join(root, "out"),
    allowDirs: [work],
    maxInputPixels: 10_000,
    maxDataUriBytes: 4096,
    logLevel: "silent",
  });
});

afterAll(async () => {
  await rm(root, { recursive: true, force: true });
});

/** A client of `era` connected to one server (one per connection, as over stdio). */
async function connect(
  era: Era,
  engine: Engine,
  options: { roots?: string[]; rootsHandler?: () => Promise<{ uri: string }[]>; config?: Config } = {},
) {
  const roots = options.roots;
  const client = await connectInMemory(
    era,
    (ctx) => createServer(options.config ?? config, engine, silentLogger, { trustRoots: true, era: ctx.era }),
    {
      ...(roots
        ? { roots: async () => roots.map((r) => ({ uri: `file://${r}`, name: path.basename(r) })) }
        : {}),
      ...(options.rootsHandler ? { roots: options.rootsHandler } : {}),
    },
  );
  return {
    client,
    call: (name: string, args: Record<string, unknown>) => client.callTool(name, args),
    close: () => client.close(),
  };
}

function textOf(result: CallToolResult): string {
  const first = result.content[0];
  return first?.type === "text" ? first.text : "";
}

function expectError(result: CallToolResult, code: string, message: RegExp): void {
  expect(result.isError, textOf(result)).toBe(true);
  expect(textOf(result).startsWith(`${code}: `), textOf(result)).toBe(true);
  expect(textOf(result)).toMatch(message);
}

function expectBoxInside(box: readonly number[], width: number, height: number): void {
  const [x1 = -1, y1 = -1, x2 = -1, y2 = -1] = box;
  expect(box).toHaveLength(4);
  expect(0 <= x1 && x1 <= x2 && x2 <= width, `x of ${box}`).toBe(true);
  expect(0 <= y1 && y1 <= y2 && y2 <= height, `y of ${box}`).toBe(true);
}

describe.each(ERAS)("with a %s client", (era) => {
  describe("tools with the real engine and the tiny pack", () => {
    let engine: Engine;
    let conn: Awaited<ReturnType<typeof connect>>;

    beforeAll(async () => {
      engine = await createEngine({
        packDir: path.resolve(import.meta.dirname, "../models/tiny-random"),
        executionProvider: "cpu",
        log: silentLogger,
      });
      conn = await connect(era, engine);
    });
    afterAll(async () => {
      await conn?.close();
      await engine?.dispose();
    });

    it(`negotiates ${REVISION[era]} and gives the server's instructions`, () => {
      expect(conn.client.protocolVersion()).toBe(REVISION[era]);
      expect(conn.client.instructions()).toMatch(/^Pixel-level vision on local images/);
    });

    it("lists the three tools with strict input schemas, output schemas and annotations", async () => {
      const { tools } = await conn.client.listTools();
      expect(tools.map((t) => t.name).sort()).toEqual(["describe_region", "ground", "segment"]);
      for (const tool of tools) {
        expect(tool.inputSchema.additionalProperties).toBe(false);
        expect(tool.outputSchema?.type).toBe("object");
        expect(tool.description?.length).toBeGreaterThan(40);
        for (const [field, schema] of Object.entries(tool.inputSchema.properties ?? {})) {
          expect((schema as { description?: string }).description, `${tool.name}.${field}`).toBeTruthy();
        }
        expect(tool.annotations?.openWorldHint).toBe(false);
      }
      const byName = Object.fromEntries(tools.map((t) => [t.name, t]));
      expect(byName.ground?.inputSchema.required).toEqual(["image", "expression"]);
      expect(byName.segment?.inputSchema.required).toEqual(["image"]);
      expect(byName.ground?.annotations?.readOnlyHint).toBe(true);
      expect(byName.describe_region?.annotations?.readOnlyHint).toBe(true);
      expect(byName.segment?.annotations?.readOnlyHint).toBe(false); // it writes mask files
      expect(byName.segment?.annotations?.destructiveHint).toBe(false);
      expect(Object.keys(byName.segment?.outputSchema?.properties ?? {})).toEqual(
        expect.arrayContaining(["found", "image", "instances", "model", "timings_ms"]),
      );
    });

    it("ground: boxes in pixels, scores, a text summary and a JSON copy", async () => {
      const result = await conn.call("ground", {
        image: "cat.png",
        expression: "the red square",
        max_instances: 2,
      });
      expect(result.isError, textOf(result)).toBeFalsy();
      const out = groundTool.output.parse(result.structuredContent);
      expect(out.image).toEqual({ width: 64, height: 48 });
      expect(out.found).toBe(out.instances.length > 0);
      expect(out.instances.length).toBeLessThanOrEqual(2);
      for (const inst of out.instances) {
        expectBoxInside(inst.box, 64, 48);
        expect(inst.score).toBeGreaterThanOrEqual(0);
        expect(inst.score).toBeLessThanOrEqual(1);
      }
      expect(out.model).toBe("tiny-random");
      expect(out.timings_ms.total).toBeGreaterThan(0);
      expect(out.timings_ms.queue).toBeGreaterThanOrEqual(0);
      expect(textOf(result)).toMatch(
        /^(Found \d+ instances? of "the red square"|No match for "the red square") in the 64x48 image/,
      );
      const copy = result.content[1];
      expect(copy?.type === "text" && JSON.parse(copy.text)).toEqual(result.structuredContent);
    });

    it("segment with a box: one mask PNG of the input's size, with a resource link that reads back", async () => {
      const result = await conn.call("segment", { image: "cat.png", box: [4, 6, 40, 30], rle: true });
      expect(result.isError, textOf(result)).toBeFalsy();
      const out = segmentTool.output.parse(result.structuredContent);
      expect(out.found).toBe(true);
      expect(out.instances).toHaveLength(1);
      const inst = out.instances[0];
      if (!inst) throw new Error("no instance");
      expect(inst.box).toEqual([4, 6, 40, 30]);
      expectBoxInside(inst.mask_box, 64, 48);
      expect(path.dirname(inst.mask.path)).toBe(await realpath(config.outDir));
      const meta = await sharp(inst.mask.path).metadata();
      expect([meta.format, meta.width, meta.height]).toEqual(["png", 64, 48]);
      expect(Number.isInteger(inst.mask.area_px)).toBe(true);
      expect(inst.mask.area_fraction).toBeCloseTo(inst.mask.area_px / (64 * 48), 5);
      expect(inst.mask.rle?.size).toEqual([48, 64]);
      expect(inst.mask.rle?.counts.reduce((a, b) => a + b, 0)).toBe(64 * 48);
      expect(inst.mask.uri).toMatch(/^qwen3-vl-seg:\/\/masks\/mask-.*\.png$/);
      const link = result.content.find((c) => c.type === "resource_link");
      expect(link).toMatchObject({ type: "resource_link", uri: inst.mask.uri, mimeType: "image/png" });
      const read = await conn.client.readResource(inst.mask.uri);
      const blob = read.contents[0] && "blob" in read.contents[0] ? read.contents[0].blob : "";
      expect(Buffer.from(blob, "base64").equals(await readFile(inst.mask.path))).toBe(true);
      expect(result.content.some((c) => c.type === "image")).toBe(false); // previews are opt-in
    });

    it("segment with an expression: every instance has a mask of the input's size", async () => {
      const result = await conn.call("segment", {
        image: "cat.png",
        expression: "the square",
        max_instances: 1,
      });
      expect(result.isError, textOf(result)).toBeFalsy();
      const out = segmentTool.output.parse(result.structuredContent);
      expect(out.found).toBe(out.instances.length > 0);
      for (const inst of out.instances) {
        const meta = await sharp(inst.mask.path).metadata();
        expect([meta.width, meta.height]).toEqual([64, 48]);
      }
      expect(result.content.filter((c) => c.type === "resource_link")).toHaveLength(out.instances.length);
    });

    it("describe_region: with a box, and with a mask written by segment", async () => {
      const byBox = await conn.call("describe_region", { image: "cat.png", box: [0, 0, 10, 10] });
      expect(byBox.isError, textOf(byBox)).toBeFalsy();
      const out = describeRegionTool.output.parse(byBox.structuredContent);
      expect(out.box).toEqual([0, 0, 10, 10]);
      expect(typeof out.description).toBe("string");
      expect(typeof out.label).toBe("string");
      expect(textOf(byBox)).toMatch(/^Region \[0, 0, 10, 10\] of the 64x48 image: /);
      const seg = segmentTool.output.parse(
        (await conn.call("segment", { image: "cat.png", box: [8, 8, 30, 30] })).structuredContent,
      );
      const byMask = await conn.call("describe_region", {
        image: "cat.png",
        mask: seg.instances[0]?.mask.path,
      });
      expect(byMask.isError, textOf(byMask)).toBeFalsy();
      expectBoxInside(describeRegionTool.output.parse(byMask.structuredContent).box, 64, 48);
      const byUri = await conn.call("describe_region", {
        image: "cat.png",
        mask: seg.instances[0]?.mask.uri,
      });
      expect(byUri.isError, textOf(byUri)).toBeFalsy();
    });

    it("boxes use the EXIF-oriented size, as the engine does", async () => {
      // stored 64x48, EXIF orientation 6 (rotate 90): the picture a viewer shows is 48x64
      await sharp({ create: { width: 64, height: 48, channels: 3, background: "#28c" } })
        .jpeg()
        .withMetadata({ orientation: 6 })
        .toFile(path.join(work, "rotated.jpg"));
      const result = await conn.call("segment", { image: "rotated.jpg", box: [2, 2, 40, 60] });
      expect(result.isError, textOf(result)).toBeFalsy();
      const out = segmentTool.output.parse(result.structuredContent);
      expect(out.image).toEqual({ width: 48, height: 64 });
      const meta = await sharp(out.instances[0]?.mask.path ?? "").metadata();
      expect([meta.width, meta.height]).toEqual([48, 64]);
      expectError(
        await conn.call("segment", { image: "rotated.jpg", box: [2, 2, 60, 40] }),
        "INVALID_INPUT",
        /outside the 48x64 image/,
      );
    });

    it("accepts data: URIs under the limit", async () => {
      const bytes = await sharp({ create: { width: 20, height: 10, channels: 3, background: "#fff" } })
        .png()
        .toBuffer();
      const result = await conn.call("describe_region", {
        image: `data:image/png;base64,${bytes.toString("base64")}`,
        box: [1, 1, 9, 9],
      });
      expect(result.isError, textOf(result)).toBeFalsy();
      expect(describeRegionTool.output.parse(result.structuredContent).image).toEqual({
        width: 20,
        height: 10,
      });
    });

    it("sends increasing progress notifications when asked", async () => {
      const seen: Array<{ progress: number; message?: string | undefined }> = [];
      await conn.client.callTool(
        "segment",
        { image: "cat.png", box: [1, 2, 30, 40] },
        { onprogress: (p) => seen.push(p) },
      );
      expect(seen.length).toBeGreaterThanOrEqual(3);
      for (let i = 1; i < seen.length; i++)
        expect(seen[i]?.progress).toBeGreaterThan(seen[i - 1]?.progress ?? -1);
      expect(seen.every((p) => p.progress >= 0 && p.progress <= 100)).toBe(true);
      expect(seen.map((p) => p.message)).toEqual(expect.arrayContaining(["queued"]));
    });

    it("cancellation aborts the engine call and the connection stays usable", async () => {
      const controller = new AbortController();
      const started = Date.now();
      const call = conn.client.callTool(
        "ground",
        { image: "cat.png", expression: "everything" },
        { signal: controller.signal },
      );
      setTimeout(() => controller.abort("user gave up"), 200);
      await expect(call).rejects.toThrow(/user gave up|abort/i);
      expect(Date.now() - started).toBeLessThan(1500);
      const next = await conn.call("describe_region", { image: "cat.png", box: [0, 0, 5, 5] });
      expect(next.isError, textOf(next)).toBeFalsy();
    });

    describe("refusals: isError results with the code and what to do instead", () => {
      const cases: Array<[string, string, Record<string, unknown>, string, RegExp]> = [
        [
          "missing file",
          "ground",
          { image: "missing.png", expression: "x" },
          "IMAGE_NOT_FOUND",
          /missing\.png" does not exist: check the path/,
        ],
        [
          "directory",
          "ground",
          { image: "folder.png", expression: "x" },
          "INVALID_INPUT",
          /is a directory: pass the path of an image file/,
        ],
        [
          "outside the allowed directories",
          "ground",
          { image: "../outside/secret.png", expression: "x" },
          "PATH_NOT_ALLOWED",
          /outside the allowed directories.*--allow-dir/,
        ],
        [
          "symlink escaping them",
          "segment",
          { image: "escape.png", expression: "x" },
          "PATH_NOT_ALLOWED",
          /resolves to .*secret\.png", outside the allowed directories/,
        ],
        [
          "corrupt image",
          "ground",
          { image: "corrupt.png", expression: "x" },
          "IMAGE_DECODE_FAILED",
          /looks like PNG but cannot be decoded.*corrupt or truncated/,
        ],
        [
          "zero-byte file",
          "ground",
          { image: "empty.png", expression: "x" },
          "IMAGE_DECODE_FAILED",
          /is empty \(0 bytes\)/,
        ],
        [
          "image over the pixel limit",
          "segment",
          { image: "big.png", expression: "x" },
          "IMAGE_TOO_LARGE",
          /is 200x100 = 20000 pixels, over the limit of 10000.*--max-input-pixels/,
        ],
        [
          "unsupported format (SVG)",
          "ground",
          { image: "drawing.svg", expression: "x" },
          "UNSUPPORTED_FORMAT",
          /is a SVG file: pass a PNG, JPEG, WebP, GIF or TIFF image/,
        ],
        [
          "not an image at all",
          "ground",
          { image: "notes.png", expression: "x" },
          "UNSUPPORTED_FORMAT",
          /is not a recognised image/,
        ],
        [
          "empty expression",
          "ground",
          { image: "cat.png", expression: "   " },
          "INVALID_INPUT",
          /expression is empty: describe the object/,
        ],
        [
          "10,000-character expression",
          "segment",
          { image: "cat.png", expression: "a".repeat(10_000) },
          "INVALID_INPUT",
          /expression has 10000 characters, over the limit of 1000/,
        ],
        [
          "box outside the image",
          "segment",
          { image: "cat.png", box: [10, 10, 65, 20] },
          "INVALID_INPUT",
          /box \[10, 10, 65, 20\] lies outside the 64x48 image/,
        ],
        [
          "inverted box",
          "describe_region",
          { image: "cat.png", box: [30, 10, 20, 20] },
          "INVALID_INPUT",
          /box \[30, 10, 20, 20\] is empty or inverted: .*x1 < x2/,
        ],
        [
          "mask of another size",
          "describe_region",
          { image: "cat.png", mask: "small-mask.png" },
          "INVALID_INPUT",
          /mask .* is 32x32 but the image is 64x48: pass a mask written by segment/,
        ],
        [
          "http URL",
          "ground",
          { image: "https://example.com/cat.png", expression: "x" },
          "INVALID_INPUT",
          /never fetches from the network/,
        ],
        [
          "neither expression nor box",
          "segment",
          { image: "cat.png" },
          "INVALID_INPUT",
          /segment needs an expression .* or a box/,
        ],
        [
          "neither box nor mask",
          "describe_region",
          { image: "cat.png" },
          "INVALID_INPUT",
          /needs a box .* or a mask/,
        ],
      ];
      for (const [name, tool, args, code, message] of cases) {
        it(name, async () => {
          expectError(await conn.call(tool, args), code, message);
        });
      }

      it("data: URI over the size limit", async () => {
        const payload = Buffer.alloc(5000, 1).toString("base64");
        expectError(
          await conn.call("ground", { image: `data:image/png;base64,${payload}`, expression: "x" }),
          "IMAGE_TOO_LARGE",
          /data: URI holds 5000 bytes, over the limit of 4096: save the image to a file/,
        );
      });

      it("unknown fields (strict schema)", async () => {
        const result = await conn.call("ground", { image: "cat.png", expression: "x", threshold: 0.5 });
        expect(result.isError).toBe(true);
        expect(textOf(result)).toMatch(
          /INVALID_INPUT: unknown field\(s\) "threshold" for ground; the accepted fields are image, expression, max_instances/,
        );
      });

      it("wrong types", async () => {
        const result = await conn.call("segment", { image: "cat.png", box: [1, 2, 3] });
        expect(result.isError).toBe(true);
        expect(textOf(result)).toMatch(/box must have exactly four numbers/);
      });
    });
  });

  describe("tool-layer mapping with a scripted engine", () => {
    it("found: false is a normal result for ground and segment", async () => {
      const conn = await connect(era, new FakeEngine());
      const ground = await conn.call("ground", {
        image: path.join(work, "cat.png"),
        expression: "nothing here",
      });
      expect(ground.isError).toBeFalsy();
      expect(groundTool.output.parse(ground.structuredContent)).toMatchObject({
        found: false,
        instances: [],
        image: { width: 64, height: 48 },
      });
      expect(textOf(ground)).toMatch(/No match for "nothing here".*found: false/);
      const seg = await conn.call("segment", { image: "cat.png", expression: "nothing at all" });
      expect(segmentTool.output.parse(seg.structuredContent)).toMatchObject({ found: false, instances: [] });
      expect(seg.content.filter((c) => c.type === "resource_link")).toHaveLength(0);
      await conn.close();
    });

    it("several instances, max_instances, and the summary lists each", async () => {
      const conn = await connect(era, new FakeEngine());
      const two = await conn.call("ground", { image: "cat.png", expression: "two cats" });
      const out = groundTool.output.parse(two.structuredContent);
      expect(out.instances).toEqual([
        { label: "two cats", box: [0, 0, 32, 24], grounding_score: 0.9, score: 0.9 },
        { label: "two cats", box: [32, 24, 64, 48], grounding_score: 0.8, score: 0.8 },
      ]);
      expect(out.rejected).toEqual({ below_min_score: 0, empty_mask: 0 });
      expect(textOf(two)).toMatch(
        /^Found 2 instances of "two cats" in the 64x48 image.*\n1\. two cats \[0, 0, 32, 24\] grounding 0\.90/,
      );
      const one = await conn.call("ground", { image: "cat.png", expression: "two cats", max_instances: 1 });
      expect(groundTool.output.parse(one.structuredContent).instances).toHaveLength(1);
      await conn.close();
    });

    it("min_score: passed to the engine, boxes under it counted in rejected and named in the summary", async () => {
      const engine = new FakeEngine();
      const conn = await connect(era, engine);
      const g = await conn.call("ground", { image: "cat.png", expression: "two cats", min_score: 0.85 });
      const out = groundTool.output.parse(g.structuredContent);
      expect(out.instances.map((i) => i.grounding_score)).toEqual([0.9]);
      expect(out).toMatchObject({ min_score: 0.85, rejected: { below_min_score: 1, empty_mask: 0 } });
      expect(textOf(g)).toMatch(
        /Not returned: 1 box below min_score 0\.85 \(pass a lower min_score to see them\)\./,
      );
      const none = await conn.call("segment", { image: "cat.png", expression: "two cats", min_score: 0.95 });
      const seg = segmentTool.output.parse(none.structuredContent);
      expect(seg).toMatchObject({ found: false, instances: [], rejected: { below_min_score: 2 } });
      expect(textOf(none)).toMatch(
        /^No match for "two cats".*\nNot returned: 2 boxes below min_score 0\.95/s,
      );
      const one = await conn.call("segment", { image: "cat.png", expression: "two cats", min_score: 0.5 });
      const inst = segmentTool.output.parse(one.structuredContent).instances[0];
      expect(inst).toMatchObject({ grounding_score: 0.9, mask_score: 0.9, score: 0.81 });
      const bad = await conn.call("ground", { image: "cat.png", expression: "x", min_score: 1.5 });
      expectError(bad, "INVALID_INPUT", /min_score must be between 0 and 1/);
      await conn.close();
    });

    it("preview returns a small inline image and an overlay link", async () => {
      const conn = await connect(era, new FakeEngine());
      const result = await conn.call("segment", { image: "cat.png", expression: "the cat", preview: true });
      const out = segmentTool.output.parse(result.structuredContent);
      expect(out.overlay?.uri).toMatch(/^qwen3-vl-seg:\/\/masks\//);
      const image = result.content.find((c) => c.type === "image");
      expect(image?.type === "image" && image.mimeType).toBe("image/jpeg");
      expect(JSON.stringify(result).length).toBeLessThan(100_000);
      await conn.close();
    });

    it("INFERENCE_FAILED becomes an error result and the server stays up", async () => {
      const engine = new FakeEngine({
        failWith: new SegError("INFERENCE_FAILED", "onnxruntime: out of memory"),
      });
      const conn = await connect(era, engine);
      expectError(
        await conn.call("ground", { image: "cat.png", expression: "x" }),
        "INFERENCE_FAILED",
        /out of memory/,
      );
      // a plain Error thrown deep inside is mapped the same way
      engine.options.failWith = new Error("boom");
      expectError(
        await conn.call("segment", { image: "cat.png", expression: "x" }),
        "INFERENCE_FAILED",
        /boom/,
      );
      engine.options = {};
      const ok = await conn.call("ground", { image: "cat.png", expression: "x" });
      expect(ok.isError).toBeFalsy();
      await conn.close();
    });

    it("a pack that failed to load is reported by every call; the server stays up", async () => {
      const failed = new WorkerEngine({ packDir: "/nope", executionProvider: "cpu" });
      const conn = await connect(era, failed);
      expectError(
        await conn.call("ground", { image: "cat.png", expression: "x" }),
        "MODEL_NOT_FOUND",
        /\/nope/,
      );
      // input is still validated first, so the caller learns about its own mistakes
      expectError(
        await conn.call("ground", { image: "missing.png", expression: "x" }),
        "IMAGE_NOT_FOUND",
        /missing/,
      );
      await conn.close();
      await failed.dispose();
    });

    it("a call cancelled while queued never reaches the engine", async () => {
      const engine = new FakeEngine({ delayMs: 400 });
      const conn = await connect(era, engine);
      const first = conn.call("ground", { image: "cat.png", expression: "first" });
      while (engine.calls.length === 0) await new Promise((r) => setTimeout(r, 5)); // first holds the engine
      const controller = new AbortController();
      const second = conn.client.callTool(
        "ground",
        { image: "cat.png", expression: "second" },
        { signal: controller.signal },
      );
      setTimeout(() => controller.abort("no longer needed"), 100);
      await expect(second).rejects.toThrow(/no longer needed|abort/i);
      expect((await first).isError).toBeFalsy();
      expect(engine.calls.map((c) => c.expression)).toEqual(["first"]);
      await conn.close();
    });

    it("concurrent calls queue on the engine and all complete", async () => {
      const engine = new FakeEngine({ delayMs: 50 });
      const conn = await connect(era, engine);
      const results = await Promise.all(
        ["one", "two things", "three"].map((expression) =>
          conn.call("ground", { image: "cat.png", expression }),
        ),
      );
      expect(results.every((r) => !r.isError)).toBe(true);
      const waits = results.map((r) => groundTool.output.parse(r.structuredContent).timings_ms.queue ?? 0);
      expect(Math.max(...waits)).toBeGreaterThan(40); // the last one waited for the others
      await conn.close();
    });

    it("MCP roots narrow --allow-dir, and replace the working-directory default", async () => {
      // --allow-dir work: roots elsewhere allow nothing more; a root inside it narrows it.
      const outsideRoot = await connect(era, new FakeEngine(), { roots: [outside] });
      expectError(
        await outsideRoot.call("ground", { image: path.join(outside, "secret.png"), expression: "x" }),
        "PATH_NOT_ALLOWED",
        /no input directory is allowed/,
      );
      await outsideRoot.close();
      const narrowed = await connect(era, new FakeEngine(), { roots: [path.join(work, "folder.png")] });
      expectError(
        await narrowed.call("ground", { image: "cat.png", expression: "x" }),
        "PATH_NOT_ALLOWED",
        /outside the allowed directories/,
      );
      await narrowed.close();
      // No --allow-dir: the client's roots are the allowed set (the working directory is not).
      const byDefault = createConfig({ cwd: work, outDir: path.join(root, "out"), logLevel: "silent" });
      const conn = await connect(era, new FakeEngine(), { roots: [outside], config: byDefault });
      const call = (image: string) => conn.call("ground", { image, expression: "x" });
      expect((await call(path.join(outside, "secret.png"))).isError).toBeFalsy();
      expectError(await call("cat.png"), "PATH_NOT_ALLOWED", /outside the allowed directories/);
      await conn.close();
    });

    it("the client's roots are asked for once per connection, not on every call", async () => {
      let asked = 0;
      const conn = await connect(era, new FakeEngine(), {
        rootsHandler: async () => {
          asked++;
          return [{ uri: `file://${work}` }];
        },
      });
      for (let i = 0; i < 3; i++) {
        const result = await conn.call("ground", { image: "cat.png", expression: "x" });
        expect(result.isError, textOf(result)).toBeFalsy();
      }
      expect(asked).toBe(1);
      await conn.close();
    });

    // A 2026-07-28 client answers the roots request inside its own call (input_required, then a
    // retry); one that never answers holds only its own call, which it can cancel.
    it.runIf(era === "legacy")(
      "a client that never answers roots/list is asked once, not on every call",
      async () => {
        let asked = 0;
        const conn = await connect(era, new FakeEngine(), {
          rootsHandler: () => {
            asked++;
            return new Promise(() => undefined); // never answers
          },
        });
        for (let i = 0; i < 3; i++) {
          const result = await conn.call("ground", { image: "cat.png", expression: "x" });
          expect(result.isError, textOf(result)).toBeFalsy(); // --allow-dir alone applies
        }
        expect(asked).toBe(1);
        await conn.close();
      },
    );

    it("the mask resource template serves only files in the output directory", async () => {
      const conn = await connect(era, new FakeEngine());
      await expect(conn.client.readResource("qwen3-vl-seg://masks/..%2F..%2Fetc%2Fpasswd")).rejects.toThrow(
        /INVALID_INPUT: .*does not name a mask file/,
      );
      await expect(conn.client.readResource("qwen3-vl-seg://masks/missing.png")).rejects.toThrow(
        /IMAGE_NOT_FOUND/,
      );
      const model = await conn.client.readResource("qwen3-vl-seg://model");
      const text = model.contents[0] && "text" in model.contents[0] ? model.contents[0].text : "{}";
      expect(JSON.parse(text).name).toBe("fake-engine");
      await conn.close();
    });
  });
});
