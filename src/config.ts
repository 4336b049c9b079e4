/**
 * Server and CLI configuration: every setting is declared once in SETTINGS (flag, environment
 * variable, default, help), built from flags and environment variables, validated with zod, resolved
 * to absolute paths, and frozen. Everything downstream reads this object; nothing reads process.env
 * or process.cwd() again.
 */

import { existsSync, readFileSync } from "node:fs";
import { tmpdir } from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { z } from "zod";
import { SegError } from "./errors.js";
import type { Logger } from "./logger.js";
import { LOG_LEVELS, type LogLevel } from "./logger.js";
import {
  ENGINE_DEFAULTS,
  type EngineOptions,
  EXECUTION_PROVIDERS,
  type ExecutionProvider,
} from "./runtime/types.js";

export const PACKAGE_NAME = "qwen3-vl-seg-mcp";

/** The pack used when none is given: shipped inside the npm package under models/. */
export const DEFAULT_PACK_NAME = "shapes";

const MiB = 1024 * 1024;

/** How `serve --http` keeps clients: see the `http.mode` setting. */
export const HTTP_MODES = ["stateless", "sessions"] as const;
export type HttpMode = (typeof HTTP_MODES)[number];

/** Every default, once. */
export const DEFAULTS = {
  /** Relative to the working directory (the temp folder when that is the filesystem root). */
  outDir: "qwen3-vl-seg-out",
  maxImageBytes: 50 * MiB,
  maxDataUriBytes: 8 * MiB,
  maxInputPixels: 40_000_000,
  maxExpressionChars: 1000,
  /** Big enough for a model to read the numbered badges; the JPEG stays under 200 KB. */
  previewMaxSide: 768,
  logLevel: "info" as LogLevel,
  httpMode: "stateless" as HttpMode,
  sessionIdleMs: 30 * 60_000,
  maxHttpSessions: 64,
  /** Masks and overlays older than this are removed from the output folder. */
  outMaxAgeMs: 24 * 60 * 60_000,
  /** The output folder's files are kept under this many bytes (oldest removed first)... */
  outMaxBytes: 1024 * MiB,
  /** ...but never one younger than this: a client may still be reading it. */
  outMinAgeMs: 10 * 60_000,
  executionProvider: ENGINE_DEFAULTS.executionProvider as ExecutionProvider,
  maxQueue: ENGINE_DEFAULTS.maxQueue,
} as const;

