import { cp, mkdtemp, readFile, rm, truncate, writeFile } from "node:fs/promises";
import os from "node:os";
import path from "node:path";
import { afterEach, beforeEach, describe, expect, it } from "vitest";
import { isSegError, type SegError } from "../src/errors.js";
import { silentLogger } from "../src/logger.js";
import { OnnxSession } from "../src/runtime/onnx.js";
import { loadPack } from "../src/runtime/pack.js";

const packDir = path.resolve(import.meta.dirname, "../models/tiny-random");
let tmp: string;

beforeEach(async () => {
  tmp = await mkdtemp(path.join(os.tmpdir(), "qvs-pack-"));
});
afterEach(async () => {
  await rm(tmp, { recursive: true, force: true });
});

async function failure(p: Promise<unknown>): Promise<SegError> {
  try {
    await p;
  } catch (e) {
    if (isSegError(e)) return e;
    throw e;
  }
  throw new Error("expected a SegError");
}

/** A copy of the tiny pack whose small files can be damaged (the large decoder graph is linked). */
async function copyPack(): Promise<string> {
  const dir = path.join(tmp, "pack");
  await cp(packDir, dir, { recursive: true });
  return dir;
}

describe("loadPack", () => {
  it("loads and verifies the committed tiny pack", async () => {
    const pack = await loadPack(packDir);
    expect(pack.manifest.name).toBe("tiny-random");
    expect(pack.manifest.prompts.describe_mode).toBe("box");
    expect(pack.file("pack.json")).toBe(path.join(packDir, "pack.json"));
  });

  it("MODEL_NOT_FOUND for a folder that does not exist", async () => {
    const err = await failure(loadPack(path.join(tmp, "nope")));
    expect(err.code).toBe("MODEL_NOT_FOUND");
    expect(err.message).toContain("does not exist; pass --pack");
  });

  it("MODEL_LOAD_FAILED for a folder without pack.json", async () => {
    const err = await failure(loadPack(tmp));
    expect(err.code).toBe("MODEL_LOAD_FAILED");
    expect(err.message).toContain("pack.json is missing");
  });

  it("MODEL_LOAD_FAILED naming the field of an invalid manifest", async () => {
    const dir = await copyPack();
    const manifest = JSON.parse(await readFile(path.join(dir, "pack.json"), "utf8"));
    manifest.model.text.hidden_size = -1;
    await writeFile(path.join(dir, "pack.json"), JSON.stringify(manifest));
    const err = await failure(loadPack(dir));
    expect(err.code).toBe("MODEL_LOAD_FAILED");
    expect(err.message).toContain("model.text.hidden_size");
  });

  it("a grounding calibration has four or five features and one weight per feature", async () => {
    const dir = await copyPack();
    const manifest = JSON.parse(await readFile(path.join(dir, "pack.json"), "utf8"));
    const write = (grounding: unknown) =>
      writeFile(path.join(dir, "pack.json"), JSON.stringify({ ...manifest, calibration: { grounding } }));
    const four = ["open", "coord_mean", "coord_min", "label_mean"];
    const block = { kind: "logistic", bias: 0, threshold: 0.1 };
    await write({ ...block, features: [...four, "label_agreement"], weights: [1, 2, 3, 4, 5] });
    expect((await loadPack(dir)).manifest.calibration?.grounding?.weights).toHaveLength(5);
    await write({ ...block, features: four, weights: [1, 2, 3, 4, 5] });
    expect((await failure(loadPack(dir))).message).toContain("one weight per feature");
    await write({ ...block, features: [...four, "label_length"], weights: [1, 2, 3, 4, 5] });
    expect((await failure(loadPack(dir))).message).toContain("calibration.grounding.features");
  });

  it("MODEL_LOAD_FAILED naming a missing file", async () => {
    const dir = await copyPack();
    await rm(path.join(dir, "mask_decoder.onnx"));
    const err = await failure(loadPack(dir));
    expect(err.code).toBe("MODEL_LOAD_FAILED");
    expect(err.message).toContain("mask_decoder.onnx is missing");
  });

  it("MODEL_LOAD_FAILED naming a truncated file", async () => {
    const dir = await copyPack();
    await truncate(path.join(dir, "vision_encoder.onnx"), 100);
    const err = await failure(loadPack(dir));
    expect(err.message).toMatch(/vision_encoder\.onnx has 100 bytes but the manifest says \d+/);
  });

  it("MODEL_LOAD_FAILED naming a corrupt file of the right size (sha256), unless only sizes are checked", async () => {
    const dir = await copyPack();
    const file = path.join(dir, "tokenizer_config.json");
    const bytes = await readFile(file);
    bytes[10] = (bytes[10] as number) ^ 1;
    await writeFile(file, bytes);
    const err = await failure(loadPack(dir));
    expect(err.code).toBe("MODEL_LOAD_FAILED");
    expect(err.message).toContain("tokenizer_config.json is corrupt (sha256");
    await expect(loadPack(dir, "size")).resolves.toBeDefined();
  });

  it("refuses manifest paths that leave the pack", async () => {
    const dir = await copyPack();
    const manifest = JSON.parse(await readFile(path.join(dir, "pack.json"), "utf8"));
    manifest.files["../outside.onnx"] = { sha256: "0".repeat(64), bytes: 1 };
    await writeFile(path.join(dir, "pack.json"), JSON.stringify(manifest));
    const err = await failure(loadPack(dir));
    expect(err.message).toContain("names a file outside the pack: ../outside.onnx");
  });
});

describe("OnnxSession provider choice", () => {
  const graph = path.join(packDir, "mask_decoder.onnx");

  it("auto falls back to the CPU and says why the GPU providers were skipped", async () => {
    const logs: string[] = [];
    const s = await OnnxSession.create(graph, {
      provider: "auto",
      log: { ...silentLogger, info: (m) => logs.push(m) },
    });
    try {
      expect(s.provider).toBe("cpu");
      expect(logs.join("\n")).toMatch(/execution provider cpu; skipped cuda \(.+\); webgpu \(.+\)/);
    } finally {
      await s.dispose();
    }
  });

  it("an explicit provider that cannot load is MODEL_LOAD_FAILED with a hint", async () => {
    const err = await failure(OnnxSession.create(graph, { provider: "cuda" }));
    expect(err.code).toBe("MODEL_LOAD_FAILED");
    expect(err.message).toMatch(/could not load .*mask_decoder\.onnx on cuda: .*try --ep auto or --ep cpu/);
  });

  it("names missing graph inputs before onnxruntime runs", async () => {
    const s = await OnnxSession.create(graph, { provider: "cpu" });
    try {
      const err = await failure(s.run({}));
      expect(err.code).toBe("INFERENCE_FAILED");
      expect(err.message).toContain("missing graph inputs: vit_ms, mm_embeds");
    } finally {
      await s.dispose();
    }
  });
});
