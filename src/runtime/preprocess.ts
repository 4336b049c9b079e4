/**
 * Image decoding and Qwen3-VL preprocessing (transformers' Qwen2VLImageProcessor, which Qwen3-VL uses).
 *
 * decodeImage: sharp over bytes tools/inputs.ts already checked (EXIF orientation, first GIF frame,
 * alpha over white) -> packed RGB uint8 HWC.
 * preprocess: smart_resize (factor 32, Python rounding) -> bicubic resize -> normalise -> patchify
 * in merge-window order, plus the CHW `hr_image` the mask decoder takes.
 *
 * The resize is a TypeScript implementation of PIL's separable bicubic resampling on uint8
 * (a = -0.5 kernel widened by the scale factor when shrinking, 22-bit fixed-point coefficients,
 * a uint8 round/clip between the horizontal and the vertical pass). The reference processor
 * (transformers' Qwen2VLImageProcessorPil, which the golden fixtures use) resizes with PIL, so this
 * reproduces its pixels exactly; sharp/libvips' cubic kernel differs by a few levels (see the
 * parity test), which would be a systematic input shift for the ViT and the mask decoder.
 */

import sharp from "sharp";
import { SegError } from "../errors.js";
import type { CheckedImage } from "./types.js";

export interface DecodedImage {
  /** [height, width, 3] uint8, packed RGB, EXIF orientation applied, alpha composited on white. */
  rgb: Uint8Array;
  width: number;
  height: number;
}

export interface PreprocessConfig {
  /** @default 16 */
  patchSize: number;
  /** @default 2 */
  mergeSize: number;
  /** @default 2 */
  temporalPatchSize: number;
  imageMean: readonly [number, number, number];
  imageStd: readonly [number, number, number];
  minPixels: number;
  maxPixels: number;
}

export interface Preprocessed {
  /** [P, 3 * tp * ps * ps] f32 (P = gh * gw; [P, 1536] for Qwen3-VL), merge-window order. */
  pixelValues: Float32Array;
  /** image_grid_thw of this image: [1, gh, gw] patches. */
  grid: [t: number, gh: number, gw: number];
  /** [Hr, Wr], the size the image was resized to (gh * patchSize, gw * patchSize). */
  resized: [height: number, width: number];
  /** [3, Hr, Wr] f32 CHW, normalised exactly like pixelValues (== hr_image of the mask decoder). */
  hrImage: Float32Array;
}

/** The aspect-ratio limit of HF's smart_resize. */
export const MAX_ASPECT_RATIO = 200;

// ---------------------------------------------------------------------------------------------
// Decoding

/**
 * Decode checked image bytes (tools/inputs.ts verified format, header and pixel count) to packed RGB
 * uint8: EXIF orientation applied, first frame of animations, alpha composited on white, raw stored
 * values (no ICC transform, like PIL in the reference and the training pipeline).
 */
export async function decodeImage(image: CheckedImage): Promise<DecodedImage> {
  try {
    const input = sharp(image.bytes, { failOn: "error", pages: 1, ignoreIcc: true });
    const hasAlpha = (await input.metadata()).hasAlpha === true;
    const { data, info } = await input
      .rotate() // EXIF orientation
      .toColourspace("srgb")
      [hasAlpha ? "ensureAlpha" : "removeAlpha"]()
      .raw({ depth: "uchar" })
      .toBuffer({ resolveWithObject: true });
    const channels = hasAlpha ? 4 : 3;
    if (info.channels !== channels || info.width !== image.width || info.height !== image.height) {
      throw new Error(
        `decoded ${info.width}x${info.height}x${info.channels}, expected ${image.width}x${image.height}x${channels}`,
      );
    }
    const rgb = hasAlpha
      ? compositeOnWhite(data, info.width * info.height)
      : new Uint8Array(data.buffer, data.byteOffset, data.byteLength);
    return { rgb, width: info.width, height: info.height };
  } catch (cause) {
    throw new SegError(
      "IMAGE_DECODE_FAILED",
      `${image.label ? `image ${image.label}` : "the image"} has a readable header but its pixels cannot be decoded (${String(
        (cause as Error).message,
      )
        .replace(/\s+/g, " ")
        .trim()
        .slice(0, 160)}): the file is corrupt or truncated; re-export it`,
      { cause },
    );
  }
}

