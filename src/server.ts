/**
 * The MCP server: three tools, a resource template serving the masks it wrote, and the model's
 * description as a resource. `createServer` builds one McpServer (one per connection, or per request
 * where serving is stateless); the engine, its queue and the logger are shared between them.
 * Transports: stdio and Streamable HTTP. Both serve protocol revision 2026-07-28 (stateless: no
 * initialize, every request carries its revision and client in `_meta`) and the 2025 revisions
 * (initialize handshake, 2025-11-25 and earlier), chosen per connection (stdio) or per request (HTTP)
 * by what the client sends.
 */

import { createHash, randomUUID, timingSafeEqual } from "node:crypto";
import { createServer as createHttpServer, type IncomingMessage, type ServerResponse } from "node:http";
import type { AddressInfo } from "node:net";
import {
  CLIENT_CAPABILITIES_META_KEY,
  type ClientCapabilities,
  createMcpHandler,
  type InputRequiredResult,
  inputRequired,
  inputResponse,
  isInitializeRequest,
  isLegacyRequest,
  McpServer,
  ResourceTemplate,
  WebStandardStreamableHTTPServerTransport,
} from "@modelcontextprotocol/server";
import { serveStdio as serveStdioConnection } from "@modelcontextprotocol/server/stdio";
import { type Config, isLoopbackHost, PACKAGE_NAME, packageInfo } from "./config.js";
import { SegError, toSegError } from "./errors.js";
import { admitValue, errorReply, PARSE_ERROR } from "./jsonrpc.js";
import type { Logger } from "./logger.js";
import { isInside, OUTPUT_URI_PREFIX, readOutputFile, rootsToDirs } from "./paths.js";
import { type PackSummary, readPackSummary } from "./runtime/pack.js";
import type { Engine } from "./runtime/types.js";
import { StdioTransport } from "./stdio.js";
import { describeRegionTool } from "./tools/describe-region.js";
import { groundTool } from "./tools/ground.js";
import { segmentTool } from "./tools/segment.js";
import { registerTools, type ToolDeps, type ToolExtra } from "./tools/shared.js";

/** The protocol revisions this server speaks: 2026-07-28, and 2025-11-25 and earlier. */
export type ProtocolEra = "modern" | "legacy";

export const MODEL_RESOURCE_URI = "qwen3-vl-seg://model";

/** How long a client gets to answer roots/list (it is asked once per change, not per call). */
const ROOTS_TIMEOUT_MS = 3_000;
/** The key of the roots request in an `input_required` answer (2026-07-28). */
const ROOTS_INPUT = "roots";

/**
 * How long a 2026-07-28 client may cache the tool, resource and template lists and the discovery
 * result (`ttlMs`): they hold for the life of the process, which a restart with another pack ends.
 */
const LIST_TTL_MS = 300_000;

/** The folders inside both lists: for each pair, the deeper one when one contains the other. */
export function intersectDirs(a: readonly string[], b: readonly string[]): string[] {
  const out = new Set<string>();
  for (const x of a) {
    for (const y of b) {
      if (isInside(y, x)) out.add(y);
      else if (isInside(x, y)) out.add(x);
    }
  }
  return [...out];
}

const INSTRUCTIONS = `Pixel-level vision on local images with Qwen3-VL-Seg.
- ground: find every object matching a referring expression; pixel boxes [x1, y1, x2, y2] + scores; found: false when nothing matches.
- segment: one binary mask PNG per instance (same size as the image) in the output directory, with areas and tight boxes; pass box to segment a region you already know.
- describe_region: describe what is inside a box or a mask from segment.
Images are file paths (inside the allowed directories), file:// URIs or base64 data: URIs; URLs are never fetched. Masks can be read back as resources (${OUTPUT_URI_PREFIX}<name>).`;