const configSchema = z.strictObject({
  /** Working directory that relative paths are resolved against. */
  cwd: z.string(),
  /** Model pack directory (absolute). */
  packDir: z.string(),
  /** Where mask PNGs and overlays are written (absolute; created on demand). */
  outDir: z.string(),
  /**
   * Directories input images and masks may come from (absolute). Empty when none was given and the
   * working directory is the filesystem root (as for servers that desktop clients launch): allowing
   * the whole disk by accident is worse than asking. A local client's MCP roots narrow these when they
   * were given (`allowDirsGiven`), and replace the working-directory default when not.
   */
  allowDirs: z.array(z.string()),
  /** Whether allowDirs came from --allow-dir / QWEN3_VL_SEG_ALLOW_DIRS (not the default). */
  allowDirsGiven: z.boolean(),
  /** Largest input file, in bytes. */
  maxImageBytes: z.number().int().positive().default(DEFAULTS.maxImageBytes),
  /** Largest data: URI payload (decoded bytes). */
  maxDataUriBytes: z.number().int().positive().default(DEFAULTS.maxDataUriBytes),
  /** Largest input image in pixels (width * height), before the model's own resize. */
  maxInputPixels: z.number().int().positive().default(DEFAULTS.maxInputPixels),
  /** Longest referring expression, in characters. */
  maxExpressionChars: z.number().int().positive().default(DEFAULTS.maxExpressionChars),
  /**
   * Longest side of the inline preview (segment with preview: true): a JPEG of the numbered, outlined
   * overlay, kept under 200 KB by lowering its quality.
   */
  previewMaxSide: z.number().int().min(32).max(1024).default(DEFAULTS.previewMaxSide),
  executionProvider: z.enum(EXECUTION_PROVIDERS).default(DEFAULTS.executionProvider),
  /** Engine cache budget in bytes (encoded images); 0 disables it; unset lets the engine size it. */
  cacheBytes: z.number().int().nonnegative().optional(),
  /** Requests waiting for the engine beyond this are refused with BUSY (it runs one at a time). */
  maxQueue: z.number().int().positive().default(DEFAULTS.maxQueue),
  /** Retention of the output folder's masks and overlays (see DEFAULTS). */
  outMaxAgeMs: z.number().int().positive().default(DEFAULTS.outMaxAgeMs),
  outMaxBytes: z.number().int().nonnegative().default(DEFAULTS.outMaxBytes),
  outMinAgeMs: z.number().int().nonnegative().default(DEFAULTS.outMinAgeMs),
  logLevel: z.enum(LOG_LEVELS).default(DEFAULTS.logLevel),
  http: z
    .strictObject({
      host: z.string(),
      port: z.number().int().min(0).max(65535),
      /** Bearer token required on every request when set. */
      token: z.string().min(16).optional(),
      /** Extra allowed Origin header values (the server's own loopback origins are always allowed). */
      allowedOrigins: z.array(z.string()).default([]),
      /**
       * "stateless": every POST is served on its own, so any replica behind a load balancer can
       * answer any request; "sessions": per-client server state, which needs affinity.
       */
      mode: z.enum(HTTP_MODES).default(DEFAULTS.httpMode),
      /** Sessions mode: a session with no request for this long (and none in flight) is closed. */
      sessionIdleMs: z.number().int().positive().default(DEFAULTS.sessionIdleMs),
      /** Sessions mode: open sessions beyond this get 503 with Retry-After. */
      maxSessions: z.number().int().positive().default(DEFAULTS.maxHttpSessions),
    })
    .optional(),
});

export type Config = Readonly<z.output<typeof configSchema>>;
type ConfigInput = z.input<typeof configSchema>;

/** Options as the CLI or a test gives them; every path may be relative to `cwd`. */
export interface ConfigOptions {
  cwd?: string;
  packDir?: string;
  outDir?: string;
  allowDirs?: string[];
  maxImageBytes?: number;
  maxDataUriBytes?: number;
  maxInputPixels?: number;
  maxExpressionChars?: number;
  previewMaxSide?: number;
  executionProvider?: string;
  cacheBytes?: number;
  maxQueue?: number;
  outMaxAgeMs?: number;
  outMaxBytes?: number;
  outMinAgeMs?: number;
  logLevel?: string;
  http?: {
    host: string;
    port: number;
    token?: string;
    allowedOrigins?: string[];
    mode?: HttpMode;
    sessionIdleMs?: number;
    maxSessions?: number;
  };
}

/** A setting a user can give as a flag and (most) as an environment variable. */
export interface Setting {
  key:
    | "packDir"
    | "outDir"
    | "allowDirs"
    | "maxImageBytes"
    | "maxDataUriBytes"
    | "maxInputPixels"
    | "executionProvider"
    | "cacheBytes"
    | "outMaxAgeMs"
    | "outMaxBytes"
    | "outMinAgeMs"
    | "logLevel";
  flag: string;
  env?: string;
  /** What the value looks like in the usage text. */
  value: string;
  kind: "path" | "paths" | "count" | "choice";
  /** Smallest accepted count. @default 1 */
  min?: number;
  /** The count is given in these units of the key's value (e.g. 60_000 for minutes -> ms). @default 1 */
  scale?: number;
  help: string;
}

