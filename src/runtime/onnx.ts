/**
 * The only file that imports onnxruntime-node. Everything else passes plain typed arrays with dims.
 *
 * onnxruntime-node does not fall back between execution providers by itself (a session asked for
 * ['cuda', 'cpu'] fails when the CUDA provider library is missing), so `auto` tries CUDA, then WebGPU,
 * then CPU, one session creation each, and reports why each skipped provider failed.
 */

// Side effect first: telemetry off before the native library loads.
import "./no-telemetry.js";
import { existsSync } from "node:fs";
import path from "node:path";
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

/**
 * An output left where the execution provider computed it (a GPU buffer on WebGPU), to be fed back
 * without a round trip through the host. Whoever receives it from `run` owns it and disposes it.
 */
export interface DeviceTensor {
  readonly dims: readonly number[];
  dispose(): void;
}

/** An output that is either on the host or, when the provider allows, kept on the device. */
export type KeptTensor = HostTensor<Float32Array> | DeviceTensor;

export function isHostTensor(t: KeptTensor | HostTensor): t is HostTensor {
  return "data" in t;
}

/** Release a kept output (a no-op for host memory, which the garbage collector owns). */
export function release(t: KeptTensor): void {
  if (!isHostTensor(t)) t.dispose();
}

export type Feeds = Record<string, HostTensor | DeviceTensor>;

export interface SessionOptions {
  provider: ExecutionProvider;
  /** Intra-op threads for the CPU provider; 0 lets onnxruntime decide. @default 0 */
  threads?: number;
  /** Where skipped providers are reported. */
  log?: Logger;
  /**
   * Outputs to keep on the device where the provider can (WebGPU: `gpu-buffer`). onnxruntime-node
   * returns CUDA and CPU outputs in host memory, so there they come back as host tensors.
   */
  keepOnDevice?: readonly string[];
}

/** A device-resident output of onnxruntime (gpu-buffer location). */
class OrtDeviceTensor implements DeviceTensor {
  readonly dims: readonly number[];
  #tensor: ort.Tensor | undefined;

  constructor(tensor: ort.Tensor) {
    this.#tensor = tensor;
    this.dims = tensor.dims;
  }

  /** The tensor to feed; INFERENCE_FAILED once disposed (a bug in the owner's bookkeeping). */
  get tensor(): ort.Tensor {
    if (!this.#tensor)
      throw new SegError("INFERENCE_FAILED", "a device tensor was used after it was released");
    return this.#tensor;
  }

  dispose(): void {
    this.#tensor?.dispose();
    this.#tensor = undefined;
  }
}

const ORDER: readonly ConcreteProvider[] = ["cuda", "webgpu", "cpu"];

/**
 * WebGPU reaches a Linux GPU through the Vulkan loader; without one, Dawn prints a warning of its own
 * to stderr, so `auto` skips WebGPU quietly when no libvulkan.so.1 can be found.
 */
function vulkanMissing(): string | undefined {
  if (process.platform !== "linux") return undefined;
  const dirs = [
    ...(process.env.LD_LIBRARY_PATH ?? "").split(":").filter((d) => d.length > 0),
    "/usr/lib/x86_64-linux-gnu",
    "/usr/lib/aarch64-linux-gnu",
    "/usr/lib64",
    "/usr/lib",
    "/lib/x86_64-linux-gnu",
    "/lib64",
    "/usr/local/lib",
  ];
  return dirs.some((d) => existsSync(path.join(d, "libvulkan.so.1")))
    ? undefined
    : "no Vulkan loader (libvulkan.so.1) found";
}

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
  readonly #tensors: Record<string, HostTensor | DeviceTensor>;
  readonly #graph: string;

  constructor(tensors: Record<string, HostTensor | DeviceTensor>, graph: string) {
    this.#tensors = tensors;
    this.#graph = graph;
  }

  /** A host output. */
  tensor(name: string): HostTensor<Float32Array> {
    const t = this.#tensors[name];
    if (!t || !isHostTensor(t) || !(t.data instanceof Float32Array)) {
      throw new SegError("INFERENCE_FAILED", `${this.#graph} returned no float32 host output ${name}`);
    }
    return t as HostTensor<Float32Array>;
  }

  float(name: string): Float32Array {
    return this.tensor(name).data;
  }

  /** An output named in `keepOnDevice`: on the device where the provider keeps it, else on the host. */
  kept(name: string): KeptTensor {
    const t = this.#tensors[name];
    if (t && !isHostTensor(t)) return t;
    return this.tensor(name);
  }
}

/** What a stage needs of a loaded graph (OnnxSession; a scripted one in tests). */
export interface RunOptions {
  /** Host buffers some outputs are written into (their exact shapes); the others are returned. */
  into?: Record<string, HostTensor<Float32Array>>;
}

export interface GraphRunner {
  run(feeds: Feeds, options?: RunOptions): Promise<RunOutputs>;
  dispose(): Promise<void>;
}

/** One ONNX graph loaded on one execution provider. The creator owns it and must call `dispose`. */
export class OnnxSession implements GraphRunner {
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
      const missing = preference === "auto" && provider === "webgpu" ? vulkanMissing() : undefined;
      if (missing) {
        failures.push(`webgpu (${missing})`);
        continue;
      }
      // Only WebGPU hands device buffers to JavaScript; everything else comes back to the host.
      const keep = provider === "webgpu" ? (options.keepOnDevice ?? []) : [];
      try {
        const session = await ort.InferenceSession.create(file, {
          executionProviders: [provider],
          graphOptimizationLevel: "all",
          intraOpNumThreads: options.threads ?? 0,
          // 3 = errors only: a failed provider probe is reported through `log`, not ORT's own noise.
          logSeverityLevel: 3,
          ...(keep.length > 0
            ? { preferredOutputLocation: Object.fromEntries(keep.map((n) => [n, "gpu-buffer" as const])) }
            : {}),
        });
        if (failures.length > 0) log.info(`execution provider ${provider}; skipped ${failures.join("; ")}`);
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
  async run(feeds: Feeds, options: RunOptions = {}): Promise<RunOutputs> {
    if (this.#disposed) throw new SegError("INFERENCE_FAILED", `${this.#name} used after dispose`);
    const missing = this.inputNames.filter((n) => !(n in feeds));
    if (missing.length > 0) {
      throw new SegError("INFERENCE_FAILED", `${this.#name}: missing graph inputs: ${missing.join(", ")}`);
    }
    const ortFeeds: Record<string, ort.Tensor> = {};
    for (const name of this.inputNames) {
      const t = feeds[name] as HostTensor | DeviceTensor;
      ortFeeds[name] = isHostTensor(t)
        ? new ort.Tensor(t.data instanceof Float32Array ? "float32" : "int64", t.data, t.dims)
        : (t as OrtDeviceTensor).tensor;
    }
    let results: ort.InferenceSession.OnnxValueMapType;
    const start = performance.now();
    const into = options.into;
    try {
      results = into
        ? await this.#session.run(
            ortFeeds,
            Object.fromEntries(
              this.outputNames.map((n) => {
                const t = into[n];
                return [n, t ? new ort.Tensor("float32", t.data, t.dims) : null];
              }),
            ),
          )
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
    const out: Record<string, HostTensor | DeviceTensor> = {};
    for (const [name, value] of Object.entries(results)) {
      const tensor = value as ort.Tensor;
      if (tensor.location === "gpu-buffer") {
        out[name] = new OrtDeviceTensor(tensor);
        continue;
      }
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
