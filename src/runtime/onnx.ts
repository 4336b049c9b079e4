/**
 * The only file that imports onnxruntime-node. Everything else passes plain typed arrays with dims.
 *
 * onnxruntime-node does not fall back between execution providers by itself (a session asked for
 * ['cuda', 'cpu'] fails when the CUDA provider library is missing), so `auto` tries CUDA, then WebGPU,
 * then CPU, one session creation each, and reports why each skipped provider failed.
 */

import ort from "onnxruntime-node";
import { SegError } from "../errors.js";
import { type Logger, silentLogger } from "../logger.js";
import type { ExecutionProvider } from "./types.js";

export type ConcreteProvider = Exclude<ExecutionProvider, "auto">;

export type TensorData = Float32Array | BigInt64Array;

export interface HostTensor<T extends TensorData = TensorData> {
  data: T;
  dims: readonly number[];
}

export type Feeds = Record<string, HostTensor>;

export interface SessionOptions {
  provider: ExecutionProvider;
  /** Intra-op threads for the CPU provider; 0 lets onnxruntime decide. @default 0 */
  threads?: number;
  /** Where skipped providers are reported. */
  log?: Logger;
}

const ORDER: readonly ConcreteProvider[] = ["cuda", "webgpu", "cpu"];

// onnxruntime logs a failed provider probe as an error of its own; every failure reaches the caller
// as an exception and `auto` reports skipped providers through `log`, so only fatal logs are shown.
ort.env.logLevel = "fatal";

export function f32(data: Float32Array, dims: readonly number[]): HostTensor<Float32Array> {
  return { data, dims };
}

export function i64(data: BigInt64Array, dims: readonly number[]): HostTensor<BigInt64Array> {
  return { data, dims };
}

/** Time spent inside onnxruntime's `run` by this thread, for the host-overhead figure of `npm run bench`. */
export const runClock = { ms: 0, calls: 0 };

/** A graph's outputs by name; a missing or mistyped output is INFERENCE_FAILED naming it. */
export class RunOutputs {
  readonly #tensors: Record<string, HostTensor>;
  readonly #graph: string;

  constructor(tensors: Record<string, HostTensor>, graph: string) {
    this.#tensors = tensors;
    this.#graph = graph;
  }

  tensor(name: string): HostTensor<Float32Array> {
    const t = this.#tensors[name];
    if (!t || !(t.data instanceof Float32Array)) {
      throw new SegError("INFERENCE_FAILED", `${this.#graph} returned no float32 output ${name}`);
    }
    return t as HostTensor<Float32Array>;
  }

  float(name: string): Float32Array {
    return this.tensor(name).data;
  }
}

/** One ONNX graph loaded on one execution provider. The creator owns it and must call `dispose`. */
export class OnnxSession {
  readonly provider: ConcreteProvider;
  readonly inputNames: readonly string[];
  readonly outputNames: readonly string[];
  readonly #session: ort.InferenceSession;
  readonly #name: string;
  #disposed = false;

  private constructor(session: ort.InferenceSession, provider: ConcreteProvider, name: string) {
    this.#session = session;
    this.provider = provider;
    this.#name = name;
    this.inputNames = session.inputNames;
    this.outputNames = session.outputNames;
  }

  /**
   * Create a session on the preferred provider. With `auto`, providers are tried in the order
   * CUDA, WebGPU, CPU; the log says why each earlier one failed.
   */
  static async create(file: string, options: SessionOptions): Promise<OnnxSession> {
    const { provider: preference, log = silentLogger } = options;
    const candidates = preference === "auto" ? ORDER : [preference];
    const failures: string[] = [];
    for (const provider of candidates) {
      try {
        const session = await ort.InferenceSession.create(file, {
          executionProviders: [provider],
          graphOptimizationLevel: "all",
          intraOpNumThreads: options.threads ?? 0,
          // 3 = errors only: a failed provider probe is reported through `log`, not ORT's own noise.
          logSeverityLevel: 3,
        });
        if (failures.length > 0) log.info(`${file}: using ${provider}; skipped ${failures.join("; ")}`);
        return new OnnxSession(session, provider, file.split(/[\\/]/).pop() ?? file);
      } catch (cause) {
        const reason = cause instanceof Error ? cause.message.split("\n")[0] : String(cause);
        failures.push(`${provider} (${reason?.slice(0, 200)})`);
      }
    }
    throw new SegError(
      "MODEL_LOAD_FAILED",
      `could not load ${file} on ${preference === "auto" ? "any execution provider" : preference}: ${failures.join("; ")}` +
        (preference === "auto" ? "" : "; try --ep auto or --ep cpu"),
    );
  }

  /** Run the graph. Missing feeds are named before onnxruntime sees them. */
  async run(feeds: Feeds, outputNames?: readonly string[]): Promise<RunOutputs> {
    if (this.#disposed) throw new SegError("INFERENCE_FAILED", `${this.#name} used after dispose`);
    const missing = this.inputNames.filter((n) => !(n in feeds));
    if (missing.length > 0) {
      throw new SegError("INFERENCE_FAILED", `${this.#name}: missing graph inputs: ${missing.join(", ")}`);
    }
    const ortFeeds: Record<string, ort.Tensor> = {};
    for (const name of this.inputNames) {
      const t = feeds[name] as HostTensor;
      ortFeeds[name] = new ort.Tensor(t.data instanceof Float32Array ? "float32" : "int64", t.data, t.dims);
    }
    let results: ort.InferenceSession.OnnxValueMapType;
    const start = performance.now();
    try {
      results = outputNames
        ? await this.#session.run(ortFeeds, outputNames as string[])
        : await this.#session.run(ortFeeds);
      runClock.ms += performance.now() - start;
      runClock.calls++;
    } catch (cause) {
      throw new SegError(
        "INFERENCE_FAILED",
        `onnxruntime failed on ${this.#name}: ${(cause as Error).message}`,
        {
          cause,
        },
      );
    }
    const out: Record<string, HostTensor> = {};
    for (const [name, value] of Object.entries(results)) {
      const tensor = value as ort.Tensor;
      const data = tensor.data;
      if (!(data instanceof Float32Array || data instanceof BigInt64Array)) {
        throw new SegError(
          "INFERENCE_FAILED",
          `${this.#name}: output ${name} has unsupported type ${tensor.type}`,
        );
      }
      out[name] = { data, dims: tensor.dims };
    }
    return new RunOutputs(out, this.#name);
  }

  async dispose(): Promise<void> {
    if (this.#disposed) return;
    this.#disposed = true;
    await this.#session.release();
  }
}
