"""Small ONNX helpers shared by the exporters: graph specs for the manifest, saving with external
data, fp16 conversion and int4 (MatMulNBits) weight quantisation."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import TypedDict

import onnx
from onnx import TensorProto

from .errors import ModelkitError

# protobuf cannot serialise a message of 2 GiB or more; stay clear of it.
PROTOBUF_LIMIT = 2**31 - 2**26

WEIGHT_DTYPES = ("fp32", "fp16", "int4")

_ELEM_TYPE_NAMES = {
    TensorProto.FLOAT: "float32",
    TensorProto.FLOAT16: "float16",
    TensorProto.INT64: "int64",
    TensorProto.INT32: "int32",
    TensorProto.BOOL: "bool",
}


class TensorSpec(TypedDict):
    """One graph input or output; symbolic dims are strings ("P", "M"), fixed dims ints."""

    name: str
    dtype: str
    shape: list[int | str]


class GraphSpec(TypedDict):
    """What the manifest records about one graph (`graphs.<role>` in pack.json)."""

    file: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]


def _value_spec(value: onnx.ValueInfoProto) -> TensorSpec:
    tensor_type = value.type.tensor_type
    dtype = _ELEM_TYPE_NAMES.get(tensor_type.elem_type)
    if dtype is None:
        raise ModelkitError(
            "EXPORT_FAILED", f"graph value {value.name} has unsupported type {tensor_type.elem_type}"
        )
    shape: list[int | str] = []
    for i, dim in enumerate(tensor_type.shape.dim):
        if dim.HasField("dim_value"):
            shape.append(int(dim.dim_value))
        elif dim.dim_param:
            shape.append(dim.dim_param)
        else:
            raise ModelkitError("EXPORT_FAILED", f"graph value {value.name} has an unnamed dynamic dim {i}")
    return {"name": value.name, "dtype": dtype, "shape": shape}


def graph_spec(model: onnx.ModelProto, file: str) -> GraphSpec:
    """The GraphSpec of a model, read from its own graph inputs/outputs (so it cannot drift)."""
    initializers = {t.name for t in model.graph.initializer}
    return {
        "file": file,
        "inputs": [_value_spec(v) for v in model.graph.input if v.name not in initializers],
        "outputs": [_value_spec(v) for v in model.graph.output],
    }


def check_io(spec: GraphSpec, inputs: Iterable[TensorSpec], outputs: Iterable[TensorSpec]) -> None:
    """Raise unless the graph's I/O equals the expected contract (names, dtypes, shapes, order)."""
    want = {"inputs": list(inputs), "outputs": list(outputs)}
    for side in ("inputs", "outputs"):
        if spec[side] != want[side]:  # type: ignore[literal-required]
            raise ModelkitError(
                "EXPORT_FAILED",
                f"{spec['file']}: {side} are {spec[side]}, the contract says {want[side]}",  # type: ignore[literal-required]
            )


def external_data_name(path: Path) -> str:
    """Name of the weights file written next to `path` when external data is used."""
    return path.name + "_data"


