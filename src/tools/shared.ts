/**
 * What the three tools share: their dependencies and declaration, the engine call, common schema
 * pieces, progress reporting, result building, and THE one place where errors become tool results.
 */

import path from "node:path";
import {
  type CallToolResult,
  type ContentBlock,
  type InputRequiredResult,
  type McpServer,
  ProtocolError,
  ProtocolErrorCode,
  type ServerContext,
  type Tool,
  type ToolAnnotations,
} from "@modelcontextprotocol/server";
import { z } from "zod";
import type { Config } from "../config.js";
import { SegError, toSegError } from "../errors.js";
import { FORBIDDEN_KEYS } from "../jsonrpc.js";
import type { Logger } from "../logger.js";
import { truncate } from "../paths.js";
import {
  DEFAULT_MAX_INSTANCES,
  type Engine,
  type ProgressFn,
  type Stage,
  type StageTimings,
} from "../runtime/types.js";
import type { InputContext } from "./inputs.js";

/** The SDK's context of one request: its id, signal, `_meta` (progress token), envelope and sends. */
export type ToolExtra = ServerContext;

export interface ToolDeps {
  config: Config;
  engine: Engine;
  logger: Logger;
  /**
   * Allowed input directories for one call: the configured ones plus the client's MCP roots
   * (asked through `extra`, so the request travels on the call's own stream).
   */
  allowDirs(extra?: ToolExtra): Promise<readonly string[]>;
  /**
   * Before a call runs: what the server must ask the client first (protocol revision 2026-07-28,
   * where a server asks by answering `input_required` and the client retries the call with the
   * answers), or undefined to run the call now.
   */
  inputRequired?(extra: ToolExtra): Promise<InputRequiredResult | undefined>;
}

export interface CallOptions {
  signal?: AbortSignal;
  onProgress?: ProgressFn;
}

export async function inputContext(deps: ToolDeps): Promise<InputContext> {
  return { config: deps.config, allowDirs: await deps.allowDirs() };
}

/** What a tool's run gives back: its structuredContent and any blocks after the text (links, images). */
export interface ToolOutput<O> {
  structured: O;
  blocks: ContentBlock[];
}

/**
 * A tool, declared once: its MCP registration, and `run`/`summary`, which the CLI calls directly so
 * both surfaces validate, run and print the same things.
 */
export interface ToolDefinition<I extends z.ZodType, O extends z.ZodType> {
  name: string;
  title: string;
  description: string;
  input: I;
  output: O;
  annotations: ToolAnnotations;
  run(deps: ToolDeps, args: z.output<I>, opts: CallOptions): Promise<ToolOutput<z.output<O>>>;
  summary(args: z.output<I>, out: z.output<O>): string;
}

/**
 * A tool's arguments checked against its schema, every refusal an INVALID_INPUT sentence: not an
 * object, prototype keys, unknown fields (at most a few named), a wrong field. The MCP handlers and
 * the CLI both take arguments through here.
 */
export function parseArguments<I extends z.ZodObject, O extends z.ZodType>(
  tool: ToolDefinition<I, O>,
  args: unknown,
): z.output<I> {
  const fields = Object.keys(tool.input.shape).join(", ");
  const value = args ?? {};
  if (typeof value !== "object" || Array.isArray(value)) {
    const what = Array.isArray(value) ? "an array" : `a ${typeof value}`;
    throw new SegError(
      "INVALID_INPUT",
      `the arguments of ${tool.name} must be an object with its fields (${fields}), not ${what}`,
    );
  }
  const forbidden = FORBIDDEN_KEYS.filter((k) => Object.hasOwn(value, k));
  if (forbidden.length > 0) {
    throw new SegError(
      "INVALID_INPUT",
      `unknown field(s) ${forbidden.map((k) => `"${k}"`).join(", ")} for ${tool.name}; the accepted fields are ${fields}`,
    );
  }
  const parsed = tool.input.safeParse(value);
  if (parsed.success) return parsed.data;
  const issue = parsed.error.issues[0];
  const message = (issue?.message ?? "invalid arguments").replace(/^INVALID_INPUT: /, "");
  const where = issue && issue.path.length > 0 ? ` (${issue.path.join(".")})` : "";
  throw new SegError("INVALID_INPUT", truncate(`${message}${where}`, 500));
}

