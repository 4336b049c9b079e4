/** The `ground` tool: every instance matching a referring expression, as pixel boxes with scores. */

import type { McpServer } from "@modelcontextprotocol/sdk/server/mcp.js";
import { z } from "zod";
import { prepareImage, validateExpression } from "./inputs.js";
import {
  boxOutput,
  type CallOptions,
  cachedOutput,
  expressionField,
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

export const groundInputSchema = strictInput("ground", {
  image: imageField,
  expression: expressionField,
  max_instances: maxInstancesField.optional(),
});
export type GroundInput = z.infer<typeof groundInputSchema>;

export const groundOutputSchema = z.object({
  found: z
    .boolean()
    .describe("False when nothing in the image matches the expression (instances is then empty)"),
  image: imageInfoOutput,
  instances: z
    .array(
      z.object({
        label: z.string().describe("What the model called this instance"),
        box: boxOutput,
        score: z.number().describe("Confidence 0..1 (mean probability of the box's coordinate tokens)"),
      }),
    )
    .describe("Matching instances, highest score first"),
  model: modelOutput,
  timings_ms: timingsOutput,
  cached: cachedOutput,
});
export type GroundOutput = z.infer<typeof groundOutputSchema>;

/** Validate, queue and run one grounding request; returns exactly the tool's structuredContent. */
export async function runGround(
  deps: ToolDeps,
  args: GroundInput,
  opts: CallOptions = {},
): Promise<GroundOutput> {
  const expression = validateExpression(args.expression, deps.config.maxExpressionChars);
  const image = await prepareImage(args.image, await inputContext(deps));
  const [info, { value: result, waitedMs }] = await Promise.all([
    deps.packInfo(),
    deps.queue.run(
      () =>
        deps.engine.ground({
          image: image.source,
          expression,
          ...(args.max_instances === undefined ? {} : { maxInstances: args.max_instances }),
          ...opts,
        }),
      opts.signal,
    ),
  ]);
  const instances = result.instances.map((inst) => ({
    label: inst.label,
    box: roundBox(inst.box),
    score: roundScore(inst.score),
  }));
  return {
    found: instances.length > 0,
    image: { width: result.image.width, height: result.image.height },
    instances,
    model: info.name,
    timings_ms: timingsWithQueue(result.timings, waitedMs),
    cached: result.cached,
  };
}

export function groundSummary(expression: string, out: GroundOutput): string {
  const size = `${out.image.width}x${out.image.height}`;
  if (!out.found) return `No match for "${expression.trim()}" in the ${size} image (found: false).`;
  const lines = out.instances.map(
    (inst, i) => `${i + 1}. ${inst.label} ${formatBox(inst.box)} score ${inst.score.toFixed(2)}`,
  );
  const n = out.instances.length;
  return [
    `Found ${n} instance${n === 1 ? "" : "s"} of "${expression.trim()}" in the ${size} image (boxes are [x1, y1, x2, y2] pixels):`,
    ...lines,
  ].join("\n");
}

export function registerGroundTool(server: McpServer, deps: ToolDeps): void {
  server.registerTool(
    "ground",
    {
      title: "Ground a referring expression",
      description:
        "Find every object in an image that matches a free-form referring expression and return pixel boxes [x1, y1, x2, y2] with labels and confidence scores. Returns found: false when nothing matches. Use segment for pixel masks, describe_region to ask what is inside a box.",
      inputSchema: groundInputSchema,
      outputSchema: groundOutputSchema,
      annotations: { readOnlyHint: true, destructiveHint: false, idempotentHint: true, openWorldHint: false },
    },
    (args, extra) =>
      handleTool(deps, extra, async (opts, callDeps) => {
        const out = await runGround(callDeps, args, opts);
        return toolSuccess(out, groundSummary(args.expression, out));
      }),
  );
}
