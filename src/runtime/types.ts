/**
 * The runtime's public types: what the engine takes and returns. Tools and the CLI depend on these,
 * never on onnxruntime. Boxes are always [x1, y1, x2, y2] in pixels of the ORIGINAL image
 * (after EXIF orientation), x1 < x2, y1 < y2.
 */

import type { Logger } from "../logger.js";
import type { BoxEvidence } from "./language-model.js";

export type Box = [x1: number, y1: number, x2: number, y2: number];

export const EXECUTION_PROVIDERS = ["auto", "cpu", "cuda", "webgpu"] as const;
/** `auto` tries CUDA, then WebGPU, then the CPU. */
export type ExecutionProvider = (typeof EXECUTION_PROVIDERS)[number];

/**
 * An image checked by tools/inputs.ts (allowed, read once, format, size and pixel limits): its encoded
 * bytes and its size after EXIF orientation. The runtime trusts it and never re-checks.
 */
export interface CheckedImage {
  readonly bytes: Uint8Array;
  readonly width: number;
  readonly height: number;
  /** How to name the image in a message (its path, or "data: URI"). */
  readonly label?: string;
}

export type Stage =
  | "queued"
  | "load"
  | "decode"
  | "vision"
  | "prefill"
  | "generate"
  | "mask"
  | "postprocess"
  | "write";

export type ProgressFn = (progress: { stage: Stage; fraction: number; message?: string }) => void;

/**
 * Milliseconds per stage; `queue` is the time spent waiting for the engine, `total` the wall time of
 * the whole request; `per_step` is the mean time of one decoder call during generation (a step feeds
 * one sampled token or one forced chunk).
 */
export type StageTimings = Partial<Record<Exclude<Stage, "queued"> | "queue" | "total" | "per_step", number>>;

export interface ImageInfo {
  width: number;
  height: number;
}

export interface RequestOptions {
  signal?: AbortSignal;
  onProgress?: ProgressFn;
}

export interface GroundRequest extends RequestOptions {
  image: CheckedImage;
  expression: string;
  /** At most this many instances are returned (highest score first). @default DEFAULT_MAX_INSTANCES */
  maxInstances?: number;
  /** At most this many answer tokens (bounds the time). @default room for maxInstances boxes */
  maxTokens?: number;
  /** Boxes whose grounding score is below this are not returned. @default the pack's calibrated threshold */
  minScore?: number;
}

export interface Instance {
  label: string;
  box: Box;
  /**
   * 0..1, how sure the language model is that this box is what the expression names (calibrated on
   * held-out scenes when the pack has a calibration); absent for a box the agent gave.
   */
  groundingScore?: number;
  /** 0..1, what instances are ranked by: grounding score (ground), grounding x mask score (segment). */
  score: number;
  /** The token log-probabilities behind groundingScore (for calibration; tools do not show them). */
  evidence?: BoxEvidence;
}

/** Boxes the model wrote that a call did not return, and why. */
export interface Rejected {
  /** Grounding score below the call's min_score (or the pack's threshold). */
  belowMinScore: number;
  /** The mask decoder found no pixel in the box. */
  emptyMask: number;
}

/** What generation did: answer tokens, and decoder calls (forced text is fed as one chunk). */
export interface Generated {
  tokens: number;
  steps: number;
}

export interface GroundResult {
  /** True when an instance is returned (boxes below the minimum score are not). */
  found: boolean;
  image: ImageInfo;
  instances: Instance[];
  /** The minimum grounding score this call applied. */
  minScore: number;
  rejected: Rejected;
  /** The model's raw answer text (for debugging and for the CLI's --verbose). */
  text: string;
  generated: Generated;
  timings: StageTimings;
  cached: boolean;
}

/** What to segment: the objects an expression names, or the object in a box the agent already has. */
export type SegmentTarget =
  | { expression: string; maxInstances?: number; maxTokens?: number; minScore?: number }
  | {
      box: Box;
      /** What the box holds, if the agent knows; the model is asked about this label. @default "region" */
      label?: string;
    };

