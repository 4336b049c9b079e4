import { existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { basename, join } from "node:path";
import sharp from "sharp";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { SegError } from "../src/errors.js";
import {
  encodeMaskPng,
  newOutputName,
  renderOverlay,
  writeFileAtomic,
  writeMaskPng,
  writeRgbPng,
} from "../src/runtime/output.js";
import { checkImage, decodeMaskBitmap } from "../src/tools/inputs.js";

/** A mask file read back the way describe_region reads one. */
async function readMask(path: string): Promise<number[]> {
  return Array.from(await decodeMaskBitmap(await checkImage(readFileSync(path), path, 1e9, "mask")));
}

function randomMask(w: number, h: number, seed: number): Uint8Array {
  const out = new Uint8Array(w * h);
  let s = seed >>> 0;
  for (let i = 0; i < out.length; i++) {
    s = (Math.imul(s, 1664525) + 1013904223) >>> 0;
    out[i] = s >>> 31;
  }
  return out;
}

async function codeOf(p: Promise<unknown>): Promise<SegError> {
  const e = await p.then(
    () => undefined,
    (err: unknown) => err,
  );
  expect(e).toBeInstanceOf(SegError);
  return e as SegError;
}

describe("output", () => {
  let dir: string;
  beforeAll(() => {
    dir = mkdtempSync(join(tmpdir(), "qvs-output-"));
  });
  afterAll(() => rmSync(dir, { recursive: true, force: true }));

  it("writes a real 1-bit PNG that round-trips exactly", async () => {
    for (const [w, h] of [
      [1, 1],
      [13, 7],
      [64, 3],
      [301, 157],
    ] as const) {
      const mask = randomMask(w, h, w * h);
      const path = join(dir, `m-${w}x${h}.png`);
      await writeMaskPng(mask, w, h, path);
      const bytes = readFileSync(path);
      // IHDR: width, height, bit depth 1, colour type 0 (grayscale)
      expect(bytes.readUInt32BE(16)).toBe(w);
      expect(bytes.readUInt32BE(20)).toBe(h);
      expect(bytes[24]).toBe(1);
      expect(bytes[25]).toBe(0);
      const meta = await sharp(bytes).metadata();
      expect([meta.format, meta.width, meta.height, meta.channels]).toEqual(["png", w, h, 1]);
      expect(await readMask(path)).toEqual(Array.from(mask));
    }
    // no temporary files left behind
    expect(readdirSync(dir).filter((n) => n.endsWith(".tmp"))).toEqual([]);
  });

  it("keeps a 4000x3000 mask small", () => {
    const mask = new Uint8Array(4000 * 3000);
    for (let y = 1000; y < 2000; y++) mask.fill(1, y * 4000 + 1500, y * 4000 + 2500);
    const png = encodeMaskPng(mask, 4000, 3000);
    expect(png.length).toBeLessThan(100_000);
  });

  it("reads other tools' 8-bit and RGBA masks (>= 128 is the object, transparent is background)", async () => {
    const grey = join(dir, "grey.png");
    await sharp(Buffer.from([0, 127, 128, 255]), { raw: { width: 4, height: 1, channels: 1 } })
      .png()
      .toFile(grey);
    expect(await readMask(grey)).toEqual([0, 0, 1, 1]);
    const rgba = join(dir, "rgba.png");
    await sharp(Buffer.from([255, 255, 255, 255, 255, 255, 255, 0]), {
      raw: { width: 2, height: 1, channels: 4 },
    })
      .png()
      .toFile(rgba);
    expect(await readMask(rgba)).toEqual([1, 0]);
  });

  it("OUTPUT_WRITE_FAILED with the path and reason, and nothing half-written", async () => {
    const target = join(dir, "no-such-dir", "mask.png");
    const e = await codeOf(writeMaskPng(new Uint8Array(4), 2, 2, target));
    expect(e.code).toBe("OUTPUT_WRITE_FAILED");
    expect(e.message).toContain(target);
    expect(e.message).toMatch(/ENOENT/);
    // a directory in the way of the final name: the rename fails, the temp file is removed
    const blocked = join(dir, "blocked.png");
    rmSync(blocked, { force: true, recursive: true });
    mkdirSync(join(blocked, "child"), { recursive: true });
    expect((await codeOf(writeFileAtomic(blocked, new Uint8Array([1, 2, 3])))).code).toBe(
      "OUTPUT_WRITE_FAILED",
    );
    expect(readdirSync(dir).filter((n) => n.includes("blocked.png") && n.endsWith(".tmp"))).toEqual([]);
  });

  it("writes a small overlay preview", async () => {
    const w = 1200;
    const h = 600;
    const rgb = new Uint8Array(w * h * 3).fill(200);
    const m1 = new Uint8Array(w * h);
    for (let y = 0; y < 300; y++) m1.fill(1, y * w, y * w + 600); // top-left quarter
    const m2 = new Uint8Array(w * h);
    for (let y = 300; y < 600; y++) m2.fill(1, y * w + 600, (y + 1) * w); // bottom-right quarter
    const path = join(dir, "overlay.png");
    await writeRgbPng(await renderOverlay({ rgb, width: w, height: h }, [m1, m2]), path);
    const { data, info } = await sharp(path).raw().toBuffer({ resolveWithObject: true });
    expect([info.width, info.height, info.channels]).toEqual([512, 256, 3]);
    const px = (x: number, y: number) => Array.from(data.subarray((y * 512 + x) * 3, (y * 512 + x) * 3 + 3));
    expect(px(500, 10)).toEqual([80, 80, 80]); // no mask: dimmed
    expect(px(10, 10)).not.toEqual([200, 200, 200]); // tinted
    expect(px(0, 0)).toEqual([230, 25, 75]); // the first mask's outline, its colour at full strength
    expect(px(500, 250)).not.toEqual(px(10, 10)); // another colour
    await expect(renderOverlay({ rgb, width: w, height: h }, [new Uint8Array(3)])).rejects.toThrow(
      /expected 1200x600/,
    );
  });

  it("makes unguessable, non-colliding names without caller text", () => {
    const a = newOutputName(dir, "mask", 0);
    const b = newOutputName(dir, "mask", 0);
    expect(a).not.toBe(b);
    expect(basename(a)).toMatch(/^mask-[0-9a-z]+-[0-9a-f]{16}-0\.png$/);
    expect(existsSync(a)).toBe(false);
    expect(basename(newOutputName(dir, "overlay"))).toMatch(/^overlay-[0-9a-z]+-[0-9a-f]{16}\.png$/);
    expect(() => newOutputName(dir, "../evil")).toThrow(SegError);
  });
});
