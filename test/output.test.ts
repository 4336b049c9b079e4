import { existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { basename, join } from "node:path";
import sharp from "sharp";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { SegError } from "../src/errors.js";
import {
  encodeMaskPng,
  newOutputName,
  type RgbImage,
  writeFileAtomic,
  writeMaskPng,
  writeRgbPng,
} from "../src/runtime/output.js";
import {
  type Badge,
  DIGIT_FONT,
  DIGIT_H,
  DIGIT_W,
  jpegPreview,
  OUTLINE_COLOURS,
  PREVIEW_MAX_BYTES,
  placeBadges,
  renderOverlay,
} from "../src/runtime/overlay.js";
import { Timer } from "../src/runtime/timer.js";
import { OVERLAY_MAX_SIDE, writeMasks } from "../src/runtime/write.js";
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

type Rgb = readonly number[];

const dist2 = (a: Rgb, b: Rgb) => a.reduce((s, v, c) => s + (v - (b[c] as number)) ** 2, 0);

function pixel(img: RgbImage, x: number, y: number): number[] {
  const o = (y * img.width + x) * 3;
  return Array.from(img.rgb.subarray(o, o + 3));
}

/**
 * The number a badge shows, read back from the pixels alone: each font cell's centre is ink or fill
 * (whichever colour it is nearer, so JPEG noise is tolerated), and each digit's 5x7 pattern must be
 * exactly one glyph of DIGIT_FONT ("?" otherwise).
 */
function readBadge(img: RgbImage, b: Badge): string {
  let out = "";
  const digits = String(b.number).length;
  for (let d = 0; d < digits; d++) {
    const rows: number[] = [];
    for (let row = 0; row < DIGIT_H; row++) {
      let bits = 0;
      for (let col = 0; col < DIGIT_W; col++) {
        const x = b.text[0] + (d * (DIGIT_W + 1) + col) * b.unit + (b.unit >> 1);
        const y = b.text[1] + row * b.unit + (b.unit >> 1);
        const px = pixel(img, x, y);
        bits = (bits << 1) | (dist2(px, b.ink) < dist2(px, b.fill) ? 1 : 0);
      }
      rows.push(bits);
    }
    const hits = DIGIT_FONT.flatMap((g, n) => (g.every((v, r) => v === rows[r]) ? [n] : []));
    out += hits.length === 1 ? String(hits[0]) : "?";
  }
  return out;
}

/** A [h, w] 0/1 mask from a predicate on (x, y). */
function maskOf(w: number, h: number, inside: (x: number, y: number) => boolean): Uint8Array {
  const m = new Uint8Array(w * h);
  for (let y = 0; y < h; y++) for (let x = 0; x < w; x++) if (inside(x, y)) m[y * w + x] = 1;
  return m;
}

/** A smooth colourful [h, w, 3] image (a gradient), deterministic. */
/** writeMasks of whole-image boxes over a gradient, with an overlay file. */
function writeOnGradient(
  bitmaps: Uint8Array[],
  w: number,
  h: number,
  outputDir: string,
  extra: { previewMaxSide?: number },
) {
  return writeMasks(
    bitmaps.map((bitmap) => ({
      query: { label: "thing", box: [0, 0, w, h] as [number, number, number, number] },
      mask: { bitmap, areaPx: bitmap.reduce((s, v) => s + v, 0), box: null },
      maskScore: 1,
      score: 1,
    })),
    {
      outputDir,
      size: { width: w, height: h },
      pixels: async () => ({ rgb: gradient(w, h), width: w, height: h }),
      overlay: true,
      ...extra,
      timer: new Timer(undefined),
    },
  );
}

function gradient(w: number, h: number): Uint8Array {
  const rgb = new Uint8Array(w * h * 3);
  for (let y = 0; y < h; y++) {
    for (let x = 0; x < w; x++) {
      const o = (y * w + x) * 3;
      rgb[o] = (x * 255) / w;
      rgb[o + 1] = (y * 255) / h;
      rgb[o + 2] = 128;
    }
  }
  return rgb;
}

/** Uniform random bytes (an LCG, 4 bytes per step): the worst case for JPEG. */
function noise(bytes: number, seed: number): Uint8Array {
  const words = new Uint32Array(Math.ceil(bytes / 4));
  let s = seed >>> 0;
  for (let i = 0; i < words.length; i++) {
    s = (Math.imul(s, 1664525) + 1013904223) >>> 0;
    words[i] = s;
  }
  return new Uint8Array(words.buffer, 0, bytes);
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
    const rgb = new Uint8Array(w * h).fill(200);
    const grey = new Uint8Array(w * h * 3).fill(200);
    const m1 = maskOf(w, h, (x, y) => x < 600 && y < 300); // top-left quarter
    const m2 = maskOf(w, h, (x, y) => x >= 600 && y >= 300); // bottom-right quarter
    const path = join(dir, "overlay.png");
    const overlay = await renderOverlay({ rgb: grey, width: w, height: h }, [m1, m2], 512);
    await writeRgbPng(overlay, path);
    const { data, info } = await sharp(path).raw().toBuffer({ resolveWithObject: true });
    expect([info.width, info.height, info.channels]).toEqual([512, 256, 3]);
    const img = { rgb: new Uint8Array(data), width: 512, height: 256 };
    expect(pixel(img, 500, 10)).toEqual([80, 80, 80]); // no mask: dimmed
    expect(pixel(img, 10, 60)).not.toEqual([200, 200, 200]); // tinted
    expect(pixel(img, 0, 0)).toEqual([...(overlay.outlines[0] as Rgb)]); // outlined
    expect(OUTLINE_COLOURS).toContainEqual(overlay.outlines[0]);
    expect(pixel(img, 500, 250)).not.toEqual(pixel(img, 10, 60)); // another colour
    expect(overlay.badges.map((b) => readBadge(img, b))).toEqual(["1", "2"]);
    await expect(renderOverlay({ rgb, width: w, height: h }, [new Uint8Array(3)])).rejects.toThrow(
      /expected 1200x600x3/,
    );
    await expect(renderOverlay({ rgb: grey, width: w, height: h }, [new Uint8Array(3)])).rejects.toThrow(
      /expected 1200x600/,
    );
  });

  it("numbers each instance 1..n in mask order, on the instance, readable in the PNG and the JPEG", async () => {
    const w = 1500;
    const h = 1000;
    const masks = [
      maskOf(w, h, (x, y) => x >= 80 && x < 580 && y >= 80 && y < 420), // a rectangle
      maskOf(w, h, (x, y) => (x - 1000) ** 2 + (y - 500) ** 2 < 300 ** 2), // a disc
      // An L: the top-left of its box is not on it, its badge must still be.
      maskOf(w, h, (x, y) => x >= 150 && x < 650 && y >= 560 && y < 920 && (x < 300 || y >= 780)),
      // Smaller than a badge at 768 px: its badge goes beside it, so the object stays in view.
      maskOf(w, h, (x, y) => x >= 1300 && x < 1330 && y >= 100 && y < 130),
    ];
    const image = { rgb: gradient(w, h), width: w, height: h };
    const small = await renderOverlay(image, masks, 768);
    expect([small.width, small.height]).toEqual([768, 512]);
    expect(small.badges.map((b) => b.number)).toEqual([1, 2, 3, 4]);
    expect(small.badges.map((b) => readBadge(small, b))).toEqual(["1", "2", "3", "4"]);
    // the object is [666, 51, 681, 67) here: the badge sits on its top-left corner, off the object
    const tab = small.badges[3] as Badge;
    expect([tab.box[0], tab.box[3]]).toEqual([666, 51 - tab.unit]);
    for (const [i, b] of small.badges.slice(0, 3).entries()) {
      const [x1, y1, x2, y2] = b.box;
      expect(x1 >= 0 && y1 >= 0 && x2 <= small.width && y2 <= small.height).toBe(true);
      // the badge's centre lies on its own mask (mapped back to the original pixels)
      const cx = Math.floor((((x1 + x2) / 2) * w) / small.width);
      const cy = Math.floor((((y1 + y2) / 2) * h) / small.height);
      expect((masks[i] as Uint8Array)[cy * w + cx]).toBe(1);
      // filled with the instance's colour, bordered with its outline colour
      expect(pixel(small, b.text[0] - 1, b.text[1] - 1)).toEqual([...b.fill]);
      expect(pixel(small, x1, y1)).toEqual([...(small.outlines[i] as Rgb)]);
      expect(b.ink).not.toEqual(b.fill);
    }
    // the JPEG preview (same size, nothing resized) still reads 1, 2, 3 in the same places
    const jpeg = await jpegPreview(small, 768);
    const { data, info } = await sharp(jpeg).raw().toBuffer({ resolveWithObject: true });
    expect([info.width, info.height]).toEqual([768, 512]);
    const decoded = { rgb: new Uint8Array(data), width: info.width, height: info.height };
    expect(small.badges.map((b) => readBadge(decoded, b))).toEqual(["1", "2", "3", "4"]);
    // the full-size file: the same numbers at the same relative places, cells and outline scaled up
    const full = await renderOverlay(image, masks);
    expect([full.width, full.height]).toEqual([w, h]);
    expect(full.badges.map((b) => readBadge(full, b))).toEqual(["1", "2", "3", "4"]);
    for (const [i, b] of full.badges.entries()) {
      const s = small.badges[i] as Badge;
      expect(b.unit).toBeGreaterThan(s.unit);
      expect(Math.abs((b.box[0] + b.box[2]) / 2 / w - (s.box[0] + s.box[2]) / 2 / 768)).toBeLessThan(0.02);
      expect(Math.abs((b.box[1] + b.box[3]) / 2 / h - (s.box[1] + s.box[3]) / 2 / 512)).toBeLessThan(0.02);
    }
    expect(full.outlineWidth).toBeGreaterThan(small.outlineWidth);
    expect(small.outlineWidth).toBeGreaterThanOrEqual(2);
    expect(small.outlineWidth).toBeLessThanOrEqual(3);
  });

  it("outlines each mask just inside its edge in a colour far from what lies there", async () => {
    const w = 600;
    const h = 400;
    // A white object on the left, a black one on the right, each on its own colour.
    const rgb = new Uint8Array(w * h * 3);
    for (let p = 0; p < w * h; p++) if (p % w < 300) rgb.fill(255, p * 3, p * 3 + 3);
    const white = maskOf(w, h, (x, y) => x >= 60 && x < 240 && y >= 100 && y < 300);
    const black = maskOf(w, h, (x, y) => x >= 360 && x < 540 && y >= 100 && y < 300);
    const o = await renderOverlay({ rgb, width: w, height: h }, [white, black]);
    const t = o.outlineWidth;
    expect(t).toBeGreaterThanOrEqual(2);
    expect(o.outlines).toEqual([
      [0, 0, 0],
      [255, 255, 255],
    ]);
    for (const [i, x0] of [60, 360].entries()) {
      const c = [...(o.outlines[i] as Rgb)];
      for (let d = 0; d < t; d++) {
        expect(pixel(o, x0 + d, 150)).toEqual(c); // left edge, t px thick, inside the mask
        expect(pixel(o, x0 + 100, 100 + d)).toEqual(c); // top edge
      }
      expect(pixel(o, x0 - 1, 150)).not.toEqual(c); // outside: dimmed image
      const inner = pixel(o, x0 + t + 1, 150); // translucent fill: tinted, not painted over
      expect(inner).not.toEqual(c);
      // contrast with both sides of the line
      expect(dist2(c, inner)).toBeGreaterThan(150 ** 2);
      expect(dist2(c, pixel(o, x0 - 2, 150))).toBeGreaterThan(100 ** 2);
    }
    // the fill keeps the object visible: white stays light, black stays dark
    expect(Math.min(...pixel(o, 150, 250))).toBeGreaterThan(150);
    expect(Math.max(...pixel(o, 450, 250))).toBeLessThan(100);
  });

  it("gives an empty mask no badge and keeps the others' numbers; a mask too small to show keeps its badge", async () => {
    const w = 3072;
    const h = 3072;
    const rgb = new Uint8Array(w * h * 3).fill(90);
    const a = maskOf(w, h, (x, y) => x >= 200 && x < 1200 && y >= 200 && y < 1200);
    const empty = new Uint8Array(w * h);
    // One pixel the 768 px overlay never samples (it reads pixels 4k + 2).
    const speck = new Uint8Array(w * h);
    speck[2000 * w + 2000] = 1;
    const o = await renderOverlay({ rgb, width: w, height: h }, [a, empty, speck], 768);
    expect(o.badges.map((b) => b.number)).toEqual([1, 3]);
    expect(o.outlines[1]).toBeUndefined();
    expect(o.outlines[2]).toBeUndefined(); // nothing to outline at this size...
    const b3 = o.badges[1] as Badge;
    expect(readBadge(o, b3)).toBe("3"); // ...but the number is there, right above the speck
    expect(b3.box[0]).toBe(500);
    expect(b3.box[3]).toBe(500 - b3.unit);
    const none = await renderOverlay({ rgb, width: w, height: h }, [empty], 768);
    expect(none.badges).toEqual([]);
  });

  it("moves a badge off one it would cover", () => {
    const unit = 3;
    const boxes = placeBadges(
      Array.from({ length: 12 }, () => ({ x: 100, y: 100, depth: 100, box: [0, 0, 200, 200] as const })),
      768,
      512,
      unit,
    ) as [number, number, number, number][];
    expect(boxes).toHaveLength(12);
    const overlap = (p: number[], q: number[]) =>
      (p[0] as number) < (q[2] as number) &&
      (q[0] as number) < (p[2] as number) &&
      (p[1] as number) < (q[3] as number) &&
      (q[1] as number) < (p[3] as number);
    for (const [i, p] of boxes.entries()) {
      expect(p[0] >= 0 && p[1] >= 0 && p[2] <= 768 && p[3] <= 512).toBe(true);
      for (const q of boxes.slice(0, i)) expect(overlap(p, q)).toBe(false);
    }
    // the first keeps its spot, centred on its anchor
    const first = boxes[0] as number[];
    expect(Math.abs((first[0] as number) + (first[2] as number) - 200)).toBeLessThanOrEqual(1);
    expect(placeBadges([undefined], 768, 512, unit)).toEqual([undefined]);
    // A small object keeps its badge beside it, not on it: above its top-left corner, or below it
    // when it touches the top of the image.
    const [above, below] = placeBadges(
      [
        { x: 305, y: 205, depth: 5, box: [300, 200, 310, 210] },
        { x: 505, y: 5, depth: 5, box: [500, 0, 510, 10] },
      ],
      768,
      512,
      unit,
    );
    expect(above?.[0]).toBe(300);
    expect(above?.[3]).toBe(200 - unit);
    expect(below?.[0]).toBe(500);
    expect(below?.[1]).toBe(10 + unit);
    // in a corner: still inside the image, above the object and aligned with its right side
    const [corner] = placeBadges([{ x: 763, y: 507, depth: 5, box: [758, 502, 768, 512] }], 768, 512, unit);
    expect(corner?.[2]).toBe(768);
    expect(corner?.[3]).toBe(502 - unit);
  });

  it("keeps the preview of a 4000x3000 noise image with 12 instances within 768 px and 200 KB", async () => {
    const w = 4000;
    const h = 3000;
    const image = { rgb: noise(w * h * 3, 11), width: w, height: h };
    const masks = Array.from({ length: 12 }, (_, k) => {
      const cx = 500 + (k % 4) * 1000;
      const cy = 500 + Math.floor(k / 4) * 1000;
      const r = 200 + k * 25;
      return maskOf(w, h, (x, y) => (x - cx) ** 2 + (y - cy) ** 2 < r * r);
    });
    const small = await renderOverlay(image, masks, 768);
    const jpeg = await jpegPreview(small, 768);
    const meta = await sharp(jpeg).metadata();
    expect(Math.max(meta.width ?? 0, meta.height ?? 0)).toBe(768);
    expect(jpeg.length).toBeLessThan(PREVIEW_MAX_BYTES);
    expect(PREVIEW_MAX_BYTES).toBeLessThanOrEqual(200 * 1024);
    const { data } = await sharp(jpeg).raw().toBuffer({ resolveWithObject: true });
    const decoded = { rgb: new Uint8Array(data), width: small.width, height: small.height };
    expect(small.badges.map((b) => readBadge(decoded, b))).toEqual(masks.map((_, i) => String(i + 1)));
    // Noise at full strength at the preview's own size (nothing averaged away by the resize), at
    // the largest previewMaxSide the config allows: the lower-quality steps keep it under the limit.
    const raw = { rgb: noise(1024 * 768 * 3, 5), width: 1024, height: 768 };
    const worst = await jpegPreview(raw, 1024);
    expect((await sharp(worst).metadata()).width).toBe(1024);
    expect(worst.length).toBeLessThan(PREVIEW_MAX_BYTES);
  }, 60_000);

  it("writeMasks: the overlay file of a very wide image stays at most OVERLAY_MAX_SIDE; its mask is full size", async () => {
    const w = 3000;
    const h = 60;
    const out = join(dir, "wide");
    mkdirSync(out);
    const bitmap = maskOf(w, h, (x, y) => x >= 100 && x < 900 && y >= 10 && y < 50);
    const written = await writeOnGradient([bitmap], w, h, out, {});
    const overlay = await sharp(written.overlayPath as string).metadata();
    expect([overlay.width, overlay.height]).toEqual([OVERLAY_MAX_SIDE, 41]);
    const mask = await sharp(written.instances[0]?.mask.path as string).metadata();
    expect([mask.width, mask.height]).toEqual([w, h]);
  });

  it("writeMasks: the overlay file at full size and the preview carry the same numbers", async () => {
    const w = 1000;
    const h = 800;
    const out = join(dir, "written");
    mkdirSync(out);
    const bitmaps = [
      maskOf(w, h, (x, y) => x >= 100 && x < 400 && y >= 100 && y < 400),
      maskOf(w, h, (x, y) => x >= 600 && x < 900 && y >= 300 && y < 700),
    ];
    const written = await writeOnGradient(bitmaps, w, h, out, { previewMaxSide: 768 });
    const file = await sharp(written.overlayPath as string).metadata();
    expect([file.width, file.height]).toEqual([w, h]);
    const preview = await sharp(written.preview as Uint8Array).metadata();
    expect([preview.width, preview.height]).toEqual([768, 614]);
    // Both drawn the way renderOverlay draws them: read the numbers back from the bytes on disk.
    const image = { rgb: gradient(w, h), width: w, height: h };
    const expected = await renderOverlay(image, bitmaps);
    const { data } = await sharp(written.overlayPath as string)
      .raw()
      .toBuffer({ resolveWithObject: true });
    const onDisk = { rgb: new Uint8Array(data), width: w, height: h };
    expect(expected.badges.map((b) => readBadge(onDisk, b))).toEqual(["1", "2"]);
    const small = await renderOverlay(image, bitmaps, 768);
    const jp = await sharp(written.preview as Uint8Array)
      .raw()
      .toBuffer({ resolveWithObject: true });
    const inline = { rgb: new Uint8Array(jp.data), width: 768, height: 614 };
    expect(small.badges.map((b) => readBadge(inline, b))).toEqual(["1", "2"]);
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
