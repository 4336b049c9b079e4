/** Leveled diagnostics. Logs go to stderr only: on stdio, stdout carries nothing but protocol messages. */

export const LOG_LEVELS = ["debug", "info", "warn", "error", "silent"] as const;
export type LogLevel = (typeof LOG_LEVELS)[number];
export type MessageLevel = Exclude<LogLevel, "silent">;

export interface Logger {
  debug(message: string): void;
  info(message: string): void;
  warn(message: string): void;
  error(message: string): void;
}

/** A logger that writes `[prefix] level: message` lines at or above `level`. */
export function createLogger(
  level: LogLevel,
  write: (line: string) => void = (l) => process.stderr.write(l),
  prefix = "qwen3-vl-seg-mcp",
): Logger {
  const rank = LOG_LEVELS.indexOf(level);
  const at = (name: MessageLevel) => (message: string) => {
    if (LOG_LEVELS.indexOf(name) >= rank) write(`[${prefix}] ${name}: ${message}\n`);
  };
  return { debug: at("debug"), info: at("info"), warn: at("warn"), error: at("error") };
}

/** A logger that forwards every message with its level (e.g. across a thread boundary). */
export function forwardingLogger(send: (level: MessageLevel, message: string) => void): Logger {
  return {
    debug: (m) => send("debug", m),
    info: (m) => send("info", m),
    warn: (m) => send("warn", m),
    error: (m) => send("error", m),
  };
}

export const silentLogger: Logger = { debug() {}, info() {}, warn() {}, error() {} };
