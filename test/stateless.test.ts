/**
 * Streamable HTTP in the stateless mode (the default): every POST served on its own, so replicas
 * need no affinity; progress and cancellation still work, for 2025-11-25 clients (initialize first)
 * and 2026-07-28 clients (stateless by design) alike; /healthz readiness; and the output folder's
 * sweep is safe when several processes (on other hosts too) share it.
 */

import { spawn } from "node:child_process";
import { mkdir, mkdtemp, readdir, rm, utimes, writeFile } from "node:fs/promises";
import { request } from "node:http";
import { tmpdir } from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";
import sharp from "sharp";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { runCli } from "../src/cli.js";
import { createConfig } from "../src/config.js";
import { SegError } from "../src/errors.js";
import { type HttpHandle, serveHttp } from "../src/http.js";
import { silentLogger } from "../src/logger.js";
import { sweepOutputDir, TEMP_MAX_AGE_MS } from "../src/retention.js";
import { processPidSpace } from "../src/runtime/output.js";
import type { PackInfo } from "../src/runtime/types.js";
import { segmentTool } from "../src/tools/segment.js";
import { connectClient, ERAS, type Era, httpTransport, REVISION } from "./helpers/clients.js";
import { FakeEngine } from "./helpers/fake-engine.js";

const TOKEN = "stateless-token-0123456789";
const AUTH = { authorization: `Bearer ${TOKEN}` };
let root: string;

const INIT = {
  jsonrpc: "2.0",
  id: 1,
  method: "initialize",
  params: { protocolVersion: "2025-06-18", capabilities: {}, clientInfo: { name: "raw", version: "1" } },
};

/** What a 2026-07-28 request carries: its revision and client in `_meta`, and the same in headers. */
const MODERN_META = {
  "io.modelcontextprotocol/protocolVersion": "2026-07-28",
  "io.modelcontextprotocol/clientInfo": { name: "raw", version: "1" },
  "io.modelcontextprotocol/clientCapabilities": {},
};

/** A raw request in the revision of `era`: 2025 (no envelope) or 2026-07-28 (envelope, headers). */
function rawRequest(era: Era, id: number, method: string, params: Record<string, unknown> = {}) {
  if (era === "legacy") {
    return {
      body: { jsonrpc: "2.0", id, method, params },
      headers: { "mcp-protocol-version": "2025-06-18" },
    };
  }
  const name = typeof params.name === "string" ? { "mcp-name": params.name } : {};
  return {
    body: { jsonrpc: "2.0", id, method, params: { ...params, _meta: MODERN_META } },
    headers: { "mcp-protocol-version": "2026-07-28", "mcp-method": method, ...name },
  };
}

function post(url: string, body: unknown, headers: Record<string, string> = AUTH, signal?: AbortSignal) {
  return fetch(url, {
    method: "POST",
    headers: {
      "content-type": "application/json",
      accept: "application/json, text/event-stream",
      ...headers,
    },
    body: JSON.stringify(body),
    ...(signal ? { signal } : {}),
  });
}

/** The last JSON-RPC message of an SSE (or JSON) response body. */
async function reply(res: Response): Promise<{ result?: Record<string, unknown>; error?: unknown }> {
  const text = await res.text();
  if (!(res.headers.get("content-type") ?? "").includes("text/event-stream")) return JSON.parse(text);
  const data = text
    .split("\n")
    .filter((l) => l.startsWith("data:"))
    .map((l) => l.slice(5).trim());
  return JSON.parse(data.at(-1) ?? "{}");
}

