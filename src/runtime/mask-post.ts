/**
 * Mask post-processing: stride-4 logits -> original-size binary mask, area, tight box, RLE.
 *
 * The reference semantics are two bilinear resizes (torch F.interpolate, align_corners=false):
 * stride-4 grid [h4, w4] -> resized image [Hr, Wr] -> original image [H0, W0] (a squash, as the
 * preprocessing squashed). Bilinear resizing is separable and linear, so per axis the two steps
 * are one sparse operator (the product of the two interpolation matrices, at most 3 taps per output
 * sample). maskFromLogits applies that composed operator in one separable pass from the small grid
 * straight to the original size: the exact two-step result (up to float32 rounding) without ever
 * materialising the [Hr, Wr] logits, so a 4000x3000 mask costs one pass over its pixels.
 */

import { SegError } from "../errors.js";
import type { Box } from "./types.js";

const f32 = Math.fround;

/** Sparse 1-D resampling operator: output o = sum_k weight[o*K+k] * input[index[o*K+k]]. */
interface Taps {
  k: number;
  index: Int32Array;
  weight: Float64Array;
}

/** torch bilinear (align_corners=false) taps along one axis, coordinates in float32 like torch. */
function linearTaps(inSize: number, outSize: number): Taps {
  const index = new Int32Array(outSize * 2);
  const weight = new Float64Array(outSize * 2);
  const scale = f32(inSize / outSize);
  for (let o = 0; o < outSize; o++) {
    let src = f32(f32(scale * f32(o + 0.5)) - 0.5);
    if (src < 0) src = 0;
    const i0 = Math.floor(src);
    const i1 = Math.min(i0 + 1, inSize - 1);
    const l1 = f32(src - i0);
    index[2 * o] = i0;
    index[2 * o + 1] = i1;
    weight[2 * o] = f32(1 - l1);
    weight[2 * o + 1] = l1;
  }
  return { k: 2, index, weight };
}

/** second ∘ first as one sparse operator (first: a -> b samples, second: b -> c samples). */
function composeTaps(first: Taps, second: Taps, outSize: number): Taps {
  const k = 4; // 2 x 2 products; at most 3 distinct inputs, merged below
  const index = new Int32Array(outSize * k);
  const weight = new Float64Array(outSize * k);
  for (let o = 0; o < outSize; o++) {
    let n = 0;
    for (let a = 0; a < second.k; a++) {
      const mid = second.index[o * second.k + a] as number;
      const wa = second.weight[o * second.k + a] as number;
      for (let b = 0; b < first.k; b++) {
        const src = first.index[mid * first.k + b] as number;
        const w = wa * (first.weight[mid * first.k + b] as number);
        let slot = -1;
        for (let s = 0; s < n; s++) if (index[o * k + s] === src) slot = s;
        if (slot < 0) {
          slot = n++;
          index[o * k + slot] = src;
        }
        weight[o * k + slot] = (weight[o * k + slot] as number) + w;
      }
    }
    // unused slots keep weight 0 and index 0
  }
  return { k, index, weight };
}

/** Horizontal pass: [h, w] -> [h, outW] with per-column taps. */
function applyRows(src: Float32Array, h: number, w: number, outW: number, t: Taps): Float32Array {
  const out = new Float32Array(h * outW);
  for (let y = 0; y < h; y++) {
    const row = y * w;
    const orow = y * outW;
    for (let x = 0; x < outW; x++) {
      let acc = 0;
      for (let k = 0; k < t.k; k++) {
        acc += (t.weight[x * t.k + k] as number) * (src[row + (t.index[x * t.k + k] as number)] as number);
      }
      out[orow + x] = acc;
    }
  }
  return out;
}

function checkLogits(logits: Float32Array, h: number, w: number): void {
  if (!(Number.isInteger(h) && Number.isInteger(w) && h > 0 && w > 0) || logits.length !== h * w) {
    throw new SegError("INVALID_INPUT", `mask logits hold ${logits.length} values, expected ${h}x${w}`);
  }
}

function checkSize(h: number, w: number, what: string): void {
  if (!(Number.isInteger(h) && Number.isInteger(w) && h > 0 && w > 0)) {
    throw new SegError("INVALID_INPUT", `${what} must be positive integers, got ${w}x${h}`);
  }
}

/** Bilinear resize like torch F.interpolate(mode="bilinear", align_corners=False): [h, w] -> [outH, outW]. */
export function upsampleLogits(
  logits: Float32Array,
  h: number,
  w: number,
  outH: number,
  outW: number,
): Float32Array {
  checkLogits(logits, h, w);
  checkSize(outH, outW, "output size");
  const tx = linearTaps(w, outW);
  const ty = linearTaps(h, outH);
  const tmp = applyRows(logits, h, w, outW, tx); // [h, outW]
  const out = new Float32Array(outH * outW);
  for (let y = 0; y < outH; y++) {
    const i0 = (ty.index[2 * y] as number) * outW;
    const i1 = (ty.index[2 * y + 1] as number) * outW;
    const w0 = ty.weight[2 * y] as number;
    const w1 = ty.weight[2 * y + 1] as number;
    const orow = y * outW;
    for (let x = 0; x < outW; x++)
      out[orow + x] = w0 * (tmp[i0 + x] as number) + w1 * (tmp[i1 + x] as number);
  }
  return out;
}

