/**
 * Model pack manifest (models/<name>/pack.json): load, validate, verify checksums.
 * The manifest carries everything the runtime must not guess (docs/design.md).
 */

import { createHash } from "node:crypto";
import { createReadStream, readFileSync } from "node:fs";
import { readFile, stat } from "node:fs/promises";
import path from "node:path";
import { z } from "zod";
import { SegError } from "../errors.js";
import type { EngineOptions } from "./types.js";

const ioSpec = z.object({
  name: z.string(),
  dtype: z.string(),
  shape: z.array(z.union([z.number(), z.string()])),
});

const graphSpec = z.object({
  file: z.string(),
  inputs: z.array(ioSpec),
  outputs: z.array(ioSpec),
  /**
   * How the graph attends (language model): "group_query" graphs (onnxruntime's GroupQueryAttention)
   * accept one buffer as past and present, which lets the runtime keep the KV cache in place.
   */
  attention: z.enum(["group_query"]).optional(),
});

const FOUR_FEATURES = [
  z.literal("open"),
  z.literal("coord_mean"),
  z.literal("coord_min"),
  z.literal("label_mean"),
] as const;
/**
 * How the evidence of a box the model wrote (language-model.ts BoxEvidence) becomes its grounding
 * score: a logistic model fitted by `modelkit calibrate` on held-out scenes, and the score below which
 * a box is not returned (the caller may override it per call with min_score).
 */
const groundingCalibration = z
  .object({
    kind: z.literal("logistic"),
    // Calibrations written before label_agreement existed have the first four.
    features: z.union([z.tuple(FOUR_FEATURES), z.tuple([...FOUR_FEATURES, z.literal("label_agreement")])]),
    weights: z.array(z.number()),
    bias: z.number(),
    threshold: z.number().min(0).max(1),
    /** Where it was fitted and what it reached there, for people (not read by the runtime). */
    fitted_on: z.string().optional(),
    metrics: z.record(z.string(), z.unknown()).optional(),
  })
  .refine((c) => c.weights.length === c.features.length, {
    message: "calibration.grounding needs one weight per feature",
    path: ["weights"],
  });

const manifestSchema = z.object({
  format: z.literal("qwen3-vl-seg-pack"),
  format_version: z.literal(1),
  name: z.string().min(1),
  description: z.string(),
  /** What the pack knows (its training domain), told to agents in tool descriptions. */
  domain: z.string().optional(),
  dtype: z.string(),
  provenance: z.record(z.string(), z.unknown()),
  model: z.object({
    text: z.object({
      hidden_size: z.number().int().positive(),
      num_hidden_layers: z.number().int().positive(),
      num_attention_heads: z.number().int().positive(),
      num_key_value_heads: z.number().int().positive(),
      head_dim: z.number().int().positive(),
      vocab_size: z.number().int().positive(),
      rope_theta: z.number().positive(),
      mrope_section: z.array(z.number().int()).length(3),
      rms_norm_eps: z.number().positive(),
    }),
    vision: z.object({
      hidden_size: z.number().int().positive(),
      depth: z.number().int().positive(),
      num_heads: z.number().int().positive(),
      head_dim: z.number().int().positive(),
      patch_size: z.number().int().positive(),
      temporal_patch_size: z.number().int().positive(),
      spatial_merge_size: z.number().int().positive(),
      num_position_embeddings: z.number().int().positive(),
      deepstack_visual_indexes: z.array(z.number().int()).length(3),
      out_hidden_size: z.number().int().positive(),
    }),
    // The sizes are the graph's business; the runtime reads only how small the mask logits are.
    mask_decoder: z.looseObject({ output_stride: z.number().int().positive() }).optional(),
  }),
  preprocess: z.object({
    patch_size: z.number().int().positive(),
    merge_size: z.number().int().positive(),
    temporal_patch_size: z.number().int().positive(),
    image_mean: z.array(z.number()).length(3),
    image_std: z.array(z.number().positive()).length(3),
    min_pixels: z.number().int().positive(),
    max_pixels: z.number().int().positive(),
    resample: z.string(),
    alpha_background: z.array(z.number().int()).length(3).optional(),
  }),
  tokens: z.object({
    image_pad: z.number().int(),
    vision_start: z.number().int(),
    vision_end: z.number().int(),
    im_start: z.number().int(),
    im_end: z.number().int(),
    endoftext: z.number().int(),
    stop: z.array(z.number().int()).min(1),
    max_token_id: z.number().int().optional(),
  }),
  prompts: z.object({
    chat: z.string().includes("{question}").includes("<|image_pad|>"),
    ground: z.string().includes("{expression}"),
    describe: z.string(),
    /** "box": the region's 0..1000 box in the prompt (Qwen3-VL); "crop": the model sees a crop. */
    describe_mode: z.enum(["box", "crop"]).default("box"),
  }),
  tokenizer: z.object({ file: z.string(), config: z.string() }),
  graphs: z.object({
    vision_encoder: graphSpec,
    language_model: graphSpec,
    /** Absent in a pack exported without a trained mask decoder: segment is then unavailable. */
    mask_decoder: graphSpec.optional(),
  }),
  calibration: z.object({ grounding: groundingCalibration.optional() }).optional(),
  files: z.record(
    z.string(),
    z.object({ sha256: z.string().regex(/^[0-9a-f]{64}$/), bytes: z.number().int() }),
  ),
});

export type PackManifest = z.infer<typeof manifestSchema>;
export type GroundingCalibration = z.infer<typeof groundingCalibration>;
export type GraphRole = keyof PackManifest["graphs"];

