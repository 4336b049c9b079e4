/**
 * Writing results: 1-bit mask PNGs, RGB PNGs, unguessable output names (overlay.ts draws). Every write is
 * atomic (a temporary file in the same directory, then rename), so a crash or a full disk never
 * leaves a half-written PNG under the final name.
 *
 * Masks are encoded here rather than by sharp: a PNG of bit depth 1, colour type 0 (grayscale,
 * 0 = black background, 1 = white object) is a few lines over node:zlib, lossless by construction
 * and fast for 4000x3000, while sharp's palette path goes through a quantiser.
 */

import { createHash, randomBytes } from "node:crypto";
import { existsSync, readFileSync, readlinkSync } from "node:fs";
import { rename, unlink, writeFile } from "node:fs/promises";
import { hostname } from "node:os";
import { basename, dirname, join } from "node:path";
import { deflateSync } from "node:zlib";
import sharp from "sharp";
import { SegError } from "../errors.js";

// ---------------------------------------------------------------------------------------------
// Atomic writes

function writeFailed(path: string, e: unknown): SegError {
  if (e instanceof SegError) return e;
  const reason = e instanceof Error ? e.message : String(e);
  return new SegError("OUTPUT_WRITE_FAILED", `could not write ${path}: ${reason}`, {
    cause: e,
    details: { path },
  });
}

let pidSpace: string | undefined;

/**
 * 8 hex naming the space this process's pid lives in: the kernel boot, the pid namespace and the
 * host name. Temporary files carry it, so a sweeper judges a writer's pid only when the pid means
 * the same process for it: replicas on other hosts or in other containers sharing --out have pids
 * that are not comparable (a pid that is not alive here may be a live writer there).
 */
export function processPidSpace(): string {
  const read = (f: () => string) => {
    try {
      return f().trim();
    } catch {
      return ""; // not Linux: the host name alone
    }
  };
  pidSpace ??= createHash("sha256")
    .update(
      [
        read(() => readFileSync("/proc/sys/kernel/random/boot_id", "utf8")),
        read(() => readlinkSync("/proc/self/ns/pid")),
        hostname(),
      ].join("\n"),
    )
    .digest("hex")
    .slice(0, 8);
  return pidSpace;
}

/**
 * Write `data` to `path` via a temporary file in the same directory and a rename. The temporary
 * name is `.<final name>.<pid space>-<pid>-<12 hex>.tmp` (retention.ts reads it back).
 */
export async function writeFileAtomic(path: string, data: Uint8Array): Promise<void> {
  const owner = `${processPidSpace()}-${process.pid}`;
  const tmp = join(dirname(path), `.${basename(path)}.${owner}-${randomBytes(6).toString("hex")}.tmp`);
  try {
    await writeFile(tmp, data, { flag: "wx", mode: 0o644 });
    await rename(tmp, path);
  } catch (e) {
    await unlink(tmp).catch(() => undefined);
    throw writeFailed(path, e);
  }
}

/**
 * A fresh path `<dir>/<stem>-<time>-<random>[-<index>].png` that does not exist yet. `stem` is a
 * fixed word chosen by the program ("mask", "overlay"), never caller text. 64 random bits keep
 * names unique between processes too (replicas sharing one --out).
 */
export function newOutputName(dir: string, stem: string, index?: number): string {
  if (!/^[a-z][a-z0-9-]{0,31}$/.test(stem)) {
    throw new SegError(
      "INVALID_INPUT",
      `output name stem must be a short lowercase word, got ${JSON.stringify(stem)}`,
    );
  }
  const suffix = index === undefined ? "" : `-${index}`;
  for (;;) {
    const name = `${stem}-${Date.now().toString(36)}-${randomBytes(8).toString("hex")}${suffix}.png`;
    const path = join(dir, name);
    if (!existsSync(path)) return path;
  }
}

// ---------------------------------------------------------------------------------------------
// 1-bit PNG

const CRC_TABLE = (() => {
  const t = new Uint32Array(256);
  for (let n = 0; n < 256; n++) {
    let c = n;
    for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
    t[n] = c >>> 0;
  }
  return t;
})();

function crc32(bytes: Uint8Array): number {
  let c = 0xffffffff;
  for (let i = 0; i < bytes.length; i++)
    c = (CRC_TABLE[(c ^ (bytes[i] as number)) & 0xff] as number) ^ (c >>> 8);
  return (c ^ 0xffffffff) >>> 0;
}

function chunk(type: string, data: Uint8Array): Uint8Array {
  const out = new Uint8Array(12 + data.length);
  const view = new DataView(out.buffer);
  view.setUint32(0, data.length);
  for (let i = 0; i < 4; i++) out[4 + i] = type.charCodeAt(i);
  out.set(data, 8);
  view.setUint32(8 + data.length, crc32(out.subarray(4, 8 + data.length)));
  return out;
}

/** PNG bytes of a row-major [height, width] 0/1 bitmap: bit depth 1, grayscale, 1 = white. */
export function encodeMaskPng(bitmap: Uint8Array, width: number, height: number): Uint8Array {
  if (!(Number.isInteger(width) && Number.isInteger(height) && width > 0 && height > 0)) {
    throw new SegError("INVALID_INPUT", `mask size must be positive integers, got ${width}x${height}`);
  }
  if (bitmap.length !== width * height) {
    throw new SegError("INVALID_INPUT", `mask holds ${bitmap.length} values, expected ${width}x${height}`);
  }
  const stride = Math.ceil(width / 8);
  const raw = new Uint8Array(height * (stride + 1)); // filter byte 0 (None) + packed bits, MSB first
  for (let y = 0; y < height; y++) {
    const o = y * (stride + 1) + 1;
    const row = y * width;
    for (let x = 0; x < width; x++) {
      if (bitmap[row + x] !== 0) raw[o + (x >> 3)] = (raw[o + (x >> 3)] as number) | (0x80 >> (x & 7));
    }
  }
  const ihdr = new Uint8Array(13);
  const hv = new DataView(ihdr.buffer);
  hv.setUint32(0, width);
  hv.setUint32(4, height);
  ihdr[8] = 1; // bit depth
  ihdr[9] = 0; // colour type: grayscale
  ihdr[10] = 0; // deflate
  ihdr[11] = 0; // adaptive filtering
  ihdr[12] = 0; // no interlace
  const parts = [
    new Uint8Array([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a]),
    chunk("IHDR", ihdr),
    chunk("IDAT", deflateSync(raw, { level: 6 })),
    chunk("IEND", new Uint8Array(0)),
  ];
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let o = 0;
  for (const p of parts) {
    out.set(p, o);
    o += p.length;
  }
  return out;
}

/** Write a mask as a 1-bit PNG the size of the original image, atomically. */
export async function writeMaskPng(
  bitmap: Uint8Array,
  width: number,
  height: number,
  path: string,
): Promise<void> {
  await writeFileAtomic(path, encodeMaskPng(bitmap, width, height));
}

/** An RGB image in memory: [height, width, 3] uint8. */
export interface RgbImage {
  rgb: Uint8Array;
  width: number;
  height: number;
}

export async function writeRgbPng(image: RgbImage, path: string): Promise<void> {
  let png: Buffer;
  try {
    png = await sharp(image.rgb, { raw: { width: image.width, height: image.height, channels: 3 } })
      .png()
      .toBuffer();
  } catch (e) {
    throw writeFailed(path, e);
  }
  await writeFileAtomic(path, png);
}

/** Inline previews stay under this (well below the 1 MiB a client accepts in one result). */
