/**
 * Faults: a writer killed mid-file, a call that fails half way, an output folder that fills up,
 * refusals at start that must end the process with one line instead of hanging it.
 */

import { type ChildProcess, execFile, spawn } from "node:child_process";
import { existsSync } from "node:fs";
import { mkdir, mkdtemp, readdir, rm, stat, utimes, writeFile } from "node:fs/promises";
import { createServer as createNetServer } from "node:net";
import { tmpdir } from "node:os";
import path from "node:path";
import sharp from "sharp";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { SegError } from "../../src/errors.js";
import { silentLogger } from "../../src/logger.js";
import { keepOutputDir, sweepOutputDir } from "../../src/retention.js";
import { maskFromLogits } from "../../src/runtime/mask-post.js";
import { processPidSpace } from "../../src/runtime/output.js";
import { Timer } from "../../src/runtime/timer.js";
import { writeMasks } from "../../src/runtime/write.js";
import { bin, repo } from "./harness.js";

let root: string;

beforeAll(async () => {
  root = await mkdtemp(path.join(tmpdir(), "qvs-faults-"));
});
afterAll(async () => {
  await rm(root, { recursive: true, force: true });
});

function cli(args: string[], cwd = root): Promise<{ code: number | null; stderr: string; ms: number }> {
  const start = Date.now();
  return new Promise((resolve) => {
    execFile(process.execPath, [bin, ...args], { cwd, timeout: 120_000 }, (error, _stdout, stderr) => {
      const code = error ? (typeof error.code === "number" ? error.code : null) : 0;
      resolve({ code, stderr, ms: Date.now() - start });
    });
  });
}

const NAME = (i: number) => `mask-${Date.now().toString(36)}-${"0123456789abcdef".repeat(1)}-${i}.png`;

describe("the output folder's retention", () => {
  it("removes what is too old, then the oldest over the size bound, never a young file or a foreign one", async () => {
    const dir = path.join(root, "retention");
    await mkdir(dir);
    const now = Date.now();
    const at = async (name: string, bytes: number, ageMs: number) => {
      const file = path.join(dir, name);
      await writeFile(file, Buffer.alloc(bytes, 1));
      const t = new Date(now - ageMs);
      await utimes(file, t, t);
      return name;
    };
    const day = 24 * 60 * 60_000;
    const ancient = await at(NAME(0), 10, 2 * day);
    const old1 = await at(NAME(1), 400, 60 * 60_000);
    const old2 = await at(NAME(2), 400, 50 * 60_000);
    const young = await at(NAME(3), 400, 60_000);
    const foreign = await at("holiday.png", 10_000, 3 * day);
    const staleTemp = await at(`.${NAME(4)}.${processPidSpace()}-999999999-0123456789ab.tmp`, 50, 1000);
    const policy = { outMaxAgeMs: day, outMaxBytes: 900, outMinAgeMs: 10 * 60_000 };
    const result = await sweepOutputDir(dir, policy, now);
    const left = (await readdir(dir)).sort();
    expect(left).toEqual([old2, young, foreign].sort());
    expect(left).not.toContain(ancient);
    expect(left).not.toContain(old1);
    expect(left).not.toContain(staleTemp);
    expect(result).toMatchObject({ removed: 3, keptFiles: 2, keptBytes: 800 });
  });

  it("a folder near its size bound is swept again within seconds, not after the whole interval", async () => {
    const dir = path.join(root, "busy");
    await mkdir(dir);
    await writeFile(path.join(dir, NAME(0)), Buffer.alloc(850, 1)); // 85 % of the bound
    // An interval of an hour: only the near-the-bound rule can bring the next sweep.
    const keeper = keepOutputDir(
      dir,
      { outMaxAgeMs: 60 * 60_000, outMaxBytes: 1000, outMinAgeMs: 0 },
      silentLogger,
      3_600_000,
    );
    try {
      await keeper.sweep(); // the first sweep: nothing to remove, and near the bound
      await writeFile(path.join(dir, NAME(1)), Buffer.alloc(400, 1)); // 1250 bytes: over it
      let total = Number.POSITIVE_INFINITY;
      for (let waited = 0; waited < 60_000 && total > 1000; waited += 200) {
        await new Promise((resolve) => setTimeout(resolve, 200));
        const sizes = await Promise.all(
          (await readdir(dir)).map((n) => stat(path.join(dir, n)).then((s) => s.size)),
        );
        total = sizes.reduce((a, b) => a + b, 0);
      }
      expect(total).toBeLessThanOrEqual(1000);
    } finally {
      keeper.stop();
    }
  });

  it("a writer killed mid-file leaves a temp file that the next sweep removes", async () => {
    const out = path.join(root, "killed");
    await mkdir(out);
    // A 4000x3000 mask takes long enough to write that a kill can land inside it.
    const big = path.join(root, "big.png");
    await sharp({ create: { width: 4000, height: 3000, channels: 3, background: "#888" } })
      .png({ compressionLevel: 0 })
      .toFile(big);
    const child: ChildProcess = spawn(
      process.execPath,
      [
        bin,
        "segment",
        big,
        "--box",
        "100,100,3900,2900",
        "--out",
        out,
        "--pack",
        path.join(repo, "models", "tiny-random"),
        "--ep",
        "cpu",
      ],
      { cwd: root, stdio: "ignore" },
    );
    // Kill it the moment a temporary file shows up (or when it is done, if none ever did).
    let sawTemp = false;
    await new Promise<void>((resolve) => {
      const poll = setInterval(async () => {
        const names = await readdir(out).catch(() => [] as string[]);
        if (names.some((n) => n.endsWith(".tmp"))) {
          sawTemp = true;
          child.kill("SIGKILL");
        }
      }, 2);
      child.once("exit", () => {
        clearInterval(poll);
        resolve();
      });
    });
    await sweepOutputDir(out, { outMaxAgeMs: 86_400_000, outMaxBytes: 1e12, outMinAgeMs: 600_000 });
    const left = await readdir(out);
    expect(left.filter((n) => n.endsWith(".tmp"))).toEqual([]);
    process.stderr.write(`kill during write: temp file seen ${sawTemp}; left ${left.length} file(s)\n`);
  });
});

