/** The `describe_region` tool: what is inside a box or a mask, as a sentence and a short label. */

import { z } from "zod";
import { SegError } from "../errors.js";
import { prepareImage, prepareMaskBox, validateBox } from "./inputs.js";
import {
  boxField,
  boxOutput,
  callEngine,
  commonOutput,
  formatBox,
  imageField,
  imageInfoOutput,
  inputContext,
  roundBox,
  strictInput,
  type ToolDefinition,
} from "./shared.js";

const input = strictInput("describe_region", {
  image: imageField,
  box: boxField.optional().describe("The region [x1, y1, x2, y2] in pixels. Required unless mask is given."),
  mask: z
    .string({ error: "mask must be a string: a mask PNG path or a qwen3-vl-seg://masks/ URI" })
    .optional()
    .describe(
      "A mask PNG the size of the image (white = region), e.g. the mask path or URI returned by segment. Without a box, the mask's tight box is described.",
    ),
});

const output = z.object({
  image: imageInfoOutput,
  box: boxOutput.describe("The region that was described, [x1, y1, x2, y2] in pixels"),
  description: z.string().describe("What is in the region, in a short phrase or sentence"),
  label: z.string().describe("A short label for the region (a noun phrase)"),
  ...commonOutput,
});

export const describeRegionTool: ToolDefinition<typeof input, typeof output> = {
  name: "describe_region",
  title: "Describe an image region",
  description:
    "Describe what is inside a region of an image, given as a pixel box [x1, y1, x2, y2] or as a mask PNG returned by segment. Returns a short description and a label.",
  input,
  output,
  annotations: { readOnlyHint: true, destructiveHint: false, idempotentHint: true, openWorldHint: false },

  async run(deps, args, opts) {
    if (args.box === undefined && args.mask === undefined) {
      throw new SegError(
        "INVALID_INPUT",
        "describe_region needs a box [x1, y1, x2, y2] or a mask (a PNG path returned by segment): pass at least one",
      );
    }
    const ctx = await inputContext(deps);
    const image = await prepareImage(args.image, ctx);
    // A given box wins; a mask alone stands for its tight box (checked against the image either way).
    const maskBox = args.mask === undefined ? undefined : await prepareMaskBox(args.mask, image, ctx);
    const box = args.box === undefined ? maskBox : validateBox(args.box, image);
    if (box === undefined) throw new SegError("INVALID_INPUT", "describe_region needs a box or a mask");
    const { result, common } = await callEngine(deps, () => deps.engine.describe({ image, box, ...opts }));
    return {
      structured: {
        image: result.image,
        box: roundBox(result.box),
        description: result.description,
        label: result.label,
        ...common,
      },
      blocks: [],
    };
  },

  summary(_args, out) {
    return `Region ${formatBox(out.box)} of the ${out.image.width}x${out.image.height} image: ${out.description} (label: ${out.label})`;
  },
};
