/**
 * The overlay and its inline preview: the image dimmed outside the masks, each mask tinted, outlined
 * in a contrasting colour and numbered 1..n in the order of `instances`, so that a model looking at
 * the preview can tell which entry covers what before it edits anything.
 */

import sharp from "sharp";
import { SegError } from "../errors.js";
import type { RgbImage } from "./output.js";

// ---------------------------------------------------------------------------------------------
// Overlay: translucent fills, contrasting outlines and numbered badges, so that a model looking at
// the preview can tell which entry of `instances` covers what before it edits anything.

type Rgb = readonly [number, number, number];

/** Fill and badge colour per instance (cycled). */
const OVERLAY_COLOURS: readonly Rgb[] = [
  [230, 25, 75],
  [60, 180, 75],
  [0, 130, 200],
  [245, 130, 48],
  [145, 30, 180],
  [70, 240, 240],
  [240, 50, 230],
  [210, 245, 60],
  [250, 190, 212],
  [0, 128, 128],
];

/**
 * Outline candidates, far apart in RGB: whatever lies under a mask, one of them is at least ~220
 * away from its mean colour, so the contour never disappears into the object.
 */
export const OUTLINE_COLOURS: readonly Rgb[] = [
  [255, 255, 255],
  [0, 0, 0],
  [255, 255, 0],
  [0, 255, 255],
  [255, 0, 255],
];

/** 5x7 bitmap digits 0-9: [10][7] rows, top first; bit 4 is the leftmost column. */
export const DIGIT_FONT: readonly (readonly number[])[] = [
  [0x0e, 0x11, 0x13, 0x15, 0x19, 0x11, 0x0e],
  [0x04, 0x0c, 0x04, 0x04, 0x04, 0x04, 0x0e],
  [0x0e, 0x11, 0x01, 0x02, 0x04, 0x08, 0x1f],
  [0x1f, 0x02, 0x04, 0x02, 0x01, 0x11, 0x0e],
  [0x02, 0x06, 0x0a, 0x12, 0x1f, 0x02, 0x02],
  [0x1f, 0x10, 0x1e, 0x01, 0x01, 0x11, 0x0e],
  [0x06, 0x08, 0x10, 0x1e, 0x11, 0x11, 0x0e],
  [0x1f, 0x01, 0x02, 0x04, 0x08, 0x08, 0x08],
  [0x0e, 0x11, 0x11, 0x0e, 0x11, 0x11, 0x0e],
  [0x0e, 0x11, 0x11, 0x0f, 0x01, 0x02, 0x0c],
];
export const DIGIT_W = 5;
export const DIGIT_H = 7;

/** A number label drawn on the overlay, in overlay pixels. */
export interface Badge {
  /** 1-based: the instance's place in `instances` (the order of the masks given to renderOverlay). */
  number: number;
  /** [x1, y1, x2, y2], x2/y2 exclusive, inside the image. */
  box: [number, number, number, number];
  /** Top-left of the first digit; a digit is DIGIT_W x DIGIT_H cells of unit x unit px, one cell apart. */
  text: [number, number];
  unit: number;
  /** Badge fill (the instance's colour), digit colour, and border (the instance's outline colour). */
  fill: Rgb;
  ink: Rgb;
  border: Rgb;
}

export interface Overlay extends RgbImage {
  /** One per instance with pixels, in instance order (an empty mask gets none). */
  badges: Badge[];
  /** Per instance, its outline colour, or undefined when no pixel of it shows at this size: [masks.length]. */
  outlines: (Rgb | undefined)[];
  /** Outline thickness in overlay pixels. */
  outlineWidth: number;
}

/**
 * Badge cell size and outline thickness for an overlay of this size. Both scale with the long side,
 * so the full-size overlay file and the small preview look alike (3 px cells and outlines at 768).
 */
export function overlayMetrics(width: number, height: number): { unit: number; outline: number } {
  const side = Math.max(width, height);
  if (side < 160) return { unit: 1, outline: 1 };
  return { unit: Math.max(2, Math.round(side / 256)), outline: Math.max(2, Math.round(side / 300)) };
}

