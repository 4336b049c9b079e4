#!/usr/bin/env node
/**
 * `qwen3-vl-seg-mcp`: the MCP server (stdio by default, Streamable HTTP with --http) and a CLI that
 * mirrors the tools one to one. `--json` prints exactly the tool's structuredContent; errors print
 * one line `CODE: message` on stderr and exit non-zero (2 for bad input, 1 for everything else).
 */

import { realpathSync } from "node:fs";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { type ParseArgsConfig, parseArgs } from "node:util";
import type { z } from "zod";
import {
  type Config,
  type ConfigOptions,
  createConfig,
  DEFAULTS,
  engineOptions,
  optionsFromEnv,
  PACKAGE_NAME,
  packageInfo,
  parseCount,
  parseListenAddress,
  parseSetting,
  SETTINGS,
  TOKEN_ENV,
} from "./config.js";
import { isInputError, SegError, toSegError } from "./errors.js";
import { serveHttp } from "./http.js";
import { createLogger, type Logger } from "./logger.js";
import { checkOutputDir, parseImageRef } from "./paths.js";
import { keepOutputDir, sweepOutputDir } from "./retention.js";
import { DEFAULT_MAX_INSTANCES, type Engine } from "./runtime/types.js";
import { serveStdio } from "./server.js";
import { describeRegionTool } from "./tools/describe-region.js";
import { groundTool } from "./tools/ground.js";
import { segmentTool } from "./tools/segment.js";
import { parseArguments, type ToolDefinition, type ToolDeps } from "./tools/shared.js";

const COMMANDS = {
  serve: "[serve] [options]                       MCP server on stdio",
  "serve-http": "serve --http 127.0.0.1:PORT [options]    MCP server on Streamable HTTP (/mcp)",
  ground: "ground <image> <expression> [options]",
  segment: "segment <image> [<expression>] [--box x1,y1,x2,y2] [options]",
  describe: "describe <image> (--box x1,y1,x2,y2 | --mask PATH) [options]",
  info: "info [options]",
} as const;
type Command = "serve" | "ground" | "segment" | "describe" | "info";
const COMMAND_NAMES: readonly Command[] = ["serve", "ground", "segment", "describe", "info"];

/** The flags of the commands themselves; the settings' flags come from SETTINGS. */
const COMMAND_FLAGS: Record<
  string,
  { type: "string" | "boolean"; value?: string; multiple?: boolean; short?: string; help: string }
> = {
  json: { type: "boolean", help: "print the tool's structuredContent as JSON" },
  box: {
    type: "string",
    value: "x1,y1,x2,y2",
    help: "region (segment: skips grounding; describe: the region)",
  },
  mask: { type: "string", value: "PATH", help: "mask PNG for describe (e.g. one written by segment)" },
  "max-instances": {
    type: "string",
    value: "N",
    help: `at most N instances (default ${DEFAULT_MAX_INSTANCES})`,
  },
  "min-score": {
    type: "string",
    value: "S",
    help: "ground/segment: keep boxes with grounding_score >= S, 0..1 (default: the pack's threshold)",
  },
  rle: { type: "boolean", help: "segment: include run-length encodings" },
  overlay: { type: "boolean", help: "segment: also write an overlay PNG" },
  http: {
    type: "string",
    value: "HOST:PORT",
    help: "serve: Streamable HTTP instead of stdio (loopback unless --token)",
  },
  token: {
    type: "string",
    value: "TOKEN",
    help: `serve --http: require "Authorization: Bearer TOKEN" (or ${TOKEN_ENV})`,
  },
  "allow-origin": {
    type: "string",
    value: "ORIGIN",
    multiple: true,
    help: "serve --http: extra allowed Origin header value; repeatable",
  },
  sessions: {
    type: "boolean",
    help: "serve --http: per-client sessions (Mcp-Session-Id state, GET stream) instead of stateless requests; needs load balancer affinity",
  },
  "session-idle": {
    type: "string",
    value: "MINUTES",
    help: `serve --http --sessions: close sessions idle this long (default ${DEFAULTS.sessionIdleMs / 60_000})`,
  },
  help: { type: "boolean", short: "h", help: "this text" },
  version: { type: "boolean", short: "v", help: "the version" },
};

