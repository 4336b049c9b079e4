import { existsSync, readFileSync } from "node:fs";
import { join } from "node:path";
import sharp from "sharp";
import { describe, expect, it } from "vitest";
import { SegError } from "../src/errors.js";
import {
  decodeImage,
  type PreprocessConfig,
  preprocess,
  resizeBicubic,
  roundHalfEven,
  smartResize,
} from "../src/runtime/preprocess.js";
import { checkImage } from "../src/tools/inputs.js";
import { diffStats, FIXTURES_DIR, fixtureCases, loadCase } from "./helpers/fixtures.js";

/** Bytes as tools/inputs.ts hands them to the runtime. */
const checked = (bytes: Uint8Array) => checkImage(bytes, "test image", 50_000_000);

function cfg(minPixels = 65_536, maxPixels = 16_777_216): PreprocessConfig {
  return {
    patchSize: 16,
    mergeSize: 2,
    temporalPatchSize: 2,
    imageMean: [0.5, 0.5, 0.5],
    imageStd: [0.5, 0.5, 0.5],
    minPixels,
    maxPixels,
  };
}

describe("smartResize", () => {
  it("uses Python's round-half-to-even (400 px -> 384)", () => {
    expect(roundHalfEven(12.5)).toBe(12);
    expect(roundHalfEven(13.5)).toBe(14);
    expect(roundHalfEven(2.4999)).toBe(2);
    expect(smartResize(400, 640)).toEqual([384, 640]);
  });

  it("matches the spec's worked example (1024x768 unchanged)", () => {
    expect(smartResize(768, 1024)).toEqual([768, 1024]);
  });

  it("scales tiny images up to min_pixels and huge ones down to max_pixels", () => {
    expect(smartResize(10, 10)).toEqual([256, 256]);
    const [h, w] = smartResize(3000, 4000, 32, 65_536, 1_048_576);
    expect([h, w]).toEqual([864, 1152]);
    expect(h * w).toBeLessThanOrEqual(1_048_576);
  });

  // [h, w, minPixels, maxPixels, Hr, Wr] from transformers 5.23 smart_resize(factor=32).
  const HF_TABLE: number[][] = [
    [400, 640, 65536, 16777216, 384, 640],
    [10, 10, 65536, 16777216, 256, 256],
    [3000, 4000, 65536, 1048576, 864, 1152],
    [768, 1024, 65536, 16777216, 768, 1024],
    [208, 400, 65536, 262144, 192, 384],
    [520, 144, 65536, 262144, 512, 128],
    [90, 120, 65536, 262144, 224, 320],
    [16, 3200, 65536, 1048576, 32, 3648],
    [1, 200, 65536, 1048576, 32, 3648],
    [6000, 8000, 65536, 262144, 416, 576],
    [1080, 1920, 200704, 1003520, 736, 1312],
    [1101, 4669, 65536, 262144, 224, 1024],
    [2090, 978, 65536, 1048576, 1472, 672],
    [3683, 3892, 65536, 16777216, 3680, 3904],
    [3110, 1739, 65536, 262144, 672, 352],
    [3997, 258, 65536, 1048576, 4000, 256],
    [3546, 4999, 65536, 262144, 416, 576],
    [3649, 2205, 65536, 16777216, 3648, 2208],
    [1875, 4854, 65536, 262144, 288, 800],
    [2601, 267, 65536, 262144, 1568, 160],
    [209, 4436, 65536, 262144, 96, 2336],
    [3123, 1794, 65536, 1048576, 1344, 768],
    [238, 4323, 65536, 262144, 96, 2176],
    [3588, 4084, 65536, 16777216, 3584, 4096],
    [1910, 2843, 65536, 262144, 416, 608],
  ];
  it("agrees with the HF reference on a table of sizes", () => {
    for (const [h, w, mn, mx, hr, wr] of HF_TABLE as [number, number, number, number, number, number][]) {
      expect(smartResize(h, w, 32, mn, mx), `${h}x${w}`).toEqual([hr, wr]);
    }
  });

  it("rejects aspect ratios over 200 and non-positive sizes with INVALID_INPUT", () => {
    expect(smartResize(1, 200, 32, 65_536, 1_048_576)).toEqual([32, 3648]);
    for (const [h, w] of [
      [1, 201],
      [5000, 20],
      [0, 10],
      [10.5, 10],
    ] as const) {
      let err: unknown;
      try {
        smartResize(h, w);
      } catch (e) {
        err = e;
      }
      expect(err).toBeInstanceOf(SegError);
      expect((err as SegError).code).toBe("INVALID_INPUT");
    }
    expect(() => smartResize(1, 201)).toThrow(/aspect ratio 201\.0 .* over the limit of 200/);
  });
});

