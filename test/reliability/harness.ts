/**
 * Drives the built server as an untrusted client would: raw JSON-RPC lines over stdio, raw HTTP bodies
 * over Streamable HTTP, no SDK client smoothing anything over. Used by the hostile-input corpus, in
 * either protocol revision: 2025 (initialize first) or 2026-07-28 (no initialize; every request
 * carries its revision and client in `_meta`, and over HTTP in headers too).
 */

import { type ChildProcess, spawn } from "node:child_process";
import path from "node:path";
import { fileURLToPath } from "node:url";

export const repo = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "../..");
export const bin = path.join(repo, "dist", "src", "cli.js");

export interface RpcReply {
  id?: string | number | null;
  result?: Record<string, unknown>;
  error?: { code: number; message: string };
}

/** What a transport does with one raw message: its reply (or none, for a notification). */
export interface RawConnection {
  send(raw: string, id: string | number | null | undefined): Promise<RpcReply | undefined>;
  alive(): boolean;
  close(): Promise<void>;
  readonly pid: number;
}

export type Era = "legacy" | "modern";

/** The `_meta` envelope every 2026-07-28 request carries. */
const ENVELOPE = {
  "io.modelcontextprotocol/protocolVersion": "2026-07-28",
  "io.modelcontextprotocol/clientInfo": { name: "red-team", version: "1" },
  "io.modelcontextprotocol/clientCapabilities": {},
};

function isObject(value: unknown): value is Record<string, unknown> {
  return typeof value === "object" && value !== null && !Array.isArray(value);
}

/**
 * A raw message as a 2026-07-28 client writes it: the envelope added to its params (when it is a
 * JSON object with a method and object params; anything else goes as it is), and the headers that
 * mirror it over HTTP.
 */
export function modernize(raw: string): { text: string; headers: Record<string, string> } {
  const bom = raw.startsWith("\uFEFF") ? "\uFEFF" : "";
  let value: unknown;
  try {
    value = JSON.parse(raw.slice(bom.length));
  } catch {
    return { text: raw, headers: {} };
  }
  if (!isObject(value) || typeof value.method !== "string") return { text: raw, headers: {} };
  if (value.params !== undefined && !isObject(value.params)) return { text: raw, headers: {} };
  const params = value.params ?? {};
  const meta = isObject(params._meta) ? params._meta : {};
  const text = bom + JSON.stringify({ ...value, params: { ...params, _meta: { ...meta, ...ENVELOPE } } });
  const headers: Record<string, string> = {
    "mcp-protocol-version": "2026-07-28",
    "mcp-method": value.method,
  };
  if (value.method === "tools/call" && typeof params.name === "string") headers["mcp-name"] = params.name;
  return { text, headers };
}

const INIT = {
  jsonrpc: "2.0",
  id: "init",
  method: "initialize",
  params: { protocolVersion: "2025-06-18", capabilities: {}, clientInfo: { name: "red-team", version: "1" } },
};

function startProcess(args: string[], cwd: string, env: NodeJS.ProcessEnv): ChildProcess {
  return spawn(process.execPath, [bin, ...args], { cwd, env, stdio: ["pipe", "pipe", "pipe"] });
}