/** WCAG relative luminance of an sRGB colour, 0..1. */
function luminance([r, g, b]: Rgb): number {
  const lin = (v: number) => {
    const c = v / 255;
    return c <= 0.04045 ? c / 12.92 : ((c + 0.055) / 1.055) ** 2.4;
  };
  return 0.2126 * lin(r) + 0.7152 * lin(g) + 0.0722 * lin(b);
}

/** Black or white, whichever reads better on `fill`. */
function inkFor(fill: Rgb): Rgb {
  const l = luminance(fill);
  return (l + 0.05) / 0.05 >= 1.05 / (l + 0.05) ? [0, 0, 0] : [255, 255, 255];
}

/** The outline candidate farthest from `mean`. */
function contrastingColour(mean: Rgb): Rgb {
  let best = OUTLINE_COLOURS[0] as Rgb;
  let bestD = -1;
  for (const c of OUTLINE_COLOURS) {
    const d = (c[0] - mean[0]) ** 2 + (c[1] - mean[1]) ** 2 + (c[2] - mean[2]) ** 2;
    if (d > bestD) {
      bestD = d;
      best = c;
    }
  }
  return best;
}

const FAR = 60_000; // chamfer "infinity": FAR + 4 still fits a Uint16

/**
 * Chamfer 3-4 distance (x3, close to Euclidean) from each pixel of a [ch, cw] crop to the nearest
 * pixel whose bit equals `target`, in a copy padded by one pixel on every side: [(ch + 2) * (cw + 2)],
 * crop pixel (x, y) at (y + 1) * (cw + 2) + x + 1. The padding counts as a target when
 * `borderIsTarget` (a mask ends at the image edge), and as unreachable otherwise; it spares the two
 * passes every bounds check, which matters at full resolution.
 */
function chamfer(
  bits: Uint8Array,
  cw: number,
  ch: number,
  target: 0 | 1,
  borderIsTarget: boolean,
): Uint16Array {
  const pw = cw + 2;
  const d = new Uint16Array(pw * (ch + 2)).fill(borderIsTarget ? 0 : FAR);
  for (let y = 0; y < ch; y++) {
    const o = (y + 1) * pw + 1;
    for (let x = 0; x < cw; x++) d[o + x] = bits[y * cw + x] === target ? 0 : FAR;
  }
  for (let y = 1; y <= ch; y++) {
    for (let i = y * pw + 1, end = i + cw; i < end; i++) {
      const v = d[i] as number;
      if (v === 0) continue;
      const a = Math.min(d[i - 1] as number, d[i - pw] as number) + 3;
      const b = Math.min(d[i - pw - 1] as number, d[i - pw + 1] as number) + 4;
      d[i] = Math.min(v, a, b);
    }
  }
  for (let y = ch; y >= 1; y--) {
    for (let i = y * pw + cw, end = y * pw; i > end; i--) {
      const v = d[i] as number;
      if (v === 0) continue;
      const a = Math.min(d[i + 1] as number, d[i + pw] as number) + 3;
      const b = Math.min(d[i + pw + 1] as number, d[i + pw - 1] as number) + 4;
      d[i] = Math.min(v, a, b);
    }
  }
  return d;
}

/** Badge size for `digits` digits at cell size `unit`: border, one cell of padding, the digits. */
function badgeSize(digits: number, unit: number): { w: number; h: number; border: number; inset: number } {
  const border = Math.max(1, Math.round(unit / 2));
  const inset = border + unit;
  return {
    w: digits * (DIGIT_W + 1) * unit - unit + 2 * inset,
    h: DIGIT_H * unit + 2 * inset,
    border,
    inset,
  };
}

/** Where a mask is, for its badge, in overlay pixels. */
export interface BadgeAnchor {
  /** The mask's most interior point, and its distance from the mask's edge. */
  x: number;
  y: number;
  depth: number;
  /** The mask's box [x1, y1, x2, y2), x2/y2 exclusive. */
  box: readonly [number, number, number, number];
}

/**
 * Badge boxes [x1, y1, x2, y2) for anchors: [n], undefined for instances without a badge. A badge
 * that fits inside its mask sits on the most interior point; one that would hide a small object
 * goes just outside the object's box instead (above its top-left corner, else below, left, right),
 * like a detector's label tab. A spot that would need clamping into the image or that covers an
 * earlier badge is passed over while another is free; nearby fallbacks (below, above, right, left,
 * diagonals, then twice as far) come last, and only if every spot collides does a badge overlap.
 */
