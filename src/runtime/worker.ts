/**
 * Worker-thread side of the engine: owns the Pipeline (and so every onnxruntime session), runs the
 * calls engine.ts sends (one at a time), reports progress, and aborts a call when asked.
 */

import { parentPort, workerData } from "node:worker_threads";
import { type SerializedError, toSegError } from "../errors.js";
import { forwardingLogger, type MessageLevel } from "../logger.js";
import { Pipeline } from "./pipeline.js";
import type { DescribeRequest, EngineOptions, GroundRequest, PackInfo, SegmentRequest } from "./types.js";

export type EngineMethod = "ground" | "segment" | "describe";

export type WorkerRequest =
  | { kind: "call"; id: number; method: EngineMethod; args: unknown }
  | { kind: "cancel"; id: number }
  | { kind: "dispose" };

export type WorkerMessage =
  | { kind: "ready"; info: PackInfo }
  | { kind: "init-error"; error: SerializedError }
  | { kind: "result"; id: number; value: unknown }
  | { kind: "error"; id: number; error: SerializedError }
  | { kind: "progress"; id: number; progress: Parameters<NonNullable<GroundRequest["onProgress"]>>[0] }
  | { kind: "log"; level: MessageLevel; message: string }
  | { kind: "disposed" };

const port = parentPort;
if (!port) throw new Error("worker.ts must run in a worker thread");

const post = (m: WorkerMessage) => port.postMessage(m);
const controllers = new Map<number, AbortController>();
let pipeline: Pipeline | undefined;

try {
  const options = workerData as Omit<EngineOptions, "log">;
  pipeline = await Pipeline.create({
    ...options,
    log: forwardingLogger((level, message) => post({ kind: "log", level, message })),
  });
  post({ kind: "ready", info: await pipeline.info() });
} catch (e) {
  post({ kind: "init-error", error: toSegError(e, "MODEL_LOAD_FAILED").serialize() });
}

port.on("message", async (msg: WorkerRequest) => {
  if (msg.kind === "cancel") {
    controllers.get(msg.id)?.abort();
    return;
  }
  if (msg.kind === "dispose") {
    await pipeline?.dispose();
    post({ kind: "disposed" });
    return;
  }
  const live = pipeline;
  if (!live) return;
  const controller = new AbortController();
  controllers.set(msg.id, controller);
  const common = {
    signal: controller.signal,
    onProgress: (progress: Parameters<NonNullable<GroundRequest["onProgress"]>>[0]) =>
      post({ kind: "progress", id: msg.id, progress }),
  };
  try {
    // Arguments were typed on the other side of the thread boundary (engine.ts).
    const args = msg.args as object;
    const value =
      msg.method === "ground"
        ? await live.ground({ ...(args as GroundRequest), ...common })
        : msg.method === "segment"
          ? await live.segment({ ...(args as SegmentRequest), ...common })
          : await live.describe({ ...(args as DescribeRequest), ...common });
    post({ kind: "result", id: msg.id, value });
  } catch (e) {
    post({ kind: "error", id: msg.id, error: toSegError(e).serialize() });
  } finally {
    controllers.delete(msg.id);
  }
});
