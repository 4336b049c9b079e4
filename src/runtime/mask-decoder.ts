/**
 * Stage 3: mask_decoder.onnx, the Qwen3-VL-Seg box-guided mask decoder (docs/mask-decoder.md). Per
 * query box: the ViT maps, the language model's states at the image rows (T_mm) and at the box's last
 * coordinate token (T_seg), and the high-resolution image -> mask logits at 1/stride of the resized
 * image, and a predicted mask IoU.
 */

import { SegError } from "../errors.js";
import { f32, OnnxSession, type SessionOptions } from "./onnx.js";
import type { LoadedPack } from "./pack.js";
import type { Box1000 } from "./prompt.js";

export interface MaskDecoderDims {
  /** H, the language model's width (T_mm and T_seg rows). */
  textHidden: number;
  /** Cv, the ViT width. */
  visionHidden: number;
  patchSize: number;
  mergeSize: number;
  /** Mask logits are this many times smaller than the resized image. */
  outputStride: number;
}

/** What the mask decoder reads of one encoded image. */
export interface MaskDecoderImage {
  /** [1, gh, gw] patches. */
  grid: readonly [number, number, number];
  /** [4, P, Cv] */
  vitMs: Float32Array;
  /** [M, H] final-norm states at the image-pad rows (T_mm). */
  mmEmbeds: Float32Array;
  /** [1, 3, gh * patch, gw * patch] normalised resized image. */
  hrImage: Float32Array;
}

export interface MaskQuery {
  box1000: Box1000;
  /** [H] T_seg: the state at the box's last coordinate token. */
  hidden: Float32Array;
}

export interface MaskLogits {
  /** [Q, 1, h, w] logits of the second pass. */
  logits: Float32Array;
  /** [Q] predicted mask IoU. */
  iou: Float32Array;
  height: number;
  width: number;
}

export class MaskDecoder {
  readonly dims: MaskDecoderDims;
  readonly #session: OnnxSession;

  private constructor(session: OnnxSession, dims: MaskDecoderDims) {
    this.#session = session;
    this.dims = dims;
  }

  static async load(pack: LoadedPack, options: SessionOptions): Promise<MaskDecoder> {
    const m = pack.manifest;
    const graph = m.graphs.mask_decoder;
    const spec = m.model.mask_decoder;
    if (!graph || !spec) throw new SegError("MASK_DECODER_MISSING", `the pack ${m.name} has no mask decoder`);
    const session = await OnnxSession.create(pack.file(graph.file), options);
    return new MaskDecoder(session, {
      textHidden: m.model.text.hidden_size,
      visionHidden: m.model.vision.hidden_size,
      patchSize: m.preprocess.patch_size,
      mergeSize: m.preprocess.merge_size,
      outputStride: spec.output_stride,
    });
  }

  async decode(image: MaskDecoderImage, queries: readonly MaskQuery[]): Promise<MaskLogits> {
    const { textHidden: h, visionHidden: cv, patchSize, mergeSize, outputStride } = this.dims;
    const q = queries.length;
    const [, gh, gw] = image.grid;
    const p = gh * gw;
    const boxes = new Float32Array(q * 4); // [Q, 4] normalised x1, y1, x2, y2
    const queryHidden = new Float32Array(q * h); // [Q, H]
    queries.forEach((query, i) => {
      query.box1000.forEach((v, k) => {
        boxes[i * 4 + k] = Math.min(1, Math.max(0, v / 1000));
      });
      queryHidden.set(query.hidden, i * h);
    });
    const out = await this.#session.run({
      vit_ms: f32(image.vitMs, [4, p, cv]),
      mm_embeds: f32(image.mmEmbeds, [p / (mergeSize * mergeSize), h]),
      query_hidden: f32(queryHidden, [q, h]),
      boxes: f32(boxes, [q, 4]),
      // The soft gate looks at the query box itself (K = 1).
      gate_boxes: f32(boxes.slice(), [q, 1, 4]),
      gate_valid: f32(new Float32Array(q).fill(1), [q, 1]),
      hr_image: f32(image.hrImage, [1, 3, gh * patchSize, gw * patchSize]),
    });
    return {
      logits: out.float("mask_logits"),
      iou: out.float("iou_pred"),
      height: (gh * patchSize) / outputStride,
      width: (gw * patchSize) / outputStride,
    };
  }

  dispose(): Promise<void> {
    return this.#session.dispose();
  }
}