export function placeBadges(
  anchors: readonly (BadgeAnchor | undefined)[],
  width: number,
  height: number,
  unit: number,
): ([number, number, number, number] | undefined)[] {
  const placed: [number, number, number, number][] = [];
  return anchors.map((a, i) => {
    if (a === undefined) return undefined;
    const { w, h } = badgeSize(String(i + 1).length, unit);
    const gap = unit;
    // Candidate top-left corners, best first.
    const spots: [number, number][] = [];
    const cx = Math.round(a.x - w / 2);
    const cy = Math.round(a.y - h / 2);
    const [bx0, by0, bx1, by1] = a.box;
    const outside: [number, number][] = [
      [bx0, by0 - h - gap],
      [bx0, by1 + gap],
      [bx0 - w - gap, by0],
      [bx1 + gap, by0],
      [bx1 - w, by0 - h - gap],
      [bx1 - w, by1 + gap],
    ];
    if (a.depth >= Math.hypot(w / 2, h / 2)) spots.push([cx, cy], ...outside);
    else spots.push(...outside, [cx, cy]);
    for (const k of [1, 2]) {
      const sx = k * (w + gap);
      const sy = k * (h + gap);
      for (const [dx, dy] of [
        [0, sy],
        [0, -sy],
        [sx, 0],
        [-sx, 0],
        [sx, sy],
        [-sx, sy],
        [sx, -sy],
        [-sx, -sy],
      ] as const) {
        spots.push([cx + dx, cy + dy]);
      }
    }
    const clamp = ([x, y]: [number, number]): [number, number, number, number] => {
      const cx0 = Math.max(0, Math.min(width - w, x));
      const cy0 = Math.max(0, Math.min(height - h, y));
      return [cx0, cy0, Math.min(width, cx0 + w), Math.min(height, cy0 + h)];
    };
    const free = (b: readonly number[]) =>
      placed.every(
        (p) =>
          (b[2] as number) + gap <= p[0] ||
          p[2] + gap <= (b[0] as number) ||
          (b[3] as number) + gap <= p[1] ||
          p[3] + gap <= (b[1] as number),
      );
    const inImage = ([x, y]: [number, number]) => x >= 0 && y >= 0 && x + w <= width && y + h <= height;
    const chosen =
      spots.filter(inImage).map(clamp).find(free) ??
      spots.map(clamp).find(free) ??
      clamp(spots[0] as [number, number]);
    placed.push(chosen);
    return chosen;
  });
}

function fillRect(img: RgbImage, x0: number, y0: number, x1: number, y1: number, c: Rgb): void {
  for (let y = Math.max(0, y0); y < Math.min(img.height, y1); y++) {
    for (let x = Math.max(0, x0); x < Math.min(img.width, x1); x++) {
      const o = (y * img.width + x) * 3;
      img.rgb[o] = c[0];
      img.rgb[o + 1] = c[1];
      img.rgb[o + 2] = c[2];
    }
  }
}

function drawBadge(img: RgbImage, b: Badge): void {
  const [x0, y0, x1, y1] = b.box;
  const { border } = badgeSize(String(b.number).length, b.unit);
  fillRect(img, x0, y0, x1, y1, b.border);
  fillRect(img, x0 + border, y0 + border, x1 - border, y1 - border, b.fill);
  const u = b.unit;
  for (const [d, ch] of [...String(b.number)].entries()) {
    const glyph = DIGIT_FONT[Number(ch)] as readonly number[];
    const gx = b.text[0] + d * (DIGIT_W + 1) * u;
    for (let row = 0; row < DIGIT_H; row++) {
      for (let col = 0; col < DIGIT_W; col++) {
        if (((glyph[row] as number) >> (DIGIT_W - 1 - col)) & 1) {
          fillRect(
            img,
            gx + col * u,
            b.text[1] + row * u,
            gx + (col + 1) * u,
            b.text[1] + (row + 1) * u,
            b.ink,
          );
        }
      }
    }
  }
}

