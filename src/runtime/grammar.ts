/**
 * Token-level constraint that lets greedy decoding produce only well-formed box JSON:
 *
 *   [{"bbox_2d": [x1, y1, x2, y2], "label": "..."}, {...}]      or      []
 *
 * (no ``` fence; the answer starts with `[`). Coordinates are integers 0..1000 without leading
 * zeros; a label is 1..maxLabelChars printable characters other than `"` and `\`. After the closing
 * `]` only an eos token is allowed.
 *
 * Design: a character-level state machine; a token is allowed when all of its decoded characters
 * are accepted in sequence (tokens may span several parts, e.g. `"}]` or `],`). To stay fast over
 * the full vocabulary, a BoxVocabulary (built once per engine) indexes tokens by first character and
 * sorts pure label tokens by length, so a step walks only the few candidates that can start at the
 * current state; it caches the allowed lists of the non-label states by state for every request.
 * A BoxGrammar (one per answer) holds the state and records each box as it is written: its four
 * coordinates and where its label lies in the token stream, so no text is ever parsed back.
 *
 * Fixed text (`{"bbox_2d": [` after `{`, `, ` between numbers, `], "label": "` after the 4th number,
 * `}` after the label's closing quote) is offered by `forced()` as its tokenisation, so the caller
 * can feed it as one chunk instead of sampling token by token.
 *
 * T_seg: `advance()` reports `boxClosed` for the token that ends the 4th coordinate, i.e. whose
 * text carries the first character after it (`]`). In Qwen's vocabulary no token mixes digits and
 * other characters (the pre-tokeniser isolates digits), so that token never holds digits and the
 * last coordinate token is the one fed just before it: its final-norm state is the one that
 * predicted the closing token. `lastCoordinateInToken` says otherwise for vocabularies where a
 * token like `8]` exists.
 */
import { SegError } from "../errors.js";

export interface BoxVocabularyOptions {
  /** Longest label, in UTF-16 code units of the decoded token texts. @default 64 */
  maxLabelChars?: number;
  /**
   * Tokeniser for the fixed text `forced()` returns (use QwenTokenizer.encodePlain). Without it the
   * fixed text is split greedily into the longest matching tokens.
   */
  encode?: (text: string) => number[];
}

/** One box as the grammar saw it written. */
export interface BoxRecord {
  /** The four coordinates as written, integers in 0..1000 (not yet ordered). */
  coords: [number, number, number, number];
  /**
   * Where the label lies in the answer's tokens (indices of advance() calls): it starts `trim[0]`
   * characters into token `tokens[0]` and ends `trim[1]` characters before the end of token
   * `tokens[1]`. Decoding that token span (UTF-8 joined across tokens) and cutting those structural
   * ASCII characters gives the label exactly, even where one character is split over tokens.
   */
  labelTokens: [first: number, last: number];
  labelTrim: [before: number, after: number];
}

export interface AdvanceEvent {
  /** This token ended a box's fourth coordinate (its text starts the `], "label"` part). */
  boxClosed: boolean;
  /** This token holds digits of a box coordinate (the tokens a box's score is taken over). */
  coordinate: boolean;
  /** The 4th coordinate's last digit is inside this token (never for Qwen's vocabulary). */
  lastCoordinateInToken: boolean;
  /** This token chose to write another object (its `{`, or the `,` before it), not to end the list. */
  opensObject: boolean;
  /** This token writes label characters or the label's closing quote. */
  label: boolean;
  /** This token ended an object (its `}`): the box is recorded in `boxes`. */
  closesObject: boolean;
}

const NO_EVENT: AdvanceEvent = {
  boxClosed: false,
  coordinate: false,
  lastCoordinateInToken: false,
  opensObject: false,
  label: false,
  closesObject: false,
};

enum Phase {
  Literal = 0,
  ListOpen = 1,
  Number = 2,
  Label = 3,
  AfterObject = 4,
  End = 5,
  Done = 6,
}

enum Lit {
  Start = 0,
  Object = 1,
  Separator = 2,
  LabelKey = 3,
  Close = 4,
  Next = 5,
}

const LITERALS: readonly string[] = ["[", '{"bbox_2d": [', ", ", '], "label": "', '"}', ', {"bbox_2d": ['];

const QUOTE = 0x22;
const COMMA = 0x2c;
const CLOSE_BRACKET = 0x5d;
const OPEN_BRACE = 0x7b;
const DIGIT_0 = 0x30;

function isLabelChar(c: number): boolean {
  return c >= 0x20 && c !== QUOTE && c !== 0x5c && c !== 0x7f && !(c >= 0x80 && c <= 0x9f);
}

