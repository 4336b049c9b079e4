/**
 * MCP clients of both protocol revision families behind one small interface, so a test runs the same
 * steps as a 2025 client and as a 2026-07-28 client:
 *
 * - legacy: the v1 SDK's Client (`@modelcontextprotocol/sdk` 1.32.2), initialize handshake, 2025-11-25;
 * - modern: the v2 SDK's Client (`@modelcontextprotocol/client` 2.4.0) with version negotiation on,
 *   no initialize, every request carrying its revision (2026-07-28) in `_meta`.
 *
 * Each transport kind (in-memory, stdio, Streamable HTTP) comes from the same SDK as its client.
 */

import {
  type CallToolResult,
  type ReadResourceResult,
  type Tool,
  Client as V2Client,
  StreamableHTTPClientTransport as V2Http,
  InMemoryTransport as V2Memory,
} from "@modelcontextprotocol/client";
import { StdioClientTransport as V2Stdio } from "@modelcontextprotocol/client/stdio";
import { Client as V1Client } from "@modelcontextprotocol/sdk/client/index.js";
import { StdioClientTransport as V1Stdio } from "@modelcontextprotocol/sdk/client/stdio.js";
import { StreamableHTTPClientTransport as V1Http } from "@modelcontextprotocol/sdk/client/streamableHttp.js";
import { InMemoryTransport as V1Memory } from "@modelcontextprotocol/sdk/inMemory.js";
import { ListRootsRequestSchema } from "@modelcontextprotocol/sdk/types.js";
import type { McpServerFactory, Transport as ServerTransport } from "@modelcontextprotocol/server";
import { serveStdio } from "@modelcontextprotocol/server/stdio";

export const ERAS = ["legacy", "modern"] as const;
export type Era = (typeof ERAS)[number];

/** The revision each client negotiates with this server (its newest of the family). */
export const REVISION: Record<Era, string> = { legacy: "2025-11-25", modern: "2026-07-28" };

/** Which client speaks for each era. */
export const CLIENT: Record<Era, string> = {
  legacy: "v1 SDK client (@modelcontextprotocol/sdk 1.32.2)",
  modern: "v2 SDK client (@modelcontextprotocol/client 2.4.0)",
};

export interface Root {
  uri: string;
  name?: string;
}

export interface ClientOptions {
  name?: string;
  /**
   * Offer MCP roots: asked with roots/list (2025) or with an input request in an `input_required`
   * answer (2026-07-28); the v2 client answers that from the same handler.
   */
  roots?: () => Promise<Root[]>;
  /**
   * 2026-07-28 only: "auto" probes with server/discover and falls back to initialize (a real
   * client's setting; over the SDK's stdio transport the probe runs in a second process), "pin"
   * (the default) insists on 2026-07-28.
   */
  negotiation?: "auto" | "pin";
}

export interface CallOptions {
  onprogress?: (p: { progress: number; total?: number | undefined; message?: string | undefined }) => void;
  signal?: AbortSignal;
  timeout?: number;
}

/** What a test does with a client, the same for both SDKs. */
export interface TestClient {
  readonly era: Era;
  /** The revision the connection negotiated (initialize result, or server/discover). */
  protocolVersion(): string | undefined;
  instructions(): string | undefined;
  listTools(): Promise<{ tools: Tool[] }>;
  callTool(name: string, args?: unknown, options?: CallOptions): Promise<CallToolResult>;
  readResource(uri: string): Promise<ReadResourceResult>;
  /** Protocol errors the client saw (anything that is not a message on stdout would show here). */
  readonly errors: Error[];
  close(): Promise<void>;
}

/** A client transport of the era's SDK. */
export type ClientTransport = { era: Era; transport: unknown };

export function memoryPair(era: Era): [ClientTransport, ServerTransport] {
  const [client, server] = era === "legacy" ? V1Memory.createLinkedPair() : V2Memory.createLinkedPair();
  return [{ era, transport: client }, server as unknown as ServerTransport];
}