/**
 * The overlay, the image scaled so its longer side is at most `maxSide` (never enlarged): outside
 * every mask the image is dimmed, each mask is tinted in its own colour (translucent, so the object
 * stays visible), outlined just inside its edge in whichever of OUTLINE_COLOURS is farthest from the
 * pixels around that edge, and labelled with its number 1..n (the order of `masks`) on a badge in its
 * colour: at its most interior point, or beside it when the badge would hide it (placeBadges). A
 * mask too small to show at this size still gets its badge.
 * masks: each [height * width] 0/1, the order of `instances`.
 */
export async function renderOverlay(
  image: RgbImage,
  masks: readonly Uint8Array[],
  maxSide = Number.POSITIVE_INFINITY,
): Promise<Overlay> {
  const { rgb, width, height } = image;
  if (rgb.length !== width * height * 3) {
    throw new SegError("INVALID_INPUT", `RGB buffer has ${rgb.length} bytes, expected ${width}x${height}x3`);
  }
  for (const m of masks) {
    if (m.length !== width * height) {
      throw new SegError("INVALID_INPUT", `mask holds ${m.length} values, expected ${width}x${height}`);
    }
  }
  const scale = Math.min(1, maxSide / Math.max(width, height));
  const ow = Math.max(1, Math.round(width * scale));
  const oh = Math.max(1, Math.round(height * scale));
  const small =
    ow === width && oh === height
      ? Buffer.from(rgb)
      : await sharp(Buffer.from(rgb.buffer, rgb.byteOffset, rgb.byteLength), {
          raw: { width, height, channels: 3 },
        })
          .resize(ow, oh, { fit: "fill" })
          .raw()
          .toBuffer();
  const out: RgbImage = { rgb: small, width: ow, height: oh };
  const { unit, outline } = overlayMetrics(ow, oh);
  // Nearest-neighbour source column per overlay column, and source row offset per overlay row: [ow], [oh].
  const srcX = new Int32Array(ow);
  for (let x = 0; x < ow; x++) srcX[x] = Math.min(width - 1, Math.floor(((x + 0.5) * width) / ow));
  const srcRow = new Int32Array(oh);
  for (let y = 0; y < oh; y++)
    srcRow[y] = Math.min(height - 1, Math.floor(((y + 0.5) * height) / oh)) * width;

  // Per overlay pixel, the last mask covering it or -1: [oh * ow]. Per mask its box at this size, or
  // undefined when no overlay pixel samples it; `tiny` keeps the badge spot of a mask that has pixels
  // but falls between the samples. Only each mask's own box is visited: most of a mask is zeros.
  const owner = new Int16Array(ow * oh).fill(-1);
  const tiny: (BadgeAnchor | undefined)[] = [];
  const boxes: ([number, number, number, number] | undefined)[] = masks.map((m, i) => {
    tiny.push(undefined);
    const src = sourceBox(m, width, height);
    if (src === undefined) return undefined;
    let ox0 = 0;
    while (ox0 < ow && (srcX[ox0] as number) < src[0]) ox0++;
    let ox1 = ow;
    while (ox1 > ox0 && (srcX[ox1 - 1] as number) >= src[2]) ox1--;
    let oy0 = 0;
    while (oy0 < oh && (srcRow[oy0] as number) < src[1] * width) oy0++;
    let oy1 = oh;
    while (oy1 > oy0 && (srcRow[oy1 - 1] as number) >= src[3] * width) oy1--;
    let x0 = ow;
    let y0 = oh;
    let x1 = -1;
    let y1 = -1;
    for (let y = oy0; y < oy1; y++) {
      const sy = srcRow[y] as number;
      for (let x = ox0; x < ox1; x++) {
        if (m[sy + (srcX[x] as number)] === 0) continue;
        owner[y * ow + x] = i;
        if (x < x0) x0 = x;
        if (x > x1) x1 = x;
        if (y < y0) y0 = y;
        y1 = y;
      }
    }
    if (x1 >= 0) return [x0, y0, x1 + 1, y1 + 1];
    const x = ((src[0] + src[2]) / 2) * (ow / width);
    const y = ((src[1] + src[3]) / 2) * (oh / height);
    tiny[i] = { x, y, depth: 0, box: [Math.floor(x), Math.floor(y), Math.floor(x) + 1, Math.floor(y) + 1] };
    return undefined;
  });
  // Dim what no mask covers (to 2/5), tint what one does (1/3 its colour): [256] and [colours][3 * 256].
  const dim = Uint8Array.from({ length: 256 }, (_, v) => (v * 2) / 5);
  const tint = OVERLAY_COLOURS.map((colour) =>
    Uint8Array.from({ length: 768 }, (_, j) => ((j & 255) * 2 + (colour[j >> 8] as number)) / 3),
  );
  for (let p = 0, o = 0; p < ow * oh; p++, o += 3) {
    const k = owner[p] as number;
    if (k < 0) {
      small[o] = dim[small[o] as number] as number;
      small[o + 1] = dim[small[o + 1] as number] as number;
      small[o + 2] = dim[small[o + 2] as number] as number;
    } else {
      const t = tint[k % tint.length] as Uint8Array;
      small[o] = t[small[o] as number] as number;
      small[o + 1] = t[256 + (small[o + 1] as number)] as number;
      small[o + 2] = t[512 + (small[o + 2] as number)] as number;
    }
  }

  // Per mask: its contour (overlay pixel indices, drawn after every mean is taken), the mean colour
  // of the tinted/dimmed pixels on both sides of it, and its most interior point (the badge anchor).
  const T = 3 * outline; // chamfer units
  const contours: (Int32Array | undefined)[] = [];
  const outlines: (Rgb | undefined)[] = [];
  const anchors: (BadgeAnchor | undefined)[] = [];
  for (const [i, m] of masks.entries()) {
    const box = boxes[i];
    if (box === undefined) {
      contours.push(undefined);
      outlines.push(undefined);
      anchors.push(tiny[i]);
      continue;
    }
    const margin = outline + 1;
    const cx0 = Math.max(0, box[0] - margin);
    const cy0 = Math.max(0, box[1] - margin);
    const cw = Math.min(ow, box[2] + margin) - cx0;
    const ch = Math.min(oh, box[3] + margin) - cy0;
    // The mask cropped to its box plus a margin, at overlay size: [ch * cw].
    const crop = new Uint8Array(cw * ch);
    for (let y = 0; y < ch; y++) {
      const sy = srcRow[cy0 + y] as number;
      if (ow === width)
        crop.set(m.subarray(sy + cx0, sy + cx0 + cw), y * cw); // full size: rows as they are
      else for (let x = 0; x < cw; x++) crop[y * cw + x] = m[sy + (srcX[cx0 + x] as number)] as number;
    }
    const inside = chamfer(crop, cw, ch, 0, true);
    const outside = chamfer(crop, cw, ch, 1, false);
    const contour: number[] = [];
    let r = 0;
    let g = 0;
    let b = 0;
    let n = 0;
    let best = -1;
    let bestOff = Number.POSITIVE_INFINITY;
    let anchor = { x: 0, y: 0 };
    const midX = (box[0] + box[2]) / 2 - cx0;
    const midY = (box[1] + box[3]) / 2 - cy0;
    for (let y = 0; y < ch; y++) {
      for (let x = 0; x < cw; x++) {
        const j = y * cw + x;
        const q = (y + 1) * (cw + 2) + x + 1; // in the padded distance maps
        const p = (cy0 + y) * ow + cx0 + x;
        let band = false;
        if (crop[j] === 1) {
          const d = inside[q] as number;
          if (d <= T) contour.push(p);
          else band = d <= 2 * T;
          if (d >= best) {
            // Ties (a long bar) go to the point nearest the box centre.
            const off = (x - midX) ** 2 + (y - midY) ** 2;
            if (d > best || off < bestOff) {
              best = d;
              bestOff = off;
              anchor = { x: cx0 + x + 0.5, y: cy0 + y + 0.5 };
            }
          }
        } else {
          band = (outside[q] as number) <= T;
        }
        if (band) {
          r += small[p * 3] as number;
          g += small[p * 3 + 1] as number;
          b += small[p * 3 + 2] as number;
          n++;
        }
      }
    }
    if (n === 0) {
      // A mask thinner than its outline that fills the image: all we have is the contour itself.
      for (const p of contour) {
        r += small[p * 3] as number;
        g += small[p * 3 + 1] as number;
        b += small[p * 3 + 2] as number;
      }
      n = Math.max(1, contour.length);
    }
    contours.push(Int32Array.from(contour));
    outlines.push(contrastingColour([r / n, g / n, b / n]));
    anchors.push({ ...anchor, depth: best / 3, box });
  }
  for (const [i, contour] of contours.entries()) {
    const c = outlines[i];
    if (contour === undefined || c === undefined) continue;
    for (const p of contour) {
      small[p * 3] = c[0];
      small[p * 3 + 1] = c[1];
      small[p * 3 + 2] = c[2];
    }
  }

  const badges: Badge[] = [];
  for (const [i, box] of placeBadges(anchors, ow, oh, unit).entries()) {
    if (box === undefined) continue;
    const fill = OVERLAY_COLOURS[i % OVERLAY_COLOURS.length] as Rgb;
    const { inset } = badgeSize(String(i + 1).length, unit);
    const badge: Badge = {
      number: i + 1,
      box,
      text: [box[0] + inset, box[1] + inset],
      unit,
      fill,
      ink: inkFor(fill),
      // An instance too small to outline here still gets a border that stands out from the dimmed image.
      border: outlines[i] ?? [255, 255, 255],
    };
    drawBadge(out, badge);
    badges.push(badge);
  }
  return { ...out, badges, outlines, outlineWidth: outline };
}

