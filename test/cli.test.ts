/**
 * The CLI: the built binary with the real engine and the tiny pack (JSON on stdout equals the tool's
 * structuredContent; one `CODE: message` line on stderr and a non-zero exit for bad input), plus
 * in-process runs with a scripted engine for the paths the random pack cannot produce on demand.
 */

import { execFile, execFileSync } from "node:child_process";
import { existsSync } from "node:fs";
import { mkdtemp, readdir, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";
import sharp from "sharp";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { runCli } from "../src/cli.js";
import { DEFAULT_PACK_NAME } from "../src/config.js";
import { describeRegionTool } from "../src/tools/describe-region.js";
import { groundTool } from "../src/tools/ground.js";
import { segmentTool } from "../src/tools/segment.js";
import { FakeEngine } from "./helpers/fake-engine.js";

const repo = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "..");
const bin = path.join(repo, "dist", "src", "cli.js");
const pack = path.join(repo, "models", "tiny-random");
let dir: string;

interface Run {
  code: number;
  stdout: string;
  stderr: string;
}

function cli(args: string[], cwd = dir): Promise<Run> {
  return new Promise((resolve) => {
    execFile(
      process.execPath,
      [bin, ...args],
      { cwd, env: { ...process.env, QWEN3_VL_SEG_LOG_LEVEL: "warn" }, timeout: 60_000 },
      (error, stdout, stderr) => {
        const code = error ? (typeof error.code === "number" ? error.code : 1) : 0;
        resolve({ code, stdout, stderr });
      },
    );
  });
}

beforeAll(async () => {
  // `npm test` builds first; build here too when vitest runs on its own.
  if (!existsSync(bin))
    execFileSync("npx", ["tsc", "-p", "tsconfig.build.json"], { cwd: repo, stdio: "inherit" });
  dir = await mkdtemp(path.join(tmpdir(), "seg-cli-"));
  await sharp({ create: { width: 72, height: 40, channels: 3, background: "#4a8" } })
    .png()
    .toFile(path.join(dir, "img.png"));
  await writeFile(path.join(dir, "broken.jpg"), Buffer.from([0xff, 0xd8, 0xff, 0x00, 1, 2, 3]));
});

afterAll(async () => {
  await rm(dir, { recursive: true, force: true });
});