/** The machine's state; a plain record so a walk can copy it cheaply. */
export interface GrammarState {
  phase: Phase;
  lit: Lit;
  off: number;
  /** Coordinate index 0..3 (Number and the Separator literal). */
  k: number;
  /** Value and digit count of the current number. */
  value: number;
  digits: number;
  labelLen: number;
  boxes: number;
}

/**
 * The vocabulary's index for the box grammar, built once per engine (one pass over ~152k token
 * texts) and shared by every answer: first-character lists, label tokens by length, and the allowed
 * lists of states already seen (they depend on the state alone, never on one answer).
 */
export class BoxVocabulary {
  readonly texts: readonly string[];
  readonly eos: Int32Array;
  readonly eosSet: ReadonlySet<number>;
  readonly maxLabel: number;
  readonly #encode: ((text: string) => number[]) | undefined;

  /** First char code -> ids of tokens starting with it. */
  readonly #byFirst = new Map<number, Int32Array>();
  /** Ids of tokens made only of label characters, shortest first. */
  readonly #labelPure: Int32Array;
  /** #labelPureUpTo[n] = how many #labelPure tokens are at most n long (n <= maxLabel). */
  readonly #labelPureUpTo: Int32Array;
  /** Tokens whose first non-label character is `"` (they can end a label). */
  readonly #labelEnders: Int32Array;

  /** Allowed ids per state key, for every phase but Label. */
  readonly #allowed = new Map<string, Int32Array>();
  /** Allowed label-ending ids per label length (x2, + 1 when no further box may start). */
  readonly #enders = new Map<number, Int32Array>();
  readonly #forced = new Map<string, number[]>();
  #greedyIndex: Map<string, number> | undefined;
  readonly #scratch: GrammarState = initialState();

  constructor(tokenTexts: readonly string[], eosIds: readonly number[], options: BoxVocabularyOptions = {}) {
    this.texts = tokenTexts;
    this.eos = Int32Array.from(eosIds);
    this.eosSet = new Set(eosIds);
    this.maxLabel = options.maxLabelChars ?? 64;
    this.#encode = options.encode;
    if (!Number.isInteger(this.maxLabel) || this.maxLabel < 1) {
      throw new SegError("INVALID_INPUT", `maxLabelChars must be a positive integer, got ${this.maxLabel}`);
    }
    const byFirst = new Map<number, number[]>();
    const pure: number[] = [];
    const enders: number[] = [];
    for (let id = 0; id < tokenTexts.length; id++) {
      const t = tokenTexts[id] as string;
      if (t.length === 0 || this.eosSet.has(id)) continue;
      const c0 = t.charCodeAt(0);
      let list = byFirst.get(c0);
      if (list === undefined) {
        list = [];
        byFirst.set(c0, list);
      }
      list.push(id);
      let i = 0;
      while (i < t.length && isLabelChar(t.charCodeAt(i))) i++;
      if (i === t.length) pure.push(id);
      else if (t.charCodeAt(i) === QUOTE) enders.push(id);
    }
    for (const [c, ids] of byFirst) this.#byFirst.set(c, Int32Array.from(ids));
    pure.sort((a, b) => (tokenTexts[a] as string).length - (tokenTexts[b] as string).length || a - b);
    this.#labelPure = Int32Array.from(pure);
    this.#labelPureUpTo = new Int32Array(this.maxLabel + 1);
    let n = 0;
    for (let len = 0; len <= this.maxLabel; len++) {
      while (n < pure.length && (tokenTexts[pure[n] as number] as string).length <= len) n++;
      this.#labelPureUpTo[len] = n;
    }
    this.#labelEnders = Int32Array.from(enders);
  }

  get size(): number {
    return this.texts.length;
  }

  /** The allowed ids from state `s` as a few lists (overlapping nothing; never copied for labels). */
  allowedLists(s: GrammarState, maxBoxes: number): Int32Array[] {
    switch (s.phase) {
      case Phase.End:
        return [this.eos];
      case Phase.Done:
        return [];
      case Phase.Label: {
        const room = this.maxLabel - s.labelLen;
        const pure = this.#labelPure.subarray(0, this.#labelPureUpTo[room] ?? 0);
        // Enders such as `"}, {` walk into the next object, which maxBoxes may forbid.
        const key = s.labelLen * 2 + (s.boxes + 1 >= maxBoxes ? 1 : 0);
        let enders = this.#enders.get(key);
        if (enders === undefined) {
          enders = this.#walkAll(s, maxBoxes, [this.#labelEnders]);
          this.#enders.set(key, enders);
        }
        return [pure, enders];
      }
      default: {
        const key = stateKey(s, maxBoxes);
        let allowed = this.#allowed.get(key);
        if (allowed === undefined) {
          allowed = this.#walkAll(s, maxBoxes, this.#firstCharLists(s));
          this.#allowed.set(key, allowed);
        }
        return [allowed];
      }
    }
  }