async function until(check: () => boolean, what: string, ms = 10_000): Promise<void> {
  const end = Date.now() + ms;
  while (!check()) {
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

async function start(engine: FakeEngine, http: { token?: string } = { token: TOKEN }): Promise<HttpHandle> {
  const config = createConfig({
    cwd: root,
    outDir: path.join(root, "out"),
    logLevel: "silent",
    http: { host: "127.0.0.1", port: 0, ...http },
  });
  expect(config.http?.mode).toBe("stateless"); // the default
  return serveHttp(config, engine, silentLogger);
}

beforeAll(async () => {
  root = await mkdtemp(path.join(tmpdir(), "seg-stateless-"));
  await sharp({ create: { width: 40, height: 30, channels: 3, background: "#369" } })
    .png()
    .toFile(path.join(root, "img.png"));
});
afterAll(async () => {
  await rm(root, { recursive: true, force: true });
});

describe("stateless Streamable HTTP", () => {
  const engine = new FakeEngine({ delayMs: 50 });
  let handle: HttpHandle;
  beforeAll(async () => {
    handle = await start(engine);
  });
  afterAll(async () => {
    await handle?.close();
  });

  it.each(ERAS)(
    "serves a %s SDK client, with progress on the call's own stream; DELETE and GET are 405",
    async (era) => {
      const transport = httpTransport(era, handle.url, AUTH);
      const client = await connectClient(transport);
      expect(client.protocolVersion()).toBe(REVISION[era]);
      // 2025: the id names the client only (for cancellation); no server state hangs on it.
      // 2026-07-28 has no session id at all.
      if (era === "legacy") expect(transport.sessionId()).toMatch(/^[0-9a-f-]{36}$/);
      else expect(transport.sessionId()).toBeUndefined();
      expect((await client.listTools()).tools.map((t) => t.name).sort()).toEqual([
        "describe_region",
        "ground",
        "segment",
      ]);
      const progress: number[] = [];
      const result = await client.callTool(
        "segment",
        { image: "img.png", box: [5, 5, 30, 20] },
        { onprogress: (p) => progress.push(p.progress) },
      );
      expect(result.isError).toBeFalsy();
      const out = segmentTool.output.parse(result.structuredContent);
      expect(out.instances).toHaveLength(1);
      expect(progress.length).toBeGreaterThan(2);
      expect(progress).toEqual([...progress].sort((a, b) => a - b));
      const read = await client.readResource(out.instances[0]?.mask.uri ?? "");
      expect(read.contents[0]?.mimeType).toBe("image/png");
      await transport.terminateSession(); // DELETE: 405, which the SDK takes as "not supported"
      await client.close();

      for (const method of ["GET", "DELETE"]) {
        const res = await fetch(handle.url, { method, headers: { ...AUTH, accept: "text/event-stream" } });
        expect(res.status).toBe(405);
        expect(res.headers.get("allow")).toBe("POST");
      }
    },
  );

  it("answers a call with no initialize before it, and any (or no) session id: no affinity needed", async () => {
    const call = {
      jsonrpc: "2.0",
      id: 7,
      method: "tools/call",
      params: { name: "ground", arguments: { image: "img.png", expression: "the square" } },
    };
    for (const headers of [AUTH, { ...AUTH, "mcp-session-id": "made-up-by-another-replica" }]) {
      const res = await post(handle.url, call, { ...headers, "mcp-protocol-version": "2025-06-18" });
      expect(res.status).toBe(200);
      expect(res.headers.get("mcp-session-id")).toBeNull();
      const body = await reply(res);
      expect((body.result as { structuredContent?: { found?: boolean } }).structuredContent?.found).toBe(
        true,
      );
    }
    const init = await post(handle.url, INIT);
    expect(init.status).toBe(200);
    expect(init.headers.get("mcp-session-id")).toMatch(/^[0-9a-f-]{36}$/);
    await init.text();
  });

  it("keeps the checks: token, Origin, Host, body size", async () => {
    expect((await post(handle.url, INIT, {})).status).toBe(401);
    expect((await fetch(handle.url, { method: "GET" })).status).toBe(401); // not 405: the token first
    expect((await post(handle.url, INIT, { ...AUTH, origin: "http://evil.example" })).status).toBe(403);
    const big = await fetch(handle.url, {
      method: "POST",
      headers: { ...AUTH, "content-type": "application/json", accept: "application/json, text/event-stream" },
      body: "x".repeat(20 * 1024 * 1024),
    });
    expect(big.status).toBe(413);
    expect((await post(handle.url.replace("/mcp", "/other"), INIT)).status).toBe(404);
    // fetch() cannot forge Host; node:http can
    const rebound = await new Promise<number>((resolve, reject) => {
      const port = new URL(handle.url).port;
      const req = request(handle.url, {
        method: "POST",
        headers: { ...AUTH, host: `attacker.example:${port}` },
      });
      req.on("response", (res) => {
        res.resume();
        resolve(res.statusCode ?? 0);
      });
      req.on("error", reject);
      req.end(JSON.stringify(INIT));
    });
    expect(rebound).toBe(403);
  });

  it("a 2026-07-28 request needs no initialize: lists carry ttlMs, results their resultType", async () => {
    const list = rawRequest("modern", 3, "tools/list");
    const listed = await post(handle.url, list.body, { ...AUTH, ...list.headers });
    expect(listed.status).toBe(200);
    expect(listed.headers.get("mcp-session-id")).toBeNull();
    const tools = await reply(listed);
    expect(tools.result).toMatchObject({ resultType: "complete", ttlMs: 300_000, cacheScope: "public" });
    const call = rawRequest("modern", 4, "tools/call", {
      name: "ground",
      arguments: { image: "img.png", expression: "the square" },
    });
    const called = await reply(await post(handle.url, call.body, { ...AUTH, ...call.headers }));
    expect(called.result).toMatchObject({ resultType: "complete", structuredContent: { found: true } });
    // The server names itself on every 2026-07-28 answer.
    expect(called.result?._meta).toMatchObject({
      "io.modelcontextprotocol/serverInfo": { name: "qwen3-vl-seg-mcp" },
    });
    // The gate's own answer (a refused field) has the same shape.
    const bad = rawRequest("modern", 5, "tools/call", {
      name: "ground",
      arguments: JSON.parse('{"image": "img.png", "expression": "x", "__proto__": {}}'),
    });
    const refused = await reply(await post(handle.url, bad.body, { ...AUTH, ...bad.headers }));
    expect(refused.result).toMatchObject({ resultType: "complete", isError: true });
  });

  it.each(ERAS)("cancels a %s call whose client goes away: the engine's signal fires", async (era) => {
    engine.options.delayMs = 5_000;
    try {
      const before = engine.calls.length;
      const abort = new AbortController();
      const call = rawRequest(era, 9, "tools/call", {
        name: "ground",
        arguments: { image: "img.png", expression: "slow" },
      });
      const res = await post(handle.url, call.body, { ...AUTH, ...call.headers }, abort.signal);
      expect(res.status).toBe(200); // the SSE stream is open; the call runs
      await until(() => engine.calls.length > before, "the call to reach the engine");
      const started = Date.now();
      abort.abort();
      await until(() => engine.calls[before]?.signal?.aborted === true, "the engine's signal");
      expect(Date.now() - started).toBeLessThan(4_000);
    } finally {
      engine.options.delayMs = 50;
    }
  });

  // 2025: the SDK client POSTs notifications/cancelled; 2026-07-28: it closes the call's stream.
  it.each(ERAS)("cancels a call the %s SDK client gives up on", async (era) => {
    engine.options.delayMs = 5_000;
    const client = await connectClient(httpTransport(era, handle.url, AUTH));
    try {
      const before = engine.calls.length;
      const abort = new AbortController();
      const call = client.callTool(
        "ground",
        { image: "img.png", expression: "slow" },
        { signal: abort.signal },
      );
      await until(() => engine.calls.length > before, "the call to reach the engine");
      const started = Date.now();
      abort.abort("changed my mind");
      await expect(call).rejects.toThrow();
      await until(() => engine.calls[before]?.signal?.aborted === true, "the engine's signal");
      expect(Date.now() - started).toBeLessThan(4_000);
    } finally {
      engine.options.delayMs = 50;
      await client.close();
    }
  });
});

describe("serve --http flags", () => {
  const bin = path.join(path.dirname(fileURLToPath(import.meta.url)), "..", "dist", "src", "cli.js");
  const io = (err: string[]) => ({
    stdout: () => undefined,
    stderr: (t: string) => void err.push(t),
    cwd: root,
    env: {},
    createEngine: () => new FakeEngine(),
  });

  it("--session-idle without --sessions is refused (the default is stateless)", async () => {
    const err: string[] = [];
    expect(await runCli(["serve", "--http", "127.0.0.1:0", "--session-idle", "5"], io(err))).toBe(2);
    expect(err.join("")).toMatch(/^INVALID_INPUT: --session-idle applies to --sessions only/);
  });

  it.each([
    [[], "stateless"],
    [["--sessions", "--session-idle", "5"], "sessions"],
  ])("serve --http %j says which mode it serves: %s", async (flags, mode) => {
    const child = spawn(process.execPath, [bin, "serve", "--http", "127.0.0.1:0", "--ep", "cpu", ...flags], {
      cwd: root,
      stdio: ["ignore", "ignore", "pipe"],
    });
    try {
      let log = "";
      child.stderr?.on("data", (chunk: Buffer) => {
        log += chunk.toString();
      });
      await until(() => /serving Streamable HTTP at \S+ \(/.test(log), "the serving line", 60_000);
      expect(log).toMatch(
        new RegExp(`serving Streamable HTTP at http://127\\.0\\.0\\.1:\\d+/mcp \\(${mode}\\)`),
      );
    } finally {
      const exited = new Promise((resolve) => child.once("exit", resolve));
      child.kill("SIGTERM");
      await exited;
    }
  });
});

/** FakeEngine whose pack "loads" when the test says so, or fails to. */
class LoadingEngine extends FakeEngine {
  loaded = false;
  fail = false;
  infoCalls = 0;
  override async info(): Promise<PackInfo> {
    this.infoCalls++;
    if (this.fail) throw new SegError("MODEL_LOAD_FAILED", "/secret/path/pack.json is broken");
    if (!this.loaded) await new Promise(() => undefined); // still loading
    return super.info();
  }
}

describe("GET /healthz", () => {
  it("503 while the pack loads, 200 once loaded; no token needed; says nothing but its state", async () => {
    const engine = new LoadingEngine();
    const handle = await start(engine);
    const healthz = handle.url.replace("/mcp", "/healthz");
    try {
      const loading = await fetch(healthz);
      expect(loading.status).toBe(503);
      expect(loading.headers.get("retry-after")).toBe("5");
      expect(await loading.json()).toEqual({ status: "loading" });
      engine.loaded = true;
      const ready = await fetch(healthz);
      expect(ready.status).toBe(200);
      expect(ready.headers.get("cache-control")).toBe("no-store");
      expect(await ready.text()).toBe('{"status":"ready"}');
      const head = await fetch(healthz, { method: "HEAD" });
      expect(head.status).toBe(200);
      expect((await fetch(healthz, { method: "POST" })).status).toBe(405);
      // The Origin check still applies (a browser page cannot probe it).
      expect((await fetch(healthz, { headers: { origin: "http://evil.example" } })).status).toBe(403);
    } finally {
      await handle.close();
    }
  });

  it("503 failed when the pack cannot load, without its reason; retried at most every 30 s", async () => {
    const engine = new LoadingEngine();
    engine.fail = true;
    const handle = await start(engine);
    const healthz = handle.url.replace("/mcp", "/healthz");
    try {
      for (let i = 0; i < 3; i++) {
        const res = await fetch(healthz);
        expect(res.status).toBe(503);
        expect(await res.text()).toBe('{"status":"failed"}');
      }
      expect(engine.infoCalls).toBe(1);
    } finally {
      await handle.close();
    }
  });
});

describe("the output folder shared by replicas", () => {
  it("removes a dead writer's temp file only when its pid is from this pid space, others only when old", async () => {
    const dir = path.join(root, "shared");
    await mkdir(dir);
    const now = Date.now();
    const mask = (i: number) => `mask-${now.toString(36)}-0123456789abcdef-${i}.png`;
    const at = async (name: string, ageMs: number) => {
      await writeFile(path.join(dir, name), "x");
      const t = new Date(now - ageMs);
      await utimes(path.join(dir, name), t, t);
      return name;
    };
    const own = processPidSpace();
    expect(own).toMatch(/^[0-9a-f]{8}$/);
    const other = own === "00000000" ? "11111111" : "00000000";
    const deadHere = await at(`.${mask(0)}.${own}-999999999-0123456789ab.tmp`, 1000);
    const liveHere = await at(`.${mask(1)}.${own}-${process.pid}-0123456789ab.tmp`, 1000);
    // Another host's (or container's) writer: pid 999999999 means nothing here; it may be writing.
    const elsewhere = await at(`.${mask(2)}.${other}-999999999-0123456789ab.tmp`, 1000);
    const elsewhereOld = await at(`.${mask(3)}.${other}-999999999-0123456789ab.tmp`, TEMP_MAX_AGE_MS + 1000);
    const legacy = await at(`.${mask(4)}.999999999-0123456789ab.tmp`, 1000);
    const legacyOld = await at(`.${mask(5)}.999999999-0123456789ab.tmp`, TEMP_MAX_AGE_MS + 1000);
    const policy = { outMaxAgeMs: 86_400_000, outMaxBytes: 1e12, outMinAgeMs: 600_000 };
    await sweepOutputDir(dir, policy, now);
    const left = await readdir(dir);
    expect(left.sort()).toEqual([liveHere, elsewhere, legacy].sort());
    for (const gone of [deadHere, elsewhereOld, legacyOld]) expect(left).not.toContain(gone);
  });
});
