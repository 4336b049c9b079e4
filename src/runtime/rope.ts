/**
 * 3-axis (T, H, W) position ids for Qwen3-VL's interleaved M-RoPE (transformers' get_rope_index), images only.
 * Port of modelkit/modelkit/rope.py (== transformers' Qwen3VLModel.get_rope_index for one
 * unpadded sequence): text counts up on all three axes; the merged tokens of an image with grid
 * (t, h, w) get (start + ti, start + hi, start + wi) row-major over (t, h/merge, w/merge); the text
 * after it resumes at start + max(h, w) / merge.
 */

import { SegError } from "../errors.js";

export interface RopeIndex {
  /** [3, S] i64, rows T, H, W (feed as position_ids [3, 1, S]). */
  positions: BigInt64Array;
  /** max position + 1 - S (<= 0 with images); decode token at cache index n gets n + ropeDelta. */
  ropeDelta: number;
}

export type GridThw = readonly [t: number, h: number, w: number];

/**
 * `inputIds` [S] already holds the expanded image pads: each `<|vision_start|>` followed by an image
 * pad starts a block of exactly t * (h/merge) * (w/merge) pads, which takes the next grid.
 */
export function ropeIndex(
  inputIds: ArrayLike<number> | BigInt64Array,
  grids: readonly GridThw[],
  imageTokenId: number,
  visionStartTokenId: number,
  merge = 2,
): RopeIndex {
  const s = inputIds.length;
  const id = (i: number): number => Number(inputIds[i]);
  const positions = new BigInt64Array(3 * s); // [3, S]
  let nextGrid = 0;
  let nextPos = 0; // position the next text token gets
  let maxPos = -1;
  let i = 0;
  while (i < s) {
    if (id(i) !== imageTokenId) {
      const v = BigInt(nextPos);
      positions[i] = v;
      positions[s + i] = v;
      positions[2 * s + i] = v;
      maxPos = nextPos;
      nextPos++;
      i++;
      continue;
    }
    if (i === 0 || id(i - 1) !== visionStartTokenId) {
      throw new SegError(
        "INVALID_INPUT",
        `image pad at index ${i} does not follow <|vision_start|> (${visionStartTokenId})`,
      );
    }
    const grid = grids[nextGrid];
    if (grid === undefined) {
      throw new SegError(
        "INVALID_INPUT",
        `the prompt has more image blocks than image grids (${grids.length})`,
      );
    }
    nextGrid++;
    const [t, h, w] = grid;
    if (!(t >= 1 && h >= merge && w >= merge) || h % merge !== 0 || w % merge !== 0) {
      throw new SegError(
        "INVALID_INPUT",
        `grid [${t}, ${h}, ${w}] is not divisible by the merge size ${merge}`,
      );
    }
    const gh = h / merge;
    const gw = w / merge;
    const count = t * gh * gw;
    for (let j = 0; j < count; j++) {
      if (i + j >= s || id(i + j) !== imageTokenId) {
        throw new SegError(
          "INVALID_INPUT",
          `image block at index ${i} must hold ${count} image pads for grid [${t}, ${h}, ${w}]`,
        );
      }
    }
    let j = i;
    for (let ti = 0; ti < t; ti++) {
      for (let hi = 0; hi < gh; hi++) {
        for (let wi = 0; wi < gw; wi++) {
          positions[j] = BigInt(nextPos + ti);
          positions[s + j] = BigInt(nextPos + hi);
          positions[2 * s + j] = BigInt(nextPos + wi);
          j++;
        }
      }
    }
    maxPos = Math.max(maxPos, nextPos + Math.max(t - 1, gh - 1, gw - 1));
    nextPos += Math.max(gh, gw);
    i += count;
  }
  if (nextGrid !== grids.length) {
    throw new SegError(
      "INVALID_INPUT",
      `${grids.length} image grids were given but the prompt has ${nextGrid} image blocks`,
    );
  }
  return { positions, ropeDelta: s === 0 ? 0 : maxPos + 1 - s };
}

/**
 * Position ids [3, count] (rows T, H, W) of `count` new tokens at cache indices
 * cacheLength .. cacheLength + count - 1: n + ropeDelta on every axis.
 */
export function decodePositions(cacheLength: number, count: number, ropeDelta: number): BigInt64Array {
  const out = new BigInt64Array(3 * count);
  for (let k = 0; k < count; k++) {
    const v = BigInt(cacheLength + k + ropeDelta);
    out[k] = v;
    out[count + k] = v;
    out[2 * count + k] = v;
  }
  return out;
}

/** Columns `start..` of position ids [3, S]: the positions of a suffix fed after a cached prefix. */
export function positionsFrom(positions: BigInt64Array, start: number): BigInt64Array {
  const n = positions.length / 3;
  const out = new BigInt64Array(3 * (n - start)); // [3, S - start]
  for (let a = 0; a < 3; a++) out.set(positions.subarray(a * n + start, (a + 1) * n), a * (n - start));
  return out;
}
