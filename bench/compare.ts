/**
 * The side-by-side benchmark: this runtime and transformers eager (a Python subprocess, `modelkit
 * bench-reference`) on the same weights, image, prompt and token count, one after the other in one
 * invocation. Stage medians over `runs` after one warm-up; the image cache is off, so every call
 * decodes and encodes the image as a first question does.
 *
 * Stages, ts vs reference:
 * - vision_ms: vision encoder (with its host-side tables) vs the visual tower;
 * - prefill_ms: prefill of the grounding prompt (the image prefix, then the question) vs one prefill;
 * - decode_ms_per_token: one decoder call per token, greedy, no grammar, vs the same with HF's cache;
 * - mask_ms: mask decoder for one box vs the PyTorch module;
 * - ground_total_ms: `ground` (grammar-constrained, at most `tokens` answer tokens) from bytes to boxes
 *   vs preprocess + vision + prefill + as many greedy tokens;
 * - segment_box_total_ms: `segment` with a box, from bytes to the mask PNG written vs preprocess +
 *   vision + prefill of the prompt and the box text + mask decoder.
 * speedup = reference / ts (> 1: this runtime is faster).
 */

import { spawn } from "node:child_process";
import { mkdtemp, rm, stat } from "node:fs/promises";
import os from "node:os";
import path from "node:path";
import { runClock } from "../src/runtime/onnx.js";
import { Pipeline } from "../src/runtime/pipeline.js";
import type { Box, ExecutionProvider, StageTimings } from "../src/runtime/types.js";
import { imageFromFile } from "../src/tools/inputs.js";

export interface CompareOptions {
  pack: string;
  reference: string;
  image: string;
  tokens: number;
  runs: number;
  device: ExecutionProvider;
  expression: string;
  python: string;
  /** Threads for both sides (0: each library's default). */
  threads: number;
  /** The reference's compute dtype: fp32 on the CPU (as the pack), bf16 on a GPU (its usual). */
  referenceDtype: "fp32" | "fp16" | "bf16";
}

type StageName =
  | "vision_ms"
  | "prefill_ms"
  | "decode_ms_per_token"
  | "mask_ms"
  | "ground_total_ms"
  | "segment_box_total_ms";

export function median(xs: readonly number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  const mid = Math.floor(s.length / 2);
  return s.length % 2 ? (s[mid] as number) : ((s[mid - 1] as number) + (s[mid] as number)) / 2;
}

const round = (v: number, digits = 1) => Math.round(v * 10 ** digits) / 10 ** digits;

/** The runtime's side: stage medians, tokens, host overhead, peak RSS. */
async function measureRuntime(o: CompareOptions) {
  const engine = await Pipeline.create({
    packDir: o.pack,
    executionProvider: o.device,
    cacheBytes: 0,
    threads: o.threads,
  });
  const out = await mkdtemp(path.join(os.tmpdir(), "qvs-compare-"));
  try {
    const image = await imageFromFile(o.image);
    const box: Box = [
      Math.round(image.width * 0.25),
      Math.round(image.height * 0.25),
      Math.round(image.width * 0.75),
      Math.round(image.height * 0.75),
    ];
    const ground = () =>
      engine.ground({ image, expression: o.expression, maxInstances: 100, maxTokens: o.tokens });
    const segment = () => engine.segment({ image, box, outputDir: out });
    const greedy = () => engine.greedy({ image, expression: o.expression, tokens: o.tokens });
    await ground(); // warm-up: session initialisation, allocator growth

    await segment();
    const free = await greedy();
    const g: { wall: number; onnx: number; timings: StageTimings; tokens: number }[] = [];
    const s: StageTimings[] = [];
    const d: StageTimings[] = [];
    for (let r = 0; r < o.runs; r++) {
      const clock = runClock.ms;
      const t0 = performance.now();
      const res = await ground();
      const wall = performance.now() - t0;
      g.push({ wall, onnx: runClock.ms - clock, timings: res.timings, tokens: res.generated.tokens });
      s.push((await segment()).timings);
      d.push((await greedy()).timings);
    }
    const stages: Record<StageName, number> = {
      vision_ms: median(g.map((x) => x.timings.vision ?? 0)),
      prefill_ms: median(g.map((x) => x.timings.prefill ?? 0)),
      decode_ms_per_token: median(d.map((x) => x.per_step ?? 0)),
      mask_ms: median(s.map((x) => x.mask ?? 0)),
      ground_total_ms: median(g.map((x) => x.wall)),
      segment_box_total_ms: median(s.map((x) => x.total ?? 0)),
    };
    return {
      stages,
      box,
      tokens: free.tokens,
      groundTokens: median(g.map((x) => x.tokens)),
      hostOverhead: median(g.map((x) => 1 - x.onnx / x.wall)),
      peakRssMb: round(process.resourceUsage().maxRSS / 1024),
      provider: (await engine.info()).executionProvider,
    };
  } finally {
    await engine.dispose();
    await rm(out, { recursive: true, force: true });
  }
}

