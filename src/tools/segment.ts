/** The `segment` tool: one mask PNG per matching instance (or for a box the caller already has). */

import type { ContentBlock } from "@modelcontextprotocol/server";
import { z } from "zod";
import { SegError } from "../errors.js";
import { ensureOutputDir, outputUri } from "../paths.js";
import { PREVIEW_MAX_BYTES } from "../runtime/overlay.js";
import { prepareImage, validateBox, validateExpression } from "./inputs.js";
import {
  boxField,
  boxOutput,
  callEngine,
  commonOutput,
  expressionField,
  fileLink,
  formatBox,
  groundingScoreOutput,
  imageField,
  imageInfoOutput,
  inputContext,
  maxInstancesField,
  minScoreField,
  rejectedNote,
  rejectedOutput,
  roundBox,
  roundScore,
  strictInput,
  type ToolDefinition,
} from "./shared.js";

/**
 * Inline previews stay far below the 1 MiB a client accepts in one result: jpegPreview lowers its
 * quality until the JPEG is under this, so the check below only guards against a change there.
 */
const MAX_PREVIEW_BYTES = PREVIEW_MAX_BYTES;

const input = strictInput("segment", {
  image: imageField,
  expression: expressionField
    .optional()
    .describe(
      "Referring expression naming what to segment (free form). Required unless box is given; with a box it only labels the result.",
    ),
  box: boxField
    .optional()
    .describe(
      "A box [x1, y1, x2, y2] in pixels you already have (e.g. from ground): skips grounding and segments exactly this region.",
    ),
  max_instances: maxInstancesField.optional(),
  min_score: minScoreField.optional(),
  rle: z
    .boolean()
    .optional()
    .describe("Also return each mask as COCO-style uncompressed RLE (column-major counts). Default false."),
  overlay: z
    .boolean()
    .optional()
    .describe(
      "Also write an overlay PNG at the image's resolution (at most 2048 px on its long side): every mask tinted (translucent) and outlined in a contrasting colour, with a badge numbered 1..n in the order of instances. Default false.",
    ),
  preview: z
    .boolean()
    .optional()
    .describe(
      "Return the overlay inline as a JPEG you can look at before using the masks (at most 768 px on its long side by default, under 200 KB): the same outlines and badges numbered 1..n as the overlay PNG, badge k = instances[k-1]. Implies overlay. Default false.",
    ),
});

const fileOutput = z.object({
  path: z.string().describe("Absolute path of the PNG file"),
  uri: z.string().describe("MCP resource URI serving the same file (resources/read)"),
});

const output = z.object({
  found: z
    .boolean()
    .describe(
      "True when at least one instance has a non-empty mask (and, for an expression, grounding_score >= min_score); false otherwise, with instances empty",
    ),
  image: imageInfoOutput,
  instances: z
    .array(
      z.object({
        label: z.string().describe("What the model called this instance"),
        box: boxOutput.describe(
          "The grounding box [x1, y1, x2, y2] in pixels (the given box when one was passed)",
        ),
        mask_box: boxOutput.describe("Tight box [x1, y1, x2, y2] around the mask's pixels"),
        grounding_score: groundingScoreOutput
          .optional()
          .describe(
            "0..1: how sure the language model is that this box is the named object (calibrated when the pack is); absent when you gave the box",
          ),
        mask_score: z
          .number()
          .describe(
            "0..1: the mask decoder's predicted IoU of its mask with the object in the box: how well the mask fits the box, not whether the box is the right object",
          ),
        score: z
          .number()
          .describe(
            "What instances are ranked by: grounding_score x mask_score (mask_score for a given box)",
          ),
        mask: fileOutput
          .extend({
            area_px: z.number().int().describe("Number of foreground pixels"),
            area_fraction: z.number().describe("Foreground pixels / image pixels, 0..1"),
            rle: z
              .object({
                size: z.array(z.number().int()).length(2).describe("[height, width]"),
                counts: z
                  .array(z.number().int())
                  .describe("Run lengths in column-major order, starting with a background run"),
              })
              .optional()
              .describe("Uncompressed RLE, when rle: true was asked"),
          })
          .describe("The mask: a 1-bit PNG the size of the input image, white = object"),
      }),
    )
    .describe("One entry per instance, highest score first"),
  min_score: z.number().describe("The minimum grounding_score applied (0 when a box was given)"),
  rejected: rejectedOutput,
  overlay: fileOutput
    .optional()
    .describe(
      "All masks drawn on the image (at most 2048 px on its long side), numbered 1..n in the order of instances, when overlay or preview was asked",
    ),
  ...commonOutput,
});

