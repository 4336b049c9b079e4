/**
 * tools/inputs.ts, the one reader and checker of a caller's image and mask: format by signature,
 * header, pixel limit, size after EXIF orientation; a mask read once, of the image's size, as its
 * tight box. Paths themselves are covered by paths.test.ts, the tools over MCP by tools.test.ts.
 */

import { mkdir, mkdtemp, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import path from "node:path";
import sharp from "sharp";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { createConfig } from "../src/config.js";
import { SegError } from "../src/errors.js";
import { OUTPUT_URI_PREFIX } from "../src/paths.js";
import { writeMaskPng } from "../src/runtime/output.js";
import {
  checkImage,
  type InputContext,
  prepareImage,
  prepareMaskBox,
  validateBox,
} from "../src/tools/inputs.js";

let dir: string;
let ctx: InputContext;

async function expectCode(p: Promise<unknown>, code: string, message: RegExp): Promise<SegError> {
  const e = await p.then(
    () => undefined,
    (err: unknown) => err,
  );
  expect(e).toBeInstanceOf(SegError);
  expect((e as SegError).code).toBe(code);
  expect((e as SegError).message).toMatch(message);
  return e as SegError;
}

const png = (width: number, height: number, channels: 1 | 3 | 4 = 3, value = 9) =>
  sharp(Buffer.alloc(width * height * channels, value), { raw: { width, height, channels } })
    .png()
    .toBuffer();

beforeAll(async () => {
  dir = await mkdtemp(path.join(tmpdir(), "qvs-inputs-"));
  await mkdir(path.join(dir, "out"));
  const config = createConfig({ cwd: dir, outDir: path.join(dir, "out"), logLevel: "silent" });
  ctx = { config, allowDirs: [dir] };
});
afterAll(async () => {
  await rm(dir, { recursive: true, force: true });
});

describe("checkImage", () => {
  it("returns the bytes with the size a viewer shows (EXIF orientation applied)", async () => {
    const jpg = await sharp(Buffer.alloc(20 * 10 * 3, 50), { raw: { width: 20, height: 10, channels: 3 } })
      .jpeg()
      .withMetadata({ orientation: 6 })
      .toBuffer();
    const image = await checkImage(jpg, "rotated.jpg", 1e9);
    expect([image.width, image.height, image.format]).toEqual([10, 20, "jpeg"]);
    expect(image.bytes).toBe(jpg);
  });

  it("UNSUPPORTED_FORMAT for other formats and for what is no image at all, naming the allowed ones", async () => {
    const svg = Buffer.from('<svg xmlns="http://www.w3.org/2000/svg" width="8" height="8"/>');
    await expectCode(
      checkImage(svg, "a.svg", 1e9),
      "UNSUPPORTED_FORMAT",
      /a SVG file: pass a PNG, JPEG, WebP/,
    );
    await expectCode(
      checkImage(Buffer.from("just some text"), "notes.png", 1e9),
      "UNSUPPORTED_FORMAT",
      /notes\.png is not a recognised image/,
    );
  });

  it("IMAGE_DECODE_FAILED for a truncated file, with its name and the fix", async () => {
    const good = await sharp(Buffer.alloc(64 * 64 * 3, 9), { raw: { width: 64, height: 64, channels: 3 } })
      .png({ compressionLevel: 0 })
      .toBuffer();
    await expectCode(
      checkImage(good.subarray(0, 20), "cut.png", 1e9),
      "IMAGE_DECODE_FAILED",
      /cut\.png looks like PNG but cannot be decoded .*re-export it/,
    );
  });

  it("IMAGE_TOO_LARGE over the pixel limit, with the numbers", async () => {
    const e = await expectCode(
      checkImage(await png(40, 30), "big.png", 1000),
      "IMAGE_TOO_LARGE",
      /40x30 = 1200 pixels, over the limit of 1000: downscale it, or raise --max-input-pixels/,
    );
    expect(e.details).toMatchObject({ width: 40, height: 30, limit: 1000 });
  });
});

describe("prepareImage", () => {
  it("reads a path once and a data: URI, with the same result", async () => {
    const bytes = await png(12, 8);
    await writeFile(path.join(dir, "a.png"), bytes);
    const byPath = await prepareImage("a.png", ctx);
    const byUri = await prepareImage(`data:image/png;base64,${bytes.toString("base64")}`, ctx);
    expect([byPath.width, byPath.height]).toEqual([12, 8]);
    expect(Buffer.from(byPath.bytes).equals(Buffer.from(byUri.bytes))).toBe(true);
    expect(byPath.label).toBe(path.join(dir, "a.png"));
    expect(byUri.label).toBe("data: URI");
  });
});

describe("prepareMaskBox", () => {
  const image = { width: 6, height: 4 };

  it("is the tight box of the white pixels: our 1-bit masks, 8-bit and RGBA ones, by path or URI", async () => {
    const bitmap = new Uint8Array(6 * 4);
    bitmap[1 * 6 + 2] = 1;
    bitmap[2 * 6 + 4] = 1;
    await writeMaskPng(bitmap, 6, 4, path.join(dir, "ours.png"));
    expect(await prepareMaskBox("ours.png", image, ctx)).toEqual([2, 1, 5, 3]);
    // 127 is background, 128 the object; a transparent pixel is background.
    const grey = Buffer.alloc(24, 127);
    grey[7] = 128;
    await sharp(grey, { raw: { width: 6, height: 4, channels: 1 } })
      .png()
      .toFile(path.join(dir, "grey.png"));
    expect(await prepareMaskBox("grey.png", image, ctx)).toEqual([1, 1, 2, 2]);
    const rgba = Buffer.alloc(24 * 4, 255);
    for (let i = 0; i < 24; i++) if (i !== 23) rgba[i * 4 + 3] = 0;
    await sharp(rgba, { raw: { width: 6, height: 4, channels: 4 } })
      .png()
      .toFile(path.join(dir, "rgba.png"));
    expect(await prepareMaskBox("rgba.png", image, ctx)).toEqual([5, 3, 6, 4]);
    await writeMaskPng(bitmap, 6, 4, path.join(dir, "out", "mask-1.png"));
    expect(await prepareMaskBox(`${OUTPUT_URI_PREFIX}mask-1.png`, image, ctx)).toEqual([2, 1, 5, 3]);
  });

  it("refuses a mask of another size, an empty mask and a data: URI, saying what to pass", async () => {
    await writeMaskPng(new Uint8Array(6), 3, 2, path.join(dir, "small.png"));
    await expectCode(prepareMaskBox("small.png", image, ctx), "INVALID_INPUT", /is 3x2 but the image is 6x4/);
    await writeMaskPng(new Uint8Array(24), 6, 4, path.join(dir, "empty-mask.png"));
    await expectCode(
      prepareMaskBox("empty-mask.png", image, ctx),
      "INVALID_INPUT",
      /is empty: it selects no pixel/,
    );
    await expectCode(
      prepareMaskBox("data:image/png;base64,AAAA", image, ctx),
      "INVALID_INPUT",
      /not a data: URI/,
    );
    await expectCode(prepareMaskBox("missing.png", image, ctx), "IMAGE_NOT_FOUND", /does not exist/);
  });
});

describe("validateBox", () => {
  it("refuses a box in 0..1 coordinates, naming the image's size and the pixel box meant", () => {
    const image = { width: 640, height: 480 };
    expect(() => validateBox([0.1, 0.25, 0.5, 0.75], image)).toThrow(
      /box \[0\.1, 0\.25, 0\.5, 0\.75\] looks normalised to 0\.\.1: send pixels of the original 640x480 image, e\.g\. \[64, 120, 320, 360\]/,
    );
    expect(() => validateBox([0, 0, 1, 1], image)).toThrow(/looks normalised/);
    // A 2x2 image has no other way to name its pixels; a real pixel box passes.
    expect(validateBox([0, 0, 1, 1], { width: 2, height: 2 })).toEqual([0, 0, 1, 1]);
    expect(validateBox([10, 20, 300, 400], image)).toEqual([10, 20, 300, 400]);
  });
});
