/**
 * The trained demo pack through the TypeScript path, on a fixed set of generated shapes scenes
 * (test/fixtures/shapes-eval, made by `python -m modelkit synth --out ... --n 12 --seed 2026`):
 * accuracy thresholds, not exact outputs. It runs as its own vitest project without a time limit
 * (vitest.config.ts): it does a few hundred model calls, which take minutes on a busy machine. A wrong patch order, rope, DeepStack or cache collapses
 * these numbers. Box-prompted segmentation and descriptions are held to the targets (mask IoU
 * >= 0.85, colour and shape right >= 95 %); grounding from the expression alone, which the pack does
 * only weakly, to a little under what the committed pack measures here (a regression guard). The
 * full evaluation on 200 held-out scenes (`modelkit score`, PyTorch and TypeScript paths) is in
 * docs/demo-pack.md.
 */

import { mkdtemp, readFile, rm } from "node:fs/promises";
import os from "node:os";
import path from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { rleDecode } from "../../src/runtime/mask-post.js";
import { Pipeline } from "../../src/runtime/pipeline.js";
import type { Box, CheckedImage, SegmentInstance } from "../../src/runtime/types.js";
import { imageFromFile } from "../../src/tools/inputs.js";

const root = path.resolve(import.meta.dirname, "../..");
const dataDir = path.join(root, "test/fixtures/shapes-eval");

interface Ann {
  id: number;
  image_id: number;
  bbox: [number, number, number, number];
  segmentation: { size: [number, number]; counts: number[] };
  attributes: { shape: string; colour: string; size: string };
}
interface Data {
  images: { id: number; file_name: string; width: number; height: number }[];
  annotations: Ann[];
  refs: { ref_id: number; image_id: number; expression: string; ann_ids: number[]; kind: string }[];
}

let engine: Pipeline;
let data: Data;
let out: string;

beforeAll(async () => {
  engine = await Pipeline.create({ packDir: path.join(root, "models/shapes"), executionProvider: "cpu" });
  data = JSON.parse(await readFile(path.join(dataDir, "annotations.json"), "utf8")) as Data;
  out = await mkdtemp(path.join(os.tmpdir(), "qvs-demo-"));
});
afterAll(async () => {
  await engine?.dispose();
  await rm(out, { recursive: true, force: true });
});

const imageOf = async (id: number): Promise<CheckedImage> => {
  const img = data.images.find((i) => i.id === id);
  if (!img) throw new Error(`no image ${id}`);
  return imageFromFile(path.join(dataDir, img.file_name));
};

/** A result's mask, from the RLE the engine returns with it. */
function maskOf(inst: SegmentInstance): Uint8Array {
  if (!inst.mask.rle) throw new Error("segment was asked for RLE");
  return rleDecode(inst.mask.rle);
}
const xyxy = (b: [number, number, number, number]): Box => [b[0], b[1], b[0] + b[2], b[1] + b[3]];

function iou(a: Uint8Array, b: Uint8Array): number {
  let inter = 0;
  let union = 0;
  for (let i = 0; i < a.length; i++) {
    const x = a[i] as number;
    const y = b[i] as number;
    inter += x & y;
    union += x | y;
  }
  return union === 0 ? 1 : inter / union;
}

/** COCO RLE (column-major) -> row-major bitmap. */
function gtMask(ann: Ann): Uint8Array {
  const [h, w] = ann.segmentation.size;
  const col = rleDecode({ size: [h, w], counts: ann.segmentation.counts });
  return col;
}

describe("demo pack (models/shapes) through the TypeScript runtime", () => {
  it("box-prompted segmentation: mean mask IoU >= 0.85", async () => {
    const ious: number[] = [];
    for (const ann of data.annotations) {
      const image = await imageOf(ann.image_id);
      const res = await engine.segment({ image, box: xyxy(ann.bbox), outputDir: out, rle: true });
      const inst = res.instances[0];
      if (!inst) throw new Error("segment with a box returned no instance");
      ious.push(iou(maskOf(inst), gtMask(ann)));
    }
    const mean = ious.reduce((a, b) => a + b, 0) / ious.length;
    process.stderr.write(`demo box-prompted mIoU over ${ious.length} objects: ${mean.toFixed(4)}\n`);
    expect(mean).toBeGreaterThanOrEqual(0.85);
  });

  it("descriptions name the colour and the shape of >= 95 % of regions", async () => {
    let right = 0;
    for (const ann of data.annotations) {
      const res = await engine.describe({ image: await imageOf(ann.image_id), box: xyxy(ann.bbox) });
      const words = res.description.toLowerCase().split(/\W+/);
      if (words.includes(ann.attributes.colour) && words.includes(ann.attributes.shape)) right++;
    }
    const acc = right / data.annotations.length;
    process.stderr.write(`demo description colour+shape accuracy: ${acc.toFixed(4)}\n`);
    expect(acc).toBeGreaterThanOrEqual(0.95);
  });

  it("grounding from the expression alone (every box, min_score 0): mean mask IoU >= 0.35 (a regression guard)", async () => {
    const anns = new Map(data.annotations.map((a) => [a.id, a]));
    const ious: number[] = [];
    for (const ref of data.refs) {
      if (ref.ann_ids.length === 0) continue;
      const image = await imageOf(ref.image_id);
      const res = await engine.segment({
        image,
        expression: ref.expression,
        outputDir: out,
        rle: true,
        minScore: 0,
      });
      // The union of the predicted masks against the union of the targets' masks (modelkit score's mIoU).
      const union = (masks: Uint8Array[]) =>
        masks.reduce(
          (acc, m) => acc.map((v, i) => v | (m[i] as number)),
          new Uint8Array(image.width * image.height),
        );
      const predicted = res.instances.map(maskOf);
      const targets = ref.ann_ids.map((id) => {
        const ann = anns.get(id);
        if (!ann) throw new Error(`no annotation ${id}`);
        return gtMask(ann);
      });
      ious.push(iou(union(predicted), union(targets)));
    }
    const mean = ious.reduce((a, b) => a + b, 0) / ious.length;
    process.stderr.write(`demo grounding mIoU over ${ious.length} expressions: ${mean.toFixed(4)}\n`);
    expect(mean).toBeGreaterThanOrEqual(0.35);
  });

  it("at the pack's calibrated threshold, expressions naming nothing in the scene come back found: false", async () => {
    // Picked on shapes-val (seed 2); these scenes (seed 2026) are not part of it. Measured: 13 of
    // 15 absent (0.87), up from 2 of 15 with every box returned.
    const info = await engine.info();
    const threshold = info.groundingThreshold as number;
    expect(threshold).toBeGreaterThan(0);
    let absent = 0;
    let reported = 0;
    for (const ref of data.refs) {
      if (ref.ann_ids.length > 0) continue;
      const res = await engine.ground({ image: await imageOf(ref.image_id), expression: ref.expression });
      expect(res.minScore).toBe(threshold);
      for (const inst of res.instances) expect(inst.groundingScore).toBeGreaterThanOrEqual(threshold);
      absent++;
      if (!res.found) reported++;
    }
    process.stderr.write(`demo absent targets reported absent: ${reported} of ${absent}\n`);
    expect(reported / absent).toBeGreaterThanOrEqual(0.75);
  });
});