/** The pixels of `box` ([x1, y1, x2, y2) integers inside the image). */
export function cropRgb(image: DecodedImage, box: readonly [number, number, number, number]): DecodedImage {
  const [x1, y1, x2, y2] = box;
  const w = x2 - x1;
  const h = y2 - y1;
  const rgb = new Uint8Array(w * h * 3); // [h, w, 3]
  for (let y = 0; y < h; y++) {
    const from = ((y1 + y) * image.width + x1) * 3;
    rgb.set(image.rgb.subarray(from, from + w * 3), y * w * 3);
  }
  return { rgb, width: w, height: h };
}

/**
 * RGBA -> RGB over an opaque white background with PIL's integer alpha_composite arithmetic
 * (7-bit coefficients, divide-by-255 by shifts), so the pixels equal the reference's
 * `Image.alpha_composite(white, rgba)` exactly. With an opaque white destination its coefficients
 * reduce to coef1 = 128 a, coef2 = 128 (255 - a).
 */
function compositeOnWhite(rgba: Uint8Array, pixels: number): Uint8Array {
  const out = new Uint8Array(pixels * 3);
  for (let i = 0; i < pixels; i++) {
    const a = rgba[i * 4 + 3] as number;
    for (let c = 0; c < 3; c++) {
      if (a === 0) {
        out[i * 3 + c] = 255;
        continue;
      }
      const t = ((rgba[i * 4 + c] as number) * a + 255 * (255 - a)) * 128 + (0x80 << 7);
      out[i * 3 + c] = (((t >> 8) + t) >> 8) >> 7;
    }
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// smart_resize

/** Python's round(): halves go to the even neighbour (400 / 32 = 12.5 -> 12). */
export function roundHalfEven(x: number): number {
  const f = Math.floor(x);
  const d = x - f;
  if (d > 0.5) return f + 1;
  if (d < 0.5) return f;
  return f % 2 === 0 ? f : f + 1;
}

/**
 * HF smart_resize: both sides multiples of `factor`, area within [minPixels, maxPixels], aspect
 * ratio kept as closely as possible. Returns [Hr, Wr]. Throws INVALID_INPUT for non-positive sizes
 * and for aspect ratios over 200 (the reference raises there too; such images cannot be tokenised
 * sensibly, the caller must crop them).
 */
export function smartResize(
  height: number,
  width: number,
  factor = 32,
  minPixels = 65_536,
  maxPixels = 16_777_216,
): [number, number] {
  if (!Number.isInteger(height) || !Number.isInteger(width) || height <= 0 || width <= 0) {
    throw new SegError("INVALID_INPUT", `image size must be positive integers, got ${width}x${height}`);
  }
  const ratio = Math.max(height, width) / Math.min(height, width);
  if (ratio > MAX_ASPECT_RATIO) {
    throw new SegError(
      "INVALID_INPUT",
      `image aspect ratio ${ratio.toFixed(1)} (${width}x${height}) is over the limit of ${MAX_ASPECT_RATIO}; crop the image first`,
      { details: { width, height, ratio } },
    );
  }
  let hb = roundHalfEven(height / factor) * factor;
  let wb = roundHalfEven(width / factor) * factor;
  if (hb * wb > maxPixels) {
    const beta = Math.sqrt((height * width) / maxPixels);
    hb = Math.max(factor, Math.floor(height / beta / factor) * factor);
    wb = Math.max(factor, Math.floor(width / beta / factor) * factor);
  } else if (hb * wb < minPixels) {
    const beta = Math.sqrt(minPixels / (height * width));
    hb = Math.ceil((height * beta) / factor) * factor;
    wb = Math.ceil((width * beta) / factor) * factor;
  }
  return [hb, wb];
}

// ---------------------------------------------------------------------------------------------
// PIL-compatible bicubic resampling (uint8, separable)

const PRECISION_BITS = 22; // 32 - 8 bits of data - 2 bits of headroom, as PIL
const HALF = 1 << (PRECISION_BITS - 1);

function cubic(x: number): number {
  const a = -0.5;
  const t = Math.abs(x);
  if (t < 1) return ((a + 2) * t - (a + 3)) * t * t + 1;
  if (t < 2) return ((a * t - 5 * a) * t + 8 * a) * t - 4 * a;
  return 0;
}

interface Taps {
  ksize: number;
  /** [outSize] first input index of each output sample's window. */
  start: Int32Array;
  /** [outSize] number of taps used. */
  count: Int32Array;
  /** [outSize * ksize] fixed-point weights. */
  weight: Int32Array;
}

/** Per-output-sample windows and weights along one axis (PIL's coefficient rules). */
function bicubicTaps(inSize: number, outSize: number): Taps {
  const scale = inSize / outSize;
  const filterScale = Math.max(scale, 1);
  const support = 2 * filterScale;
  const ksize = Math.ceil(support) * 2 + 1;
  const start = new Int32Array(outSize);
  const count = new Int32Array(outSize);
  const weight = new Int32Array(outSize * ksize);
  const k = new Float64Array(ksize);
  const inv = 1 / filterScale;
  for (let o = 0; o < outSize; o++) {
    const center = (o + 0.5) * scale;
    let lo = Math.trunc(center - support + 0.5);
    if (lo < 0) lo = 0;
    let hi = Math.trunc(center + support + 0.5);
    if (hi > inSize) hi = inSize;
    const n = hi - lo;
    let sum = 0;
    for (let i = 0; i < n; i++) {
      const w = cubic((i + lo - center + 0.5) * inv);
      k[i] = w;
      sum += w;
    }
    for (let i = 0; i < n; i++) {
      const w = sum === 0 ? (k[i] as number) : (k[i] as number) / sum;
      weight[o * ksize + i] = Math.trunc(
        w < 0 ? w * (1 << PRECISION_BITS) - 0.5 : w * (1 << PRECISION_BITS) + 0.5,
      );
    }
    start[o] = lo;
    count[o] = n;
  }
  return { ksize, start, count, weight };
}

function clip8(acc: number): number {
  const v = acc >> PRECISION_BITS; // acc fits in int32 (|weights| sum < 2 for this kernel)
  return v < 0 ? 0 : Math.min(v, 255);
}

/** Horizontal pass: [h, inW, 3] -> [h, outW, 3]. */
function resampleRows(src: Uint8Array, inW: number, h: number, outW: number): Uint8Array {
  const t = bicubicTaps(inW, outW);
  const out = new Uint8Array(h * outW * 3);
  for (let y = 0; y < h; y++) {
    const row = y * inW * 3;
    const orow = y * outW * 3;
    for (let x = 0; x < outW; x++) {
      const base = row + (t.start[x] as number) * 3;
      const n = t.count[x] as number;
      const kb = x * t.ksize;
      let r = HALF;
      let g = HALF;
      let b = HALF;
      for (let i = 0; i < n; i++) {
        const w = t.weight[kb + i] as number;
        const p = base + i * 3;
        r += (src[p] as number) * w;
        g += (src[p + 1] as number) * w;
        b += (src[p + 2] as number) * w;
      }
      const o = orow + x * 3;
      out[o] = clip8(r);
      out[o + 1] = clip8(g);
      out[o + 2] = clip8(b);
    }
  }
  return out;
}

/** Vertical pass: [inH, w, 3] -> [outH, w, 3], accumulating whole rows for cache locality. */
function resampleCols(src: Uint8Array, w: number, inH: number, outH: number): Uint8Array {
  const t = bicubicTaps(inH, outH);
  const stride = w * 3;
  const out = new Uint8Array(outH * stride);
  const acc = new Float64Array(stride); // exact: |sum| < 2^31
  for (let y = 0; y < outH; y++) {
    acc.fill(HALF);
    const n = t.count[y] as number;
    const kb = y * t.ksize;
    const s0 = t.start[y] as number;
    for (let i = 0; i < n; i++) {
      const wgt = t.weight[kb + i] as number;
      const row = (s0 + i) * stride;
      for (let j = 0; j < stride; j++) acc[j] = (acc[j] as number) + (src[row + j] as number) * wgt;
    }
    const orow = y * stride;
    for (let j = 0; j < stride; j++) out[orow + j] = clip8(acc[j] as number);
  }
  return out;
}

/**
 * Resize packed RGB uint8 with PIL's `Image.resize(size, BICUBIC)` semantics: horizontal pass
 * first (rounded to uint8), then vertical; an axis whose size does not change is not filtered.
 */
export function resizeBicubic(
  rgb: Uint8Array,
  width: number,
  height: number,
  outWidth: number,
  outHeight: number,
): Uint8Array {
  if (rgb.length !== width * height * 3) {
    throw new SegError("INVALID_INPUT", `RGB buffer has ${rgb.length} bytes, expected ${width}x${height}x3`);
  }
  if (!(outWidth > 0 && outHeight > 0 && Number.isInteger(outWidth) && Number.isInteger(outHeight))) {
    throw new SegError(
      "INVALID_INPUT",
      `resize target must be positive integers, got ${outWidth}x${outHeight}`,
    );
  }
  let img = rgb;
  if (outWidth !== width) img = resampleRows(img, width, height, outWidth);
  if (outHeight !== height) img = resampleCols(img, outWidth, height, outHeight);
  return img === rgb ? rgb.slice() : img;
}

// ---------------------------------------------------------------------------------------------
// Normalise + patchify

/**
 * smart_resize -> bicubic resize -> (x / 255 - mean) / std -> patches in merge-window order.
 * The float steps follow the reference in float32 (x * (1/255) rounded to f32, then f32 subtract
 * and divide), so values match it bit for bit given the same resized pixels.
 */
export function preprocess(
  rgb: Uint8Array,
  width: number,
  height: number,
  cfg: PreprocessConfig,
): Preprocessed {
  const ps = cfg.patchSize;
  const merge = cfg.mergeSize;
  const tps = cfg.temporalPatchSize;
  if (rgb.length !== width * height * 3) {
    throw new SegError("INVALID_INPUT", `RGB buffer has ${rgb.length} bytes, expected ${width}x${height}x3`);
  }
  const [hr, wr] = smartResize(height, width, ps * merge, cfg.minPixels, cfg.maxPixels);
  const resized = hr === height && wr === width ? rgb : resizeBicubic(rgb, width, height, wr, hr); // [Hr, Wr, 3]

  // 256-entry lookup per channel: exact and avoids per-pixel float work.
  const lut = new Float32Array(3 * 256);
  for (let c = 0; c < 3; c++) {
    const mean = Math.fround(cfg.imageMean[c] as number);
    const std = Math.fround(cfg.imageStd[c] as number);
    for (let v = 0; v < 256; v++) {
      lut[c * 256 + v] = Math.fround(Math.fround(Math.fround(v * (1 / 255)) - mean) / std);
    }
  }

  const plane = hr * wr;
  const hrImage = new Float32Array(3 * plane); // [3, Hr, Wr]
  for (let i = 0; i < plane; i++) {
    const s = i * 3;
    hrImage[i] = lut[resized[s] as number] as number;
    hrImage[plane + i] = lut[256 + (resized[s + 1] as number)] as number;
    hrImage[2 * plane + i] = lut[512 + (resized[s + 2] as number)] as number;
  }

  const gh = hr / ps;
  const gw = wr / ps;
  const cols = 3 * tps * ps * ps;
  const pixelValues = new Float32Array(gh * gw * cols); // [P, 1536]
  const windowsPerRow = gw / merge;
  const win = merge * merge;
  for (let p = 0; p < gh * gw; p++) {
    const blk = Math.floor(p / win);
    const q = p % win;
    const patchRow = Math.floor(blk / windowsPerRow) * merge + Math.floor(q / merge);
    const patchCol = (blk % windowsPerRow) * merge + (q % merge);
    const frame = ps * ps;
    let o = p * cols;
    for (let c = 0; c < 3; c++) {
      // columns (c, t, py, px): frame t = 0 from the image ...
      const first = o;
      for (let py = 0; py < ps; py++) {
        let s = c * plane + (patchRow * ps + py) * wr + patchCol * ps;
        for (let px = 0; px < ps; px++) pixelValues[o++] = hrImage[s++] as number;
      }
      // ... and a still image repeats the same frame for every further t
      for (let t = 1; t < tps; t++) {
        pixelValues.copyWithin(o, first, first + frame);
        o += frame;
      }
    }
  }
  return { pixelValues, grid: [1, gh, gw], resized: [hr, wr], hrImage };
}