def save_onnx(model: onnx.ModelProto, path: Path, external_data: bool | None = None) -> list[Path]:
    """Save `model` at `path`; returns the files written (the .onnx and, if any, its .onnx_data).

    external_data None: use one `<name>.onnx_data` file only when the model would not fit a single
    protobuf (2 GiB); True/False force either layout. A stale data file from an earlier save is
    removed so the pack's file list stays exact.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data_path = path.with_name(external_data_name(path))
    if data_path.exists():
        data_path.unlink()
    if external_data is None:
        external_data = model.ByteSize() > PROTOBUF_LIMIT
    if external_data:
        onnx.save_model(
            model,
            os.fspath(path),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=data_path.name,
            size_threshold=1024,
        )
        return [path, data_path]
    onnx.save_model(model, os.fspath(path))
    return [path]


def load_onnx(path: Path) -> onnx.ModelProto:
    """Load a model together with its external data (if any)."""
    return onnx.load(os.fspath(path), load_external_data=True)


def to_fp16(
    model: onnx.ModelProto,
    keep_fp32_ops: Iterable[str] = ("LayerNormalization", "Softmax"),
    keep_fp32_nodes: Iterable[str] = (),
) -> onnx.ModelProto:
    """Weights and activations to fp16, graph inputs/outputs stay f32.

    Ops in `keep_fp32_ops` and nodes named in `keep_fp32_nodes` keep running in f32 (the converter
    inserts the casts around them): LayerNorm, softmax and rotary lose too much in fp16.
    """
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    f32_ops = set(DEFAULT_OP_BLOCK_LIST) | set(keep_fp32_ops)
    f32_nodes = set(keep_fp32_nodes)
    converted = convert_float_to_float16(
        model,
        keep_io_types=True,
        op_block_list=sorted(f32_ops),
        node_block_list=sorted(f32_nodes),
        # Shape inference needs the serialised model, which a >2 GiB model cannot be.
        disable_shape_infer=model.ByteSize() > PROTOBUF_LIMIT,
    )
    _drop_duplicate_nodes(converted)
    _fold_cast_round_trips(converted, f32_ops, f32_nodes)
    return converted


def _cast_to(node: onnx.NodeProto) -> int:
    return next(a.i for a in node.attribute if a.name == "to")


def _fold_cast_round_trips(model: onnx.ModelProto, f32_ops: set[str], f32_nodes: set[str]) -> None:
    """Remove f32 -> Cast(fp16) -> Cast(f32) round trips.

    The converter casts every f32-kept node's output to fp16 and back again when the next consumer
    is f32-kept too (and does the same to f32 graph inputs, e.g. the rotary tables), which rounds the
    values it was asked to keep in f32. The consumers are fed the original f32 tensor instead.
    """
    graph = model.graph
    producer = {out: node for node in graph.node for out in node.output}
    f32_inputs = {v.name for v in graph.input if v.type.tensor_type.elem_type == TensorProto.FLOAT}

    def is_f32(name: str) -> bool:
        if name in f32_inputs:
            return True
        node = producer.get(name)
        if node is None:
            return False
        if node.op_type == "Cast":
            return _cast_to(node) == TensorProto.FLOAT
        return node.op_type in f32_ops or node.name in f32_nodes

    graph_outputs = {v.name for v in graph.output}
    replace: dict[str, str] = {}
    for node in graph.node:
        if node.op_type != "Cast" or _cast_to(node) != TensorProto.FLOAT or node.output[0] in graph_outputs:
            continue
        down = producer.get(node.input[0])
        if down is not None and down.op_type == "Cast" and _cast_to(down) == TensorProto.FLOAT16:
            if is_f32(down.input[0]):
                replace[node.output[0]] = down.input[0]
    if not replace:
        return
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in replace:
                node.input[i] = replace[name]
    # Drop the Casts nobody reads any more (the fp16 one may still feed fp16 consumers).
    while True:
        read = {name for node in graph.node for name in node.input} | graph_outputs
        kept = [n for n in graph.node if n.op_type != "Cast" or n.output[0] in read]
        if len(kept) == len(graph.node):
            break
        del graph.node[:]
        graph.node.extend(kept)


def _drop_duplicate_nodes(model: onnx.ModelProto) -> None:
    """Remove byte-identical repeats of a node. onnxruntime's converter emits one identical Cast per
    consumer when an fp16 tensor feeds several f32-kept nodes, which ORT rejects as duplicate names."""
    seen: set[bytes] = set()
    kept = []
    for node in model.graph.node:
        key = node.SerializeToString()
        if key in seen:
            continue
        seen.add(key)
        kept.append(node)
    if len(kept) != len(model.graph.node):
        del model.graph.node[:]
        model.graph.node.extend(kept)


# MatMulNBits' accuracy_level 4: the kernel quantises each 32-wide block of the activation row to int8
# and multiplies in int8 (AVX2 / AVX-512 VNNI on x86, dot-product instructions on Arm) instead of
# dequantising the weights to f32. On 2 AMD EPYC cores, [M, 2048] x [2048, 6144]: 0.50 -> 0.14 ms at
# M = 1, 122 -> 79 ms at M = 800 (f32 weights: 103 ms), for a relative error of 0.0870 against
# int4's own 0.0857 on random weights. The attribute is part of the op's schema: kernels without an
# int8 path (GPUs) ignore it.
INT4_ACCURACY_LEVEL = 4


def to_int4(
    model: onnx.ModelProto, block_size: int = 32, exclude_nodes: Iterable[str] = ()
) -> onnx.ModelProto:
    """MatMul weights (constant initializer B) to symmetric int4 blocks via onnxruntime's
    MatMulNBits quantiser (accuracy level INT4_ACCURACY_LEVEL); the other weights stay f32."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    # The quantiser logs one INFO line per node; keep the CLI output readable.
    log = logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer")
    level = log.level
    log.setLevel(logging.WARNING)
    try:
        quantizer = MatMulNBitsQuantizer(
            model,
            bits=4,
            block_size=block_size,
            is_symmetric=True,
            nodes_to_exclude=list(exclude_nodes),
            accuracy_level=INT4_ACCURACY_LEVEL,
        )
        quantizer.process()
    finally:
        log.setLevel(level)
    return quantizer.model.model


def convert_weights(
    model: onnx.ModelProto, dtype: str, keep_fp32_nodes: Iterable[str] = ()
) -> onnx.ModelProto:
    """Apply the pack's weight dtype ("fp32" returns the model unchanged)."""
    if dtype == "fp32":
        return model
    if dtype == "fp16":
        return to_fp16(model, keep_fp32_nodes=keep_fp32_nodes)
    if dtype == "int4":
        return to_int4(model)
    raise ModelkitError("INVALID_INPUT", f"dtype must be one of {', '.join(WEIGHT_DTYPES)}, got {dtype!r}")
