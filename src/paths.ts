/**
 * Path and URI safety. Every image or mask a caller names goes through here before anything opens it:
 * the reference is parsed (plain path, file:// URI, data: URI; http(s) refused), the path is checked
 * against the allow-list as written, then opened once and the real path of what was opened is checked
 * again, so a link inside an allowed directory cannot reach outside it. Output files are only ever
 * looked up inside the output directory.
 */

import { constants, type Stats } from "node:fs";
import { type FileHandle, mkdir, open, readlink, realpath, stat } from "node:fs/promises";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { SegError } from "./errors.js";

/** URI scheme of mask and overlay files served as MCP resources. */
export const OUTPUT_URI_PREFIX = "qwen3-vl-seg://masks/";

export type ImageRef = { kind: "path"; path: string } | { kind: "data"; mime: string; bytes: Uint8Array };

/** True when `child` is `parent` or lies below it (both absolute, normalised). */
export function isInside(child: string, parent: string): boolean {
  const rel = path.relative(parent, child);
  return rel === "" || (rel !== ".." && !rel.startsWith(`..${path.sep}`) && !path.isAbsolute(rel));
}

function describeDirs(dirs: readonly string[]): string {
  return dirs.map((d) => `"${d}"`).join(", ");
}

/**
 * Parse what a caller passed as `image` (or `mask`): an absolute or `cwd`-relative path, a
 * `file://` URI, or a base64 `data:` URI. URLs that would need a network fetch are refused.
 */
export function parseImageRef(
  ref: string,
  opts: { cwd: string; maxDataUriBytes: number; field?: string },
): ImageRef {
  const field = opts.field ?? "image";
  const value = ref.trim();
  if (value.length === 0) {
    throw new SegError("INVALID_INPUT", `${field} is empty: pass a file path, a file:// URI or a data: URI`);
  }
  if (value.includes("\0")) {
    throw new SegError("INVALID_INPUT", `${field} contains a NUL character: pass a plain file path`);
  }
  const scheme = /^([a-zA-Z][a-zA-Z0-9+.-]*):/.exec(value)?.[1]?.toLowerCase();
  // A one-letter "scheme" is a Windows drive letter, not a URI.
  if (scheme === undefined || scheme.length === 1) {
    return { kind: "path", path: path.resolve(opts.cwd, value) };
  }
  if (scheme === "file") {
    let p: string;
    try {
      p = fileURLToPath(value);
    } catch (cause) {
      throw new SegError(
        "INVALID_INPUT",
        `${field} is not a usable file:// URI (${(cause as Error).message}): pass a local absolute path instead`,
        { cause },
      );
    }
    return { kind: "path", path: path.resolve(p) };
  }
  if (scheme === "data") return parseDataUri(value, opts.maxDataUriBytes, field);
  if (scheme === "http" || scheme === "https") {
    throw new SegError(
      "INVALID_INPUT",
      `${field} is an ${scheme} URL; this server never fetches from the network: download the image to a file inside an allowed directory and pass its path`,
    );
  }
  throw new SegError(
    "INVALID_INPUT",
    `${field} has unsupported URI scheme "${truncate(scheme, 40)}:": pass a file path, a file:// URI or a base64 data: URI`,
  );
}

const BASE64 = /^[A-Za-z0-9+/]*={0,2}$/;

