import { SegError } from "../errors.js";

/**
 * A least-recently-used map bounded by a byte budget. Used for encoded images (vision outputs and the
 * prompt prefix's KV cache), which are large typed arrays: the budget, not an entry count, is what
 * keeps memory bounded. The cache owns what it stores: `onEvict` releases an entry that leaves it
 * (evicted, replaced, deleted or cleared), e.g. KV tensors kept on a GPU.
 */
export class ByteLru<V> {
  readonly #map = new Map<string, { value: V; bytes: number }>();
  readonly #budget: number;
  readonly #onEvict: (value: V) => void;
  #bytes = 0;

  /** @param budgetBytes total bytes the cache may hold; 0 disables caching. */
  constructor(budgetBytes: number, onEvict: (value: V) => void = () => {}) {
    if (!Number.isFinite(budgetBytes) || budgetBytes < 0) {
      throw new SegError(
        "INVALID_INPUT",
        `expected a non-negative byte budget for the cache but received ${budgetBytes}`,
      );
    }
    this.#budget = budgetBytes;
    this.#onEvict = onEvict;
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

  /**
   * Insert, evicting least recently used entries first. Returns false when the entry is larger than
   * the whole budget: it is then not stored, and stays the caller's to release.
   */
  set(key: string, value: V, bytes: number): boolean {
    this.delete(key);
    if (bytes > this.#budget) return false;
    this.#map.set(key, { value, bytes });
    this.#bytes += bytes;
    for (const [oldKey] of this.#map) {
      if (this.#bytes <= this.#budget) break;
      this.delete(oldKey);
    }
    return true;
  }

  delete(key: string): boolean {
    const entry = this.#map.get(key);
    if (!entry) return false;
    this.#map.delete(key);
    this.#bytes -= entry.bytes;
    this.#onEvict(entry.value);
    return true;
  }

  clear(): void {
    for (const key of [...this.#map.keys()]) this.delete(key);
  }
}

/** Bytes held by a set of typed arrays (for cache accounting). */
export function byteSize(...arrays: readonly { byteLength: number }[]): number {
  let n = 0;
  for (const a of arrays) n += a.byteLength;
  return n;
}
