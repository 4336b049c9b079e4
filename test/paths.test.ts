import { execFileSync } from "node:child_process";
import { mkdir, mkdtemp, rm, symlink, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import path from "node:path";
import { pathToFileURL } from "node:url";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { createConfig } from "../src/config.js";
import { SegError } from "../src/errors.js";
import {
  ensureOutputDir,
  isInside,
  OUTPUT_URI_PREFIX,
  outputUri,
  parseImageRef,
  readAllowedFile,
  readOutputFile,
  rootsToDirs,
} from "../src/paths.js";

let root: string;
let allowed: string;
let outside: string;

async function rejectsWith(promise: Promise<unknown>, code: string, message: RegExp): Promise<void> {
  const error = await promise.then(
    () => undefined,
    (e: unknown) => e,
  );
  expect(error).toBeInstanceOf(SegError);
  expect((error as SegError).code).toBe(code);
  expect((error as SegError).message).toMatch(message);
}

function throwsWith(fn: () => unknown, code: string, message: RegExp): void {
  let error: unknown;
  try {
    fn();
  } catch (e) {
    error = e;
  }
  expect(error).toBeInstanceOf(SegError);
  expect((error as SegError).code).toBe(code);
  expect((error as SegError).message).toMatch(message);
}

beforeAll(async () => {
  root = await mkdtemp(path.join(tmpdir(), "seg-paths-"));
  allowed = path.join(root, "allowed");
  outside = path.join(root, "outside");
  await mkdir(path.join(allowed, "sub"), { recursive: true });
  await mkdir(outside, { recursive: true });
  await writeFile(path.join(allowed, "a.png"), "x");
  await writeFile(path.join(allowed, "empty.png"), "");
  await writeFile(path.join(outside, "secret.png"), "x");
  await symlink(path.join(outside, "secret.png"), path.join(allowed, "escape.png"));
  await symlink(path.join(allowed, "a.png"), path.join(allowed, "sub", "inside-link.png"));
});

afterAll(async () => {
  await rm(root, { recursive: true, force: true });
});

describe("parseImageRef", () => {
  const opts = { cwd: "/work/dir", maxDataUriBytes: 16 };

  it("resolves relative paths against cwd and keeps absolute ones", () => {
    expect(parseImageRef("img/a.png", opts)).toEqual({ kind: "path", path: "/work/dir/img/a.png" });
    expect(parseImageRef("/x/b.jpg", opts)).toEqual({ kind: "path", path: "/x/b.jpg" });
  });

  it("accepts file:// URIs", () => {
    expect(parseImageRef(pathToFileURL("/x/c d.png").href, opts)).toEqual({
      kind: "path",
      path: "/x/c d.png",
    });
  });

  it("decodes base64 data: URIs", () => {
    const ref = parseImageRef(`data:image/png;base64,${Buffer.from("hello").toString("base64")}`, opts);
    expect(ref.kind).toBe("data");
    expect(ref.kind === "data" && Buffer.from(ref.bytes).toString()).toBe("hello");
  });

  it("refuses data: URIs over the size limit before decoding", () => {
    const big = `data:image/png;base64,${Buffer.alloc(64).toString("base64")}`;
    throwsWith(
      () => parseImageRef(big, opts),
      "IMAGE_TOO_LARGE",
      /holds 64 bytes, over the limit of 16.*pass its path/,
    );
  });

  it("refuses non-base64 data: URIs and bad base64", () => {
    throwsWith(() => parseImageRef("data:image/png,abc", opts), "INVALID_INPUT", /must be base64-encoded/);
    throwsWith(() => parseImageRef("data:image/png;base64,ab$c", opts), "INVALID_INPUT", /not valid base64/);
  });

  it("never fetches http(s) URLs", () => {
    throwsWith(
      () => parseImageRef("https://example.com/cat.png", opts),
      "INVALID_INPUT",
      /https URL; this server never fetches from the network: download the image/,
    );
    throwsWith(() => parseImageRef("http://example.com/cat.png", opts), "INVALID_INPUT", /never fetches/);
  });

  it("refuses other schemes and empty strings", () => {
    throwsWith(
      () => parseImageRef("ftp://host/x.png", opts),
      "INVALID_INPUT",
      /unsupported URI scheme "ftp:"/,
    );
    throwsWith(() => parseImageRef("   ", opts), "INVALID_INPUT", /image is empty/);
  });
});

describe("readAllowedFile", () => {
  const limits = { maxBytes: 1000 };

  it("returns the real path of a file inside an allowed directory", async () => {
    const file = await readAllowedFile(path.join(allowed, "a.png"), [allowed], limits);
    expect(file.bytes.toString()).toBe("x");
    expect(isInside(file.path, allowed) || file.path.endsWith("/allowed/a.png")).toBe(true);
  });

  it("follows symlinks that stay inside", async () => {
    const file = await readAllowedFile(path.join(allowed, "sub", "inside-link.png"), [allowed], limits);
    expect(file.path.endsWith(`${path.sep}a.png`)).toBe(true);
  });

  it("refuses paths outside the allowed directories, without touching them", async () => {
    await rejectsWith(
      readAllowedFile(path.join(outside, "secret.png"), [allowed], limits),
      "PATH_NOT_ALLOWED",
      /outside the allowed directories.*--allow-dir/,
    );
    // a missing file outside is refused the same way: existence is not revealed
    await rejectsWith(
      readAllowedFile(path.join(outside, "nope.png"), [allowed], limits),
      "PATH_NOT_ALLOWED",
      /outside/,
    );
    await rejectsWith(
      readAllowedFile(path.join(allowed, "..", "outside", "secret.png"), [allowed], limits),
      "PATH_NOT_ALLOWED",
      /outside/,
    );
  });

  it("with no allowed directory, says how to allow one", async () => {
    await rejectsWith(
      readAllowedFile(path.join(allowed, "a.png"), [], limits),
      "PATH_NOT_ALLOWED",
      /no input directory is allowed.*--allow-dir <dir>/,
    );
  });

  it("refuses symlinks that escape", async () => {
    await rejectsWith(
      readAllowedFile(path.join(allowed, "escape.png"), [allowed], limits),
      "PATH_NOT_ALLOWED",
      /resolves to .*secret\.png", outside the allowed directories.*symbolic links/,
    );
  });

  it("reports missing files, directories, empty and oversized files", async () => {
    await rejectsWith(
      readAllowedFile(path.join(allowed, "missing.png"), [allowed], limits),
      "IMAGE_NOT_FOUND",
      /does not exist/,
    );
    await rejectsWith(
      readAllowedFile(path.join(allowed, "sub"), [allowed], limits),
      "INVALID_INPUT",
      /is a directory/,
    );
    await rejectsWith(
      readAllowedFile(path.join(allowed, "empty.png"), [allowed], limits),
      "IMAGE_DECODE_FAILED",
      /is empty \(0 bytes\)/,
    );
    await rejectsWith(
      readAllowedFile(path.join(allowed, "a.png"), [allowed], { maxBytes: 0.5 }),
      "IMAGE_TOO_LARGE",
      /over the limit.*--max-image-bytes/,
    );
  });

  it("refuses a FIFO or a device at once, without blocking on it", async () => {
    const fifo = path.join(allowed, "pipe.png");
    execFileSync("mkfifo", [fifo]);
    await rejectsWith(readAllowedFile(fifo, [allowed], limits), "INVALID_INPUT", /not a regular file/);
    await rejectsWith(readAllowedFile("/dev/zero", ["/dev"], limits), "INVALID_INPUT", /not a regular file/);
  });

  it("turns system errors into sentences that name the file", async () => {
    await rejectsWith(
      readAllowedFile(path.join(allowed, `${"n".repeat(5000)}.png`), [allowed], limits),
      "IMAGE_NOT_FOUND",
      /too long a name/,
    );
    await rejectsWith(
      readAllowedFile(path.join(allowed, "a.png", "inside-a-file.png"), [allowed], limits),
      "IMAGE_NOT_FOUND",
      /a part of the path is not a folder/,
    );
  });
});

describe("output files", () => {
  it("creates the output directory and maps its files to URIs and back", async () => {
    const out = await ensureOutputDir(path.join(root, "out", "nested"));
    const file = path.join(out, "mask-1.png");
    await writeFile(file, "png");
    const uri = outputUri(out, file);
    expect(uri).toBe(`${OUTPUT_URI_PREFIX}mask-1.png`);
    expect((await readOutputFile(out, uri, 1000)).path).toBe(file);
    expect((await readOutputFile(out, "mask-1.png", 1000)).bytes.toString()).toBe("png");
  });

  it("refuses names that leave the output directory or are not PNGs", async () => {
    const out = await ensureOutputDir(path.join(root, "out2"));
    await rejectsWith(
      readOutputFile(out, `${OUTPUT_URI_PREFIX}..%2Foutside%2Fsecret.png`, 1000),
      "INVALID_INPUT",
      /does not name a mask file/,
    );
    await rejectsWith(
      readOutputFile(out, `${OUTPUT_URI_PREFIX}notes.txt`, 1000),
      "INVALID_INPUT",
      /does not name a mask file/,
    );
    await rejectsWith(
      readOutputFile(out, `${OUTPUT_URI_PREFIX}gone.png`, 1000),
      "IMAGE_NOT_FOUND",
      /does not exist/,
    );
    await symlink(path.join(outside, "secret.png"), path.join(out, "link.png"));
    await rejectsWith(
      readOutputFile(out, `${OUTPUT_URI_PREFIX}link.png`, 1000),
      "PATH_NOT_ALLOWED",
      /outside the output directory/,
    );
    expect(() => outputUri(out, path.join(outside, "secret.png"))).toThrow(/outside the output directory/);
  });
});

it("a server started in the filesystem root allows no directory by default", () => {
  expect(createConfig({ cwd: "/" }).allowDirs).toEqual([]);
  expect(createConfig({ cwd: "/" }).outDir).toBe(path.join(tmpdir(), "qwen3-vl-seg-out"));
  expect(createConfig({ cwd: "/srv/images" }).outDir).toBe("/srv/images/qwen3-vl-seg-out");
  expect(createConfig({ cwd: "/srv/images" }).allowDirs).toEqual(["/srv/images"]);
  expect(createConfig({ cwd: "/", allowDirs: ["pics"] }).allowDirs).toEqual(["/pics"]);
});

it("rootsToDirs keeps file:// roots only", () => {
  expect(rootsToDirs([{ uri: "file:///home/u/project" }, { uri: "https://example.com" }])).toEqual([
    "/home/u/project",
  ]);
});