export interface LoadedPack {
  /** Absolute folder of the pack. */
  dir: string;
  manifest: PackManifest;
  /** Absolute path of a file named by the manifest. */
  file(relative: string): string;
}

export type VerifyMode = NonNullable<EngineOptions["verify"]>;

/** What a server tells agents about its pack before the pack has loaded. */
export interface PackSummary {
  name: string;
  domain?: string;
  segmentation: boolean;
}

/**
 * Name, domain and whether it can segment, from pack.json alone (no checksums, no graphs): for tool
 * descriptions, which clients list before the first call. Undefined when the manifest cannot be read;
 * loading the pack then reports why.
 */
export function readPackSummary(dir: string): PackSummary | undefined {
  try {
    const json = JSON.parse(readFileSync(path.join(dir, "pack.json"), "utf8")) as Record<string, unknown>;
    const graphs = json.graphs as Record<string, unknown> | undefined;
    if (typeof json.name !== "string") return undefined;
    return {
      name: json.name,
      ...(typeof json.domain === "string" && json.domain.trim() ? { domain: json.domain.trim() } : {}),
      segmentation: graphs?.mask_decoder !== undefined,
    };
  } catch {
    return undefined;
  }
}

/**
 * Load and validate `pack.json`, check every listed file exists with the recorded size and (in `full`
 * mode) sha256. Any problem is MODEL_LOAD_FAILED naming the file; a missing folder is MODEL_NOT_FOUND.
 */
export async function loadPack(dir: string, verify: VerifyMode = "full"): Promise<LoadedPack> {
  const abs = path.resolve(dir);
  const manifestPath = path.join(abs, "pack.json");
  let raw: string;
  try {
    raw = await readFile(manifestPath, "utf8");
  } catch (cause) {
    const exists = await stat(abs).then(
      (s) => s.isDirectory(),
      () => false,
    );
    throw new SegError(
      exists ? "MODEL_LOAD_FAILED" : "MODEL_NOT_FOUND",
      exists
        ? `${manifestPath} is missing: the folder is not a model pack (build one with the modelkit, see models/README.md)`
        : `model pack folder ${abs} does not exist; pass --pack with a folder that holds pack.json`,
      { cause },
    );
  }
  let json: unknown;
  try {
    json = JSON.parse(raw);
  } catch (cause) {
    throw new SegError(
      "MODEL_LOAD_FAILED",
      `${manifestPath} is not valid JSON: ${(cause as Error).message}`,
      {
        cause,
      },
    );
  }
  const parsed = manifestSchema.safeParse(json);
  if (!parsed.success) {
    const issue = parsed.error.issues[0];
    const where = issue ? issue.path.join(".") : "?";
    throw new SegError(
      "MODEL_LOAD_FAILED",
      `${manifestPath} is not a valid pack manifest (format 1): ${where}: ${issue?.message ?? "invalid"}`,
    );
  }
  const manifest = parsed.data;
  const file = (relative: string): string => {
    const resolved = path.resolve(abs, relative);
    if (!resolved.startsWith(abs + path.sep)) {
      throw new SegError("MODEL_LOAD_FAILED", `${manifestPath} names a file outside the pack: ${relative}`);
    }
    return resolved;
  };
  const needed = [
    manifest.tokenizer.file,
    manifest.tokenizer.config,
    ...Object.values(manifest.graphs).flatMap((g) => (g ? [g.file] : [])),
  ];
  if ((manifest.graphs.mask_decoder === undefined) !== (manifest.model.mask_decoder === undefined)) {
    throw new SegError(
      "MODEL_LOAD_FAILED",
      `${manifestPath} must give both graphs.mask_decoder and model.mask_decoder, or neither (a pack without a mask decoder)`,
    );
  }
  for (const name of needed) {
    if (!(name in manifest.files)) {
      throw new SegError("MODEL_LOAD_FAILED", `${manifestPath} lists no checksum for ${name}`);
    }
  }
  await Promise.all(
    Object.entries(manifest.files).map(([name, expected]) => verifyFile(file(name), expected, verify)),
  );
  return { dir: abs, manifest, file };
}

async function verifyFile(filePath: string, expected: { sha256: string; bytes: number }, mode: VerifyMode) {
  let size: number;
  try {
    size = (await stat(filePath)).size;
  } catch (cause) {
    throw new SegError(
      "MODEL_LOAD_FAILED",
      `model file ${filePath} is missing; re-copy or re-export the pack`,
      {
        cause,
      },
    );
  }
  if (size !== expected.bytes) {
    throw new SegError(
      "MODEL_LOAD_FAILED",
      `model file ${filePath} has ${size} bytes but the manifest says ${expected.bytes}: it is truncated or replaced; re-copy or re-export the pack`,
    );
  }
  if (mode === "size") return;
  const digest = await sha256File(filePath);
  if (digest !== expected.sha256) {
    throw new SegError(
      "MODEL_LOAD_FAILED",
      `model file ${filePath} is corrupt (sha256 ${digest.slice(0, 12)}… does not match the manifest's ${expected.sha256.slice(0, 12)}…); re-copy or re-export the pack`,
    );
  }
}

export function sha256File(filePath: string): Promise<string> {
  return new Promise((resolve, reject) => {
    const hash = createHash("sha256");
    createReadStream(filePath)
      .on("data", (chunk) => hash.update(chunk))
      .on("error", reject)
      .on("end", () => resolve(hash.digest("hex")));
  });
}
