/**
 * Host-side inputs of vision_encoder.onnx (transformers' Qwen3VLVisionModel fast_pos_embed_interpolate and rot_pos_emb): bilinear taps into the
 * learned side x side position table and the ViT's 2-D rotary tables, one row per patch in
 * merge-window order. Port of modelkit/modelkit/vision_inputs.py; every float step is a float32
 * step in the reference's order (Math.fround), so indices match exactly and floats to the bit
 * (cos/sin within an f32 ulp, as they go through double-precision cos/sin).
 */

import { SegError } from "../errors.js";

export interface VisionHostInputs {
  /** [P, 4] i64 rows of the position table: (h0,w0), (h0,w1), (h1,w0), (h1,w1). */
  posEmbedIdx: BigInt64Array;
  /** [P, 4] f32 bilinear weights of those rows. */
  posEmbedWeight: Float32Array;
  /** [P, dv] f32 */
  rotaryCos: Float32Array;
  /** [P, dv] f32 */
  rotarySin: Float32Array;
}

const f32 = Math.fround;

function checkGrid(gh: number, gw: number, merge: number): void {
  if (
    !Number.isInteger(gh) ||
    !Number.isInteger(gw) ||
    !Number.isInteger(merge) ||
    merge < 1 ||
    gh < merge ||
    gw < merge ||
    gh % merge !== 0 ||
    gw % merge !== 0
  ) {
    throw new SegError(
      "INVALID_INPUT",
      `grid ${gh}x${gw} patches must be positive multiples of the merge size ${merge} ` +
        "(smart_resize makes both sides multiples of patch_size * merge)",
    );
  }
}

/** (row, col) patch coordinates of every patch in merge-window order, each [P]. */
export function mergeWindowPositions(
  gh: number,
  gw: number,
  merge = 2,
): { row: Int32Array; col: Int32Array } {
  checkGrid(gh, gw, merge);
  const n = gh * gw;
  const row = new Int32Array(n);
  const col = new Int32Array(n);
  const win = merge * merge;
  const windowsPerRow = gw / merge;
  for (let p = 0; p < n; p++) {
    const w = Math.floor(p / win);
    const q = p % win;
    row[p] = Math.floor(w / windowsPerRow) * merge + Math.floor(q / merge);
    col[p] = (w % windowsPerRow) * merge + (q % merge);
  }
  return { row, col };
}

/**
 * Bilinear taps (align_corners=True) along one axis in float32 like HF:
 * src = f32(pos * (side - 1)) / (size - 1); taps floor(src) and min(floor + 1, side - 1);
 * w0 = 1 - frac, w1 = 1 - |frac - 1| (HF's form; not always bit-equal to frac).
 */
function axisTaps(pos: number, size: number, side: number): [t0: number, t1: number, w0: number, w1: number] {
  const src = f32(f32(pos * (side - 1)) / f32(Math.max(size - 1, 1)));
  const floor = Math.floor(src);
  const frac = src - floor; // exact in f32
  const w0 = f32(1 - frac);
  const w1 = f32(1 - Math.abs(f32(frac - 1)));
  return [floor, Math.min(floor + 1, side - 1), w0, w1];
}

/** ViT rotary inverse frequencies, f32 [dv/4]: 1 / theta^(f32(2k / (dv/2))). */
export function visionInvFreq(visionHeadDim: number, ropeTheta = 10_000): Float32Array {
  if (!Number.isInteger(visionHeadDim) || visionHeadDim <= 0 || visionHeadDim % 4 !== 0) {
    throw new SegError(
      "INVALID_INPUT",
      `vision head_dim must be a positive multiple of 4, got ${visionHeadDim}`,
    );
  }
  const spatial = visionHeadDim / 2;
  const out = new Float32Array(spatial / 2);
  for (let k = 0; k < spatial / 2; k++) {
    const exponent = f32((2 * k) / spatial);
    const power = f32(ropeTheta ** exponent);
    out[k] = f32(1 / power);
  }
  return out;
}

/**
 * All host-computed vision inputs for one image of gh x gw patches (P = gh * gw rows, merge-window
 * order). `numPositionEmbeddings` must be a square (2304 = 48 x 48 for Qwen3-VL).
 */
export function visionHostInputs(
  gh: number,
  gw: number,
  numPositionEmbeddings: number,
  visionHeadDim: number,
  merge = 2,
  ropeTheta = 10_000,
): VisionHostInputs {
  const side = Math.round(Math.sqrt(numPositionEmbeddings));
  if (side * side !== numPositionEmbeddings || side < 1) {
    throw new SegError(
      "INVALID_INPUT",
      `num_position_embeddings must be a square (48*48 = 2304 in Qwen3-VL), got ${numPositionEmbeddings}`,
    );
  }
  const { row, col } = mergeWindowPositions(gh, gw, merge);
  const n = gh * gw;

  // Taps per distinct row / column index, then gathered per patch.
  const rowTaps = Array.from({ length: gh }, (_, r) => axisTaps(r, gh, side));
  const colTaps = Array.from({ length: gw }, (_, c) => axisTaps(c, gw, side));
  const posEmbedIdx = new BigInt64Array(n * 4); // [P, 4]
  const posEmbedWeight = new Float32Array(n * 4); // [P, 4]
  for (let p = 0; p < n; p++) {
    const [h0, h1, wh0, wh1] = rowTaps[row[p] as number] as [number, number, number, number];
    const [c0, c1, wc0, wc1] = colTaps[col[p] as number] as [number, number, number, number];
    const o = p * 4;
    posEmbedIdx[o] = BigInt(h0 * side + c0);
    posEmbedIdx[o + 1] = BigInt(h0 * side + c1);
    posEmbedIdx[o + 2] = BigInt(h1 * side + c0);
    posEmbedIdx[o + 3] = BigInt(h1 * side + c1);
    posEmbedWeight[o] = wh0 * wc0;
    posEmbedWeight[o + 1] = wh0 * wc1;
    posEmbedWeight[o + 2] = wh1 * wc0;
    posEmbedWeight[o + 3] = wh1 * wc1;
  }

  // Rotary: per patch [row * f, col * f, row * f, col * f] with f = invFreq (products in f32).
  const invFreq = visionInvFreq(visionHeadDim, ropeTheta); // [dv/4]
  const q = invFreq.length;
  const dv = visionHeadDim;
  const rotaryCos = new Float32Array(n * dv); // [P, dv]
  const rotarySin = new Float32Array(n * dv); // [P, dv]
  const angH = new Float64Array(q);
  const angW = new Float64Array(q);
  for (let p = 0; p < n; p++) {
    const r = row[p] as number;
    const c = col[p] as number;
    for (let k = 0; k < q; k++) {
      angH[k] = f32(r * (invFreq[k] as number));
      angW[k] = f32(c * (invFreq[k] as number));
    }
    const o = p * dv;
    for (let k = 0; k < q; k++) {
      const ch = Math.cos(angH[k] as number);
      const sh = Math.sin(angH[k] as number);
      const cw = Math.cos(angW[k] as number);
      const sw = Math.sin(angW[k] as number);
      rotaryCos[o + k] = ch;
      rotarySin[o + k] = sh;
      rotaryCos[o + q + k] = cw;
      rotarySin[o + q + k] = sw;
      rotaryCos[o + 2 * q + k] = ch;
      rotarySin[o + 2 * q + k] = sh;
      rotaryCos[o + 3 * q + k] = cw;
      rotarySin[o + 3 * q + k] = sw;
    }
  }
  return { posEmbedIdx, posEmbedWeight, rotaryCos, rotarySin };
}
