/**
 * MCP over stdio, newline-delimited JSON-RPC. Our own transport instead of the SDK's because the
 * SDK's drops a malformed line without an answer and closes the connection for good (the server then
 * exits without a word) on a line over its 10 MiB buffer. Here every line passes the JSON-RPC gate
 * (jsonrpc.ts) and gets an error reply when it must; a line over the limit is skipped up to its end
 * and answered with an error that says what to send instead; the connection stays up.
 */

import type { Readable, Writable } from "node:stream";
import type { JSONRPCMessage, Transport } from "@modelcontextprotocol/server";
import { admitText, errorReply, INVALID_REQUEST } from "./jsonrpc.js";

const NEWLINE = 0x0a;

export class StdioTransport implements Transport {
  onclose?: () => void;
  onerror?: (error: Error) => void;
  onmessage?: (message: JSONRPCMessage) => void;

  readonly #input: Readable;
  readonly #output: Writable;
  readonly #maxLineBytes: number;
  #pending: Buffer[] = [];
  #pendingBytes = 0;
  /** Inside a line over the limit: drop bytes until its newline. */
  #skipping = false;
  #closed = false;
  #resolveClosed!: () => void;
  /**
   * Settles when the connection has closed (the client ended stdin, or close() was called). The
   * owner of the connection (the SDK's serveStdio) takes `onclose` for itself; this is for ours.
   */
  readonly closed = new Promise<void>((resolve) => {
    this.#resolveClosed = resolve;
  });

  constructor(input: Readable, output: Writable, options: { maxLineBytes: number }) {
    this.#input = input;
    this.#output = output;
    this.#maxLineBytes = options.maxLineBytes;
  }

  async start(): Promise<void> {
    this.#input.on("data", this.#onData);
    this.#input.on("error", this.#onError);
    this.#input.on("end", this.#onEnd);
  }

  readonly #onData = (chunk: Buffer): void => {
    let at = 0;
    while (at < chunk.length) {
      const nl = chunk.indexOf(NEWLINE, at);
      const end = nl < 0 ? chunk.length : nl;
      if (!this.#skipping) {
        this.#pending.push(chunk.subarray(at, end));
        this.#pendingBytes += end - at;
        if (this.#pendingBytes > this.#maxLineBytes) {
          this.#pending = [];
          this.#pendingBytes = 0;
          this.#skipping = true;
        }
      }
      if (nl < 0) break;
      if (this.#skipping) {
        this.#skipping = false;
        this.#reply(
          errorReply(
            null,
            INVALID_REQUEST,
            `Invalid Request: a message over ${this.#maxLineBytes} bytes was skipped: pass large images as file paths inside an allowed directory instead of data: URIs`,
          ),
        );
      } else {
        const line = Buffer.concat(this.#pending).toString("utf8").replace(/\r$/, "");
        this.#pending = [];
        this.#pendingBytes = 0;
        if (line.trim().length > 0) this.#handle(line);
      }
      at = nl + 1;
    }
  };

  #handle(line: string): void {
    const admitted = admitText(line);
    if ("reply" in admitted) this.#reply(admitted.reply);
    else this.onmessage?.(admitted.message);
  }

  #reply(message: object): void {
    this.send(message as JSONRPCMessage).catch((error: unknown) => this.onerror?.(error as Error));
  }

  readonly #onError = (error: Error): void => {
    this.onerror?.(error);
  };

  readonly #onEnd = (): void => {
    void this.close();
  };

  send(message: JSONRPCMessage): Promise<void> {
    return new Promise((resolve) => {
      if (this.#closed) return resolve();
      if (this.#output.write(`${JSON.stringify(message)}\n`)) resolve();
      else this.#output.once("drain", resolve);
    });
  }

  async close(): Promise<void> {
    if (this.#closed) return;
    this.#closed = true;
    this.#input.off("data", this.#onData);
    this.#input.off("error", this.#onError);
    this.#input.off("end", this.#onEnd);
    this.#input.pause();
    this.#pending = [];
    this.#resolveClosed();
    this.onclose?.();
  }
}