/** The reference's side: `python -m modelkit bench-reference`, its JSON object. */
function runReference(o: CompareOptions, box: Box, tokens: number): Promise<Record<string, unknown>> {
  const args = [
    "-m",
    "modelkit",
    "bench-reference",
    "--reference",
    o.reference,
    "--pack",
    o.pack,
    "--image",
    o.image,
    "--tokens",
    String(tokens),
    "--runs",
    String(o.runs),
    "--device",
    o.device === "cpu" ? "cpu" : "cuda",
    "--dtype",
    o.referenceDtype,
    "--expression",
    o.expression,
    "--box",
    box.join(","),
    ...(o.threads > 0 ? ["--threads", String(o.threads)] : []),
  ];
  return new Promise((resolve, reject) => {
    const child = spawn(o.python, args, { stdio: ["ignore", "pipe", "inherit"] });
    let stdout = "";
    child.stdout.on("data", (chunk: Buffer) => {
      stdout += chunk.toString();
    });
    child.on("error", reject);
    child.on("exit", (code) => {
      const last = stdout.trim().split("\n").at(-1) ?? "";
      if (code !== 0) return reject(new Error(`bench-reference exited with code ${code}`));
      try {
        resolve(JSON.parse(last) as Record<string, unknown>);
      } catch {
        reject(new Error(`bench-reference printed no JSON: ${last.slice(0, 200)}`));
      }
    });
  });
}

/** Copy bandwidth of this machine, GB/s: the best of a few 256 MiB array copies. */
function copyBandwidthGBs(): number {
  const n = (256 * 1024 * 1024) / 4;
  const a = new Float32Array(n).fill(1);
  const b = new Float32Array(n);
  let best = Number.POSITIVE_INFINITY;
  for (let i = 0; i < 5; i++) {
    const t0 = performance.now();
    b.set(a);
    best = Math.min(best, performance.now() - t0);
  }
  return (n * 4) / (best / 1000) / 1e9;
}

/** Bytes of the language model's weights: its graph and external data files. */
async function decoderBytes(pack: string): Promise<number> {
  let total = 0;
  for (const f of ["decoder_model_merged.onnx", "decoder_model_merged.onnx_data"]) {
    total += await stat(path.join(pack, f)).then(
      (s) => s.size,
      () => 0,
    );
  }
  return total;
}

export async function compare(o: CompareOptions): Promise<Record<string, unknown>> {
  const ts = await measureRuntime(o);
  // Both sides write the same number of answer tokens: as many as ground wrote here (at most `tokens`).
  const tokens = Math.max(1, Math.round(ts.groundTokens));
  const ref = await runReference(o, ts.box, tokens);
  const refFree = tokens === o.tokens ? ref : await runReference(o, ts.box, o.tokens);
  const stages: Record<string, { ts: number; reference: number; speedup: number }> = {};
  for (const [name, value] of Object.entries(ts.stages)) {
    const reference = Number(ref[name]);
    stages[name] = { ts: round(value), reference: round(reference), speedup: round(reference / value, 2) };
  }
  const bandwidth = copyBandwidthGBs();
  const floor = ((await decoderBytes(o.pack)) / (bandwidth * 1e9)) * 1000;
  const refTokens = (refFree.tokens as number[] | undefined) ?? [];
  return {
    stages,
    tokens_identical: refTokens.length === ts.tokens.length && refTokens.every((t, i) => t === ts.tokens[i]),
    tokens: { ts: ts.tokens, reference: refTokens, ground_answer_tokens: tokens },
    host_overhead_fraction: round(ts.hostOverhead, 4),
    peak_rss_mb: { ts: ts.peakRssMb, reference: ref.peak_rss_mb },
    bandwidth_floor_ms_per_token: round(floor),
    copy_bandwidth_gb_s: round(bandwidth, 2),
    decode_vs_floor: round(ts.stages.decode_ms_per_token / floor, 2),
    runs: o.runs,
    image: o.image,
    pack: o.pack,
    provider: ts.provider,
    reference_info: {
      device: ref.device,
      dtype: ref.dtype,
      threads: ref.threads,
      attention: ref.attn_implementation ?? ref.attention,
      torch: ref.torch,
      transformers: ref.transformers,
    },
    machine: { cpus: os.cpus().length, cpu: os.cpus()[0]?.model, node: process.version },
  };
}