export const SETTINGS: readonly Setting[] = [
  {
    key: "packDir",
    flag: "pack",
    env: "QWEN3_VL_SEG_PACK",
    value: "DIR",
    kind: "path",
    help: `model pack folder (default: the bundled pack, models/${DEFAULT_PACK_NAME})`,
  },
  {
    key: "outDir",
    flag: "out",
    env: "QWEN3_VL_SEG_OUT",
    value: "DIR",
    kind: "path",
    help: `where masks are written (default: ./${DEFAULTS.outDir}, created on demand; <tmpdir>/${DEFAULTS.outDir} when started in the filesystem root)`,
  },
  {
    key: "allowDirs",
    flag: "allow-dir",
    env: "QWEN3_VL_SEG_ALLOW_DIRS",
    value: "DIR",
    kind: "paths",
    help: "directory input images may come from; repeatable (the variable: separated by the path delimiter). Server default: the working directory (none in the filesystem root) plus the client's MCP roots; CLI default: the working directory and the folders of the files named",
  },
  {
    key: "maxImageBytes",
    flag: "max-image-bytes",
    env: "QWEN3_VL_SEG_MAX_IMAGE_BYTES",
    value: "N",
    kind: "count",
    help: `largest input file in bytes (default ${DEFAULTS.maxImageBytes})`,
  },
  {
    key: "maxDataUriBytes",
    flag: "max-data-uri-bytes",
    value: "N",
    kind: "count",
    help: `largest decoded data: URI in bytes (default ${DEFAULTS.maxDataUriBytes})`,
  },
  {
    key: "maxInputPixels",
    flag: "max-input-pixels",
    env: "QWEN3_VL_SEG_MAX_INPUT_PIXELS",
    value: "N",
    kind: "count",
    help: `largest input image in pixels, width x height (default ${DEFAULTS.maxInputPixels})`,
  },
  {
    key: "executionProvider",
    flag: "ep",
    env: "QWEN3_VL_SEG_EP",
    value: "PROVIDER",
    kind: "choice",
    help: `${EXECUTION_PROVIDERS.join(" | ")} (default ${DEFAULTS.executionProvider}: CUDA, then WebGPU, then the CPU)`,
  },
  {
    key: "cacheBytes",
    flag: "cache-bytes",
    value: "N",
    kind: "count",
    min: 0,
    help: "memory for encoded images, 0 = no cache (default: 256 MiB, or room for two images at the pack's largest size if more)",
  },
  {
    key: "outMaxAgeMs",
    flag: "out-max-age",
    value: "MINUTES",
    kind: "count",
    scale: 60_000,
    help: `masks and overlays older than this are removed from --out (default ${DEFAULTS.outMaxAgeMs / 60_000})`,
  },
  {
    key: "outMaxBytes",
    flag: "out-max-bytes",
    value: "N",
    kind: "count",
    min: 0,
    help: `keep --out's masks and overlays under this many bytes, oldest removed first (default ${DEFAULTS.outMaxBytes})`,
  },
  {
    key: "outMinAgeMs",
    flag: "out-min-age",
    value: "MINUTES",
    kind: "count",
    min: 0,
    scale: 60_000,
    help: `...but never remove one younger than this: a client may still read it (default ${DEFAULTS.outMinAgeMs / 60_000})`,
  },
  {
    key: "logLevel",
    flag: "log-level",
    env: "QWEN3_VL_SEG_LOG_LEVEL",
    value: "LEVEL",
    kind: "choice",
    help: `${LOG_LEVELS.join(" | ")} (default ${DEFAULTS.logLevel}; logs go to stderr)`,
  },
];

/** The HTTP bearer token's variable (preferred over --token: arguments show in `ps`). */
export const TOKEN_ENV = "QWEN3_VL_SEG_TOKEN";

/** Parse a setting's raw text (from a flag or a variable) into its option value. */
export function parseSetting(
  setting: Setting,
  raw: string | string[],
  origin: string,
): string | string[] | number {
  if (setting.kind === "paths") {
    return Array.isArray(raw) ? raw : raw.split(path.delimiter).filter((d) => d.length > 0);
  }
  const text = Array.isArray(raw) ? (raw.at(-1) ?? "") : raw;
  return setting.kind === "count" ? parseCount(origin, text, setting.min ?? 1) * (setting.scale ?? 1) : text;
}

