import { describe, expect, it } from "vitest";
import { SegError } from "../src/errors.js";
import { decodePositions, ropeIndex } from "../src/runtime/rope.js";
import { fixtureCases, loadCase } from "./helpers/fixtures.js";

const PAD = 151655;
const VS = 151652;
const VE = 151653;

function rows(positions: BigInt64Array, s: number): number[][] {
  return [0, 1, 2].map((a) => Array.from(positions.subarray(a * s, (a + 1) * s), Number));
}

describe("ropeIndex", () => {
  it("reproduces a worked example of get_rope_index (grid [1, 4, 6], 18 tokens)", () => {
    // <im_start> user \n <vs> pad x6 <ve> q1 q2 <im_end> \n <im_start> assistant \n
    const ids = [
      151644,
      872,
      198,
      VS,
      PAD,
      PAD,
      PAD,
      PAD,
      PAD,
      PAD,
      VE,
      1,
      2,
      151645,
      198,
      151644,
      77091,
      198,
    ];
    const { positions, ropeDelta } = ropeIndex(ids, [[1, 4, 6]], PAD, VS);
    expect(rows(positions, 18)).toEqual([
      [0, 1, 2, 3, 4, 4, 4, 4, 4, 4, 7, 8, 9, 10, 11, 12, 13, 14],
      [0, 1, 2, 3, 4, 4, 4, 5, 5, 5, 7, 8, 9, 10, 11, 12, 13, 14],
      [0, 1, 2, 3, 4, 5, 6, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14],
    ]);
    expect(ropeDelta).toBe(-3);
    // first generated token (cache index 18) -> 15 on all axes
    expect(Array.from(decodePositions(18, 1, ropeDelta), Number)).toEqual([15, 15, 15]);
  });

  it("accepts BigInt64Array ids and handles text only", () => {
    const { positions, ropeDelta } = ropeIndex(new BigInt64Array([5n, 6n, 7n]), [], PAD, VS);
    expect(rows(positions, 3)).toEqual([
      [0, 1, 2],
      [0, 1, 2],
      [0, 1, 2],
    ]);
    expect(ropeDelta).toBe(0);
  });

  it("decodePositions lays out [3, count] rows", () => {
    expect(Array.from(decodePositions(10, 3, -4), Number)).toEqual([6, 7, 8, 6, 7, 8, 6, 7, 8]);
  });

  it("rejects malformed image blocks with INVALID_INPUT", () => {
    const bad = (ids: number[], grids: [number, number, number][]) => {
      let err: unknown;
      try {
        ropeIndex(ids, grids, PAD, VS);
      } catch (e) {
        err = e;
      }
      expect(err).toBeInstanceOf(SegError);
      expect((err as SegError).code).toBe("INVALID_INPUT");
      return (err as SegError).message;
    };
    expect(bad([1, PAD, PAD, PAD, PAD], [[1, 4, 4]])).toMatch(/does not follow <\|vision_start\|>/);
    expect(bad([VS, PAD, PAD, PAD], [[1, 4, 4]])).toMatch(/must hold 4 image pads/);
    expect(bad([VS, PAD], [])).toMatch(/more image blocks/);
    expect(bad([1, 2], [[1, 4, 4]])).toMatch(/1 image grids were given but the prompt has 0/);
    expect(bad([VS, PAD], [[1, 3, 4]])).toMatch(/not divisible/);
  });
});

const PACK = "tiny-random";
const cases = fixtureCases(PACK);

describe.skipIf(cases.length === 0)(`rope parity with ${PACK} fixtures`, () => {
  it.each(cases)("%s: position_ids and rope_delta exact", (name) => {
    const c = loadCase(PACK, name);
    const ids = c.tensor("input_ids").data as BigInt64Array; // [1, S]
    const grid = Array.from(c.tensor("image_grid_thw").data as BigInt64Array, Number) as [
      number,
      number,
      number,
    ];
    const { positions, ropeDelta } = ropeIndex(ids, [grid], PAD, VS);
    const ref = c.tensor("position_ids");
    // recorded as [3, S] (or [3, 1, S]); same row-major data either way
    expect(ref.shape.reduce((a, b) => a * b, 1)).toBe(3 * ids.length);
    expect(ref.shape[0]).toBe(3);
    expect(Array.from(positions)).toEqual(Array.from(ref.data as BigInt64Array));
    expect(ropeDelta).toBe(c.json.meta.rope_delta);
  });
});
