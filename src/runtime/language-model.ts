/**
 * Stage 2: the language model, decoder_model_merged.onnx (docs/design.md): one graph for prefill
 * and KV-cache decoding. `step` feeds tokens after a cache; `generate` decodes greedily from the state
 * after a prefill, with stop tokens, a token budget, cancellation between steps and an optional
 * grammar constraint whose fixed text is fed as one chunk.
 */

import { SegError, throwIfAborted } from "../errors.js";
import type { AdvanceEvent } from "./grammar.js";
import {
  type DeviceTensor,
  f32,
  type GraphRunner,
  type HostTensor,
  i64,
  isHostTensor,
  type KeptTensor,
  OnnxSession,
  release,
  type SessionOptions,
} from "./onnx.js";
import type { LoadedPack } from "./pack.js";
import { decodePositions } from "./rope.js";

export interface LmDims {
  layers: number;
  kvHeads: number;
  headDim: number;
  hidden: number;
  vocab: number;
}

/** The sizes the runtime needs, from the pack's text config. */
export function lmDims(pack: LoadedPack): LmDims {
  const t = pack.manifest.model.text;
  return {
    layers: t.num_hidden_layers,
    kvHeads: t.num_key_value_heads,
    headDim: t.head_dim,
    hidden: t.hidden_size,
    vocab: t.vocab_size,
  };
}

/** Rows a storage gets beyond what it must hold, so a question and a short answer fit without growing. */
const KV_HEADROOM = 256;

/**
 * Host KV rows of one sequence, written in place: per layer and kind a buffer [1, nKV, capacity, hd]
 * that onnxruntime's GroupQueryAttention reads as the past and writes the new rows into (the same
 * buffer is fed as the past and given as the present output), so a step copies no cache. Caches made
 * from one storage share it: a step writes only rows at and after its cache's length, so the rows
 * below an earlier cache's length never change (requests run one at a time). When full it grows
 * once, rows copied, for every holder.
 */
export class KvStorage {
  #buffers: Float32Array[];
  #capacity: number;
  readonly #kvHeads: number;
  readonly #headDim: number;

  constructor(count: number, kvHeads: number, headDim: number, capacity: number) {
    this.#kvHeads = kvHeads;
    this.#headDim = headDim;
    this.#capacity = capacity;
    this.#buffers = Array.from({ length: count }, () => new Float32Array(kvHeads * capacity * headDim));
  }

  get bytes(): number {
    return this.#buffers.length * this.#kvHeads * this.#capacity * this.#headDim * 4;
  }

