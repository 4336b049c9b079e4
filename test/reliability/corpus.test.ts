/**
 * The hostile-input corpus: over two hundred malformed, malicious and borderline messages, sent raw
 * to the built server over stdio and over Streamable HTTP, each with the outcome it must get. Every
 * refusal must be a one-line sentence starting with its code (a tool error) or a JSON-RPC error with a
 * message (a protocol error): no stack, no zod dump, no silence, no crash, no hang. Afterwards the
 * server still answers, and nothing was written outside --out (onnxruntime's telemetry included).
 */

import { execFileSync } from "node:child_process";
import { existsSync } from "node:fs";
import { mkdir, mkdtemp, readdir, rm, symlink, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import path from "node:path";
import { crc32, deflateSync } from "node:zlib";
import sharp from "sharp";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import {
  bin,
  type Era,
  httpConnection,
  type RawConnection,
  type RpcReply,
  repo,
  stdioConnection,
} from "./harness.js";

type Expect = { rpc: number } | { tool: string } | { ok: true };
interface Case {
  name: string;
  /** A raw line/body with this id in it (null: the reply carries id null). */
  raw?: { text: string; id: string | number | null };
  tool?: string;
  args?: unknown;
  expect: Expect;
}

let root: string;
let work: string;
let outside: string;
let home: string;
let temp: string;
let out: string;

/** One PNG chunk: length, type, data, CRC. */
function pngChunk(type: string, data: Buffer): Buffer {
  const body = Buffer.concat([Buffer.from(type), data]);
  const out = Buffer.alloc(4 + body.length + 4);
  out.writeUInt32BE(data.length, 0);
  body.copy(out, 4);
  out.writeUInt32BE(crc32(body), 4 + body.length);
  return out;
}

/** A well-formed PNG that claims width x height with a few bytes of data: a decompression bomb. */
function pngBomb(width: number, height: number): Buffer {
  const ihdr = Buffer.alloc(13);
  ihdr.writeUInt32BE(width, 0);
  ihdr.writeUInt32BE(height, 4);
  ihdr.set([1, 0, 0, 0, 0], 8); // 1-bit greyscale
  return Buffer.concat([
    Buffer.from([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a]),
    pngChunk("IHDR", ihdr),
    pngChunk("IDAT", deflateSync(Buffer.alloc(1))),
    pngChunk("IEND", Buffer.alloc(0)),
  ]);
}

beforeAll(async () => {
  if (!existsSync(bin))
    execFileSync("npx", ["tsc", "-p", "tsconfig.build.json"], { cwd: repo, stdio: "inherit" });
  root = await mkdtemp(path.join(tmpdir(), "qvs-corpus-"));
  work = path.join(root, "work");
  outside = path.join(root, "outside");
  home = path.join(root, "home");
  temp = path.join(root, "tmp");
  out = path.join(root, "out");
  for (const d of [work, outside, home, temp, path.join(work, "folder.png")])
    await mkdir(d, { recursive: true });
  const png = (w: number, h: number, colour = "#c33") =>
    sharp({ create: { width: w, height: h, channels: 3, background: colour } })
      .png()
      .toBuffer();
  const cat = await png(64, 48);
  await writeFile(path.join(work, "cat.png"), cat);
  await writeFile(path.join(work, "big.png"), await png(400, 300));
  await writeFile(path.join(work, "bomb.png"), pngBomb(100_000, 100_000));
  await writeFile(path.join(work, "corrupt.png"), Buffer.concat([cat.subarray(0, 8), Buffer.alloc(64, 7)]));
  await writeFile(path.join(work, "cut.png"), cat.subarray(0, 40));
  const jpg = await sharp({ create: { width: 64, height: 48, channels: 3, background: "#3c3" } })
    .jpeg()
    .toBuffer();
  await writeFile(path.join(work, "cut.jpg"), jpg.subarray(0, 120));
  await writeFile(path.join(work, "notes.png"), "just some text, not an image");
  await writeFile(
    path.join(work, "drawing.svg"),
    '<svg xmlns="http://www.w3.org/2000/svg" width="9" height="9"/>',
  );
  await writeFile(path.join(work, "fake.bmp"), Buffer.concat([Buffer.from("BM"), Buffer.alloc(60, 1)]));
  await writeFile(path.join(work, "empty.png"), "");
  execFileSync("mkfifo", [path.join(work, "pipe.png")]);
  await symlink(path.join(work, "loop-b.png"), path.join(work, "loop-a.png"));
  await symlink(path.join(work, "loop-a.png"), path.join(work, "loop-b.png"));
  await writeFile(path.join(outside, "secret.png"), cat);
  await symlink(path.join(outside, "secret.png"), path.join(work, "escape.png"));
  const mask = Buffer.alloc(64 * 48);
  for (let y = 10; y < 30; y++) mask.fill(255, y * 64 + 10, y * 64 + 40);
  await sharp(mask, { raw: { width: 64, height: 48, channels: 1 } })
    .png()
    .toFile(path.join(work, "mask-ok.png"));
  await sharp(Buffer.alloc(64 * 48), { raw: { width: 64, height: 48, channels: 1 } })
    .png()
    .toFile(path.join(work, "mask-empty.png"));
  await sharp(Buffer.alloc(32 * 32, 255), { raw: { width: 32, height: 32, channels: 1 } })
    .png()
    .toFile(path.join(work, "mask-small.png"));
  await sharp(mask, { raw: { width: 64, height: 48, channels: 1 } })
    .png()
    .toFile(path.join(outside, "mask.png"));
});

afterAll(async () => {
  await rm(root, { recursive: true, force: true });
});

const ok = { ok: true } as const;
const tool = (code: string): Expect => ({ tool: code });
const rpc = (code: number): Expect => ({ rpc: code });

/** Image references and what every tool must answer for them. */
function imageCases(): [string, unknown, Expect][] {
  return [
    ["missing file", "missing.png", tool("IMAGE_NOT_FOUND")],
    ["empty string", "", tool("INVALID_INPUT")],
    ["blank string", "   ", tool("INVALID_INPUT")],
    ["NUL in the path", "cat\u0000.png", tool("INVALID_INPUT")],
    ["5,000-character name", `${"n".repeat(5000)}.png`, tool("IMAGE_NOT_FOUND")],
    ["symlink loop", "loop-a.png", tool("IMAGE_NOT_FOUND")],
    ["a directory", "folder.png", tool("INVALID_INPUT")],
    ["a FIFO", "pipe.png", tool("INVALID_INPUT")],
    ["a device", "/dev/zero", tool("PATH_NOT_ALLOWED")],
    ["procfs", "/proc/self/environ", tool("PATH_NOT_ALLOWED")],
    ["outside the allowed folder", "OUTSIDE/secret.png", tool("PATH_NOT_ALLOWED")],
    ["symlink leading out", "escape.png", tool("PATH_NOT_ALLOWED")],
    ["dot-dot traversal", "../outside/secret.png", tool("PATH_NOT_ALLOWED")],
    ["file URI outside", "file:///etc/passwd", tool("PATH_NOT_ALLOWED")],
    ["file URI with a host", "file://somehost/x.png", tool("INVALID_INPUT")],
    ["http URL", "http://example.com/a.png", tool("INVALID_INPUT")],
    ["https URL", "https://example.com/a.png", tool("INVALID_INPUT")],
    ["ftp URL", "ftp://example.com/a.png", tool("INVALID_INPUT")],
    ["data URI not base64", "data:image/png,abc", tool("INVALID_INPUT")],
    ["data URI bad base64", "data:image/png;base64,!!!!", tool("INVALID_INPUT")],
    ["data URI empty", "data:image/png;base64,", tool("IMAGE_DECODE_FAILED")],
    ["data URI over the limit", `data:image/png;base64,${"A".repeat(100_000)}`, tool("IMAGE_TOO_LARGE")],
    [
      "data URI of text",
      `data:image/png;base64,${Buffer.from("hello world").toString("base64")}`,
      tool("UNSUPPORTED_FORMAT"),
    ],
    ["SVG", "drawing.svg", tool("UNSUPPORTED_FORMAT")],
    ["text named .png", "notes.png", tool("UNSUPPORTED_FORMAT")],
    ["BMP", "fake.bmp", tool("UNSUPPORTED_FORMAT")],
    ["corrupt PNG", "corrupt.png", tool("IMAGE_DECODE_FAILED")],
    ["truncated PNG header", "cut.png", tool("IMAGE_DECODE_FAILED")],
    ["truncated JPEG", "cut.jpg", tool("IMAGE_DECODE_FAILED")],
    ["over the pixel limit", "big.png", tool("IMAGE_TOO_LARGE")],
    ["pixel bomb header", "bomb.png", tool("IMAGE_TOO_LARGE")],
    ["zero bytes", "empty.png", tool("IMAGE_DECODE_FAILED")],
    ["a number", 42, tool("INVALID_INPUT")],
    ["null", null, tool("INVALID_INPUT")],
    ["an array", ["cat.png"], tool("INVALID_INPUT")],
    ["an object", {}, tool("INVALID_INPUT")],
  ];
}

const TOOLS: Record<string, Record<string, unknown>> = {
  ground: { expression: "the cat" },
  segment: { box: [4, 4, 40, 30] },
  describe_region: { box: [4, 4, 40, 30] },
};

function cases(era: Era): Case[] {
  const list: Case[] = [];
  const outsidePath = (v: unknown) => (typeof v === "string" ? v.replace("OUTSIDE", outside) : v);
  for (const [name, base] of Object.entries(TOOLS)) {
    for (const [what, image, expect] of imageCases()) {
      list.push({
        name: `${name}: image ${what}`,
        tool: name,
        args: { ...base, image: outsidePath(image) },
        expect,
      });
    }
    for (const [what, args] of [
      ["arguments an array", []],
      ["arguments a string", "cat.png"],
      ["arguments null", null],
      ["arguments a number", 7],
      ["arguments true", true],
    ] as [string, unknown][]) {
      list.push({ name: `${name}: ${what}`, tool: name, args, expect: rpc(-32602) });
    }
    list.push({ name: `${name}: no arguments`, tool: name, expect: tool("INVALID_INPUT") });
    const many = Object.fromEntries(Array.from({ length: 10_000 }, (_, i) => [`k${i}`, i]));
    for (const [what, extra] of [
      ["__proto__ key", JSON.parse('{"__proto__": {"polluted": true}}')],
      ["constructor key", { constructor: "x" }],
      ["prototype key", { prototype: 1 }],
      ["an unknown field", { threshold: 0.5 }],
      ["10,000 unknown fields", many],
    ] as [string, Record<string, unknown>][]) {
      list.push({
        name: `${name}: ${what}`,
        tool: name,
        args: { ...base, image: "cat.png", ...extra },
        expect: tool("INVALID_INPUT"),
      });
    }
  }
  for (const name of ["segment", "describe_region"]) {
    for (const [what, box] of [
      ["three numbers", [1, 2, 3]],
      ["five numbers", [1, 2, 3, 4, 5]],
      ["a string coordinate", ["1", 2, 30, 40]],
      ["a null coordinate", [null, 2, 30, 40]],
      ["inverted", [40, 30, 4, 4]],
      ["outside the image", [0, 0, 64.5, 10]],
      ["negative", [-1, 0, 10, 10]],
      ["huge", [0, 0, 1e308, 10]],
      ["normalised", [0.1, 0.1, 0.9, 0.9]],
      ["normalised corners", [0, 0, 1, 1]],
      ["sub-pixel", [0, 0, 1e-9, 1e-9]],
      ["half a pixel wide", [5, 5, 5.5, 20]],
      ["a string", "4,4,40,30"],
      ["an object", { x1: 4 }],
    ] as [string, unknown][]) {
      list.push({
        name: `${name}: box ${what}`,
        tool: name,
        args: { image: "cat.png", box },
        expect: tool("INVALID_INPUT"),
      });
    }
  }
  for (const name of ["ground", "segment"]) {
    for (const [what, expression] of [
      ["empty", ""],
      ["blank", "   "],
      ["1,001 characters", "x".repeat(1001)],
      ["a number", 5],
      ["null", null],
    ] as [string, unknown][]) {
      list.push({
        name: `${name}: expression ${what}`,
        tool: name,
        args: { image: "cat.png", expression },
        expect: tool("INVALID_INPUT"),
      });
    }
    for (const [what, n] of [
      ["0", 0],
      ["-1", -1],
      ["1.5", 1.5],
      ["101", 101],
      ["a string", "3"],
      ["null", null],
    ] as [string, unknown][]) {
      list.push({
        name: `${name}: max_instances ${what}`,
        tool: name,
        args: { image: "cat.png", expression: "x", max_instances: n },
        expect: tool("INVALID_INPUT"),
      });
    }
  }
  list.push({
    name: "segment: neither expression nor box",
    tool: "segment",
    args: { image: "cat.png" },
    expect: tool("INVALID_INPUT"),
  });
  for (const key of ["rle", "overlay", "preview"]) {
    list.push({
      name: `segment: ${key} not a boolean`,
      tool: "segment",
      args: { image: "cat.png", box: [4, 4, 40, 30], [key]: "yes" },
      expect: tool("INVALID_INPUT"),
    });
  }
  for (const [what, mask, expect] of [
    ["a data: URI", "data:image/png;base64,AAAA", tool("INVALID_INPUT")],
    ["missing", "nope.png", tool("IMAGE_NOT_FOUND")],
    ["another size", "mask-small.png", tool("INVALID_INPUT")],
    ["empty", "mask-empty.png", tool("INVALID_INPUT")],
    ["outside", `${outside}/mask.png`, tool("PATH_NOT_ALLOWED")],
    ["URI traversal", "qwen3-vl-seg://masks/..%2F..%2Fetc%2Fpasswd", tool("INVALID_INPUT")],
    ["URI not a PNG", "qwen3-vl-seg://masks/notes.txt", tool("INVALID_INPUT")],
    ["URI of nothing", "qwen3-vl-seg://masks/gone.png", tool("IMAGE_NOT_FOUND")],
    ["a number", 5, tool("INVALID_INPUT")],
    ["a good one", "mask-ok.png", ok],
  ] as [string, unknown, Expect][]) {
    list.push({
      name: `describe_region: mask ${what}`,
      tool: "describe_region",
      args: { image: "cat.png", mask },
      expect,
    });
  }
  list.push(
    {
      name: "ground: a good call",
      tool: "ground",
      args: { image: "cat.png", expression: "the cat", max_instances: 1 },
      expect: ok,
    },
    {
      name: "segment: a good call",
      tool: "segment",
      args: { image: "cat.png", box: [4, 4, 40, 30] },
      expect: ok,
    },
    {
      name: "describe_region: a good call",
      tool: "describe_region",
      args: { image: "cat.png", box: [4, 4, 40, 30] },
      expect: ok,
    },
  );
  let n = 1000;
  const raw = (name: string, text: string, id: string | number | null, expect: Expect) =>
    list.push({ name, raw: { text, id }, expect });
  const req = (body: Record<string, unknown>) => JSON.stringify({ jsonrpc: "2.0", id: ++n, ...body });
  raw("invalid JSON", "{", null, rpc(-32700));
  raw("half an object", '{"jsonrpc": "2.0", "id": 1, "method": ', null, rpc(-32700));
  raw("a batch", "[]", null, rpc(-32600));
  raw(
    "a batch of a ping",
    `[${JSON.stringify({ jsonrpc: "2.0", id: 5, method: "ping" })}]`,
    null,
    rpc(-32600),
  );
  raw("a string", '"ping"', null, rpc(-32600));
  raw("null", "null", null, rpc(-32600));
  raw("a number", "42", null, rpc(-32600));
  raw("jsonrpc 1.0", JSON.stringify({ jsonrpc: "1.0", id: ++n, method: "ping" }), n, rpc(-32600));
  raw("no method", JSON.stringify({ jsonrpc: "2.0", id: ++n }), n, rpc(-32600));
  raw("method a number", JSON.stringify({ jsonrpc: "2.0", id: ++n, method: 42 }), n, rpc(-32600));
  raw("params a string", req({ method: "ping", params: "x" }), n, rpc(-32602));
  raw("params an array", req({ method: "tools/list", params: [1] }), n, rpc(-32602));
  raw("an object id", JSON.stringify({ jsonrpc: "2.0", id: {}, method: "ping" }), null, rpc(-32600));
  raw("an unknown method", req({ method: "tools/paint" }), n, rpc(-32601));
  // 2026-07-28 removed ping: an unknown method there.
  const pong = era === "legacy" ? ok : rpc(-32601);
  raw("a byte-order mark", `\uFEFF${req({ method: "ping" })}`, n, pong);
  raw("tools/call without a name", req({ method: "tools/call", params: { arguments: {} } }), n, rpc(-32602));
  raw(
    "tools/call of an unknown tool",
    req({ method: "tools/call", params: { name: "paint", arguments: {} } }),
    n,
    rpc(-32602),
  );
  raw("tools/call with a number name", req({ method: "tools/call", params: { name: 42 } }), n, rpc(-32602));
  raw("ping", req({ method: "ping" }), n, pong);
  raw("tools/list", req({ method: "tools/list" }), n, ok);
  return list;
}

/** Send one case and check its outcome; returns a failure description or undefined. */
async function run(conn: RawConnection, c: Case, id: number): Promise<string | undefined> {
  const text =
    c.raw?.text ??
    JSON.stringify({
      jsonrpc: "2.0",
      id,
      method: "tools/call",
      params: { name: c.tool, ...(c.args === undefined ? {} : { arguments: c.args }) },
    });
  const replyId = c.raw ? c.raw.id : id;
  const reply: RpcReply | undefined = await conn.send(text, replyId);
  if (!reply) return "no reply";
  const e = c.expect;
  if ("rpc" in e) {
    if (reply.error?.code !== e.rpc)
      return `expected JSON-RPC error ${e.rpc}, got ${JSON.stringify(reply).slice(0, 300)}`;
    const m = reply.error.message;
    if (m.length < 10 || m.includes("\n") || /"code":|ZodError|\n\s+at /.test(m))
      return `not a sentence: ${m.slice(0, 300)}`;
    return undefined;
  }
  if (reply.error) return `JSON-RPC error ${reply.error.code}: ${reply.error.message.slice(0, 300)}`;
  const result = reply.result as
    | { isError?: boolean; content?: { type: string; text?: string }[] }
    | undefined;
  const first = result?.content?.[0]?.text ?? "";
  if ("ok" in e) return result?.isError ? `expected success, got ${first.slice(0, 300)}` : undefined;
  if (!result?.isError) return `expected ${e.tool}, got a success`;
  if (!first.startsWith(`${e.tool}: `)) return `expected ${e.tool}, got: ${first.slice(0, 300)}`;
  if (first.includes("\n") || first.length > 1500 || /ZodError|\n\s+at |"expected":/.test(first)) {
    return `not a one-line sentence (${first.length} chars): ${first.slice(0, 300)}`;
  }
  return undefined;
}

describe.each([
  ["stdio", "legacy", stdioConnection],
  ["Streamable HTTP", "legacy", httpConnection],
  ["stdio", "modern", stdioConnection],
  ["Streamable HTTP", "modern", httpConnection],
] as const)("the hostile-input corpus over %s, %s revision", (_, era, connect) => {
  it("answers every case as it must, stays up, and writes nothing outside --out", async () => {
    const all = cases(era);
    expect(all.length).toBeGreaterThanOrEqual(200);
    const env = { ...process.env, HOME: home, TMPDIR: temp, XDG_CACHE_HOME: path.join(home, ".cache") };
    const args = ["--pack", path.join(repo, "models", "tiny-random"), "--ep", "cpu", "--out", out];
    args.push("--allow-dir", work, "--max-input-pixels", "100000", "--max-data-uri-bytes", "65536");
    args.push("--log-level", "info");
    const conn = await connect(args, work, env, era);
    const failures: string[] = [];
    try {
      for (const [i, c] of all.entries()) {
        const failure = await run(conn, c, i + 1);
        if (failure) failures.push(`${c.name}: ${failure}`);
      }
      expect(failures).toEqual([]);
      expect(conn.alive()).toBe(true);
      const after = await conn.send(
        JSON.stringify({ jsonrpc: "2.0", id: "last", method: "tools/list" }),
        "last",
      );
      expect((after?.result?.tools as unknown[] | undefined)?.length).toBe(3);
    } finally {
      await conn.close();
    }
    // Nothing outside --out: no telemetry store in HOME, no debug log or stray file in TMPDIR or /tmp.
    expect(await readdir(home)).toEqual([]);
    expect(await readdir(temp)).toEqual([]);
    expect(existsSync(`/tmp/mat-debug-${conn.pid}.log`)).toBe(false);
  });
});

it("over stdio, a message over the line limit is skipped and answered; the connection stays up", async () => {
  const args = ["--pack", path.join(repo, "models", "tiny-random"), "--ep", "cpu", "--out", out];
  args.push("--allow-dir", work, "--max-data-uri-bytes", "65536", "--log-level", "warn");
  const conn = await stdioConnection(args, work, process.env);
  try {
    const huge = JSON.stringify({
      jsonrpc: "2.0",
      id: 7,
      method: "ping",
      params: { pad: "x".repeat(2_000_000) },
    });
    const reply = await conn.send(huge, null);
    expect(reply?.error?.code).toBe(-32600);
    expect(reply?.error?.message).toMatch(/over \d+ bytes was skipped: pass large images as file paths/);
    expect((await conn.send(JSON.stringify({ jsonrpc: "2.0", id: 8, method: "ping" }), 8))?.result).toEqual(
      {},
    );
  } finally {
    await conn.close();
  }
});
