/**
 * Streamable HTTP at `/mcp` (`serve --http`): the checks every request passes before the SDK sees it
 * (Host, Origin, bearer token, body size and JSON-RPC shape), readiness at `/healthz`, and serving in
 * the revision each request is written in (2026-07-28 per request through the SDK's handler; 2025
 * stateless by default, or in sessions). The MCP server itself is server.ts's `createServer`.
 */

import { createHash, randomUUID, timingSafeEqual } from "node:crypto";
import { createServer as createHttpServer, type IncomingMessage, type ServerResponse } from "node:http";
import type { AddressInfo } from "node:net";
import {
  createMcpHandler,
  isInitializeRequest,
  isLegacyRequest,
  type McpServer,
  WebStandardStreamableHTTPServerTransport,
} from "@modelcontextprotocol/server";
import { type Config, isLoopbackHost } from "./config.js";
import { SegError } from "./errors.js";
import { admitValue, errorReply, PARSE_ERROR } from "./jsonrpc.js";
import type { Logger } from "./logger.js";
import type { Engine } from "./runtime/types.js";
import { createServer } from "./server.js";

export interface HttpHandle {
  /** Endpoint URL, e.g. http://127.0.0.1:8765/mcp */
  url: string;
  close(): Promise<void>;
}

function digest(value: string): Buffer {
  return createHash("sha256").update(value).digest();
}

/**
 * An HTTP refusal with a JSON-RPC error body. A 4xx sent before the request body was read closes
 * the connection: the unread body would otherwise be taken for the next request on it.
 */
function refuse(
  res: ServerResponse,
  status: number,
  message: string,
  options: { code?: number; id?: string | number | null; headers?: Record<string, string> } = {},
): void {
  const unread = !res.req.readableEnded;
  res.writeHead(status, {
    "content-type": "application/json",
    ...(unread ? { connection: "close" } : {}),
    ...options.headers,
  });
  res.end(JSON.stringify(errorReply(options.id ?? null, options.code ?? -32000, message)));
}

async function readJsonBody(req: IncomingMessage, limit: number): Promise<unknown> {
  const chunks: Buffer[] = [];
  let size = 0;
  for await (const chunk of req) {
    size += (chunk as Buffer).length;
    if (size > limit) throw new SegError("REQUEST_TOO_LARGE", `request body over ${limit} bytes`);
    chunks.push(chunk as Buffer);
  }
  // A leading byte-order mark is tolerated, as on stdio.
  return JSON.parse(
    Buffer.concat(chunks)
      .toString("utf8")
      .replace(/^\uFEFF/, ""),
  );
}

/** A failed pack load is tried again by the readiness probe at most this often. */
const READY_RETRY_MS = 30_000;
/** How long the readiness probe waits for the engine before it answers "loading". */
const READY_WAIT_MS = 250;

type Readiness = "ready" | "loading" | "failed";

/** SSE keep-alive on a stateless call's stream (the SDK's default is 15 s). */
const STATELESS_KEEP_ALIVE_MS = 5_000;

/**
 * Readiness for GET /healthz: "ready" once the engine has its pack loaded. Asking engine.info()
 * also notices a worker that crashed and is loading again; a failed load is retried (by asking
 * again) at most every READY_RETRY_MS, so a probe every few seconds does not reload a broken pack.
 */
function readinessProbe(engine: Engine): () => Promise<Readiness> {
  let failedAt = Number.NEGATIVE_INFINITY;
  return async () => {
    if (Date.now() - failedAt < READY_RETRY_MS) return "failed";
    let timer: NodeJS.Timeout | undefined;
    const state = await Promise.race([
      engine.info().then(
        () => "ready" as const,
        () => {
          failedAt = Date.now();
          return "failed" as const;
        },
      ),
      new Promise<"loading">((resolve) => {
        timer = setTimeout(() => resolve("loading"), READY_WAIT_MS);
      }),
    ]);
    clearTimeout(timer);
    return state;
  };
}