  /** Whether `text` can be consumed from state `s` (`s` is not changed). */
  walks(s: GrammarState, text: string, maxBoxes: number): boolean {
    const w = this.#scratch;
    Object.assign(w, s);
    for (let i = 0; i < text.length; i++)
      if (!step(w, text.charCodeAt(i), maxBoxes, this.maxLabel)) return false;
    return true;
  }

  /** Token ids of fixed text (the tokeniser's split, or a greedy longest match without one). */
  tokensOf(text: string): readonly number[] {
    let ids = this.#forced.get(text);
    if (ids === undefined) {
      ids = this.#encode ? this.#encode(text) : this.#greedy(text);
      this.#forced.set(text, ids);
    }
    return ids;
  }

  /** Candidate lists by the characters the state accepts first (not Label/End/Done). */
  #firstCharLists(s: GrammarState): Int32Array[] {
    const chars: number[] = [];
    switch (s.phase) {
      case Phase.Literal:
        chars.push((LITERALS[s.lit] as string).charCodeAt(s.off));
        break;
      case Phase.ListOpen:
      case Phase.AfterObject:
        chars.push(CLOSE_BRACKET, s.phase === Phase.ListOpen ? OPEN_BRACE : COMMA);
        break;
      case Phase.Number:
        for (let d = 0; d < 10; d++) chars.push(DIGIT_0 + d);
        chars.push(s.k === 3 ? CLOSE_BRACKET : COMMA);
        break;
      default:
        break;
    }
    const lists: Int32Array[] = [];
    for (const c of chars) {
      const l = this.#byFirst.get(c);
      if (l !== undefined) lists.push(l);
    }
    return lists;
  }

  /** Candidates whose whole text the machine accepts from state `s`. */
  #walkAll(s: GrammarState, maxBoxes: number, lists: readonly Int32Array[]): Int32Array {
    const out: number[] = [];
    for (const list of lists) {
      for (let j = 0; j < list.length; j++) {
        const id = list[j] as number;
        if (this.walks(s, this.texts[id] as string, maxBoxes)) out.push(id);
      }
    }
    return Int32Array.from(out);
  }

  /** Longest-match split of fixed text, used when no tokeniser was given. */
  #greedy(text: string): number[] {
    if (this.#greedyIndex === undefined) {
      const index = new Map<string, number>();
      this.texts.forEach((t, id) => {
        if (t.length > 0 && t.length <= 16 && !this.eosSet.has(id) && !index.has(t)) index.set(t, id);
      });
      this.#greedyIndex = index;
    }
    const ids: number[] = [];
    let at = 0;
    while (at < text.length) {
      let found = -1;
      let len = Math.min(16, text.length - at);
      for (; len > 0; len--) {
        const id = this.#greedyIndex.get(text.slice(at, at + len));
        if (id !== undefined) {
          found = id;
          break;
        }
      }
      if (found < 0)
        throw new SegError("INFERENCE_FAILED", `no token spells ${JSON.stringify(text.slice(at))}`);
      ids.push(found);
      at += len;
    }
    return ids;
  }
}

/** The grammar of one answer: its state, and a record of every box written so far. */
export class BoxGrammar {
  readonly #vocab: BoxVocabulary;
  readonly #maxBoxes: number;
  #s: GrammarState = initialState();
  readonly #next: GrammarState = initialState();
  /** Index of the next token advance() takes. */
  #tokenIndex = 0;
  #coords: [number, number, number, number] = [0, 0, 0, 0];
  #labelStart: [token: number, char: number] = [0, 0];
  /** The token holding the label's closing quote, and how many characters it has from the quote on. */
  #labelEnd: [token: number, after: number] = [0, 0];
  readonly #boxes: BoxRecord[] = [];

