/**
 * The inference pipeline in the current thread: ground, segment and describe as short compositions
 * of three stages (VisionEncoder, LanguageModel, MaskDecoder) around a cache of encoded images.
 * engine.ts runs it inside a worker and hands it one request at a time.
 *
 *   encode:   bytes -> decode -> preprocess -> vision encoder -> prefill of the image prefix (cached)
 *   ground:   encode -> prefill the question -> grammar-constrained decoding -> boxes + T_seg states
 *   segment:  encode -> (ground | prefill the question and the given box) -> mask decoder -> PNG files
 *   describe: encode (the image, or a crop around the box) -> prefill the question -> decoding -> text
 */

import { createHash } from "node:crypto";
import sharp from "sharp";
import { SegError, throwIfAborted } from "../errors.js";
import { ByteLru, byteSize } from "./cache.js";
import { combinedScore, GroundingScorer, labelAgreement } from "./confidence.js";
import { BoxGrammar, type BoxRecord, BoxVocabulary } from "./grammar.js";
import {
  type BoxEvidence,
  cacheBytes,
  type GenerateResult,
  type KvCache,
  LanguageModel,
  releaseCache,
} from "./language-model.js";
import { MaskDecoder, type MaskDecoderImage, type MaskQuery } from "./mask-decoder.js";
import { type MaskResult, maskFromLogits } from "./mask-post.js";
import type { SessionOptions } from "./onnx.js";
import { type LoadedPack, loadPack } from "./pack.js";
import { cropRgb, type DecodedImage, decodeImage, preprocess } from "./preprocess.js";
import {
  type Box1000,
  boxPrefixText,
  boxTo1000,
  buildChatIds,
  cropBox,
  describeQuestion,
  groundingAnswerIds,
  groundQuestion,
  shortLabel,
} from "./prompt.js";
import { positionsFrom, ropeIndex } from "./rope.js";
import { Timer } from "./timer.js";
import { QwenTokenizer } from "./tokenizer.js";
import type {
  Box,
  CheckedImage,
  DescribeRequest,
  DescribeResult,
  Engine,
  EngineOptions,
  Generated,
  GroundRequest,
  GroundResult,
  PackInfo,
  RequestOptions,
  SegmentRequest,
  SegmentResult,
  StageTimings,
} from "./types.js";
import { DEFAULT_MAX_INSTANCES, ENGINE_DEFAULTS } from "./types.js";
import { VisionEncoder } from "./vision-encoder.js";
import { writeMasks } from "./write.js";

const MAX_DESCRIBE_TOKENS = 48;
/** Generous budget per box: `{"bbox_2d": [1000, 1000, 1000, 1000], "label": "<64 chars>"}, `. */
const TOKENS_PER_BOX = 96;

/** Everything derived from one image that later questions reuse. */
interface EncodedImage extends MaskDecoderImage {
  width: number;
  height: number;
  /** [Hr, Wr] the size the model saw. */
  resized: [number, number];
  /** Tokens of `<|im_start|>user\n<|vision_start|> pads <|vision_end|>` and their KV cache. */
  prefixIds: number[];
  prefixCache: KvCache;
}

interface Prefilled {
  logits: Float32Array;
  /** [H] final-norm hidden state of the last fed token. */
  lastHidden: Float32Array;
  cache: KvCache;
  ropeDelta: number;
}

/** A box to segment: where, what it is called, how sure the model is of it, and its T_seg state. */
interface Query extends MaskQuery {
  label: string;
  box: Box;
  /** Absent for a box the agent gave. */
  groundingScore?: number;
  evidence?: BoxEvidence;
}

/** What grounding kept, and what it did not return and why. */
interface Grounded {
  queries: Query[];
  text: string;
  generated: Generated;
  minScore: number;
  belowMinScore: number;
}

export class Pipeline implements Engine {
  readonly #pack: LoadedPack;
  readonly #tokenizer: QwenTokenizer;
  readonly #vision: VisionEncoder;
  readonly #lm: LanguageModel;
  /** Absent when the pack has none: segment is then refused with MASK_DECODER_MISSING. */
  readonly #maskDecoder: MaskDecoder | undefined;
  readonly #grounding: GroundingScorer;
  readonly #vocab: BoxVocabulary;
  readonly #stop: ReadonlySet<number>;
  readonly #cache: ByteLru<EncodedImage>;
  #current: Promise<unknown> | undefined;