/**
 * Register the tools on the server's own tools/list and tools/call handlers (not the SDK's
 * registerTool, whose validation answers bad arguments with a zod dump and a message that does not
 * start with a code): the listing comes from each tool's schemas, and every call runs through
 * handleTool (signal, progress, roots, errors) and parseArguments.
 */
export function registerTools(
  server: McpServer,
  deps: ToolDeps,
  // biome-ignore lint/suspicious/noExplicitAny: tools of different argument and result types
  tools: readonly ToolDefinition<any, any>[],
): void {
  const byName = new Map(tools.map((t) => [t.name, t]));
  const names = tools.map((t) => t.name).join(", ");
  server.server.registerCapabilities({ tools: {} });
  const listed: Tool[] = tools.map((t) => ({
    name: t.name,
    title: t.title,
    description: t.description,
    inputSchema: z.toJSONSchema(t.input, { target: "draft-7", io: "input" }) as Tool["inputSchema"],
    outputSchema: z.toJSONSchema(t.output, { target: "draft-7", io: "output" }) as Tool["outputSchema"],
    annotations: t.annotations,
  }));
  const outputSchemas = new Map(listed.map((t) => [t.name, t.outputSchema]));
  server.server.setRequestHandler("tools/list", () => ({ tools: listed }));
  // Params that are not even the right shape are answered by the JSON-RPC gate (jsonrpc.ts) in a
  // sentence, before the SDK's own check of this schema would answer them with a dump.
  server.server.setRequestHandler("tools/call", async (request, extra) => {
    const { name, arguments: args } = request.params;
    const tool = byName.get(name);
    if (!tool) {
      throw new ProtocolError(
        ProtocolErrorCode.InvalidParams,
        `unknown tool "${truncate(name, 80)}": the tools are ${names}`,
      );
    }
    const ask = await deps.inputRequired?.(extra);
    if (ask) return ask;
    const result = await handleTool(deps, extra, async (opts, callDeps) => {
      const input = parseArguments(tool, args);
      const out = await tool.run(callDeps, input, opts);
      return toolSuccess(
        out.structured as Record<string, unknown>,
        tool.summary(input, out.structured),
        out.blocks,
      );
    });
    // The revision's own shaping of a result (identity for ours: structuredContent is an object).
    return server.server.projectCallToolResult(result, outputSchemas.get(name));
  });
}

/**
 * The engine call every tool makes, with what every result shares: the model's name, the stage
 * timings (rounded to 0.1 ms; `queue` is the time spent waiting for the engine) and the cache flag.
 */
export async function callEngine<R extends { timings: StageTimings; cached: boolean }>(
  deps: ToolDeps,
  call: () => Promise<R>,
): Promise<{ result: R; common: { model: string; timings_ms: Record<string, number>; cached: boolean } }> {
  const [info, result] = await Promise.all([deps.engine.info(), call()]);
  const timings: Record<string, number> = {};
  for (const [k, v] of Object.entries(result.timings)) if (typeof v === "number") timings[k] = round1(v);
  return { result, common: { model: info.name, timings_ms: timings, cached: result.cached } };
}

// ---------------------------------------------------------------------------------------------
// Schema pieces

export const imageField = z
  .string({ error: "image must be a string: a file path, a file:// URI or a data: URI" })
  .describe(
    "The image: an absolute path or one relative to the server's working directory, a file:// URI, or a base64 data: URI (data:image/png;base64,...). PNG, JPEG, WebP, GIF or TIFF. http(s) URLs are not fetched. Paths must lie inside the allowed directories.",
  );

