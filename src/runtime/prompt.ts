/**
 * Chat prompts from the pack manifest's templates, and the box text used in prompts and answers.
 *
 * User text (the expression) never goes through added-token matching: the chat template is split at
 * `{question}`, the template parts are encoded with special tokens recognised and the question with
 * `encodePlain`, so "<|im_end|>" typed by a user stays ordinary text.
 */
import { SegError } from "../errors.js";
import type { Box } from "./types.js";

/** The manifest's `prompts` (docs/design.md). */
export interface PromptTemplates {
  /** Contains `{question}` and exactly one `<|image_pad|>`. */
  chat: string;
  /** Contains `{expression}`. */
  ground: string;
  /** Contains `{x1}`, `{y1}`, `{x2}`, `{y2}` (0..1000 ints). */
  describe: string;
}

/** The manifest's `tokens` fields this module needs. */
export interface PromptTokenIds {
  image_pad: number;
}

/** What prompt building needs from the tokenizer (QwenTokenizer satisfies it). */
export interface PromptTokenizer {
  encode(text: string): number[];
  encodePlain(text: string): number[];
}

/** A box in Qwen3-VL's 0..1000 relative integer coordinates, [x1, y1, x2, y2]. */
export type Box1000 = [x1: number, y1: number, x2: number, y2: number];

/**
 * Replaces `{name}` placeholders in one pass (so values are never re-scanned for placeholders);
 * braces that are not a known `{name}` (such as the JSON in the describe template) stay as they are.
 */
export function renderPrompt(template: string, values: Readonly<Record<string, string>>): string {
  return template.replace(/\{(\w+)\}/g, (whole, name: string) =>
    Object.hasOwn(values, name) ? (values[name] ?? whole) : whole,
  );
}

/** The grounding question for a referring expression. @throws SegError INVALID_INPUT when empty. */
export function groundQuestion(prompts: Pick<PromptTemplates, "ground">, expression: string): string {
  const expr = expression.trim();
  if (expr.length === 0) {
    throw new SegError(
      "INVALID_INPUT",
      "expression is empty; describe the object to find, e.g. 'the red mug'",
    );
  }
  return renderPrompt(prompts.ground, { expression: expr });
}

/** The region-description question for a box given in 0..1000 coordinates. */
export function describeQuestion(prompts: Pick<PromptTemplates, "describe">, box1000: Box1000): string {
  const [x1, y1, x2, y2] = box1000;
  return renderPrompt(prompts.describe, { x1: `${x1}`, y1: `${y1}`, x2: `${x2}`, y2: `${y2}` });
}

export interface ChatIds {
  /** The prompt's token ids with the image placeholder expanded, [S]. */
  ids: number[];
  /** Index in `ids` of the first of the `numImageTokens` image-pad ids. */
  imagePadStart: number;
}

/**
 * Tokenises the chat template around `question` and expands its single `<|image_pad|>` to
 * `numImageTokens` copies by id. Template parts are split at `{question}`; since the standard
 * template puts special tokens on both sides of it, the ids equal those of tokenising the whole
 * rendered text (for questions without added-token strings).
 * @throws SegError MODEL_LOAD_FAILED when the template lacks `{question}` or one `<|image_pad|>`.
 */
export function buildChatIds(
  tokenizer: PromptTokenizer,
  chatTemplate: string,
  question: string,
  numImageTokens: number,
  tokens: PromptTokenIds,
): ChatIds {
  if (!Number.isInteger(numImageTokens) || numImageTokens < 1) {
    throw new SegError("INVALID_INPUT", `numImageTokens must be a positive integer, got ${numImageTokens}`);
  }
  const parts = chatTemplate.split("{question}");
  if (parts.length !== 2) {
    throw new SegError(
      "MODEL_LOAD_FAILED",
      `the pack's chat prompt must contain {question} exactly once (found ${parts.length - 1}); fix pack.json`,
    );
  }
  const [before = "", after = ""] = parts;
  const templated = [
    ...tokenizer.encode(before),
    ...tokenizer.encodePlain(question),
    ...tokenizer.encode(after),
  ];
  // Only template parts can hold the pad: the question was encoded without added tokens.
  const padAt = templated.indexOf(tokens.image_pad);
  if (padAt < 0 || templated.indexOf(tokens.image_pad, padAt + 1) >= 0) {
    throw new SegError(
      "MODEL_LOAD_FAILED",
      `the pack's chat prompt must contain exactly one <|image_pad|> (id ${tokens.image_pad}); fix pack.json`,
    );
  }
  const ids = [
    ...templated.slice(0, padAt),
    ...new Array<number>(numImageTokens).fill(tokens.image_pad),
    ...templated.slice(padAt + 1),
  ];
  return { ids, imagePadStart: padAt };
}

/**
 * A pixel box of a `width` x `height` image in 0..1000 relative integers: x/W*1000 rounded, clamped
 * to 0..1000, corners ordered.
 */
