/**
 * A scripted Engine for testing the tool layer in isolation: error mapping, queueing, progress and
 * cancellation paths that the real engine cannot be made to hit on demand (an INFERENCE_FAILED
 * mid-call, a slow call to cancel). Results follow the Engine contract: boxes in pixels of the
 * image, mask PNGs the image's size written in outputDir under names the caller does not control.
 */

import { randomUUID } from "node:crypto";
import path from "node:path";
import sharp from "sharp";
import { SegError } from "../../src/errors.js";
import type {
  Box,
  DescribeRequest,
  DescribeResult,
  Engine,
  GroundRequest,
  GroundResult,
  ImageInfo,
  ImageSource,
  PackInfo,
  RequestOptions,
  SegmentRequest,
  SegmentResult,
} from "../../src/runtime/types.js";

export interface FakeEngineOptions {
  /** Milliseconds each call takes (in steps, watching the signal). @default 0 */
  delayMs?: number;
  /** Thrown by every inference call when set. */
  failWith?: Error;
}

export class FakeEngine implements Engine {
  readonly calls: Array<{ method: string; signal: AbortSignal | undefined; expression?: string }> = [];
  disposed = false;
  constructor(public options: FakeEngineOptions = {}) {}

  async info(): Promise<PackInfo> {
    return {
      name: "fake-engine",
      description: "scripted engine for tool-layer tests",
      dir: "/nonexistent",
      dtype: "fp32",
      provenance: {},
      model: {},
      preprocess: { minPixels: 0, maxPixels: 0, patchSize: 16, mergeSize: 2 },
      executionProvider: "cpu",
    };
  }

  private async work(method: string, req: RequestOptions & { expression?: string }): Promise<void> {
    this.calls.push({
      method,
      signal: req.signal,
      ...(req.expression === undefined ? {} : { expression: req.expression }),
    });
    const stages = ["decode", "vision", "prefill", "generate", "mask"] as const;
    const step = (this.options.delayMs ?? 0) / stages.length;
    for (const [i, stage] of stages.entries()) {
      if (req.signal?.aborted) throw new SegError("CANCELLED", "the request was cancelled");
      req.onProgress?.({ stage, fraction: 0 });
      if (step > 0) await new Promise((r) => setTimeout(r, step));
      req.onProgress?.({ stage, fraction: 1, message: `${stage} ${i + 1}/${stages.length}` });
    }
    if (req.signal?.aborted) throw new SegError("CANCELLED", "the request was cancelled");
    if (this.options.failWith) throw this.options.failWith;
  }

  private async size(image: ImageSource): Promise<ImageInfo> {
    const meta = await sharp("path" in image ? image.path : image.bytes).metadata();
    return { width: meta.autoOrient.width, height: meta.autoOrient.height };
  }

  /** "nothing" finds nothing; "two ..." finds two instances; anything else one, in the centre. */
  private boxes(size: ImageInfo, expression: string): Array<{ label: string; box: Box; score: number }> {
    if (expression.includes("nothing")) return [];
    const { width: w, height: h } = size;
    const centre: Box = [
      Math.round(w / 4),
      Math.round(h / 4),
      Math.round((3 * w) / 4),
      Math.round((3 * h) / 4),
    ];
    if (expression.startsWith("two")) {
      return [
        { label: expression, box: [0, 0, Math.round(w / 2), Math.round(h / 2)], score: 0.9 },
        { label: expression, box: [Math.round(w / 2), Math.round(h / 2), w, h], score: 0.8 },
      ];
    }
    return [{ label: expression, box: centre, score: 0.75 }];
  }

  async ground(req: GroundRequest): Promise<GroundResult> {
    await this.work("ground", req);
    const image = await this.size(req.image);
    const instances = this.boxes(image, req.expression).slice(0, req.maxInstances ?? 20);
    return { found: instances.length > 0, image, instances, text: "", timings: { total: 1 }, cached: false };
  }

  async segment(req: SegmentRequest): Promise<SegmentResult> {
    await this.work("segment", {
      ...req,
      ...(req.expression === undefined ? {} : { expression: req.expression }),
    });
    const image = await this.size(req.image);
    const found =
      req.box === undefined
        ? this.boxes(image, req.expression ?? "")
        : [{ label: req.expression ?? "region", box: req.box, score: 0.7 }];
    const instances = [];
    for (const inst of found.slice(0, req.maxInstances ?? 20)) {
      const [x1, y1, x2, y2] = inst.box.map(Math.round) as Box;
      const pixels = Buffer.alloc(image.width * image.height);
      for (let y = y1; y < y2; y++) pixels.fill(255, y * image.width + x1, y * image.width + x2);
      const file = path.join(req.outputDir, `mask-${randomUUID()}.png`);
      await sharp(pixels, { raw: { width: image.width, height: image.height, channels: 1 } })
        .png({ palette: true, colours: 2 })
        .toFile(file);
      const areaPx = (x2 - x1) * (y2 - y1);
      instances.push({
        ...inst,
        maskBox: [x1, y1, x2, y2] as Box,
        mask: {
          path: file,
          areaPx,
          areaFraction: areaPx / (image.width * image.height),
          ...(req.rle
            ? { rle: { size: [image.height, image.width] as [number, number], counts: [0, areaPx] } }
            : {}),
        },
      });
    }
    let overlayPath: string | undefined;
    if (req.overlay && instances.length > 0) {
      overlayPath = path.join(req.outputDir, `overlay-${randomUUID()}.png`);
      await sharp({
        create: { width: image.width, height: image.height, channels: 3, background: "#808080" },
      })
        .png()
        .toFile(overlayPath);
    }
    return {
      found: instances.length > 0,
      image,
      instances,
      ...(overlayPath === undefined ? {} : { overlayPath }),
      text: "",
      timings: { total: 1 },
      cached: false,
    };
  }

  async describe(req: DescribeRequest): Promise<DescribeResult> {
    await this.work("describe", req);
    const image = await this.size(req.image);
    return {
      image,
      box: req.box ?? [0, 0, image.width, image.height],
      description: req.maskPath ? "a masked region" : "a boxed region",
      label: "region",
      timings: { total: 1 },
      cached: false,
    };
  }

  async dispose(): Promise<void> {
    this.disposed = true;
  }
}
