/**
 * The inference pipeline in the current thread: image -> vision encoder -> prompt prefill (with the
 * image prefix's KV cache reused across questions) -> constrained decoding -> mask decoder -> files.
 * engine.ts runs this inside a worker so the MCP connection stays responsive.
 */

import { createHash } from "node:crypto";
import { SegError } from "../errors.js";
import { ByteLru, byteSize } from "./cache.js";
import { generate, type KvCache, LanguageModel } from "./generate.js";
import { BoxGrammar } from "./grammar.js";
import { parseBoxes } from "./grounding.js";
import { maskFromLogits, rleEncode, tightBox } from "./mask-post.js";
import { type ExecutionProvider, f32, i64, type Logger, OnnxSession } from "./onnx.js";
import { newOutputName, readMaskPng, writeMaskPng, writeOverlayPng } from "./output.js";
import { type LoadedPack, loadPack, type VerifyMode } from "./pack.js";
import { decodeImage, preprocess, readImageFile } from "./preprocess.js";
import {
  boxPrefixText,
  boxTo1000,
  buildChatIds,
  describeQuestion,
  groundingAnswerIds,
  groundQuestion,
} from "./prompt.js";
import { ropeIndex } from "./rope.js";
import { QwenTokenizer } from "./tokenizer.js";
import type {
  Box,
  DescribeRequest,
  DescribeResult,
  Engine,
  GroundRequest,
  GroundResult,
  ImageSource,
  PackInfo,
  ProgressFn,
  SegmentInstance,
  SegmentRequest,
  SegmentResult,
  Stage,
  StageTimings,
} from "./types.js";
import { visionHostInputs } from "./vision-inputs.js";

export interface EngineConfig {
  /** Folder of the model pack (holds pack.json). */
  packDir: string;
  /** @default "auto" (CUDA, then WebGPU, then CPU) */
  executionProvider?: ExecutionProvider;
  /** Memory budget for encoded images (vision outputs + prompt-prefix KV). @default 1 GiB */
  cacheBytes?: number;
  /** CPU intra-op threads; 0 = onnxruntime's choice. @default 0 */
  threads?: number;
  /** Checksum verification of pack files at load. @default "full" */
  verify?: VerifyMode;
  /** Largest decoded image accepted, in pixels. @default 40_000_000 */
  maxInputPixels?: number;
  /** Largest encoded image accepted, in bytes. @default 50 MiB */
  maxImageBytes?: number;
  /** Where diagnostics go (never stdout). */
  log?: Logger;
}

type ResolvedConfig = Required<Omit<EngineConfig, "log">> & { log: Logger };

const DEFAULT_MAX_INSTANCES = 20;
const MAX_DESCRIBE_TOKENS = 48;
/** Generous budget per box: `{"bbox_2d": [1000, 1000, 1000, 1000], "label": "<64 chars>"}, `. */
const TOKENS_PER_BOX = 96;

/** Everything derived from one image that later questions reuse. */
interface EncodedImage {
  width: number;
  height: number;
  grid: [number, number, number];
  resized: [number, number];
  /** [1, 3, Hr, Wr] normalised, for the mask decoder's high-resolution branch. */
  hrImage: Float32Array;
  /** [4, P, Cv] ViT maps. */
  vitMs: Float32Array;
  /** [M, H] final-norm hidden states at the image-pad rows (T_mm). */
  mmEmbeds: Float32Array;
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

class Timer {
  readonly timings: StageTimings = {};
  readonly #start = performance.now();
  #last = this.#start;
  constructor(private readonly onProgress: ProgressFn | undefined) {}
  /** Close the current stage (adds its time) and announce the next one. */
  /** Record the mean duration of one generation step. */
  perStep(steps: number): void {
    if (steps > 0) this.timings.per_step = (this.timings.generate ?? 0) / steps;
  }
  lap(stage: Stage, next?: Stage, fraction = 0): void {
    const now = performance.now();
    this.timings[stage] = (this.timings[stage] ?? 0) + (now - this.#last);
    this.#last = now;
    if (next) this.onProgress?.({ stage: next, fraction });
  }
  progress(stage: Stage, fraction: number, message?: string): void {
    this.onProgress?.(message === undefined ? { stage, fraction } : { stage, fraction, message });
  }
  finish(): StageTimings {
    this.timings.total = performance.now() - this.#start;
    for (const k of Object.keys(this.timings) as (keyof StageTimings)[]) {
      this.timings[k] = Math.round((this.timings[k] as number) * 10) / 10;
    }
    return this.timings;
  }
}

function checkAborted(signal: AbortSignal | undefined): void {
  if (signal?.aborted) throw new SegError("CANCELLED", "the request was cancelled");
}

export class LocalEngine implements Engine {
  readonly #pack: LoadedPack;
  readonly #tokenizer: QwenTokenizer;
  readonly #vision: OnnxSession;
  readonly #lm: LanguageModel;
  readonly #decoderSession: OnnxSession;
  readonly #maskDecoder: OnnxSession;
  readonly #cache: ByteLru<EncodedImage>;
  readonly #config: ResolvedConfig;
  readonly #tokenTexts: string[];
  #queue: Promise<unknown> = Promise.resolve();

