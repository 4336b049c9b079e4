/**
 * The side-by-side benchmark: this runtime and transformers eager (a Python subprocess, `modelkit
 * bench-reference --serve`) on the same weights, image, prompt and token count, in one invocation,
 * round by round (one run of ours, one of the reference, and again). Stage medians over `runs` after
 * a warm-up on each side; the image cache is off, so every call decodes and encodes the image as a
 * first question does.
 *
 * Stages, ts vs reference:
 * - vision_ms: vision encoder (with its host-side tables) vs the visual tower;
 * - prefill_ms: prefill of the grounding prompt (the image prefix, then the question) vs one prefill;
 * - decode_ms_per_token: one decoder call per token, greedy, no grammar, vs the same with HF's cache;
 * - mask_ms: mask decoder for one box vs the PyTorch module;
 * - ground_total_ms: image bytes to `tokens` answer tokens, greedy, no grammar, on both sides (the
 *   same pipeline as `ground`: decode, preprocess, vision, prefill, decoding);
 * - ground_answer_total_ms: the `ground` call itself (grammar-constrained, forced text fed as chunks,
 *   at most `tokens` answer tokens) vs the reference's pass with as many answer tokens (decode steps
 *   at its round's mean step time): with random weights the answer is often just `[]`;
 * - segment_box_total_ms: `segment` with a box, from bytes to the mask PNG written vs preprocess +
 *   vision + prefill of the prompt and the box text + mask decoder.
 * speedup = reference / ts (> 1: this runtime is faster).
 */

import { type ChildProcessByStdio, spawn } from "node:child_process";
import { mkdtemp, rm, stat } from "node:fs/promises";
import os from "node:os";
import path from "node:path";
import type { Readable, Writable } from "node:stream";
import { runClock } from "../src/runtime/onnx.js";
import { Pipeline } from "../src/runtime/pipeline.js";
import type { Box, ExecutionProvider } from "../src/runtime/types.js";
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
  | "ground_answer_total_ms"
  | "segment_box_total_ms";

export function median(xs: readonly number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  const mid = Math.floor(s.length / 2);
  return s.length % 2 ? (s[mid] as number) : ((s[mid - 1] as number) + (s[mid] as number)) / 2;
}

const round = (v: number, digits = 1) => Math.round(v * 10 ** digits) / 10 ** digits;

/** The reference as a subprocess in `--serve` mode: it warms up once, then runs a round when asked. */
class Reference {
  readonly #child: ChildProcessByStdio<Writable, Readable, null>;
  readonly #lines: string[] = [];
  #wake: (() => void) | undefined;
  #exit: string | undefined;

  private constructor(child: ChildProcessByStdio<Writable, Readable, null>) {
    this.#child = child;
    let buffer = "";
    child.stdout.on("data", (chunk: Buffer) => {
      buffer += chunk.toString();
      for (let nl = buffer.indexOf("\n"); nl >= 0; nl = buffer.indexOf("\n")) {
        this.#lines.push(buffer.slice(0, nl));
        buffer = buffer.slice(nl + 1);
      }
      this.#wake?.();
    });
    child.on("exit", (code) => {
      this.#exit = `bench-reference exited with code ${code}`;
      this.#wake?.();
    });
  }

  static start(o: CompareOptions, box: Box): Reference {
    const args = [
      "-m",
      "modelkit",
      "bench-reference",
      "--serve",
      "--reference",
      o.reference,
      "--pack",
      o.pack,
    ];
    args.push("--image", o.image, "--tokens", String(o.tokens), "--runs", "1", "--device");
    args.push(o.device === "cpu" ? "cpu" : "cuda", "--dtype", o.referenceDtype, "--expression", o.expression);
    args.push("--box", box.join(","), ...(o.threads > 0 ? ["--threads", String(o.threads)] : []));
    return new Reference(spawn(o.python, args, { stdio: ["pipe", "pipe", "inherit"] }));
  }