export const expressionField = z
  .string({ error: "expression must be a string" })
  .describe(
    'Referring expression naming what to find, in free form: "the red mug left of the laptop", "every dog", "the person holding an umbrella". Up to 1000 characters.',
  );

export const boxField = z
  .array(z.number({ error: "box coordinates must be numbers" }), {
    error: "box must be an array [x1, y1, x2, y2]",
  })
  .length(4, { error: "box must have exactly four numbers [x1, y1, x2, y2]" })
  .describe(
    "A box [x1, y1, x2, y2] in pixels of the original image (top-left corner, then bottom-right corner; x1 < x2, y1 < y2).",
  );

export const maxInstancesField = z
  .number()
  .int({ error: "max_instances must be an integer" })
  .min(1, { error: "max_instances must be at least 1" })
  .max(100, { error: "max_instances must be at most 100" })
  .describe(`Return at most this many instances, highest score first. Default ${DEFAULT_MAX_INSTANCES}.`);

/** Strict object: unknown fields are refused with a message that lists the accepted ones. */
export function strictInput<T extends z.ZodRawShape>(tool: string, shape: T) {
  const accepted = Object.keys(shape).join(", ");
  return z.strictObject(shape, {
    error: (issue) => {
      if (issue.code !== "unrecognized_keys") return undefined;
      const named = issue.keys.slice(0, 5).map((k) => `"${truncate(k, 40)}"`);
      const more = issue.keys.length > 5 ? ` and ${issue.keys.length - 5} more` : "";
      return `INVALID_INPUT: unknown field(s) ${named.join(", ")}${more} for ${tool}; the accepted fields are ${accepted}`;
    },
  });
}

export const boxOutput = z
  .array(z.number())
  .length(4)
  .describe("[x1, y1, x2, y2] in pixels of the original image");

export const imageInfoOutput = z
  .object({
    width: z.number().int().describe("Width in pixels, after EXIF orientation"),
    height: z.number().int().describe("Height in pixels, after EXIF orientation"),
  })
  .describe("Size of the input image; all boxes use its pixel coordinates");

/** The fields every tool's result ends with (callEngine fills them). */
export const minScoreField = z
  .number()
  .min(0, { error: "min_score must be between 0 and 1" })
  .max(1, { error: "min_score must be between 0 and 1" })
  .describe(
    "Return only boxes whose grounding_score is at least this (0..1). Default: the model pack's calibrated threshold (0 for an uncalibrated pack). Lower it to see doubtful candidates; raise it to keep only sure ones.",
  );

export const groundingScoreOutput = z
  .number()
  .describe(
    "0..1: how sure the language model is that this box is the object the expression names, from the probabilities of the box's own tokens (calibrated on held-out scenes when the pack is calibrated: about the chance the box is right)",
  );

/** Boxes the model wrote that were not returned, so an agent knows whether to lower min_score. */
export const rejectedOutput = z
  .object({
    below_min_score: z.number().int().describe("Boxes whose grounding_score was below min_score"),
    empty_mask: z.number().int().describe("Boxes whose mask had no pixel (segment only)"),
  })
  .describe("Candidates the model wrote that are not in instances, and why");

/** The summary's sentence about candidates left out, or "" when none were. */
export function rejectedNote(out: {
  min_score: number;
  rejected: { below_min_score: number; empty_mask: number };
}): string {
  const { below_min_score: low, empty_mask: empty } = out.rejected;
  const parts: string[] = [];
  if (low > 0)
    parts.push(
      `${low} box${low === 1 ? "" : "es"} below min_score ${out.min_score} (pass a lower min_score to see them)`,
    );
  if (empty > 0) parts.push(`${empty} box${empty === 1 ? "" : "es"} whose mask was empty`);
  return parts.length > 0 ? `\nNot returned: ${parts.join("; ")}.` : "";
}

export const commonOutput = {
  model: z.string().describe("Name of the model pack that produced this result"),
  timings_ms: z
    .record(z.string(), z.number())
    .describe("Milliseconds per stage (queue, decode, vision, prefill, generate, mask, write, total)"),
  cached: z.boolean().describe("True when the image's encoding came from the cache"),
};