export function boxTo1000(box: Readonly<Box>, width: number, height: number): Box1000 {
  if (!(width > 0 && height > 0)) {
    throw new SegError("INVALID_INPUT", `image size must be positive, got ${width}x${height}`);
  }
  const conv = (v: number, size: number): number =>
    Math.min(1000, Math.max(0, Math.round((v / size) * 1000)));
  const [x1, y1, x2, y2] = box;
  const a = conv(x1, width);
  const b = conv(x2, width);
  const c = conv(y1, height);
  const d = conv(y2, height);
  return [Math.min(a, b), Math.min(c, d), Math.max(a, b), Math.max(c, d)];
}

/**
 * `[{"bbox_2d": [x1, y1, x2, y2` - the answer prefix for box-prompted segmentation: exactly what the
 * box grammar (grammar.ts) emits up to and including the fourth coordinate, so the T_seg row is the
 * prefix's last token, as in grounding.
 */
export function boxPrefixText(box1000: Box1000): string {
  return `[{"bbox_2d": [${box1000.join(", ")}`;
}

export interface AnswerIds {
  /** Token ids of the answer as the box grammar (grammar.ts) emits it. */
  ids: number[];
  /** Index in `ids` of each box's last coordinate token: the T_seg rows. */
  lastCoordinate: number[];
}

/**
 * The canonical token sequence of a grounding answer `[{"bbox_2d": [..], "label": ".."}, ...]`,
 * exactly as greedy decoding under BoxGrammar produces it: fixed text is forced as its own
 * tokenisation, and at each choice point the single-character token is taken (`{`, `,`, `]`, `"`,
 * one digit), a label as its own tokenisation. Training data uses the same sequence
 * (modelkit/modelkit/answers.py), so a model meets at inference the tokens it learned.
 * With `close: false` it stops after the first box's fourth coordinate: the prefix fed for
 * box-prompted segmentation.
 */
export function groundingAnswerIds(
  tokenizer: Pick<PromptTokenizer, "encodePlain">,
  boxes1000: readonly Box1000[],
  labels: readonly string[],
  options: { close?: boolean } = {},
): AnswerIds {
  const close = options.close ?? true;
  const ids: number[] = [];
  const lastCoordinate: number[] = [];
  const forced = (text: string) => ids.push(...tokenizer.encodePlain(text));
  const choose = (ch: string) => {
    const t = tokenizer.encodePlain(ch);
    if (t.length !== 1) throw new SegError("MODEL_LOAD_FAILED", `${JSON.stringify(ch)} is not one token`);
    ids.push(t[0] as number);
  };
  forced("[");
  if (boxes1000.length === 0) {
    choose("]");
    return { ids, lastCoordinate };
  }
  for (const [i, box] of boxes1000.entries()) {
    if (i === 0) {
      choose("{");
      forced('"bbox_2d": [');
    } else {
      choose(",");
      forced(' {"bbox_2d": [');
    }
    box.forEach((v, k) => {
      if (!Number.isInteger(v) || v < 0 || v > 1000) {
        throw new SegError(
          "INVALID_INPUT",
          `box coordinates must be integers in 0..1000, got [${box.join(", ")}]`,
        );
      }
      for (const d of String(v)) choose(d);
      if (k < 3) {
        choose(",");
        forced(" ");
      }
    });
    lastCoordinate.push(ids.length - 1);
    if (!close) return { ids, lastCoordinate };
    choose("]");
    forced(', "label": "');
    const label = labels[i];
    if (label === undefined || label.length === 0) {
      throw new SegError("INVALID_INPUT", `box ${i} has no label: pass one label per box`);
    }
    ids.push(...tokenizer.encodePlain(label));
    choose('"');
    forced("}");
  }
  choose("]");
  return { ids, lastCoordinate };
}

/** Margin of describe_mode "crop", as a fraction of the image's shorter side (modelkit answers.py). */
export const CROP_MARGIN = 0.15;

/**
 * The region describe_mode "crop" shows the model: `box` grown by CROP_MARGIN of the image's shorter
 * side on every side (a margin tied to the image keeps the object's relative size visible), clamped,
 * as integer pixels [x1, y1, x2, y2).
 */
export function cropBox(box: Readonly<Box>, width: number, height: number): Box {
  const m = CROP_MARGIN * Math.min(width, height);
  const x1 = Math.max(0, Math.trunc(box[0] - m));
  const y1 = Math.max(0, Math.trunc(box[1] - m));
  const x2 = Math.min(width, Math.trunc(box[2] + m + 0.999999));
  const y2 = Math.min(height, Math.trunc(box[3] + m + 0.999999));
  return [x1, y1, Math.max(x2, x1 + 1), Math.max(y2, y1 + 1)];
}

/** A short label from a description: drop a leading article, keep up to 4 words before punctuation. */
export function shortLabel(description: string): string {
  const first = description.split(/[.,;:!?\n]/)[0] ?? "";
  const words = first
    .trim()
    .split(/\s+/)
    .filter((w) => w.length > 0);
  if (words.length > 1 && /^(a|an|the)$/i.test(words[0] as string)) words.shift();
  return words.slice(0, 4).join(" ").toLowerCase();
}