function parseDataUri(value: string, maxBytes: number, field: string): ImageRef {
  const comma = value.indexOf(",");
  if (comma < 0) {
    throw new SegError(
      "INVALID_INPUT",
      `${field} is a data: URI without a comma: use data:image/png;base64,<data>`,
    );
  }
  const header = value.slice(5, comma).toLowerCase();
  const params = header.split(";");
  const mime = params[0] || "application/octet-stream";
  if (!params.includes("base64")) {
    throw new SegError(
      "INVALID_INPUT",
      `${field} data: URI must be base64-encoded: use data:${mime};base64,<data>`,
    );
  }
  const payload = value.slice(comma + 1).replace(/\s+/g, "");
  // Check the size before decoding so an oversized payload never gets a buffer.
  const padding = payload.endsWith("==") ? 2 : payload.endsWith("=") ? 1 : 0;
  const decodedBytes = Math.floor((payload.length * 3) / 4) - padding;
  if (decodedBytes > maxBytes) {
    throw new SegError(
      "IMAGE_TOO_LARGE",
      `${field} data: URI holds ${decodedBytes} bytes, over the limit of ${maxBytes}: save the image to a file inside an allowed directory and pass its path instead`,
      { details: { bytes: decodedBytes, limit: maxBytes } },
    );
  }
  if (payload.length % 4 === 1 || !BASE64.test(payload)) {
    throw new SegError("INVALID_INPUT", `${field} data: URI is not valid base64`);
  }
  const bytes = new Uint8Array(Buffer.from(payload, "base64"));
  if (bytes.length === 0) {
    throw new SegError("IMAGE_DECODE_FAILED", `${field} data: URI is empty: pass the encoded image bytes`);
  }
  return { kind: "data", mime, bytes };
}

/** Real paths of the allowed directories; ones that do not exist are kept as written (nothing is inside them). */
export async function realDirs(dirs: readonly string[]): Promise<string[]> {
  const out = await Promise.all(
    dirs.map(async (d) => {
      try {
        return await realpath(d);
      } catch {
        return path.resolve(d);
      }
    }),
  );
  return [...new Set(out)];
}

/** A sentence for a system error on a file a caller named. */
function fileError(cause: unknown, field: string, abs: string): SegError {
  const code = (cause as NodeJS.ErrnoException).code ?? "";
  const says: Record<string, string> = {
    ENOENT: "does not exist: check the path (relative paths are resolved against the working directory)",
    ENOTDIR: "does not exist (a part of the path is not a folder): check the path",
    EACCES: "cannot be read (permission denied): make it readable by the server's user",
    EPERM: "cannot be read (operation not permitted): make it readable by the server's user",
    ELOOP: "is a loop of symbolic links: pass the path of the file itself",
    ENAMETOOLONG: "is too long a name for this system: shorten the path",
    EISDIR: "is a directory: pass the path of an image file inside it",
  };
  return new SegError(
    "IMAGE_NOT_FOUND",
    `${field} "${truncate(abs)}" ${says[code] ?? `cannot be opened (${code || String(cause)}): pass a readable image file`}`,
    { cause, details: { path: abs } },
  );
}

/** The real path of an open descriptor: /proc/self/fd on Linux, else the path's real path if it is still the same file. */
async function descriptorPath(
  handle: FileHandle,
  abs: string,
  opened: Stats,
  field: string,
): Promise<string> {
  try {
    return await readlink(`/proc/self/fd/${handle.fd}`);
  } catch {
    // no /proc (macOS, BSD): compare the checked path's file with the opened one
  }
  const real = await realpath(abs).catch((cause: unknown) => {
    throw fileError(cause, field, abs);
  });
  const now = await stat(real).catch((cause: unknown) => {
    throw fileError(cause, field, abs);
  });
  if (now.dev !== opened.dev || now.ino !== opened.ino) {
    throw new SegError(
      "IMAGE_NOT_FOUND",
      `${field} "${truncate(abs)}" changed while it was being opened: try again`,
      {
        details: { path: abs },
      },
    );
  }
  return real;
}

/**
 * Read a file a caller named, once, from inside `allowDirs`. The path as written is checked first,
 * so nothing outside the allowed directories is ever opened on a caller's behalf (which would reveal
 * whether it exists). Then it is opened once (O_NONBLOCK: a FIFO cannot block the open), and what was
 * opened is checked: its real path through the descriptor (so a directory or link swapped in between a
 * check and the open cannot lead outside), a regular non-empty file under the size limit. The bytes
 * are read through the same descriptor; nothing is ever re-opened by name.
 */
