import { describe, expect, it } from "vitest";
import { SegError } from "../src/errors.js";
import { maskFromLogits, rleDecode, rleEncode, upsampleLogits } from "../src/runtime/mask-post.js";
import { diffStats } from "./helpers/fixtures.js";

// torch 2.13 F.interpolate(mode="bilinear", align_corners=False), values rounded to 7 decimals.
const A_3x4 = [
  1.5409961, -0.2934289, -2.1787894, 0.5684313, -1.0845224, -1.3985955, 0.4033468, 0.8380263, -0.7192576,
  -0.4033435, -0.5966353, 0.1820365,
];
const A_UP_7x10 = [
  1.5409961, 1.3575535, 0.6237836, -0.1099865, -0.8590372, -1.6131814, -1.9040669, -0.8051791, 0.2937095,
  0.5684313, 1.165922, 1.0041988, 0.3573061, -0.2895867, -0.8588909, -1.4023318, -1.5682267, -0.6014839,
  0.3652593, 0.6069449, 0.0406998, -0.0558655, -0.4421265, -0.8283874, -0.8584517, -0.7697839, -0.5607059,
  0.0096014, 0.5799089, 0.7224856, -1.0845224, -1.1159296, -1.2415589, -1.3671882, -0.8580126, -0.1372358,
  0.4468148, 0.6206866, 0.7945584, 0.8380263, -0.9279803, -0.9323882, -0.9500197, -0.967651, -0.6880062,
  -0.3092695, 0.0329936, 0.2658354, 0.4986774, 0.5568878, -0.7714382, -0.7488466, -0.6584803, -0.5681139,
  -0.5179998, -0.4813032, -0.3808277, -0.0890158, 0.2027963, 0.2757493, -0.7192576, -0.6876661, -0.5613006,
  -0.4349349, -0.4613311, -0.5386478, -0.5187681, -0.2072994, 0.1041694, 0.1820365,
];
const B_8x6 = [
  0.4680964, -0.1577124, 1.4436601, 0.2660494, 0.1664553, 0.8743818, -0.1434738, -0.1116093, 0.9318266,
  1.2590092, 2.0049806, 0.0537369, 0.6180567, -0.4128022, -0.8410648, -2.3160419, -0.2158633, -0.7425482,
  0.5627214, 0.2596274, -0.173961, -0.6787462, 0.9382607, 0.4888698, 1.2032237, 0.0845347, -1.2001394,
  -0.0047857, -0.5180748, -0.3067042, -1.5809939, 1.7066433, 0.2055257, -0.4503298, -0.5730771, -0.5553584,
  0.594323, 1.5419426, 0.5073344, -0.5910332, -1.325326, 0.1885536, -0.0690727, -0.4949253, -1.4959149,
  -0.1938371, 0.4455122, 1.3252748,
];
const B_DOWN_3x5 = [
  -0.0493203, 0.2216345, 1.0553241, 1.5170468, 0.3413158, 0.8118834, -0.0856584, -0.5144081, 0.0445354,
  0.1029838, 0.5556276, 0.8937624, -0.1756874, -0.8785803, 0.2371883,
];

function randomLogits(n: number, seed: number): Float32Array {
  const out = new Float32Array(n);
  let s = seed >>> 0;
  for (let i = 0; i < n; i++) {
    s = (Math.imul(s, 1664525) + 1013904223) >>> 0;
    out[i] = (s / 2 ** 32) * 8 - 4;
  }
  return out;
}

describe("upsampleLogits", () => {
  it("matches torch bilinear (align_corners=False) up and down", () => {
    const up = upsampleLogits(Float32Array.from(A_3x4), 3, 4, 7, 10);
    expect(diffStats(up, A_UP_7x10).maxAbs).toBeLessThan(2e-7);
    const down = upsampleLogits(Float32Array.from(B_8x6), 8, 6, 3, 5);
    expect(diffStats(down, B_DOWN_3x5).maxAbs).toBeLessThan(2e-7);
  });

  it("is the identity at the same size and rejects wrong lengths", () => {
    const a = Float32Array.from(A_3x4);
    expect(Array.from(upsampleLogits(a, 3, 4, 3, 4))).toEqual(Array.from(a));
    expect(() => upsampleLogits(a, 4, 4, 8, 8)).toThrow(SegError);
  });
});

