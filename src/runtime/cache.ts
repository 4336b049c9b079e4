import { SegError } from "../errors.js";

/**
 * A least-recently-used map bounded by a byte budget. Used for encoded images (vision outputs and the
 * prompt prefix's KV cache), which are large typed arrays: the budget, not an entry count, is what
 * keeps memory bounded.
 */
export class ByteLru<V> {
  readonly #map = new Map<string, { value: V; bytes: number }>();
  readonly #budget: number;
  #bytes = 0;

  /** @param budgetBytes total bytes the cache may hold; 0 disables caching. */
  constructor(budgetBytes: number) {
    if (!Number.isFinite(budgetBytes) || budgetBytes < 0) {
      throw new SegError(
        "INVALID_INPUT",
        `expected a non-negative byte budget for the cache but received ${budgetBytes}`,
      );
    }
    this.#budget = budgetBytes;
  }

  get size(): number {
    return this.#map.size;
  }

  get bytes(): number {
    return this.#bytes;
  }

  get(key: string): V | undefined {
    const entry = this.#map.get(key);
    if (!entry) return undefined;
    // Re-insert to mark as most recently used (Map keeps insertion order).
    this.#map.delete(key);
    this.#map.set(key, entry);
    return entry.value;
  }

  /** Insert; an entry larger than the whole budget is not stored. Evicts least recently used first. */
  set(key: string, value: V, bytes: number): void {
    this.delete(key);
    if (bytes > this.#budget) return;
    this.#map.set(key, { value, bytes });
    this.#bytes += bytes;
    for (const [oldKey, entry] of this.#map) {
      if (this.#bytes <= this.#budget) break;
      this.#map.delete(oldKey);
      this.#bytes -= entry.bytes;
    }
  }

  delete(key: string): boolean {
    const entry = this.#map.get(key);
    if (!entry) return false;
    this.#map.delete(key);
    this.#bytes -= entry.bytes;
    return true;
  }

  clear(): void {
    this.#map.clear();
    this.#bytes = 0;
  }
}

/** Bytes held by a set of typed arrays (for cache accounting). */
export function byteSize(...arrays: readonly { byteLength: number }[]): number {
  let n = 0;
  for (const a of arrays) n += a.byteLength;
  return n;
}