function flagLine(name: string, value: string | undefined, help: string, short?: string): string {
  const left = `${short ? `-${short}, ` : ""}--${name}${value ? ` ${value}` : ""}`;
  return `  ${left.padEnd(26)}${help}`;
}

export const USAGE = [
  "Usage:",
  ...Object.values(COMMANDS).map((c) => `  ${PACKAGE_NAME} ${c}`),
  "",
  "<image> is a file path, a file:// URI or a base64 data: URI. Boxes are pixels of the original image.",
  "",
  "Options:",
  ...SETTINGS.map((s) => flagLine(s.flag, s.value, s.help)),
  ...Object.entries(COMMAND_FLAGS).map(([name, f]) => flagLine(name, f.value, f.help, f.short)),
  "",
  `Environment: ${[...SETTINGS.flatMap((s) => (s.env ? [s.env] : [])), TOKEN_ENV].join(", ")}.`,
  "Exit status: 0 on success (also when nothing is found), 2 for bad input, 1 for other failures.",
  "",
].join("\n");

const PARSE_OPTIONS: NonNullable<ParseArgsConfig["options"]> = {
  ...Object.fromEntries(
    SETTINGS.map((s) => [
      s.flag,
      { type: "string" as const, ...(s.kind === "paths" ? { multiple: true } : {}) },
    ]),
  ),
  ...Object.fromEntries(
    Object.entries(COMMAND_FLAGS).map(([name, f]) => [
      name,
      { type: f.type, ...(f.multiple ? { multiple: true } : {}), ...(f.short ? { short: f.short } : {}) },
    ]),
  ),
};

type Values = Record<string, string | boolean | string[] | undefined>;

export interface CliIo {
  stdout: (text: string) => void;
  stderr: (text: string) => void;
  cwd: string;
  env: NodeJS.ProcessEnv;
  /** Engine factory (tests); the default runs the pipeline in a worker, loading the pack on first use. */
  createEngine?: (config: Config, logger: Logger) => Engine;
}

/** The one place the engine is made, for the server and the commands alike. */
async function defaultEngine(config: Config, logger: Logger): Promise<Engine> {
  // Imported here so bad input fails fast without loading onnxruntime.
  const { WorkerEngine } = await import("./runtime/engine.js");
  return new WorkerEngine(engineOptions(config, logger));
}

/** Run the CLI; returns the exit status. */
export async function runCli(argv: string[], io: CliIo): Promise<number> {
  let logger = createLogger("info", io.stderr);
  let engine: Engine | undefined;
  try {
    const parsed = parseArgs({ args: argv, allowPositionals: true, strict: true, options: PARSE_OPTIONS });
    const values = parsed.values as Values;
    const positionals = parsed.positionals;
    if (values.help) {
      io.stdout(USAGE);
      return 0;
    }
    if (values.version) {
      io.stdout(`${packageInfo().version}\n`);
      return 0;
    }
    const [first, ...rest] = positionals;
    const command = (first ?? "serve") as Command;
    if (!COMMAND_NAMES.includes(command)) {
      throw new SegError(
        "INVALID_INPUT",
        `unknown command "${first}": use one of ${COMMAND_NAMES.join(", ")} (see --help)`,
      );
    }
    const config = createConfig(configOptions(command, rest, values, io));
    logger = createLogger(config.logLevel, io.stderr);
    engine = io.createEngine ? io.createEngine(config, logger) : await defaultEngine(config, logger);
    if (command === "serve") {
      if (rest.length > 0)
        throw new SegError("INVALID_INPUT", `serve takes no arguments but received "${rest.join(" ")}"`);
      await serve(config, engine, logger);
      return 0;
    }
    const deps: ToolDeps = { config, engine, logger, allowDirs: async () => config.allowDirs };
    const { structured, summary } = await runCommand(command, rest, values, deps);
    io.stdout(values.json === true ? `${JSON.stringify(structured, null, 2)}\n` : `${summary.trimEnd()}\n`);
    return 0;
  } catch (error) {
    const err =
      error instanceof TypeError && "code" in error && String(error.code).startsWith("ERR_PARSE_ARGS")
        ? new SegError("INVALID_INPUT", `${error.message} (see --help)`)
        : toSegError(error);
    io.stderr(`${err.toLine().replace(/\s*\n\s*/g, " ")}\n`);
    if (!(error instanceof SegError) && !(error instanceof TypeError))
      logger.debug(String((error as Error)?.stack));
    return isInputError(err.code) ? 2 : 1;
  } finally {
    await engine?.dispose();
  }
}