/** A line for the debug log naming a request (its method, id and tool; never its arguments). */
function describeMessage(body: unknown): string {
  const m = body as { method?: unknown; id?: unknown; params?: { name?: unknown } };
  const tool = m.method === "tools/call" && typeof m.params?.name === "string" ? ` ${m.params.name}` : "";
  const id = m.id === undefined ? "" : ` (id ${JSON.stringify(m.id)})`;
  return typeof m.method === "string" ? `${m.method}${tool}${id}` : `response${id}`;
}

const BODY_HEADERS = new Set(["content-length", "transfer-encoding", "connection", "keep-alive"]);

/**
 * A node request as a fetch Request, for the SDK's web-standard serving: its method and headers (the
 * body was read and checked already and is passed on parsed). `signal` aborts when the client goes.
 */
function webRequest(req: IncomingMessage, signal: AbortSignal): Request {
  const headers = new Headers();
  for (const [name, value] of Object.entries(req.headers)) {
    // The body is not carried over (it is passed parsed), nor what describes its bytes or the connection.
    if (value === undefined || BODY_HEADERS.has(name)) continue;
    for (const v of Array.isArray(value) ? value : [value]) headers.append(name, v);
  }
  const url = new URL(req.url ?? "/", "http://localhost");
  return new Request(`http://localhost${url.pathname}`, { method: req.method ?? "GET", headers, signal });
}

/** An AbortSignal that fires when the client goes away before its response has been sent. */
function clientGone(res: ServerResponse): AbortSignal {
  const controller = new AbortController();
  res.once("close", () => {
    if (!res.writableFinished) controller.abort(new Error("the client went away"));
  });
  if (res.destroyed) controller.abort(new Error("the client went away"));
  return controller.signal;
}

/**
 * Write a fetch Response to a node response as it streams (an SSE stream stays open until the SDK
 * ends it). A client that goes away cancels the stream, which tells the SDK.
 */
async function sendResponse(res: ServerResponse, response: Response): Promise<void> {
  const headers: Record<string, string> = {};
  response.headers.forEach((value, name) => {
    headers[name] = value;
  });
  res.writeHead(response.status, headers);
  if (!response.body) {
    res.end();
    return;
  }
  res.flushHeaders();
  const reader = response.body.getReader();
  const cancel = () => void reader.cancel().catch(() => undefined);
  res.once("close", cancel);
  try {
    for (;;) {
      const { done, value } = await reader.read();
      if (done || res.destroyed) break;
      if (!res.write(value)) {
        await new Promise<void>((resolve) => {
          const go = () => {
            res.off("drain", go);
            res.off("close", go);
            resolve();
          };
          res.once("drain", go);
          res.once("close", go);
        });
      }
    }
  } catch {
    // The stream failed or was cancelled: the client is gone, there is no one to tell.
  } finally {
    res.off("close", cancel);
    if (!res.destroyed) res.end();
  }
}

/**
 * Serve Streamable HTTP at `/mcp` on config.http (loopback by default). Every request is checked
 * before the SDK sees it: the Host header (DNS rebinding), the Origin header (browsers), the bearer
 * token when one is configured, the body's size and its JSON-RPC shape. A non-loopback address
 * requires a token.
 *
 * Each POST is then served in the revision it is written in. Protocol revision 2026-07-28 (the
 * request's `_meta` names it; there is no initialize) is stateless by design: each request gets its
 * own server from the SDK's createMcpHandler, its answer (and progress) on an SSE stream, and a client
 * that goes away cancels it. 2025 requests (initialize first; 2025-11-25 and earlier) are served
 * stateless too by default: each POST its own server and transport, closed when its response ends, so
 * replicas behind a load balancer need no affinity. A call whose client goes away is cancelled (its
 * answer has nowhere to go). The initialize response still names the client with an Mcp-Session-Id
 * that holds no state: a notifications/cancelled that reaches the replica running the call (always,
 * with one process) finds it by that id. Sessions (`mode: "sessions"`, 2025 clients only): per-client
 * state under Mcp-Session-Id, a GET event stream and DELETE, idle sessions closed, at most
 * maxSessions. GET /healthz answers readiness without the token (see README, "Scale out").
 */
