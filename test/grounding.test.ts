import { describe, expect, it } from "vitest";
import { parseBoxes } from "../src/runtime/grounding.js";

const W = 2000;
const H = 1000;

const boxes1000 = (text: string) => parseBoxes(text, W, H).instances.map((i) => i.box1000);
const labels = (text: string) => parseBoxes(text, W, H).instances.map((i) => i.label);

describe("parseBoxes", () => {
  it("parses the cookbook's fenced answer and converts to pixels", () => {
    const text =
      '```json\n[\n\t{"bbox_2d": [74, 361, 324, 808], "label": "plate/dish"},\n\t{"bbox_2d": [691, 235, 775, 328], "label": "scallop"}\n]\n```';
    const { instances, truncated } = parseBoxes(text, W, H);
    expect(truncated).toBe(false);
    expect(instances).toEqual([
      { label: "plate/dish", box: [148, 361, 648, 808], box1000: [74, 361, 324, 808], index: 0 },
      { label: "scallop", box: [1382, 235, 1550, 328], box1000: [691, 235, 775, 328], index: 1 },
    ]);
  });

  it("parses a bare array, a single object and text around them", () => {
    expect(boxes1000('[{"bbox_2d": [1, 2, 3, 4], "label": "a"}]')).toEqual([[1, 2, 3, 4]]);
    expect(boxes1000('{"bbox_2d": [1, 2, 3, 4], "label": "a"}')).toEqual([[1, 2, 3, 4]]);
    expect(
      boxes1000('Here\'s what I found: [{"bbox_2d": [1, 2, 3, 4], "label": "a"}] hope it helps [x'),
    ).toEqual([[1, 2, 3, 4]]);
    expect(boxes1000('```json\n{"bbox_2d": [1, 2, 3, 4]}\n```\nThe cat is on the left.')).toEqual([
      [1, 2, 3, 4],
    ]);
  });

  it("keeps the complete objects of a truncated answer", () => {
    const text =
      '[{"bbox_2d": [10, 20, 30, 40], "label": "a"}, {"bbox_2d": [50, 60, 70, 80], "label": "b"}, {"bbox_2d": [5';
    const r = parseBoxes(text, W, H);
    expect(r.truncated).toBe(true);
    expect(r.instances.map((i) => i.label)).toEqual(["a", "b"]);
    // Cut inside a label string, and after the last complete object with the array left open.
    expect(
      parseBoxes('[{"bbox_2d": [10, 20, 30, 40], "label": "a"}, {"bbox_2d": [1, 2, 3, 4], "label": "b', W, H),
    ).toMatchObject({ truncated: true, instances: [{ label: "a" }] });
    expect(parseBoxes('[{"bbox_2d": [10, 20, 30, 40], "label": "a"}, ', W, H)).toMatchObject({
      truncated: true,
      instances: [{ label: "a" }],
    });
    expect(parseBoxes('```json\n[{"bbox_2d": [10, 20, 30, 40], "label": "a"}', W, H).truncated).toBe(true);
  });

  it("accepts Python-style literals and the 'bbox' key", () => {
    expect(
      labels(
        "[{'bbox_2d': [1, 2, 3, 4], 'label': \"man's hat\", 'ok': True}, {'bbox': [5, 6, 7, 8], 'label': 'b',}]",
      ),
    ).toEqual(["man's hat", "b"]);
    expect(labels("[{'bbox_2d': [1, 2, 3, 4], 'label': 'it\\'s'}]")).toEqual(["it's"]);
  });

  it("keeps labels containing brackets and braces", () => {
    expect(
      labels('[{"bbox_2d": [1, 2, 3, 4], "label": "a } ] { [ b"}, {"bbox_2d": [5, 6, 7, 8], "label": "c"}]'),
    ).toEqual(["a } ] { [ b", "c"]);
  });

  it("orders reversed corners, clamps, drops degenerate boxes and duplicates", () => {
    const text = JSON.stringify([
      { bbox_2d: [300, 400, 100, 200], label: "reversed" },
      { bbox_2d: [-50, 900, 1200, 1100], label: "clamped" },
      { bbox_2d: [100, 100, 100, 500], label: "zero width" },
      { bbox_2d: [1000, 10, 1200, 20], label: "zero after clamp" },
      { bbox_2d: [100, 200, 300, 400], label: "duplicate" },
      { bbox_2d: [1, 2, 3], label: "three numbers" },
      { bbox_2d: [1, 2, "x", 4], label: "not numbers" },
      { bbox_2d: ["1", "2", "3", "4"], label: "numeric strings" },
    ]);
    const { instances } = parseBoxes(text, W, H);
    expect(instances.map((i) => [i.label, i.box1000, i.index])).toEqual([
      ["reversed", [100, 200, 300, 400], 0],
      ["clamped", [0, 900, 1000, 1000], 1],
      // index counts every object with a 4-number box, kept or not (not the two malformed ones).
      ["numeric strings", [1, 2, 3, 4], 5],
    ]);
    expect(instances[1]?.box).toEqual([0, 900, 2000, 1000]);
  });

  it("returns nothing for garbage and empty answers, without throwing", () => {
    for (const text of [
      "",
      "[]",
      "```json\n[]\n```",
      "I cannot find it.",
      "{{{[[[",
      '[{"label": "no box"}]',
      "}{",
      "'",
    ]) {
      const r = parseBoxes(text, W, H);
      expect(r.instances).toEqual([]);
    }
    expect(parseBoxes("[]", W, H).truncated).toBe(false);
  });

  it("falls back to a pattern for malformed JSON", () => {
    const text = '[{bbox_2d: [10, 20, 30, 40], "label": "a"}, {"bbox_2d": [50, 60, 70, 80] "label": "b"}]';
    expect(labels(text)).toEqual(["a", "b"]);
    expect(boxes1000(text)).toEqual([
      [10, 20, 30, 40],
      [50, 60, 70, 80],
    ]);
  });

  it("handles labels with unicode and escapes", () => {
    expect(labels('[{"bbox_2d": [1, 2, 3, 4], "label": "caf\\u00e9 \\"x\\" 日本"}]')).toEqual([
      'café "x" 日本',
    ]);
  });
});
