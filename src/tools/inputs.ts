/**
 * The one reader and checker of what a caller passes (tool arguments or CLI arguments): the image
 * (path safety, read once, format, byte and pixel limits, size after EXIF orientation), the mask (read
 * once, same size as the image, turned into its tight box), the box and the expression. The engine
 * receives the checked bytes and their size and trusts them.
 */

import path from "node:path";
import sharp, { type Metadata, type OutputInfo } from "sharp";
import type { Config } from "../config.js";
import { SegError } from "../errors.js";
import { OUTPUT_URI_PREFIX, parseImageRef, readAllowedFile, readOutputFile, truncate } from "../paths.js";
import { tightBox } from "../runtime/mask-post.js";
import type { Box, CheckedImage, ImageInfo } from "../runtime/types.js";

export const SUPPORTED_FORMATS = ["png", "jpeg", "webp", "gif", "tiff"] as const;
export type SupportedFormat = (typeof SUPPORTED_FORMATS)[number];

const FORMAT_LIST = "PNG, JPEG, WebP, GIF or TIFF";

export interface InputContext {
  config: Pick<Config, "cwd" | "maxDataUriBytes" | "maxImageBytes" | "maxInputPixels" | "outDir">;
  /** Allowed input directories for this request (config + MCP roots). */
  allowDirs: readonly string[];
}

export interface PreparedImage extends CheckedImage {
  format: SupportedFormat;
  /** For messages: the real path, or "data: URI". */
  label: string;
}

/** A decoder's own words, on one short line (libvips writes several). */
export function libraryMessage(cause: unknown): string {
  return truncate(
    String((cause as Error)?.message ?? cause)
      .replace(/\s+/g, " ")
      .trim(),
    160,
  );
}

/** Identify a file by its first bytes; never by its name. */
export function sniffFormat(head: Uint8Array): SupportedFormat | { other: string } {
  const at = (i: number) => head[i] ?? -1;
  const ascii = (from: number, to: number) => String.fromCharCode(...head.subarray(from, to));
  if (at(0) === 0x89 && ascii(1, 4) === "PNG") return "png";
  if (at(0) === 0xff && at(1) === 0xd8 && at(2) === 0xff) return "jpeg";
  if (ascii(0, 4) === "RIFF" && ascii(8, 12) === "WEBP") return "webp";
  if (ascii(0, 4) === "GIF8") return "gif";
  if (ascii(0, 4) === "II*\0" || ascii(0, 4) === "MM\0*") return "tiff";
  if (ascii(0, 2) === "BM") return { other: "BMP" };
  if (ascii(4, 8) === "ftyp") return { other: "HEIF/AVIF" };
  if (ascii(0, 5) === "%PDF-") return { other: "PDF" };
  const text = ascii(0, Math.min(head.length, 256)).trimStart().toLowerCase();
  if (text.startsWith("<svg") || (text.startsWith("<?xml") && text.includes("<svg"))) return { other: "SVG" };
  return { other: "unknown" };
}

/**
 * Check encoded image bytes: a supported format by its signature, a readable header, and at most
 * `maxInputPixels` pixels. Only the header is parsed; the engine decodes the pixels.
 */
export async function checkImage(
  bytes: Uint8Array,
  label: string,
  maxInputPixels: number,
  field = "image",
): Promise<PreparedImage> {
  const format = sniffFormat(bytes.subarray(0, 512));
  if (typeof format !== "string") {
    const what = format.other === "unknown" ? "not a recognised image" : `a ${format.other} file`;
    throw new SegError(
      "UNSUPPORTED_FORMAT",
      `${field} ${truncate(label)} is ${what}: pass a ${FORMAT_LIST} image (convert it first, e.g. to PNG)`,
      { details: { format: format.other } },
    );
  }
  let meta: Metadata;
  try {
    // Header only; no pixel limit here so that the check below can say how large the image is.
    meta = await sharp(bytes, { limitInputPixels: false, failOn: "error", pages: 1 }).metadata();
  } catch (cause) {
    throw new SegError(
      "IMAGE_DECODE_FAILED",
      `${field} ${truncate(label)} looks like ${format.toUpperCase()} but cannot be decoded (${libraryMessage(cause)}): the file is corrupt or truncated; re-export it`,
      { cause },
    );
  }
  const width = meta.autoOrient?.width ?? meta.width;
  const height = meta.autoOrient?.height ?? meta.height;
  if (!(width > 0 && height > 0)) {
    throw new SegError("IMAGE_DECODE_FAILED", `${field} ${truncate(label)} has no pixels: re-export it`);
  }
  if (width * height > maxInputPixels) {
    throw new SegError(
      "IMAGE_TOO_LARGE",
      `${field} ${truncate(label)} is ${width}x${height} = ${width * height} pixels, over the limit of ${maxInputPixels}: downscale it, or raise --max-input-pixels`,
      { details: { width, height, limit: maxInputPixels } },
    );
  }
  return { bytes, width, height, format, label };
}

