/**
 * The MCP server: three tools, a resource template serving the masks it wrote, and the model's
 * description as a resource. `createServer` builds one McpServer (one per connection, or per request
 * where serving is stateless); the engine, its queue and the logger are shared between them.
 * Transports: stdio (here) and Streamable HTTP (http.ts). Both serve protocol revision 2026-07-28 (stateless: no
 * initialize, every request carries its revision and client in `_meta`) and the 2025 revisions
 * (initialize handshake, 2025-11-25 and earlier), chosen per connection (stdio) or per request (HTTP)
 * by what the client sends.
 */

import {
  CLIENT_CAPABILITIES_META_KEY,
  type ClientCapabilities,
  type InputRequiredResult,
  inputRequired,
  inputResponse,
  McpServer,
  ResourceTemplate,
} from "@modelcontextprotocol/server";
import { serveStdio as serveStdioConnection } from "@modelcontextprotocol/server/stdio";
import { type Config, PACKAGE_NAME, packageInfo } from "./config.js";
import { toSegError } from "./errors.js";
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