/** What the pack knows and cannot do, appended to the instructions and to every tool's description. */
function packNotes(pack: PackSummary | undefined): { all: string; segment: string } {
  if (!pack) return { all: "", segment: "" };
  const knows = pack.domain
    ? ` The loaded model pack "${pack.name}" knows: ${pack.domain}. Expect reliable answers only on such images.`
    : "";
  const segment = pack.segmentation
    ? ""
    : ` Unavailable with the loaded pack "${pack.name}": it has no mask decoder (segment answers MASK_DECODER_MISSING); use ground for boxes.`;
  return { all: knows, segment };
}

const packSummaries = new Map<string, PackSummary | undefined>();

function packSummary(packDir: string): PackSummary | undefined {
  if (!packSummaries.has(packDir)) packSummaries.set(packDir, readPackSummary(packDir));
  return packSummaries.get(packDir);
}

/**
 * The three tools as a server with the pack in `packDir` lists them: each description ends with what
 * the pack knows. The .mcpb manifest (scripts/bundle.mjs) lists them for the bundled pack.
 */
export function packTools(packDir: string) {
  const notes = packNotes(packSummary(packDir));
  return [groundTool, segmentTool, describeRegionTool].map((tool) => ({
    ...tool,
    description: tool.description + notes.all + (tool === segmentTool ? notes.segment : ""),
  }));
}

/**
 * One MCP server (for one connection, or one request) with the tools and resources registered. The
 * engine (and its queue) is shared by every connection of the process. `era` is the revision family
 * the instance serves (the SDK's serving entries say which when they ask for one); it changes only
 * how MCP roots are asked for.
 */
export function createServer(
  config: Config,
  engine: Engine,
  logger: Logger,
  options: { trustRoots: boolean; era?: ProtocolEra } = { trustRoots: true },
): McpServer {
  const notes = packNotes(packSummary(config.packDir));
  const listHint = { ttlMs: LIST_TTL_MS, cacheScope: "public" as const };
  const server = new McpServer(
    { name: PACKAGE_NAME, title: "Qwen3-VL-Seg", version: packageInfo().version },
    {
      instructions:
        INSTRUCTIONS +
        (notes.all ? `\n${notes.all.trim()}` : "") +
        (notes.segment ? `\nsegment:${notes.segment}` : ""),
      // 2026-07-28 results are cacheable for this long; 2025 responses never carry these fields.
      cacheHints: {
        "tools/list": listHint,
        "resources/list": listHint,
        "resources/templates/list": listHint,
        "server/discover": listHint,
      },
    },
  );

  // MCP roots, for a local (stdio) client that offers them, narrow --allow-dir (the folders both allow)
  // or, when no --allow-dir was given, replace the working-directory default. Over HTTP they are
  // ignored: they name the client's machine. Asked once and again only when the client says they
  // changed; a client that does not answer is not asked on every call. A 2025 client is asked with a
  // roots/list request on the call's stream; a 2026-07-28 client (which takes no requests from the
  // server) is answered `input_required` on its first call and retries it with its roots, once per
  // connection (that revision has no roots/list_changed).
  let roots: Promise<string[] | undefined> | undefined;
  server.server.setNotificationHandler("notifications/roots/list_changed", async () => {
    roots = undefined;
  });
  const modern = options.era === "modern";
  const offersRoots = (extra?: ToolExtra): boolean => {
    if (!options.trustRoots) return false;
    if (!modern) return server.server.getClientCapabilities()?.roots !== undefined;
    const envelope = extra?.mcpReq.envelope as Record<string, unknown> | undefined;
    const capabilities = envelope?.[CLIENT_CAPABILITIES_META_KEY] as ClientCapabilities | undefined;
    return capabilities?.roots !== undefined;
  };
  const askRoots = async (extra: ToolExtra): Promise<InputRequiredResult | undefined> => {
    if (!modern || roots !== undefined || !offersRoots(extra)) return undefined;
    const answer = inputResponse(extra.mcpReq.inputResponses, ROOTS_INPUT);
    if (answer.kind === "roots") {
      // The client's own answer, not checked by the SDK: only file:// URIs count (rootsToDirs).
      const given = answer.roots.filter((r): r is { uri: string } => typeof r?.uri === "string");
      roots = Promise.resolve(rootsToDirs(given));
      return undefined;
    }
    if (extra.mcpReq.inputResponses !== undefined || extra.mcpReq.droppedInputResponseKeys !== undefined) {
      // Asked already and answered without roots: the allowed directories alone, and no asking again.
      logger.warn("the client's answer held no roots; using the allowed directories alone");
      roots = Promise.resolve(undefined);
      return undefined;
    }
    return inputRequired({ inputRequests: { [ROOTS_INPUT]: inputRequired.listRoots() } });
  };
  const allowDirs = async (extra?: ToolExtra): Promise<readonly string[]> => {
    if (!offersRoots(extra)) return config.allowDirs;
    if (!modern) {
      roots ??= (
        extra
          ? extra.mcpReq.send({ method: "roots/list" }, { timeout: ROOTS_TIMEOUT_MS })
          : server.server.listRoots(undefined, { timeout: ROOTS_TIMEOUT_MS })
      )
        .then((r) => rootsToDirs(r.roots))
        .catch((error: unknown) => {
          logger.warn(
            `the client's roots could not be listed (${String(error)}); using the allowed directories alone`,
          );
          return undefined;
        });
    }
    const dirs = await roots;
    if (dirs === undefined) return config.allowDirs;
    return config.allowDirsGiven ? intersectDirs(config.allowDirs, dirs) : dirs;
  };

  const deps: ToolDeps = { config, engine, logger, allowDirs, inputRequired: askRoots };
  registerTools(server, deps, packTools(config.packDir));

  server.registerResource(
    "mask",
    new ResourceTemplate(`${OUTPUT_URI_PREFIX}{name}`, { list: undefined }),
    {
      title: "Mask or overlay PNG written by segment",
      description: "A file segment wrote in the output directory; only files there are served.",
      mimeType: "image/png",
    },
    async (uri) => {
      try {
        const file = await readOutputFile(config.outDir, uri.href, config.maxImageBytes);
        return { contents: [{ uri: uri.href, mimeType: "image/png", blob: file.bytes.toString("base64") }] };
      } catch (error) {
        // Resource reads have no isError result; a protocol error carries the same line.
        throw new Error(toSegError(error, "INVALID_INPUT").toLine());
      }
    },
  );

  server.registerResource(
    "model",
    MODEL_RESOURCE_URI,
    {
      title: "Model pack",
      description: "The loaded model pack: name, sizes, provenance, execution provider.",
      mimeType: "application/json",
    },
    async (uri) => ({
      contents: [
        { uri: uri.href, mimeType: "application/json", text: JSON.stringify(await engine.info(), null, 2) },
      ],
    }),
  );
  return server;
}

