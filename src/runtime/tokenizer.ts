/**
 * The Qwen2/Qwen3 byte-level BPE tokenizer over a pack's tokenizer.json, via @huggingface/tokenizers.
 *
 * Two ways to encode:
 * - `encode`: template text; added tokens such as `<|im_start|>` become their single ids.
 * - `encodePlain`: user text; added tokens are NOT recognised, so an expression containing
 *   "<|im_end|>" is spelled with ordinary BPE tokens and cannot inject a control token.
 * Neither adds a BOS (Qwen has none).
 */
import { readFile } from "node:fs/promises";
import { Tokenizer } from "@huggingface/tokenizers";
import { SegError } from "../errors.js";

export interface DecodeOptions {
  /** Drop special tokens (<|im_end|>, <|image_pad|>, ...) from the text. @default false */
  skipSpecial?: boolean;
}

export class QwenTokenizer {
  readonly #tok: Tokenizer;
  /** id -> vocab string (byte-level alphabet), added tokens included. */
  readonly #vocab: string[];
  /** Ids of every added token (special or not, e.g. <|im_end|> and <think>). */
  readonly #addedIds: ReadonlySet<number>;
  readonly #specialIds: ReadonlySet<number>;
  readonly #byteOf: Map<string, number>;
  readonly #utf8 = new TextDecoder("utf-8", { fatal: false });

  private constructor(tok: Tokenizer) {
    this.#tok = tok;
    const model = tok.model;
    if (model === null)
      throw new SegError("MODEL_LOAD_FAILED", "tokenizer.json has no model: re-copy or re-export the pack");
    this.#vocab = model.vocab;
    const added = tok.get_added_tokens_decoder();
    this.#addedIds = new Set(added.keys());
    this.#specialIds = new Set([...added].filter(([, t]) => t.special).map(([id]) => id));
    this.#byteOf = byteLevelDecodeTable();
  }

  /**
   * Loads tokenizer.json + tokenizer_config.json.
   * @throws SegError MODEL_LOAD_FAILED naming the file that is missing or malformed.
   */
  static async fromFiles(tokenizerJsonPath: string, tokenizerConfigPath: string): Promise<QwenTokenizer> {
    const json = await readJson(tokenizerJsonPath);
    const config = await readJson(tokenizerConfigPath);
    try {
      return new QwenTokenizer(new Tokenizer(json, config));
    } catch (cause) {
      throw new SegError(
        "MODEL_LOAD_FAILED",
        `tokenizer ${tokenizerJsonPath} could not be loaded (${cause instanceof Error ? cause.message : String(cause)}); re-copy or re-export the pack`,
        { cause, details: { file: tokenizerJsonPath } },
      );
    }
  }

  /** Token ids of template text; added tokens (<|im_start|>, <|image_pad|>, ...) are single ids. */
  encode(text: string): number[] {
    if (text.length === 0) return [];
    return this.#tok.encode(text, { add_special_tokens: false }).ids;
  }

  /**
   * Token ids of user text with no added-token matching: the same normaliser, pre-tokeniser and BPE
   * as `encode`, applied to the whole string. Equals `encode(text)` whenever the text contains no
   * added-token string.
   */
  encodePlain(text: string): number[] {
    if (text.length === 0) return [];
    const tok = this.#tok;
    const model = tok.model;
    if (model === null)
      throw new SegError("MODEL_LOAD_FAILED", "tokenizer.json has no model: re-copy or re-export the pack");
    const normalized = tok.normalizer === null ? text : tok.normalizer(text);
    const pieces = tok.pre_tokenizer === null ? [normalized] : tok.pre_tokenizer(normalized);
    const tokens: string[] = model(pieces);
    return tokens.map((t) => {
      const id = model.tokens_to_ids.get(t);
      if (id === undefined) {
        throw new SegError(
          "MODEL_LOAD_FAILED",
          `the pack's tokenizer produced a token outside its own vocabulary (${JSON.stringify(t)}): its tokenizer.json is inconsistent; re-export the pack`,
        );
      }
      return id;
    });
  }

  decode(ids: readonly number[], opts: DecodeOptions = {}): string {
    if (ids.length === 0) return "";
    return this.#tok.decode([...ids], {
      skip_special_tokens: opts.skipSpecial ?? false,
      clean_up_tokenization_spaces: false,
    });
  }

  tokenToId(token: string): number | undefined {
    return this.#tok.token_to_id(token);
  }

  idToToken(id: number): string | undefined {
    return this.#vocab[id];
  }

  /** Ids the tokenizer knows (BPE vocab + added tokens); the model's embedding table may be larger. */
  get vocabSize(): number {
    return this.#vocab.length;
  }

  isAdded(id: number): boolean {
    return this.#addedIds.has(id);
  }

  isSpecial(id: number): boolean {
    return this.#specialIds.has(id);
  }

  /**
   * The decoded text of one token on its own (what `decode([id])` returns), for the box grammar.
   * A token holding part of a multi-byte UTF-8 character decodes to U+FFFD. Added tokens (special
   * or not: <|im_end|>, <think>, ...) and unknown ids give '', so a grammar never takes a control
   * token for text.
   */
  tokenText(id: number): string {
    const token = this.#vocab[id];
    if (token === undefined || this.#addedIds.has(id)) return "";
    const bytes = new Uint8Array(token.length);
    let n = 0;
    for (const ch of token) {
      const b = this.#byteOf.get(ch);
      if (b === undefined) return this.decode([id]);
      bytes[n++] = b;
    }
    return this.#utf8.decode(bytes.subarray(0, n));
  }

  /** `tokenText` for ids 0..size-1 (size = the model's vocab, e.g. 151936; extra ids give ''). */
  grammarTokenTexts(size: number): string[] {
    return Array.from({ length: size }, (_, id) => this.tokenText(id));
  }
}

async function readJson(path: string): Promise<object> {
  let raw: string;
  try {
    raw = await readFile(path, "utf8");
  } catch (cause) {
    throw new SegError(
      "MODEL_LOAD_FAILED",
      `tokenizer file ${path} cannot be read; re-copy or re-export the pack`,
      {
        cause,
        details: { file: path },
      },
    );
  }
  try {
    const value: unknown = JSON.parse(raw);
    if (typeof value !== "object" || value === null) throw new Error("not a JSON object");
    return value;
  } catch (cause) {
    throw new SegError(
      "MODEL_LOAD_FAILED",
      `tokenizer file ${path} is not valid JSON; re-copy or re-export the pack`,
      { cause, details: { file: path } },
    );
  }
}

/**
 * Inverse of GPT-2's bytes_to_unicode: printable Latin-1 bytes map to themselves, the other 68 bytes
 * to U+0100.. in byte order. Vocab strings are spelled in that alphabet.
 */
function byteLevelDecodeTable(): Map<string, number> {
  const table = new Map<string, number>();
  let extra = 0;
  for (let b = 0; b < 256; b++) {
    const printable = (b >= 0x21 && b <= 0x7e) || (b >= 0xa1 && b <= 0xac) || (b >= 0xae && b <= 0xff);
    table.set(String.fromCharCode(printable ? b : 256 + extra++), b);
  }
  return table;
}