function round1(v: number): number {
  return Math.round(v * 10) / 10;
}

/** Scores to 4 decimals, pixel coordinates to 2: enough for any client, shorter JSON. */
export function roundScore(v: number): number {
  return Math.round(v * 1e4) / 1e4;
}

export function roundBox(box: readonly number[]): number[] {
  return box.map((v) => Math.round(v * 100) / 100);
}

export function formatBox(box: readonly number[]): string {
  return `[${box.map((v) => Math.round(v)).join(", ")}]`;
}

// ---------------------------------------------------------------------------------------------
// Progress

const STAGE_ORDER: readonly Stage[] = [
  "queued",
  "load",
  "decode",
  "vision",
  "prefill",
  "generate",
  "mask",
  "postprocess",
  "write",
];

/**
 * A ProgressFn that turns engine stages into `notifications/progress` for clients that sent a
 * progress token (0..100 over the pipeline, strictly increasing as the protocol requires).
 */
export function progressNotifier(extra: ToolExtra, logger: Logger): ProgressFn | undefined {
  const token = extra.mcpReq._meta?.progressToken;
  if (token === undefined) return undefined;
  let last = -1;
  return ({ stage, fraction, message }) => {
    const index = STAGE_ORDER.indexOf(stage);
    const f = Math.min(1, Math.max(0, fraction));
    const progress = Math.min(99, Math.floor((100 * (Math.max(0, index) + f)) / STAGE_ORDER.length));
    if (progress <= last) return;
    last = progress;
    extra.mcpReq
      .notify({
        method: "notifications/progress",
        params: { progressToken: token, progress, total: 100, message: message ?? stage },
      })
      .catch((error: unknown) => logger.debug(`progress notification not sent: ${String(error)}`));
  };
}

// ---------------------------------------------------------------------------------------------
// Results

/** A successful result: concise text for older clients, the JSON copy, then links and images. */
export function toolSuccess(
  structured: Record<string, unknown>,
  summary: string,
  extra: ContentBlock[] = [],
): CallToolResult {
  return {
    structuredContent: structured,
    content: [{ type: "text", text: summary }, { type: "text", text: JSON.stringify(structured) }, ...extra],
  };
}

/** THE one place errors become tool results: `isError: true` and `CODE: message` as text. */
export function toolError(error: unknown, logger?: Logger): CallToolResult {
  const err = toSegError(error);
  if (!(error instanceof SegError)) {
    logger?.error(
      `unexpected ${err.code}: ${error instanceof Error ? (error.stack ?? error.message) : String(error)}`,
    );
  } else if (err.code === "INFERENCE_FAILED" || err.code === "MODEL_LOAD_FAILED") {
    logger?.error(err.toLine());
  } else {
    logger?.debug(err.toLine());
  }
  return {
    isError: true,
    content: [{ type: "text", text: err.toLine() }],
    _meta: { code: err.code },
  };
}

/**
 * Run a tool body with this call's signal, progress and roots; anything it throws becomes an error
 * result, so one bad call never takes the server down.
 */
export async function handleTool(
  deps: ToolDeps,
  extra: ToolExtra,
  body: (opts: CallOptions, deps: ToolDeps) => Promise<CallToolResult>,
): Promise<CallToolResult> {
  const onProgress = progressNotifier(extra, deps.logger);
  const callDeps: ToolDeps = { ...deps, allowDirs: () => deps.allowDirs(extra) };
  try {
    return await body({ signal: extra.mcpReq.signal, ...(onProgress ? { onProgress } : {}) }, callDeps);
  } catch (error) {
    return toolError(error, deps.logger);
  }
}

/** A resource_link block for a file the engine wrote in the output directory. */
export function fileLink(uri: string, file: string, description: string): ContentBlock {
  return { type: "resource_link", uri, name: path.basename(file), mimeType: "image/png", description };
}