/**
 * Tight box [x1, y1, x2, y2) of the 1s of a [height * width] 0/1 mask, or undefined when it has none.
 * Found with indexOf (native, memchr-like) rather than a loop: 12 full-resolution masks of a 12 MP
 * image are 144 M bytes to look at.
 */
function sourceBox(
  m: Uint8Array,
  width: number,
  height: number,
): [number, number, number, number] | undefined {
  const first = m.indexOf(1);
  if (first < 0) return undefined;
  const y0 = Math.floor(first / width);
  const y1 = Math.min(height, Math.floor(m.lastIndexOf(1) / width) + 1);
  let x0 = width;
  let x1 = 0;
  for (let y = y0; y < y1; y++) {
    const row = m.subarray(y * width, (y + 1) * width);
    const a = row.indexOf(1);
    if (a < 0) continue;
    if (a < x0) x0 = a;
    const b = row.lastIndexOf(1) + 1;
    if (b > x1) x1 = b;
  }
  return [x0, y0, x1, y1];
}

/** Write an RGB image as a PNG, atomically. */

export const PREVIEW_MAX_BYTES = 200 * 1024;

/**
 * Encodings tried in turn until the JPEG is under PREVIEW_MAX_BYTES. 4:4:4 first: chroma subsampling
 * smears the thin coloured outlines. Only noise needs the later steps (a 768 px preview of a resized
 * photo is 50-150 KB at the first); pixel-sized noise at 1024 px (the largest previewMaxSide) needs
 * the last, where the black/white digits still read because they differ from the badge in luma.
 */
