/**
 * Two confidences per instance (grounding, mask), the minimum score, the empty-mask rule, the pack's
 * domain in what agents read, and a pack without a mask decoder end to end through MCP.
 */

import { cp, mkdtemp, readdir, readFile, rm, unlink, writeFile } from "node:fs/promises";
import os from "node:os";
import path from "node:path";
import type { CallToolResult } from "@modelcontextprotocol/client";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { createConfig } from "../src/config.js";
import { isSegError } from "../src/errors.js";
import { silentLogger } from "../src/logger.js";
import { combinedScore, GroundingScorer, labelAgreement } from "../src/runtime/confidence.js";
import { createEngine } from "../src/runtime/engine.js";
import { Pipeline } from "../src/runtime/pipeline.js";
import type { CheckedImage, Engine } from "../src/runtime/types.js";
import { createServer } from "../src/server.js";
import { imageFromFile } from "../src/tools/inputs.js";
import { connectInMemory, type TestClient } from "./helpers/clients.js";

const root = path.resolve(import.meta.dirname, "..");
const tinyPack = path.join(root, "models/tiny-random");
const shapesPack = path.join(root, "models/shapes");
const imagePath = path.join(root, "test/fixtures/images/halfeven_400x208.png");

let work: string;
let image: CheckedImage;

beforeAll(async () => {
  work = await mkdtemp(path.join(os.tmpdir(), "qvs-confidence-"));
  image = await imageFromFile(imagePath);
});

afterAll(async () => {
  await rm(work, { recursive: true, force: true });
});

describe("GroundingScorer", () => {
  const evidence = { open: -0.1, coordMean: -0.5, coordMin: -2, labelMean: -0.3 };

  it("without a calibration: the geometric mean of the coordinate tokens' probabilities, no threshold", () => {
    const s = new GroundingScorer();
    expect(s.calibrated).toBe(false);
    expect(s.threshold).toBe(0);
    expect(s.score(evidence, 1)).toBeCloseTo(Math.exp(-0.5), 12);
  });

  it("with one: the logistic model over [open, coord_mean, coord_min, label_mean] and its threshold", () => {
    const s = new GroundingScorer({
      kind: "logistic",
      features: ["open", "coord_mean", "coord_min", "label_mean"],
      weights: [1, 2, 0.5, -1],
      bias: 0.25,
      threshold: 0.4,
    });
    const z = 0.25 + 1 * -0.1 + 2 * -0.5 + 0.5 * -2 + -1 * -0.3;
    // A four-feature calibration (written before label_agreement) ignores the agreement.
    expect(s.score(evidence, 1)).toBeCloseTo(1 / (1 + Math.exp(-z)), 12);
    expect(s.threshold).toBe(0.4);
  });

  it("with label_agreement: its weight times the share of the label's words the expression uses", () => {
    const s = new GroundingScorer({
      kind: "logistic",
      features: ["open", "coord_mean", "coord_min", "label_mean", "label_agreement"],
      weights: [1, 2, 0.5, -1, 3],
      bias: 0.25,
      threshold: 0.4,
    });
    const z = 0.25 + 1 * -0.1 + 2 * -0.5 + 0.5 * -2 + -1 * -0.3;
    expect(s.score(evidence, 0)).toBeCloseTo(1 / (1 + Math.exp(-z)), 12);
    expect(s.score(evidence, 0.5)).toBeCloseTo(1 / (1 + Math.exp(-(z + 1.5))), 12);
  });

  it("labelAgreement: the cases modelkit's calibration checks too", async () => {
    const fixture = JSON.parse(
      await readFile(path.join(root, "test/fixtures/label-agreement.json"), "utf8"),
    ) as {
      cases: { label: string; expression: string; agreement: number }[];
    };
    for (const c of fixture.cases)
      expect(labelAgreement(c.label, c.expression), JSON.stringify(c)).toBe(c.agreement);
  });

  it("ranks by grounding x mask score; a given box counts as sure", () => {
    expect(combinedScore(0.5, 0.8)).toBeCloseTo(0.4, 12);
    expect(combinedScore(undefined, 0.8)).toBe(0.8);
  });
});