/** Resolve, read once and check the `image` argument. */
export async function prepareImage(ref: string, ctx: InputContext, field = "image"): Promise<PreparedImage> {
  const { config } = ctx;
  const parsed = parseImageRef(ref, { cwd: config.cwd, maxDataUriBytes: config.maxDataUriBytes, field });
  if (parsed.kind === "data") return checkImage(parsed.bytes, "data: URI", config.maxInputPixels, field);
  const file = await readAllowedFile(parsed.path, ctx.allowDirs, { maxBytes: config.maxImageBytes, field });
  return checkImage(file.bytes, file.path, config.maxInputPixels, field);
}

/**
 * A local image file for programs that are their own caller (benchmarks, evaluations): read once and
 * checked like a tool argument, with the folder it lies in as the only allowed one.
 */
export async function imageFromFile(
  file: string,
  limits: { maxImageBytes: number; maxInputPixels: number } = {
    maxImageBytes: 50 * 1024 ** 2,
    maxInputPixels: 40_000_000,
  },
): Promise<PreparedImage> {
  const abs = path.resolve(file);
  const read = await readAllowedFile(abs, [path.dirname(abs)], { maxBytes: limits.maxImageBytes });
  return checkImage(read.bytes, read.path, limits.maxInputPixels);
}

/**
 * The region a `mask` argument selects, as its tight box: a PNG path inside the allowed directories
 * or the output directory (where `segment` writes), or a qwen3-vl-seg://masks/ URI. It must be an
 * image of exactly the image's size with at least one white pixel.
 */
export async function prepareMaskBox(ref: string, image: ImageInfo, ctx: InputContext): Promise<Box> {
  const { config } = ctx;
  let file: { path: string; bytes: Uint8Array };
  if (ref.startsWith(OUTPUT_URI_PREFIX)) {
    file = await readOutputFile(config.outDir, ref, config.maxImageBytes);
  } else {
    if (/^data:/i.test(ref)) {
      throw new SegError(
        "INVALID_INPUT",
        "mask must be a file path or a qwen3-vl-seg://masks/ URI returned by segment, not a data: URI",
      );
    }
    const parsed = parseImageRef(ref, { cwd: config.cwd, maxDataUriBytes: 0, field: "mask" });
    if (parsed.kind !== "path") {
      throw new SegError(
        "INVALID_INPUT",
        "mask must be a file path or a qwen3-vl-seg://masks/ URI returned by segment",
      );
    }
    file = await readAllowedFile(parsed.path, [...ctx.allowDirs, config.outDir], {
      maxBytes: config.maxImageBytes,
      field: "mask",
    });
  }
  const mask = await checkImage(file.bytes, file.path, config.maxInputPixels, "mask");
  if (mask.width !== image.width || mask.height !== image.height) {
    throw new SegError(
      "INVALID_INPUT",
      `mask ${truncate(file.path)} is ${mask.width}x${mask.height} but the image is ${image.width}x${image.height}: pass a mask written by segment for this same image`,
      { details: { mask: { width: mask.width, height: mask.height }, image } },
    );
  }
  const box = tightBox(await decodeMaskBitmap(mask), mask.width, mask.height);
  if (!box) {
    throw new SegError(
      "INVALID_INPUT",
      `mask ${truncate(file.path)} is empty: it selects no pixel to describe; pass a mask with white pixels, or a box`,
    );
  }
  return box;
}

