/**
 * npm run bench [-- --pack DIR --image FILE --runs N --device auto|cpu|cuda|webgpu]
 *
 * Per-stage times (median of N runs) for ground, segment and describe on one image: the first call
 * (image cache disabled, so every run decodes and encodes the image) and the repeated call (cache
 * warm, so the vision encoder and the image-prefix prefill are skipped), and their ratio.
 * Prints JSON on stdout.
 */

import { mkdtemp, rm } from "node:fs/promises";
import os from "node:os";
import path from "node:path";
import { parseArgs } from "node:util";
import { Pipeline } from "../src/runtime/pipeline.js";
import type { Box, ExecutionProvider, StageTimings } from "../src/runtime/types.js";
import { imageFromFile } from "../src/tools/inputs.js";

const here = path.dirname(new URL(import.meta.url).pathname);
const root = path.resolve(here, here.includes(`${path.sep}dist${path.sep}`) ? "../.." : "..");

const { values } = parseArgs({
  options: {
    pack: { type: "string", default: path.join(root, "models/tiny-random") },
    image: { type: "string", default: path.join(root, "test/fixtures/images/halfeven_400x208.png") },
    runs: { type: "string", default: "5" },
    device: { type: "string", default: "cpu" },
    expression: { type: "string", default: "the red circle" },
  },
});

const runs = Math.max(1, Number.parseInt(values.runs, 10));

function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  const mid = Math.floor(s.length / 2);
  return s.length % 2 ? (s[mid] as number) : ((s[mid - 1] as number) + (s[mid] as number)) / 2;
}

function medians(samples: StageTimings[]): Record<string, number> {
  const keys = new Set(samples.flatMap((t) => Object.keys(t)));
  const out: Record<string, number> = {};
  for (const k of keys) {
    out[k] = Math.round(median(samples.map((t) => t[k as keyof StageTimings] ?? 0)) * 10) / 10;
  }
  return out;
}

async function main(): Promise<void> {
  const out = await mkdtemp(path.join(os.tmpdir(), "qvs-bench-"));
  const device = values.device as ExecutionProvider;
  const cold = await Pipeline.create({ packDir: values.pack, executionProvider: device, cacheBytes: 0 });
  const warm = await Pipeline.create({ packDir: values.pack, executionProvider: device });
  try {
    const info = await warm.info();
    const image = await imageFromFile(values.image);
    const first = await warm.ground({ image, expression: values.expression });
    const box: Box = [
      Math.round(first.image.width * 0.25),
      Math.round(first.image.height * 0.25),
      Math.round(first.image.width * 0.75),
      Math.round(first.image.height * 0.75),
    ];
    const tasks = {
      ground: (e: Pipeline) => e.ground({ image, expression: values.expression }),
      segment: (e: Pipeline) => e.segment({ image, expression: values.expression, outputDir: out }),
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
    const report = {
      pack: info.name,
      provider: info.executionProvider,
      image: values.image,
      image_size: first.image,
      runs,
      cpus: os.cpus().length,
      node: process.version,
      results,
    };
    process.stdout.write(`${JSON.stringify(report, null, 2)}\n`);
  } finally {
    await Promise.all([cold.dispose(), warm.dispose()]);
    await rm(out, { recursive: true, force: true });
  }
}

await main();
