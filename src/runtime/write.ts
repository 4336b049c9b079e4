/**
 * Writing a segment result into the output directory: one 1-bit mask PNG per instance, and on request
 * an overlay PNG (full resolution, numbered like `instances`) and a JPEG preview of it (made from the
 * pixels in memory, never read back from disk).
 * Nothing is written after a cancellation, and a call that fails half way removes what it wrote.
 */

import { unlink } from "node:fs/promises";
import { throwIfAborted } from "../errors.js";
import type { BoxEvidence } from "./language-model.js";
import type { MaskResult } from "./mask-post.js";
import { rleEncode } from "./mask-post.js";
import { newOutputName, type RgbImage, writeMaskPng, writeRgbPng } from "./output.js";
import { jpegPreview, renderOverlay } from "./overlay.js";
import type { Timer } from "./timer.js";
import type { Box, ImageInfo, SegmentInstance } from "./types.js";

/** The overlay PNG's longer side at most (masks stay at the image's full size). */
export const OVERLAY_MAX_SIDE = 2048;

export interface WriteOptions {
  outputDir: string;
  size: ImageInfo;
  /** The image's pixels, for the overlay (decoded only if an overlay or preview is asked). */
  pixels: () => Promise<RgbImage>;
  rle?: boolean;
  overlay?: boolean;
  previewMaxSide?: number;
  signal?: AbortSignal;
  timer: Timer;
}

export interface Written {
  instances: SegmentInstance[];
  overlayPath?: string;
  preview?: Uint8Array;
}

export async function writeMasks(
  masks: readonly {
    query: { label: string; box: Box; groundingScore?: number; evidence?: BoxEvidence };
    mask: MaskResult;
    maskScore: number;
    score: number;
  }[],
  opts: WriteOptions,
): Promise<Written> {
  const { width, height } = opts.size;
  const files: string[] = [];
  const instances: SegmentInstance[] = [];
  try {
    for (const [i, { query, mask, maskScore, score }] of masks.entries()) {
      throwIfAborted(opts.signal, "before its masks were written");
      const file = newOutputName(opts.outputDir, "mask", i);
      await writeMaskPng(mask.bitmap, width, height, file);
      files.push(file);
      instances.push({
        label: query.label,
        box: query.box,
        ...(query.groundingScore === undefined ? {} : { groundingScore: query.groundingScore }),
        maskScore,
        score,
        ...(query.evidence ? { evidence: query.evidence } : {}),
        maskBox: mask.box ?? query.box,
        mask: {
          path: file,
          areaPx: mask.areaPx,
          areaFraction: mask.areaPx / (width * height),
          ...(opts.rle ? { rle: rleEncode(mask.bitmap, height, width) } : {}),
        },
      });
    }
    const out: Written = { instances };
    if (masks.length > 0 && (opts.overlay || opts.previewMaxSide !== undefined)) {
      const pixels = await opts.pixels();
      const bitmaps = masks.map((m) => m.mask.bitmap);
      // Each is drawn at its own size (the file at most OVERLAY_MAX_SIDE, the preview at
      // previewMaxSide) so both get legible numbers and outlines, never a blurred copy. The file is
      // for looking at: a 4000x3000 photo's full-size overlay would be ~30 MB of PNG per call.
      if (opts.overlay) {
        const overlay = await renderOverlay(pixels, bitmaps, OVERLAY_MAX_SIDE);
        throwIfAborted(opts.signal, "before its overlay was written");
        const file = newOutputName(opts.outputDir, "overlay");
        await writeRgbPng(overlay, file);
        files.push(file);
        out.overlayPath = file;
      }
      if (opts.previewMaxSide !== undefined) {
        throwIfAborted(opts.signal, "before its preview was made");
        const small = await renderOverlay(pixels, bitmaps, opts.previewMaxSide);
        out.preview = await jpegPreview(small, opts.previewMaxSide);
      }
    }
    if (masks.length > 0) opts.timer.lap("write");
    return out;
  } catch (error) {
    await Promise.all(files.map((f) => unlink(f).catch(() => undefined)));
    throw error;
  }
}
