/**
 * A scripted Engine for testing the tool layer in isolation: error mapping, queueing, progress and
 * cancellation paths that the real engine cannot be made to hit on demand (an INFERENCE_FAILED
 * mid-call, a slow call to cancel). Like the real engine it runs calls one at a time through the
 * runtime's SerialQueue. Results follow the Engine contract: boxes in pixels of the image, mask PNGs
 * the image's size written in outputDir under names the caller does not control.
 */

import { randomUUID } from "node:crypto";
import path from "node:path";
import sharp from "sharp";
import { SegError } from "../../src/errors.js";
import { SerialQueue } from "../../src/runtime/queue.js";
import type {
  Box,
  DescribeRequest,
  DescribeResult,
  Engine,
  GroundRequest,
  GroundResult,
  PackInfo,
  RequestOptions,
  SegmentRequest,
  SegmentResult,
  StageTimings,
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
  readonly #queue = new SerialQueue(16);
  constructor(public options: FakeEngineOptions = {}) {}

  /** Run a scripted call through the queue, as the real engine does; `queue` timing included. */
  private async queued<T extends { timings: StageTimings }>(
    req: RequestOptions,
    fn: () => Promise<T>,
  ): Promise<T> {
    req.onProgress?.({ stage: "queued", fraction: 0 });
    const { value, waitedMs } = await this.#queue.run(fn, req.signal);
    value.timings.queue = waitedMs;
    return value;
  }

  async info(): Promise<PackInfo> {
    return {
      name: "fake-engine",
      description: "scripted engine for tool-layer tests",
      domain: "scripted scenes for tests; not a model",
      segmentation: true,
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

  /** "nothing" finds nothing; "two ..." finds two instances; anything else one, in the centre. */
  private boxes(
    size: { width: number; height: number },
    expression: string,
  ): Array<{ label: string; box: Box; groundingScore: number; score: number }> {
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
        {
          label: expression,
          box: [0, 0, Math.round(w / 2), Math.round(h / 2)],
          groundingScore: 0.9,
          score: 0.9,
        },
        {
          label: expression,
          box: [Math.round(w / 2), Math.round(h / 2), w, h],
          groundingScore: 0.8,
          score: 0.8,
        },
      ];
    }
    return [{ label: expression, box: centre, groundingScore: 0.75, score: 0.75 }];
  }

  ground(req: GroundRequest): Promise<GroundResult> {
    return this.queued(req, async () => {
      await this.work("ground", req);
      const image = { width: req.image.width, height: req.image.height };
      const all = this.boxes(image, req.expression).slice(0, req.maxInstances ?? 20);
      const minScore = req.minScore ?? 0;
      const instances = all.filter((i) => i.groundingScore >= minScore);
      return {
        found: instances.length > 0,
        image,
        instances,
        minScore,
        rejected: { belowMinScore: all.length - instances.length, emptyMask: 0 },
        text: "",
        generated: { tokens: 0, steps: 0 },
        timings: { total: 1 },
        cached: false,
      };
    });
  }

  segment(req: SegmentRequest): Promise<SegmentResult> {
    return this.queued(req, () => this.segmentNow(req));
  }

  private async segmentNow(req: SegmentRequest): Promise<SegmentResult> {
    await this.work("segment", req);
    const image = { width: req.image.width, height: req.image.height };
    const minScore = "box" in req ? 0 : (req.minScore ?? 0);
    const all =
      "box" in req
        ? [{ label: req.label ?? "region", box: req.box, maskScore: 0.7, score: 0.7 }]
        : this.boxes(image, req.expression)
            .slice(0, req.maxInstances ?? 20)
            .map((i) => ({ ...i, maskScore: 0.9, score: i.groundingScore * 0.9 }));
    const found = all.filter((i) => ("groundingScore" in i ? (i.groundingScore as number) : 1) >= minScore);
    const instances = [];
    for (const inst of found) {
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
    const preview =
      req.previewMaxSide !== undefined && instances.length > 0
        ? new Uint8Array(
            await sharp({
              create: { width: req.previewMaxSide, height: 8, channels: 3, background: "#808080" },
            })
              .jpeg()
              .toBuffer(),
          )
        : undefined;
    return {
      found: instances.length > 0,
      image,
      instances,
      minScore,
      rejected: { belowMinScore: all.length - found.length, emptyMask: 0 },
      ...(overlayPath === undefined ? {} : { overlayPath }),
      ...(preview === undefined ? {} : { preview }),
      text: "",
      generated: { tokens: 0, steps: 0 },
      timings: { total: 1 },
      cached: false,
    };
  }

  describe(req: DescribeRequest): Promise<DescribeResult> {
    return this.queued(req, async () => {
      await this.work("describe", req);
      return {
        image: { width: req.image.width, height: req.image.height },
        box: req.box,
        description: "a boxed region",
        label: "region",
        timings: { total: 1 },
        cached: false,
      };
    });
  }

  async dispose(): Promise<void> {
    this.disposed = true;
  }
}
