/**
 * Parity of the TypeScript runtime's stages (VisionEncoder, LanguageModel with its decode loop,
 * MaskDecoder) with the golden fixtures that the modelkit recorded from PyTorch/transformers: vision
 * outputs, prefill logits and hidden states (also when the image prefix's KV cache is reused, as the
 * pipeline does), 20 greedy tokens with a KV cache and their hidden states, and mask-decoder outputs.
 * Stage inputs come from the fixture, so each stage is checked on its own; preprocess.test.ts covers
 * image -> pixel_values.
 */

import path from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { argmax, LanguageModel } from "../src/runtime/language-model.js";
import { MaskDecoder } from "../src/runtime/mask-decoder.js";
import { f32, OnnxSession } from "../src/runtime/onnx.js";
import { type LoadedPack, loadPack } from "../src/runtime/pack.js";
import type { Box1000 } from "../src/runtime/prompt.js";
import { decodePositions, ropeIndex } from "../src/runtime/rope.js";
import { VisionEncoder } from "../src/runtime/vision-encoder.js";
import { diffStats, type FixtureCase, fixtureCases, loadCase } from "./helpers/fixtures.js";

const PACK = "tiny-random";
const packDir = path.resolve(import.meta.dirname, "../models", PACK);
const cases = fixtureCases(PACK);

let pack: LoadedPack;
let vision: VisionEncoder;
let lm: LanguageModel;
let maskDecoder: MaskDecoder;
/** The mask graph itself, for the first-pass logits the stage does not return. */
let maskGraph: OnnxSession;
/** Worst difference per tensor over all cases, printed at the end for the record. */
const worst = new Map<string, number>();

function expectClose(
  c: FixtureCase,
  name: string,
  actual: ArrayLike<number>,
  reference?: ArrayLike<number>,
): void {
  const ref = reference ?? (c.tensor(name).data as unknown as ArrayLike<number>);
  const tol = c.tolerance(name);
  if (!tol) throw new Error(`fixture ${c.name} has no tolerance for ${name}`);
  const d = diffStats(actual, ref, tol.atol, tol.rtol);
  worst.set(name, Math.max(worst.get(name) ?? 0, d.maxAbs));
  expect(d.outside, `${c.name}/${name}: max |diff| ${d.maxAbs} at ${d.at} (atol ${tol.atol})`).toBe(0);
}

beforeAll(async () => {
  pack = await loadPack(packDir);
  const options = { provider: "cpu" } as const;
  vision = await VisionEncoder.load(pack, options);
  lm = await LanguageModel.load(pack, options);
  maskDecoder = await MaskDecoder.load(pack, options);
  maskGraph = await OnnxSession.create(
    pack.file(pack.manifest.graphs.mask_decoder?.file ?? "missing"),
    options,
  );
});

afterAll(async () => {
  await Promise.all([vision?.dispose(), lm?.dispose(), maskDecoder?.dispose(), maskGraph?.dispose()]);
  const table = [...worst].map(([k, v]) => `${k}=${v.toExponential(2)}`).join(" ");
  process.stderr.write(`parity maxima (max |ts - torch|): ${table}\n`);
});