export interface StdioParams {
  command: string;
  args: string[];
  cwd?: string;
  env?: Record<string, string>;
}

export function stdioTransport(
  era: Era,
  params: StdioParams,
): ClientTransport & { stderr: NodeJS.ReadableStream | null } {
  const options = { ...params, stderr: "pipe" as const };
  const transport = era === "legacy" ? new V1Stdio(options) : new V2Stdio(options);
  return { era, transport, stderr: transport.stderr as NodeJS.ReadableStream | null };
}

export function httpTransport(
  era: Era,
  url: string,
  headers: Record<string, string> = {},
): ClientTransport & { sessionId(): string | undefined; terminateSession(): Promise<void> } {
  const transport =
    era === "legacy"
      ? new V1Http(new URL(url), { requestInit: { headers } })
      : new V2Http(new URL(url), { requestInit: { headers } });
  return {
    era,
    transport,
    sessionId: () => transport.sessionId,
    terminateSession: () => transport.terminateSession(),
  };
}

/** Connect a client of `t.era` over `t`. */
export async function connectClient(t: ClientTransport, options: ClientOptions = {}): Promise<TestClient> {
  const info = { name: options.name ?? `test-${t.era}`, version: "1.0.0" };
  const errors: Error[] = [];
  const roots = options.roots;
  if (t.era === "legacy") {
    const client = new V1Client(info, roots ? { capabilities: { roots: { listChanged: true } } } : {});
    if (roots) client.setRequestHandler(ListRootsRequestSchema, async () => ({ roots: await roots() }));
    client.onerror = (error) => errors.push(error);
    // The v1 client tells its transport the negotiated revision (for the HTTP header); keep a copy.
    const transport = t.transport as Parameters<V1Client["connect"]>[0];
    let version: string | undefined;
    const set = transport.setProtocolVersion?.bind(transport);
    transport.setProtocolVersion = (v: string) => {
      version = v;
      set?.(v);
    };
    await client.connect(transport);
    return {
      era: t.era,
      errors,
      protocolVersion: () => version,
      instructions: () => client.getInstructions(),
      listTools: () => client.listTools() as Promise<{ tools: Tool[] }>,
      callTool: (name, args, o = {}) =>
        client.callTool(
          { name, ...(args === undefined ? {} : { arguments: args as Record<string, unknown> }) },
          undefined,
          o,
        ) as Promise<CallToolResult>,
      readResource: (uri) => client.readResource({ uri }) as Promise<ReadResourceResult>,
      close: () => client.close(),
    };
  }
  const client = new V2Client(info, {
    capabilities: roots ? { roots: { listChanged: true } } : {},
    versionNegotiation: {
      mode: options.negotiation === "auto" ? "auto" : { pin: REVISION.modern },
    },
  });
  if (roots) client.setRequestHandler("roots/list", async () => ({ roots: await roots() }));
  client.onerror = (error) => errors.push(error);
  await client.connect(t.transport as Parameters<V2Client["connect"]>[0]);
  return {
    era: t.era,
    errors,
    protocolVersion: () => client.getNegotiatedProtocolVersion(),
    instructions: () => client.getInstructions(),
    listTools: () => client.listTools(),
    callTool: (name, args, o = {}) =>
      client.callTool(
        { name, ...(args === undefined ? {} : { arguments: args as Record<string, unknown> }) },
        o,
      ),
    readResource: (uri) => client.readResource({ uri }),
    close: () => client.close(),
  };
}

/**
 * Serve one in-memory connection the way stdio is served (the SDK's serveStdio: the client's first
 * message picks the revision) and connect a client of `era` to it.
 */
export async function connectInMemory(
  era: Era,
  factory: McpServerFactory,
  options: ClientOptions = {},
): Promise<TestClient> {
  const [client, server] = memoryPair(era);
  const connection = serveStdio(factory, { transport: server });
  const connected = await connectClient(client, options);
  return {
    ...connected,
    close: async () => {
      await connected.close();
      await connection.close();
    },
  };
}
