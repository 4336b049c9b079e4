import { describe, expect, it } from "vitest";
import { argmax, tokenProbability } from "../src/runtime/language-model.js";

describe("generation helpers", () => {
  it("tokenProbability equals the full softmax", () => {
    const logits = new Float32Array(1000);
    for (let i = 0; i < logits.length; i++) logits[i] = Math.sin(i * 1.7) * 8;
    logits[123] = 12;
    let sum = 0;
    for (const v of logits) sum += Math.exp(v - 12);
    for (const t of [123, 5, 999]) {
      expect(tokenProbability(logits, t)).toBeCloseTo(Math.exp((logits[t] as number) - 12) / sum, 12);
    }
  });

  it("argmax takes the first maximum", () => {
    expect(argmax(new Float32Array([1, 3, 3, -1]))).toBe(1);
  });
});