describe.each(cases)("parity with PyTorch: %s", (name) => {
  const c = loadCase(PACK, name);
  const [, gh, gw] = c.json.meta.grid;
  const p = gh * gw;
  const m = p / 4;

  /** [4, 1, S, H] visual rows for the prefill built from the fixture's vision outputs. */
  function visualEmbeds(ids: ArrayLike<bigint>, s: number): Float32Array {
    const h = pack.manifest.model.text.hidden_size;
    const pad = pack.manifest.tokens.image_pad;
    const features = c.tensor("image_features").data as Float32Array;
    const deepstack = c.tensor("deepstack_features").data as Float32Array;
    const visual = new Float32Array(4 * s * h);
    let k = 0;
    for (let i = 0; i < s; i++) {
      if (Number(ids[i]) !== pad) continue;
      visual.set(features.subarray(k * h, (k + 1) * h), i * h);
      for (let l = 0; l < 3; l++) {
        visual.set(deepstack.subarray((l * m + k) * h, (l * m + k + 1) * h), ((l + 1) * s + i) * h);
      }
      k++;
    }
    expect(k).toBe(m);
    return visual;
  }

  it("vision encoder outputs", async () => {
    const out = await vision.encode({
      pixelValues: c.tensor("pixel_values").data as Float32Array,
      grid: [1, gh, gw],
      resized: [gh * 16, gw * 16],
      hrImage: c.tensor("hr_image").data as Float32Array,
    });
    expectClose(c, "image_features", out.imageFeatures);
    expectClose(c, "deepstack_features", out.deepstack);
    expectClose(c, "vit_ms", out.vitMs);
  });

  it("prefill logits and hidden states, whole prompt and with a cached image prefix", async () => {
    const ids = c.tensor("input_ids").data as BigInt64Array;
    const s = ids.length;
    const idList = Array.from(ids, Number);
    const tokens = pack.manifest.tokens;
    const rope = ropeIndex(idList, [c.json.meta.grid], tokens.image_pad, tokens.vision_start, 2);
    expect(Array.from(rope.positions)).toEqual(Array.from(c.tensor("position_ids").data as BigInt64Array));
    expect(rope.ropeDelta).toBe(c.json.meta.rope_delta);

    const whole = await lm.step(idList, rope.positions, lm.emptyCache(), visualEmbeds(ids, s));
    expectClose(c, "prefill_logits", whole.logits);
    expectClose(c, "prefill_hidden", whole.hidden);

    // The engine's way: prefix up to <|vision_end|> once, then the question as a chunk after it.
    const end = idList.indexOf(tokens.vision_end) + 1;
    const prefixIds = idList.slice(0, end);
    const prefixPos = new BigInt64Array(3 * end);
    const suffixPos = new BigInt64Array(3 * (s - end));
    for (let a = 0; a < 3; a++) {
      prefixPos.set(rope.positions.subarray(a * s, a * s + end), a * end);
      suffixPos.set(rope.positions.subarray(a * s + end, (a + 1) * s), a * (s - end));
    }
    const prefix = await lm.step(
      prefixIds,
      prefixPos,
      lm.emptyCache(),
      visualEmbeds(ids.subarray(0, end), end),
    );
    const rest = await lm.step(idList.slice(end), suffixPos, prefix.cache);
    expectClose(c, "prefill_logits", rest.logits);
    const h = pack.manifest.model.text.hidden_size;
    const ref = c.tensor("prefill_hidden").data as Float32Array;
    expectClose(c, "prefill_hidden", prefix.hidden, ref.subarray(0, end * h));
    expectClose(c, "prefill_hidden", rest.hidden, ref.subarray(end * h));
  });

  it("20 greedy tokens with the KV cache, and their hidden states", async () => {
    const ids = c.tensor("input_ids").data as BigInt64Array;
    const s = ids.length;
    const idList = Array.from(ids, Number);
    const tokens = pack.manifest.tokens;
    const rope = ropeIndex(idList, [c.json.meta.grid], tokens.image_pad, tokens.vision_start, 2);
    const h = pack.manifest.model.text.hidden_size;
    const pre = await lm.step(idList, rope.positions, lm.emptyCache(), visualEmbeds(ids, s));
    const gen = await lm.generate(
      { logits: pre.logits, lastHidden: pre.hidden.subarray((s - 1) * h), cache: pre.cache },
      { maxNewTokens: 20, stopTokens: new Set(), ropeDelta: rope.ropeDelta },
    );
    const expected = Array.from(c.tensor("greedy_tokens").data as BigInt64Array, Number);
    expect(gen.tokens).toEqual(expected);

    // greedy_hidden[k]: final-norm state at generated token k's input position (one more step each).
    let cache = pre.cache;
    const hidden = new Float32Array(expected.length * h);
    for (const [k, token] of expected.entries()) {
      const step = await lm.step([token], decodePositions(cache.length, 1, rope.ropeDelta), cache);
      hidden.set(step.hidden, k * h);
      cache = step.cache;
      if (k + 1 < expected.length) expect(argmax(step.logits)).toBe(expected[k + 1]);
    }
    expectClose(c, "greedy_hidden", hidden);
  });

  it("mask decoder outputs", async () => {
    const h = pack.manifest.model.text.hidden_size;
    const cv = pack.manifest.model.vision.hidden_size;
    const ids = c.tensor("input_ids").data as BigInt64Array;
    const prefill = c.tensor("prefill_hidden").data as Float32Array;
    const mm = new Float32Array(m * h);
    let k = 0;
    ids.forEach((id, i) => {
      if (Number(id) === pack.manifest.tokens.image_pad)
        mm.set(prefill.subarray(i * h, (i + 1) * h), k++ * h);
    });
    const q = c.tensor("mask_boxes").shape[0] as number;
    const boxes = c.tensor("mask_boxes").data as Float32Array; // [Q, 4], multiples of 1/1000
    const queryHidden = c.tensor("mask_query_hidden").data as Float32Array;
    const image = {
      grid: [1, gh, gw] as const,
      vitMs: c.tensor("vit_ms").data as Float32Array,
      mmEmbeds: mm,
      hrImage: c.tensor("hr_image").data as Float32Array,
    };
    const queries = Array.from({ length: q }, (_, i) => ({
      box1000: Array.from(boxes.subarray(i * 4, i * 4 + 4), (v) => Math.round(v * 1000)) as Box1000,
      hidden: queryHidden.subarray(i * h, (i + 1) * h),
    }));
    const out = await maskDecoder.decode(image, queries);
    expect([out.height, out.width]).toEqual([gh * 4, gw * 4]);
    expectClose(c, "mask_logits", out.logits);
    expectClose(c, "iou_pred", out.iou);
    // The first pass, which the stage does not return, straight from the graph with the same inputs.
    const gate = c.tensor("mask_gate_boxes");
    const raw = await maskGraph.run({
      vit_ms: f32(image.vitMs, [4, p, cv]),
      mm_embeds: f32(mm, [m, h]),
      query_hidden: f32(queryHidden, [q, h]),
      boxes: f32(boxes, [q, 4]),
      gate_boxes: f32(gate.data as Float32Array, gate.shape),
      gate_valid: f32(c.tensor("mask_gate_valid").data as Float32Array, c.tensor("mask_gate_valid").shape),
      hr_image: f32(image.hrImage, [1, 3, gh * 16, gw * 16]),
    });
    expectClose(c, "mask_logits_coarse", raw.float("mask_logits_coarse"));
  });
});

it("has fixtures to check", () => {
  expect(cases.length).toBeGreaterThanOrEqual(3);
});