describe("maskFromLogits", () => {
  it("thresholds, counts and boxes a hand-made blob (box edges exclusive)", () => {
    // 4x4 stride-4 grid, positive 2x2 block in the middle -> resized 16x16 -> original 16x16
    const logits = new Float32Array(16).fill(-10);
    for (const i of [5, 6, 9, 10]) logits[i] = 10;
    const m = maskFromLogits(logits, 4, 4, [16, 16], [16, 16]);
    // grid samples sit at 4i + 1.5; the zero crossing between -10 and 10 is half way: 3.5 .. 11.5
    expect(m.box).toEqual([4, 4, 12, 12]);
    // bilinear rounds the square's corners: at (4, 4) the value is
    // 10 * 0.625^2 - 10 * (1 - 0.625^2) = -2.19, at (4, 5) it is +0.94 -> 64 - 4 corner pixels
    expect(m.areaPx).toBe(60);
    expect(m.bitmap[4 * 16 + 4]).toBe(0);
    expect(m.bitmap[4 * 16 + 5]).toBe(1);
    expect(m.bitmap[8 * 16 + 4]).toBe(1);
    expect(m.bitmap[3 * 16 + 8]).toBe(0);
    const sum = m.bitmap.reduce((a, b) => a + b, 0);
    expect(sum).toBe(m.areaPx);
  });

  it("returns an empty mask with a null box", () => {
    const m = maskFromLogits(new Float32Array(16).fill(-1), 4, 4, [16, 16], [10, 12]);
    expect(m.areaPx).toBe(0);
    expect(m.box).toBeNull();
    expect(m.bitmap.length).toBe(120);
  });

  it("squashes to a different aspect ratio (original 10x30 from resized 32x32)", () => {
    const logits = new Float32Array(64).fill(-5); // 8x8 grid
    for (let x = 0; x < 8; x++) logits[x] = 5; // top grid row positive
    const m = maskFromLogits(logits, 8, 8, [32, 32], [10, 30]);
    expect(m.box?.[0]).toBe(0);
    expect(m.box?.[2]).toBe(30);
    expect(m.box?.[1]).toBe(0);
    expect(m.box?.[3]).toBeGreaterThan(0);
    expect(m.box?.[3]).toBeLessThan(5);
  });

  it("equals the explicit two-step bilinear result (grid -> resized -> original)", () => {
    const cases: [number, number, [number, number], [number, number]][] = [
      [8, 12, [32, 48], [45, 70]], // upscale
      [8, 12, [32, 48], [20, 33]], // downscale (tiny image that smart_resize enlarged)
      [16, 8, [64, 32], [64, 32]], // same size
      [8, 8, [32, 32], [97, 13]], // squash
    ];
    for (const [h4, w4, resized, original] of cases) {
      const logits = randomLogits(h4 * w4, h4 * 31 + original[0]);
      const mid = upsampleLogits(logits, h4, w4, resized[0], resized[1]);
      const two = upsampleLogits(mid, resized[0], resized[1], original[0], original[1]);
      const m = maskFromLogits(logits, h4, w4, resized, original);
      let mismatches = 0;
      let area = 0;
      for (let i = 0; i < two.length; i++) {
        const ref = (two[i] as number) > 0 ? 1 : 0;
        area += ref;
        // a pixel may only differ where the two-step value is zero up to float32 rounding
        if (ref !== m.bitmap[i] && Math.abs(two[i] as number) > 1e-5) mismatches++;
      }
      expect(mismatches, `${h4}x${w4} -> ${resized} -> ${original}`).toBe(0);
      expect(Math.abs(m.areaPx - area)).toBeLessThanOrEqual(2);
    }
  });

  it("handles a 4000x3000 original", () => {
    const logits = randomLogits(192 * 256, 7); // [192, 256] grid of a 768x1024 resized image
    const m = maskFromLogits(logits, 192, 256, [768, 1024], [3000, 4000]);
    expect(m.bitmap.length).toBe(12_000_000);
  });

  it("rejects mismatched sizes", () => {
    expect(() => maskFromLogits(new Float32Array(10), 4, 4, [16, 16], [16, 16])).toThrow(/expected 4x4/);
    expect(() => maskFromLogits(new Float32Array(16), 4, 4, [16, 16], [0, 16])).toThrow(SegError);
  });
});

describe("RLE", () => {
  it("encodes column-major, starting with background", () => {
    // [[0, 1], [1, 1]] -> column 0: 0, 1; column 1: 1, 1 -> 0 1 1 1
    expect(rleEncode(Uint8Array.from([0, 1, 1, 1]), 2, 2)).toEqual({ size: [2, 2], counts: [1, 3] });
    // starts with foreground -> leading zero count
    expect(rleEncode(Uint8Array.from([1, 0, 0, 0]), 2, 2).counts).toEqual([0, 1, 3]);
    expect(rleEncode(new Uint8Array(6), 2, 3).counts).toEqual([6]);
  });

  it("round-trips random masks", () => {
    for (const [h, w] of [
      [1, 1],
      [7, 5],
      [33, 64],
    ] as const) {
      const bits = Uint8Array.from(randomLogits(h * w, h + w), (v) => (v > 1 ? 1 : 0));
      const rle = rleEncode(bits, h, w);
      expect(rle.counts.reduce((a, b) => a + b, 0)).toBe(h * w);
      expect(Array.from(rleDecode(rle))).toEqual(Array.from(bits));
    }
  });

  it("rejects counts that do not fit the size", () => {
    expect(() => rleDecode({ size: [2, 2], counts: [1, 2] })).toThrow(/sum to 3/);
    expect(() => rleDecode({ size: [2, 2], counts: [5] })).toThrow(SegError);
    expect(() => rleDecode({ size: [2, 2], counts: [1, -1, 4] })).toThrow(/bad run/);
  });
});
