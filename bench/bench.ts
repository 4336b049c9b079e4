/**
 * npm run bench [-- --pack DIR --image FILE --runs N --device auto|cpu|cuda|webgpu]
 *   Per-stage medians for ground, segment (expression and box) and describe on one image: the first
 *   call (image cache off, every run encodes the image) and the repeated call (cache warm: the vision
 *   encoder and the image prefix's prefill are skipped), and their ratio.
 *
 * npm run bench -- --pack DIR --reference CKPT_DIR [--image F] [--tokens 32] [--runs N] [--device D]
 *                  [--reference-dtype fp32|bf16] [--threads N]
 *   The side-by-side benchmark against transformers eager on the same weights (compare.ts); the
 *   reference runs on the CPU when --device is cpu, else on CUDA (fp32 on the CPU, bf16 on a GPU).
 *
 * npm run bench:compare
 *   The default side-by-side: builds once (cached in .bench/) a Qwen3-VL-2B-width random pack with 4
 *   text layers and 4 vision blocks, fp32, and its reference checkpoint, then compares on a 1024x768
 *   image. Prints the JSON object last on stdout.
 */

import { spawnSync } from "node:child_process";
import { existsSync } from "node:fs";
import { mkdir, mkdtemp, rm } from "node:fs/promises";
import os from "node:os";
import path from "node:path";
import { parseArgs } from "node:util";
import sharp from "sharp";
import { LanguageModel } from "../src/runtime/language-model.js";
import { loadPack } from "../src/runtime/pack.js";
import { Pipeline } from "../src/runtime/pipeline.js";
import { decodePositions } from "../src/runtime/rope.js";
import type { Box, ExecutionProvider, StageTimings } from "../src/runtime/types.js";
import { imageFromFile } from "../src/tools/inputs.js";
import { compare, median } from "./compare.js";

const here = path.dirname(new URL(import.meta.url).pathname);
const root = path.resolve(here, here.includes(`${path.sep}dist${path.sep}`) ? "../.." : "..");

const { values } = parseArgs({
  options: {
    pack: { type: "string" },
    reference: { type: "string" },
    image: { type: "string" },
    runs: { type: "string" },
    tokens: { type: "string", default: "32" },
    device: { type: "string", default: "cpu" },
    threads: { type: "string", default: "0" },
    "reference-dtype": { type: "string" },
    expression: { type: "string", default: "the red circle" },
    "default-compare": { type: "boolean" },
  },
});

/** The modelkit's Python: the project's venv when there is one (`QWEN3_VL_SEG_PYTHON` overrides). */
function python(): string {
  const venv = path.join(root, ".venv", "bin", "python");
  return process.env.QWEN3_VL_SEG_PYTHON ?? (existsSync(venv) ? venv : "python3");
}

function medians(samples: StageTimings[]): Record<string, number> {
  const keys = new Set(samples.flatMap((t) => Object.keys(t)));
  const out: Record<string, number> = {};
  for (const k of keys) {
    out[k] = Math.round(median(samples.map((t) => t[k as keyof StageTimings] ?? 0)) * 10) / 10;
  }
  return out;
}

/** First call vs repeated call, per stage (the image cache's effect). */
async function firstVsRepeated(pack: string, imagePath: string, runs: number, device: ExecutionProvider) {
  const out = await mkdtemp(path.join(os.tmpdir(), "qvs-bench-"));
  const cold = await Pipeline.create({ packDir: pack, executionProvider: device, cacheBytes: 0 });
  const warm = await Pipeline.create({ packDir: pack, executionProvider: device });
  try {
    const info = await warm.info();
    const image = await imageFromFile(imagePath);
    const box: Box = [
      Math.round(image.width * 0.25),
      Math.round(image.height * 0.25),
      Math.round(image.width * 0.75),
      Math.round(image.height * 0.75),
    ];
    const expression = values.expression;
    const tasks = {
      ground: (e: Pipeline) => e.ground({ image, expression }),
      segment: (e: Pipeline) => e.segment({ image, expression, outputDir: out }),
      segment_box: (e: Pipeline) => e.segment({ image, box, outputDir: out }),
      describe: (e: Pipeline) => e.describe({ image, box }),
    };
    const results: Record<string, unknown> = {};
    for (const [name, task] of Object.entries(tasks)) {
      const coldSamples: StageTimings[] = [];
      const warmSamples: StageTimings[] = [];
      await task(warm); // warm-up: session initialisation and the cache entry
      for (let i = 0; i < runs; i++) {
        coldSamples.push((await task(cold)).timings);
        warmSamples.push((await task(warm)).timings);
      }
      const c = medians(coldSamples);
      const w = medians(warmSamples);
      results[name] = {
        first_call_ms: c,
        repeated_call_ms: w,
        repeated_speedup: Math.round(((c.total ?? 0) / (w.total ?? 1)) * 100) / 100,
      };
    }
    return {
      pack: info.name,
      provider: info.executionProvider,
      decode_step: await stepOverhead(pack, device, results),
      image: imagePath,
      image_size: { width: image.width, height: image.height },
      runs,
      cpus: os.cpus().length,
      node: process.version,
      results,
    };
  } finally {
    await Promise.all([cold.dispose(), warm.dispose()]);
    await rm(out, { recursive: true, force: true });
  }
}

