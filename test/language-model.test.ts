/**
 * The decode loop's helpers, and its ownership of KV caches: with a scripted graph that hands out
 * device tensors (as WebGPU does), every cache a decode makes is released exactly once, as soon as
 * the next step has consumed it, and the caller's start cache is never touched.
 */

import path from "node:path";
import { describe, expect, it } from "vitest";
import { SegError } from "../src/errors.js";
import {
  argmax,
  type KvCache,
  KvStorage,
  LanguageModel,
  type LmDims,
  lmDims,
  tokenProbability,
} from "../src/runtime/language-model.js";
import {
  type DeviceTensor,
  type Feeds,
  type GraphRunner,
  isHostTensor,
  OnnxSession,
  RunOutputs,
} from "../src/runtime/onnx.js";
import { loadPack } from "../src/runtime/pack.js";

describe("generation helpers", () => {
  it("tokenProbability equals the full softmax", () => {
    const logits = new Float32Array(1000);
    for (let i = 0; i < logits.length; i++) logits[i] = Math.sin(i * 1.7) * 8;
    logits[123] = 12;
    let sum = 0;
    for (const v of logits) sum += Math.exp(v - 12);
    for (const t of [123, 5, 999]) {
      expect(tokenProbability(logits, t)).toBeCloseTo(Math.exp((logits[t] as number) - 12) / sum, 12);
    }
  });

  it("argmax takes the first maximum", () => {
    expect(argmax(new Float32Array([1, 3, 3, -1]))).toBe(1);
  });
});

/** A device tensor that knows whether it is still alive. */
class FakeDevice implements DeviceTensor {
  released = 0;
  constructor(readonly dims: readonly number[]) {}
  dispose(): void {
    this.released++;
  }
}

/** A language-model graph that keeps its presents "on the device" and checks what it is fed. */
class ScriptedGraph implements GraphRunner {
  readonly made: FakeDevice[] = [];
  constructor(readonly dims: LmDims) {}
  async run(feeds: Feeds): Promise<RunOutputs> {
    const { layers, kvHeads, headDim, hidden, vocab } = this.dims;
    const s = (feeds.input_ids?.dims[1] as number) ?? 0;
    let past = 0;
    for (let i = 0; i < layers; i++) {
      for (const kind of ["key", "value"]) {
        const t = feeds[`past_key_values.${i}.${kind}`];
        if (!t) throw new Error("missing past");
        if (!isHostTensor(t) && (t as FakeDevice).released > 0)
          throw new SegError("INFERENCE_FAILED", "fed a released tensor");
        past = t.dims[2] as number;
      }
    }
    const out: Record<string, FakeDevice | { data: Float32Array; dims: number[] }> = {};
    const logits = new Float32Array(vocab);
    logits[(past + s) % vocab] = 1; // a deterministic "next token"
    out.logits = { data: logits, dims: [1, 1, vocab] };
    out.last_hidden_state = { data: new Float32Array(s * hidden), dims: [1, s, hidden] };
    for (let i = 0; i < layers; i++) {
      for (const kind of ["key", "value"]) {
        const t = new FakeDevice([1, kvHeads, past + s, headDim]);
        this.made.push(t);
        out[`present.${i}.${kind}`] = t;
      }
    }
    return new RunOutputs(out, "scripted");
  }
  async dispose(): Promise<void> {}
}

