"""Export of Qwen3-VL's vision tower to `vision_encoder.onnx` (docs/design.md, spec section 3).

The HF module computes position-embedding taps, rotary ids and attention segments from `grid_thw`
with data-dependent Python; here those come in as host inputs (see vision_inputs.py), so the graph is
a plain, fully dynamic-P chain: patch-embed Linear, pos-embed gather + weighted sum, pre-norm blocks
with one full (non-causal) attention over the image (onnxruntime's fused `com.microsoft`
MultiHeadAttention, after the rotary), DeepStack mergers at the taps, main merger.
Every linear is written as `x @ W^T + b` with W^T stored as a [in, out] initializer so that the int4
quantiser (MatMulNBits, which only handles MatMul with a constant B) sees all of them.
"""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Qwen3VLForConditionalGeneration

from .errors import ModelkitError
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
LN_EPS = 1e-6

# Node-name fragments of the parts kept in f32 when the weights are fp16 (spec 7.4); the rotary
# module runs twice per block, as scopes "rope" (q) and "rope_1" (k); "attn" is the fused attention
# (softmax in f32 as before the fusion; see _MultiHeadAttention); "act" is the fused tanh GELU, whose
# CPU kernel is f32 only.
_FP32_SCOPES = ("/rope/", "/rope_1/", "/attn/", "/pos_embed/", "/act/")
# The fused attention kernel lives in onnxruntime's contrib domain.
CUSTOM_OPSETS = {"com.microsoft": 1}


def vision_io(cv: int, h: int, dv: int, n_taps: int) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """The vision_encoder.onnx contract of docs/design.md for given sizes."""
    inputs: list[TensorSpec] = [
        {"name": "pixel_values", "dtype": "float32", "shape": ["P", 1536]},
        {"name": "pos_embed_idx", "dtype": "int64", "shape": ["P", 4]},
        {"name": "pos_embed_weight", "dtype": "float32", "shape": ["P", 4]},
        {"name": "rotary_cos", "dtype": "float32", "shape": ["P", dv]},
        {"name": "rotary_sin", "dtype": "float32", "shape": ["P", dv]},
    ]
    outputs: list[TensorSpec] = [
        {"name": "image_features", "dtype": "float32", "shape": ["M", h]},
        {"name": "deepstack_features", "dtype": "float32", "shape": [n_taps, "M", h]},
        {"name": "vit_ms", "dtype": "float32", "shape": [n_taps + 1, "P", cv]},
    ]
    return inputs, outputs


class _Linear(nn.Module):
    """y = x @ w_t + b, with w_t = W^T [in, out] (a MatMul with a constant B once exported)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.w_t = nn.Parameter(weight.detach().t(), requires_grad=False)  # [in, out]
        self.b = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)  # [out]

    @classmethod
    def of(cls, linear: nn.Linear) -> _Linear:
        return cls(linear.weight, linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.matmul(x, self.w_t)
        return y if self.b is None else y + self.b


class _LayerNorm(nn.Module):
    def __init__(self, norm: nn.LayerNorm) -> None:
        super().__init__()
        self.weight = nn.Parameter(norm.weight.detach(), requires_grad=False)
        self.bias = nn.Parameter(norm.bias.detach(), requires_grad=False)
        self.eps = float(norm.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)


class _Rope(nn.Module):
    """Rotate-half 2-D rotary in f32 (its own module so its nodes can be kept f32 in fp16 graphs)."""

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        # x [P, nh, dv]; cos, sin [P, dv] broadcast over heads
        half = x.shape[-1] // 2
        rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        return x * cos.unsqueeze(1) + rotated * sin.unsqueeze(1)


class _MultiHeadAttention(torch.autograd.Function):
    """Full (non-causal) attention over one image, exported as onnxruntime's fused
    `com.microsoft::MultiHeadAttention` (CPU, CUDA and WebGPU kernels) instead of MatMul/Softmax/MatMul.

    q, k, v [1, P, nh*dv] -> [1, P, nh*dv]; scale 1/sqrt(dv), the kernel's default. The PyTorch
    forward is the reference math (what tracing runs and what the torch-side checks see).
    """

    @staticmethod
    def forward(
        ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int, width: int
    ) -> torch.Tensor:
        dv = width // num_heads
        qh, kh, vh = (t.unflatten(-1, (num_heads, dv)).transpose(1, 2) for t in (q, k, v))  # [1, nh, P, dv]
        probs = torch.softmax(torch.matmul(qh, kh.transpose(-1, -2)) * dv**-0.5, dim=-1)  # [1, nh, P, P]
        return torch.matmul(probs, vh).transpose(1, 2).flatten(2)  # [1, P, nh*dv]

    @staticmethod
    def symbolic(g, q, k, v, num_heads: int, width: int):
        out = g.op("com.microsoft::MultiHeadAttention", q, k, v, num_heads_i=num_heads)
        # The exporter cannot infer a contrib op's output; without this the static widths
        # downstream (and so the graph outputs' shapes) would be lost.
        out.setType(q.type().with_dtype(torch.float32).with_sizes([1, None, width]))
        return out


class _FastGelu(torch.autograd.Function):
    """gelu_pytorch_tanh exported as onnxruntime's fused `com.microsoft::FastGelu` (the same tanh
    formula; CPU, CUDA and WebGPU kernels). Opset 17 spells it as seven element-wise nodes that
    onnxruntime leaves unfused: on a [3072, 4096] block activation 27.7 ms against 4.2 ms on 2 cores."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(x, approximate="tanh")

    @staticmethod
    def symbolic(g, x):
        out = g.op("com.microsoft::FastGelu", x)
        out.setType(x.type())
        return out


