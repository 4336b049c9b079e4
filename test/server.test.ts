/**
 * Streamable HTTP in the sessions mode: real SDK clients end to end (a 2025-11-25 client gets a
 * session; a 2026-07-28 client, which has no sessions, is served per request), and the checks every
 * request passes first.
 */

import { mkdtemp, rm } from "node:fs/promises";
import { request } from "node:http";
import { tmpdir } from "node:os";
import path from "node:path";
import sharp from "sharp";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { createConfig, isLoopbackHost, parseListenAddress } from "../src/config.js";
import { type HttpHandle, serveHttp } from "../src/http.js";
import { silentLogger } from "../src/logger.js";
import { segmentTool } from "../src/tools/segment.js";
import { connectClient, ERAS, httpTransport, REVISION } from "./helpers/clients.js";
import { FakeEngine } from "./helpers/fake-engine.js";

const TOKEN = "s3cret-token-0123456789";
let root: string;
let handle: HttpHandle;

const initialize = {
  jsonrpc: "2.0",
  id: 1,
  method: "initialize",
  params: { protocolVersion: "2025-06-18", capabilities: {}, clientInfo: { name: "raw", version: "1" } },
};

function post(url: string, headers: Record<string, string>, body: unknown = initialize): Promise<Response> {
  return fetch(url, {
    method: "POST",
    headers: {
      "content-type": "application/json",
      accept: "application/json, text/event-stream",
      ...headers,
    },
    body: JSON.stringify(body),
  });
}

beforeAll(async () => {
  root = await mkdtemp(path.join(tmpdir(), "seg-http-"));
  await sharp({ create: { width: 40, height: 30, channels: 3, background: "#369" } })
    .png()
    .toFile(path.join(root, "img.png"));
  const config = createConfig({
    cwd: root,
    outDir: path.join(root, "out"),
    logLevel: "warn",
    // This file covers the sessions mode; test/stateless.test.ts the stateless default.
    http: { host: "127.0.0.1", port: 0, token: TOKEN, mode: "sessions" },
  });
  handle = await serveHttp(config, new FakeEngine(), silentLogger);
});

afterAll(async () => {
  await handle?.close();
  await rm(root, { recursive: true, force: true });
});

describe("Streamable HTTP", () => {
  it.each(ERAS)("serves the tools to a %s SDK client with the bearer token", async (era) => {
    const transport = httpTransport(era, handle.url, { authorization: `Bearer ${TOKEN}` });
    const client = await connectClient(transport);
    expect(client.protocolVersion()).toBe(REVISION[era]);
    // A session for the 2025 client; none for the 2026-07-28 one (that revision has no sessions).
    if (era === "legacy") expect(transport.sessionId()).toMatch(/^[0-9a-f-]{36}$/);
    else expect(transport.sessionId()).toBeUndefined();
    const { tools } = await client.listTools();
    expect(tools.map((t) => t.name).sort()).toEqual(["describe_region", "ground", "segment"]);
    const progress: number[] = [];
    const result = await client.callTool(
      "segment",
      { image: "img.png", expression: "the square" },
      { onprogress: (p) => progress.push(p.progress) },
    );
    expect(result.isError).toBeFalsy();
    expect(progress.length).toBeGreaterThan(0);
    const out = segmentTool.output.parse(result.structuredContent);
    const meta = await sharp(out.instances[0]?.mask.path ?? "").metadata();
    expect([meta.width, meta.height]).toEqual([40, 30]);
    const read = await client.readResource(out.instances[0]?.mask.uri ?? "");
    expect(read.contents[0]?.mimeType).toBe("image/png");
    await transport.terminateSession();
    await client.close();
  });

  it.each(ERAS)("ignores a remote %s client's MCP roots: they cannot widen --allow-dir", async (era) => {
    const outside = await mkdtemp(path.join(tmpdir(), "seg-http-outside-"));
    try {
      await sharp({ create: { width: 8, height: 8, channels: 3, background: "#000" } })
        .png()
        .toFile(path.join(outside, "secret.png"));
      let asked = 0;
      const transport = httpTransport(era, handle.url, { authorization: `Bearer ${TOKEN}` });
      const client = await connectClient(transport, {
        roots: async () => {
          asked++;
          return [{ uri: "file:///", name: "everything" }];
        },
      });
      const result = await client.callTool("ground", {
        image: path.join(outside, "secret.png"),
        expression: "x",
      });
      expect(result.isError).toBe(true);
      expect(JSON.stringify(result.content)).toContain("PATH_NOT_ALLOWED");
      expect(asked).toBe(0); // not even asked
      await transport.terminateSession();
      await client.close();
    } finally {
      await rm(outside, { recursive: true, force: true });
    }
  });

  it("refuses requests without the token", async () => {
    const res = await post(handle.url, {});
    expect(res.status).toBe(401);
    expect(res.headers.get("www-authenticate")).toBe("Bearer");
    expect((await post(handle.url, { authorization: "Bearer wrong" })).status).toBe(401);
  });

  it("refuses foreign Origin and Host headers (DNS rebinding)", async () => {
    const auth = { authorization: `Bearer ${TOKEN}` };
    const evil = await post(handle.url, { ...auth, origin: "http://evil.example" });
    expect(evil.status).toBe(403);
    expect(((await evil.json()) as { error: { message: string } }).error.message).toMatch(
      /Origin "http:\/\/evil.example" is not allowed/,
    );
    const port = new URL(handle.url).port;
    const own = await post(handle.url, { ...auth, origin: `http://localhost:${port}` });
    expect(own.status).toBe(200);
    // fetch() cannot forge Host; node:http can
    const rebound = await new Promise<number>((resolve, reject) => {
      const req = request(
        handle.url,
        { method: "GET", headers: { ...auth, host: `attacker.example:${port}` } },
        (res) => {
          res.resume();
          resolve(res.statusCode ?? 0);
        },
      );
      req.on("error", reject);
      req.end();
    });
    expect(rebound).toBe(403);
  });

  it("answers unknown paths and sessions plainly", async () => {
    const auth = { authorization: `Bearer ${TOKEN}` };
    expect((await post(handle.url.replace("/mcp", "/other"), auth)).status).toBe(404);
    const res = await post(
      handle.url,
      { ...auth, "mcp-session-id": "nope" },
      { jsonrpc: "2.0", id: 2, method: "tools/list" },
    );
    // 404 for an unknown session id tells the client to initialize again (MCP spec).
    expect(res.status).toBe(404);
    const noSession = await post(handle.url, auth, { jsonrpc: "2.0", id: 3, method: "tools/list" });
    expect(noSession.status).toBe(400);
  });

  it("refuses a body over the limit from its content-length, before reading it", async () => {
    const res = await fetch(handle.url, {
      method: "POST",
      headers: {
        authorization: `Bearer ${TOKEN}`,
        "content-type": "application/json",
        accept: "application/json, text/event-stream",
      },
      body: "x".repeat(20 * 1024 * 1024),
    });
    expect(res.status).toBe(413);
  });

  it("refuses a non-loopback address without a token", async () => {
    const config = createConfig({ cwd: root, logLevel: "silent", http: { host: "0.0.0.0", port: 0 } });
    await expect(serveHttp(config, new FakeEngine(), silentLogger)).rejects.toThrow(
      /non-loopback address 0.0.0.0 without a token/,
    );
  });
});

