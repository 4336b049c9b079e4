"""Drop the all-zero rows of the language model's token embedding (and of its tied LM head).

A model trained from scratch on a small world with the real Qwen vocabulary (the shapes demo pack)
uses a few dozen token ids; the other rows of its [V, H] embedding table are exactly zero, so their
embeddings are zero vectors and their logits are exactly 0. The table is kept as K = live + 1 rows
(row 0 is the one zero row, then the live rows in id order) and a remap table [V] (int32) gives
every id its compact row, dead ids row 0:

- embedding: Gather(table, ids) -> Gather(compact, Gather(remap, ids)): the same rows, bit for bit;
- tied head: MatMul(table [V, H], h^T [H, B]) (fp16/int4 graphs) or Gemm(h, table, transB=1) (fp32)
  now yields [K, B] / [B, K], and a Gather of it (after its Cast to fp32, if any) with remap along
  the vocabulary axis expands it back to V, every dead id taking the zero row's logit (0, as the
  dead rows gave before).

The graph's inputs and outputs keep their names, dtypes and shapes (docs/design.md). The exporter
applies `rewrite_table_uses` to the traced graph before writing weights (`export_language_model`,
`compact_embedding=None` decides by `should_compact`); an existing pack is rewritten in place with
`compact_pack` (`python -m modelkit.compact_embedding models/<name>`), which updates only that
graph's `files` entry in pack.json.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .errors import ModelkitError

TABLE = "embed_tokens"
# Compact when at least this share of the rows is zero (`compact_embedding=None`, the default).
MOSTLY_DEAD = 0.5


def zero_rows(table: np.ndarray) -> np.ndarray:
    """[V] bool: rows whose every element is +0.0 (bitwise, so a -0.0 row counts as live)."""
    bits = np.ascontiguousarray(table).view(np.dtype(f"u{table.dtype.itemsize}"))
    return ~np.any(bits.reshape(table.shape[0], -1) != 0, axis=1)


def compact_plan(table: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(rows to keep [K] int64: one zero row first, then the live ids in order; remap [V] int32).

    compact = table[rows]; table[i] == compact[remap[i]] for every id i.
    """
    dead = zero_rows(table)
    if not dead.any():
        raise ModelkitError("INVALID_INPUT", "the embedding table has no all-zero rows; nothing to compact")
    live = np.flatnonzero(~dead)
    rows = np.concatenate([np.flatnonzero(dead)[:1], live]).astype(np.int64)
    remap = np.zeros(table.shape[0], np.int32)
    remap[live] = np.arange(1, live.size + 1, dtype=np.int32)
    return rows, remap


def should_compact(table: np.ndarray, option: bool | None) -> bool:
    """`option` True/False forces it (True on a table without zero rows is refused); None: compact
    when at least MOSTLY_DEAD of the rows are zero (a real Qwen3-VL checkpoint has none)."""
    dead = float(zero_rows(table).mean())
    if option is None:
        return dead >= MOSTLY_DEAD
    if option and dead == 0.0:
        raise ModelkitError(
            "INVALID_INPUT", "compact_embedding was asked for, but the embedding table has no all-zero rows"
        )
    return option


