/**
 * Turning what a caller passed (tool arguments or CLI arguments) into validated engine inputs:
 * the image (path safety, size, format, pixel limit, dimensions), the mask, the box, the expression.
 * Only image headers are read here; the engine decodes the pixels.
 */

import { open } from "node:fs/promises";
import sharp, { type Metadata } from "sharp";
import type { Config } from "../config.js";
import { SegError } from "../errors.js";
import { OUTPUT_URI_PREFIX, parseImageRef, resolveAllowedFile, resolveOutputFile } from "../paths.js";
import { readImageFile, type SUPPORTED_FORMATS } from "../runtime/preprocess.js";
import type { Box, ImageInfo, ImageSource } from "../runtime/types.js";

type SupportedFormat = (typeof SUPPORTED_FORMATS)[number];

const FORMAT_LIST = "PNG, JPEG, WebP, GIF or TIFF";

export interface InputContext {
  config: Config;
  /** Allowed input directories for this request (config + MCP roots). */
  allowDirs: readonly string[];
}

export interface PreparedImage {
  source: ImageSource;
  /** Size after EXIF orientation: the coordinate system of every box. */
  size: ImageInfo;
  format: SupportedFormat;
  /** For messages: the real path, or "data: URI". */
  label: string;
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

async function readHead(file: string, n = 512): Promise<Uint8Array> {
  const handle = await open(file, "r");
  try {
    const buf = new Uint8Array(n);
    const { bytesRead } = await handle.read(buf, 0, n, 0);
    return buf.subarray(0, bytesRead);
  } finally {
    await handle.close();
  }
}

/** Resolve, check and measure the `image` argument. */
export async function prepareImage(ref: string, ctx: InputContext, field = "image"): Promise<PreparedImage> {
  const parsed = parseImageRef(ref, {
    cwd: ctx.config.cwd,
    maxDataUriBytes: ctx.config.maxDataUriBytes,
    field,
  });
  let source: ImageSource;
  let label: string;
  let head: Uint8Array;
  if (parsed.kind === "path") {
    const file = await resolveAllowedFile(parsed.path, ctx.allowDirs, {
      maxBytes: ctx.config.maxImageBytes,
      field,
    });
    // The checked real path is read once, here, through one handle (no symlink followed): the engine
    // gets bytes, so nothing swapped in after the check is ever read.
    const bytes = await readImageFile(file.path, ctx.config.maxImageBytes, { noFollow: true });
    source = { bytes };
    label = file.path;
    head = bytes.subarray(0, 512);
  } else {
    source = { bytes: parsed.bytes };
    label = "data: URI";
    head = parsed.bytes.subarray(0, 512);
  }
  const { format, size } = await measureImage(source, head, label, ctx.config.maxPixels, field);
  return { source, size, format, label };
}

async function measureImage(
  source: ImageSource,
  head: Uint8Array,
  label: string,
  maxPixels: number,
  field: string,
): Promise<{ format: SupportedFormat; size: ImageInfo }> {
  const format = sniffFormat(head);
  if (typeof format !== "string") {
    const what = format.other === "unknown" ? "not a recognised image" : `a ${format.other} file`;
    throw new SegError(
      "UNSUPPORTED_FORMAT",
      `${field} ${label} is ${what}: pass a ${FORMAT_LIST} image (convert it first, e.g. to PNG)`,
      { details: { format: format.other } },
    );
  }
  let meta: Metadata;
  try {
    // Header only; no pixel limit here so that the limit below can say how large the image is.
    meta = await sharp("path" in source ? source.path : source.bytes, { limitInputPixels: false }).metadata();
  } catch (cause) {
    throw new SegError(
      "IMAGE_DECODE_FAILED",
      `${field} ${label} looks like ${format.toUpperCase()} but cannot be decoded (${(cause as Error).message}): the file is corrupt or truncated; re-export it`,
      { cause },
    );
  }
  const width = meta.autoOrient?.width ?? meta.width;
  const height = meta.autoOrient?.height ?? meta.height;
  if (!(width > 0 && height > 0)) {
    throw new SegError("IMAGE_DECODE_FAILED", `${field} ${label} has no pixels: re-export it`);
  }
  if (width * height > maxPixels) {
    throw new SegError(
      "IMAGE_TOO_LARGE",
      `${field} ${label} is ${width}x${height} = ${width * height} pixels, over the limit of ${maxPixels}: downscale it, or raise --max-pixels`,
      { details: { width, height, limit: maxPixels } },
    );
  }
  return { format, size: { width, height } };
}

/**
 * Resolve the `mask` argument: a path inside the allowed directories or the output directory (where
 * `segment` writes), or a qwen3-vl-seg://masks/ URI. It must be an image of exactly the image's size.
 */
export async function prepareMask(ref: string, image: ImageInfo, ctx: InputContext): Promise<string> {
  let file: string;
  if (ref.startsWith(OUTPUT_URI_PREFIX)) {
    file = await resolveOutputFile(ctx.config.outDir, ref);
  } else {
    if (/^data:/i.test(ref)) {
      throw new SegError(
        "INVALID_INPUT",
        "mask must be a file path or a qwen3-vl-seg://masks/ URI returned by segment, not a data: URI",
      );
    }
    const parsed = parseImageRef(ref, { cwd: ctx.config.cwd, maxDataUriBytes: 0, field: "mask" });
    if (parsed.kind !== "path") {
      throw new SegError(
        "INVALID_INPUT",
        "mask must be a file path or a qwen3-vl-seg://masks/ URI returned by segment",
      );
    }
    const dirs = [...ctx.allowDirs, ctx.config.outDir];
    file = (
      await resolveAllowedFile(parsed.path, dirs, { maxBytes: ctx.config.maxImageBytes, field: "mask" })
    ).path;
  }
  const { size } = await measureImage(
    { path: file },
    await readHead(file),
    file,
    ctx.config.maxPixels,
    "mask",
  );
  if (size.width !== image.width || size.height !== image.height) {
    throw new SegError(
      "INVALID_INPUT",
      `mask ${file} is ${size.width}x${size.height} but the image is ${image.width}x${image.height}: pass a mask written by segment for this same image`,
      { details: { mask: size, image } },
    );
  }
  return file;
}

/** Check a caller's box against the image: finite, ordered, inside [0, width] x [0, height]. */
export function validateBox(box: readonly number[], image: ImageInfo, field = "box"): Box {
  if (box.length !== 4 || !box.every((v) => Number.isFinite(v))) {
    throw new SegError("INVALID_INPUT", `${field} must be four finite numbers [x1, y1, x2, y2] in pixels`);
  }
  const [x1, y1, x2, y2] = box as [number, number, number, number];
  if (!(x1 < x2 && y1 < y2)) {
    throw new SegError(
      "INVALID_INPUT",
      `${field} [${box.join(", ")}] is empty or inverted: it must be [x1, y1, x2, y2] with x1 < x2 and y1 < y2 (top-left, then bottom-right corner)`,
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
      `expression has ${text.length} characters, over the limit of ${maxChars}: shorten it to a phrase or a sentence that identifies the object`,
      { details: { length: text.length, limit: maxChars } },
    );
  }
  return text;
}