class _GeluTanh(nn.Module):
    """Its own module (scope "act") so that fp16 graphs keep it f32."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _FastGelu.apply(x)


class _Attention(nn.Module):
    """Its own module (scope "attn") so that fp16 graphs can keep the attention in f32."""

    def __init__(self, num_heads: int, width: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.width = width  # nh * dv = Cv, a Python int so the traced reshapes have static widths

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        # q, k, v [P, nh, dv] -> [P, nh*dv]
        q, k, v = (t.reshape(1, -1, self.width) for t in (q, k, v))  # [1, P, nh*dv]: heads-major rows
        return _MultiHeadAttention.apply(q, k, v, self.num_heads, self.width).reshape(-1, self.width)


class _Block(nn.Module):
    def __init__(self, block: nn.Module, num_heads: int) -> None:
        super().__init__()
        self.norm1 = _LayerNorm(block.norm1)
        self.norm2 = _LayerNorm(block.norm2)
        self.qkv = _Linear.of(block.attn.qkv)
        self.proj = _Linear.of(block.attn.proj)
        self.fc1 = _Linear.of(block.mlp.linear_fc1)
        self.fc2 = _Linear.of(block.mlp.linear_fc2)
        self.rope = _Rope()
        self.num_heads = num_heads
        cv = block.norm1.weight.shape[0]
        self.head_dim = cv // num_heads
        self.attn = _Attention(num_heads, cv)
        self.act = _GeluTanh()
        # Qwen3-VL's vision MLP uses gelu_pytorch_tanh (transformers' GELUTanh); refuse anything else.
        act = type(block.mlp.act_fn).__name__
        if act != "GELUTanh":
            raise ModelkitError("UNSUPPORTED_MODEL", f"vision MLP activation {act} is not gelu_pytorch_tanh")

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        # x [P, Cv]
        qkv = self.qkv(self.norm1(x)).reshape(-1, 3, self.num_heads, self.head_dim)  # [P, 3, nh, dv]
        q = self.rope(qkv[:, 0], cos, sin)  # [P, nh, dv]
        k = self.rope(qkv[:, 1], cos, sin)
        attn = self.attn(q, k, qkv[:, 2])  # [P, Cv]
        x = x + self.proj(attn)
        return x + self.fc2(self.act(self.fc1(self.norm2(x))))


class _Merger(nn.Module):
    """2x2 patch merger: [P, Cv] -> [P/4, H]. Post-shuffle norm (DeepStack) normalises the 4Cv
    concatenation, pre-shuffle norm (main merger) each patch."""

    def __init__(self, merger: nn.Module) -> None:
        super().__init__()
        self.norm = _LayerNorm(merger.norm)
        self.fc1 = _Linear.of(merger.linear_fc1)
        self.fc2 = _Linear.of(merger.linear_fc2)
        self.post_shuffle = bool(merger.use_postshuffle_norm)
        self.merged = int(merger.hidden_size)  # 4 Cv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.post_shuffle:
            y = self.norm(x.reshape(-1, self.merged))  # [M, 4Cv]
        else:
            y = self.norm(x).reshape(-1, self.merged)  # [M, 4Cv]
        return self.fc2(F.gelu(self.fc1(y)))  # exact (erf) GELU, [M, H]


class _PosEmbed(nn.Module):
    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.table = nn.Parameter(table.detach(), requires_grad=False)  # [G*G, Cv]

    def forward(self, idx: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        corners = self.table[idx]  # [P, 4, Cv]
        return (corners * weight.unsqueeze(-1)).sum(dim=1)  # [P, Cv]


class VisionEncoderForExport(nn.Module):
    """Qwen3VLVisionModel for one still image, with host-computed position inputs."""

    def __init__(self, model: Qwen3VLForConditionalGeneration) -> None:
        super().__init__()
        visual = model.model.visual
        cfg = visual.config
        if cfg.spatial_merge_size != 2:
            raise ModelkitError(
                "UNSUPPORTED_MODEL", f"spatial_merge_size {cfg.spatial_merge_size}, expected 2"
            )
        conv = visual.patch_embed.proj  # Conv3d(3 -> Cv, kernel = stride = (2, 16, 16))
        cv = conv.weight.shape[0]
        # The conv kernel covers the whole patch, so it is a Linear on the flattened (c, tp, py, px)
        # row, the same order as the conv weight's (in, kt, kh, kw) (spec 3.1).
        patch_w = conv.weight.detach().reshape(cv, -1)  # [Cv, 1536]
        if patch_w.shape[1] != 1536:
            raise ModelkitError(
                "UNSUPPORTED_MODEL", f"patch embedding takes {patch_w.shape[1]} values, not 1536"
            )
        self.patch_embed = _Linear(patch_w, conv.bias)
        self.pos_embed = _PosEmbed(visual.pos_embed.weight)
        self.blocks = nn.ModuleList([_Block(b, cfg.num_heads) for b in visual.blocks])
        self.taps = [int(i) for i in cfg.deepstack_visual_indexes]
        self.deepstack = nn.ModuleList([_Merger(m) for m in visual.deepstack_merger_list])
        self.merger = _Merger(visual.merger)

    def forward(
        self,
        pixel_values: torch.Tensor,  # [P, 1536] f32, merge-window order
        pos_embed_idx: torch.Tensor,  # [P, 4] i64
        pos_embed_weight: torch.Tensor,  # [P, 4] f32
        rotary_cos: torch.Tensor,  # [P, dv] f32
        rotary_sin: torch.Tensor,  # [P, dv] f32
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = self.patch_embed(pixel_values) + self.pos_embed(pos_embed_idx, pos_embed_weight)  # [P, Cv]
        deepstack: list[torch.Tensor] = []
        taps: list[torch.Tensor] = []
        for i, block in enumerate(self.blocks):
            x = block(x, rotary_cos, rotary_sin)
            if i in self.taps:
                taps.append(x)
                deepstack.append(self.deepstack[self.taps.index(i)](x))  # [M, H]
        image_features = self.merger(x)  # [M, H]
        vit_ms = torch.stack([*taps, x])  # [4, P, Cv]
        return image_features, torch.stack(deepstack), vit_ms


def export_vision_encoder(
    model: Qwen3VLForConditionalGeneration, out_path: Path, dtype: str = "fp32"
) -> GraphSpec:
    """Write `vision_encoder.onnx` (+ `.onnx_data` when over 2 GiB) and return its GraphSpec.

    dtype: "fp32"; "fp16" (weights and most activations fp16, LayerNorm/attention/rotary/pos-embed in
    f32, boundary f32); "int4" (MatMul weights as MatMulNBits blocks of 32, everything else f32).
    """
    if dtype not in WEIGHT_DTYPES:
        raise ModelkitError(
            "INVALID_INPUT", f"dtype must be one of {', '.join(WEIGHT_DTYPES)}, got {dtype!r}"
        )
    out_path = Path(out_path)
    wrapper = VisionEncoderForExport(model).eval().float()
    vcfg = model.model.visual.config
    cv, dv = int(vcfg.hidden_size), int(vcfg.hidden_size) // int(vcfg.num_heads)
    h = int(vcfg.out_hidden_size)
    n_taps = len(wrapper.taps)

    # A small traced example; every size below is marked dynamic.
    from .vision_inputs import vision_host_inputs

    host = vision_host_inputs(4, 6, int(vcfg.num_position_embeddings), dv)
    example = (
        torch.zeros(24, 1536),
        torch.from_numpy(host["pos_embed_idx"]),
        torch.from_numpy(host["pos_embed_weight"]),
        torch.from_numpy(host["rotary_cos"]),
        torch.from_numpy(host["rotary_sin"]),
    )
    inputs, outputs = vision_io(cv, h, dv, n_taps)
    dynamic_axes = {
        "pixel_values": {0: "P"},
        "pos_embed_idx": {0: "P"},
        "pos_embed_weight": {0: "P"},
        "rotary_cos": {0: "P"},
        "rotary_sin": {0: "P"},
        "image_features": {0: "M"},
        "deepstack_features": {1: "M"},
        "vit_ms": {1: "P"},
    }
    with tempfile.TemporaryDirectory(prefix="modelkit-vision-") as tmp:
        raw_path = Path(tmp) / "vision_encoder.onnx"
        with torch.no_grad(), warnings.catch_warnings():
            # The TorchScript exporter is deprecated but handles dynamic axes on this graph simply.
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(
                wrapper,
                example,
                str(raw_path),
                input_names=[t["name"] for t in inputs],
                output_names=[t["name"] for t in outputs],
                dynamic_axes=dynamic_axes,
                opset_version=OPSET,
                dynamo=False,
                do_constant_folding=True,
                custom_opsets=CUSTOM_OPSETS,
            )
        onnx_model = load_onnx(raw_path)
    fp32_nodes = [n.name for n in onnx_model.graph.node if any(s in n.name for s in _FP32_SCOPES)]
    onnx_model = convert_weights(onnx_model, dtype, keep_fp32_nodes=fp32_nodes)
    spec = graph_spec(onnx_model, out_path.name)
    check_io(spec, inputs, outputs)
    save_onnx(onnx_model, out_path)
    return spec