/** Options from the environment variables in SETTINGS (flags win over them). */
export function optionsFromEnv(env: NodeJS.ProcessEnv): ConfigOptions {
  const out: Record<string, unknown> = {};
  for (const s of SETTINGS) {
    const raw = s.env === undefined ? undefined : env[s.env];
    if (raw) out[s.key] = parseSetting(s, raw, s.env as string);
  }
  return out as ConfigOptions;
}

/** A whole number >= `min` (underscores allowed as separators). */
export function parseCount(name: string, value: string, min = 1): number {
  const n = Number(value.replaceAll("_", ""));
  if (value.trim() === "" || !Number.isSafeInteger(n) || n < min) {
    throw new SegError(
      "INVALID_INPUT",
      `expected ${min === 0 ? "a non-negative" : "a positive"} integer for ${name} but received "${value}"`,
    );
  }
  return n;
}

/** name and version from the package's own package.json (the one definition of the version). */
export function packageInfo(): { root: string; version: string } {
  let dir = path.dirname(fileURLToPath(import.meta.url));
  for (;;) {
    const candidate = path.join(dir, "package.json");
    if (existsSync(candidate)) {
      try {
        // Read synchronously once at start-up; a JSON import would pin the layout of dist/.
        const pkg = JSON.parse(readFileSync(candidate, "utf8")) as { name?: string; version?: string };
        if (pkg.name === PACKAGE_NAME) return { root: dir, version: pkg.version ?? "0.0.0" };
      } catch {
        // not ours; keep walking up
      }
    }
    const parent = path.dirname(dir);
    if (parent === dir)
      throw new SegError(
        "MODEL_NOT_FOUND",
        `cannot find ${PACKAGE_NAME}'s package.json above ${fileURLToPath(import.meta.url)}`,
      );
    dir = parent;
  }
}

/** The bundled default pack: `<package>/models/<DEFAULT_PACK_NAME>`. */
export function defaultPackDir(): string {
  return path.join(packageInfo().root, "models", DEFAULT_PACK_NAME);
}

/** Validate and resolve options into a frozen Config. Throws SegError INVALID_INPUT. */
export function createConfig(options: ConfigOptions = {}): Config {
  const cwd = path.resolve(options.cwd ?? process.cwd());
  const abs = (p: string) => path.resolve(cwd, p);
  const inRoot = path.parse(cwd).root === cwd;
  const { cwd: _, packDir, outDir, allowDirs, executionProvider, logLevel, ...rest } = options;
  const input: ConfigInput = {
    ...rest,
    cwd,
    packDir: packDir === undefined ? defaultPackDir() : abs(packDir),
    // In the filesystem root (desktop clients) ./qwen3-vl-seg-out is rarely writable: use the temp dir.
    outDir:
      outDir === undefined && inRoot ? path.join(tmpdir(), DEFAULTS.outDir) : abs(outDir ?? DEFAULTS.outDir),
    allowDirs: (allowDirs && allowDirs.length > 0 ? allowDirs : inRoot ? [] : [cwd]).map(abs),
    allowDirsGiven: allowDirs !== undefined && allowDirs.length > 0,
    ...(executionProvider === undefined ? {} : { executionProvider: executionProvider as ExecutionProvider }),
    ...(logLevel === undefined ? {} : { logLevel: logLevel as LogLevel }),
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

/** What the engine needs from the configuration: the one place CLI and server build it from. */
export function engineOptions(config: Config, log: Logger): EngineOptions {
  return {
    packDir: config.packDir,
    executionProvider: config.executionProvider,
    ...(config.cacheBytes === undefined ? {} : { cacheBytes: config.cacheBytes }),
    maxQueue: config.maxQueue,
    log,
  };
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
