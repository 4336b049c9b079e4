/**
 * Server and CLI configuration: built from flags and environment variables, validated with zod,
 * resolved to absolute paths, and frozen. Everything downstream reads this object; nothing reads
 * process.env or process.cwd() again.
 */

import { existsSync, readFileSync } from "node:fs";
import { tmpdir } from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { z } from "zod";
import { SegError } from "./errors.js";

/** The pack used when none is given: shipped inside the npm package under models/. */
export const DEFAULT_PACK_NAME = "shapes";

/** Output directory when none is given, relative to the working directory. */
export const DEFAULT_OUT_DIR = "qwen3-vl-seg-out";

export const PACKAGE_NAME = "qwen3-vl-seg-mcp";

const EXECUTION_PROVIDERS = ["auto", "cpu", "cuda", "webgpu"] as const;
export type ExecutionProvider = (typeof EXECUTION_PROVIDERS)[number];

const LOG_LEVELS = ["debug", "info", "warn", "error", "silent"] as const;
export type LogLevel = (typeof LOG_LEVELS)[number];

const MiB = 1024 * 1024;

const configSchema = z.strictObject({
  /** Working directory that relative paths are resolved against. */
  cwd: z.string(),
  /** Model pack directory (absolute). */
  packDir: z.string(),
  /** Where mask PNGs and overlays are written (absolute; created on demand). */
  outDir: z.string(),
  /**
   * Directories input images and masks may come from (absolute). MCP roots are added at run time.
   * Empty when none was given and the working directory is the filesystem root (as for servers
   * that desktop clients launch): allowing the whole disk by accident is worse than asking.
   */
  allowDirs: z.array(z.string()),
  /** Largest input file or decoded data: URI, in bytes. @default 50 MiB */
  maxImageBytes: z
    .number()
    .int()
    .positive()
    .default(50 * MiB),
  /** Largest data: URI payload (decoded bytes). @default 8 MiB */
  maxDataUriBytes: z
    .number()
    .int()
    .positive()
    .default(8 * MiB),
  /** Largest input image in pixels (width * height). @default 40,000,000 */
  maxPixels: z.number().int().positive().default(40_000_000),
  /** Longest referring expression, in characters. @default 1000 */
  maxExpressionChars: z.number().int().positive().default(1000),
  /** Longest side of the optional preview image returned inline. @default 256 */
  previewMaxSide: z.number().int().min(32).max(1024).default(256),
  executionProvider: z.enum(EXECUTION_PROVIDERS).default("auto"),
  /** Engine cache budget in bytes (encoded images); undefined lets the engine choose. */
  cacheBytes: z.number().int().nonnegative().optional(),
  /** Requests waiting for the engine beyond this are refused (the engine runs one at a time). @default 16 */
  maxQueue: z.number().int().positive().default(16),
  logLevel: z.enum(LOG_LEVELS).default("info"),
  http: z
    .strictObject({
      host: z.string(),
      port: z.number().int().min(0).max(65535),
      /** Bearer token required on every request when set. */
      token: z.string().min(16).optional(),
      /** Extra allowed Origin header values (the server's own loopback origins are always allowed). */
      allowedOrigins: z.array(z.string()).default([]),
      /** A session with no request for this long (and none in flight) is closed. @default 30 min */
      sessionIdleMs: z
        .number()
        .int()
        .positive()
        .default(30 * 60_000),
    })
    .optional(),
});

export type Config = Readonly<z.output<typeof configSchema>>;
export type ConfigInput = z.input<typeof configSchema>;

/** Options as the CLI or a test gives them; every path may be relative to `cwd`. */
export interface ConfigOptions {
  cwd?: string;
  packDir?: string;
  outDir?: string;
  allowDirs?: string[];
  maxImageBytes?: number;
  maxDataUriBytes?: number;
  maxPixels?: number;
  maxExpressionChars?: number;
  previewMaxSide?: number;
  executionProvider?: string;
  cacheBytes?: number;
  maxQueue?: number;
  logLevel?: string;
  http?: { host: string; port: number; token?: string; allowedOrigins?: string[]; sessionIdleMs?: number };
}

