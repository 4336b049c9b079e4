/**
 * The engine end to end on the committed tiny random pack: the answers of a random model carry no
 * meaning, so these tests check the pipeline's contracts (shapes, files, caching, cancellation,
 * queueing, errors), while parity.test.ts checks the numbers.
 */

import { cp, mkdtemp, readdir, readFile, rm, writeFile } from "node:fs/promises";
import os from "node:os";
import path from "node:path";
import sharp from "sharp";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { isSegError, type SegError } from "../src/errors.js";
import { createEngine, WorkerEngine } from "../src/runtime/engine.js";
import { Pipeline } from "../src/runtime/pipeline.js";
import { cropBox } from "../src/runtime/prompt.js";
import type { CheckedImage, Engine, Stage } from "../src/runtime/types.js";
import { checkImage, imageFromFile } from "../src/tools/inputs.js";

const root = path.resolve(import.meta.dirname, "..");
const packDir = path.join(root, "models/tiny-random");
const imagePath = path.join(root, "test/fixtures/images/halfeven_400x208.png");

let engine: Pipeline;
let out: string;
let image: CheckedImage;

beforeAll(async () => {
  engine = await Pipeline.create({ packDir, executionProvider: "cpu" });
  out = await mkdtemp(path.join(os.tmpdir(), "qvs-engine-"));
  image = await imageFromFile(imagePath);
});

afterAll(async () => {
  await engine?.dispose();
  await rm(out, { recursive: true, force: true });
});

async function rejection(p: Promise<unknown>): Promise<SegError> {
  try {
    await p;
  } catch (e) {
    if (isSegError(e)) return e;
    throw e;
  }
  throw new Error("expected a rejection");
}

