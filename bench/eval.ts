/**
 * The TypeScript path of the evaluation: run the engine over a RefCOCO-style annotation file
 * (docs/data-format.md) and write predictions in the modelkit's format, which
 * `python -m modelkit score --data annotations.json --pred preds.json` scores exactly like the
 * PyTorch path's predictions.
 *
 *   node dist/bench/eval.js --pack models/shapes --data DIR/annotations.json --mode ground|box|describe
 *        --out preds.json [--max-images N] [--min-score S]
 *
 * ground: `segment` with the ref's expression (grounding + masks; boxes below --min-score, by default
 * the pack's calibrated threshold, are left out, and so are empty masks); box: `segment` with each
 * target's ground-truth box (one call per target); describe: `describe_region` on each annotation's box.
 * Ground predictions also carry each box's grounding and mask scores and its token evidence, and
 * each ref how many empty masks were left out: `python -m modelkit calibrate` fits on them.
 */

import { mkdtemp, readFile, rm, writeFile } from "node:fs/promises";
import os from "node:os";
import path from "node:path";
import { parseArgs } from "node:util";
import { Pipeline } from "../src/runtime/pipeline.js";
import type { Box, SegmentInstance } from "../src/runtime/types.js";
import { imageFromFile } from "../src/tools/inputs.js";

interface RefData {
  images: { id: number; file_name: string; width: number; height: number }[];
  annotations: { id: number; image_id: number; bbox: [number, number, number, number] }[];
  refs: { ref_id: number; image_id: number; expression: string; ann_ids: number[]; kind?: string }[];
  descriptions?: { ann_id: number; text: string }[];
}

interface PredInstance {
  box: Box;
  /** The label the model wrote for the box (ground mode). */
  label?: string;
  score: number;
  grounding_score?: number;
  mask_score: number;
  /** Token log-probabilities: open, coord_mean, coord_min, label_mean. */
  evidence?: [number, number, number, number];
  mask: { size: [number, number]; counts: number[] } | null;
}

const { values } = parseArgs({
  options: {
    pack: { type: "string" },
    data: { type: "string" },
    mode: { type: "string", default: "ground" },
    out: { type: "string" },
    "max-images": { type: "string" },
    "min-score": { type: "string" },
    device: { type: "string", default: "cpu" },
  },
});

function need(name: string, v: string | undefined): string {
  if (!v) {
    process.stderr.write(`INVALID_INPUT: --${name} is required\n`);
    process.exit(2);
  }
  return v;
}

async function main(): Promise<void> {
  const packDir = need("pack", values.pack);
  const dataPath = need("data", values.data);
  const outPath = need("out", values.out);
  const mode = values.mode as "ground" | "box" | "describe";
  if (!["ground", "box", "describe"].includes(mode)) need("mode (ground|box|describe)", undefined);
  const data = JSON.parse(await readFile(dataPath, "utf8")) as RefData;
  const root = path.dirname(path.resolve(dataPath));
  const images = new Map(data.images.map((i) => [i.id, i]));
  const anns = new Map(data.annotations.map((a) => [a.id, a]));
  // --max-images N: the first N images (as `modelkit predict --max-images`); scored on those alone.
  const maxImages = values["max-images"] ? Number.parseInt(values["max-images"], 10) : undefined;
  const imageIds = maxImages === undefined ? undefined : data.images.slice(0, maxImages).map((i) => i.id);
  const included = (imageId: number) => imageIds === undefined || imageIds.includes(imageId);
  const engine = await Pipeline.create({
    packDir,
    executionProvider: values.device as "cpu",
  });
  const tmp = await mkdtemp(path.join(os.tmpdir(), "qvs-eval-"));
  const toBox = (b: [number, number, number, number]): Box => [b[0], b[1], b[0] + b[2], b[1] + b[3]];
  const minScore = values["min-score"] === undefined ? undefined : Number(values["min-score"]);
  const toPred = (inst: SegmentInstance): PredInstance => ({
    box: inst.box,
    ...(inst.label ? { label: inst.label } : {}),
    score: inst.score,
    ...(inst.groundingScore === undefined ? {} : { grounding_score: inst.groundingScore }),
    mask_score: inst.maskScore,
    ...(inst.evidence
      ? {
          evidence: [
            inst.evidence.open,
            inst.evidence.coordMean,
            inst.evidence.coordMin,
            inst.evidence.labelMean,
          ],
        }
      : {}),
    mask: inst.mask.rle ?? null,
  });
  const started = performance.now();
  const refs: { ref_id: number; found: boolean; instances: PredInstance[]; empty_masks: number }[] = [];
  const descriptions: { ann_id: number; text: string }[] = [];
  try {
    if (mode === "describe") {
      for (const ann of data.annotations) {
        const img = images.get(ann.image_id);
        if (!img || !included(ann.image_id)) continue;
        const res = await engine.describe({
          image: await imageFromFile(path.join(root, img.file_name)),
          box: toBox(ann.bbox),
        });
        descriptions.push({ ann_id: ann.id, text: res.description });
      }
    } else {
      for (const ref of data.refs) {
        const img = images.get(ref.image_id);
        if (!img || !included(ref.image_id)) continue;
        const image = await imageFromFile(path.join(root, img.file_name));
        const instances: PredInstance[] = [];
        let emptyMasks = 0;
        if (mode === "ground") {
          const res = await engine.segment({
            image,
            expression: ref.expression,
            outputDir: tmp,
            rle: true,
            ...(minScore === undefined ? {} : { minScore }),
          });
          for (const inst of res.instances) instances.push(toPred(inst));
          emptyMasks = res.rejected.emptyMask;
        } else {
          for (const id of ref.ann_ids) {
            const ann = anns.get(id);
            if (!ann) continue;
            const res = await engine.segment({
              image,
              label: ref.expression,
              box: toBox(ann.bbox),
              outputDir: tmp,
              rle: true,
            });
            for (const inst of res.instances) instances.push(toPred(inst));
            emptyMasks += res.rejected.emptyMask;
          }
        }
        refs.push({ ref_id: ref.ref_id, found: instances.length > 0, instances, empty_masks: emptyMasks });
      }
    }
  } finally {
    await engine.dispose();
    await rm(tmp, { recursive: true, force: true });
  }
  const doc = { path: "typescript", mode, ...(imageIds ? { image_ids: imageIds } : {}), refs, descriptions };
  await writeFile(outPath, `${JSON.stringify(doc)}\n`);
  const n = mode === "describe" ? descriptions.length : refs.length;
  process.stderr.write(
    `eval ${mode}: ${n} items in ${((performance.now() - started) / 1000).toFixed(1)} s -> ${outPath}\n`,
  );
}

await main();
