/** The `segment` tool: one mask PNG per matching instance (or for a box the caller already has). */

import type { McpServer } from "@modelcontextprotocol/sdk/server/mcp.js";
import type { ContentBlock } from "@modelcontextprotocol/sdk/types.js";
import sharp from "sharp";
import { z } from "zod";
import { SegError } from "../errors.js";
import { ensureOutputDir, outputUri } from "../paths.js";
import { prepareImage, validateBox, validateExpression } from "./inputs.js";
import {
  boxField,
  boxOutput,
  type CallOptions,
  cachedOutput,
  expressionField,
  fileLink,
  formatBox,
  handleTool,
  imageField,
  imageInfoOutput,
  inputContext,
  maxInstancesField,
  modelOutput,
  roundBox,
  roundScore,
  strictInput,
  type ToolDeps,
  timingsOutput,
  timingsWithQueue,
  toolSuccess,
} from "./shared.js";

export const segmentInputSchema = strictInput("segment", {
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
  rle: z
    .boolean()
    .optional()
    .describe("Also return each mask as COCO-style uncompressed RLE (column-major counts). Default false."),
  overlay: z
    .boolean()
    .optional()
    .describe("Also write an overlay PNG of all masks drawn on the image. Default false."),
  preview: z
    .boolean()
    .optional()
    .describe("Return a small JPEG preview of the overlay inline (at most 256 px a side). Default false."),
});
export type SegmentInput = z.infer<typeof segmentInputSchema>;

const fileOutput = z.object({
  path: z.string().describe("Absolute path of the PNG file"),
  uri: z.string().describe("MCP resource URI serving the same file (resources/read)"),
});

export const segmentOutputSchema = z.object({
  found: z.boolean().describe("False when nothing matches the expression (instances is then empty)"),
  image: imageInfoOutput,
  instances: z
    .array(
      z.object({
        label: z.string().describe("What the model called this instance"),
        box: boxOutput.describe(
          "The grounding box [x1, y1, x2, y2] in pixels (the given box when one was passed)",
        ),
        mask_box: boxOutput.describe("Tight box [x1, y1, x2, y2] around the mask's pixels"),
        score: z.number().describe("Predicted mask IoU, 0..1"),
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
  overlay: fileOutput.optional().describe("All masks drawn on the image, when overlay or preview was asked"),
  model: modelOutput,
  timings_ms: timingsOutput,
  cached: cachedOutput,
});
export type SegmentOutput = z.infer<typeof segmentOutputSchema>;

/** Validate, queue and run one segmentation request; returns exactly the tool's structuredContent. */
export async function runSegment(
  deps: ToolDeps,
  args: SegmentInput,
  opts: CallOptions = {},
): Promise<SegmentOutput> {
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
  const box = args.box === undefined ? undefined : validateBox(args.box, image.size);
  const outDir = await ensureOutputDir(deps.config.outDir);
  const [info, { value: result, waitedMs }] = await Promise.all([
    deps.packInfo(),
    deps.queue.run(
      () =>
        deps.engine.segment({
          image: image.source,
          outputDir: outDir,
          ...(expression === undefined ? {} : { expression }),
          ...(box === undefined ? {} : { box }),
          ...(args.max_instances === undefined ? {} : { maxInstances: args.max_instances }),
          overlay: args.overlay === true || args.preview === true,
          rle: args.rle === true,
          ...opts,
        }),
      opts.signal,
    ),
  ]);
  const instances = result.instances.map((inst) => ({
    label: inst.label,
    box: roundBox(inst.box),
    mask_box: roundBox(inst.maskBox),
    score: roundScore(inst.score),
    mask: {
      path: inst.mask.path,
      uri: outputUri(outDir, inst.mask.path),
      area_px: inst.mask.areaPx,
      area_fraction: Math.round(inst.mask.areaFraction * 1e6) / 1e6,
      ...(args.rle === true && inst.mask.rle
        ? { rle: { size: inst.mask.rle.size, counts: inst.mask.rle.counts } }
        : {}),
    },
  }));
  return {
    found: instances.length > 0,
    image: { width: result.image.width, height: result.image.height },
    instances,
    ...(result.overlayPath === undefined
      ? {}
      : { overlay: { path: result.overlayPath, uri: outputUri(outDir, result.overlayPath) } }),
    model: info.name,
    timings_ms: timingsWithQueue(result.timings, waitedMs),
    cached: result.cached,
  };
}

export function segmentSummary(args: Pick<SegmentInput, "expression" | "box">, out: SegmentOutput): string {
  const size = `${out.image.width}x${out.image.height}`;
  const what = args.expression?.trim() ? `"${args.expression.trim()}"` : `box ${formatBox(args.box ?? [])}`;
  if (!out.found) return `No match for ${what} in the ${size} image (found: false); no mask written.`;
  const lines = out.instances.map(
    (inst, i) =>
      `${i + 1}. ${inst.label} ${formatBox(inst.mask_box)} score ${inst.score.toFixed(2)}, ${inst.mask.area_px} px (${(100 * inst.mask.area_fraction).toFixed(1)}%), mask ${inst.mask.path}`,
  );
  const n = out.instances.length;
  const head = `Segmented ${n} instance${n === 1 ? "" : "s"} of ${what} in the ${size} image (mask PNGs are ${size}, white = object; boxes are [x1, y1, x2, y2] pixels):`;
  return [head, ...lines, ...(out.overlay ? [`Overlay: ${out.overlay.path}`] : [])].join("\n");
}

/** A small inline JPEG of the overlay; results must stay far below the 1 MiB clients accept. */
async function previewBlock(file: string, maxSide: number): Promise<ContentBlock | undefined> {
  const jpeg = await sharp(file)
    .resize({ width: maxSide, height: maxSide, fit: "inside", withoutEnlargement: true })
    .jpeg({ quality: 75 })
    .toBuffer();
  if (jpeg.length > 256 * 1024) return undefined;
  return { type: "image", data: jpeg.toString("base64"), mimeType: "image/jpeg" };
}

export function registerSegmentTool(server: McpServer, deps: ToolDeps): void {
  server.registerTool(
    "segment",
    {
      title: "Segment objects",
      description:
        "Segment every object matching a referring expression (or the object inside a given box) and write one binary mask PNG per instance, the size of the input image, into the server's output directory. Returns per instance: label, box and tight mask box in pixels, score, mask path + resource link, area in pixels and as a fraction. found: false when nothing matches. Optional RLE, overlay image and small inline preview.",
      inputSchema: segmentInputSchema,
      outputSchema: segmentOutputSchema,
      // Each call writes new files (fresh names), only inside its own output directory; it never
      // overwrites or deletes anything.
      annotations: {
        readOnlyHint: false,
        destructiveHint: false,
        idempotentHint: false,
        openWorldHint: false,
      },
    },
    (args, extra) =>
      handleTool(deps, extra, async (opts, callDeps) => {
        const out = await runSegment(callDeps, args, opts);
        const links: ContentBlock[] = out.instances.map((inst, i) =>
          fileLink(inst.mask.uri, inst.mask.path, `mask ${i + 1}: ${inst.label}`),
        );
        if (out.overlay) links.push(fileLink(out.overlay.uri, out.overlay.path, "overlay of all masks"));
        if (args.preview === true && out.overlay) {
          const block = await previewBlock(out.overlay.path, callDeps.config.previewMaxSide);
          if (block) links.push(block);
        }
        return toolSuccess(out, segmentSummary(args, out), links);
      }),
  );
}
