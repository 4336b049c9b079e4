"""Export of the mask decoder (mask_decoder.py) to `mask_decoder.onnx` (docs/design.md).

The graph is traced once at a small example size with every size marked dynamic (P, M, Q, K, Hr,
Wr); the mask decoder derives gh, gw from hr_image's shape in-graph, so one file serves every image size.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from .errors import ModelkitError
from .mask_decoder import MaskDecoder
from .onnx_utils import (
    WEIGHT_DTYPES,
    GraphSpec,
    TensorSpec,
    check_io,
    convert_weights,
    graph_spec,
    load_onnx,
    save_onnx,
)

OPSET = 17

# Node-name fragments kept in f32 when the weights are fp16: the Fourier box code (sin(2^7 pi v) needs
# more than fp16's 11 mantissa bits of v) and the gate (alpha / side with small sides).
_FP32_SCOPES = ("/fourier/", "/gate/")

INPUT_NAMES = ("vit_ms", "mm_embeds", "query_hidden", "boxes", "gate_boxes", "gate_valid", "hr_image")
OUTPUT_NAMES = ("mask_logits", "mask_logits_coarse", "iou_pred")


def mask_io(num_levels: int, cv: int, h: int) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """The mask_decoder.onnx contract of docs/design.md for given widths."""
    inputs: list[TensorSpec] = [
        {"name": "vit_ms", "dtype": "float32", "shape": [num_levels, "P", cv]},
        {"name": "mm_embeds", "dtype": "float32", "shape": ["M", h]},
        {"name": "query_hidden", "dtype": "float32", "shape": ["Q", h]},
        {"name": "boxes", "dtype": "float32", "shape": ["Q", 4]},
        {"name": "gate_boxes", "dtype": "float32", "shape": ["Q", "K", 4]},
        {"name": "gate_valid", "dtype": "float32", "shape": ["Q", "K"]},
        {"name": "hr_image", "dtype": "float32", "shape": [1, 3, "Hr", "Wr"]},
    ]
    outputs: list[TensorSpec] = [
        {"name": "mask_logits", "dtype": "float32", "shape": ["Q", 1, "Hr/4", "Wr/4"]},
        {"name": "mask_logits_coarse", "dtype": "float32", "shape": ["Q", 1, "Hr/4", "Wr/4"]},
        {"name": "iou_pred", "dtype": "float32", "shape": ["Q", 1]},
    ]
    return inputs, outputs


def example_inputs(
    model: MaskDecoder, gh: int = 4, gw: int = 6, q: int = 2, k: int = 2
) -> tuple[torch.Tensor, ...]:
    """Random inputs at the mask decoder's widths for a (gh, gw) patch grid (gh, gw even)."""
    c = model.config
    gen = torch.Generator().manual_seed(0)
    p = gh * gw
    x1y1 = torch.rand(q, k, 2, generator=gen) * 0.5
    gate_boxes = torch.cat([x1y1, x1y1 + 0.1 + torch.rand(q, k, 2, generator=gen) * 0.4], dim=-1)  # [Q, K, 4]
    return (
        torch.randn(c.num_levels, p, c.vision_hidden, generator=gen),  # vit_ms
        torch.randn(p // 4, c.text_hidden, generator=gen),  # mm_embeds
        torch.randn(q, c.text_hidden, generator=gen),  # query_hidden
        gate_boxes[:, 0].clone(),  # boxes
        gate_boxes,
        torch.ones(q, k),  # gate_valid
        torch.rand(1, 3, 16 * gh, 16 * gw, generator=gen) * 2 - 1,  # hr_image
    )


def export_mask_decoder(model: MaskDecoder, out_path: Path, dtype: str = "fp32") -> GraphSpec:
    """Write `mask_decoder.onnx` and return its GraphSpec ({file, inputs, outputs}, symbolic dims as
    strings).

    dtype: "fp32"; "fp16" (weights and activations fp16 except LayerNorm, softmax, the Fourier box
    code and the gate; boundary f32); "int4" (MatMul weights, i.e. the linear layers, as MatMulNBits
    blocks of 32; convolutions stay f32).
    """
    if dtype not in WEIGHT_DTYPES:
        raise ModelkitError(
            "INVALID_INPUT", f"dtype must be one of {', '.join(WEIGHT_DTYPES)}, got {dtype!r}"
        )
    out_path = Path(out_path)
    c = model.config
    was_training = model.training
    model = model.eval().float()
    inputs, outputs = mask_io(c.num_levels, c.vision_hidden, c.text_hidden)
    dynamic_axes = {
        "vit_ms": {1: "P"},
        "mm_embeds": {0: "M"},
        "query_hidden": {0: "Q"},
        "boxes": {0: "Q"},
        "gate_boxes": {0: "Q", 1: "K"},
        "gate_valid": {0: "Q", 1: "K"},
        "hr_image": {2: "Hr", 3: "Wr"},
        "mask_logits": {0: "Q", 2: "Hr/4", 3: "Wr/4"},
        "mask_logits_coarse": {0: "Q", 2: "Hr/4", 3: "Wr/4"},
        "iou_pred": {0: "Q"},
    }
    try:
        with tempfile.TemporaryDirectory(prefix="modelkit-mask-") as tmp:
            raw_path = Path(tmp) / "mask_decoder.onnx"
            with torch.no_grad():
                torch.onnx.export(
                    model,
                    example_inputs(model),
                    str(raw_path),
                    input_names=list(INPUT_NAMES),
                    output_names=list(OUTPUT_NAMES),
                    dynamic_axes=dynamic_axes,
                    opset_version=OPSET,
                    dynamo=False,
                    do_constant_folding=True,
                )
            onnx_model = load_onnx(raw_path)
    finally:
        model.train(was_training)
    fp32_nodes = [n.name for n in onnx_model.graph.node if any(s in n.name for s in _FP32_SCOPES)]
    onnx_model = convert_weights(onnx_model, dtype, keep_fp32_nodes=fp32_nodes)
    spec = graph_spec(onnx_model, out_path.name)
    check_io(spec, inputs, outputs)
    save_onnx(onnx_model, out_path)
    return spec