  /** The next JSON line it prints. */
  async next(): Promise<Record<string, unknown>> {
    while (this.#lines.length === 0) {
      if (this.#exit) throw new Error(this.#exit);
      await new Promise<void>((resolve) => {
        this.#wake = resolve;
      });
    }
    return JSON.parse(this.#lines.shift() as string) as Record<string, unknown>;
  }

  async round(answerTokens: number): Promise<Record<string, unknown>> {
    this.#child.stdin.write(`round ${answerTokens}\n`);
    return this.next();
  }

  async done(): Promise<Record<string, unknown>> {
    this.#child.stdin.end("done\n");
    return this.next();
  }
}

type Samples = Record<StageName, number[]>;

const emptySamples = (): Samples => ({
  vision_ms: [],
  prefill_ms: [],
  decode_ms_per_token: [],
  mask_ms: [],
  ground_total_ms: [],
  ground_answer_total_ms: [],
  segment_box_total_ms: [],
});
/**
 * Copy bandwidth of this machine, GB/s, counted as STREAM counts it (bytes read + bytes written): the
 * best of a few 256 MiB array copies. A decode step reads its weights once, so weight bytes over this
 * rate is the step's floor (counting only one side of the copy put the floor at twice the truth).
 */
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
  return (2 * n * 4) / (best / 1000) / 1e9;
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

/**
 * Both sides round by round (ours, then the reference's, and again), so that a machine whose speed
 * drifts (shared CPUs do) slows both alike; stage medians over the rounds.
 */
export async function compare(o: CompareOptions): Promise<Record<string, unknown>> {
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
    // Warm-up (session initialisation, allocator growth); the answer's length sets the reference's.
    const answerTokens = (await ground()).generated.tokens;
    await segment();
    const free = await greedy();
    const reference = Reference.start(o, box);
    const ready = await reference.next();
    const ts = emptySamples();
    const ref = emptySamples();
    const overhead: number[] = [];
    for (let r = 0; r < o.runs; r++) {
      const clock = runClock.ms;
      const t0 = performance.now();
      const g = await ground();
      const wall = performance.now() - t0;
      overhead.push(1 - (runClock.ms - clock) / wall);
      const s = (await segment()).timings;
      const t1 = performance.now();
      const d = (await greedy()).timings;
      ts.ground_total_ms.push(performance.now() - t1);
      ts.vision_ms.push(g.timings.vision ?? 0);
      ts.prefill_ms.push(g.timings.prefill ?? 0);
      ts.decode_ms_per_token.push(d.per_step ?? 0);
      ts.mask_ms.push(s.mask ?? 0);
      ts.ground_answer_total_ms.push(wall);
      ts.segment_box_total_ms.push(s.total ?? 0);
      const rr = await reference.round(g.generated.tokens);
      for (const k of Object.keys(ref) as StageName[]) ref[k].push(Number(rr[k]));
    }
    const info = await reference.done();
    const stages: Record<
      string,
      { ts: number; reference: number; speedup: number; ts_runs: number[]; reference_runs: number[] }
    > = {};
    for (const k of Object.keys(ts) as StageName[]) {
      const a = median(ts[k]);
      const b = median(ref[k]);
      stages[k] = {
        ts: round(a),
        reference: round(b),
        speedup: round(b / a, 2),
        ts_runs: ts[k].map((v) => round(v)),
        reference_runs: ref[k].map((v) => round(v)),
      };
    }
    const refTokens = (ready.tokens as number[] | undefined) ?? [];
    const bandwidth = copyBandwidthGBs();
    const floor = ((await decoderBytes(o.pack)) / (bandwidth * 1e9)) * 1000;
    return {
      stages,
      tokens_identical:
        refTokens.length === free.tokens.length && refTokens.every((t, i) => t === free.tokens[i]),
      tokens: { ts: free.tokens, reference: refTokens, ground_answer_tokens: answerTokens },
      host_overhead_fraction: round(median(overhead), 4),
      peak_rss_mb: { ts: round(process.resourceUsage().maxRSS / 1024), reference: info.peak_rss_mb },
      bandwidth_floor_ms_per_token: round(floor),
      copy_bandwidth_gb_s: round(bandwidth, 2),
      decode_vs_floor: round(median(ts.decode_ms_per_token) / floor, 2),
      runs: o.runs,
      image: o.image,
      pack: o.pack,
      provider: (await engine.info()).executionProvider,
      reference_info: {
        device: info.device,
        dtype: info.dtype,
        threads: info.threads,
        attention: info.attn_implementation,
        torch: info.torch,
        transformers: info.transformers,
        greedy_min_logit_margin: ready.greedy_min_logit_margin,
      },
      machine: { cpus: os.cpus().length, cpu: os.cpus()[0]?.model, node: process.version },
    };
  } finally {
    await engine.dispose();
    await rm(out, { recursive: true, force: true });
  }
}