/**
 * A decode step inside `ground` (grammar, logits scan, tensor building, the step itself) against the
 * language model's graph alone, fed one token after a cache of the same length: the host's share of
 * a step.
 */
async function stepOverhead(pack: string, device: ExecutionProvider, results: Record<string, unknown>) {
  const ground = results.ground as { repeated_call_ms: Record<string, number> };
  const pipelineStep = ground.repeated_call_ms.per_step ?? 0;
  const lm = await LanguageModel.load(await loadPack(pack, "size"), { provider: device });
  try {
    const n = 300;
    const positions = new BigInt64Array(3 * n);
    for (let a = 0; a < 3; a++) for (let i = 0; i < n; i++) positions[a * n + i] = BigInt(i);
    const pre = await lm.step(
      Array.from({ length: n }, (_, i) => 100 + i),
      positions,
      lm.emptyCache(),
    );
    let cache = pre.cache;
    const times: number[] = [];
    for (let k = 0; k < 30; k++) {
      const t0 = performance.now();
      const next = await lm.step([200], decodePositions(cache.length, 1, 0), cache);
      times.push(performance.now() - t0);
      cache = next.cache;
    }
    const graph = median(times.slice(5));
    return {
      pipeline_per_step_ms: pipelineStep,
      graph_alone_ms: Math.round(graph * 10) / 10,
      ratio: Math.round((pipelineStep / graph) * 100) / 100,
    };
  } finally {
    await lm.dispose();
  }
}

/** The default comparison's pack, reference and image, built once under .bench/. */
async function defaultSetup(): Promise<{ pack: string; reference: string; image: string }> {
  const dir = path.join(root, ".bench", "qwen3-vl-2b-l4-v4-fp32");
  const image = path.join(root, ".bench", "shapes-1024x768.png");
  await mkdir(path.dirname(dir), { recursive: true });
  if (
    !existsSync(path.join(dir, "pack", "pack.json")) ||
    !existsSync(path.join(dir, "reference", "config.json"))
  ) {
    process.stderr.write(`building the 2B-width random pack and its reference in ${dir} (once; minutes)\n`);
    const args = ["-m", "modelkit", "random-pack", "--shape", "qwen3-vl-2b", "--text-layers", "4"];
    args.push("--vision-depth", "4", "--dtype", "fp32", "--out", dir, "--force");
    const run = spawnSync(python(), args, { stdio: "inherit", cwd: root });
    if (run.status !== 0) throw new Error(`modelkit random-pack failed (exit ${run.status})`);
  }
  if (!existsSync(image)) {
    await sharp(path.join(root, "examples", "shapes-1.png"))
      .resize(1024, 768, { kernel: "lanczos3" })
      .png()
      .toFile(image);
  }
  return { pack: path.join(dir, "pack"), reference: path.join(dir, "reference"), image };
}

async function main(): Promise<void> {
  const device = values.device as ExecutionProvider;
  if (values["default-compare"] || values.reference !== undefined) {
    const setup = values["default-compare"]
      ? await defaultSetup()
      : { pack: values.pack ?? "", reference: values.reference ?? "", image: values.image ?? "" };
    if (!setup.pack || !setup.image) throw new Error("--reference needs --pack and --image");
    const report = await compare({
      ...setup,
      tokens: Number.parseInt(values.tokens, 10),
      runs: Math.max(1, Number.parseInt(values.runs ?? "3", 10)),
      device,
      expression: values.expression,
      python: python(),
      threads: Number.parseInt(values.threads, 10),
      referenceDtype: (values["reference-dtype"] ?? (device === "cpu" ? "fp32" : "bf16")) as "fp32" | "bf16",
    });
    process.stdout.write(`${JSON.stringify(report)}\n`);
    return;
  }
  const report = await firstVsRepeated(
    values.pack ?? path.join(root, "models/tiny-random"),
    values.image ?? path.join(root, "test/fixtures/images/halfeven_400x208.png"),
    Math.max(1, Number.parseInt(values.runs ?? "5", 10)),
    device,
  );
  process.stdout.write(`${JSON.stringify(report, null, 2)}\n`);
}

await main();