/** The package root: the nearest folder above this module whose package.json names this package. */
export function packageRoot(): string {
  let dir = path.dirname(fileURLToPath(import.meta.url));
  for (;;) {
    const candidate = path.join(dir, "package.json");
    if (existsSync(candidate)) {
      try {
        // Read synchronously once at start-up; a JSON import would pin the layout of dist/.
        const pkg = JSON.parse(readFileSync(candidate, "utf8")) as { name?: string };
        if (pkg.name === PACKAGE_NAME) return dir;
      } catch {
        // not ours; keep walking up
      }
    }
    const parent = path.dirname(dir);
    if (parent === dir) return path.resolve(path.dirname(fileURLToPath(import.meta.url)), "..");
    dir = parent;
  }
}

/** The bundled default pack: `<package>/models/<DEFAULT_PACK_NAME>`. */
export function defaultPackDir(): string {
  return path.join(packageRoot(), "models", DEFAULT_PACK_NAME);
}

/**
 * Environment variables read (flags win over them):
 * QWEN3_VL_SEG_PACK, QWEN3_VL_SEG_OUT, QWEN3_VL_SEG_ALLOW_DIRS (path.delimiter-separated),
 * QWEN3_VL_SEG_EP, QWEN3_VL_SEG_MAX_PIXELS, QWEN3_VL_SEG_MAX_IMAGE_BYTES, QWEN3_VL_SEG_LOG_LEVEL,
 * QWEN3_VL_SEG_TOKEN (HTTP bearer token).
 */
export function optionsFromEnv(env: NodeJS.ProcessEnv): ConfigOptions {
  const out: ConfigOptions = {};
  if (env.QWEN3_VL_SEG_PACK) out.packDir = env.QWEN3_VL_SEG_PACK;
  if (env.QWEN3_VL_SEG_OUT) out.outDir = env.QWEN3_VL_SEG_OUT;
  if (env.QWEN3_VL_SEG_ALLOW_DIRS) {
    out.allowDirs = env.QWEN3_VL_SEG_ALLOW_DIRS.split(path.delimiter).filter((d) => d.length > 0);
  }
  if (env.QWEN3_VL_SEG_EP) out.executionProvider = env.QWEN3_VL_SEG_EP;
  if (env.QWEN3_VL_SEG_MAX_PIXELS)
    out.maxPixels = parseIntOption("QWEN3_VL_SEG_MAX_PIXELS", env.QWEN3_VL_SEG_MAX_PIXELS);
  if (env.QWEN3_VL_SEG_MAX_IMAGE_BYTES) {
    out.maxImageBytes = parseIntOption("QWEN3_VL_SEG_MAX_IMAGE_BYTES", env.QWEN3_VL_SEG_MAX_IMAGE_BYTES);
  }
  if (env.QWEN3_VL_SEG_LOG_LEVEL) out.logLevel = env.QWEN3_VL_SEG_LOG_LEVEL;
  return out;
}

export function parseIntOption(name: string, value: string): number {
  const n = Number(value.replaceAll("_", ""));
  if (!Number.isSafeInteger(n) || n <= 0) {
    throw new SegError("INVALID_INPUT", `expected a positive integer for ${name} but received "${value}"`);
  }
  return n;
}