def _attrs(node: onnx.NodeProto) -> dict[str, Any]:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def rewrite_table_uses(model: onnx.ModelProto, table: str, remap: str) -> None:
    """Rewire every use of `table` (now compact) through `remap` (an int32 [V] initializer the caller
    adds). Uses: Gather(table, ids) on axis 0; MatMul(table, x) (vocabulary on axis -2 of the
    product); Gemm(x, table, transB=1) without bias (vocabulary on axis 1). Anything else is refused.

    The head's expanding Gather goes after the Casts that follow the product (fp16 graphs cast it
    to fp32): onnxruntime's CPU provider runs an fp16 MatMul in fp32 and drops the Cast pair around
    it, so a Gather between the MatMul and its Cast would add an fp16 rounding the original lacks.
    """
    graph = model.graph
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    graph_outputs = {o.name for o in graph.output}
    rewired: dict[int, tuple[list[onnx.NodeProto], list[onnx.NodeProto]]] = {}
    users = consumers.get(table, [])
    if not users:
        raise ModelkitError("EXPORT_FAILED", f"no node uses {table}")
    for node in users:
        attrs = _attrs(node)
        if node.op_type == "Gather" and list(node.input).index(table) == 0 and attrs.get("axis", 0) == 0:
            rows = f"{node.input[1]}_{table}_rows"
            before, _ = rewired.setdefault(id(node), ([], []))
            before.append(
                helper.make_node("Gather", [remap, node.input[1]], [rows], name=f"{node.name}_remap")
            )
            node.input[1] = rows
            continue
        if node.op_type == "MatMul" and node.input[0] == table and node.input[1] != table:
            axis = -2
        elif (
            node.op_type == "Gemm"
            and len(node.input) == 2
            and node.input[1] == table
            and node.input[0] != table
            and attrs.get("transB", 0) == 1
            and attrs.get("transA", 0) == 0
        ):
            axis = 1
        else:
            raise ModelkitError(
                "EXPORT_FAILED",
                f"{table} is used by {node.op_type} {node.name!r} in a way compaction does not know",
            )
        last = node  # the product, then any Casts of it: expand after them
        while last.output[0] not in graph_outputs:
            nxt = consumers.get(last.output[0], [])
            if len(nxt) != 1 or nxt[0].op_type != "Cast":
                break
            last = nxt[0]
        out = last.output[0]
        last.output[0] = f"{out}_compact"
        _, after = rewired.setdefault(id(last), ([], []))
        after.append(
            helper.make_node("Gather", [last.output[0], remap], [out], name=f"{node.name}_expand", axis=axis)
        )
    nodes: list[onnx.NodeProto] = []
    for node in graph.node:
        before, after = rewired.get(id(node), ([], []))
        nodes += [*before, node, *after]
    del graph.node[:]
    graph.node.extend(nodes)


def compact_embedding(model: onnx.ModelProto, table: str = TABLE) -> onnx.ModelProto:
    """A copy of a finished language model graph with its embedding table compacted (the table must
    be an inline initializer with at least one all-zero row). Outputs are unchanged bit for bit."""
    inits = {t.name: t for t in model.graph.initializer}
    if table not in inits:
        raise ModelkitError("EXPORT_FAILED", f"the graph has no initializer {table}")
    if inits[table].data_location == TensorProto.EXTERNAL:
        raise ModelkitError("EXPORT_FAILED", f"{table} is stored as external data; load it inline first")
    full = numpy_helper.to_array(inits[table])
    rows, remap = compact_plan(full)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    remap_name = f"{table}.remap"
    for i, t in enumerate(out.graph.initializer):
        if t.name == table:
            out.graph.initializer[i].CopyFrom(
                numpy_helper.from_array(np.ascontiguousarray(full[rows]), table)
            )
    out.graph.initializer.append(numpy_helper.from_array(remap, remap_name))
    rewrite_table_uses(out, table, remap_name)
    onnx.checker.check_model(out)
    return out


def compact_pack(pack_dir: Path) -> dict[str, Any]:
    """Compact the language model graph of a pack in place; pack.json's `files` entry of that graph
    is the only manifest change (key order and 2-space layout kept). Returns sizes before/after."""
    from .pack import MANIFEST, file_digest, load_manifest

    pack_dir = Path(pack_dir)
    manifest = load_manifest(pack_dir)
    rel = manifest["graphs"]["language_model"]["file"]
    path = pack_dir / rel
    if (pack_dir / f"{rel}_data").exists():
        raise ModelkitError("PACK_INVALID", f"{rel} keeps its weights in {rel}_data; not supported here")
    before = path.stat().st_size
    model = onnx.load(str(path))
    compacted = compact_embedding(model)
    tmp = path.with_name(f".{path.name}.compact")
    onnx.save(compacted, str(tmp))
    tmp.replace(path)
    manifest["files"][rel] = file_digest(path)
    (pack_dir / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    vocab = next(int(t.dims[0]) for t in model.graph.initializer if t.name == TABLE)
    rows = next(int(t.dims[0]) for t in compacted.graph.initializer if t.name == TABLE)
    return {"file": rel, "bytes_before": before, "bytes_after": path.stat().st_size, "rows": [vocab, rows]}


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m modelkit.compact_embedding <pack folder>", file=sys.stderr)
        return 2
    try:
        info = compact_pack(Path(argv[0]))
    except ModelkitError as e:
        print(f"{e.code}: {e.message}", file=sys.stderr)
        return 1
    print(
        f"{info['file']}: embedding {info['rows'][0]} -> {info['rows'][1]} rows, "
        f"{info['bytes_before']:,} -> {info['bytes_after']:,} bytes"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