export interface MaskResult {
  /** [H0, W0] row-major, 1 = object. */
  bitmap: Uint8Array;
  areaPx: number;
  /** Tight box [minX, minY, maxX + 1, maxY + 1] in original pixels, null when the mask is empty. */
  box: Box | null;
}

/**
 * Stride-4 logits [h4, w4] -> binary mask of the original image [H0, W0]: the two bilinear resizes
 * (to `resized` [Hr, Wr], then to `original` [H0, W0]) composed exactly (see the file comment),
 * then `logit > threshold` (threshold 0 == probability > 0.5).
 */
export function maskFromLogits(
  logits: Float32Array,
  h4: number,
  w4: number,
  resized: readonly [number, number],
  original: readonly [number, number],
  threshold = 0,
): MaskResult {
  checkLogits(logits, h4, w4);
  const [hr, wr] = resized;
  const [h0, w0] = original;
  checkSize(hr, wr, "resized size");
  checkSize(h0, w0, "original size");
  const tx = composeTaps(linearTaps(w4, wr), linearTaps(wr, w0), w0);
  const ty = composeTaps(linearTaps(h4, hr), linearTaps(hr, h0), h0);
  const tmp = applyRows(logits, h4, w4, w0, tx); // [h4, W0]

  const bitmap = new Uint8Array(h0 * w0);
  let area = 0;
  let minX = w0;
  let minY = h0;
  let maxX = -1;
  let maxY = -1;
  const k = ty.k;
  for (let y = 0; y < h0; y++) {
    const r0 = (ty.index[y * k] as number) * w0;
    const r1 = (ty.index[y * k + 1] as number) * w0;
    const r2 = (ty.index[y * k + 2] as number) * w0;
    const r3 = (ty.index[y * k + 3] as number) * w0;
    const a0 = ty.weight[y * k] as number;
    const a1 = ty.weight[y * k + 1] as number;
    const a2 = ty.weight[y * k + 2] as number;
    const a3 = ty.weight[y * k + 3] as number;
    const orow = y * w0;
    let rowFirst = -1;
    let rowLast = -1;
    for (let x = 0; x < w0; x++) {
      const v =
        a0 * (tmp[r0 + x] as number) +
        a1 * (tmp[r1 + x] as number) +
        a2 * (tmp[r2 + x] as number) +
        a3 * (tmp[r3 + x] as number);
      if (v > threshold) {
        bitmap[orow + x] = 1;
        area++;
        if (rowFirst < 0) rowFirst = x;
        rowLast = x;
      }
    }
    if (rowFirst >= 0) {
      if (rowFirst < minX) minX = rowFirst;
      if (rowLast > maxX) maxX = rowLast;
      if (minY === h0) minY = y;
      maxY = y;
    }
  }
  const box: Box | null = area === 0 ? null : [minX, minY, maxX + 1, maxY + 1];
  return { bitmap, areaPx: area, box };
}

export interface Rle {
  size: [height: number, width: number];
  /** Alternating run lengths in column-major order, starting with background (may be 0). */
  counts: number[];
}

/** COCO-style uncompressed RLE of a row-major [h, w] 0/1 bitmap. */
export function rleEncode(bitmap: Uint8Array, h: number, w: number): Rle {
  checkSize(h, w, "mask size");
  if (bitmap.length !== h * w) {
    throw new SegError("INVALID_INPUT", `mask holds ${bitmap.length} values, expected ${w}x${h}`);
  }
  const counts: number[] = [];
  let current = 0;
  let run = 0;
  for (let x = 0; x < w; x++) {
    for (let y = 0; y < h; y++) {
      const v = bitmap[y * w + x] === 0 ? 0 : 1;
      if (v !== current) {
        counts.push(run);
        run = 0;
        current = v;
      }
      run++;
    }
  }
  counts.push(run);
  return { size: [h, w], counts };
}

/** Inverse of rleEncode: row-major [h, w] 0/1 bitmap. */
export function rleDecode(rle: Rle): Uint8Array {
  const [h, w] = rle.size;
  checkSize(h, w, "RLE size");
  const out = new Uint8Array(h * w);
  let pos = 0; // column-major index
  let value = 0;
  for (const c of rle.counts) {
    if (!Number.isInteger(c) || c < 0 || pos + c > h * w) {
      throw new SegError("INVALID_INPUT", `RLE counts do not fit a ${w}x${h} mask (bad run ${c} at ${pos})`);
    }
    if (value === 1) {
      for (let i = pos; i < pos + c; i++) {
        const x = Math.floor(i / h);
        const y = i - x * h;
        out[y * w + x] = 1;
      }
    }
    pos += c;
    value ^= 1;
  }
  if (pos !== h * w) {
    throw new SegError("INVALID_INPUT", `RLE counts sum to ${pos}, a ${w}x${h} mask needs ${h * w}`);
  }
  return out;
}

/** Tight box [x1, y1, x2, y2) of the set pixels of a 0/1 bitmap, or null when empty. */
export function tightBox(bitmap: Uint8Array, width: number, height: number): Box | null {
  let x1 = width;
  let y1 = height;
  let x2 = -1;
  let y2 = -1;
  for (let y = 0; y < height; y++) {
    const row = y * width;
    for (let x = 0; x < width; x++) {
      if (bitmap[row + x]) {
        if (x < x1) x1 = x;
        if (x > x2) x2 = x;
        if (y < y1) y1 = y;
        y2 = y;
      }
    }
  }
  return x2 < 0 ? null : [x1, y1, x2 + 1, y2 + 1];
}