/** Validate and resolve options into a frozen Config. Throws SegError INVALID_INPUT. */
export function createConfig(options: ConfigOptions = {}): Config {
  const cwd = path.resolve(options.cwd ?? process.cwd());
  const abs = (p: string) => path.resolve(cwd, p);
  const input: ConfigInput = {
    cwd,
    packDir: options.packDir === undefined ? defaultPackDir() : abs(options.packDir),
    // In the filesystem root (desktop clients) ./qwen3-vl-seg-out is rarely writable: use the temp dir.
    outDir:
      options.outDir === undefined && path.parse(cwd).root === cwd
        ? path.join(tmpdir(), DEFAULT_OUT_DIR)
        : abs(options.outDir ?? DEFAULT_OUT_DIR),
    allowDirs: (options.allowDirs && options.allowDirs.length > 0
      ? options.allowDirs
      : path.parse(cwd).root === cwd
        ? []
        : [cwd]
    ).map(abs),
    ...(options.maxImageBytes === undefined ? {} : { maxImageBytes: options.maxImageBytes }),
    ...(options.maxDataUriBytes === undefined ? {} : { maxDataUriBytes: options.maxDataUriBytes }),
    ...(options.maxPixels === undefined ? {} : { maxPixels: options.maxPixels }),
    ...(options.maxExpressionChars === undefined ? {} : { maxExpressionChars: options.maxExpressionChars }),
    ...(options.previewMaxSide === undefined ? {} : { previewMaxSide: options.previewMaxSide }),
    ...(options.executionProvider === undefined
      ? {}
      : { executionProvider: options.executionProvider as ExecutionProvider }),
    ...(options.cacheBytes === undefined ? {} : { cacheBytes: options.cacheBytes }),
    ...(options.maxQueue === undefined ? {} : { maxQueue: options.maxQueue }),
    ...(options.logLevel === undefined ? {} : { logLevel: options.logLevel as LogLevel }),
    ...(options.http === undefined ? {} : { http: options.http }),
  };
  const parsed = configSchema.safeParse(input);
  if (!parsed.success) {
    const issue = parsed.error.issues[0];
    const where = issue?.path.join(".") ?? "config";
    throw new SegError("INVALID_INPUT", `invalid option ${where}: ${issue?.message ?? "invalid"}`);
  }
  const config = parsed.data;
  if (config.http) {
    Object.freeze(config.http.allowedOrigins);
    Object.freeze(config.http);
  }
  Object.freeze(config.allowDirs);
  return Object.freeze(config);
}

/** True for hosts that only this machine can reach. */
export function isLoopbackHost(host: string): boolean {
  const h = host.replace(/^\[|\]$/g, "").toLowerCase();
  return h === "localhost" || h === "::1" || /^127(\.\d{1,3}){3}$/.test(h);
}

/** Parse `HOST:PORT`, `:PORT` or `PORT` (host defaults to 127.0.0.1). IPv6 hosts in brackets. */
export function parseListenAddress(value: string): { host: string; port: number } {
  const m = /^(?:(\[[^\]]+\]|[^:]+)?:)?(\d{1,5})$/.exec(value.trim());
  const port = m?.[2] === undefined ? Number.NaN : Number(m[2]);
  if (!m || !Number.isInteger(port) || port > 65535) {
    throw new SegError(
      "INVALID_INPUT",
      `expected HOST:PORT for --http (e.g. 127.0.0.1:8765) but received "${value}"`,
    );
  }
  const host = (m[1] ?? "127.0.0.1").replace(/^\[|\]$/g, "");
  return { host, port };
}

export interface Logger {
  debug(message: string): void;
  info(message: string): void;
  warn(message: string): void;
  error(message: string): void;
}

/** Logs go to stderr only: on stdio, stdout carries nothing but protocol messages. */
export function createLogger(
  level: LogLevel,
  write: (line: string) => void = (l) => process.stderr.write(l),
): Logger {
  const rank = LOG_LEVELS.indexOf(level);
  const at = (name: LogLevel) => (message: string) => {
    if (LOG_LEVELS.indexOf(name) >= rank) write(`[${PACKAGE_NAME}] ${name}: ${message}\n`);
  };
  return { debug: at("debug"), info: at("info"), warn: at("warn"), error: at("error") };
}