  private constructor(
    pack: LoadedPack,
    tokenizer: QwenTokenizer,
    stages: { vision: VisionEncoder; lm: LanguageModel; maskDecoder: MaskDecoder | undefined },
    cacheBudget: number,
  ) {
    this.#pack = pack;
    this.#tokenizer = tokenizer;
    this.#vision = stages.vision;
    this.#lm = stages.lm;
    this.#maskDecoder = stages.maskDecoder;
    this.#grounding = new GroundingScorer(pack.manifest.calibration?.grounding);
    this.#stop = new Set(pack.manifest.tokens.stop);
    this.#cache = new ByteLru(cacheBudget, (image) => releaseCache(image.prefixCache));
    // Rows past the tokenizer's last id exist in the embedding but are never valid output ('' text).
    this.#vocab = new BoxVocabulary(
      tokenizer.grammarTokenTexts(stages.lm.dims.vocab),
      pack.manifest.tokens.stop,
      {
        encode: (t) => tokenizer.encodePlain(t),
      },
    );
  }

  static async create(options: EngineOptions): Promise<Pipeline> {
    const pack = await loadPack(options.packDir, options.verify ?? ENGINE_DEFAULTS.verify);
    const m = pack.manifest;
    const tokenizer = await QwenTokenizer.fromFiles(
      pack.file(m.tokenizer.file),
      pack.file(m.tokenizer.config),
    );
    const session: SessionOptions = {
      provider: options.executionProvider ?? ENGINE_DEFAULTS.executionProvider,
      threads: options.threads ?? ENGINE_DEFAULTS.threads,
      ...(options.log ? { log: options.log } : {}),
    };
    const loaded: { dispose(): Promise<void> }[] = [];
    const load = async <T extends { dispose(): Promise<void> }>(stage: Promise<T>): Promise<T> => {
      const s = await stage;
      loaded.push(s);
      return s;
    };
    try {
      const vision = await load(VisionEncoder.load(pack, session));
      // The provider is chosen once, on the first graph; the others follow it.
      const chosen: SessionOptions = { ...session, provider: vision.provider };
      const lm = await load(LanguageModel.load(pack, chosen));
      const maskDecoder = m.graphs.mask_decoder ? await load(MaskDecoder.load(pack, chosen)) : undefined;
      const pipeline = new Pipeline(
        pack,
        tokenizer,
        { vision, lm, maskDecoder },
        options.cacheBytes ?? defaultCacheBytes(pack),
      );
      if (options.warmUp ?? vision.provider !== "cpu") await pipeline.#warmUp();
      return pipeline;
    } catch (e) {
      await Promise.all(loaded.map((s) => s.dispose()));
      throw e;
    }
  }

  async info(): Promise<PackInfo> {
    const m = this.#pack.manifest;
    return {
      name: m.name,
      description: m.description,
      ...(m.domain ? { domain: m.domain } : {}),
      segmentation: this.#maskDecoder !== undefined,
      ...(this.#grounding.calibrated ? { groundingThreshold: this.#grounding.threshold } : {}),
      dir: this.#pack.dir,
      dtype: m.dtype,
      provenance: m.provenance,
      model: m.model as Record<string, unknown>,
      preprocess: {
        minPixels: m.preprocess.min_pixels,
        maxPixels: m.preprocess.max_pixels,
        patchSize: m.preprocess.patch_size,
        mergeSize: m.preprocess.merge_size,
      },
      executionProvider: this.#vision.provider,
    };
  }

  ground(req: GroundRequest): Promise<GroundResult> {
    return this.#exclusive(req, async (r) => {
      const { image, cached } = await this.#encode(req.image, r);
      const { queries, text, generated, minScore, belowMinScore } = await this.#ground(image, req, r);
      return {
        found: queries.length > 0,
        image: { width: image.width, height: image.height },
        instances: queries.map(({ label, box, groundingScore = 0, evidence }) => ({
          label,
          box,
          groundingScore,
          score: groundingScore,
          ...(evidence ? { evidence } : {}),
        })),
        minScore,
        rejected: { belowMinScore, emptyMask: 0 },
        text,
        generated,
        timings: r.timer.finish(),
        cached,
      };
    });
  }

  segment(req: SegmentRequest): Promise<SegmentResult> {
    const decoder = this.#maskDecoder;
    if (!decoder) return Promise.reject(this.#noMaskDecoder());
    return this.#exclusive(req, async (r) => {
      const { image, cached, decoded } = await this.#encode(req.image, r);
      const { queries, text, generated, minScore, belowMinScore } =
        "box" in req
          ? await this.#boxQuery(image, req.box, req.label ?? "region", r)
          : await this.#ground(image, req, r);
      const all = await this.#masks(decoder, image, queries, r);
      // A mask with no pixel is not an instance, whatever its box or scores.
      const masks = all.filter((m) => m.mask.areaPx > 0);
      const written = await writeMasks(masks, {
        ...req,
        size: { width: image.width, height: image.height },
        pixels: async () => decoded ?? (await decodeImage(req.image)),
        timer: r.timer,
      });
      return {
        found: written.instances.length > 0,
        image: { width: image.width, height: image.height },
        ...written,
        minScore,
        rejected: { belowMinScore, emptyMask: all.length - masks.length },
        text,
        generated,
        timings: r.timer.finish(),
        cached,
      };
    });
  }

  describe(req: DescribeRequest): Promise<DescribeResult> {
    return this.#exclusive(req, async (r) => {
      const { width, height } = req.image;
      const prompts = this.#pack.manifest.prompts;
      // describe_mode "crop" shows the model a crop around the region (modelkit answers.crop_box)
      // instead of the region's coordinates; only the crop is encoded.
      const crop = prompts.describe_mode === "crop" ? cropBox(req.box, width, height) : undefined;
      const { image, cached } = await this.#encode(req.image, r, crop);
      const question = describeQuestion(prompts, boxTo1000(req.box, width, height));
      const prefill = await this.#prefill(image, question, [], r);
      r.timer.progress("generate", 0);
      const gen = await this.#lm.generate(prefill, {
        maxNewTokens: MAX_DESCRIBE_TOKENS,
        stopTokens: this.#stop,
        ropeDelta: prefill.ropeDelta,
        ...(req.signal ? { signal: req.signal } : {}),
        onToken: (n) => r.timer.progress("generate", n / MAX_DESCRIBE_TOKENS),
      });
      r.timer.lap("generate");
      r.timer.perStep(gen.steps);
      const description = this.#text(gen).trim();
      return {
        image: { width, height },
        box: req.box,
        description,
        label: shortLabel(description),
        timings: r.timer.finish(),
        cached,
      };
    });
  }

  /**
   * Greedy decoding of the grounding prompt without the grammar or stop tokens, exactly `tokens`
   * tokens, as transformers' `generate` does: for comparing tokens with the reference (npm run bench).
   */
  greedy(req: GroundRequest & { tokens: number }): Promise<{ tokens: number[]; timings: StageTimings }> {
    return this.#exclusive(req, async (r) => {
      const { image } = await this.#encode(req.image, r);
      const question = groundQuestion(this.#pack.manifest.prompts, req.expression);
      const prefill = await this.#prefill(image, question, [], r);
      const gen = await this.#lm.generate(prefill, {
        maxNewTokens: req.tokens,
        stopTokens: new Set(),
        ropeDelta: prefill.ropeDelta,
        ...(req.signal ? { signal: req.signal } : {}),
      });
      r.timer.lap("generate");
      r.timer.perStep(gen.steps);
      return { tokens: gen.tokens, timings: r.timer.finish() };
    });
  }

  async dispose(): Promise<void> {
    await this.#current?.catch(() => undefined);
    this.#cache.clear();
    await Promise.all([this.#vision.dispose(), this.#lm.dispose(), this.#maskDecoder?.dispose()]);
  }

  /**
   * Every stage once on a small grey image (vision, prefix and question prefill, a decode step, the
   * mask decoder), so a GPU provider compiles its kernels at load rather than in the first call.
   */
  async #warmUp(): Promise<void> {
    const side = 256;
    const bytes = await sharp({ create: { width: side, height: side, channels: 3, background: "#808080" } })
      .png()
      .toBuffer();
    await this.#exclusive({}, async (r) => {
      const { image } = await this.#encode({ bytes, width: side, height: side }, r);
      await this.#ground(image, { expression: "region", maxTokens: 2 }, r); // one decode step
      const { queries } = await this.#boxQuery(image, [64, 64, 192, 192], "region", r);
      if (this.#maskDecoder) await this.#masks(this.#maskDecoder, image, queries, r);
    });
    this.#cache.clear();
  }

  /** One request at a time: engine.ts's queue guarantees it; this only refuses a second one. */
  async #exclusive<T>(req: RequestOptions, body: (r: RequestScope) => Promise<T>): Promise<T> {
    if (this.#current) {
      throw new SegError(
        "INFERENCE_FAILED",
        "the pipeline runs one request at a time: queue calls (engine.ts does)",
      );
    }
    throwIfAborted(req.signal);
    const scope = new RequestScope(req);
    const run = body(scope);
    this.#current = run;
    try {
      return await run;
    } finally {
      scope.close();
      this.#current = undefined;
    }
  }

  /** Decode + vision encoder + image-prefix prefill, or a cache hit keyed by content and settings. */
  async #encode(
    source: CheckedImage,
    r: RequestScope,
    crop?: Box,
  ): Promise<{ image: EncodedImage; cached: boolean; decoded?: DecodedImage }> {
    const { timer, signal } = r;
    timer.progress("decode", 0);
    const { preprocess: pre, name, tokens, prompts } = this.#pack.manifest;
    const key = createHash("sha256")
      .update(source.bytes)
      .update(`|${pre.min_pixels}|${pre.max_pixels}|${name}${crop ? `|crop:${crop.join(",")}` : ""}`)
      .digest("hex");
    const hit = this.#cache.get(key);
    if (hit) {
      timer.lap("decode");
      return { image: hit, cached: true };
    }
    const decoded = await decodeImage(source);
    const pixels = crop ? cropRgb(decoded, crop) : decoded;
    const prep = preprocess(pixels.rgb, pixels.width, pixels.height, {
      patchSize: pre.patch_size,
      mergeSize: pre.merge_size,
      temporalPatchSize: pre.temporal_patch_size,
      imageMean: pre.image_mean as [number, number, number],
      imageStd: pre.image_std as [number, number, number],
      minPixels: pre.min_pixels,
      maxPixels: pre.max_pixels,
    });
    timer.lap("decode", "vision");
    throwIfAborted(signal);
    const features = await this.#vision.encode(prep);
    timer.lap("vision", "prefill");
    throwIfAborted(signal);

    // Prefix = chat tokens up to and including <|vision_end|>; it does not depend on the question.
    const merge = pre.merge_size;
    const m = (prep.grid[1] * prep.grid[2]) / (merge * merge);
    const chat = buildChatIds(this.#tokenizer, prompts.chat, "", m, tokens);
    const prefixIds = chat.ids.slice(0, chat.ids.indexOf(tokens.vision_end) + 1);
    const pad = chat.imagePadStart;
    const rope = ropeIndex(prefixIds, [prep.grid], tokens.image_pad, tokens.vision_start, merge);
    const out = await this.#lm.prefillImage(prefixIds, rope.positions, pad, features);
    const h = this.#lm.dims.hidden;
    const image: EncodedImage = {
      width: pixels.width,
      height: pixels.height,
      grid: prep.grid,
      resized: prep.resized,
      hrImage: prep.hrImage,
      vitMs: features.vitMs,
      mmEmbeds: out.hidden.slice(pad * h, (pad + m) * h), // [M, H] T_mm
      prefixIds,
      prefixCache: out.cache,
    };
    timer.lap("prefill");
    const bytes = byteSize(image.hrImage, image.vitMs, image.mmEmbeds) + cacheBytes(out.cache);
    // The image cache owns the prefix's KV from here on; one too large for it is this request's.
    if (!this.#cache.set(key, image, bytes)) r.own(out.cache);
    return { image, cached: false, decoded };
  }

  /**
   * Feed the question (and optional forced answer tokens) after the cached image prefix. Positions
   * come from get_rope_index over the whole sequence, so text after the image continues from the
   * image's largest position.
   */
  async #prefill(
    image: EncodedImage,
    question: string,
    answerPrefix: readonly number[],
    r: RequestScope,
  ): Promise<Prefilled> {
    const { timer, signal } = r;
    throwIfAborted(signal);
    timer.progress("prefill", 0);
    const { tokens, prompts, preprocess: pre } = this.#pack.manifest;
    const m = (image.grid[1] * image.grid[2]) / (pre.merge_size * pre.merge_size);
    const chat = buildChatIds(this.#tokenizer, prompts.chat, question, m, tokens);
    const ids = [...chat.ids, ...answerPrefix];
    const s0 = image.prefixIds.length;
    if (image.prefixIds.some((id, i) => ids[i] !== id)) {
      throw new SegError("INFERENCE_FAILED", "prompt template does not start with the cached image prefix");
    }
    const rope = ropeIndex(ids, [image.grid], tokens.image_pad, tokens.vision_start, pre.merge_size);
    const suffix = ids.slice(s0);
    const out = await this.#lm.step(suffix, positionsFrom(rope.positions, s0), image.prefixCache);
    r.own(out.cache);
    const h = this.#lm.dims.hidden;
    timer.lap("prefill");
    return {
      logits: out.logits,
      lastHidden: out.hidden.slice((suffix.length - 1) * h),
      cache: out.cache,
      ropeDelta: rope.ropeDelta,
    };
  }

  /** Grounding: the boxes the model writes for `expression`, each with its T_seg state and score. */
  async #ground(
    image: EncodedImage,
    req: { expression: string; maxInstances?: number; maxTokens?: number; minScore?: number },
    r: RequestScope,
  ): Promise<Grounded> {
    const { timer, signal } = r;
    const limit = req.maxInstances ?? DEFAULT_MAX_INSTANCES;
    const question = groundQuestion(this.#pack.manifest.prompts, req.expression);
    const prefill = await this.#prefill(image, question, [], r);
    timer.progress("generate", 0);
    const grammar = new BoxGrammar(this.#vocab, { maxBoxes: limit });
    const budget = req.maxTokens ?? 8 + TOKENS_PER_BOX * limit;
    const gen = await this.#lm.generate(prefill, {
      maxNewTokens: budget,
      stopTokens: this.#stop,
      ropeDelta: prefill.ropeDelta,
      constraint: grammar,
      ...(signal ? { signal } : {}),
      onToken: (n) => timer.progress("generate", Math.min(1, n / budget)),
    });
    timer.lap("generate");
    timer.perStep(gen.steps);
    // Boxes come from the grammar's own record, paired by order with the states generation captured;
    // boxes without area and repeats are dropped, and so are boxes the model is not sure enough of.
    const minScore = req.minScore ?? this.#grounding.threshold;
    let belowMinScore = 0;
    const seen = new Set<string>();
    const queries: Query[] = [];
    grammar.boxes.forEach((record, i) => {
      const box1000 = orderedBox(record.coords);
      const hidden = gen.boxHidden[i];
      if (!hidden) throw new SegError("INFERENCE_FAILED", `box ${i} of the answer has no hidden state`);
      if (box1000 === null || seen.has(box1000.join())) return;
      seen.add(box1000.join());
      const evidence = gen.boxEvidence[i];
      if (!evidence) throw new SegError("INFERENCE_FAILED", `box ${i} of the answer has no token record`);
      const label = this.#label(gen.tokens, record);
      const groundingScore = this.#grounding.score(evidence, labelAgreement(label, req.expression));
      if (groundingScore < minScore) {
        belowMinScore++;
        return;
      }
      const [x1, y1, x2, y2] = box1000;
      const { width: w, height: h } = image;
      queries.push({
        label,
        box: [(x1 / 1000) * w, (y1 / 1000) * h, (x2 / 1000) * w, (y2 / 1000) * h],
        box1000,
        groundingScore,
        evidence,
        hidden,
      });
    });
    queries.sort((a, b) => (b.groundingScore ?? 0) - (a.groundingScore ?? 0));
    return {
      queries,
      text: this.#text(gen),
      generated: { tokens: gen.tokens.length, steps: gen.steps },
      minScore,
      belowMinScore,
    };
  }

  /** A box the agent gave: the question and the box's text are prefilled; T_seg is the last row. */
  async #boxQuery(image: EncodedImage, box: Box, label: string, r: RequestScope): Promise<Grounded> {
    const box1000 = boxTo1000(box, image.width, image.height);
    const answer = groundingAnswerIds(this.#tokenizer, [box1000], [label], { close: false });
    const question = groundQuestion(this.#pack.manifest.prompts, label);
    const prefill = await this.#prefill(image, question, answer.ids, r);
    return {
      queries: [{ label, box, box1000, hidden: prefill.lastHidden }],
      text: `${boxPrefixText(box1000)}], "label": ${JSON.stringify(label)}}]`,
      generated: { tokens: 0, steps: 0 },
      minScore: 0,
      belowMinScore: 0,
    };
  }

  /** Mask decoder + post-processing: one mask per query at the original size, best score first. */
  async #masks(
    decoder: MaskDecoder,
    image: EncodedImage,
    queries: readonly Query[],
    r: RequestScope,
  ): Promise<{ query: Query; mask: MaskResult; maskScore: number; score: number }[]> {
    const { timer, signal } = r;
    if (queries.length === 0) return [];
    throwIfAborted(signal);
    timer.progress("mask", 0);
    const out = await decoder.decode(image, queries);
    timer.lap("mask", "postprocess");
    const plane = out.height * out.width;
    const masks = queries.map((query, i) => {
      const maskScore = Math.min(1, Math.max(0, out.iou[i] ?? 0));
      return {
        query,
        mask: maskFromLogits(
          out.logits.subarray(i * plane, (i + 1) * plane),
          out.height,
          out.width,
          image.resized,
          [image.height, image.width],
        ),
        maskScore,
        score: combinedScore(query.groundingScore, maskScore),
      };
    });
    timer.lap("postprocess", "write");
    return masks.sort((a, b) => b.score - a.score);
  }

  #noMaskDecoder(): SegError {
    return new SegError(
      "MASK_DECODER_MISSING",
      `the model pack ${this.#pack.manifest.name} has no mask decoder, so it cannot segment: call ground for boxes instead, or train a mask decoder for this checkpoint (python -m modelkit train-mask-decoder --checkpoint DIR --data ANNOTATIONS, RefCOCO-style data: docs/data-format.md) and export the pack again with --mask-decoder`,
    );
  }

  /** The answer's text without stop tokens. */
  #text(gen: GenerateResult): string {
    return this.#tokenizer.decode(
      gen.tokens.filter((t) => !this.#stop.has(t)),
      { skipSpecial: true },
    );
  }

  /** A box's label, decoded from its token span (exact for characters split across tokens). */
  #label(tokens: readonly number[], record: BoxRecord): string {
    const [first, last] = record.labelTokens;
    const [before, after] = record.labelTrim;
    const text = this.#tokenizer.decode(tokens.slice(first, last + 1));
    return text.slice(before, text.length - after).trim();
  }
}