describe("preprocess", () => {
  it("patchifies in merge-window order", () => {
    // 64x64 image = 4x4 patches: R encodes the patch row, G the patch column, B the pixel inside.
    const w = 64;
    const h = 64;
    const rgb = new Uint8Array(w * h * 3);
    for (let y = 0; y < h; y++) {
      for (let x = 0; x < w; x++) {
        const o = (y * w + x) * 3;
        rgb[o] = 40 * Math.floor(y / 16);
        rgb[o + 1] = 40 * Math.floor(x / 16);
        rgb[o + 2] = (y % 16) * 16 + (x % 16);
      }
    }
    const out = preprocess(rgb, w, h, cfg(1024));
    expect(out.grid).toEqual([1, 4, 4]);
    expect(out.resized).toEqual([64, 64]);
    expect(out.pixelValues.length).toBe(16 * 1536);
    const norm = (v: number) => Math.fround(Math.fround(Math.fround(v / 255) - 0.5) / 0.5);
    const patchOf = (p: number) => {
      const row = out.pixelValues.subarray(p * 1536, (p + 1) * 1536);
      // column e = c*512 + tp*256 + py*16 + px
      return {
        r: row[0],
        g: row[512],
        b: row[1024 + 5 * 16 + 7],
        tp1: row.subarray(256, 512),
        tp0: row.subarray(0, 256),
      };
    };
    const expectPatch = (p: number, pr: number, pc: number) => {
      const got = patchOf(p);
      expect(got.r, `row ${p} patch row`).toBe(norm(40 * pr));
      expect(got.g, `row ${p} patch col`).toBe(norm(40 * pc));
      expect(got.b).toBe(norm(5 * 16 + 7));
      expect(Array.from(got.tp1)).toEqual(Array.from(got.tp0)); // temporal slices duplicated
    };
    expectPatch(0, 0, 0); // top-left
    expectPatch(1, 0, 1); // its right neighbour
    expectPatch(2, 1, 0); // below row 0
    expectPatch(3, 1, 1);
    expectPatch(4, 0, 2); // first patch of the next 2x2 window
    expectPatch(8, 2, 0); // next window row
    expectPatch(15, 3, 3);
    // hr_image is the CHW normalised image
    expect(out.hrImage.length).toBe(3 * 64 * 64);
    expect(out.hrImage[64 * 64 + 20]).toBe(norm(40)); // G at (0, 20): patch column 1
  });

  it("resizes with PIL's bicubic semantics (hand-checked constants, identity when sizes match)", () => {
    const rgb = new Uint8Array([0, 0, 0, 255, 255, 255]); // 2x1: black, white
    // Upscale 2 -> 4 horizontally; Pillow 13 Image.resize((4, 1), BICUBIC) gives [0, 53, 202, 255].
    const up = resizeBicubic(rgb, 2, 1, 4, 1);
    expect(Array.from(up.filter((_, i) => i % 3 === 0))).toEqual([0, 53, 202, 255]);
    const same = resizeBicubic(rgb, 2, 1, 2, 1);
    expect(Array.from(same)).toEqual(Array.from(rgb));
    expect(same).not.toBe(rgb);
  });

  it("preprocesses a 1024x768 image as is and downscaled", () => {
    const w = 1024;
    const h = 768;
    const rgb = new Uint8Array(w * h * 3);
    for (let i = 0; i < rgb.length; i++) rgb[i] = (i * 2654435761) >>> 24;
    const out = preprocess(rgb, w, h, cfg());
    expect(out.grid).toEqual([1, 48, 64]);
    expect(out.pixelValues.length).toBe(48 * 64 * 1536);
    const down = preprocess(rgb, w, h, cfg(65_536, 262_144));
    expect(down.resized[0] * down.resized[1]).toBeLessThanOrEqual(262_144);
  });
});