  /** @param options.maxBoxes after this many objects only `]` is allowed. @default 50 */
  constructor(vocab: BoxVocabulary, options: { maxBoxes?: number } = {}) {
    this.#vocab = vocab;
    this.#maxBoxes = options.maxBoxes ?? 50;
    if (!Number.isInteger(this.#maxBoxes) || this.#maxBoxes < 0) {
      throw new SegError("INVALID_INPUT", `maxBoxes must be a non-negative integer, got ${this.#maxBoxes}`);
    }
  }

  /** Back to the start of an answer (the vocabulary's caches stay). */
  reset(): void {
    this.#s = initialState();
    this.#tokenIndex = 0;
    this.#boxes.length = 0;
  }

  /** After the closing `]` (only eos may follow) or after eos. */
  isDone(): boolean {
    return this.#s.phase === Phase.End || this.#s.phase === Phase.Done;
  }

  /** Boxes whose object was closed so far. */
  get boxCount(): number {
    return this.#s.boxes;
  }

  /** Every box whose object was closed, in the order written. */
  get boxes(): readonly BoxRecord[] {
    return this.#boxes;
  }

  /**
   * Tokens of the fixed text that must come next, empty at a choice point. Feeding all of them
   * (advance each) is always valid.
   */
  forced(): number[] {
    const s = this.#s;
    let text = "";
    if (s.phase === Phase.Literal) text = (LITERALS[s.lit] as string).slice(s.off);
    else if ((s.phase === Phase.ListOpen || s.phase === Phase.AfterObject) && s.boxes >= this.#maxBoxes)
      text = "]";
    return text === "" ? [] : [...this.#vocab.tokensOf(text)];
  }

  /** The highest-logit allowed token. */
  pick(logits: Float32Array): number {
    let best = -1;
    let bestValue = Number.NEGATIVE_INFINITY;
    for (const list of this.#vocab.allowedLists(this.#s, this.#maxBoxes)) {
      for (let i = 0; i < list.length; i++) {
        const id = list[i] as number;
        const v = logits[id] as number;
        if (v > bestValue || best < 0) {
          bestValue = v;
          best = id;
        }
      }
    }
    if (best < 0)
      throw new SegError("INFERENCE_FAILED", "the box grammar allows no token (the answer is complete)");
    return best;
  }

  /** 1 = allowed, over the whole vocabulary. */
  allowedMask(): Uint8Array {
    const mask = new Uint8Array(this.#vocab.size);
    for (const list of this.#vocab.allowedLists(this.#s, this.#maxBoxes))
      for (let i = 0; i < list.length; i++) mask[list[i] as number] = 1;
    return mask;
  }

  /** The allowed ids (unordered), for sampling and tests. */
  allowedIds(): Int32Array {
    const lists = this.#vocab.allowedLists(this.#s, this.#maxBoxes);
    const out = new Int32Array(lists.reduce((n, l) => n + l.length, 0));
    let at = 0;
    for (const l of lists) {
      out.set(l, at);
      at += l.length;
    }
    return out;
  }

  /** Whether `advance(tokenId)` would succeed now (walks the token's text; no state change). */
  accepts(tokenId: number): boolean {
    if (this.#vocab.eosSet.has(tokenId)) return this.#s.phase === Phase.End;
    const text = this.#vocab.texts[tokenId];
    return text !== undefined && text.length > 0 && this.#vocab.walks(this.#s, text, this.#maxBoxes);
  }

  /** Accepts a token. @throws SegError INFERENCE_FAILED when the token is not allowed. */
  advance(tokenId: number): AdvanceEvent {
    const s = this.#s;
    const index = this.#tokenIndex;
    if (this.#vocab.eosSet.has(tokenId)) {
      if (s.phase !== Phase.End) throw this.#rejected(tokenId);
      s.phase = Phase.Done;
      this.#tokenIndex++;
      return NO_EVENT;
    }
    const text = this.#vocab.texts[tokenId];
    if (text === undefined || text.length === 0) throw this.#rejected(tokenId);
    const next = this.#next;
    Object.assign(next, s);
    // What this token writes, committed only when all of its characters are accepted.
    const coords = [...this.#coords] as [number, number, number, number];
    let labelStart = this.#labelStart;
    let labelEnd = this.#labelEnd;
    let closedObject = false;
    let boxClosed = false;
    let digitBeforeClose = false;
    let coordinate = false;
    let opensObject = false;
    let label = false;
    for (let i = 0; i < text.length; i++) {
      const c = text.charCodeAt(i);
      const before = next.phase;
      const isDigit = c >= DIGIT_0 && c <= DIGIT_0 + 9;
      if (before === Phase.Label) label = true;
      if ((before === Phase.ListOpen || before === Phase.AfterObject) && c !== CLOSE_BRACKET)
        opensObject = true;
      if (before === Phase.Number) {
        if (isDigit) coordinate = true;
        else coords[next.k] = next.value; // the character that ends a number
      }
      const closes = before === Phase.Number && next.k === 3 && c === CLOSE_BRACKET;
      if (before === Phase.Label && c === QUOTE) labelEnd = [index, text.length - i];
      const boxesBefore = next.boxes;
      if (!step(next, c, this.#maxBoxes, this.#vocab.maxLabel)) throw this.#rejected(tokenId);
      if (closes) {
        boxClosed = true;
        digitBeforeClose = i > 0;
      }
      if (before !== Phase.Label && next.phase === Phase.Label) {
        labelStart = i + 1 < text.length ? [index, i + 1] : [index + 1, 0];
      }
      if (next.boxes > boxesBefore) closedObject = true;
    }
    Object.assign(s, next);
    this.#coords = coords;
    this.#labelStart = labelStart;
    this.#labelEnd = labelEnd;
    if (closedObject) {
      this.#boxes.push({
        coords,
        labelTokens: [labelStart[0], labelEnd[0]],
        labelTrim: [labelStart[1], labelEnd[1]],
      });
    }
    this.#tokenIndex++;
    return {
      boxClosed,
      coordinate,
      lastCoordinateInToken: digitBeforeClose,
      opensObject,
      label,
      closesObject: closedObject,
    };
  }

  #rejected(tokenId: number): SegError {
    return new SegError(
      "INFERENCE_FAILED",
      `token ${tokenId} (${JSON.stringify(this.#vocab.texts[tokenId] ?? "")}) is not allowed by the box grammar here`,
    );
  }
}

function initialState(): GrammarState {
  return { phase: Phase.Literal, lit: Lit.Start, off: 0, k: 0, value: 0, digits: 0, labelLen: 0, boxes: 0 };
}

/** Everything that decides which texts the machine accepts from a non-label state. */
function stateKey(s: GrammarState, maxBoxes: number): string {
  return `${s.phase},${s.lit},${s.off},${s.k},${s.value},${s.digits},${s.boxes >= maxBoxes ? 1 : 0}`;
}

/** Consumes one character; false when it is not allowed (the state is then garbage). */
function step(s: GrammarState, c: number, maxBoxes: number, maxLabel: number): boolean {
  switch (s.phase) {
    case Phase.Literal: {
      const lit = LITERALS[s.lit] as string;
      if (c !== lit.charCodeAt(s.off)) return false;
      s.off++;
      if (s.off === lit.length) endLiteral(s);
      return true;
    }
    case Phase.ListOpen:
    case Phase.AfterObject:
      if (c === CLOSE_BRACKET) {
        s.phase = Phase.End;
        return true;
      }
      if (s.boxes >= maxBoxes) return false;
      if (c === (s.phase === Phase.ListOpen ? OPEN_BRACE : COMMA)) {
        enterLiteral(s, s.phase === Phase.ListOpen ? Lit.Object : Lit.Next, 1);
        return true;
      }
      return false;
    case Phase.Number: {
      const d = c - DIGIT_0;
      if (d >= 0 && d <= 9) {
        if (s.digits > 0 && s.value === 0) return false; // no leading zeros
        const v = s.value * 10 + d;
        if (v > 1000) return false;
        s.value = v;
        s.digits++;
        return true;
      }
      if (s.digits === 0) return false;
      if (s.k < 3 && c === COMMA) {
        enterLiteral(s, Lit.Separator, 1);
        return true;
      }
      if (s.k === 3 && c === CLOSE_BRACKET) {
        enterLiteral(s, Lit.LabelKey, 1);
        return true;
      }
      return false;
    }
    case Phase.Label:
      if (c === QUOTE) {
        if (s.labelLen === 0) return false;
        enterLiteral(s, Lit.Close, 1);
        return true;
      }
      if (!isLabelChar(c) || s.labelLen >= maxLabel) return false;
      s.labelLen++;
      return true;
    default:
      return false;
  }
}

function enterLiteral(s: GrammarState, lit: Lit, off: number): void {
  s.phase = Phase.Literal;
  s.lit = lit;
  s.off = off;
}

/** Where each literal leads. */
function endLiteral(s: GrammarState): void {
  switch (s.lit) {
    case Lit.Start:
      s.phase = Phase.ListOpen;
      break;
    case Lit.Object:
    case Lit.Next:
      s.phase = Phase.Number;
      s.k = 0;
      s.value = 0;
      s.digits = 0;
      break;
    case Lit.Separator:
      s.phase = Phase.Number;
      s.k++;
      s.value = 0;
      s.digits = 0;
      break;
    case Lit.LabelKey:
      s.phase = Phase.Label;
      s.labelLen = 0;
      break;
    case Lit.Close:
      s.phase = Phase.AfterObject;
      s.boxes++;
      break;
  }
}