/** Settings from the environment, then flags; the commands also allow the folders of the files they name. */
function configOptions(command: Command, rest: string[], values: Values, io: CliIo): ConfigOptions {
  const options: Record<string, unknown> = { ...optionsFromEnv(io.env), cwd: io.cwd };
  for (const s of SETTINGS) {
    const raw = values[s.flag];
    if (typeof raw === "string" || Array.isArray(raw)) options[s.key] = parseSetting(s, raw, `--${s.flag}`);
  }
  if (command === "serve" && typeof values.http === "string") {
    const token = (values.token as string | undefined) ?? io.env[TOKEN_ENV];
    const idle = values["session-idle"] as string | undefined;
    if (values.sessions !== true && idle !== undefined)
      throw new SegError(
        "INVALID_INPUT",
        "--session-idle applies to --sessions only: add --sessions to keep sessions (serve --http is stateless by default)",
      );
    options.http = {
      ...parseListenAddress(values.http),
      ...(token === undefined ? {} : { token }),
      allowedOrigins: (values["allow-origin"] as string[] | undefined) ?? [],
      mode: values.sessions === true ? "sessions" : "stateless",
      ...(idle === undefined ? {} : { sessionIdleMs: parseCount("--session-idle", idle) * 60_000 }),
    };
  } else if (command !== "serve" && options.allowDirs === undefined) {
    options.allowDirs = [io.cwd, ...namedFileDirs([rest[0], values.mask as string | undefined], io.cwd)];
  }
  return options as ConfigOptions;
}

/**
 * Serve until the client leaves (stdio) or a signal arrives (HTTP). An unusable --out is refused
 * first; the pack loads in the background; the output folder is kept within its retention bounds.
 */
async function serve(config: Config, engine: Engine, logger: Logger): Promise<void> {
  await checkOutputDir(config.outDir);
  // A refusal to start (port in use) must stay the last line: nothing is logged once serving ends.
  let serving = true;
  engine.info().then(
    (info) => {
      if (serving) logger.info(`model pack ${info.name} loaded from ${info.dir} (${info.executionProvider})`);
    },
    (error: unknown) => {
      if (serving)
        logger.error(`${toSegError(error, "MODEL_LOAD_FAILED").toLine()} (tool calls will report it)`);
    },
  );
  if (config.allowDirs.length === 0) {
    logger.warn(
      "started in the filesystem root without --allow-dir: only the client's MCP roots are readable; pass --allow-dir <dir>",
    );
  }
  const keeper = keepOutputDir(config.outDir, config, logger);
  try {
    if (!config.http) return await serveStdio(config, engine, logger);
    const handle = await serveHttp(config, engine, logger);
    await new Promise<void>((resolve) => {
      process.once("SIGINT", resolve);
      process.once("SIGTERM", resolve);
    });
    await handle.close();
  } finally {
    serving = false;
    keeper.stop();
  }
}