describe("KV caches kept on the device", () => {
  const dims: LmDims = { layers: 2, kvHeads: 1, headDim: 4, hidden: 8, vocab: 50 };

  it("generate releases each cache it made once, right after the next step consumed it", async () => {
    const graph = new ScriptedGraph(dims);
    const lm = new LanguageModel(graph, dims);
    const pre = await lm.step([1, 2, 3], new BigInt64Array(9), lm.emptyCache());
    const start = pre.cache;
    const madeByPrefill = graph.made.length;
    const gen = await lm.generate(
      { logits: pre.logits, lastHidden: pre.hidden.subarray(16), cache: start },
      { maxNewTokens: 6, stopTokens: new Set(), ropeDelta: 0 },
    );
    expect(gen.tokens).toHaveLength(6);
    expect(gen.steps).toBe(5);
    const mine = graph.made.slice(madeByPrefill);
    expect(mine).toHaveLength(5 * 2 * dims.layers);
    expect(mine.every((t) => t.released === 1)).toBe(true);
    // The caller's cache is the caller's: untouched, and it can be released by its owner.
    expect((start as KvCache).tensors.every((t) => (t as FakeDevice).released === 0)).toBe(true);
  });

  it("a cancelled decode releases what it made too", async () => {
    const graph = new ScriptedGraph(dims);
    const lm = new LanguageModel(graph, dims);
    const pre = await lm.step([1], new BigInt64Array(3), lm.emptyCache());
    const controller = new AbortController();
    const run = lm.generate(
      { logits: pre.logits, lastHidden: pre.hidden, cache: pre.cache },
      {
        maxNewTokens: 50,
        stopTokens: new Set(),
        ropeDelta: 0,
        signal: controller.signal,
        onToken: (n) => {
          if (n === 3) controller.abort();
        },
      },
    );
    await expect(run).rejects.toMatchObject({ code: "CANCELLED" });
    const made = graph.made.slice(2 * dims.layers);
    expect(made.length).toBeGreaterThan(0);
    expect(made.every((t) => t.released === 1)).toBe(true);
  });
});

describe("KV cache written in place (GroupQueryAttention graphs on the CPU)", () => {
  it("KvStorage grows keeping every head's rows", () => {
    const storage = new KvStorage(2, 2, 3, 4); // [1, 2 heads, 4 rows, 3]
    const [k] = storage.tensors();
    if (!k) throw new Error("no tensor");
    k.data.forEach((_, i) => {
      k.data[i] = i;
    });
    storage.ensure(5, 3);
    const [grown] = storage.tensors();
    expect(grown?.dims).toEqual([1, 2, 5 + 256, 3]);
    // head 0 rows 0..2 and head 1 rows 0..2 survive, at the new stride
    expect(Array.from(grown?.data.subarray(0, 9) ?? [])).toEqual([0, 1, 2, 3, 4, 5, 6, 7, 8]);
    const stride = (5 + 256) * 3;
    expect(Array.from(grown?.data.subarray(stride, stride + 9) ?? [])).toEqual([
      12, 13, 14, 15, 16, 17, 18, 19, 20,
    ]);
  });

  it("decodes the same tokens as a cache copied every step, also past a growth of the storage", async () => {
    const pack = await loadPack(path.resolve(import.meta.dirname, "../models/tiny-random"));
    expect(pack.manifest.graphs.language_model.attention).toBe("group_query");
    const session = await OnnxSession.create(pack.file(pack.manifest.graphs.language_model.file), {
      provider: "cpu",
    });
    try {
      const dims = lmDims(pack);
      const run = async (inPlace: boolean) => {
        const lm = new LanguageModel(session, dims, { inPlace });
        const n = 40;
        const positions = new BigInt64Array(3 * n);
        for (let a = 0; a < 3; a++) for (let i = 0; i < n; i++) positions[a * n + i] = BigInt(i);
        const pre = await lm.step(
          Array.from({ length: n }, (_, i) => 1000 + i * 7),
          positions,
          lm.emptyCache(),
        );
        const gen = await lm.generate(
          { logits: pre.logits, lastHidden: pre.hidden.subarray((n - 1) * dims.hidden), cache: pre.cache },
          { maxNewTokens: 300, stopTokens: new Set(), ropeDelta: 0 },
        );
        return gen.tokens;
      };
      const copied = await run(false);
      const inPlace = await run(true); // 40 + 300 rows: the storage (40 + 256) grows once
      expect(inPlace).toEqual(copied);
    } finally {
      await session.dispose();
    }
  });
});