describe("idle HTTP sessions", () => {
  it("closes a session after the idle time; its id then gets 404 (initialize again)", async () => {
    const config = createConfig({
      cwd: root,
      logLevel: "silent",
      http: { host: "127.0.0.1", port: 0, mode: "sessions", sessionIdleMs: 2000 },
    });
    const idle = await serveHttp(config, new FakeEngine(), silentLogger);
    try {
      const init = await post(idle.url, {});
      expect(init.status).toBe(200);
      const id = init.headers.get("mcp-session-id") ?? "";
      expect(id).not.toBe("");
      await init.text();
      const list = { jsonrpc: "2.0", id: 2, method: "tools/list" };
      const headers = { "mcp-session-id": id, "mcp-protocol-version": "2025-06-18" };
      const used = await post(idle.url, headers, list);
      expect(used.status).toBe(200); // used within the idle time: still there
      await used.text();
      // The sweep runs every idle/2, so the session is gone by 3 s after its last use.
      await new Promise((resolve) => setTimeout(resolve, 3500));
      expect((await post(idle.url, headers, list)).status).toBe(404);
    } finally {
      await idle.close();
    }
  });
});

describe("HTTP limits", () => {
  it("refuses sessions beyond the cap with 503 and Retry-After; an answered 4xx on an unread body closes the connection", async () => {
    const config = createConfig({
      cwd: root,
      logLevel: "silent",
      http: { host: "127.0.0.1", port: 0, mode: "sessions", maxSessions: 2 },
    });
    const capped = await serveHttp(config, new FakeEngine(), silentLogger);
    try {
      for (let i = 0; i < 2; i++) {
        const ok = await post(capped.url, {});
        expect(ok.status).toBe(200);
        await ok.text();
      }
      const refused = await post(capped.url, {});
      expect(refused.status).toBe(503);
      expect(refused.headers.get("retry-after")).toBe("30");
      expect(((await refused.json()) as { error: { message: string } }).error.message).toMatch(
        /2 open sessions, its limit: retry later/,
      );
      // A declared body over the limit is refused unread: the connection must not be reused for it.
      const big = await fetch(capped.url, {
        method: "POST",
        headers: { "content-type": "application/json", "content-length": String(100 * 1024 * 1024) },
        body: "{}",
        duplex: "half",
      } as RequestInit).catch(() => undefined);
      if (big) {
        expect(big.status).toBe(413);
        expect(big.headers.get("connection")).toBe("close");
      }
      // A body that is not JSON, and a batch: JSON-RPC errors, not silence.
      const garbage = await fetch(capped.url, {
        method: "POST",
        headers: { "content-type": "application/json", accept: "application/json, text/event-stream" },
        body: "{not json",
      });
      expect(garbage.status).toBe(400);
      expect(((await garbage.json()) as { error: { code: number } }).error.code).toBe(-32700);
      const batch = await post(capped.url, {}, [initialize]);
      expect(batch.status).toBe(400);
      expect(((await batch.json()) as { error: { code: number } }).error.code).toBe(-32600);
    } finally {
      await capped.close();
    }
  });
});

describe("listen addresses", () => {
  it("parses HOST:PORT, :PORT and PORT", () => {
    expect(parseListenAddress("127.0.0.1:8765")).toEqual({ host: "127.0.0.1", port: 8765 });
    expect(parseListenAddress("8765")).toEqual({ host: "127.0.0.1", port: 8765 });
    expect(parseListenAddress("[::1]:9000")).toEqual({ host: "::1", port: 9000 });
    expect(() => parseListenAddress("localhost")).toThrow(/expected HOST:PORT for --http/);
  });
  it("knows loopback hosts", () => {
    expect(["127.0.0.1", "localhost", "::1", "[::1]", "127.1.2.3"].every(isLoopbackHost)).toBe(true);
    expect(["0.0.0.0", "192.168.1.2", "example.com"].some(isLoopbackHost)).toBe(false);
  });
});
