/**
 * One error type for the whole product. Every failure a caller can cause or fix carries a code and a
 * message that says what is wrong and what to do instead. Tools map it to an `isError` result in
 * one place (tools/shared.ts); the CLI prints `CODE: message`.
 */

export const ERROR_CODES = [
  "INVALID_INPUT",
  "IMAGE_NOT_FOUND",
  "IMAGE_DECODE_FAILED",
  "IMAGE_TOO_LARGE",
  "UNSUPPORTED_FORMAT",
  "PATH_NOT_ALLOWED",
  "MODEL_NOT_FOUND",
  "MODEL_LOAD_FAILED",
  "INFERENCE_FAILED",
  "CANCELLED",
  "OUTPUT_WRITE_FAILED",
] as const;

export type ErrorCode = (typeof ERROR_CODES)[number];

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

  /** The one-line form the CLI prints and tools show: `CODE: message`. */
  toLine(): string {
    return `${this.code}: ${this.message}`;
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