const PREVIEW_ENCODINGS = [
  { quality: 85, chromaSubsampling: "4:4:4" },
  { quality: 70, chromaSubsampling: "4:2:0" },
  { quality: 45, chromaSubsampling: "4:2:0" },
  { quality: 25, chromaSubsampling: "4:2:0" },
] as const;

/**
 * A JPEG of an RGB image at most `maxSide` pixels a side and under PREVIEW_MAX_BYTES (for inline
 * previews). Render the overlay at `maxSide` first so its badges and outlines are sized for it.
 */
export async function jpegPreview(image: RgbImage, maxSide: number): Promise<Uint8Array> {
  let side = Math.min(maxSide, Math.max(image.width, image.height));
  for (;;) {
    for (const enc of PREVIEW_ENCODINGS) {
      const jpeg = await sharp(image.rgb, { raw: { width: image.width, height: image.height, channels: 3 } })
        .resize({ width: side, height: side, fit: "inside", withoutEnlargement: true })
        .jpeg(enc)
        .toBuffer();
      if (jpeg.length < PREVIEW_MAX_BYTES || side <= 32) {
        return new Uint8Array(jpeg.buffer, jpeg.byteOffset, jpeg.byteLength);
      }
    }
    // Not reached up to 1024 px a side even for pure noise; a guarantee rather than a path.
    side = Math.max(32, Math.floor(side * 0.75));
  }
}