describe("scores and filters on the tiny pack", () => {
  let engine: Pipeline;
  beforeAll(async () => {
    engine = await Pipeline.create({ packDir: tinyPack, executionProvider: "cpu" });
  });
  afterAll(async () => {
    await engine?.dispose();
  });

  it("ground: grounding_score from the box's token evidence; min_score leaves boxes out and counts them", async () => {
    const all = await engine.ground({ image, expression: "the red box", maxInstances: 3, minScore: 0 });
    expect(all.minScore).toBe(0);
    expect(all.instances.length).toBeGreaterThan(0);
    for (const inst of all.instances) {
      const e = inst.evidence;
      if (!e) throw new Error("no evidence");
      for (const v of [e.open, e.coordMean, e.coordMin, e.labelMean]) expect(v).toBeLessThanOrEqual(0);
      expect(e.coordMin).toBeLessThanOrEqual(e.coordMean);
      // The tiny pack has no calibration: the uncalibrated score.
      expect(inst.groundingScore).toBeCloseTo(Math.exp(e.coordMean), 12);
      expect(inst.score).toBe(inst.groundingScore);
    }
    const scores = all.instances.map((i) => i.groundingScore as number);
    expect(scores).toEqual([...scores].sort((a, b) => b - a));

    const cut = (scores[0] as number) + 1e-9; // above every box
    const none = await engine.ground({ image, expression: "the red box", maxInstances: 3, minScore: cut });
    expect(none.found).toBe(false);
    expect(none.instances).toEqual([]);
    expect(none.rejected).toEqual({ belowMinScore: all.instances.length, emptyMask: 0 });
    expect(none.minScore).toBe(cut);
  });

  it("segment: grounding and mask scores apart, score their product, no empty mask returned", async () => {
    const res = await engine.segment({
      image,
      expression: "the red box",
      maxInstances: 3,
      minScore: 0,
      outputDir: work,
    });
    expect(res.instances.length + res.rejected.emptyMask).toBeGreaterThan(0);
    for (const inst of res.instances) {
      expect(inst.mask.areaPx).toBeGreaterThan(0);
      expect(inst.maskScore).toBeGreaterThanOrEqual(0);
      expect(inst.maskScore).toBeLessThanOrEqual(1);
      expect(inst.score).toBeCloseTo((inst.groundingScore as number) * inst.maskScore, 12);
    }
    expect(res.found).toBe(res.instances.length > 0);
    const given = await engine.segment({ image, box: [40, 30, 200, 180], outputDir: work });
    const inst = given.instances[0];
    expect(inst?.groundingScore).toBeUndefined();
    expect(inst?.score).toBe(inst?.maskScore);
    expect(given.minScore).toBe(0);
  });
});

describe("the demo pack", () => {
  it("a box over empty background gives an empty mask: not an instance, found false, nothing written", async () => {
    const engine = await Pipeline.create({ packDir: shapesPack, executionProvider: "cpu" });
    try {
      const out = await mkdtemp(path.join(work, "empty-"));
      const shapes = await imageFromFile(path.join(root, "examples/shapes-1.png"));
      const res = await engine.segment({ image: shapes, box: [2, 2, 12, 12], outputDir: out });
      expect(res.found).toBe(false);
      expect(res.instances).toEqual([]);
      expect(res.rejected).toEqual({ belowMinScore: 0, emptyMask: 1 });
      expect(await readdir(out)).toEqual([]);
      // Its calibration is the pack's own threshold, and it says what it knows.
      const info = await engine.info();
      expect(info.domain).toMatch(/synthetic scenes of circles, squares, triangles and stars/);
      expect(info.groundingThreshold).toBeGreaterThan(0);
      expect(info.segmentation).toBe(true);
    } finally {
      await engine.dispose();
    }
  });
});

