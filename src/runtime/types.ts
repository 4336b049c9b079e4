/**
 * The runtime's public types: what the engine takes and returns. Tools and the CLI depend on these,
 * never on onnxruntime. Boxes are always [x1, y1, x2, y2] in pixels of the ORIGINAL image
 * (after EXIF orientation), x1 < x2, y1 < y2.
 */

export type Box = [x1: number, y1: number, x2: number, y2: number];

/** An image the caller already resolved: an absolute path inside the allowed directories, or bytes. */
export type ImageSource = { readonly path: string } | { readonly bytes: Uint8Array };

export type Stage = "load" | "decode" | "vision" | "prefill" | "generate" | "mask" | "postprocess" | "write";

export type ProgressFn = (progress: { stage: Stage; fraction: number; message?: string }) => void;

/**
 * Milliseconds per stage; `total` is wall time of the whole request; `per_step` is the mean time of
 * one decoder call during generation (a step feeds one sampled token or one forced chunk).
 */
export type StageTimings = Partial<Record<Stage | "total" | "per_step", number>>;

export interface ImageInfo {
  width: number;
  height: number;
}

export interface RequestOptions {
  signal?: AbortSignal;
  onProgress?: ProgressFn;
}

export interface GroundRequest extends RequestOptions {
  image: ImageSource;
  expression: string;
  /** At most this many instances are returned (highest score first). @default 20 */
  maxInstances?: number;
}

export interface Instance {
  label: string;
  box: Box;
  /** 0..1. For grounding: the mean probability of the box's coordinate tokens; for masks: predicted IoU. */
  score: number;
}

export interface GroundResult {
  found: boolean;
  image: ImageInfo;
  instances: Instance[];
  /** The model's raw answer text (for debugging and for the CLI's --verbose). */
  text: string;
  timings: StageTimings;
  cached: boolean;
}

export interface SegmentRequest extends RequestOptions {
  image: ImageSource;
  /** Referring expression; required unless `box` is given. */
  expression?: string;
  /** A box the agent already has: skips grounding. */
  box?: Box;
  maxInstances?: number;
  /** Absolute directory the mask PNGs are written to (the tool layer validated it). */
  outputDir: string;
  /** Also write an overlay preview PNG of all masks on the image. @default false */
  overlay?: boolean;
  /** Include a run-length encoding of each mask in the result. @default false */
  rle?: boolean;
}

export interface MaskInfo {
  /** Absolute path of a 1-bit PNG the size of the original image. */
  path: string;
  areaPx: number;
  areaFraction: number;
  /** COCO-style uncompressed RLE (column-major counts, starting with background), when asked. */
  rle?: { size: [height: number, width: number]; counts: number[] };
}

export interface SegmentInstance extends Instance {
  /** Tight box of the mask's pixels (falls back to the grounding box when the mask is empty). */
  maskBox: Box;
  mask: MaskInfo;
}

export interface SegmentResult {
  found: boolean;
  image: ImageInfo;
  instances: SegmentInstance[];
  overlayPath?: string;
  text: string;
  timings: StageTimings;
  cached: boolean;
}

export interface DescribeRequest extends RequestOptions {
  image: ImageSource;
  /** The region; when only `mask` is given, the mask's tight box is used. */
  box?: Box;
  /** A mask PNG (absolute, validated path) the size of the image. */
  maskPath?: string;
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
  dir: string;
  dtype: string;
  provenance: Record<string, unknown>;
  model: Record<string, unknown>;
  preprocess: { minPixels: number; maxPixels: number; patchSize: number; mergeSize: number };
  executionProvider: string;
}

/** The engine's API as seen by tools, CLI and server (implemented in engine.ts, proxied to a worker). */
export interface Engine {
  info(): Promise<PackInfo>;
  ground(req: GroundRequest): Promise<GroundResult>;
  segment(req: SegmentRequest): Promise<SegmentResult>;
  describe(req: DescribeRequest): Promise<DescribeResult>;
  dispose(): Promise<void>;
}
