import { describe, expect, it } from "vitest";
import { SegError } from "../src/errors.js";
import { readNpy, writeNpy } from "../src/runtime/npy.js";

describe("npy", () => {
  it("round-trips every supported dtype with its shape", () => {
    const cases = [
      { data: new Float32Array([1.5, -2, 3.25, Number.NaN, 0, 1e-30]), shape: [2, 3] },
      { data: new Float64Array([Math.PI, -1e300]), shape: [2] },
      { data: new BigInt64Array([-(2n ** 62n), 0n, 7n]), shape: [3, 1] },
      { data: new Int32Array([-5, 2147483647]), shape: [1, 2] },
      { data: new Uint8Array([0, 255, 128]), shape: [3] },
    ];
    for (const { data, shape } of cases) {
      const bytes = writeNpy(data, shape);
      expect((bytes.length - data.byteLength) % 64).toBe(0); // header padded to 64 bytes
      const back = readNpy(bytes);
      expect(back.shape).toEqual(shape);
      expect(back.data.constructor).toBe(data.constructor);
      expect(Array.from(back.data as ArrayLike<number>)).toEqual(Array.from(data as ArrayLike<number>));
    }
    const b = readNpy(writeNpy(new Uint8Array([1, 0, 1]), [3], "bool"));
    expect(b.dtype).toBe("bool");
    expect(Array.from(b.data as Uint8Array)).toEqual([1, 0, 1]);
    const scalar = readNpy(writeNpy(new Float32Array([2]), []));
    expect(scalar.shape).toEqual([]);
  });

  it("reads a NumPy-written v1 header (np.save of float32 [2, 2])", () => {
    const header = "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 2), }";
    const padded = `${header.padEnd(128 - 10 - 1, " ")}\n`;
    const bytes = new Uint8Array(128 + 16);
    bytes.set([0x93, 0x4e, 0x55, 0x4d, 0x50, 0x59, 1, 0, padded.length & 0xff, padded.length >> 8]);
    for (let i = 0; i < padded.length; i++) bytes[10 + i] = padded.charCodeAt(i);
    new DataView(bytes.buffer).setFloat32(128 + 4, 2.5, true);
    const a = readNpy(bytes);
    expect(a.dtype).toBe("float32");
    expect(Array.from(a.data as Float32Array)).toEqual([0, 2.5, 0, 0]);
  });

  it("reads v2 headers and data at an unaligned offset inside a larger buffer", () => {
    const v1 = writeNpy(new BigInt64Array([1n, 2n]), [2]);
    const v2 = new Uint8Array(v1.length + 2);
    v2.set(v1.subarray(0, 8));
    v2[6] = 2;
    new DataView(v2.buffer).setUint32(8, new DataView(v1.buffer).getUint16(8, true), true);
    v2.set(v1.subarray(10), 12);
    const host = new Uint8Array(v2.length + 3);
    host.set(v2, 3);
    expect(Array.from(readNpy(host.subarray(3)).data as BigInt64Array)).toEqual([1n, 2n]);
  });

  it("rejects bad magic, unsupported dtypes, Fortran order and truncated data", () => {
    const bad = (bytes: Uint8Array, re: RegExp) => {
      let err: unknown;
      try {
        readNpy(bytes);
      } catch (e) {
        err = e;
      }
      expect(err).toBeInstanceOf(SegError);
      expect((err as SegError).code).toBe("INVALID_INPUT");
      expect((err as SegError).message).toMatch(re);
    };
    bad(new Uint8Array([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]), /magic/);
    const good = writeNpy(new Float32Array([1, 2]), [2]);
    const text = (b: Uint8Array) => new TextDecoder("latin1").decode(b);
    const swap = (from: string, to: string) => {
      const t = text(good).replace(from, to);
      return Uint8Array.from(t, (ch) => ch.charCodeAt(0));
    };
    bad(swap("<f4", ">f4"), /dtype >f4 is not supported/);
    const fortran = new TextDecoder("latin1")
      .decode(writeNpy(new Float32Array(4), [2, 2]))
      .replace("False", "True ");
    bad(
      Uint8Array.from(fortran, (ch) => ch.charCodeAt(0)),
      /Fortran-order/,
    );
    bad(good.subarray(0, good.length - 1), /expected 8 data bytes/);
    expect(() => writeNpy(new Float32Array(3), [2, 2])).toThrow(/holds 4 values/);
  });
});