export const segmentTool: ToolDefinition<typeof input, typeof output> = {
  name: "segment",
  title: "Segment objects",
  description:
    "Segment every object matching a referring expression (or the object inside a given box) and write one binary mask PNG per instance, the size of the input image, into the server's output directory. Returns per instance: label, box and tight mask box in pixels, grounding_score (is this the named object?), mask_score (does the mask fit the box?), score (their product, for ranking), mask path + resource link, area in pixels and as a fraction. Boxes below min_score and empty masks are not returned; found: false when nothing remains. Optional RLE, overlay image and small inline preview.",
  input,
  output,
  // Each call writes new files (fresh names), only inside its own output directory; it never
  // overwrites or deletes anything.
  annotations: { readOnlyHint: false, destructiveHint: false, idempotentHint: false, openWorldHint: false },

  async run(deps, args, opts) {
    if (args.expression === undefined && args.box === undefined) {
      throw new SegError(
        "INVALID_INPUT",
        "segment needs an expression (what to find) or a box [x1, y1, x2, y2] (where it is): pass at least one",
      );
    }
    const expression =
      args.expression === undefined
        ? undefined
        : validateExpression(args.expression, deps.config.maxExpressionChars);
    const image = await prepareImage(args.image, await inputContext(deps));
    const box = args.box === undefined ? undefined : validateBox(args.box, image);
    const outputDir = await ensureOutputDir(deps.config.outDir);
    const target =
      box !== undefined
        ? { box, ...(expression === undefined ? {} : { label: expression }) }
        : {
            expression: expression as string,
            ...(args.max_instances === undefined ? {} : { maxInstances: args.max_instances }),
            ...(args.min_score === undefined ? {} : { minScore: args.min_score }),
          };
    const { result, common } = await callEngine(deps, () =>
      deps.engine.segment({
        image,
        ...target,
        outputDir,
        overlay: args.overlay === true || args.preview === true,
        ...(args.preview === true ? { previewMaxSide: deps.config.previewMaxSide } : {}),
        rle: args.rle === true,
        ...opts,
      }),
    );
    const instances = result.instances.map((inst) => ({
      label: inst.label,
      box: roundBox(inst.box),
      mask_box: roundBox(inst.maskBox),
      ...(inst.groundingScore === undefined ? {} : { grounding_score: roundScore(inst.groundingScore) }),
      mask_score: roundScore(inst.maskScore),
      score: roundScore(inst.score),
      mask: {
        path: inst.mask.path,
        uri: outputUri(outputDir, inst.mask.path),
        area_px: inst.mask.areaPx,
        area_fraction: Math.round(inst.mask.areaFraction * 1e6) / 1e6,
        ...(args.rle === true && inst.mask.rle
          ? { rle: { size: inst.mask.rle.size, counts: inst.mask.rle.counts } }
          : {}),
      },
    }));
    const overlay =
      result.overlayPath === undefined
        ? undefined
        : { path: result.overlayPath, uri: outputUri(outputDir, result.overlayPath) };
    const blocks: ContentBlock[] = instances.map((inst, i) =>
      fileLink(inst.mask.uri, inst.mask.path, `mask ${i + 1}: ${inst.label}`),
    );
    if (overlay) blocks.push(fileLink(overlay.uri, overlay.path, "overlay of all masks"));
    if (result.preview && result.preview.length <= MAX_PREVIEW_BYTES) {
      blocks.push({
        type: "image",
        data: Buffer.from(result.preview).toString("base64"),
        mimeType: "image/jpeg",
      });
    }
    return {
      structured: {
        found: instances.length > 0,
        image: result.image,
        instances,
        min_score: roundScore(result.minScore),
        rejected: { below_min_score: result.rejected.belowMinScore, empty_mask: result.rejected.emptyMask },
        ...(overlay ? { overlay } : {}),
        ...common,
      },
      blocks,
    };
  },

  summary(args, out) {
    const size = `${out.image.width}x${out.image.height}`;
    const what = args.expression?.trim() ? `"${args.expression.trim()}"` : `box ${formatBox(args.box ?? [])}`;
    if (!out.found)
      return `No match for ${what} in the ${size} image (found: false); no mask written.${rejectedNote(out)}`;
    const lines = out.instances.map((inst, i) => {
      const grounding =
        inst.grounding_score === undefined ? "" : `grounding ${inst.grounding_score.toFixed(2)}, `;
      return `${i + 1}. ${inst.label} ${formatBox(inst.mask_box)} ${grounding}mask ${inst.mask_score.toFixed(2)}, ${inst.mask.area_px} px (${(100 * inst.mask.area_fraction).toFixed(1)}%), mask ${inst.mask.path}`;
    });
    const n = out.instances.length;
    const head = `Segmented ${n} instance${n === 1 ? "" : "s"} of ${what} in the ${size} image (mask PNGs are ${size}, white = object; boxes are [x1, y1, x2, y2] pixels):`;
    return (
      [head, ...lines, ...(out.overlay ? [`Overlay: ${out.overlay.path}`] : [])].join("\n") +
      rejectedNote(out)
    );
  },
};