/**
 * The image cache's default budget: 256 MiB, sized for a laptop and a small pack, or room for two
 * images at the pack's largest input if that is more (a 4B pack's 1024-token image holds ~370 MB:
 * ViT maps, the resized image, T_mm and the prefix's KV cache).
 */
function defaultCacheBytes(pack: LoadedPack): number {
  const { model, preprocess: pre } = pack.manifest;
  const patches = pre.max_pixels / (pre.patch_size * pre.patch_size); // P
  const tokens = patches / (pre.merge_size * pre.merge_size); // M
  const t = model.text;
  const entry =
    4 * (4 * patches * model.vision.hidden_size) + // vit_ms
    4 * 3 * pre.max_pixels + // hr_image
    4 * tokens * t.hidden_size + // mm_embeds
    4 * 2 * t.num_hidden_layers * t.num_key_value_heads * (tokens + 8) * t.head_dim; // prefix KV
  return Math.max(256 * 1024 ** 2, 2 * entry);
}

/** One request's timer and signal, and the KV caches it made: released when the request ends. */
class RequestScope {
  readonly timer: Timer;
  readonly signal: AbortSignal | undefined;
  readonly #caches: KvCache[] = [];

  constructor(req: RequestOptions) {
    this.timer = new Timer(req.onProgress);
    this.signal = req.signal;
  }

  own(cache: KvCache): void {
    this.#caches.push(cache);
  }

  close(): void {
    for (const c of this.#caches) releaseCache(c);
    this.#caches.length = 0;
  }
}

/** Corners ordered; null when the box has no area. */
function orderedBox([a, b, c, d]: readonly [number, number, number, number]): Box1000 | null {
  const box: Box1000 = [Math.min(a, c), Math.min(b, d), Math.max(a, c), Math.max(b, d)];
  return box[2] > box[0] && box[3] > box[1] ? box : null;
}