describe("Pipeline on the tiny pack", () => {
  it("describes the pack", async () => {
    const info = await engine.info();
    expect(info.name).toBe("tiny-random");
    expect(info.executionProvider).toBe("cpu");
    expect(info.preprocess.patchSize).toBe(16);
  });

  it("grounds: boxes inside the image, well-formed answer text, stage progress, then a cache hit", async () => {
    const stages = new Set<Stage>();
    const first = await engine.ground({
      image,
      expression: "the red box",
      maxInstances: 3,
      onProgress: (p) => stages.add(p.stage),
    });
    expect(first.image).toEqual({ width: 400, height: 208 });
    expect(first.cached).toBe(false);
    expect(first.text.startsWith("[")).toBe(true);
    expect(first.found).toBe(first.instances.length > 0);
    expect(first.instances.length).toBeLessThanOrEqual(3);
    for (const inst of first.instances) {
      const [x1, y1, x2, y2] = inst.box;
      expect(0 <= x1 && x1 < x2 && x2 <= 400 && 0 <= y1 && y1 < y2 && y2 <= 208).toBe(true);
      expect(inst.score).toBeGreaterThan(0);
      expect(inst.score).toBeLessThanOrEqual(1);
    }
    expect([...stages]).toEqual(expect.arrayContaining(["decode", "vision", "prefill", "generate"]));
    expect(first.timings.total).toBeGreaterThan(0);

    const again = await engine.ground({
      image,
      expression: "the red box",
      maxInstances: 3,
    });
    expect(again.cached).toBe(true);
    expect(again.timings.vision).toBeUndefined();
    expect(again.text).toBe(first.text); // greedy and deterministic
  });

  it("segments a given box: one 1-bit mask PNG the size of the image", async () => {
    const res = await engine.segment({
      image,
      box: [40, 30, 200, 180],
      outputDir: out,
      rle: true,
      overlay: true,
    });
    expect(res.found).toBe(true);
    expect(res.instances).toHaveLength(1);
    const inst = res.instances[0];
    if (!inst) throw new Error("no instance");
    expect(inst.box).toEqual([40, 30, 200, 180]);
    expect(path.dirname(inst.mask.path)).toBe(out);
    const meta = await sharp(inst.mask.path).metadata();
    expect([meta.width, meta.height]).toEqual([400, 208]);
    expect(inst.mask.areaFraction).toBeCloseTo(inst.mask.areaPx / (400 * 208), 10);
    expect(inst.mask.rle?.size).toEqual([208, 400]);
    const counted = (inst.mask.rle?.counts ?? []).reduce((a, b) => a + b, 0);
    expect(counted).toBe(400 * 208);
    expect(res.overlayPath && path.dirname(res.overlayPath)).toBe(out);
  });

  it("segments from an expression with the same pipeline as ground", async () => {
    const g = await engine.ground({ image, expression: "the red box", maxInstances: 2 });
    const s = await engine.segment({
      image,
      expression: "the red box",
      maxInstances: 2,
      outputDir: out,
    });
    expect(s.instances.map((i) => i.box)).toEqual(g.instances.map((i) => i.box));
    expect(s.found).toBe(g.found);
  });

  it("describes a region given a box", async () => {
    const byBox = await engine.describe({ image, box: [40, 30, 200, 180] });
    expect(typeof byBox.description).toBe("string");
    expect(byBox.box).toEqual([40, 30, 200, 180]);
  });

  it("keys the cache by content: the same bytes from another source hit it", async () => {
    const copy = await checkImage(new Uint8Array(await readFile(imagePath)), "a copy", 1e9);
    const res = await engine.ground({ image: copy, expression: "the red box", maxInstances: 1 });
    expect(res.cached).toBe(true);
  });

  it("stops generation when cancelled mid-way", async () => {
    const controller = new AbortController();
    let steps = 0;
    const err = await rejection(
      engine.describe({
        image,
        box: [0, 0, 100, 100],
        signal: controller.signal,
        onProgress: (p) => {
          if (p.stage === "generate" && p.fraction > 0 && ++steps === 2) controller.abort();
        },
      }),
    );
    expect(err.code).toBe("CANCELLED");
    expect(steps).toBe(2);
  });

  it("reports bad input with codes", async () => {
    expect((await rejection(engine.ground({ image, expression: "  " }))).code).toBe("INVALID_INPUT");
  });

  it("writes nothing for a call cancelled after its masks were decoded", async () => {
    const dir = await mkdtemp(path.join(out, "cancel-"));
    const controller = new AbortController();
    const err = await rejection(
      engine.segment({
        image,
        box: [40, 30, 200, 180],
        outputDir: dir,
        signal: controller.signal,
        onProgress: (p) => {
          if (p.stage === "write") controller.abort();
        },
      }),
    );
    expect(err.code).toBe("CANCELLED");
    expect(await readdir(dir)).toEqual([]);
  });
});

describe("warm-up at load (the default on GPU providers)", () => {
  it("runs every stage once and leaves the cache empty", async () => {
    const warm = await Pipeline.create({ packDir, executionProvider: "cpu", warmUp: true });
    try {
      const res = await warm.ground({ image, expression: "the red box", maxInstances: 1 });
      expect(res.cached).toBe(false);
    } finally {
      await warm.dispose();
    }
  });
});

describe("describe_mode crop", () => {
  it("describes from a crop: the result speaks of the whole image, the crop is cached", async () => {
    const dir = path.join(out, "crop-pack");
    await cp(packDir, dir, { recursive: true });
    const manifestPath = path.join(dir, "pack.json");
    const manifest = JSON.parse(await readFile(manifestPath, "utf8"));
    manifest.prompts.describe = "Describe the object in the middle of the image in a short phrase.";
    manifest.prompts.describe_mode = "crop";
    await writeFile(manifestPath, JSON.stringify(manifest));
    const cropEngine = await Pipeline.create({ packDir: dir, executionProvider: "cpu" });
    try {
      const first = await cropEngine.describe({ image, box: [40, 30, 200, 180] });
      expect(first.image).toEqual({ width: 400, height: 208 });
      expect(first.box).toEqual([40, 30, 200, 180]);
      expect(first.cached).toBe(false);
      const again = await cropEngine.describe({ image, box: [40, 30, 200, 180] });
      expect(again.cached).toBe(true);
      expect(again.description).toBe(first.description);
      const other = await cropEngine.describe({ image, box: [0, 0, 50, 50] });
      expect(other.cached).toBe(false);
    } finally {
      await cropEngine.dispose();
    }
  });
});

