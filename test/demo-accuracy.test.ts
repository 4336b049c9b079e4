/**
 * The trained demo pack through the TypeScript path, on a fixed set of generated shapes scenes
 * (test/fixtures/shapes-eval, made by `python -m modelkit synth --out ... --n 12 --seed 2026`):
 * accuracy thresholds, not exact outputs. A wrong patch order, rope, DeepStack or cache collapses
 * these numbers. The thresholds sit a little under what the committed pack measures here, as a
 * regression guard; the targets (box-prompted mIoU >= 0.85, descriptions >= 0.95) and the full
 * evaluation on 200 held-out scenes (`modelkit score`, PyTorch and TypeScript paths) are in
 * docs/demo-pack.md.
 */

import { mkdtemp, readFile, rm } from "node:fs/promises";
import os from "node:os";
import path from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { LocalEngine } from "../src/runtime/local-engine.js";
import { rleDecode } from "../src/runtime/mask-post.js";
import { readMaskPng } from "../src/runtime/output.js";
import type { Box } from "../src/runtime/types.js";

const root = path.resolve(import.meta.dirname, "..");
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

let engine: LocalEngine;
let data: Data;
let out: string;

beforeAll(async () => {
  engine = await LocalEngine.create({ packDir: path.join(root, "models/shapes"), executionProvider: "cpu" });
  data = JSON.parse(await readFile(path.join(dataDir, "annotations.json"), "utf8")) as Data;
  out = await mkdtemp(path.join(os.tmpdir(), "qvs-demo-"));
});
afterAll(async () => {
  await engine?.dispose();
  await rm(out, { recursive: true, force: true });
});

const imagePath = (id: number) => {
  const img = data.images.find((i) => i.id === id);
  if (!img) throw new Error(`no image ${id}`);
  return { img, path: path.join(dataDir, img.file_name) };
};
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
      const { img, path: p } = imagePath(ann.image_id);
      const res = await engine.segment({ image: { path: p }, box: xyxy(ann.bbox), outputDir: out });
      const inst = res.instances[0];
      if (!inst) throw new Error("segment with a box returned no instance");
      const mask = await readMaskPng(inst.mask.path, img.width, img.height);
      ious.push(iou(mask, gtMask(ann)));
    }
    const mean = ious.reduce((a, b) => a + b, 0) / ious.length;
    process.stderr.write(`demo box-prompted mIoU over ${ious.length} objects: ${mean.toFixed(4)}\n`);
    expect(mean).toBeGreaterThanOrEqual(0.85);
  });

  it("descriptions name the colour and the shape of most regions (measured 33/36)", async () => {
    let right = 0;
    for (const ann of data.annotations) {
      const { path: p } = imagePath(ann.image_id);
      const res = await engine.describe({ image: { path: p }, box: xyxy(ann.bbox) });
      const words = res.description.toLowerCase().split(/\W+/);
      if (words.includes(ann.attributes.colour) && words.includes(ann.attributes.shape)) right++;
    }
    const acc = right / data.annotations.length;
    process.stderr.write(`demo description colour+shape accuracy: ${acc.toFixed(4)}\n`);
    expect(acc).toBeGreaterThanOrEqual(0.85);
  });
});
