import { describe, expect, it } from "vitest";
import { ByteLru, byteSize } from "../src/runtime/cache.js";

describe("ByteLru", () => {
  it("evicts the least recently used entries when over budget", () => {
    const lru = new ByteLru<string>(100);
    lru.set("a", "A", 40);
    lru.set("b", "B", 40);
    expect(lru.get("a")).toBe("A"); // a is now most recent
    lru.set("c", "C", 40); // 120 > 100: evicts b
    expect(lru.get("b")).toBeUndefined();
    expect(lru.get("a")).toBe("A");
    expect(lru.get("c")).toBe("C");
    expect(lru.bytes).toBe(80);
    expect(lru.size).toBe(2);
  });

  it("does not store an entry larger than the whole budget", () => {
    const lru = new ByteLru<number>(10);
    lru.set("big", 1, 11);
    expect(lru.size).toBe(0);
    expect(lru.bytes).toBe(0);
  });

  it("replacing a key re-accounts its bytes", () => {
    const lru = new ByteLru<number>(100);
    lru.set("k", 1, 60);
    lru.set("k", 2, 30);
    expect(lru.bytes).toBe(30);
    expect(lru.get("k")).toBe(2);
  });

  it("a zero budget disables caching", () => {
    const lru = new ByteLru<number>(0);
    lru.set("k", 1, 1);
    expect(lru.get("k")).toBeUndefined();
  });

  it("releases what leaves it (evicted, replaced, cleared) and says when it did not store", () => {
    const released: string[] = [];
    const lru = new ByteLru<string>(100, (v) => released.push(v));
    expect(lru.set("a", "A", 60)).toBe(true);
    lru.set("a", "A2", 60); // replaced
    lru.set("b", "B", 60); // evicts a
    expect(lru.set("huge", "H", 101)).toBe(false); // not stored: the caller keeps it
    lru.clear();
    expect(released).toEqual(["A", "A2", "B"]);
    expect(lru.bytes).toBe(0);
  });

  it("rejects a negative budget with a message naming the value", () => {
    expect(() => new ByteLru(-1)).toThrow(/non-negative byte budget for the cache but received -1/);
  });

  it("byteSize sums typed arrays", () => {
    expect(byteSize(new Float32Array(4), new BigInt64Array(2))).toBe(32);
  });
});