describe("cropBox (describe_mode crop)", () => {
  it("matches modelkit answers.crop_box", () => {
    // Expected values printed by modelkit.answers.crop_box for the same arguments.
    expect(cropBox([10, 20, 50, 60], 400, 208)).toEqual([0, 0, 82, 92]);
    expect(cropBox([0, 0, 400, 208], 400, 208)).toEqual([0, 0, 400, 208]);
    expect(cropBox([300.5, 100.2, 390.7, 200.9], 400, 208)).toEqual([269, 69, 400, 208]);
    expect(cropBox([5, 5, 6, 6], 128, 640)).toEqual([0, 0, 26, 26]);
  });
});

describe("createEngine (worker thread)", () => {
  let worker: Engine;
  beforeAll(async () => {
    worker = await createEngine({ packDir, executionProvider: "cpu" });
  });
  afterAll(async () => {
    await worker?.dispose();
  });

  it("answers like the in-thread engine and relays progress", async () => {
    const stages: Stage[] = [];
    const res = await worker.ground({
      image,
      expression: "the red box",
      maxInstances: 3,
      onProgress: (p) => stages.push(p.stage),
    });
    const local = await engine.ground({
      image,
      expression: "the red box",
      maxInstances: 3,
    });
    expect(res.text).toBe(local.text);
    expect(stages).toContain("generate");
  });

  it("relays cancellation and errors as SegErrors with their details", async () => {
    const controller = new AbortController();
    controller.abort();
    expect((await rejection(worker.ground({ image, expression: "x", signal: controller.signal }))).code).toBe(
      "CANCELLED",
    );
    // 1x300: an aspect ratio smart_resize refuses, with the numbers in `details`.
    const thin = await checkImage(
      new Uint8Array(
        await sharp({ create: { width: 300, height: 1, channels: 3, background: "#fff" } })
          .png()
          .toBuffer(),
      ),
      "thin",
      1e9,
    );
    const err = await rejection(worker.ground({ image: thin, expression: "x" }));
    expect(err.code).toBe("INVALID_INPUT");
    expect(err.details).toMatchObject({ width: 300, height: 1 });
  });

  it("queues calls: one at a time, waiting time measured, a call cancelled while waiting leaves", async () => {
    const controller = new AbortController();
    const first = worker.describe({ image, box: [0, 0, 100, 100] });
    const second = worker.describe({ image, box: [0, 0, 90, 90], signal: controller.signal });
    const third = worker.describe({ image, box: [0, 0, 80, 80] });
    controller.abort();
    expect((await rejection(second)).code).toBe("CANCELLED");
    const [a, c] = await Promise.all([first, third]);
    expect(a.timings.queue).toBeLessThan(c.timings.queue ?? 0);
  });

  it("refuses calls beyond its queue with BUSY", async () => {
    const small = new WorkerEngine({ packDir, executionProvider: "cpu", maxQueue: 1 });
    try {
      const calls = [0, 1, 2].map((i) => small.describe({ image, box: [0, 0, 50 + i, 50] }));
      const settled = await Promise.allSettled(calls);
      expect(settled.map((r) => r.status)).toEqual(["fulfilled", "fulfilled", "rejected"]);
      const busy = settled[2] as PromiseRejectedResult;
      expect(busy.reason).toMatchObject({ code: "BUSY" });
      expect(String(busy.reason.message)).toMatch(/busy.*retry/);
    } finally {
      await small.dispose();
    }
  });

  it("fails to start with MODEL_NOT_FOUND for a missing pack", async () => {
    const err = await rejection(createEngine({ packDir: path.join(root, "models/does-not-exist") }));
    expect(err.code).toBe("MODEL_NOT_FOUND");
  });
});