  private constructor(
    config: ResolvedConfig,
    pack: LoadedPack,
    tokenizer: QwenTokenizer,
    sessions: { vision: OnnxSession; decoder: OnnxSession; mask: OnnxSession },
  ) {
    this.#config = config;
    this.#pack = pack;
    this.#tokenizer = tokenizer;
    this.#vision = sessions.vision;
    this.#decoderSession = sessions.decoder;
    this.#maskDecoder = sessions.mask;
    const t = pack.manifest.model.text;
    this.#lm = new LanguageModel(sessions.decoder, {
      layers: t.num_hidden_layers,
      kvHeads: t.num_key_value_heads,
      headDim: t.head_dim,
      hidden: t.hidden_size,
      vocab: t.vocab_size,
    });
    this.#cache = new ByteLru(config.cacheBytes);
    // Rows past the tokenizer's last id exist in the embedding but are never valid output ('' text).
    this.#tokenTexts = tokenizer.grammarTokenTexts(t.vocab_size);
  }

  static async create(options: EngineConfig): Promise<LocalEngine> {
    const config: ResolvedConfig = {
      packDir: options.packDir,
      executionProvider: options.executionProvider ?? "auto",
      cacheBytes: options.cacheBytes ?? 1024 ** 3,
      threads: options.threads ?? 0,
      verify: options.verify ?? "full",
      maxInputPixels: options.maxInputPixels ?? 40_000_000,
      maxImageBytes: options.maxImageBytes ?? 50 * 1024 ** 2,
      log: options.log ?? ((m: string) => process.stderr.write(`${m}\n`)),
    };
    const pack = await loadPack(config.packDir, config.verify);
    const m = pack.manifest;
    const tokenizer = await QwenTokenizer.fromFiles(
      pack.file(m.tokenizer.file),
      pack.file(m.tokenizer.config),
    );
    const opened: OnnxSession[] = [];
    try {
      const open = async (file: string) => {
        const s = await OnnxSession.create(
          pack.file(file),
          config.executionProvider,
          { threads: config.threads },
          config.log,
        );
        opened.push(s);
        return s;
      };
      const vision = await open(m.graphs.vision_encoder.file);
      const decoder = await open(m.graphs.decoder.file);
      const mask = await open(m.graphs.mask_decoder.file);
      return new LocalEngine(config, pack, tokenizer, { vision, decoder, mask });
    } catch (e) {
      await Promise.all(opened.map((s) => s.dispose()));
      throw e;
    }
  }