// ---------------------------------------------------------------------------------------------
// stdio

/**
 * Serve one client over stdin/stdout until it disconnects (the caller owns and releases the engine).
 * The SDK's serveStdio picks the revision from the client's first message (initialize: 2025;
 * `_meta` naming 2026-07-28, e.g. server/discover: 2026-07-28) and keeps one server for the
 * connection; our transport (stdio.ts) answers malformed lines and bounds their size first.
 */
export async function serveStdio(config: Config, engine: Engine, logger: Logger): Promise<void> {
  // Room for the largest accepted data: URI (base64 is 4/3 of the bytes) and the JSON around it.
  const maxLineBytes = Math.ceil((config.maxDataUriBytes * 4) / 3) + 256 * 1024;
  const transport = new StdioTransport(process.stdin, process.stdout, { maxLineBytes });
  const closed = new Promise<void>((resolve) => {
    void transport.closed.then(resolve);
    process.once("SIGINT", () => resolve());
    process.once("SIGTERM", () => resolve());
  });
  const connection = serveStdioConnection(
    ({ era }) => createServer(config, engine, logger, { trustRoots: true, era }),
    { transport, onerror: (error) => logger.warn(`stdio: ${error.message}`) },
  );
  logger.info(`serving on stdio (pack ${config.packDir}, output ${config.outDir})`);
  await closed;
  await connection.close().catch(() => undefined);
}

// ---------------------------------------------------------------------------------------------
// Streamable HTTP

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