describe("decodeImage (of bytes tools/inputs.ts checked)", () => {
  it("applies EXIF orientation", async () => {
    // 20 wide x 10 high, left half red; orientation 6 = rotate 90 degrees clockwise on display.
    const raw = Buffer.alloc(20 * 10 * 3);
    for (let y = 0; y < 10; y++) for (let x = 0; x < 10; x++) raw[(y * 20 + x) * 3] = 255;
    const jpg = await sharp(raw, { raw: { width: 20, height: 10, channels: 3 } })
      .jpeg({ quality: 95 })
      .withMetadata({ orientation: 6 })
      .toBuffer();
    const img = await decodeImage(await checked(jpg));
    expect([img.width, img.height]).toEqual([10, 20]);
    // after a clockwise turn the red half (was left) is on top
    expect(img.rgb[0]).toBeGreaterThan(200);
    expect(img.rgb[(19 * 10 + 5) * 3]).toBeLessThan(60);
  });

  it("composites alpha on white and returns 3 channels", async () => {
    const rgba = Buffer.from([255, 0, 0, 0, 0, 0, 255, 255, 0, 0, 0, 128]); // 3x1
    const png = await sharp(rgba, { raw: { width: 3, height: 1, channels: 4 } })
      .png()
      .toBuffer();
    const img = await decodeImage(await checked(png));
    expect(img.rgb.length).toBe(9);
    expect(Array.from(img.rgb.subarray(0, 3))).toEqual([255, 255, 255]); // transparent -> white
    expect(Array.from(img.rgb.subarray(3, 6))).toEqual([0, 0, 255]);
    const half = Array.from(img.rgb.subarray(6, 9));
    for (const v of half) expect(Math.abs(v - 127)).toBeLessThanOrEqual(1);
  });

  it("decodes the first frame of a GIF and greyscale PNGs as RGB", async () => {
    const gif = await sharp(Buffer.alloc(4 * 4 * 3, 200), { raw: { width: 4, height: 4, channels: 3 } })
      .gif()
      .toBuffer();
    const g = await decodeImage(await checked(gif));
    expect([g.width, g.height, g.rgb.length]).toEqual([4, 4, 48]);
    const grey = await sharp(Buffer.alloc(5 * 2, 77), { raw: { width: 5, height: 2, channels: 1 } })
      .png()
      .toBuffer();
    const p = await decodeImage(await checked(grey));
    expect(Array.from(p.rgb.subarray(0, 3))).toEqual([77, 77, 77]);
  });
});

// ---------------------------------------------------------------------------------------------
// Parity with the PyTorch/PIL reference (golden fixtures recorded by modelkit).

const PACK = "tiny-random";
const PACK_JSON = join(FIXTURES_DIR, "..", "..", "models", PACK, "pack.json");
const cases = existsSync(PACK_JSON) ? fixtureCases(PACK) : [];

describe.skipIf(cases.length === 0)(`preprocess parity with ${PACK} fixtures`, () => {
  it.each(cases)("%s: decode + preprocess reproduce pixel_values, grid and hr_image", async (name) => {
    const c = loadCase(PACK, name);
    const img = await decodeImage(await checked(readFileSync(c.imagePath)));
    expect([img.height, img.width]).toEqual(c.json.meta.original);
    const pre = (
      JSON.parse(readFileSync(PACK_JSON, "utf8")) as {
        preprocess: { min_pixels: number; max_pixels: number };
      }
    ).preprocess;
    const out = preprocess(img.rgb, img.width, img.height, cfg(pre.min_pixels, pre.max_pixels));
    expect(out.grid).toEqual(Array.from(c.tensor("image_grid_thw").data, Number));
    expect(out.grid).toEqual(c.json.meta.grid);
    expect(out.resized).toEqual(c.json.meta.resized);
    const pv = diffStats(out.pixelValues, c.tensor("pixel_values").data as Float32Array);
    const hr = diffStats(out.hrImage, c.tensor("hr_image").data as Float32Array);
    console.log(`${name}: pixel_values max |diff| ${pv.maxAbs}, hr_image max |diff| ${hr.maxAbs}`);
    // PIL-exact alpha compositing and resize + the reference's float32 normalisation: bit-identical.
    expect(pv.maxAbs).toBe(0);
    expect(hr.maxAbs).toBe(0);
  });
});