  /** Requests run one at a time: onnxruntime already uses every core for one request. */
  #serial<T>(task: () => Promise<T>): Promise<T> {
    const run = this.#queue.then(task, task);
    this.#queue = run.catch(() => undefined);
    return run;
  }

  async info(): Promise<PackInfo> {
    const m = this.#pack.manifest;
    return {
      name: m.name,
      description: m.description,
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
    return this.#serial(async () => {
      const timer = new Timer(req.onProgress);
      const { image, cached } = await this.#encode(req.image, timer, req.signal);
      const answer = await this.#groundOnImage(image, req.expression, req.maxInstances, timer, req.signal);
      return {
        found: answer.instances.length > 0,
        image: { width: image.width, height: image.height },
        instances: answer.instances.map(({ label, box, score }) => ({ label, box, score })),
        text: answer.text,
        timings: timer.finish(),
        cached,
      };
    });
  }

  segment(req: SegmentRequest): Promise<SegmentResult> {
    return this.#serial(async () => {
      if (req.box === undefined && (req.expression === undefined || req.expression.trim() === "")) {
        throw new SegError("INVALID_INPUT", "segment needs an expression or a box");
      }
      const timer = new Timer(req.onProgress);
      const { image, cached } = await this.#encode(req.image, timer, req.signal);
      let queries: { label: string; box: Box; box1000: number[]; hidden: Float32Array }[];
      let text: string;
      if (req.box) {
        const box1000 = boxTo1000(req.box, image.width, image.height);
        const label = req.expression?.trim() || "region";
        const prefill = await this.#prefill(
          image,
          groundQuestion(this.#pack.manifest.prompts, label),
          groundingAnswerIds(this.#tokenizer, [box1000], [label], { close: false }).ids,
          timer,
          req.signal,
        );
        // T_seg: the state at the box's last coordinate token (docs/design.md).
        queries = [{ label, box: req.box, box1000, hidden: prefill.lastHidden }];
        text = `${boxPrefixText(box1000)}], "label": ${JSON.stringify(label)}}]`;
      } else {
        const answer = await this.#groundOnImage(
          image,
          req.expression as string,
          req.maxInstances,
          timer,
          req.signal,
        );
        queries = answer.instances;
        text = answer.text;
      }
      const instances: SegmentInstance[] = [];
      let overlayPath: string | undefined;
      if (queries.length > 0) {
        timer.progress("mask", 0);
        const h = this.#pack.manifest.model.text.hidden_size;
        const q = queries.length;
        const boxes = new Float32Array(q * 4);
        const queryHidden = new Float32Array(q * h);
        queries.forEach((item, i) => {
          item.box1000.forEach((v, k) => {
            boxes[i * 4 + k] = Math.min(1, Math.max(0, v / 1000));
          });
          queryHidden.set(item.hidden, i * h);
        });
        const [, gh, gw] = image.grid;
        const cv = this.#pack.manifest.model.vision.hidden_size;
        const m = (gh * gw) / 4;
        checkAborted(req.signal);
        const out = await this.#maskDecoder.run({
          vit_ms: f32(image.vitMs, [4, gh * gw, cv]),
          mm_embeds: f32(image.mmEmbeds, [m, h]),
          query_hidden: f32(queryHidden, [q, h]),
          boxes: f32(boxes, [q, 4]),
          gate_boxes: f32(boxes.slice(), [q, 1, 4]),
          gate_valid: f32(new Float32Array(q).fill(1), [q, 1]),
          hr_image: f32(image.hrImage, [1, 3, gh * 16, gw * 16]),
        });
        const logits = out.mask_logits?.data as Float32Array;
        const iou = out.iou_pred?.data as Float32Array;
        timer.lap("mask", "postprocess");
        const h4 = gh * 4;
        const w4 = gw * 4;
        const bitmaps: Uint8Array[] = [];
        const outputs = queries.map((item, i) => {
          const r = maskFromLogits(logits.subarray(i * h4 * w4, (i + 1) * h4 * w4), h4, w4, image.resized, [
            image.height,
            image.width,
          ]);
          bitmaps.push(r.bitmap);
          return { item, r, score: Math.min(1, Math.max(0, iou[i] ?? 0)) };
        });
        outputs.sort((a, b) => b.score - a.score); // highest predicted IoU first
        timer.lap("postprocess", "write");
        for (const [i, { item, r, score }] of outputs.entries()) {
          const file = newOutputName(req.outputDir, "mask", i);
          await writeMaskPng(r.bitmap, image.width, image.height, file);
          instances.push({
            label: item.label,
            box: item.box,
            score,
            maskBox: r.box ?? item.box,
            mask: {
              path: file,
              areaPx: r.areaPx,
              areaFraction: r.areaPx / (image.width * image.height),
              ...(req.rle ? { rle: rleEncode(r.bitmap, image.height, image.width) } : {}),
            },
          });
        }
        if (req.overlay) {
          const decoded = await decodeImage(req.image, this.#limits());
          overlayPath = newOutputName(req.outputDir, "overlay");
          await writeOverlayPng(decoded.rgb, decoded.width, decoded.height, bitmaps, overlayPath);
        }
        timer.lap("write");
      }
      return {
        found: instances.length > 0,
        image: { width: image.width, height: image.height },
        instances,
        ...(overlayPath ? { overlayPath } : {}),
        text,
        timings: timer.finish(),
        cached,
      };
    });
  }

  describe(req: DescribeRequest): Promise<DescribeResult> {
    return this.#serial(async () => {
      const timer = new Timer(req.onProgress);
      // The region: the given box, else the tight box of the given mask (checked against the image).
      let size = { width: 0, height: 0 };
      let box = req.box;
      const resolveRegion = async (width: number, height: number): Promise<Box> => {
        size = { width, height };
        if (req.maskPath !== undefined) {
          const bitmap = await readMaskPng(req.maskPath, width, height);
          const tight = tightBox(bitmap, width, height);
          if (!tight) {
            throw new SegError(
              "INVALID_INPUT",
              `mask ${req.maskPath} is empty: it selects no pixel to describe`,
            );
          }
          box ??= tight;
        }
        if (!box) throw new SegError("INVALID_INPUT", "describe_region needs a box or a mask");
        return box;
      };
      // describe_mode "crop": the model looks at a crop around the region (modelkit answers.crop_box)
      // instead of reading the box's coordinates; only the crop is encoded.
      const { image: target, cached } =
        this.#pack.manifest.prompts.describe_mode === "crop"
          ? await this.#encode(req.image, timer, req.signal, async (w, h) =>
              cropBox(await resolveRegion(w, h), w, h),
            )
          : await this.#encode(req.image, timer, req.signal);
      // In crop mode the callback above already resolved the region.
      const region = box && size.width > 0 ? box : await resolveRegion(target.width, target.height);
      const question = describeQuestion(
        this.#pack.manifest.prompts,
        boxTo1000(region, size.width, size.height),
      );
      const prefill = await this.#prefill(target, question, [], timer, req.signal);
      timer.progress("generate", 0);
      const stop = new Set(this.#pack.manifest.tokens.stop);
      const gen = await generate(this.#lm, prefill, {
        maxNewTokens: MAX_DESCRIBE_TOKENS,
        stopTokens: stop,
        ropeDelta: prefill.ropeDelta,
        ...(req.signal ? { signal: req.signal } : {}),
        onToken: (n) => timer.progress("generate", n / MAX_DESCRIBE_TOKENS),
      });
      timer.lap("generate");
      timer.perStep(gen.steps);
      const description = this.#tokenizer
        .decode(
          gen.tokens.filter((t) => !stop.has(t)),
          { skipSpecial: true },
        )
        .trim();
      return {
        image: size,
        box: region,
        description,
        label: shortLabel(description),
        timings: timer.finish(),
        cached,
      };
    });
  }

  async dispose(): Promise<void> {
    await this.#queue;
    this.#cache.clear();
    await Promise.all([this.#vision.dispose(), this.#decoderSession.dispose(), this.#maskDecoder.dispose()]);
  }

  #limits() {
    return { maxInputPixels: this.#config.maxInputPixels, maxBytes: this.#config.maxImageBytes };
  }

  /** Decode + vision encoder + image-prefix prefill, or a cache hit keyed by content and settings. */
  async #encode(
    source: ImageSource,
    timer: Timer,
    signal: AbortSignal | undefined,
    crop?: (width: number, height: number) => Promise<Box>,
  ): Promise<{ image: EncodedImage; cached: boolean }> {
    timer.progress("decode", 0);
    const bytes =
      "bytes" in source ? source.bytes : await readImageFile(source.path, this.#config.maxImageBytes);
    const pre = this.#pack.manifest.preprocess;
    const hash = createHash("sha256")
      .update(bytes)
      .update(`|${pre.min_pixels}|${pre.max_pixels}|${this.#pack.manifest.name}`);
    // A crop's key needs the image size, known only after decoding.
    if (!crop) {
      const hit = this.#cache.get(hash.copy().digest("hex"));
      if (hit) {
        timer.lap("decode");
        return { image: hit, cached: true };
      }
    }
    let decoded = await decodeImage({ bytes }, this.#limits());
    if (crop) {
      const region = await crop(decoded.width, decoded.height);
      hash.update(`|crop:${region.join(",")}`);
      const hit = this.#cache.get(hash.copy().digest("hex"));
      if (hit) {
        timer.lap("decode");
        return { image: hit, cached: true };
      }
      decoded = cropRgb(decoded, region);
    }
    const key = hash.digest("hex");
    const prep = await preprocess(decoded.rgb, decoded.width, decoded.height, {
      patchSize: pre.patch_size,
      mergeSize: pre.merge_size,
      temporalPatchSize: pre.temporal_patch_size,
      imageMean: pre.image_mean as [number, number, number],
      imageStd: pre.image_std as [number, number, number],
      minPixels: pre.min_pixels,
      maxPixels: pre.max_pixels,
    });
    timer.lap("decode", "vision");
    checkAborted(signal);
    const [, gh, gw] = prep.grid;
    const v = this.#pack.manifest.model.vision;
    const p = gh * gw;
    const host = visionHostInputs(gh, gw, v.num_position_embeddings, v.head_dim, v.spatial_merge_size);
    const vis = await this.#vision.run({
      pixel_values: f32(prep.pixelValues, [p, prep.pixelValues.length / p]),
      pos_embed_idx: i64(host.posEmbedIdx, [p, 4]),
      pos_embed_weight: f32(host.posEmbedWeight, [p, 4]),
      rotary_cos: f32(host.rotaryCos, [p, v.head_dim]),
      rotary_sin: f32(host.rotarySin, [p, v.head_dim]),
    });
    const imageFeatures = vis.image_features?.data as Float32Array; // [M, H]
    const deepstack = vis.deepstack_features?.data as Float32Array; // [3, M, H]
    const vitMs = vis.vit_ms?.data as Float32Array; // [4, P, Cv]
    timer.lap("vision", "prefill");
    checkAborted(signal);

    // Prefix = chat tokens up to and including <|vision_end|>; it does not depend on the question.
    const tokens = this.#pack.manifest.tokens;
    const m = p / 4;
    const chat = buildChatIds(this.#tokenizer, this.#pack.manifest.prompts.chat, "", m, tokens);
    const end = chat.ids.indexOf(tokens.vision_end);
    const prefixIds = chat.ids.slice(0, end + 1);
    const s = prefixIds.length;
    const h = this.#pack.manifest.model.text.hidden_size;
    const visual = new Float32Array(4 * s * h); // [4, 1, S, H], rows at the pads only
    const padStart = chat.imagePadStart;
    visual.set(imageFeatures, padStart * h);
    for (let k = 0; k < 3; k++) {
      visual.set(deepstack.subarray(k * m * h, (k + 1) * m * h), ((k + 1) * s + padStart) * h);
    }
    const rope = ropeIndex(
      prefixIds,
      [prep.grid],
      tokens.image_pad,
      tokens.vision_start,
      v.spatial_merge_size,
    );
    const out = await this.#lm.step(prefixIds, rope.positions, this.#lm.emptyCache(), visual);
    const image: EncodedImage = {
      width: decoded.width,
      height: decoded.height,
      grid: prep.grid,
      resized: prep.resized,
      hrImage: prep.hrImage,
      vitMs,
      mmEmbeds: out.hidden.slice(padStart * h, (padStart + m) * h),
      prefixIds,
      prefixCache: out.cache,
    };
    timer.lap("prefill");
    this.#cache.set(
      key,
      image,
      byteSize(image.hrImage, image.vitMs, image.mmEmbeds, ...out.cache.tensors.map((t) => t.data)),
    );
    return { image, cached: false };
  }

  /**
   * Feed the question (and optional forced answer text) after the cached image prefix.
   * Positions come from get_rope_index over the whole sequence, so text after the image continues
   * from the image's largest position.
   */
  async #prefill(
    image: EncodedImage,
    question: string,
    answerPrefix: readonly number[],
    timer: Timer,
    signal: AbortSignal | undefined,
  ): Promise<Prefilled> {
    checkAborted(signal);
    timer.progress("prefill", 0);
    const tokens = this.#pack.manifest.tokens;
    const m = (image.grid[1] * image.grid[2]) / 4;
    const chat = buildChatIds(this.#tokenizer, this.#pack.manifest.prompts.chat, question, m, tokens);
    const ids = [...chat.ids, ...answerPrefix];
    const s0 = image.prefixIds.length;
    for (let i = 0; i < s0; i++) {
      if (ids[i] !== image.prefixIds[i]) {
        throw new SegError("INFERENCE_FAILED", "prompt template does not start with the cached image prefix");
      }
    }
    const rope = ropeIndex(
      ids,
      [image.grid],
      tokens.image_pad,
      tokens.vision_start,
      this.#pack.manifest.model.vision.spatial_merge_size,
    );
    const n = ids.length;
    const suffix = ids.slice(s0);
    const positions = new BigInt64Array(3 * suffix.length);
    for (let a = 0; a < 3; a++)
      positions.set(rope.positions.subarray(a * n + s0, (a + 1) * n), a * suffix.length);
    const out = await this.#lm.step(suffix, positions, image.prefixCache);
    const h = this.#lm.dims.hidden;
    timer.lap("prefill");
    return {
      logits: out.logits,
      lastHidden: out.hidden.slice((suffix.length - 1) * h),
      cache: out.cache,
      ropeDelta: rope.ropeDelta,
    };
  }

  async #groundOnImage(
    image: EncodedImage,
    expression: string,
    maxInstances: number | undefined,
    timer: Timer,
    signal: AbortSignal | undefined,
  ) {
    const limit = maxInstances ?? DEFAULT_MAX_INSTANCES;
    const prefill = await this.#prefill(
      image,
      groundQuestion(this.#pack.manifest.prompts, expression),
      [],
      timer,
      signal,
    );
    timer.progress("generate", 0);
    const grammar = new BoxGrammar(this.#tokenTexts, this.#pack.manifest.tokens.stop, {
      maxBoxes: limit,
      encode: (t) => this.#tokenizer.encodePlain(t),
    });
    const budget = 8 + TOKENS_PER_BOX * limit;
    const gen = await generate(this.#lm, prefill, {
      maxNewTokens: budget,
      stopTokens: new Set(this.#pack.manifest.tokens.stop),
      ropeDelta: prefill.ropeDelta,
      constraint: grammar,
      ...(signal ? { signal } : {}),
      onToken: (n) => timer.progress("generate", Math.min(1, n / budget)),
    });
    timer.lap("generate");
    timer.perStep(gen.steps);
    const text = this.#tokenizer.decode(
      gen.tokens.filter((t) => !this.#pack.manifest.tokens.stop.includes(t)),
      { skipSpecial: true },
    );
    const parsed = parseBoxes(text, image.width, image.height);
    // `index` counts every box in the text, so dropped (degenerate, duplicate) boxes keep the pairing
    // with the per-box hidden states and scores that generation recorded.
    const instances = parsed.instances.slice(0, limit).map((inst) => {
      const hidden = gen.boxHidden[inst.index];
      if (!hidden) {
        throw new SegError("INFERENCE_FAILED", `box ${inst.index} of the answer has no hidden state`);
      }
      return {
        label: inst.label,
        box: inst.box,
        box1000: inst.box1000,
        score: gen.boxScores[inst.index] ?? 0,
        hidden,
      };
    });
    instances.sort((a, b) => b.score - a.score);
    return { instances, text };
  }
}

