/**
 * One error type for the whole product. Every failure a caller can cause or fix carries a code and a
 * message that says what is wrong and what to do instead. Tools map it to an `isError` result in
 * one place (tools/shared.ts); the CLI prints `CODE: message`.
 */

/** Every code, and whether the caller caused it (the CLI exits 2 for those, 1 for the rest). */
const CODES = {
  INVALID_INPUT: { input: true },
  IMAGE_NOT_FOUND: { input: true },
  IMAGE_DECODE_FAILED: { input: true },
  IMAGE_TOO_LARGE: { input: true },
  UNSUPPORTED_FORMAT: { input: true },
  PATH_NOT_ALLOWED: { input: true },
  REQUEST_TOO_LARGE: { input: true },
  ADDRESS_IN_USE: { input: true },
  LISTEN_FAILED: { input: true },
  MASK_DECODER_MISSING: { input: true },
  MODEL_NOT_FOUND: { input: false },
  MODEL_LOAD_FAILED: { input: false },
  INFERENCE_FAILED: { input: false },
  BUSY: { input: false },
  CANCELLED: { input: false },
  OUTPUT_WRITE_FAILED: { input: false },
} as const satisfies Record<string, { input: boolean }>;

export type ErrorCode = keyof typeof CODES;

export const ERROR_CODES = Object.keys(CODES) as ErrorCode[];

/** Errors the caller can fix by changing its input or its command line. */
export function isInputError(code: ErrorCode): boolean {
  return CODES[code].input;
}

/** What crosses a thread boundary (structured-cloneable). */
export interface SerializedError {
  code: ErrorCode;
  message: string;
  details?: Record<string, unknown>;
}

export class SegError extends Error {
  override readonly name = "SegError";
  readonly code: ErrorCode;
  /** Extra machine-readable context (file names, limits); never secrets. */
  readonly details: Readonly<Record<string, unknown>> | undefined;

  constructor(
    code: ErrorCode,
    message: string,
    options?: { cause?: unknown; details?: Record<string, unknown> },
  ) {
    super(message, options?.cause === undefined ? undefined : { cause: options.cause });
    this.code = code;
    this.details = options?.details;
  }

  /** The one-line form the CLI prints and tools show: `CODE: message` (line breaks folded). */
  toLine(): string {
    return `${this.code}: ${this.message.replace(/\s*\n\s*/g, " ")}`;
  }

  serialize(): SerializedError {
    return {
      code: this.code,
      message: this.message,
      ...(this.details === undefined ? {} : { details: { ...this.details } }),
    };
  }

  static deserialize(e: SerializedError): SegError {
    const code = e.code in CODES ? e.code : "INFERENCE_FAILED";
    return new SegError(code, e.message, e.details === undefined ? undefined : { details: e.details });
  }
}

export function isSegError(value: unknown): value is SegError {
  return value instanceof SegError;
}

/** Wrap anything thrown into a SegError, keeping SegErrors as they are. */
export function toSegError(value: unknown, fallback: ErrorCode = "INFERENCE_FAILED"): SegError {
  if (value instanceof SegError) return value;
  if (value instanceof Error && value.name === "AbortError") {
    return new SegError("CANCELLED", "the request was cancelled", { cause: value });
  }
  const message = value instanceof Error ? value.message : String(value);
  return new SegError(fallback, message, { cause: value });
}

/** The error of a request whose AbortSignal fired. */
export function cancelled(when = ""): SegError {
  return new SegError("CANCELLED", `the request was cancelled${when ? ` ${when}` : ""}`);
}

export function throwIfAborted(signal: AbortSignal | undefined, when = ""): void {
  if (signal?.aborted) throw cancelled(when);
}
