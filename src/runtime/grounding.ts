/**
 * Parse Qwen3-VL's grounding answer: JSON boxes in 0..1000 relative coordinates -> pixel boxes.
 *
 * Accepts what the model writes with or without the grammar: a ```json fence or not, a bare array,
 * a single object, text around it, Python-style single quotes, trailing commas, output cut off
 * mid-object (everything up to the last complete object is kept). Never throws on model text.
 */
import type { Box } from "./types.js";

export interface ParsedInstance {
  label: string;
  /** Pixels of the image the coordinates refer to, x1 < x2, y1 < y2, inside the image. */
  box: Box;
  /** The model's coordinates after ordering and clamping, integers in 0..1000. */
  box1000: [number, number, number, number];
  /**
   * Position of this box among all boxes in the text (0-based, counting dropped degenerate and
   * duplicate ones), i.e. the index of the box-closing event the grammar reported for it.
   */
  index: number;
}

export interface ParsedBoxes {
  instances: ParsedInstance[];
  /** The text ends inside an object or an unclosed array (token budget ran out). */
  truncated: boolean;
}

/** Keys the model uses for a box, in order of preference. */
const BOX_KEYS = ["bbox_2d", "bbox"] as const;

export function parseBoxes(text: string, imageWidth: number, imageHeight: number): ParsedBoxes {
  const body = stripFence(text);
  const { objects, truncated } = scanObjects(body);
  let raw: { label: string; coords: number[] }[] = [];
  for (const obj of objects) {
    const parsed = parseObject(obj);
    if (parsed !== null) raw.push(parsed);
  }
  // Not even one well-formed object: fall back to a pattern over the whole text.
  if (raw.length === 0) raw = regexBoxes(body);

  const instances: ParsedInstance[] = [];
  const seen = new Set<string>();
  raw.forEach(({ label, coords }, index) => {
    const box1000 = normaliseBox1000(coords);
    if (box1000 === null) return;
    const key = box1000.join(",");
    if (seen.has(key)) return;
    seen.add(key);
    const [x1, y1, x2, y2] = box1000;
    const box: Box = [
      (x1 / 1000) * imageWidth,
      (y1 / 1000) * imageHeight,
      (x2 / 1000) * imageWidth,
      (y2 / 1000) * imageHeight,
    ];
    instances.push({ label, box, box1000, index });
  });
  return { instances, truncated };
}

/** The content of the first ``` fence (to its end, or to the end of the text when unclosed). */
function stripFence(text: string): string {
  const open = text.indexOf("```");
  if (open < 0) return text;
  let start = open + 3;
  // Skip the info string ("json") up to the end of the line.
  const eol = text.indexOf("\n", start);
  const info = text.slice(start, eol < 0 ? text.length : eol);
  if (/^[A-Za-z0-9_-]*\s*$/.test(info)) start = eol < 0 ? text.length : eol + 1;
  const close = text.indexOf("```", start);
  return text.slice(start, close < 0 ? text.length : close);
}

/**
 * Outermost `{...}` substrings, string-aware for "..." and Python '...' strings (a quote opens a
 * string only where a JSON value or key can start, so apostrophes in prose do not). `truncated` when
 * the text ends inside an object or string, or an array opened before the objects is never closed.
 */
function scanObjects(text: string): { objects: string[]; truncated: boolean } {
  const objects: string[] = [];
  let depth = 0; // brace depth
  let bracket = 0; // bracket depth outside objects
  let start = -1;
  let quote = ""; // current string delimiter, "" outside strings
  let prev = ""; // previous non-space character outside strings
  for (let i = 0; i < text.length; i++) {
    const ch = text[i] as string;
    if (quote !== "") {
      if (ch === "\\") i++;
      else if (ch === quote) {
        quote = "";
        prev = ch;
      } else if (ch === "\n" && quote === "'") quote = ""; // a stray apostrophe: do not swallow lines
      continue;
    }
    if ((ch === '"' || ch === "'") && (depth > 0 || bracket > 0) && (ch === '"' || "[{,:".includes(prev))) {
      quote = ch;
      continue;
    }
    if (ch === "{") {
      if (depth === 0) start = i;
      depth++;
    } else if (ch === "}" && depth > 0) {
      depth--;
      if (depth === 0) objects.push(text.slice(start, i + 1));
    } else if (ch === "[" && depth === 0) bracket++;
    else if (ch === "]" && depth === 0 && bracket > 0) bracket--;
    if (!/\s/.test(ch)) prev = ch;
  }
  return { objects, truncated: depth > 0 || quote !== "" || bracket > 0 };
}