export async function serveHttp(config: Config, engine: Engine, logger: Logger): Promise<HttpHandle> {
  const http = config.http;
  if (!http) throw new SegError("INVALID_INPUT", "no HTTP address configured: pass --http 127.0.0.1:PORT");
  const loopback = isLoopbackHost(http.host);
  if (!loopback && http.token === undefined) {
    throw new SegError(
      "INVALID_INPUT",
      `refusing to serve on non-loopback address ${http.host} without a token: pass --token (or QWEN3_VL_SEG_TOKEN) with at least 16 characters, or bind 127.0.0.1`,
    );
  }
  // Per session: its transport, when it was last used, and how many of its requests are open (a
  // GET event stream stays open while the client listens).
  const sessions = new Map<
    string,
    { transport: WebStandardStreamableHTTPServerTransport; seen: number; open: number }
  >();
  const tokenDigest = http.token === undefined ? undefined : digest(http.token);
  // Base64 inflates data: URIs by 4/3; leave room for the JSON around them.
  const bodyLimit = Math.ceil((config.maxDataUriBytes * 4) / 3) + 256 * 1024;
  let port = http.port;

  // The loopback names, plus the address the server is bound to (e.g. 127.0.0.2).
  const boundHost = http.host.includes(":") ? `[${http.host}]` : http.host;
  const hostNames = [...new Set(["127.0.0.1", "localhost", "[::1]", boundHost.toLowerCase()])];
  const allowedHosts = () => new Set(hostNames.map((h) => `${h}:${port}`));
  const allowedOrigins = () =>
    new Set([...hostNames.map((h) => `http://${h}:${port}`), ...http.allowedOrigins]);

  const probe = readinessProbe(engine);
  const healthz = async (req: IncomingMessage, res: ServerResponse): Promise<void> => {
    if (req.method !== "GET" && req.method !== "HEAD") {
      return refuse(res, 405, "method not allowed: GET /healthz", { headers: { allow: "GET, HEAD" } });
    }
    // The state word only: no pack, path or version, since the probe needs no token.
    const status = await probe();
    res.writeHead(status === "ready" ? 200 : 503, {
      "content-type": "application/json",
      "cache-control": "no-store",
      ...(status === "ready" ? {} : { "retry-after": "5" }),
    });
    res.end(req.method === "HEAD" ? undefined : JSON.stringify({ status }));
  };

  // 2026-07-28: the SDK's per-request serving. Our checks ran first; 2025 requests never reach it.
  // Always an SSE stream, so progress flows and the keep-alive finds a client gone behind a proxy.
  const modern = createMcpHandler(
    ({ era }) => createServer(config, engine, logger, { trustRoots: false, era }),
    {
      legacy: "reject",
      responseMode: "sse",
      keepAliveMs: STATELESS_KEEP_ALIVE_MS,
      onerror: (error) => logger.debug(`HTTP (2026-07-28): ${error.message}`),
    },
  );
  const serveModern = async (res: ServerResponse, request: Request, body: unknown): Promise<void> => {
    if (request.signal.aborted) return; // gone while its body was read
    await sendResponse(res, await modern.fetch(request, { parsedBody: body }));
  };

  // Stateless 2025 mode: calls in flight by client id and request id, for notifications/cancelled.
  const running = new Map<string, McpServer>();
  const callKey = (client: string, id: unknown) => `${client}\n${JSON.stringify(id)}`;
  const serveStateless = async (
    req: IncomingMessage,
    res: ServerResponse,
    request: Request,
    body: unknown,
  ): Promise<void> => {
    const header = req.headers["mcp-session-id"];
    const client = typeof header === "string" ? header : undefined;
    const message = body as { id?: unknown; method?: unknown; params?: { requestId?: unknown } };
    if (client !== undefined && message.method === "notifications/cancelled") {
      // Closing the call's server aborts its handler (the engine sees the signal) and its stream.
      const call = running.get(callKey(client, message.params?.requestId));
      if (call)
        logger.debug(`cancelling request ${JSON.stringify(message.params?.requestId)}: the client asked`);
      call?.close().catch(() => undefined);
    }
    if (isInitializeRequest(body)) res.setHeader("mcp-session-id", randomUUID());
    const server = createServer(config, engine, logger, { trustRoots: false, era: "legacy" });
    // No sessionIdGenerator: the SDK's stateless mode (no session checks, a transport per request).
    // The keep-alive comment also finds a client gone behind a proxy that keeps half-closed
    // requests (haproxy does): the write fails, the proxy closes its side, the call is cancelled.
    const transport = new WebStandardStreamableHTTPServerTransport({ keepAliveMs: STATELESS_KEEP_ALIVE_MS });
    const key =
      client !== undefined && typeof message.method === "string" && message.id !== undefined
        ? callKey(client, message.id)
        : undefined;
    if (key !== undefined) running.set(key, server);
    const done = () => {
      if (key !== undefined && running.get(key) === server) running.delete(key);
      // After the answer this frees the server; before it (the client left) it aborts the call.
      server.close().catch(() => undefined);
    };
    res.once("close", done);
    if (res.destroyed) return done(); // gone while its body was read: 'close' has fired already
    await server.connect(transport);
    await sendResponse(res, await transport.handleRequest(request, { parsedBody: body }));
  };

  const handle = async (req: IncomingMessage, res: ServerResponse): Promise<void> => {
    const url = new URL(req.url ?? "/", "http://localhost");
    if (url.pathname !== "/mcp" && url.pathname !== "/healthz") {
      return refuse(res, 404, "not found: the MCP endpoint is /mcp");
    }
    if (loopback && !allowedHosts().has((req.headers.host ?? "").toLowerCase())) {
      return refuse(res, 403, `forbidden: Host header "${req.headers.host ?? ""}" is not this server`);
    }
    const origin = req.headers.origin;
    if (origin !== undefined && !allowedOrigins().has(origin)) {
      return refuse(res, 403, `forbidden: Origin "${origin}" is not allowed (add it with --allow-origin)`);
    }
    // Readiness needs no token: load balancers and orchestrators probe it, and it tells only
    // whether the pack is loaded.
    if (url.pathname === "/healthz") return healthz(req, res);
    if (tokenDigest) {
      const auth = req.headers.authorization ?? "";
      const given = auth.startsWith("Bearer ") ? auth.slice(7) : "";
      if (!timingSafeEqual(digest(given), tokenDigest)) {
        res.setHeader("www-authenticate", "Bearer");
        return refuse(res, 401, "unauthorized: send Authorization: Bearer <token>");
      }
    }
    const stateless = http.mode === "stateless";
    const sessionId = req.headers["mcp-session-id"];
    const session = !stateless && typeof sessionId === "string" ? sessions.get(sessionId) : undefined;
    if (session) {
      session.seen = Date.now();
      session.open++;
      res.once("close", () => {
        session.open--;
        session.seen = Date.now();
      });
    }
    const existing = session?.transport;
    if (req.method === "POST") {
      let body: unknown;
      const declared = Number(req.headers["content-length"] ?? 0);
      if (declared > bodyLimit) {
        res.setHeader("connection", "close");
        return refuse(res, 413, `request body of ${declared} bytes is over the limit of ${bodyLimit}`);
      }
      try {
        body = await readJsonBody(req, bodyLimit);
      } catch (error) {
        if (error instanceof SegError) return refuse(res, 413, error.message);
        return refuse(res, 400, `Parse error: the body is not valid JSON (${(error as Error).message})`, {
          code: PARSE_ERROR,
        });
      }
      const admitted = admitValue(body);
      if ("reply" in admitted) {
        const reply = admitted.reply;
        if ("error" in reply)
          return refuse(res, 400, reply.error.message, { code: reply.error.code, id: reply.id });
        res.writeHead(200, { "content-type": "application/json" });
        return void res.end(JSON.stringify(reply));
      }
      logger.debug(`HTTP POST ${describeMessage(body)}`);
      const request = webRequest(req, clientGone(res));
      // The revision a request is written in: `_meta` naming 2026-07-28 (or a header saying so).
      if (!(await isLegacyRequest(request, body))) return serveModern(res, request, body);
      if (stateless) return serveStateless(req, res, request, body);
      if (existing) return sendResponse(res, await existing.handleRequest(request, { parsedBody: body }));
      if (sessionId === undefined && isInitializeRequest(body) && sessions.size >= http.maxSessions) {
        return refuse(res, 503, `the server has ${sessions.size} open sessions, its limit: retry later`, {
          headers: { "retry-after": "30" },
        });
      }
      if (sessionId === undefined && isInitializeRequest(body)) {
        const transport: WebStandardStreamableHTTPServerTransport =
          new WebStandardStreamableHTTPServerTransport({
            sessionIdGenerator: () => randomUUID(),
            onsessioninitialized: (id) => {
              sessions.set(id, { transport, seen: Date.now(), open: 0 });
            },
          });
        transport.onclose = () => {
          if (transport.sessionId) sessions.delete(transport.sessionId);
        };
        await createServer(config, engine, logger, { trustRoots: false, era: "legacy" }).connect(transport);
        return sendResponse(res, await transport.handleRequest(request, { parsedBody: body }));
      }
      // An unknown (expired) session id is 404, which tells a client to initialize again (MCP spec).
      if (sessionId !== undefined)
        return refuse(res, 404, "unknown or expired mcp-session-id: initialize again");
      return refuse(res, 400, "bad request: no valid mcp-session-id (initialize first)");
    }
    // A stateless server has no event stream to offer and no session to end (MCP spec: 405); nor
    // has revision 2026-07-28, which is POST only.
    if (stateless) {
      return refuse(res, 405, `method not allowed: ${req.method} (this server is stateless: POST only)`, {
        headers: { allow: "POST" },
      });
    }
    if (existing && (req.method === "GET" || req.method === "DELETE"))
      return sendResponse(res, await existing.handleRequest(webRequest(req, clientGone(res))));
    if (sessionId !== undefined && !existing) {
      return refuse(res, 404, "unknown or expired mcp-session-id: initialize again");
    }
    return refuse(res, existing ? 405 : 400, "bad request: unknown session or method");
  };

  // Clients that vanish without DELETE would otherwise keep their session (and its server) forever.
  const idleMs = http.sessionIdleMs;
  const sweeper = setInterval(
    () => {
      const now = Date.now();
      for (const [id, s] of sessions) {
        if (s.open > 0 || now - s.seen < idleMs) continue;
        sessions.delete(id);
        logger.info(`closing HTTP session ${id}: idle for ${Math.round((now - s.seen) / 1000)} s`);
        s.transport.close().catch(() => undefined);
      }
    },
    Math.min(60_000, Math.max(10, Math.floor(idleMs / 2))),
  );
  sweeper.unref();

  const server = createHttpServer((req, res) => {
    handle(req, res).catch((error: unknown) => {
      logger.error(`HTTP request failed: ${String(error)}`);
      if (!res.headersSent) refuse(res, 500, "internal error");
      else res.end();
    });
  });
  await new Promise<void>((resolve, reject) => {
    server.once("error", (error: NodeJS.ErrnoException) =>
      reject(
        error.code === "EADDRINUSE"
          ? new SegError(
              "ADDRESS_IN_USE",
              `${http.host}:${http.port} is already in use: stop the other server or pick another port`,
              { cause: error },
            )
          : new SegError("LISTEN_FAILED", `cannot listen on ${http.host}:${http.port} (${error.message})`, {
              cause: error,
            }),
      ),
    );
    server.listen(http.port, http.host, () => resolve());
  }).catch((error: unknown) => {
    clearInterval(sweeper);
    throw error;
  });
  port = (server.address() as AddressInfo).port;
  const host = http.host.includes(":") ? `[${http.host}]` : http.host;
  const url = `http://${host}:${port}/mcp`;
  logger.info(
    `serving Streamable HTTP at ${url} (${http.mode}${tokenDigest ? ", bearer token required" : ""})`,
  );
  return {
    url,
    close: async () => {
      clearInterval(sweeper);
      await modern.close().catch(() => undefined);
      await Promise.all([...running.values()].map((s) => s.close().catch(() => undefined)));
      running.clear();
      await Promise.all([...sessions.values()].map((s) => s.transport.close().catch(() => undefined)));
      sessions.clear();
      server.closeAllConnections();
      await new Promise<void>((resolve) => server.close(() => resolve()));
    },
  };
}
