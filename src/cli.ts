#!/usr/bin/env node
/**
 * `qwen3-vl-seg-mcp`: the MCP server (stdio by default, Streamable HTTP with --http) and a CLI that
 * mirrors the tools one to one. `--json` prints exactly the tool's structuredContent; errors print
 * one line `CODE: message` on stderr and exit non-zero (2 for bad input, 1 for everything else).
 */

import { realpathSync } from "node:fs";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { parseArgs } from "node:util";
import type { z } from "zod";
import {
  type Config,
  type ConfigOptions,
  createConfig,
  createLogger,
  type Logger,
  optionsFromEnv,
  PACKAGE_NAME,
  parseIntOption,
  parseListenAddress,
} from "./config.js";
import { type ErrorCode, SegError, toSegError } from "./errors.js";
import { parseImageRef } from "./paths.js";
import type { Engine } from "./runtime/types.js";
import { SERVER_VERSION, serveHttp, serveStdio } from "./server.js";
import {
  describeRegionInputSchema,
  describeRegionSummary,
  runDescribeRegion,
} from "./tools/describe-region.js";
import { groundInputSchema, groundSummary, runGround } from "./tools/ground.js";
import { runSegment, segmentInputSchema, segmentSummary } from "./tools/segment.js";
import { EngineQueue, packInfoOnce, type ToolDeps } from "./tools/shared.js";

export const USAGE = `Usage:
  ${PACKAGE_NAME} [serve] [options]                       MCP server on stdio
  ${PACKAGE_NAME} serve --http 127.0.0.1:PORT [options]    MCP server on Streamable HTTP (/mcp)
  ${PACKAGE_NAME} ground <image> <expression> [options]
  ${PACKAGE_NAME} segment <image> [<expression>] [--box x1,y1,x2,y2] [options]
  ${PACKAGE_NAME} describe <image> (--box x1,y1,x2,y2 | --mask PATH) [options]
  ${PACKAGE_NAME} info [options]

<image> is a file path, a file:// URI or a base64 data: URI. Boxes are pixels of the original image.

Options:
  --pack DIR              model pack folder (default: the bundled pack)
  --out DIR               where masks are written (default: ./qwen3-vl-seg-out, created on demand;
                          <tmpdir>/qwen3-vl-seg-out when started in the filesystem root)
  --allow-dir DIR         directory input images may come from; repeatable
                          (server default: the working directory - none when it is the
                          filesystem root - plus the client's MCP roots;
                          CLI default: the working directory and the folders of the files named)
  --max-image-bytes N     largest input file (default 52428800)
  --max-data-uri-bytes N  largest decoded data: URI (default 8388608)
  --max-pixels N          largest input image in pixels (default 40000000)
  --ep PROVIDER           auto | cpu | cuda | webgpu (default auto)
  --cache-bytes N         engine cache for encoded images
  --log-level LEVEL       debug | info | warn | error | silent (default info; logs go to stderr)
  --json                  print the tool's structuredContent as JSON
  --box x1,y1,x2,y2       region (segment: skips grounding; describe: the region)
  --mask PATH             mask PNG for describe (e.g. one written by segment)
  --max-instances N       at most N instances (default 20)
  --rle                   segment: include run-length encodings
  --overlay               segment: also write an overlay PNG
  --http HOST:PORT        serve: Streamable HTTP instead of stdio (loopback unless --token)
  --token TOKEN           serve --http: require "Authorization: Bearer TOKEN" (or QWEN3_VL_SEG_TOKEN)
  --allow-origin ORIGIN   serve --http: extra allowed Origin header value; repeatable
  --session-idle MINUTES  serve --http: close sessions idle this long (default 30)
  -h, --help              this text
  -v, --version           the version

Environment: QWEN3_VL_SEG_PACK, QWEN3_VL_SEG_OUT, QWEN3_VL_SEG_ALLOW_DIRS, QWEN3_VL_SEG_EP,
QWEN3_VL_SEG_MAX_PIXELS, QWEN3_VL_SEG_MAX_IMAGE_BYTES, QWEN3_VL_SEG_LOG_LEVEL, QWEN3_VL_SEG_TOKEN.
Exit status: 0 on success (also when nothing is found), 2 for bad input, 1 for other failures.
`;

const COMMANDS = ["serve", "ground", "segment", "describe", "info"] as const;
type Command = (typeof COMMANDS)[number];

/** Errors the caller can fix by changing the input: exit status 2. */
const INPUT_ERRORS: ReadonlySet<ErrorCode> = new Set([
  "INVALID_INPUT",
  "IMAGE_NOT_FOUND",
  "IMAGE_DECODE_FAILED",
  "IMAGE_TOO_LARGE",
  "UNSUPPORTED_FORMAT",
  "PATH_NOT_ALLOWED",
]);

export interface CliIo {
  stdout: (text: string) => void;
  stderr: (text: string) => void;
  cwd: string;
  env: NodeJS.ProcessEnv;
  /** Engine factory; the default loads the runtime (and onnxruntime) only when a command needs it. */
  createEngine?: (config: Config, logger: Logger) => Promise<Engine>;
}