/** Margin of describe_mode "crop", as a fraction of the image's shorter side (modelkit answers.py). */
export const CROP_MARGIN = 0.15;

/** Integer crop [x1, y1, x2, y2) around `box`: grown by CROP_MARGIN of the shorter side, clamped. */
export function cropBox(box: Box, width: number, height: number): Box {
  const m = CROP_MARGIN * Math.min(width, height);
  const x1 = Math.max(0, Math.trunc(box[0] - m));
  const y1 = Math.max(0, Math.trunc(box[1] - m));
  const x2 = Math.min(width, Math.trunc(box[2] + m + 0.999999));
  const y2 = Math.min(height, Math.trunc(box[3] + m + 0.999999));
  return [x1, y1, Math.max(x2, x1 + 1), Math.max(y2, y1 + 1)];
}

function cropRgb(image: { rgb: Uint8Array; width: number; height: number }, box: Box) {
  const [x1, y1, x2, y2] = box;
  const w = x2 - x1;
  const h = y2 - y1;
  const rgb = new Uint8Array(w * h * 3);
  for (let y = 0; y < h; y++) {
    const from = ((y1 + y) * image.width + x1) * 3;
    rgb.set(image.rgb.subarray(from, from + w * 3), y * w * 3);
  }
  return { rgb, width: w, height: h };
}

/** A short label from a description: drop a leading article, keep up to 4 words before punctuation. */
export function shortLabel(description: string): string {
  const first = description.split(/[.,;:!?\n]/)[0] ?? "";
  const words = first
    .trim()
    .split(/\s+/)
    .filter((w) => w.length > 0);
  if (words.length > 1 && /^(a|an|the)$/i.test(words[0] as string)) words.shift();
  return words.slice(0, 4).join(" ").toLowerCase();
}