/** The server over stdio: one line per message, replies matched by id (null ids in order). */
export async function stdioConnection(
  args: string[],
  cwd: string,
  env: NodeJS.ProcessEnv,
  era: Era = "legacy",
): Promise<RawConnection> {
  const child = startProcess(args, cwd, env);
  let buffer = "";
  const waiting = new Map<string, (reply: RpcReply) => void>();
  const nullWaiters: ((reply: RpcReply) => void)[] = [];
  child.stdout?.on("data", (chunk: Buffer) => {
    buffer += chunk.toString();
    for (let nl = buffer.indexOf("\n"); nl >= 0; nl = buffer.indexOf("\n")) {
      const line = buffer.slice(0, nl);
      buffer = buffer.slice(nl + 1);
      const reply = JSON.parse(line) as RpcReply;
      if (reply.id === null || reply.id === undefined) nullWaiters.shift()?.(reply);
      else waiting.get(String(reply.id))?.(reply);
    }
  });
  child.stderr?.on("data", () => undefined);
  let exited = false;
  child.on("exit", () => {
    exited = true;
  });
  const send = (raw: string, id: string | number | null | undefined) =>
    new Promise<RpcReply | undefined>((resolve) => {
      const line = era === "modern" ? modernize(raw).text : raw;
      if (id === undefined) {
        child.stdin?.write(`${line}\n`);
        return resolve(undefined);
      }
      if (id === null) nullWaiters.push(resolve);
      else waiting.set(String(id), resolve);
      child.stdin?.write(`${line}\n`);
    });
  if (era === "modern") {
    // No handshake: the first request names the revision, which the connection then keeps.
    await send(JSON.stringify({ jsonrpc: "2.0", id: "discover", method: "server/discover" }), "discover");
  } else {
    await send(JSON.stringify(INIT), "init");
    await send(JSON.stringify({ jsonrpc: "2.0", method: "notifications/initialized" }), undefined);
  }
  return {
    send,
    alive: () => !exited,
    pid: child.pid ?? -1,
    close: async () => {
      child.stdin?.end();
      await new Promise<void>((resolve) => {
        if (exited) return resolve();
        child.once("exit", () => resolve());
        setTimeout(() => child.kill("SIGKILL"), 10_000).unref();
      });
    },
  };
}

/** Reply of a Streamable HTTP POST: JSON, or the `data:` of an SSE stream. */
async function readReply(res: Response): Promise<RpcReply | undefined> {
  const text = await res.text();
  if (text.trim() === "") return undefined;
  if ((res.headers.get("content-type") ?? "").includes("text/event-stream")) {
    const data = text
      .split("\n")
      .filter((l) => l.startsWith("data:"))
      .map((l) => l.slice(5).trim())
      .filter((l) => l.length > 0);
    return data.length > 0 ? (JSON.parse(data.at(-1) as string) as RpcReply) : undefined;
  }
  return JSON.parse(text) as RpcReply;
}

/** The server over Streamable HTTP on a free loopback port, one session (2025) or none (2026-07-28). */
export async function httpConnection(
  args: string[],
  cwd: string,
  env: NodeJS.ProcessEnv,
  era: Era = "legacy",
): Promise<RawConnection> {
  const child = startProcess(["serve", "--http", "127.0.0.1:0", ...args], cwd, env);
  let exited = false;
  child.on("exit", () => {
    exited = true;
  });
  const url = await new Promise<string>((resolve, reject) => {
    let err = "";
    child.stderr?.on("data", (chunk: Buffer) => {
      err += chunk.toString();
      const m = /serving Streamable HTTP at (http:\/\/\S+)/.exec(err);
      if (m?.[1]) resolve(m[1]);
    });
    child.once("exit", (code) => reject(new Error(`server exited ${code}: ${err}`)));
  });
  const headers: Record<string, string> = {
    "content-type": "application/json",
    accept: "application/json, text/event-stream",
  };
  if (era === "legacy") {
    const init = await fetch(url, { method: "POST", headers, body: JSON.stringify(INIT) });
    const session = init.headers.get("mcp-session-id") ?? "";
    await init.text();
    headers["mcp-session-id"] = session;
    headers["mcp-protocol-version"] = "2025-06-18";
    await (
      await fetch(url, {
        method: "POST",
        headers,
        body: JSON.stringify({ jsonrpc: "2.0", method: "notifications/initialized" }),
      })
    ).text();
  }
  const post = (raw: string) => {
    if (era === "legacy") return fetch(url, { method: "POST", headers, body: raw });
    const modern = modernize(raw);
    return fetch(url, { method: "POST", headers: { ...headers, ...modern.headers }, body: modern.text });
  };
  return {
    send: async (raw) => readReply(await post(raw)),
    alive: () => !exited,
    pid: child.pid ?? -1,
    close: async () => {
      child.kill("SIGTERM");
      await new Promise<void>((resolve) => {
        if (exited) return resolve();
        child.once("exit", () => resolve());
        setTimeout(() => child.kill("SIGKILL"), 10_000).unref();
      });
    },
  };
}