export async function readAllowedFile(
  file: string,
  allowDirs: readonly string[],
  opts: { maxBytes: number; field?: string },
): Promise<{ path: string; bytes: Buffer }> {
  const field = opts.field ?? "image";
  const abs = path.resolve(file);
  const lexicalDirs = allowDirs.map((d) => path.resolve(d));
  const realAllowed = await realDirs(allowDirs);
  if (!lexicalDirs.some((d) => isInside(abs, d)) && !realAllowed.some((d) => isInside(abs, d))) {
    throw new SegError(
      "PATH_NOT_ALLOWED",
      lexicalDirs.length === 0
        ? `${field} "${truncate(abs)}" cannot be read: no input directory is allowed (none was given and the server runs in the filesystem root, or the client's roots and --allow-dir do not overlap): start the server with --allow-dir <dir> that covers the file`
        : `${field} "${truncate(abs)}" is outside the allowed directories (${describeDirs(lexicalDirs)}): copy the file into one of them, or start the server with --allow-dir <dir>`,
      { details: { path: abs, allowDirs: lexicalDirs } },
    );
  }
  let handle: FileHandle;
  try {
    handle = await open(abs, constants.O_RDONLY | constants.O_NONBLOCK);
  } catch (cause) {
    throw fileError(cause, field, abs);
  }
  try {
    const info = await handle.stat();
    const real = await descriptorPath(handle, abs, info, field);
    if (!realAllowed.some((d) => isInside(real, d))) {
      throw new SegError(
        "PATH_NOT_ALLOWED",
        `${field} "${truncate(abs)}" resolves to "${truncate(real)}", outside the allowed directories (${describeDirs(realAllowed)}): symbolic links may not lead out of them; copy the file in instead`,
        { details: { path: abs, realPath: real } },
      );
    }
    if (info.isDirectory()) {
      throw new SegError(
        "INVALID_INPUT",
        `${field} "${truncate(abs)}" is a directory: pass the path of an image file inside it`,
      );
    }
    if (!info.isFile()) {
      throw new SegError(
        "INVALID_INPUT",
        `${field} "${truncate(abs)}" is not a regular file (a device, socket or pipe): pass the path of an image file`,
      );
    }
    if (info.size === 0) {
      throw new SegError(
        "IMAGE_DECODE_FAILED",
        `${field} "${truncate(abs)}" is empty (0 bytes): pass a PNG, JPEG, WebP, GIF or TIFF file`,
      );
    }
    if (info.size > opts.maxBytes) {
      throw new SegError(
        "IMAGE_TOO_LARGE",
        `${field} "${truncate(abs)}" has ${info.size} bytes, over the limit of ${opts.maxBytes}: downscale or recompress it, or raise --max-image-bytes`,
        { details: { bytes: info.size, limit: opts.maxBytes } },
      );
    }
    // One byte more than fstat said, to notice a file that grew since.
    const bytes = Buffer.alloc(info.size + 1);
    let n = 0;
    for (;;) {
      const { bytesRead } = await handle.read(bytes, n, bytes.length - n, n);
      n += bytesRead;
      if (bytesRead === 0 || n === bytes.length) break;
    }
    if (n !== info.size) {
      throw new SegError(
        "IMAGE_DECODE_FAILED",
        `${field} "${truncate(abs)}" changed while it was being read: try again`,
        {
          details: { path: abs },
        },
      );
    }
    return { path: real, bytes: bytes.subarray(0, n) };
  } catch (cause) {
    if (cause instanceof SegError) throw cause;
    throw fileError(cause, field, abs);
  } finally {
    await handle.close();
  }
}

/** Kernel and device trees where no mask may be written (and where a recursive mkdir can spin). */
const SYSTEM_TREES = ["/proc", "/sys", "/dev"];

function outputDirError(abs: string, why: string, cause?: unknown): SegError {
  return new SegError(
    "OUTPUT_WRITE_FAILED",
    `cannot use the output directory "${truncate(abs)}": ${why}; pass a writable --out directory`,
    cause === undefined ? undefined : { cause },
  );
}

/**
 * Check an output directory without creating it (a server does this at start): refused when it lies
 * under /proc, /sys or /dev (as written or as resolved: a link cannot smuggle it there), or exists
 * and is not a directory.
 */