async function defaultCreateEngine(config: Config, logger: Logger): Promise<Engine> {
  const { createEngine } = await import("./runtime/engine.js");
  return createEngine({
    packDir: config.packDir,
    executionProvider: config.executionProvider,
    ...(config.cacheBytes === undefined ? {} : { cacheBytes: config.cacheBytes }),
    maxInputPixels: config.maxPixels,
    maxImageBytes: config.maxImageBytes,
    log: (message: string) => logger.info(message),
  });
}

/**
 * An Engine whose pack loads in the background, so the server answers `initialize` at once; a
 * load failure becomes every tool call's error instead of a dead server.
 */
export function deferredEngine(loading: Promise<Engine>): Engine {
  loading.catch(() => undefined);
  return {
    info: async () => (await loading).info(),
    ground: async (req) => (await loading).ground(req),
    segment: async (req) => (await loading).segment(req),
    describe: async (req) => (await loading).describe(req),
    dispose: async () => {
      const engine = await loading.catch(() => undefined);
      await engine?.dispose();
    },
  };
}

/** An Engine that loads its pack on first use, so that bad input fails fast without loading a model. */
function lazyEngine(load: () => Promise<Engine>): Engine {
  let loading: Promise<Engine> | undefined;
  const get = () => {
    loading ??= load();
    return loading;
  };
  return {
    info: async () => (await get()).info(),
    ground: async (req) => (await get()).ground(req),
    segment: async (req) => (await get()).segment(req),
    describe: async (req) => (await get()).describe(req),
    dispose: async () => {
      const engine = await loading?.catch(() => undefined);
      await engine?.dispose();
    },
  };
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

/** Validate CLI-built arguments with the tool's own schema, so both surfaces accept the same things. */
function parseToolArgs<T extends z.ZodType>(schema: T, args: unknown): z.output<T> {
  const parsed = schema.safeParse(args);
  if (parsed.success) return parsed.data;
  const issue = parsed.error.issues[0];
  const message = (issue?.message ?? "invalid arguments").replace(/^INVALID_INPUT: /, "");
  const where = issue && issue.path.length > 0 ? ` (${issue.path.join(".")})` : "";
  throw new SegError("INVALID_INPUT", `${message}${where}`);
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

/** Run the CLI; returns the exit status. */
export async function runCli(argv: string[], io: CliIo): Promise<number> {
  let logger = createLogger("info", io.stderr);
  try {
    const { values, positionals } = parseArgs({
      args: argv,
      allowPositionals: true,
      strict: true,
      options: {
        pack: { type: "string" },
        out: { type: "string" },
        "allow-dir": { type: "string", multiple: true },
        "max-image-bytes": { type: "string" },
        "max-data-uri-bytes": { type: "string" },
        "max-pixels": { type: "string" },
        ep: { type: "string" },
        "cache-bytes": { type: "string" },
        "log-level": { type: "string" },
        json: { type: "boolean" },
        box: { type: "string" },
        mask: { type: "string" },
        "max-instances": { type: "string" },
        rle: { type: "boolean" },
        overlay: { type: "boolean" },
        http: { type: "string" },
        token: { type: "string" },
        "allow-origin": { type: "string", multiple: true },
        "session-idle": { type: "string" },
        help: { type: "boolean", short: "h" },
        version: { type: "boolean", short: "v" },
      },
    });
    if (values.help) {
      io.stdout(USAGE);
      return 0;
    }
    if (values.version) {
      io.stdout(`${SERVER_VERSION}\n`);
      return 0;
    }
    const first = positionals[0];
    const command: Command = first === undefined ? "serve" : (first as Command);
    if (!COMMANDS.includes(command)) {
      throw new SegError(
        "INVALID_INPUT",
        `unknown command "${first}": use one of ${COMMANDS.join(", ")} (see --help)`,
      );
    }
    const rest = positionals.slice(1);

    const options: ConfigOptions = { ...optionsFromEnv(io.env), cwd: io.cwd };
    if (values.pack !== undefined) options.packDir = values.pack;
    if (values.out !== undefined) options.outDir = values.out;
    if (values["allow-dir"] !== undefined) options.allowDirs = values["allow-dir"];
    if (values["max-image-bytes"] !== undefined) {
      options.maxImageBytes = parseIntOption("--max-image-bytes", values["max-image-bytes"]);
    }
    if (values["max-data-uri-bytes"] !== undefined) {
      options.maxDataUriBytes = parseIntOption("--max-data-uri-bytes", values["max-data-uri-bytes"]);
    }
    if (values["max-pixels"] !== undefined)
      options.maxPixels = parseIntOption("--max-pixels", values["max-pixels"]);
    if (values.ep !== undefined) options.executionProvider = values.ep;
    if (values["cache-bytes"] !== undefined)
      options.cacheBytes = parseIntOption("--cache-bytes", values["cache-bytes"]);
    if (values["log-level"] !== undefined) options.logLevel = values["log-level"];

    if (command === "serve") {
      if (rest.length > 0)
        throw new SegError("INVALID_INPUT", `serve takes no arguments but received "${rest.join(" ")}"`);
      if (values.http !== undefined) {
        const token = values.token ?? io.env.QWEN3_VL_SEG_TOKEN;
        options.http = {
          ...parseListenAddress(values.http),
          ...(token === undefined ? {} : { token }),
          allowedOrigins: values["allow-origin"] ?? [],
          ...(values["session-idle"] === undefined
            ? {}
            : { sessionIdleMs: parseIntOption("--session-idle", values["session-idle"]) * 60_000 }),
        };
      }
    } else if (options.allowDirs === undefined) {
      options.allowDirs = [io.cwd, ...namedFileDirs([rest[0], values.mask], io.cwd)];
    }

    const config = createConfig(options);
    logger = createLogger(config.logLevel, io.stderr);
    const makeEngine = io.createEngine ?? defaultCreateEngine;

    if (command === "serve") {
      const loading = makeEngine(config, logger);
      loading.then(
        () => logger.info(`model pack loaded from ${config.packDir}`),
        (error: unknown) =>
          logger.error(`${toSegError(error, "MODEL_LOAD_FAILED").toLine()} (tool calls will report it)`),
      );
      const engine = deferredEngine(loading);
      if (config.allowDirs.length === 0) {
        logger.warn(
          "started in the filesystem root without --allow-dir: only the client's MCP roots are readable; pass --allow-dir <dir>",
        );
      }
      if (config.http) {
        const handle = await serveHttp(config, engine, logger);
        await new Promise<void>((resolve) => {
          process.once("SIGINT", resolve);
          process.once("SIGTERM", resolve);
        });
        await handle.close();
        await engine.dispose();
      } else {
        await serveStdio(config, engine, logger);
      }
      return 0;
    }

    const json = values.json === true;
    const maxInstances =
      values["max-instances"] === undefined
        ? undefined
        : parseIntOption("--max-instances", values["max-instances"]);
    const box = values.box === undefined ? undefined : parseBox(values.box);
    const [image, expression, ...extra] = rest;
    if (command !== "info" && image === undefined) {
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

    const engine = lazyEngine(() => makeEngine(config, logger));
    try {
      const deps: ToolDeps = {
        config,
        engine,
        queue: new EngineQueue(config.maxQueue),
        logger,
        allowDirs: async () => config.allowDirs,
        packInfo: packInfoOnce(engine),
      };
      let structured: object;
      let summary: string;
      switch (command) {
        case "info": {
          if (rest.length > 0) throw new SegError("INVALID_INPUT", "info takes no arguments");
          const info = await engine.info();
          structured = info;
          summary = `${info.name}: ${info.description}\npack: ${info.dir}\ndtype: ${info.dtype}, execution provider: ${info.executionProvider}\n`;
          break;
        }
        case "ground": {
          if (expression === undefined) {
            throw new SegError(
              "INVALID_INPUT",
              `ground needs an expression: ${PACKAGE_NAME} ground <image> "<expression>"`,
            );
          }
          const args = parseToolArgs(groundInputSchema, {
            image,
            expression,
            ...(maxInstances === undefined ? {} : { max_instances: maxInstances }),
          });
          const out = await runGround(deps, args);
          structured = out;
          summary = groundSummary(args.expression, out);
          break;
        }
        case "segment": {
          const args = parseToolArgs(segmentInputSchema, {
            image,
            ...(expression === undefined ? {} : { expression }),
            ...(box === undefined ? {} : { box }),
            ...(maxInstances === undefined ? {} : { max_instances: maxInstances }),
            ...(values.rle ? { rle: true } : {}),
            ...(values.overlay ? { overlay: true } : {}),
          });
          const out = await runSegment(deps, args);
          structured = out;
          summary = segmentSummary(args, out);
          break;
        }
        case "describe": {
          if (expression !== undefined) {
            throw new SegError(
              "INVALID_INPUT",
              "describe takes no expression: give the region with --box or --mask",
            );
          }
          const args = parseToolArgs(describeRegionInputSchema, {
            image,
            ...(box === undefined ? {} : { box }),
            ...(values.mask === undefined ? {} : { mask: values.mask }),
          });
          const out = await runDescribeRegion(deps, args);
          structured = out;
          summary = describeRegionSummary(out);
          break;
        }
      }
      io.stdout(json ? `${JSON.stringify(structured, null, 2)}\n` : `${summary.trimEnd()}\n`);
      return 0;
    } finally {
      await engine.dispose();
    }
  } catch (error) {
    const err =
      error instanceof TypeError && "code" in error && String(error.code).startsWith("ERR_PARSE_ARGS")
        ? new SegError("INVALID_INPUT", `${error.message} (see --help)`)
        : toSegError(error);
    io.stderr(`${err.toLine().replace(/\s*\n\s*/g, " ")}\n`);
    if (!(error instanceof SegError) && !(error instanceof TypeError))
      logger.debug(String((error as Error)?.stack));
    return INPUT_ERRORS.has(err.code) ? 2 : 1;
  }
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
  const code = await runCli(process.argv.slice(2), {
    stdout: (t) => process.stdout.write(t),
    stderr: (t) => process.stderr.write(t),
    cwd: process.cwd(),
    env: process.env,
  });
  process.exitCode = code;
}
