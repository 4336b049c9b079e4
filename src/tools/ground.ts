/** The `ground` tool: every instance matching a referring expression, as pixel boxes with scores. */

import { z } from "zod";
import { prepareImage, validateExpression } from "./inputs.js";
import {
  boxOutput,
  callEngine,
  commonOutput,
  expressionField,
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

const input = strictInput("ground", {
  image: imageField,
  expression: expressionField,
  max_instances: maxInstancesField.optional(),
  min_score: minScoreField.optional(),
});

const output = z.object({
  found: z
    .boolean()
    .describe(
      "True when at least one box scored at least min_score; false when nothing in the image matches the expression (instances is then empty)",
    ),
  image: imageInfoOutput,
  instances: z
    .array(
      z.object({
        label: z.string().describe("What the model called this instance"),
        box: boxOutput,
        grounding_score: groundingScoreOutput,
        score: z.number().describe("What instances are ranked by; for ground the same as grounding_score"),
      }),
    )
    .describe("Matching instances, highest score first"),
  min_score: z.number().describe("The minimum grounding_score applied to this call"),
  rejected: rejectedOutput,
  ...commonOutput,
});

export const groundTool: ToolDefinition<typeof input, typeof output> = {
  name: "ground",
  title: "Ground a referring expression",
  description:
    "Find every object in an image that matches a free-form referring expression and return pixel boxes [x1, y1, x2, y2] with labels and a grounding_score (how sure the model is that the box is the named object). Boxes below min_score (default: the pack's calibrated threshold) are not returned; found: false when nothing matches. Use segment for pixel masks, describe_region to ask what is inside a box.",
  input,
  output,
  annotations: { readOnlyHint: true, destructiveHint: false, idempotentHint: true, openWorldHint: false },

  async run(deps, args, opts) {
    const expression = validateExpression(args.expression, deps.config.maxExpressionChars);
    const image = await prepareImage(args.image, await inputContext(deps));
    const { result, common } = await callEngine(deps, () =>
      deps.engine.ground({
        image,
        expression,
        ...(args.max_instances === undefined ? {} : { maxInstances: args.max_instances }),
        ...(args.min_score === undefined ? {} : { minScore: args.min_score }),
        ...opts,
      }),
    );
    const instances = result.instances.map((inst) => ({
      label: inst.label,
      box: roundBox(inst.box),
      grounding_score: roundScore(inst.groundingScore ?? inst.score),
      score: roundScore(inst.score),
    }));
    return {
      structured: {
        found: instances.length > 0,
        image: result.image,
        instances,
        min_score: roundScore(result.minScore),
        rejected: {
          below_min_score: result.rejected.belowMinScore,
          empty_mask: result.rejected.emptyMask,
        },
        ...common,
      },
      blocks: [],
    };
  },

  summary(args, out) {
    const size = `${out.image.width}x${out.image.height}`;
    const expression = args.expression.trim();
    if (!out.found)
      return `No match for "${expression}" in the ${size} image (found: false).${rejectedNote(out)}`;
    const lines = out.instances.map(
      (inst, i) =>
        `${i + 1}. ${inst.label} ${formatBox(inst.box)} grounding ${inst.grounding_score.toFixed(2)}`,
    );
    const n = out.instances.length;
    return (
      [
        `Found ${n} instance${n === 1 ? "" : "s"} of "${expression}" in the ${size} image (boxes are [x1, y1, x2, y2] pixels):`,
        ...lines,
      ].join("\n") + rejectedNote(out)
    );
  },
};
