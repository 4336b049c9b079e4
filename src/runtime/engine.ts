/**
 * The runtime's public API. `createEngine` starts the pipeline in a worker thread, because
 * onnxruntime's `run()` blocks the event loop for a whole forward pass and the MCP connection must
 * keep answering pings, progress and cancellation meanwhile. A worker that dies is replaced on the
 * next call; the calls that were in flight fail with INFERENCE_FAILED.
 */

import { existsSync } from "node:fs";
import { fileURLToPath } from "node:url";
import { Worker } from "node:worker_threads";
import { type ErrorCode, SegError } from "../errors.js";
import type { EngineConfig } from "./local-engine.js";
import type {
  DescribeRequest,
  DescribeResult,
  Engine,
  GroundRequest,
  GroundResult,
  PackInfo,
  ProgressFn,
  RequestOptions,
  SegmentRequest,
  SegmentResult,
} from "./types.js";
import type { WorkerMessage, WorkerRequest } from "./worker.js";

export type { EngineConfig } from "./local-engine.js";
export { LocalEngine } from "./local-engine.js";

/** The compiled worker. Under vitest (sources run as .ts) the build output is used instead. */
function workerUrl(): URL {
  const here = new URL("./worker.js", import.meta.url);
  if (existsSync(fileURLToPath(here))) return here;
  const built = new URL("../../dist/src/runtime/worker.js", import.meta.url);
  if (existsSync(fileURLToPath(built))) return built;
  throw new SegError("MODEL_LOAD_FAILED", "the engine worker is not built: run `npm run build` first");
}

interface Pending {
  resolve: (value: unknown) => void;
  reject: (error: SegError) => void;
  onProgress: ProgressFn | undefined;
  cleanup: () => void;
}

class WorkerEngine implements Engine {
  readonly #config: Omit<EngineConfig, "log">;
  readonly #log: (message: string) => void;
  #worker: Worker | undefined;
  #ready: Promise<void> | undefined;
  #nextId = 1;
  readonly #pending = new Map<number, Pending>();
  #disposed = false;

  constructor(config: EngineConfig) {
    const { log, ...rest } = config;
    this.#config = rest;
    this.#log = log ?? ((m) => process.stderr.write(`${m}\n`));
  }

  /** Start (or restart after a crash) the worker and wait until the pack is loaded. */
  start(): Promise<void> {
    if (this.#ready) return this.#ready;
    const worker = new Worker(workerUrl(), { workerData: this.#config });
    this.#worker = worker;
    this.#ready = new Promise<void>((resolve, reject) => {
      let started = false;
      worker.on("message", (msg: WorkerMessage) => {
        if (msg.kind === "ready") {
          started = true;
          resolve();
        } else if (msg.kind === "init-error") {
          reject(new SegError(msg.error.code as ErrorCode, msg.error.message));
          this.#reset(worker);
          void worker.terminate();
        } else if (msg.kind === "log") this.#log(msg.message);
        else if (msg.kind === "progress") {
          this.#pending.get(msg.id)?.onProgress?.(msg.progress as Parameters<ProgressFn>[0]);
        } else if (msg.kind === "result" || msg.kind === "error") {
          const pending = this.#pending.get(msg.id);
          if (!pending) return;
          this.#pending.delete(msg.id);
          pending.cleanup();
          if (msg.kind === "result") pending.resolve(msg.value);
          else pending.reject(new SegError(msg.error.code as ErrorCode, msg.error.message));
        }
      });
      worker.on("error", (error) => {
        this.#log(`engine worker crashed: ${error.message}`);
        if (!started)
          reject(new SegError("MODEL_LOAD_FAILED", `engine worker failed to start: ${error.message}`));
      });
      worker.on("exit", (code) => {
        if (this.#worker !== worker) return;
        this.#reset(worker);
        if (!started) reject(new SegError("MODEL_LOAD_FAILED", `engine worker exited with code ${code}`));
        for (const [id, pending] of this.#pending) {
          this.#pending.delete(id);
          pending.cleanup();
          pending.reject(
            new SegError(
              "INFERENCE_FAILED",
              `the inference worker stopped (exit code ${code}); it will restart`,
            ),
          );
        }
      });
    });
    return this.#ready;
  }

  #reset(worker: Worker): void {
    if (this.#worker === worker) {
      this.#worker = undefined;
      this.#ready = undefined;
    }
  }

  async #call<T>(
    method: "info" | "ground" | "segment" | "describe",
    req: (RequestOptions & object) | undefined,
  ): Promise<T> {
    if (this.#disposed) throw new SegError("INFERENCE_FAILED", "the engine was disposed");
    const { signal, onProgress, ...args } = (req ?? {}) as RequestOptions & Record<string, unknown>;
    if (signal?.aborted) throw new SegError("CANCELLED", "the request was cancelled");
    await this.start();
    // Cancelled while the worker was (re)starting: the listener below would never fire.
    if (signal?.aborted) throw new SegError("CANCELLED", "the request was cancelled");
    const worker = this.#worker;
    if (!worker) throw new SegError("INFERENCE_FAILED", "the inference worker is not running");
    const id = this.#nextId++;
    return new Promise<T>((resolve, reject) => {
      const onAbort = () => worker.postMessage({ kind: "cancel", id } satisfies WorkerRequest);
      const cleanup = () => signal?.removeEventListener("abort", onAbort);
      signal?.addEventListener("abort", onAbort, { once: true });
      this.#pending.set(id, { resolve: resolve as (v: unknown) => void, reject, onProgress, cleanup });
      try {
        worker.postMessage({ kind: "call", id, method, args } satisfies WorkerRequest);
      } catch (cause) {
        this.#pending.delete(id);
        cleanup();
        reject(
          new SegError(
            "INVALID_INPUT",
            `the request cannot be sent to the engine: ${(cause as Error).message}`,
          ),
        );
      }
    });
  }

  info(): Promise<PackInfo> {
    return this.#call("info", undefined);
  }
  ground(req: GroundRequest): Promise<GroundResult> {
    return this.#call("ground", req);
  }
  segment(req: SegmentRequest): Promise<SegmentResult> {
    return this.#call("segment", req);
  }
  describe(req: DescribeRequest): Promise<DescribeResult> {
    return this.#call("describe", req);
  }

  async dispose(): Promise<void> {
    if (this.#disposed) return;
    this.#disposed = true;
    const worker = this.#worker;
    if (!worker) return;
    await new Promise<void>((resolve) => {
      const done = () => resolve();
      worker.once("exit", done);
      worker.on("message", (m: WorkerMessage) => {
        if (m.kind === "disposed") void worker.terminate();
      });
      worker.postMessage({ kind: "dispose" } satisfies WorkerRequest);
      setTimeout(() => void worker.terminate(), 5000).unref();
    });
  }
}

/** Start the engine in a worker thread and wait until the pack is loaded (errors surface here). */
export async function createEngine(config: EngineConfig): Promise<Engine> {
  const engine = new WorkerEngine(config);
  await engine.start();
  return engine;
}
