/** The `describe_region` tool: what is inside a box or a mask, as a sentence and a short label. */

import type { McpServer } from "@modelcontextprotocol/sdk/server/mcp.js";
import { z } from "zod";
import { SegError } from "../errors.js";
import { prepareImage, prepareMask, validateBox } from "./inputs.js";
import {
  boxField,
  boxOutput,
  type CallOptions,
  cachedOutput,
  formatBox,
  handleTool,
  imageField,
  imageInfoOutput,
  inputContext,
  modelOutput,
  roundBox,
  strictInput,
  type ToolDeps,
  timingsOutput,
  timingsWithQueue,
  toolSuccess,
} from "./shared.js";

export const describeRegionInputSchema = strictInput("describe_region", {
  image: imageField,
  box: boxField.optional().describe("The region [x1, y1, x2, y2] in pixels. Required unless mask is given."),
  mask: z
    .string({ error: "mask must be a string: a mask PNG path or a qwen3-vl-seg://masks/ URI" })
    .optional()
    .describe(
      "A mask PNG the size of the image (white = region), e.g. the mask path or URI returned by segment. Without a box, the mask's tight box is described.",
    ),
});
export type DescribeRegionInput = z.infer<typeof describeRegionInputSchema>;

export const describeRegionOutputSchema = z.object({
  image: imageInfoOutput,
  box: boxOutput.describe("The region that was described, [x1, y1, x2, y2] in pixels"),
  description: z.string().describe("What is in the region, in a short phrase or sentence"),
  label: z.string().describe("A short label for the region (a noun phrase)"),
  model: modelOutput,
  timings_ms: timingsOutput,
  cached: cachedOutput,
});
export type DescribeRegionOutput = z.infer<typeof describeRegionOutputSchema>;

export async function runDescribeRegion(
  deps: ToolDeps,
  args: DescribeRegionInput,
  opts: CallOptions = {},
): Promise<DescribeRegionOutput> {
  if (args.box === undefined && args.mask === undefined) {
    throw new SegError(
      "INVALID_INPUT",
      "describe_region needs a box [x1, y1, x2, y2] or a mask (a PNG path returned by segment): pass at least one",
    );
  }
  const ctx = await inputContext(deps);
  const image = await prepareImage(args.image, ctx);
  const box = args.box === undefined ? undefined : validateBox(args.box, image.size);
  const maskPath = args.mask === undefined ? undefined : await prepareMask(args.mask, image.size, ctx);
  const [info, { value: result, waitedMs }] = await Promise.all([
    deps.packInfo(),
    deps.queue.run(
      () =>
        deps.engine.describe({
          image: image.source,
          ...(box === undefined ? {} : { box }),
          ...(maskPath === undefined ? {} : { maskPath }),
          ...opts,
        }),
      opts.signal,
    ),
  ]);
  return {
    image: { width: result.image.width, height: result.image.height },
    box: roundBox(result.box),
    description: result.description,
    label: result.label,
    model: info.name,
    timings_ms: timingsWithQueue(result.timings, waitedMs),
    cached: result.cached,
  };
}

export function describeRegionSummary(out: DescribeRegionOutput): string {
  return `Region ${formatBox(out.box)} of the ${out.image.width}x${out.image.height} image: ${out.description} (label: ${out.label})`;
}

export function registerDescribeRegionTool(server: McpServer, deps: ToolDeps): void {
  server.registerTool(
    "describe_region",
    {
      title: "Describe an image region",
      description:
        "Describe what is inside a region of an image, given as a pixel box [x1, y1, x2, y2] or as a mask PNG returned by segment. Returns a short description and a label.",
      inputSchema: describeRegionInputSchema,
      outputSchema: describeRegionOutputSchema,
      annotations: { readOnlyHint: true, destructiveHint: false, idempotentHint: true, openWorldHint: false },
    },
    (args, extra) =>
      handleTool(deps, extra, async (opts, callDeps) => {
        const out = await runDescribeRegion(callDeps, args, opts);
        return toolSuccess(out, describeRegionSummary(out));
      }),
  );
}
