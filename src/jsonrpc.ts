/**
 * The gate every incoming message passes before the MCP SDK sees it, on stdio and HTTP alike: what
 * the SDK would drop without a word (invalid JSON, a batch, a message of the wrong shape) gets the
 * JSON-RPC error it deserves, with the request's id where one can be read, in a sentence.
 */

import {
  type JSONRPCMessage,
  PROTOCOL_VERSION_META_KEY,
  specTypeSchemas,
} from "@modelcontextprotocol/server";
import { truncate } from "./paths.js";

export const PARSE_ERROR = -32700;
export const INVALID_REQUEST = -32600;
export const INVALID_PARAMS = -32602;

export interface JsonRpcErrorReply {
  jsonrpc: "2.0";
  id: string | number | null;
  error: { code: number; message: string };
}

/** A tool result the gate answers itself (a refused call is a tool error, not a protocol error). */
export interface JsonRpcResultReply {
  jsonrpc: "2.0";
  id: string | number;
  result: {
    isError: true;
    content: { type: "text"; text: string }[];
    _meta: { code: string };
    /** Protocol revision 2026-07-28: every result says what it is. */
    resultType?: "complete";
  };
}

export type Admission = { message: JSONRPCMessage } | { reply: JsonRpcErrorReply | JsonRpcResultReply };

/** Keys no caller may send: parsing would turn them into an object's prototype machinery. */
export const FORBIDDEN_KEYS = ["__proto__", "constructor", "prototype"];

export function errorReply(id: string | number | null, code: number, message: string): JsonRpcErrorReply {
  return { jsonrpc: "2.0", id, error: { code, message } };
}

function isObject(value: unknown): value is Record<string, unknown> {
  return typeof value === "object" && value !== null && !Array.isArray(value);
}

/** A line of text from a stream transport (a leading byte-order mark is tolerated). */
export function admitText(text: string): Admission {
  let value: unknown;
  try {
    value = JSON.parse(text.replace(/^\uFEFF/, ""));
  } catch (error) {
    return {
      reply: errorReply(
        null,
        PARSE_ERROR,
        `Parse error: the message is not valid JSON (${truncate((error as Error).message, 120)}): send one JSON-RPC object per line`,
      ),
    };
  }
  return admitValue(value);
}

/** A parsed JSON value. */
export function admitValue(value: unknown): Admission {
  if (Array.isArray(value)) {
    return {
      reply: errorReply(
        null,
        INVALID_REQUEST,
        "Invalid Request: batches are not supported (MCP removed them in 2025-06-18): send one message at a time",
      ),
    };
  }
  if (typeof value !== "object" || value === null) {
    return {
      reply: errorReply(null, INVALID_REQUEST, "Invalid Request: a JSON-RPC message must be an object"),
    };
  }
  const v = value as Record<string, unknown>;
  const hasId = Object.hasOwn(v, "id");
  const idOk = typeof v.id === "string" || (typeof v.id === "number" && Number.isFinite(v.id));
  const id = idOk ? (v.id as string | number) : null;
  const invalid = (why: string, code = INVALID_REQUEST): Admission => ({
    reply: errorReply(id, code, `${code === INVALID_PARAMS ? "Invalid params" : "Invalid Request"}: ${why}`),
  });
  if (hasId && !idOk) return invalid("id must be a string or a number");
  if (v.jsonrpc !== "2.0") return invalid(`"jsonrpc" must be "2.0"`);
  if (Object.hasOwn(v, "method")) {
    if (typeof v.method !== "string" || v.method.length === 0)
      return invalid("method must be a non-empty string");
    if (Object.hasOwn(v, "params") && !isObject(v.params))
      return invalid("params must be an object", INVALID_PARAMS);
    if (v.method === "tools/call") {
      // The SDK checks these with a schema whose failure reads as a dump; say it in a sentence here.
      const params = (v.params ?? {}) as Record<string, unknown>;
      if (typeof params.name !== "string") {
        return invalid("tools/call needs params.name, the name of a tool (see tools/list)", INVALID_PARAMS);
      }
      if (params.arguments !== undefined && !isObject(params.arguments)) {
        const a = params.arguments;
        const what = Array.isArray(a) ? "an array" : a === null ? "null" : `a ${typeof a}`;
        return invalid(
          `the arguments of ${truncate(params.name, 60)} must be an object of its fields (see tools/list), not ${what}`,
          INVALID_PARAMS,
        );
      }
      // Caught before any parsing copies the arguments: a copy turns "__proto__" into a prototype.
      const forbidden = FORBIDDEN_KEYS.filter(
        (k) => isObject(params.arguments) && Object.hasOwn(params.arguments, k),
      );
      if (forbidden.length > 0 && id !== null) {
        const text = `INVALID_INPUT: unknown field(s) ${forbidden.map((k) => `"${k}"`).join(", ")} for ${truncate(params.name, 60)}: send only the fields tools/list names`;
        // A 2026-07-28 request (its _meta names the revision) gets the result shape of that revision.
        const meta = params._meta;
        const modern = isObject(meta) && typeof meta[PROTOCOL_VERSION_META_KEY] === "string";
        return {
          reply: {
            jsonrpc: "2.0",
            id,
            result: {
              isError: true,
              content: [{ type: "text", text }],
              _meta: { code: "INVALID_INPUT" },
              ...(modern ? { resultType: "complete" as const } : {}),
            },
          },
        };
      }
    }
  } else if (!hasId || !(Object.hasOwn(v, "result") || Object.hasOwn(v, "error"))) {
    return invalid(
      "a message needs a method (a request or a notification), or an id with a result or an error",
    );
  }
  const parsed = specTypeSchemas.JSONRPCMessage["~standard"].validate(v);
  if (parsed.issues) {
    const issue = parsed.issues[0];
    const path = (issue?.path ?? []).map((p) => String(typeof p === "object" ? p.key : p));
    const where = path.length > 0 ? `${path.join(".")}: ` : "";
    return invalid(`${where}${issue?.message ?? "not a JSON-RPC message"}`);
  }
  return { message: parsed.value as JSONRPCMessage };
}
