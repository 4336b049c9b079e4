/**
 * Minimal .npy (NumPy format v1/v2/v3) reader and writer: little-endian, C order, the dtypes the
 * golden fixtures use. Used by tests and tools that read fixtures; never on untrusted input paths
 * without a size check by the caller.
 */

import { SegError } from "../errors.js";

export type NpyDtype = "float32" | "float64" | "int64" | "int32" | "uint8" | "bool";

export type NpyData = Float32Array | Float64Array | BigInt64Array | Int32Array | Uint8Array;

export interface NpyArray {
  dtype: NpyDtype;
  shape: number[];
  /** Bool arrays come back as Uint8Array of 0/1. */
  data: NpyData;
}

const MAGIC = [0x93, 0x4e, 0x55, 0x4d, 0x50, 0x59]; // \x93NUMPY

const DESCR_TO_DTYPE: Record<string, NpyDtype> = {
  "<f4": "float32",
  "<f8": "float64",
  "<i8": "int64",
  "<i4": "int32",
  "|u1": "uint8",
  "<u1": "uint8",
  "|b1": "bool",
};

const DTYPE_TO_DESCR: Record<NpyDtype, string> = {
  float32: "<f4",
  float64: "<f8",
  int64: "<i8",
  int32: "<i4",
  uint8: "|u1",
  bool: "|b1",
};

const ITEM_SIZE: Record<NpyDtype, number> = {
  float32: 4,
  float64: 8,
  int64: 8,
  int32: 4,
  uint8: 1,
  bool: 1,
};

function bad(message: string): SegError {
  return new SegError("INVALID_INPUT", `invalid .npy data: ${message}`);
}

/** Parse the header dict, e.g. `{'descr': '<f4', 'fortran_order': False, 'shape': (3, 4), }`. */
function parseHeader(text: string): { descr: string; fortranOrder: boolean; shape: number[] } {
  const descr = /'descr'\s*:\s*'([^']+)'/.exec(text)?.[1];
  const fortran = /'fortran_order'\s*:\s*(True|False)/.exec(text)?.[1];
  const shapeText = /'shape'\s*:\s*\(([^)]*)\)/.exec(text)?.[1];
  if (descr === undefined || fortran === undefined || shapeText === undefined) {
    throw bad(`unreadable header ${JSON.stringify(text.slice(0, 120))}`);
  }
  const shape = shapeText
    .split(",")
    .map((s) => s.trim())
    .filter((s) => s.length > 0)
    .map((s) => {
      const n = Number(s.replace(/L$/, ""));
      if (!Number.isSafeInteger(n) || n < 0) throw bad(`bad dimension ${JSON.stringify(s)} in shape`);
      return n;
    });
  return { descr, fortranOrder: fortran === "True", shape };
}

/** Decode a whole .npy file held in memory. The returned arrays own a copy of the data. */
export function readNpy(bytes: Uint8Array): NpyArray {
  if (bytes.length < 10 || MAGIC.some((b, i) => bytes[i] !== b)) throw bad("missing \\x93NUMPY magic");
  const major = bytes[6] ?? 0;
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  let headerLen: number;
  let headerStart: number;
  if (major === 1) {
    headerLen = view.getUint16(8, true);
    headerStart = 10;
  } else if (major === 2 || major === 3) {
    if (bytes.length < 12) throw bad("truncated header");
    headerLen = view.getUint32(8, true);
    headerStart = 12;
  } else {
    throw bad(`unsupported format version ${major}`);
  }
  const dataStart = headerStart + headerLen;
  if (dataStart > bytes.length) throw bad("truncated header");
  const headerText = new TextDecoder(major === 3 ? "utf-8" : "latin1").decode(
    bytes.subarray(headerStart, dataStart),
  );
  const { descr, fortranOrder, shape } = parseHeader(headerText);
  const dtype = DESCR_TO_DTYPE[descr];
  if (dtype === undefined) {
    throw bad(`dtype ${descr} is not supported (little-endian f4, f8, i8, i4, u1, b1 are)`);
  }
  if (fortranOrder && shape.length > 1) throw bad("Fortran-order arrays are not supported");
  const count = shape.reduce((a, b) => a * b, 1);
  const byteCount = count * ITEM_SIZE[dtype];
  if (dataStart + byteCount > bytes.length) {
    throw bad(
      `expected ${byteCount} data bytes for shape [${shape.join(", ")}], got ${bytes.length - dataStart}`,
    );
  }
  // Copy into a fresh, aligned buffer (the file's data offset need not be a multiple of 8).
  const copy = new Uint8Array(byteCount); // not bytes.slice(): a Node Buffer's slice is a view
  copy.set(bytes.subarray(dataStart, dataStart + byteCount));
  const raw = copy.buffer;
  let data: NpyData;
  switch (dtype) {
    case "float32":
      data = new Float32Array(raw);
      break;
    case "float64":
      data = new Float64Array(raw);
      break;
    case "int64":
      data = new BigInt64Array(raw);
      break;
    case "int32":
      data = new Int32Array(raw);
      break;
    case "uint8":
    case "bool":
      data = new Uint8Array(raw);
      break;
  }
  return { dtype, shape, data };
}

function dtypeOf(data: NpyData): NpyDtype {
  if (data instanceof Float32Array) return "float32";
  if (data instanceof Float64Array) return "float64";
  if (data instanceof BigInt64Array) return "int64";
  if (data instanceof Int32Array) return "int32";
  return "uint8";
}

/** Encode an array as .npy v1 (v2 only if the header does not fit in 64 KiB). */
export function writeNpy(
  data: NpyData,
  shape: readonly number[],
  dtype: NpyDtype = dtypeOf(data),
): Uint8Array {
  const count = shape.reduce((a, b) => a * b, 1);
  if (count !== data.length) {
    throw new SegError(
      "INVALID_INPUT",
      `shape [${shape.join(", ")}] holds ${count} values, data has ${data.length}`,
    );
  }
  if (dtype !== dtypeOf(data) && !(dtype === "bool" && data instanceof Uint8Array)) {
    throw new SegError("INVALID_INPUT", `dtype ${dtype} does not match a ${data.constructor.name}`);
  }
  const shapeText = shape.length === 1 ? `(${shape[0]},)` : `(${shape.join(", ")})`;
  let dict = `{'descr': '${DTYPE_TO_DESCR[dtype]}', 'fortran_order': False, 'shape': ${shapeText}, }`;
  let major = 1;
  let prefix = 10;
  if (dict.length + 1 + prefix > 0xffff) {
    major = 2;
    prefix = 12;
  }
  // Pad with spaces so the data starts on a 64-byte boundary, header ends in '\n'.
  const total = Math.ceil((prefix + dict.length + 1) / 64) * 64;
  dict = `${dict.padEnd(total - prefix - 1, " ")}\n`;
  const out = new Uint8Array(total + data.byteLength);
  out.set(MAGIC, 0);
  out[6] = major;
  out[7] = 0;
  const view = new DataView(out.buffer);
  if (major === 1) view.setUint16(8, dict.length, true);
  else view.setUint32(8, dict.length, true);
  for (let i = 0; i < dict.length; i++) out[prefix + i] = dict.charCodeAt(i);
  out.set(new Uint8Array(data.buffer, data.byteOffset, data.byteLength), total);
  return out;
}