/** A copy of the tiny pack without its mask decoder, as `modelkit export` writes one without --mask-decoder. */
async function packWithoutDecoder(): Promise<string> {
  const dir = path.join(work, "no-decoder");
  await cp(tinyPack, dir, { recursive: true });
  const manifestPath = path.join(dir, "pack.json");
  const manifest = JSON.parse(await readFile(manifestPath, "utf8"));
  const file = manifest.graphs.mask_decoder.file as string;
  delete manifest.graphs.mask_decoder;
  delete manifest.model.mask_decoder;
  delete manifest.files[file];
  manifest.provenance.mask_decoder = null;
  manifest.domain = "random weights for tests; knows nothing";
  await writeFile(manifestPath, JSON.stringify(manifest, null, 2));
  await unlink(path.join(dir, file));
  return dir;
}

describe("a pack without a mask decoder, through MCP", () => {
  let packDir: string;
  let engine: Engine;
  let client: TestClient;
  let close: () => Promise<void>;

  beforeAll(async () => {
    packDir = await packWithoutDecoder();
    const config = createConfig({
      cwd: work,
      packDir,
      outDir: path.join(work, "out"),
      allowDirs: [path.dirname(imagePath)],
      executionProvider: "cpu",
      logLevel: "silent",
    });
    engine = await createEngine({ packDir, executionProvider: "cpu" });
    // A 2026-07-28 client (tools.test.ts runs both revisions).
    client = await connectInMemory("modern", (ctx) =>
      createServer(config, engine, silentLogger, { trustRoots: true, era: ctx.era }),
    );
    close = async () => {
      await client.close();
      await engine.dispose();
    };
  });
  afterAll(async () => {
    await close?.();
  });

  const call = (name: string, args: Record<string, unknown>) => client.callTool(name, args);
  const text = (r: CallToolResult) => (r.content[0]?.type === "text" ? r.content[0].text : "");

  it("tells agents what it knows and that segment is unavailable", async () => {
    const { tools } = await client.listTools();
    for (const t of tools) expect(t.description).toContain("random weights for tests; knows nothing");
    expect(tools.find((t) => t.name === "segment")?.description).toMatch(/no mask decoder.*use ground/);
    expect(tools.find((t) => t.name === "ground")?.description).not.toMatch(/no mask decoder/);
    expect(client.instructions()).toContain("random weights for tests; knows nothing");
  });

  it("grounds and describes; segment answers MASK_DECODER_MISSING with what to do, writing nothing", async () => {
    const g = await call("ground", { image: imagePath, expression: "the red box", max_instances: 2 });
    expect(g.isError, text(g)).toBeFalsy();
    expect(g.structuredContent).toMatchObject({ min_score: 0, rejected: { empty_mask: 0 } });
    const d = await call("describe_region", { image: imagePath, box: [10, 10, 100, 100] });
    expect(d.isError, text(d)).toBeFalsy();
    const s = await call("segment", { image: imagePath, expression: "the red box" });
    expect(s.isError).toBe(true);
    expect(text(s)).toMatch(
      /^MASK_DECODER_MISSING: .*has no mask decoder.*call ground.*modelkit train-mask-decoder/,
    );
    expect(await readdir(path.join(work, "out")).catch(() => [])).toEqual([]);
    const info = await engine.info();
    expect(info.segmentation).toBe(false);
  });

  it("a manifest with only one half of the mask decoder is refused at load", async () => {
    const dir = path.join(work, "half");
    await cp(tinyPack, dir, { recursive: true });
    const manifestPath = path.join(dir, "pack.json");
    const manifest = JSON.parse(await readFile(manifestPath, "utf8"));
    delete manifest.model.mask_decoder;
    await writeFile(manifestPath, JSON.stringify(manifest));
    const error = await Pipeline.create({ packDir: dir, executionProvider: "cpu" }).catch((e: unknown) => e);
    expect(isSegError(error) && error.code).toBe("MODEL_LOAD_FAILED");
    expect(String((error as Error).message)).toMatch(
      /both graphs.mask_decoder and model.mask_decoder, or neither/,
    );
  });
});