export type SegmentRequest = RequestOptions &
  SegmentTarget & {
    image: CheckedImage;
    /** Absolute directory the mask PNGs are written to (the tool layer validated it). */
    outputDir: string;
    /** Also write an overlay PNG of all masks on the image. @default false */
    overlay?: boolean;
    /** Also return a JPEG of the overlay at most this many pixels a side (implies the overlay). */
    previewMaxSide?: number;
    /** Include a run-length encoding of each mask in the result. @default false */
    rle?: boolean;
  };

export interface MaskInfo {
  /** Absolute path of a 1-bit PNG the size of the original image. */
  path: string;
  areaPx: number;
  areaFraction: number;
  /** COCO-style uncompressed RLE (column-major counts, starting with background), when asked. */
  rle?: { size: [height: number, width: number]; counts: number[] };
}

export interface SegmentInstance extends Instance {
  /** 0..1, the mask decoder's predicted IoU of its mask with the object in the box (fit, not identity). */
  maskScore: number;
  /** Tight box of the mask's pixels (falls back to the grounding box when the mask is empty). */
  maskBox: Box;
  mask: MaskInfo;
}

export interface SegmentResult {
  /** True when an instance with a non-empty mask is returned. */
  found: boolean;
  image: ImageInfo;
  instances: SegmentInstance[];
  /** The minimum grounding score applied (expression calls; 0 for a box). */
  minScore: number;
  rejected: Rejected;
  overlayPath?: string;
  /** JPEG bytes of the overlay, when a preview was asked and there is an instance. */
  preview?: Uint8Array;
  text: string;
  generated: Generated;
  timings: StageTimings;
  cached: boolean;
}

export interface DescribeRequest extends RequestOptions {
  image: CheckedImage;
  /** The region (a mask is turned into its tight box by the tool layer). */
  box: Box;
}

export interface DescribeResult {
  image: ImageInfo;
  box: Box;
  description: string;
  /** A short label derived from the description (first noun phrase). */
  label: string;
  timings: StageTimings;
  cached: boolean;
}

export interface PackInfo {
  name: string;
  description: string;
  /** What the pack knows (pack.json `domain`), when it says. */
  domain?: string;
  /** Whether `segment` works (the pack has a mask decoder). */
  segmentation: boolean;
  /** The calibrated grounding threshold, when the pack has one. */
  groundingThreshold?: number;
  dir: string;
  dtype: string;
  provenance: Record<string, unknown>;
  model: Record<string, unknown>;
  preprocess: { minPixels: number; maxPixels: number; patchSize: number; mergeSize: number };
  executionProvider: string;
}

/** The engine's API as seen by tools, CLI and server (engine.ts runs it in a worker thread). */
export interface Engine {
  info(): Promise<PackInfo>;
  ground(req: GroundRequest): Promise<GroundResult>;
  segment(req: SegmentRequest): Promise<SegmentResult>;
  describe(req: DescribeRequest): Promise<DescribeResult>;
  dispose(): Promise<void>;
}

/** How to build an engine. Every field but `packDir` has a default in ENGINE_DEFAULTS. */
export interface EngineOptions {
  /** Folder of the model pack (holds pack.json). */
  packDir: string;
  executionProvider?: ExecutionProvider;
  /**
   * Memory budget for encoded images (vision outputs + prompt-prefix KV); 0 disables the cache.
   * @default the larger of 256 MiB and room for two images at the pack's largest input size
   */
  cacheBytes?: number;
  /** CPU intra-op threads; 0 = onnxruntime's choice. */
  threads?: number;
  /** Checksum verification of pack files at load: every byte, or sizes only. */
  verify?: "full" | "size";
  /** Calls waiting for the engine beyond this are refused with BUSY (it runs one at a time). */
  maxQueue?: number;
  /**
   * Run every graph once at load on a small image, so a GPU compiles its shaders before the first
   * call instead of during it. @default true on GPU providers, false on the CPU
   */
  warmUp?: boolean;
  /** Where diagnostics go (never stdout). */
  log?: Logger;
}

/** Instances a ground or segment call returns at most unless it asks otherwise. */
export const DEFAULT_MAX_INSTANCES = 20;

export const ENGINE_DEFAULTS = {
  executionProvider: "auto",
  threads: 0,
  verify: "full",
  maxQueue: 16,
} as const satisfies Required<Omit<EngineOptions, "packDir" | "log" | "warmUp" | "cacheBytes">>;