export async function checkOutputDir(outDir: string): Promise<void> {
  const abs = path.resolve(outDir);
  // The deepest part of the path that exists, resolved: a link cannot smuggle the folder into /proc.
  let existing = abs;
  for (;;) {
    const info = await stat(existing).catch(() => undefined);
    if (info) {
      if (existing === abs && !info.isDirectory())
        throw outputDirError(abs, "it exists and is not a directory");
      break;
    }
    const parent = path.dirname(existing);
    if (parent === existing) break;
    existing = parent;
  }
  const resolved = await realpath(existing).catch(() => existing);
  const tree = SYSTEM_TREES.find((t) => isInside(abs, t) || isInside(resolved, t));
  if (tree) throw outputDirError(abs, `it lies under ${tree}, which holds no files of ours`);
}

/** Check the output directory, create it if needed and return its real path. */
export async function ensureOutputDir(outDir: string): Promise<string> {
  await checkOutputDir(outDir);
  const abs = path.resolve(outDir);
  try {
    await mkdir(abs, { recursive: true });
    return await realpath(abs);
  } catch (cause) {
    throw outputDirError(abs, (cause as Error).message, cause);
  }
}

/** The resource URI of a file the engine wrote inside the output directory. */
export function outputUri(outDirReal: string, file: string): string {
  const rel = path.relative(outDirReal, file);
  if (rel === "" || rel === ".." || rel.startsWith(`..${path.sep}`) || path.isAbsolute(rel)) {
    throw new SegError(
      "OUTPUT_WRITE_FAILED",
      `output file "${file}" is outside the output directory "${outDirReal}"`,
    );
  }
  return OUTPUT_URI_PREFIX + encodeURIComponent(rel.split(path.sep).join("/"));
}

/**
 * Read the file behind a `qwen3-vl-seg://masks/<name>` URI (or its `name`): only PNG files inside the
 * output directory, opened once and checked like any caller-named file (readAllowedFile).
 */
export async function readOutputFile(
  outDir: string,
  nameOrUri: string,
  maxBytes: number,
): Promise<{ path: string; bytes: Buffer }> {
  const encoded = nameOrUri.startsWith(OUTPUT_URI_PREFIX)
    ? nameOrUri.slice(OUTPUT_URI_PREFIX.length)
    : nameOrUri;
  let rel: string;
  try {
    rel = decodeURIComponent(encoded);
  } catch {
    throw new SegError("INVALID_INPUT", `"${truncate(nameOrUri)}" is not a valid mask URI`);
  }
  const parts = rel.split("/");
  if (
    rel.length === 0 ||
    parts.some((p) => p === "" || p === "." || p === ".." || p.includes("\\") || p.includes("\0")) ||
    !rel.toLowerCase().endsWith(".png")
  ) {
    throw new SegError(
      "INVALID_INPUT",
      `"${truncate(nameOrUri)}" does not name a mask file: use a ${OUTPUT_URI_PREFIX}<name>.png URI returned by segment`,
    );
  }
  const root = (await realDirs([outDir]))[0] ?? path.resolve(outDir);
  try {
    return await readAllowedFile(path.join(root, ...parts), [root], { maxBytes, field: "mask" });
  } catch (error) {
    if (error instanceof SegError && error.code === "IMAGE_NOT_FOUND") {
      throw new SegError(
        "IMAGE_NOT_FOUND",
        `mask "${truncate(nameOrUri)}" does not exist in the output directory: run segment again`,
        { cause: error },
      );
    }
    if (error instanceof SegError && error.code === "PATH_NOT_ALLOWED") {
      throw new SegError(
        "PATH_NOT_ALLOWED",
        `mask "${truncate(nameOrUri)}" resolves outside the output directory`,
        {
          cause: error,
        },
      );
    }
    throw error;
  }
}

/** Caller text quoted in a message: at most `max` characters, so a huge argument cannot flood it. */
export function truncate(text: string, max = 200): string {
  return text.length <= max ? text : `${text.slice(0, max)}… (${text.length} characters)`;
}

/** Real directories from MCP roots (file:// URIs only; others are ignored). */
export function rootsToDirs(roots: readonly { uri: string }[]): string[] {
  const out: string[] = [];
  for (const root of roots) {
    if (!root.uri.startsWith("file://")) continue;
    try {
      out.push(path.resolve(fileURLToPath(root.uri)));
    } catch {
      // a malformed root grants nothing
    }
  }
  return out;
}