describe("built binary, real engine, tiny pack", () => {
  const common = ["--pack", pack, "--ep", "cpu", "--json"];

  it("info prints the pack's description", async () => {
    const run = await cli(["info", ...common]);
    expect(run.code, run.stderr).toBe(0);
    const info = JSON.parse(run.stdout);
    expect(info).toMatchObject({ name: "tiny-random", dtype: "fp32", executionProvider: "cpu" });
    expect(info.dir).toBe(pack);
  });

  it("info without --pack uses the bundled default pack", async () => {
    const run = await cli(["info", "--ep", "cpu", "--json"]);
    expect(run.code, run.stderr).toBe(0);
    expect(JSON.parse(run.stdout).name).toBe(DEFAULT_PACK_NAME);
  });

  it("ground prints exactly the tool's structuredContent", async () => {
    const run = await cli([
      "ground",
      "img.png",
      "the green box",
      "--max-instances",
      "1",
      "--out",
      "out",
      ...common,
    ]);
    expect(run.code, run.stderr).toBe(0);
    const json = JSON.parse(run.stdout);
    // the schema strips unknown keys: equality means nothing extra and nothing missing
    expect(groundTool.output.parse(json)).toEqual(json);
    expect(json.image).toEqual({ width: 72, height: 40 });
    expect(json.found).toBe(json.instances.length > 0);
  });

  it("segment --box writes a mask PNG the size of the input into the default output folder", async () => {
    const run = await cli(["segment", "img.png", "--box", "5,5,50,30", "--rle", ...common]);
    expect(run.code, run.stderr).toBe(0);
    const json = JSON.parse(run.stdout);
    expect(segmentTool.output.parse(json)).toEqual(json);
    const mask = json.instances[0].mask;
    expect(path.dirname(mask.path)).toBe(path.join(dir, "qwen3-vl-seg-out"));
    const meta = await sharp(mask.path).metadata();
    expect([meta.width, meta.height]).toEqual([72, 40]);

    const described = await cli(["describe", "img.png", "--mask", mask.path, ...common]);
    expect(described.code, described.stderr).toBe(0);
    const out = JSON.parse(described.stdout);
    expect(describeRegionTool.output.parse(out)).toEqual(out);
  });

  it("prints a text summary without --json", async () => {
    const run = await cli(["describe", "img.png", "--box", "0,0,10,10", "--pack", pack, "--ep", "cpu"]);
    expect(run.code, run.stderr).toBe(0);
    expect(run.stdout).toMatch(/^Region \[0, 0, 10, 10\] of the 72x40 image: /);
  });

  const bad: Array<[string, string[], string, RegExp]> = [
    ["missing file", ["ground", "nope.png", "x"], "IMAGE_NOT_FOUND", /nope\.png" does not exist/],
    [
      "corrupt image",
      ["ground", "broken.jpg", "x"],
      "IMAGE_DECODE_FAILED",
      /looks like JPEG but cannot be decoded/,
    ],
    ["bad --box", ["segment", "img.png", "--box", "1,2,3"], "INVALID_INPUT", /expected --box x1,y1,x2,y2/],
    ["box outside", ["segment", "img.png", "--box", "0,0,73,10"], "INVALID_INPUT", /outside the 72x40 image/],
    [
      "unknown option",
      ["ground", "img.png", "x", "--frobnicate"],
      "INVALID_INPUT",
      /Unknown option '--frobnicate'/,
    ],
    ["unknown command", ["paint", "img.png"], "INVALID_INPUT", /unknown command "paint"/],
    ["missing expression", ["ground", "img.png"], "INVALID_INPUT", /ground needs an expression/],
    ["empty expression", ["ground", "img.png", " "], "INVALID_INPUT", /expression is empty/],
    ["http URL", ["ground", "https://example.com/a.png", "x"], "INVALID_INPUT", /never fetches/],
    ["missing pack", ["ground", "img.png", "x", "--pack", "no-such-pack"], "MODEL_NOT_FOUND", /no-such-pack/],
  ];
  for (const [name, args, code, message] of bad) {
    it(`bad input: ${name} -> one line on stderr, non-zero exit`, async () => {
      const run = await cli([...args, "--ep", "cpu", "--json"]);
      expect(run.code).not.toBe(0);
      expect(run.code).toBe(code === "MODEL_NOT_FOUND" ? 1 : 2);
      expect(run.stdout).toBe("");
      const lines = run.stderr.trimEnd().split("\n");
      expect(lines, run.stderr).toHaveLength(1);
      expect(lines[0]?.startsWith(`${code}: `), run.stderr).toBe(true);
      expect(lines[0]).toMatch(message);
    });
  }

  it("--help and --version", async () => {
    const help = await cli(["--help"]);
    expect(help.code).toBe(0);
    expect(help.stdout).toMatch(/Usage:\n {2}qwen3-vl-seg-mcp \[serve\] \[options\]/);
    const version = await cli(["--version"]);
    expect(version.stdout.trim()).toMatch(/^\d+\.\d+\.\d+$/);
  });
});

describe("runCli in-process with a scripted engine", () => {
  async function run(args: string[]) {
    let stdout = "";
    let stderr = "";
    const code = await runCli(args, {
      stdout: (t) => {
        stdout += t;
      },
      stderr: (t) => {
        stderr += t;
      },
      cwd: dir,
      env: {},
      createEngine: () => new FakeEngine(),
    });
    return { code, stdout, stderr };
  }

  it("found: false exits 0", async () => {
    const r = await run(["ground", "img.png", "nothing", "--json", "--out", "out2"]);
    expect(r.code, r.stderr).toBe(0);
    expect(JSON.parse(r.stdout)).toMatchObject({ found: false, instances: [] });
  });

  it("segment with an expression writes masks under --out", async () => {
    const r = await run(["segment", "img.png", "two things", "--json", "--out", "out3", "--overlay"]);
    expect(r.code, r.stderr).toBe(0);
    const out = segmentTool.output.parse(JSON.parse(r.stdout));
    expect(out.instances).toHaveLength(2);
    expect(out.overlay).toBeDefined();
    expect((await readdir(path.join(dir, "out3"))).filter((f) => f.endsWith(".png"))).toHaveLength(3);
  });

  it("files named on the command line are allowed even outside the working directory", async () => {
    const other = await mkdtemp(path.join(tmpdir(), "seg-cli-other-"));
    await sharp({ create: { width: 8, height: 8, channels: 3, background: "#000" } })
      .png()
      .toFile(path.join(other, "a.png"));
    const r = await run(["ground", path.join(other, "a.png"), "x", "--json"]);
    expect(r.code, r.stderr).toBe(0);
    const denied = await run(["ground", path.join(other, "a.png"), "x", "--allow-dir", dir]);
    expect(denied.code).toBe(2);
    expect(denied.stderr).toMatch(/^PATH_NOT_ALLOWED: /);
    await rm(other, { recursive: true, force: true });
  });

  it("rejects bad numbers in options", async () => {
    const r = await run(["ground", "img.png", "x", "--max-input-pixels", "lots"]);
    expect(r.code).toBe(2);
    expect(r.stderr).toBe(
      'INVALID_INPUT: expected a positive integer for --max-input-pixels but received "lots"\n',
    );
  });
});