describe("a call that fails half way", () => {
  it("removes the masks it wrote before the failure", async () => {
    const out = path.join(root, "half");
    await mkdir(out);
    const logits = new Float32Array(16).fill(1);
    const mask = maskFromLogits(logits, 4, 4, [16, 16], [20, 20]);
    const query = { label: "x", box: [0, 0, 10, 10] as [number, number, number, number] };
    const run = writeMasks(
      [
        { query, mask, maskScore: 1, score: 1 },
        { query, mask, maskScore: 1, score: 1 },
      ],
      {
        outputDir: out,
        size: { width: 20, height: 20 },
        overlay: true,
        // The overlay step fails after both masks are on disk (as a full disk would).
        pixels: async () => {
          throw new SegError("OUTPUT_WRITE_FAILED", "no space left on device");
        },
        timer: new Timer(undefined),
      },
    );
    await expect(run).rejects.toMatchObject({ code: "OUTPUT_WRITE_FAILED" });
    expect(await readdir(out)).toEqual([]);
  });
});

describe("refusals at start end the process with one line", () => {
  it("--out under /proc, or a file, is refused before anything loads", async () => {
    for (const out of ["/proc/self/x", path.join(root, "a-file.txt")]) {
      await writeFile(path.join(root, "a-file.txt"), "not a folder");
      const run = await cli(["serve", "--out", out, "--ep", "cpu"]);
      expect(run.code, run.stderr).toBe(1);
      expect(run.stderr.trim().split("\n").at(-1)).toMatch(
        /^OUTPUT_WRITE_FAILED: cannot use the output directory/,
      );
      expect(run.ms).toBeLessThan(60_000);
    }
  });

  it("serve --http on a port in use exits 2 with ADDRESS_IN_USE; a non-loopback address without a token exits 2", async () => {
    const blocker = createNetServer();
    await new Promise<void>((resolve) => blocker.listen(0, "127.0.0.1", () => resolve()));
    const port = (blocker.address() as { port: number }).port;
    try {
      const busy = await cli([
        "serve",
        "--http",
        `127.0.0.1:${port}`,
        "--ep",
        "cpu",
        "--out",
        path.join(root, "o"),
      ]);
      expect(busy.code, busy.stderr).toBe(2);
      expect(busy.stderr.trim().split("\n").at(-1)).toMatch(
        /^ADDRESS_IN_USE: 127\.0\.0\.1:\d+ is already in use/,
      );
    } finally {
      blocker.close();
    }
    const open = await cli(["serve", "--http", "0.0.0.0:0", "--ep", "cpu", "--out", path.join(root, "o")]);
    expect(open.code, open.stderr).toBe(2);
    expect(open.stderr.trim().split("\n").at(-1)).toMatch(
      /^INVALID_INPUT: refusing to serve on non-loopback address/,
    );
  });

  it("leaves no output folder behind when it refused to start", async () => {
    expect(existsSync(path.join(root, "o"))).toBe(false);
    expect((await stat(root)).isDirectory()).toBe(true);
  });
});
