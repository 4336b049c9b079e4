/**
 * Worker-thread side of the engine: owns the LocalEngine (and so every onnxruntime session), answers
 * requests from engine.ts, reports progress, and aborts a request when asked.
 */

import { parentPort, workerData } from "node:worker_threads";
import { toSegError } from "../errors.js";
import { type EngineConfig, LocalEngine } from "./local-engine.js";
import type { DescribeRequest, Engine, GroundRequest, SegmentRequest } from "./types.js";

export type WorkerRequest =
  | { kind: "call"; id: number; method: "info" | "ground" | "segment" | "describe"; args: unknown }
  | { kind: "cancel"; id: number }
  | { kind: "dispose" };

export type WorkerMessage =
  | { kind: "ready" }
  | { kind: "init-error"; error: { code: string; message: string } }
  | { kind: "result"; id: number; value: unknown }
  | { kind: "error"; id: number; error: { code: string; message: string } }
  | { kind: "progress"; id: number; progress: unknown }
  | { kind: "log"; message: string }
  | { kind: "disposed" };

const port = parentPort;
if (!port) throw new Error("worker.ts must run in a worker thread");

const post = (m: WorkerMessage) => port.postMessage(m);
const controllers = new Map<number, AbortController>();
let engine: Engine | undefined;

try {
  const config = workerData as Omit<EngineConfig, "log">;
  engine = await LocalEngine.create({ ...config, log: (message) => post({ kind: "log", message }) });
  post({ kind: "ready" });
} catch (e) {
  const err = toSegError(e, "MODEL_LOAD_FAILED");
  post({ kind: "init-error", error: { code: err.code, message: err.message } });
}

port.on("message", async (msg: WorkerRequest) => {
  if (msg.kind === "cancel") {
    controllers.get(msg.id)?.abort();
    return;
  }
  if (msg.kind === "dispose") {
    await engine?.dispose();
    post({ kind: "disposed" });
    return;
  }
  const live = engine;
  if (!live) return;
  const controller = new AbortController();
  controllers.set(msg.id, controller);
  const common = {
    signal: controller.signal,
    onProgress: (progress: unknown) => post({ kind: "progress", id: msg.id, progress }),
  };
  try {
    let value: unknown;
    // Arguments were typed on the other side of the thread boundary (engine.ts).
    const args = msg.args as object;
    if (msg.method === "info") value = await live.info();
    else if (msg.method === "ground") value = await live.ground({ ...(args as GroundRequest), ...common });
    else if (msg.method === "segment") value = await live.segment({ ...(args as SegmentRequest), ...common });
    else value = await live.describe({ ...(args as DescribeRequest), ...common });
    post({ kind: "result", id: msg.id, value });
  } catch (e) {
    const err = toSegError(e);
    post({ kind: "error", id: msg.id, error: { code: err.code, message: err.message } });
  } finally {
    controllers.delete(msg.id);
  }
});
