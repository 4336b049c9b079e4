/**
 * Stage 1: vision_encoder.onnx. Preprocessed patches (plus the host-side position-embedding taps and
 * ViT rotary tables) -> the merged image features the language model reads at its image-pad rows, the
 * three DeepStack features, and the multi-scale ViT maps the mask decoder uses.
 */

import { type ConcreteProvider, f32, i64, OnnxSession, type SessionOptions } from "./onnx.js";
import type { LoadedPack } from "./pack.js";
import type { Preprocessed } from "./preprocess.js";
import { visionHostInputs } from "./vision-inputs.js";

export interface VisionDims {
  /** Cv, the ViT width. */
  hidden: number;
  /** dv, the ViT head dim (rotary tables). */
  headDim: number;
  mergeSize: number;
  /** Rows of the learned position table (a square number: side x side). */
  positionEmbeddings: number;
}

export interface VisionFeatures {
  /** [M, H] main merger output, row-major merged grid (M = P / merge^2). */
  imageFeatures: Float32Array;
  /** [3, M, H] DeepStack merger outputs. */
  deepstack: Float32Array;
  /** [4, P, Cv] ViT block outputs at the 3 taps and after the last block, merge-window order. */
  vitMs: Float32Array;
}

export class VisionEncoder {
  readonly dims: VisionDims;
  readonly #session: OnnxSession;

  private constructor(session: OnnxSession, dims: VisionDims) {
    this.#session = session;
    this.dims = dims;
  }

  static async load(pack: LoadedPack, options: SessionOptions): Promise<VisionEncoder> {
    const v = pack.manifest.model.vision;
    const session = await OnnxSession.create(pack.file(pack.manifest.graphs.vision_encoder.file), options);
    return new VisionEncoder(session, {
      hidden: v.hidden_size,
      headDim: v.head_dim,
      mergeSize: v.spatial_merge_size,
      positionEmbeddings: v.num_position_embeddings,
    });
  }

  get provider(): ConcreteProvider {
    return this.#session.provider;
  }

  async encode(pre: Preprocessed): Promise<VisionFeatures> {
    const [, gh, gw] = pre.grid;
    const p = gh * gw;
    const { headDim, mergeSize, positionEmbeddings } = this.dims;
    const host = visionHostInputs(gh, gw, positionEmbeddings, headDim, mergeSize);
    const out = await this.#session.run({
      pixel_values: f32(pre.pixelValues, [p, pre.pixelValues.length / p]), // [P, 3 * tp * ps * ps]
      pos_embed_idx: i64(host.posEmbedIdx, [p, 4]),
      pos_embed_weight: f32(host.posEmbedWeight, [p, 4]),
      rotary_cos: f32(host.rotaryCos, [p, headDim]),
      rotary_sin: f32(host.rotarySin, [p, headDim]),
    });
    return {
      imageFeatures: out.float("image_features"),
      deepstack: out.float("deepstack_features"),
      vitMs: out.float("vit_ms"),
    };
  }

  dispose(): Promise<void> {
    return this.#session.dispose();
  }
}
