/**
 * Loader for golden fixtures (docs/design.md): test/fixtures/<pack>/<case>/case.json + one .npy per
 * tensor. Tensors are read lazily and checked against the dtype/shape case.json declares.
 */

import { existsSync, readdirSync, readFileSync, statSync } from "node:fs";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { type NpyArray, readNpy } from "../../src/runtime/npy.js";

export const FIXTURES_DIR = resolve(dirname(fileURLToPath(import.meta.url)), "..", "fixtures");

export interface CaseJson {
  image: string;
  question?: string;
  prompt_text?: string;
  tensors: Record<string, { file: string; dtype: string; shape: number[] }>;
  tolerances?: Record<string, { atol: number; rtol: number }>;
  meta: {
    grid: [number, number, number];
    resized: [number, number];
    original: [number, number];
    rope_delta: number;
    [key: string]: unknown;
  };
  [key: string]: unknown;
}

export interface FixtureCase {
  name: string;
  dir: string;
  json: CaseJson;
  /** Absolute path of the case's input image. */
  imagePath: string;
  has(name: string): boolean;
  tensor(name: string): NpyArray;
  tolerance(name: string): { atol: number; rtol: number } | undefined;
}

export function packFixturesDir(pack: string): string {
  return join(FIXTURES_DIR, pack);
}

/** Case folder names of a pack that hold a case.json (empty when the pack has no fixtures yet). */
export function fixtureCases(pack: string): string[] {
  const dir = packFixturesDir(pack);
  if (!existsSync(dir)) return [];
  return readdirSync(dir)
    .filter((n) => {
      const p = join(dir, n);
      return statSync(p).isDirectory() && existsSync(join(p, "case.json"));
    })
    .sort();
}

export function loadCase(pack: string, name: string): FixtureCase {
  const dir = join(packFixturesDir(pack), name);
  const json = JSON.parse(readFileSync(join(dir, "case.json"), "utf8")) as CaseJson;
  const cache = new Map<string, NpyArray>();
  return {
    name,
    dir,
    json,
    imagePath: resolve(dir, json.image),
    has: (t) => t in json.tensors,
    tensor(t) {
      const hit = cache.get(t);
      if (hit) return hit;
      const spec = json.tensors[t];
      if (!spec) throw new Error(`fixture ${pack}/${name} has no tensor ${t}`);
      const arr = readNpy(readFileSync(join(dir, spec.file)));
      if (arr.dtype !== spec.dtype && !(spec.dtype === "bool" && arr.dtype === "uint8")) {
        throw new Error(`${pack}/${name}/${spec.file}: dtype ${arr.dtype}, case.json says ${spec.dtype}`);
      }
      if (arr.shape.join(",") !== spec.shape.join(",")) {
        throw new Error(`${pack}/${name}/${spec.file}: shape [${arr.shape}], case.json says [${spec.shape}]`);
      }
      cache.set(t, arr);
      return arr;
    },
    tolerance: (t) => json.tolerances?.[t],
  };
}

export interface DiffStats {
  maxAbs: number;
  /** Index of the largest difference. */
  at: number;
  /** Count of elements with |a - b| > atol + rtol * |b|. */
  outside: number;
}

/** Element-wise comparison of two numeric arrays of the same length (b is the reference). */
export function diffStats(
  a: ArrayLike<number | bigint>,
  b: ArrayLike<number | bigint>,
  atol = 0,
  rtol = 0,
): DiffStats {
  if (a.length !== b.length) throw new Error(`length ${a.length} vs reference ${b.length}`);
  let maxAbs = 0;
  let at = -1;
  let outside = 0;
  for (let i = 0; i < a.length; i++) {
    const x = Number(a[i]);
    const y = Number(b[i]);
    const d = Math.abs(x - y);
    if (d > maxAbs || Number.isNaN(d)) {
      maxAbs = Number.isNaN(d) ? Number.POSITIVE_INFINITY : d;
      at = i;
    }
    if (!(d <= atol + rtol * Math.abs(y))) outside++;
  }
  return { maxAbs, at, outside };
}
