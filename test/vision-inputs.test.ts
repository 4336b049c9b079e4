import { describe, expect, it } from "vitest";
import { SegError } from "../src/errors.js";
import { mergeWindowPositions, visionHostInputs, visionInvFreq } from "../src/runtime/vision-inputs.js";
import { diffStats, fixtureCases, loadCase } from "./helpers/fixtures.js";

describe("vision host inputs", () => {
  it("enumerates patches in merge-window order", () => {
    const { row, col } = mergeWindowPositions(4, 6);
    const pairs = Array.from(row, (r, i) => [r, col[i]]);
    expect(pairs.slice(0, 8)).toEqual([
      [0, 0],
      [0, 1],
      [1, 0],
      [1, 1],
      [0, 2],
      [0, 3],
      [1, 2],
      [1, 3],
    ]);
    expect(pairs[12]).toEqual([2, 0]); // fourth window starts the second window row
  });

  it("interpolates the 48x48 table with align-corners taps", () => {
    const gh = 4;
    const gw = 2;
    const v = visionHostInputs(gh, gw, 2304, 16);
    expect(v.posEmbedIdx.length).toBe(gh * gw * 4);
    // patch 0 is (0, 0): all weight on table row 0
    expect(Array.from(v.posEmbedIdx.subarray(0, 4), Number)).toEqual([0, 1, 48, 48 + 1]);
    expect(Array.from(v.posEmbedWeight.subarray(0, 4))).toEqual([1, 0, 0, 0]);
    // patch 1 is (0, 1): column 1 of 2 maps to table column 47 (the last), clamped neighbour
    expect(Array.from(v.posEmbedIdx.subarray(4, 8), Number)).toEqual([47, 47, 48 + 47, 48 + 47]);
    // patch 2 is (1, 0): row 1 of 4 -> 47/3 = 15.667: rows 15 and 16
    const w = Array.from(v.posEmbedWeight.subarray(8, 12));
    expect(Array.from(v.posEmbedIdx.subarray(8, 12), Number)).toEqual([
      15 * 48,
      15 * 48 + 1,
      16 * 48,
      16 * 48 + 1,
    ]);
    expect(w[0]).toBeCloseTo(1 / 3, 5);
    expect(w[2]).toBeCloseTo(2 / 3, 5);
    for (let p = 0; p < gh * gw; p++) {
      const s = v.posEmbedWeight.subarray(p * 4, p * 4 + 4).reduce((a, b) => a + b, 0);
      expect(s).toBeCloseTo(1, 6);
    }
  });

  it("builds rotary tables [row*f, col*f, row*f, col*f]", () => {
    const dv = 16;
    const f = visionInvFreq(dv);
    expect(f.length).toBe(4);
    expect(f[0]).toBe(1);
    expect(f[1]).toBeCloseTo(10000 ** -0.25, 6);
    const v = visionHostInputs(2, 4, 2304, dv);
    // patch 5 is (0, 3)
    const cos = v.rotaryCos.subarray(5 * dv, 6 * dv);
    const sin = v.rotarySin.subarray(5 * dv, 6 * dv);
    for (let k = 0; k < 4; k++) {
      expect(cos[k]).toBe(1); // row 0
      expect(cos[4 + k]).toBeCloseTo(Math.cos(3 * (f[k] as number)), 6);
      expect(sin[4 + k]).toBeCloseTo(Math.sin(3 * (f[k] as number)), 6);
      expect(cos[8 + k]).toBe(cos[k]);
      expect(sin[12 + k]).toBe(sin[4 + k]);
    }
  });

  it("rejects grids not divisible by the merge size and non-square tables", () => {
    expect(() => visionHostInputs(3, 4, 2304, 16)).toThrow(SegError);
    expect(() => visionHostInputs(4, 4, 2300, 16)).toThrow(/must be a square/);
    expect(() => visionHostInputs(4, 4, 2304, 18)).toThrow(/multiple of 4/);
  });
});

const PACK = "tiny-random";
const cases = fixtureCases(PACK);

describe.skipIf(cases.length === 0)(`vision host inputs parity with ${PACK} fixtures`, () => {
  it.each(cases)("%s: pos_embed_idx exact, weights and rotary tables within 1e-6", (name) => {
    const c = loadCase(PACK, name);
    const [, gh, gw] = c.json.meta.grid;
    const dv = c.tensor("rotary_cos").shape[1] as number;
    const v = visionHostInputs(gh, gw, 2304, dv);
    expect(Array.from(v.posEmbedIdx)).toEqual(Array.from(c.tensor("pos_embed_idx").data as BigInt64Array));
    const w = diffStats(v.posEmbedWeight, c.tensor("pos_embed_weight").data as Float32Array);
    const cos = diffStats(v.rotaryCos, c.tensor("rotary_cos").data as Float32Array);
    const sin = diffStats(v.rotarySin, c.tensor("rotary_sin").data as Float32Array);
    console.log(`${name}: weight ${w.maxAbs}, cos ${cos.maxAbs}, sin ${sin.maxAbs} max |diff|`);
    expect(w.maxAbs).toBe(0); // same float32 operations in the same order
    expect(cos.maxAbs).toBeLessThanOrEqual(1e-6);
    expect(sin.maxAbs).toBeLessThanOrEqual(1e-6);
  });
});