/**
 * A mask image as a row-major 0/1 bitmap: luminance >= 128 is the object, transparent pixels are
 * background (ours are 1-bit PNGs; any PNG/JPEG/WebP mask works).
 */
export async function decodeMaskBitmap(mask: PreparedImage): Promise<Uint8Array> {
  let decoded: { data: Buffer; info: OutputInfo };
  try {
    decoded = await sharp(mask.bytes, { failOn: "error", pages: 1 })
      .rotate()
      .flatten({ background: { r: 0, g: 0, b: 0 } })
      .toColourspace("b-w")
      .raw({ depth: "uchar" })
      .toBuffer({ resolveWithObject: true });
  } catch (cause) {
    throw new SegError(
      "IMAGE_DECODE_FAILED",
      `mask ${truncate(mask.label)} cannot be decoded (${libraryMessage(cause)}): pass a PNG written by segment`,
      { cause },
    );
  }
  const { data, info } = decoded;
  const out = new Uint8Array(info.width * info.height);
  for (let i = 0; i < out.length; i++) out[i] = (data[i * info.channels] as number) >= 128 ? 1 : 0;
  return out;
}

/**
 * Check a caller's box against the image: finite, ordered, at least one pixel wide and high, inside
 * [0, width] x [0, height], and not a box in 0..1 coordinates (a common slip of models that think in
 * normalised coordinates; on an image larger than 2x2 no pixel box fits in [0, 1]).
 */
export function validateBox(box: readonly number[], image: ImageInfo, field = "box"): Box {
  if (box.length !== 4 || !box.every((v) => Number.isFinite(v))) {
    throw new SegError("INVALID_INPUT", `${field} must be four finite numbers [x1, y1, x2, y2] in pixels`);
  }
  const [x1, y1, x2, y2] = box as [number, number, number, number];
  if (box.every((v) => v >= 0 && v <= 1) && Math.max(image.width, image.height) > 2) {
    throw new SegError(
      "INVALID_INPUT",
      `${field} [${box.join(", ")}] looks normalised to 0..1: send pixels of the original ${image.width}x${image.height} image, e.g. [${Math.round(x1 * image.width)}, ${Math.round(y1 * image.height)}, ${Math.round(x2 * image.width)}, ${Math.round(y2 * image.height)}]`,
      { details: { box, image } },
    );
  }
  if (!(x1 < x2 && y1 < y2)) {
    throw new SegError(
      "INVALID_INPUT",
      `${field} [${box.join(", ")}] is empty or inverted: it must be [x1, y1, x2, y2] with x1 < x2 and y1 < y2 (top-left, then bottom-right corner)`,
    );
  }
  if (x2 - x1 < 1 || y2 - y1 < 1) {
    throw new SegError(
      "INVALID_INPUT",
      `${field} [${box.join(", ")}] is ${x2 - x1} x ${y2 - y1} pixels: a box must be at least one pixel wide and high`,
    );
  }
  if (x1 < 0 || y1 < 0 || x2 > image.width || y2 > image.height) {
    throw new SegError(
      "INVALID_INPUT",
      `${field} [${box.join(", ")}] lies outside the ${image.width}x${image.height} image: coordinates are pixels of the original image, 0 <= x <= ${image.width}, 0 <= y <= ${image.height}`,
      { details: { box, image } },
    );
  }
  return [x1, y1, x2, y2];
}

/** Trim and bound the referring expression. */
export function validateExpression(expression: string, maxChars: number): string {
  const text = expression.trim();
  if (text.length === 0) {
    throw new SegError(
      "INVALID_INPUT",
      'expression is empty: describe the object to find, e.g. "the dog on the left"',
    );
  }
  if (text.length > maxChars) {
    throw new SegError(
      "INVALID_INPUT",
      `expression has ${text.length} characters, over the limit of ${maxChars}: shorten it to a phrase or a sentence that identifies the object (it begins "${truncate(text, 60)}")`,
      { details: { length: text.length, limit: maxChars } },
    );
  }
  return text;
}