function parseObject(source: string): { label: string; coords: number[] } | null {
  let value: unknown;
  try {
    value = JSON.parse(source);
  } catch {
    try {
      value = JSON.parse(pythonToJson(source));
    } catch {
      const fromRegex = regexBoxes(source);
      return fromRegex[0] ?? null;
    }
  }
  if (typeof value !== "object" || value === null || Array.isArray(value)) return null;
  const record = value as Record<string, unknown>;
  let coords: number[] | null = null;
  for (const key of BOX_KEYS) {
    coords = toCoords(record[key]);
    if (coords !== null) break;
  }
  if (coords === null) return null;
  const label = record.label;
  return {
    label: typeof label === "string" ? label.trim() : label === undefined ? "" : String(label),
    coords,
  };
}

function toCoords(value: unknown): number[] | null {
  if (!Array.isArray(value) || value.length !== 4) return null;
  const out: number[] = [];
  for (const v of value) {
    const n = typeof v === "number" ? v : typeof v === "string" && v.trim() !== "" ? Number(v) : Number.NaN;
    if (!Number.isFinite(n)) return null;
    out.push(n);
  }
  return out;
}

/** Python literal -> JSON: '...' strings, True/False/None, trailing commas. */
function pythonToJson(source: string): string {
  let out = "";
  for (let i = 0; i < source.length; i++) {
    const ch = source[i] as string;
    if (ch === '"' || ch === "'") {
      let j = i + 1;
      let content = "";
      while (j < source.length && source[j] !== ch) {
        if (source[j] === "\\" && j + 1 < source.length) {
          const next = source[j + 1] as string;
          content += next === "'" || next === '"' || next === "\\" ? next : `\\${next}`;
          j += 2;
        } else {
          content += source[j];
          j++;
        }
      }
      out += JSON.stringify(content);
      i = j;
      continue;
    }
    const word = /^(True|False|None)\b/.exec(source.slice(i, i + 5));
    if (word?.[1] !== undefined && !/\w/.test(source[i - 1] ?? "")) {
      out += word[1] === "True" ? "true" : word[1] === "False" ? "false" : "null";
      i += word[1].length - 1;
      continue;
    }
    if (ch === "," && /^\s*[}\]]/.test(source.slice(i + 1))) continue;
    out += ch;
  }
  return out;
}

const NUM = String.raw`(-?\d+(?:\.\d+)?)`;
const BOX_PATTERN = new RegExp(
  String.raw`["']?bbox(?:_2d)?["']?\s*:\s*\[\s*${NUM}\s*,\s*${NUM}\s*,\s*${NUM}\s*,\s*${NUM}\s*\]`,
  "g",
);
const LABEL_PATTERN = /["']label["']\s*:\s*["']([^"'\n]*)["']/;

/** Last resort: every `bbox_2d: [a, b, c, d]` with the label that follows it before the next box. */
function regexBoxes(text: string): { label: string; coords: number[] }[] {
  const matches = [...text.matchAll(BOX_PATTERN)];
  return matches.map((m, k) => {
    const end = (m.index ?? 0) + m[0].length;
    const nextStart = matches[k + 1]?.index ?? text.length;
    const label = LABEL_PATTERN.exec(text.slice(end, nextStart))?.[1]?.trim() ?? "";
    return { label, coords: [1, 2, 3, 4].map((g) => Number(m[g])) };
  });
}

/** Order corners, clamp to 0..1000, round; null when the box has no area. */
function normaliseBox1000(coords: readonly number[]): [number, number, number, number] | null {
  const c = (v: number | undefined): number => Math.min(1000, Math.max(0, Math.round(v ?? 0)));
  const [a, b, cc, d] = coords.map(c) as [number, number, number, number];
  const x1 = Math.min(a, cc);
  const x2 = Math.max(a, cc);
  const y1 = Math.min(b, d);
  const y2 = Math.max(b, d);
  if (x2 <= x1 || y2 <= y1) return null;
  return [x1, y1, x2, y2];
}