/** ground | segment | describe | info: the tool's structuredContent and its text summary. */
async function runCommand(
  command: Exclude<Command, "serve">,
  rest: string[],
  values: Values,
  deps: ToolDeps,
): Promise<{ structured: object; summary: string }> {
  const [image, expression, ...extra] = rest;
  if (command === "info") {
    if (rest.length > 0) throw new SegError("INVALID_INPUT", "info takes no arguments");
    const info = await deps.engine.info();
    return {
      structured: info,
      summary: [
        `${info.name}: ${info.description}`,
        `knows: ${info.domain ?? "(the pack does not say)"}`,
        `segment: ${info.segmentation ? "yes" : "no (this pack has no mask decoder; ground and describe work)"}`,
        `grounding threshold: ${info.groundingThreshold ?? "none (uncalibrated)"}`,
        `pack: ${info.dir}`,
        `dtype: ${info.dtype}, execution provider: ${info.executionProvider}`,
        "",
      ].join("\n"),
    };
  }
  if (image === undefined) {
    throw new SegError(
      "INVALID_INPUT",
      `${command} needs an image: ${PACKAGE_NAME} ${command} <image> ... (see --help)`,
    );
  }
  if (extra.length > 0) {
    throw new SegError(
      "INVALID_INPUT",
      `unexpected arguments "${extra.join(" ")}": quote the expression so it is one argument`,
    );
  }
  const box = typeof values.box === "string" ? parseBox(values.box) : undefined;
  const maxInstances =
    typeof values["max-instances"] === "string"
      ? parseCount("--max-instances", values["max-instances"])
      : undefined;
  // The tool's schema checks the range; a word that is not a number is refused here.
  const minScore = typeof values["min-score"] === "string" ? Number(values["min-score"]) : undefined;
  if (minScore !== undefined && (values["min-score"] === "" || Number.isNaN(minScore))) {
    throw new SegError(
      "INVALID_INPUT",
      `--min-score must be a number between 0 and 1, got "${values["min-score"]}"`,
    );
  }
  const optional = (key: string, value: unknown) => (value === undefined ? {} : { [key]: value });
  switch (command) {
    case "ground":
      if (expression === undefined) {
        throw new SegError(
          "INVALID_INPUT",
          `ground needs an expression: ${PACKAGE_NAME} ground <image> "<expression>"`,
        );
      }
      return runTool(groundTool, deps, {
        image,
        expression,
        ...optional("max_instances", maxInstances),
        ...optional("min_score", minScore),
      });
    case "segment":
      // A one-off run keeps the output folder within its bounds too (and clears killed writers' temp files).
      await sweepOutputDir(deps.config.outDir, deps.config);
      return runTool(segmentTool, deps, {
        image,
        ...optional("expression", expression),
        ...optional("box", box),
        ...optional("max_instances", maxInstances),
        ...optional("min_score", minScore),
        ...(values.rle === true ? { rle: true } : {}),
        ...(values.overlay === true ? { overlay: true } : {}),
      });
    case "describe":
      if (expression !== undefined) {
        throw new SegError(
          "INVALID_INPUT",
          "describe takes no expression: give the region with --box or --mask",
        );
      }
      return runTool(describeRegionTool, deps, {
        image,
        ...optional("box", box),
        ...optional("mask", values.mask),
      });
  }
}

/** Validate CLI-built arguments as the MCP handler does and run the tool's own body. */
async function runTool<I extends z.ZodObject, O extends z.ZodType>(
  tool: ToolDefinition<I, O>,
  deps: ToolDeps,
  args: unknown,
): Promise<{ structured: object; summary: string }> {
  const input = parseArguments(tool, args);
  const out = await tool.run(deps, input, {});
  return { structured: out.structured as object, summary: tool.summary(input, out.structured) };
}

function parseBox(value: string): number[] {
  const parts = value.split(",").map((p) => p.trim());
  const numbers = parts.map(Number);
  if (parts.length !== 4 || parts.some((p) => p === "") || !numbers.every(Number.isFinite)) {
    throw new SegError(
      "INVALID_INPUT",
      `expected --box x1,y1,x2,y2 (four numbers, pixels) but received "${value}"`,
    );
  }
  return numbers;
}

/** Folders of the files the user named on the command line (the CLI trusts its own user). */
function namedFileDirs(refs: (string | undefined)[], cwd: string): string[] {
  const dirs: string[] = [];
  for (const ref of refs) {
    if (ref === undefined) continue;
    try {
      const parsed = parseImageRef(ref, { cwd, maxDataUriBytes: Number.MAX_SAFE_INTEGER });
      if (parsed.kind !== "path") continue;
      dirs.push(path.dirname(parsed.path));
      try {
        dirs.push(path.dirname(realpathSync(parsed.path)));
      } catch {
        // missing files are reported by the tool itself
      }
    } catch {
      // malformed references are reported by the tool itself
    }
  }
  return dirs;
}

function isMain(): boolean {
  const entry = process.argv[1];
  if (entry === undefined) return false;
  try {
    return realpathSync(entry) === realpathSync(fileURLToPath(import.meta.url));
  } catch {
    return false;
  }
}

if (isMain()) {
  process.exitCode = await runCli(process.argv.slice(2), {
    stdout: (t) => process.stdout.write(t),
    stderr: (t) => process.stderr.write(t),
    cwd: process.cwd(),
    env: process.env,
  });
}
