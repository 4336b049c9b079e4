/**
 * The runtime's public API: a WorkerEngine runs the Pipeline in a worker thread, because
 * onnxruntime's `run()` blocks the event loop for a whole forward pass and the MCP connection must
 * keep answering pings, progress and cancellation meanwhile. Calls wait in one SerialQueue and go to
 * the worker one at a time. The worker loads the pack when `start()` is called or at the first call;
 * a worker that dies is replaced on the next call (the call in flight fails with INFERENCE_FAILED).
 */

// Side effect first: the worker's onnxruntime reads the environment this thread sets.
import "./no-telemetry.js";
import { existsSync } from "node:fs";
import { fileURLToPath } from "node:url";
import { Worker } from "node:worker_threads";
import { SegError, throwIfAborted } from "../errors.js";
import { silentLogger } from "../logger.js";
import { SerialQueue } from "./queue.js";
import {
  type DescribeRequest,
  type DescribeResult,
  ENGINE_DEFAULTS,
  type Engine,
  type EngineOptions,
  type GroundRequest,
  type GroundResult,
  type PackInfo,
  type ProgressFn,
  type RequestOptions,
  type SegmentRequest,
  type SegmentResult,
  type StageTimings,
} from "./types.js";
import type { EngineMethod, WorkerMessage, WorkerRequest } from "./worker.js";

/** The compiled worker. Under vitest (sources run as .ts) the build output is used instead. */
function workerUrl(): URL {
  const here = new URL("./worker.js", import.meta.url);
  if (existsSync(fileURLToPath(here))) return here;
  const built = new URL("../../dist/src/runtime/worker.js", import.meta.url);
  if (existsSync(fileURLToPath(built))) return built;
  throw new SegError("MODEL_LOAD_FAILED", "the engine worker is not built: run `npm run build` first");
}

interface InFlight {
  resolve: (value: unknown) => void;
  reject: (error: SegError) => void;
  onProgress: ProgressFn | undefined;
}

export class WorkerEngine implements Engine {
  readonly #options: Omit<EngineOptions, "log">;
  readonly #log;
  readonly #queue: SerialQueue;
  #worker: Worker | undefined;
  #ready: Promise<PackInfo> | undefined;
  #nextId = 1;
  /** The one call the worker is running (the queue lets one through at a time). */
  #inFlight: { id: number; call: InFlight } | undefined;
  #disposed = false;

  constructor(options: EngineOptions) {
    const { log, ...rest } = options;
    this.#options = rest;
    this.#log = log ?? silentLogger;
    this.#queue = new SerialQueue(options.maxQueue ?? ENGINE_DEFAULTS.maxQueue);
  }

  /** Start (or restart after a crash) the worker; resolves with the pack's description once loaded. */
  start(): Promise<PackInfo> {
    if (this.#ready) return this.#ready;
    const worker = new Worker(workerUrl(), { workerData: this.#options });
    this.#worker = worker;
    this.#ready = new Promise<PackInfo>((resolve, reject) => {
      let started = false;
      worker.on("message", (msg: WorkerMessage) => {
        switch (msg.kind) {
          case "ready":
            started = true;
            resolve(msg.info);
            break;
          case "init-error":
            reject(SegError.deserialize(msg.error));
            this.#reset(worker);
            void worker.terminate();
            break;
          case "log":
            this.#log[msg.level](msg.message);
            break;
          case "progress":
            if (this.#inFlight?.id === msg.id) this.#inFlight.call.onProgress?.(msg.progress);
            break;
          case "result":
          case "error": {
            if (this.#inFlight?.id !== msg.id) break;
            const { call } = this.#inFlight;
            this.#inFlight = undefined;
            if (msg.kind === "result") call.resolve(msg.value);
            else call.reject(SegError.deserialize(msg.error));
            break;
          }
          default:
            break;
        }
      });
      worker.on("error", (error) => {
        this.#log.error(`engine worker crashed: ${error.message}`);
        if (!started)
          reject(new SegError("MODEL_LOAD_FAILED", `engine worker failed to start: ${error.message}`));
      });
      worker.on("exit", (code) => {
        if (this.#worker !== worker) return;
        this.#reset(worker);
        if (!started) reject(new SegError("MODEL_LOAD_FAILED", `engine worker exited with code ${code}`));
        const inFlight = this.#inFlight;
        this.#inFlight = undefined;
        inFlight?.call.reject(
          new SegError(
            "INFERENCE_FAILED",
            `the inference worker stopped (exit code ${code}); it will restart`,
          ),
        );
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

  async #call<T>(method: EngineMethod, req: RequestOptions & object): Promise<T> {
    const { signal, onProgress, ...args } = req;
    onProgress?.({ stage: "queued", fraction: 0 });
    const { value, waitedMs } = await this.#queue.run(async () => {
      if (this.#disposed) throw new SegError("INFERENCE_FAILED", "the engine was disposed");
      if (!this.#ready) onProgress?.({ stage: "load", fraction: 0 });
      await this.start();
      // Cancelled while the worker was (re)starting: the listener below would never fire.
      throwIfAborted(signal);
      const worker = this.#worker;
      if (!worker) throw new SegError("INFERENCE_FAILED", "the inference worker is not running");
      const id = this.#nextId++;
      const onAbort = () => worker.postMessage({ kind: "cancel", id } satisfies WorkerRequest);
      signal?.addEventListener("abort", onAbort, { once: true });
      try {
        return await new Promise<T>((resolve, reject) => {
          this.#inFlight = { id, call: { resolve: resolve as (v: unknown) => void, reject, onProgress } };
          try {
            worker.postMessage({ kind: "call", id, method, args } satisfies WorkerRequest);
          } catch (cause) {
            this.#inFlight = undefined;
            reject(
              new SegError(
                "INVALID_INPUT",
                `the request cannot be sent to the engine: ${(cause as Error).message}`,
              ),
            );
          }
        });
      } finally {
        signal?.removeEventListener("abort", onAbort);
      }
    }, signal);
    const timings = (value as { timings?: StageTimings }).timings;
    if (timings) timings.queue = Math.round(waitedMs * 10) / 10;
    return value;
  }

  /** The loaded pack (loads it first if needed; never waits behind a running call). */
  info(): Promise<PackInfo> {
    if (this.#disposed) return Promise.reject(new SegError("INFERENCE_FAILED", "the engine was disposed"));
    return this.start();
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
      worker.once("exit", () => resolve());
      worker.on("message", (m: WorkerMessage) => {
        if (m.kind === "disposed") void worker.terminate();
      });
      worker.postMessage({ kind: "dispose" } satisfies WorkerRequest);
      setTimeout(() => void worker.terminate(), 5000).unref();
    });
  }
}

/** An engine whose worker has loaded the pack (load errors surface here). */
export async function createEngine(options: EngineOptions): Promise<Engine> {
  const engine = new WorkerEngine(options);
  try {
    await engine.start();
  } catch (error) {
    await engine.dispose();
    throw error;
  }
  return engine;
}