  /** Room for `rows` rows, keeping the first `keep` (the rows a live cache holds). */
  ensure(rows: number, keep: number): void {
    if (rows <= this.#capacity) return;
    const capacity = Math.max(rows + KV_HEADROOM, 2 * this.#capacity);
    const hd = this.#headDim;
    this.#buffers = this.#buffers.map((old) => {
      const grown = new Float32Array(this.#kvHeads * capacity * hd); // [nKV, capacity, hd]
      for (let h = 0; h < this.#kvHeads; h++) {
        grown.set(old.subarray(h * this.#capacity * hd, (h * this.#capacity + keep) * hd), h * capacity * hd);
      }
      return grown;
    });
    this.#capacity = capacity;
  }

  /** The buffers as graph tensors [1, nKV, capacity, hd]. */
  tensors(): HostTensor<Float32Array>[] {
    return this.#buffers.map((b) => f32(b, [1, this.#kvHeads, this.#capacity, this.#headDim]));
  }
}

/**
 * Past keys/values after k_norm and RoPE: 2L tensors [1, nKV, length, hd], or a shared in-place
 * `storage` whose first `length` rows are this cache's. On WebGPU the tensors stay on the GPU between
 * steps; whoever made a cache releases it (`releaseCache`).
 */
export interface KvCache {
  readonly length: number;
  readonly tensors: readonly KeptTensor[];
  readonly storage?: KvStorage;
}

/** Release a cache's device tensors (host arrays are the garbage collector's). */
export function releaseCache(cache: KvCache): void {
  for (const t of cache.tensors) release(t);
}

/** Bytes a cache holds, wherever it lives (f32). */
export function cacheBytes(cache: KvCache): number {
  if (cache.storage) return cache.storage.bytes;
  let n = 0;
  for (const t of cache.tensors)
    n += isHostTensor(t) ? t.data.byteLength : 4 * t.dims.reduce((a, b) => a * b, 1);
  return n;
}

export interface StepResult {
  /** [V] logits of the last position. */
  logits: Float32Array;
  /** [S, H] final-norm hidden states of every fed position. */
  hidden: Float32Array;
  cache: KvCache;
}

/** What a constrained decoder needs from a grammar (implemented by grammar.ts's BoxGrammar). */
export interface TokenConstraint {
  /** Tokens the grammar forces next (fixed text), possibly empty. */
  forced(): number[];
  /** Best allowed token under `logits`. */
  pick(logits: Float32Array): number;
  /**
   * Accept a token. `boxClosed`: it closed a box's coordinate list (T_seg capture); `coordinate`: it
   * holds coordinate digits (box scores); `lastCoordinateInToken`: the closing token also holds the
   * last digit, which would make T_seg the next step's row (no Qwen token does this);
   * `opensObject`, `label`, `closesObject`: where an object's evidence starts, grows and ends.
   */
  advance(token: number): AdvanceEvent;
  isDone(): boolean;
}

/**
 * How sure the model was of one object it wrote, as natural-log probabilities (<= 0) of its sampled
 * tokens under the full softmax (forced tokens count as log 1 = 0): the token that chose to open the
 * object rather than end the list, the mean and the least of its coordinate tokens, the mean of its
 * label tokens. Calibration (pack.json) turns them into one grounding score.
 */
export interface BoxEvidence {
  open: number;
  coordMean: number;
  coordMin: number;
  labelMean: number;
}

/** Sums an object's evidence while it is written. */
class EvidenceTally {
  open = 0;
  #coordSum = 0;
  #coordMin = 0;
  #coordN = 0;
  #labelSum = 0;
  #labelN = 0;

  add(event: AdvanceEvent, logProb: number): void {
    if (event.coordinate) {
      this.#coordSum += logProb;
      this.#coordMin = Math.min(this.#coordMin, logProb);
      this.#coordN++;
    }
    if (event.label) {
      this.#labelSum += logProb;
      this.#labelN++;
    }
  }

  evidence(): BoxEvidence {
    return {
      open: this.open,
      coordMean: this.#coordN > 0 ? this.#coordSum / this.#coordN : 0,
      coordMin: this.#coordMin,
      labelMean: this.#labelN > 0 ? this.#labelSum / this.#labelN : 0,
    };
  }
}

export interface GenerateOptions {
  maxNewTokens: number;
  stopTokens: ReadonlySet<number>;
  ropeDelta: number;
  constraint?: TokenConstraint;
  signal?: AbortSignal;
  onToken?: (generated: number) => void;
}

export interface GenerateResult {
  tokens: number[];
  /** Probability of each generated token (forced tokens count as 1). */
  probs: number[];
  /** Final-norm hidden state [H] that predicted each box-closing token (T_seg per box). */
  boxHidden: Float32Array[];
  /** Per closed object, in order: the log-probabilities of the tokens that wrote it. */
  boxEvidence: BoxEvidence[];
  /** Decoder calls made (one per sampled token or forced chunk). */
  steps: number;
  stoppedBy: "stop" | "budget" | "grammar";
}

export class LanguageModel {
  readonly dims: LmDims;
  readonly #session: GraphRunner;
  readonly #pastNames: string[] = [];
  readonly #presentNames: string[] = [];
  /** The cache is written in place (KvStorage): a GroupQueryAttention graph with its KV on the host. */
  readonly #inPlace: boolean;

  /** Over a loaded graph (`load` is the usual way; tests pass a scripted one). */
  constructor(session: GraphRunner, dims: LmDims, options: { inPlace?: boolean } = {}) {
    this.#session = session;
    this.dims = dims;
    this.#inPlace = options.inPlace ?? false;
    for (let i = 0; i < dims.layers; i++) {
      this.#pastNames.push(`past_key_values.${i}.key`, `past_key_values.${i}.value`);
      this.#presentNames.push(`present.${i}.key`, `present.${i}.value`);
    }
  }

  static async load(pack: LoadedPack, options: SessionOptions): Promise<LanguageModel> {
    const t = pack.manifest.model.text;
    const presents = Array.from({ length: t.num_hidden_layers }, (_, i) => [
      `present.${i}.key`,
      `present.${i}.value`,
    ]);
    // The KV cache stays where it is computed; only logits and hidden states come back to the host.
    const graph = pack.manifest.graphs.language_model;
    const session = await OnnxSession.create(pack.file(graph.file), {
      ...options,
      keepOnDevice: presents.flat(),
    });
    const dims = lmDims(pack);
    // In place on the CPU, where the KV lives on the host anyway (WebGPU keeps it on the GPU instead).
    return new LanguageModel(session, dims, {
      inPlace: graph.attention === "group_query" && session.provider === "cpu",
    });
  }

  emptyCache(): KvCache {
    if (this.#inPlace) return { length: 0, tensors: [] };
    const dims = [1, this.dims.kvHeads, 0, this.dims.headDim];
    return { length: 0, tensors: this.#pastNames.map(() => f32(new Float32Array(0), dims)) };
  }

  /**
   * Prefill of a prompt holding one image's pads from `padStart`: the image features replace the pad
   * rows' embeddings and the DeepStack features are added after layers 0..2 there (docs/design.md).
   */
  prefillImage(
    ids: readonly number[],
    positions: BigInt64Array,
    padStart: number,
    features: { imageFeatures: Float32Array; deepstack: Float32Array },
  ): Promise<StepResult> {
    const s = ids.length;
    const h = this.dims.hidden;
    const m = features.imageFeatures.length / h;
    const visual = new Float32Array(4 * s * h); // [4, 1, S, H]: features at the pad rows, zeros elsewhere
    visual.set(features.imageFeatures, padStart * h);
    for (let k = 0; k < 3; k++) {
      visual.set(features.deepstack.subarray(k * m * h, (k + 1) * m * h), ((k + 1) * s + padStart) * h);
    }
    return this.step(ids, positions, this.emptyCache(), visual);
  }

  /**
   * Feed S tokens after `cache`. `positions` is [3, S] (T, H, W rows); `visual` is [4, S, H] for a
   * prefill containing image pads (see docs/design.md) and zeros otherwise.
   */
  async step(
    ids: readonly number[],
    positions: BigInt64Array,
    cache: KvCache,
    visual?: Float32Array,
  ): Promise<StepResult> {
    const s = ids.length;
    const { hidden: h, vocab } = this.dims;
    if (positions.length !== 3 * s) {
      throw new SegError(
        "INFERENCE_FAILED",
        `position ids hold ${positions.length} values, expected ${3 * s}`,
      );
    }
    const visualEmbeds = visual ?? new Float32Array(4 * s * h); // [4, 1, S, H]
    if (visualEmbeds.length !== 4 * s * h) {
      throw new SegError(
        "INFERENCE_FAILED",
        `visual embeds hold ${visualEmbeds.length} values, expected ${4 * s * h}`,
      );
    }
    const total = cache.length + s;
    const feeds: Record<string, HostTensor | DeviceTensor> = {
      input_ids: i64(
        BigInt64Array.from(ids, (v) => BigInt(v)),
        [1, s],
      ),
      visual_embeds: f32(visualEmbeds, [4, 1, s, h]),
      attention_mask: i64(new BigInt64Array(total).fill(1n), [1, total]),
      position_ids: i64(positions, [3, 1, s]),
    };
    let storage: KvStorage | undefined;
    let past: readonly KeptTensor[] = cache.tensors;
    if (this.#inPlace) {
      const { layers, kvHeads, headDim } = this.dims;
      storage = cache.storage ?? new KvStorage(2 * layers, kvHeads, headDim, total + KV_HEADROOM);
      storage.ensure(total, cache.length);
      past = storage.tensors();
    }
    this.#pastNames.forEach((name, k) => {
      feeds[name] = past[k] as KeptTensor;
    });
    // In place: the presents are written into the very buffers fed as the past.
    const into = storage
      ? Object.fromEntries(this.#presentNames.map((name, k) => [name, past[k] as HostTensor<Float32Array>]))
      : undefined;
    const out = await this.#session.run(feeds, into ? { into } : {});
    const logits = out.float("logits"); // [1, 1, V]
    const hidden = out.float("last_hidden_state"); // [1, S, H]
    if (logits.length !== vocab || hidden.length !== s * h) {
      throw new SegError(
        "INFERENCE_FAILED",
        `the language model returned ${logits.length} logits and ${hidden.length} hidden values, expected ${vocab} and ${s * h}`,
      );
    }
    // The storage's own buffers are the cache (tensors taken now would pin them across a growth).
    if (storage) return { logits, hidden, cache: { length: total, tensors: [], storage } };
    const tensors = this.#presentNames.map((name) => out.kept(name)); // [1, nKV, past + S, hd] each
    return { logits, hidden, cache: { length: total, tensors } };
  }

  /**
   * Greedy decoding from the state after a prefill. `start` holds the last logits and the hidden
   * state that produced them ([H]); each step feeds the chosen token (or a forced chunk) and continues.
   * `start.cache` stays the caller's; every cache made here is released here, each as soon as the
   * next step has consumed it.
   */
  async generate(
    start: { logits: Float32Array; lastHidden: Float32Array; cache: KvCache },
    options: GenerateOptions,
  ): Promise<GenerateResult> {
    const { constraint, stopTokens, ropeDelta, signal } = options;
    const h = this.dims.hidden;
    const tokens: number[] = [];
    const probs: number[] = [];
    const boxHidden: Float32Array[] = [];
    const boxEvidence: BoxEvidence[] = [];
    let tally = new EvidenceTally();
    // An object's tokens in order: label characters, the closing `}`, then perhaps the next `, {`.
    const note = (event: AdvanceEvent, logProb: number) => {
      tally.add(event, logProb);
      if (event.closesObject) {
        boxEvidence.push(tally.evidence());
        tally = new EvidenceTally();
      }
      if (event.opensObject) tally.open = logProb;
    };
    let steps = 0;
    let { logits, lastHidden, cache } = start;
    let stoppedBy: GenerateResult["stoppedBy"] = "budget";
    try {
      while (tokens.length < options.maxNewTokens) {
        throwIfAborted(signal, "during generation");
        if (constraint?.isDone()) {
          stoppedBy = "grammar";
          break;
        }
        const forced = constraint ? constraint.forced() : [];
        let chunk: number[];
        if (forced.length > 0) {
          chunk = forced.slice(0, options.maxNewTokens - tokens.length);
          for (const t of chunk) {
            const event = constraint?.advance(t);
            // The token closing a box follows a number, which the grammar never forces.
            if (event?.boxClosed) throw new SegError("INFERENCE_FAILED", "a forced token closed a box");
            if (event) note(event, 0);
            tokens.push(t);
            probs.push(1);
          }
        } else {
          const token = constraint ? constraint.pick(logits) : argmax(logits);
          const p = tokenProbability(logits, token);
          const event = constraint?.advance(token);
          if (event?.lastCoordinateInToken) {
            throw new SegError("INFERENCE_FAILED", "this vocabulary merges a coordinate digit with `]`");
          }
          // T_seg: the state that predicted the closing token, i.e. the one at the last digit.
          if (event?.boxClosed) boxHidden.push(lastHidden.slice());
          if (event) note(event, Math.log(Math.max(p, 1e-30)));
          tokens.push(token);
          probs.push(p);
          if (stopTokens.has(token)) {
            stoppedBy = "stop";
            break;
          }
          chunk = [token];
        }
        options.onToken?.(tokens.length);
        if (constraint?.isDone()) {
          stoppedBy = "grammar";
          break;
        }
        if (tokens.length >= options.maxNewTokens) break;
        const next = await this.step(chunk, decodePositions(cache.length, chunk.length, ropeDelta), cache);
        if (cache !== start.cache) releaseCache(cache); // consumed by the step just run
        steps++;
        logits = next.logits;
        lastHidden = next.hidden.subarray((chunk.length - 1) * h, chunk.length * h);
        cache = next.cache;
      }
    } finally {
      if (cache !== start.cache) releaseCache(cache);
    }
    return { tokens, probs, boxHidden, boxEvidence, steps, stoppedBy };
  }

  dispose(): Promise<void> {
    return this.#session.dispose();
  }
}

export function argmax(logits: Float32Array): number {
  let best = 0;
  let bestValue = Number.NEGATIVE_INFINITY;
  for (let i = 0; i < logits.length; i++) {
    const v = logits[i] as number;
    if (v > bestValue) {
      bestValue = v;
      best = i;
    }
  }
  return best;
}

/**
 * Softmax probability of `token` under `logits`. Logits more than 30 below the maximum are skipped
 * in the normaliser: each weighs under 1e-13, so even 151,936 of them move the result by < 2e-8,
 * and skipping their exp() makes this a scan instead of 151,936 exponentials per step.
 */
export function tokenProbability(logits: Float32Array, token: number): number {
  let max = Number.NEGATIVE_INFINITY;
  for (let i = 0; i < logits.length; i++) if ((logits[i] as number) > max) max = logits[i] as number;
  const floor = max - 30;
  let sum = 0;
  for (let i = 0; i < logits.length; i++) {
    const v = logits[i] as number;
    if (v > floor) sum += Math.exp(v - max);
  }
  return Math.exp((logits[token] as number) - max) / sum;
}
