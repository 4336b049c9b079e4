"""Export the Qwen3-VL language model as one ONNX graph for prefill and KV-cache decode.

The graph is `decoder_model_merged.onnx` of docs/design.md: token embedding (with the image rows
replaced by `visual_embeds[0]`), interleaved M-RoPE from `position_ids`, the text layers with
DeepStack additions after layers 0..2, the final RMSNorm and the LM head on the last position.
Attention is onnxruntime's fused `com.microsoft` GroupQueryAttention (causal, KV cache in and out),
fed with q/k after q_norm/k_norm and M-RoPE, so its own rotary is off.

`LanguageModelGraph` is our own export-friendly module over the Hugging Face weights (it shares their
storage, it copies nothing). The graph is traced with the TorchScript exporter without parameters and
the weights are then written one tensor at a time, so a large model is never held twice, and the
fp16 / int4 variants convert tensor by tensor on the way out.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper
from torch import nn
from transformers import Qwen3VLForConditionalGeneration

from .compact_embedding import TABLE, compact_plan, rewrite_table_uses, should_compact
from .errors import ModelkitError
from .onnx_utils import (
    INT4_ACCURACY_LEVEL,
    GraphSpec,
    TensorSpec,
    check_io,
    external_data_name,
    graph_spec,
)

DTYPES = ("fp32", "fp16", "int4")
OPSET = 17
# GroupQueryAttention (and MatMulNBits in int4 graphs) live in onnxruntime's contrib domain.
CUSTOM_OPSETS = {"com.microsoft": 1}
INT4_BLOCK = 32
# Above this the weights go to `<file>_data` next to the graph (protobuf caps a file at 2 GB).
INLINE_LIMIT_BYTES = 1_500_000_000


def mrope_freq_axes(mrope_section: list[int], half_dim: int) -> list[int]:
    """Which position axis (0 = T, 1 = H, 2 = W) drives each of the head_dim/2 rotary frequencies.

    Interleaved layout as in Qwen3-VL: frequency j takes H when j % 3 == 1 and j < 3 * sections[1],
    W when j % 3 == 2 and j < 3 * sections[2], else T ([24, 20, 20] -> THW x 20 then TTTT).
    """
    if len(mrope_section) != 3 or sum(mrope_section) != half_dim:
        raise ModelkitError(
            "CHECKPOINT_INVALID",
            f"mrope_section {mrope_section} must have 3 entries summing to head_dim/2 = {half_dim}",
        )
    axes = [0] * half_dim
    for axis in (1, 2):
        for j in range(axis, 3 * mrope_section[axis], 3):
            axes[j] = axis
    return axes


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # fp32 throughout; weight * normalised, as in Qwen3VLTextRMSNorm.
    x = x.to(torch.float32)
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class _GroupQueryAttention(torch.autograd.Function):
    """Causal grouped-query attention with a KV cache, exported as onnxruntime's fused
    `com.microsoft::GroupQueryAttention` instead of Concat + MatMul/Where/Softmax/MatMul.

    q [B,S,nH*hd], k, v [B,S,nKV*hd] (q_norm/k_norm and M-RoPE already applied: do_rotary=0),
    past_k, past_v [B,nKV,past,hd], seqlens_k i32 [B] (= valid total length - 1),
    total_len i32 [1] (= past + S) -> attn [B,S,nH*hd], present_k, present_v [B,nKV,past+S,hd].

    The PyTorch forward is the reference (what tracing runs, what torch-side checks see) and
    follows the CPU kernel's rule: query i sits at absolute position past_b + i with
    past_b = seqlens_k[b] + 1 - S (0 when S == total_len, the first prompt) and sees the keys
    0..past_b + i; the present is past followed by the new rows. Scale 1/sqrt(hd), the default.
    """

    @staticmethod
    def forward(
        ctx,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        past_k: torch.Tensor,
        past_v: torch.Tensor,
        seqlens_k: torch.Tensor,
        total_len: torch.Tensor,
        num_heads: int,
        kv_num_heads: int,
        head_dim: int,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        with warnings.catch_warnings():
            # While tracing, this body only produces example values (symbolic() is what gets
            # exported), so the tracer's warnings about data-dependent Python here do not apply.
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            seq = q.shape[1]
            present_k = torch.cat((past_k, k.unflatten(-1, (kv_num_heads, head_dim)).transpose(1, 2)), dim=2)
            present_v = torch.cat((past_v, v.unflatten(-1, (kv_num_heads, head_dim)).transpose(1, 2)), dim=2)
            total = int(total_len.reshape(-1)[0])
            past = (
                seqlens_k.long() + 1 - seq if seq != total else torch.zeros_like(seqlens_k, dtype=torch.long)
            )
            q_pos = past.view(-1, 1) + torch.arange(seq).view(1, -1)  # [B, S]
            allowed = torch.arange(present_k.shape[2]).view(1, 1, -1) <= q_pos.unsqueeze(-1)  # [B, S, past+S]
            # Query head h uses kv head h // rep: group the query heads per kv head.
            qg = q.unflatten(-1, (kv_num_heads, -1, head_dim)).permute(0, 2, 3, 1, 4)  # [B, nKV, rep, S, hd]
            scores = (qg @ present_k.unsqueeze(2).transpose(-1, -2)) * (head_dim**-0.5)  # [B, nKV, rep, S, T]
            scores = torch.where(allowed[:, None, None], scores, float(torch.finfo(torch.float32).min))
            attn = torch.softmax(scores, dim=-1) @ present_v.unsqueeze(2)  # [B, nKV, rep, S, hd]
            attn = attn.flatten(1, 2).transpose(1, 2).flatten(2)  # [B, S, nH*hd]
        return attn, present_k, present_v

    @staticmethod
    def symbolic(
        g, q, k, v, past_k, past_v, seqlens_k, total_len, num_heads: int, kv_num_heads: int, head_dim: int
    ):
        attn, present_k, present_v = g.op(
            "com.microsoft::GroupQueryAttention",
            q,
            k,
            v,
            past_k,
            past_v,
            seqlens_k,
            total_len,
            num_heads_i=num_heads,
            kv_num_heads_i=kv_num_heads,
            outputs=3,
        )
        # The exporter cannot infer a contrib op's outputs; give them their types and static widths.
        attn.setType(q.type().with_dtype(torch.float32).with_sizes([None, None, num_heads * head_dim]))
        for present in (present_k, present_v):
            present.setType(
                q.type().with_dtype(torch.float32).with_sizes([None, kv_num_heads, None, head_dim])
            )
        return attn, present_k, present_v


class _Layer(nn.Module):
    """One text layer's weights; projection matrices stored transposed ([in, out]) as views."""

    def __init__(self, hf_layer: nn.Module) -> None:
        super().__init__()
        attn, mlp = hf_layer.self_attn, hf_layer.mlp
        for proj in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj):
            if proj.bias is not None:
                raise ModelkitError(
                    "CHECKPOINT_INVALID", "attention biases are not supported (Qwen3-VL has none)"
                )

        def t(w: torch.Tensor) -> nn.Parameter:
            # A transposed view of the HF weight: MatMul(x, W^T) with no Transpose node and no copy.
            return nn.Parameter(w.detach().t(), requires_grad=False)

        def p(w: torch.Tensor) -> nn.Parameter:
            return nn.Parameter(w.detach(), requires_grad=False)

        self.input_norm = p(hf_layer.input_layernorm.weight)  # [H]
        self.q_proj = t(attn.q_proj.weight)  # [H, nH*hd]
        self.k_proj = t(attn.k_proj.weight)  # [H, nKV*hd]
        self.v_proj = t(attn.v_proj.weight)  # [H, nKV*hd]
        self.o_proj = t(attn.o_proj.weight)  # [nH*hd, H]
        self.q_norm = p(attn.q_norm.weight)  # [hd]
        self.k_norm = p(attn.k_norm.weight)  # [hd]
        self.post_norm = p(hf_layer.post_attention_layernorm.weight)  # [H]
        self.gate_proj = t(mlp.gate_proj.weight)  # [H, I]
        self.up_proj = t(mlp.up_proj.weight)  # [H, I]
        self.down_proj = t(mlp.down_proj.weight)  # [I, H]


class LanguageModelGraph(nn.Module):
    """The language model of a Qwen3VLForConditionalGeneration in the I/O of decoder_model_merged.

    forward(input_ids [B,S] i64, visual_embeds [4,B,S,H] f32, attention_mask [B,past+S] i64,
    position_ids [3,B,S] i64, *past (key, value) x L [B,nKV,past,hd]) ->
    (logits [B,1,V], last_hidden_state [B,S,H], *present (key, value) x L [B,nKV,past+S,hd]).

    `freq_axes` overrides the M-RoPE frequency-to-axis layout (tests use it to show that a wrong
    layout breaks parity); by default it is the interleaved layout of the config.
    """

    def __init__(self, model: Qwen3VLForConditionalGeneration, freq_axes: list[int] | None = None) -> None:
        super().__init__()
        cfg = model.config
        tc = cfg.text_config
        lm = model.model.language_model
        self.num_layers = int(tc.num_hidden_layers)
        self.num_heads = int(tc.num_attention_heads)
        self.num_kv_heads = int(tc.num_key_value_heads)
        self.head_dim = int(getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads)
        self.hidden_size = int(tc.hidden_size)
        self.vocab_size = int(tc.vocab_size)
        self.eps = float(tc.rms_norm_eps)
        self.image_token_id = int(cfg.image_token_id)
        self.num_deepstack = len(cfg.vision_config.deepstack_visual_indexes)
        if self.num_deepstack > self.num_layers:
            raise ModelkitError("CHECKPOINT_INVALID", "more DeepStack taps than text layers")
        if self.num_heads % self.num_kv_heads:
            raise ModelkitError(
                "CHECKPOINT_INVALID", "num_attention_heads must be a multiple of num_key_value_heads"
            )
        if self.head_dim % 8:
            # onnxruntime's GroupQueryAttention kernels require it (Qwen3-VL uses 128).
            raise ModelkitError("UNSUPPORTED_MODEL", f"head_dim {self.head_dim} is not a multiple of 8")
        rope = dict(getattr(tc, "rope_parameters", None) or getattr(tc, "rope_scaling", None) or {})
        if rope.get("rope_type", "default") != "default":
            raise ModelkitError("CHECKPOINT_INVALID", f"rope_type {rope.get('rope_type')!r} is not supported")
        theta = float(rope.get("rope_theta", getattr(tc, "rope_theta", 5_000_000.0)))
        section = list(rope.get("mrope_section", [24, 20, 20]))
        half = self.head_dim // 2
        axes = freq_axes if freq_axes is not None else mrope_freq_axes(section, half)
        # Plain tensor attributes (not buffers) are traced as graph constants.
        self.freq_axes = torch.tensor(axes, dtype=torch.long)  # [hd/2]
        # Same fp32 arithmetic as HF's compute_default_rope_parameters.
        self.inv_freq = 1.0 / (
            theta ** (torch.arange(0, self.head_dim, 2, dtype=torch.int64).to(torch.float32) / self.head_dim)
        )  # [hd/2] f32

        self.embed_tokens = nn.Parameter(lm.embed_tokens.weight.detach(), requires_grad=False)  # [V, H]
        self.tied = model.lm_head.weight.data_ptr() == lm.embed_tokens.weight.data_ptr()
        # Untied: [H, V] view for MatMul(h, W^T). Tied: the embedding table is the head (one initializer).
        self.lm_head = (
            None if self.tied else nn.Parameter(model.lm_head.weight.detach().t(), requires_grad=False)
        )
        self.layers = nn.ModuleList([_Layer(layer) for layer in lm.layers])
        self.norm = nn.Parameter(lm.norm.weight.detach(), requires_grad=False)  # [H]

    def forward(
        self,
        input_ids: torch.Tensor,
        visual_embeds: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        *past: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        n_kv, hd = self.num_kv_heads, self.head_dim

        # Embeddings; image-pad rows take the image features instead.
        is_image = (input_ids == self.image_token_id).unsqueeze(-1)  # [B, S, 1] bool
        image_rows = is_image.to(torch.float32)  # [B, S, 1]
        hidden = F.embedding(input_ids, self.embed_tokens).to(torch.float32)  # [B, S, H]
        hidden = torch.where(is_image, visual_embeds[0], hidden)

        # Interleaved M-RoPE: pick each frequency's axis, then the usual rotate-half tables (fp32).
        pos = position_ids.permute(1, 2, 0).to(torch.float32)  # [B, S, 3]
        pos = torch.index_select(pos, 2, self.freq_axes)  # [B, S, hd/2]
        freqs = pos * self.inv_freq  # [B, S, hd/2]
        angles = torch.cat((freqs, freqs), dim=-1).unsqueeze(2)  # [B, S, 1, hd], broadcast over heads
        cos, sin = angles.cos(), angles.sin()

        # GroupQueryAttention's lengths, from the mask (all ones for batch 1, as the runtime feeds
        # it): seqlens_k = attended length - 1 per row, total_len = past + S.
        seqlens_k = (attention_mask.sum(dim=1) - 1).to(torch.int32)  # [B]
        total_len = torch._shape_as_tensor(attention_mask)[1:].to(torch.int32)  # [1]

        presents: list[torch.Tensor] = []
        for li, layer in enumerate(self.layers):
            x = _rms_norm(hidden, layer.input_norm, self.eps)  # [B, S, H]
            q = (x @ layer.q_proj).unflatten(-1, (-1, hd))  # [B, S, nH, hd]
            k = (x @ layer.k_proj).unflatten(-1, (-1, hd))  # [B, S, nKV, hd]
            q = _rms_norm(q, layer.q_norm, self.eps)
            k = _rms_norm(k, layer.k_norm, self.eps)
            q = (q * cos + _rotate_half(q) * sin).flatten(2)  # [B, S, nH*hd]
            k = (k * cos + _rotate_half(k) * sin).flatten(2)  # [B, S, nKV*hd]
            v = x @ layer.v_proj  # [B, S, nKV*hd]
            attn, present_k, present_v = _GroupQueryAttention.apply(
                q, k, v, past[2 * li], past[2 * li + 1], seqlens_k, total_len, self.num_heads, n_kv, hd
            )  # [B, S, nH*hd], 2 x [B, nKV, past+S, hd]
            presents += [present_k, present_v]
            hidden = hidden + attn @ layer.o_proj

            x = _rms_norm(hidden, layer.post_norm, self.eps)
            hidden = hidden + (F.silu(x @ layer.gate_proj) * (x @ layer.up_proj)) @ layer.down_proj
            if li < self.num_deepstack:
                # DeepStack: after layer li the image rows get the tap-li features.
                hidden = hidden + visual_embeds[li + 1] * image_rows

        hidden = _rms_norm(hidden, self.norm, self.eps)  # [B, S, H]
        last = hidden[:, -1, :]  # [B, H]
        if self.lm_head is None:
            logits = (self.embed_tokens @ last.transpose(0, 1)).transpose(0, 1)  # [V,H]@[H,B] -> [B, V]
        else:
            logits = last @ self.lm_head  # [B, V]
        return (logits.unsqueeze(1), hidden, *presents)


def language_model_io_names(num_layers: int) -> tuple[list[str], list[str]]:
    inputs = ["input_ids", "visual_embeds", "attention_mask", "position_ids"]
    outputs = ["logits", "last_hidden_state"]
    for i in range(num_layers):
        inputs += [f"past_key_values.{i}.key", f"past_key_values.{i}.value"]
        outputs += [f"present.{i}.key", f"present.{i}.value"]
    return inputs, outputs


def language_model_graph_spec(graph: LanguageModelGraph, file: str) -> GraphSpec:
    """The contract of docs/design.md for this model: names, dtypes, shapes (strings are dynamic axes)."""
    n_vis = 1 + graph.num_deepstack
    h, n_kv, hd, v = graph.hidden_size, graph.num_kv_heads, graph.head_dim, graph.vocab_size
    inputs: list[TensorSpec] = [
        {"name": "input_ids", "dtype": "int64", "shape": ["batch", "seq"]},
        {"name": "visual_embeds", "dtype": "float32", "shape": [n_vis, "batch", "seq", h]},
        {"name": "attention_mask", "dtype": "int64", "shape": ["batch", "total"]},
        {"name": "position_ids", "dtype": "int64", "shape": [3, "batch", "seq"]},
    ]
    outputs: list[TensorSpec] = [
        {"name": "logits", "dtype": "float32", "shape": ["batch", 1, v]},
        {"name": "last_hidden_state", "dtype": "float32", "shape": ["batch", "seq", h]},
    ]
    for i in range(graph.num_layers):
        for kind in ("key", "value"):
            inputs.append(
                {
                    "name": f"past_key_values.{i}.{kind}",
                    "dtype": "float32",
                    "shape": ["batch", n_kv, "past", hd],
                }
            )
            outputs.append(
                {"name": f"present.{i}.{kind}", "dtype": "float32", "shape": ["batch", n_kv, "total", hd]}
            )
    return {"file": file, "inputs": inputs, "outputs": outputs}


def _trace_structure(graph: LanguageModelGraph, path: Path) -> None:
    """Export the graph with the weights left as named graph inputs (no weight bytes written)."""
    in_names, out_names = language_model_io_names(graph.num_layers)
    b, s, past = 1, 3, 2
    n_vis = 1 + graph.num_deepstack
    args: list[torch.Tensor] = [
        torch.full((b, s), graph.image_token_id, dtype=torch.long),
        torch.zeros(n_vis, b, s, graph.hidden_size),
        torch.ones(b, past + s, dtype=torch.long),
        torch.arange(s).view(1, 1, s).expand(3, b, s).contiguous(),
    ]
    dyn: dict[str, dict[int, str]] = {
        "input_ids": {0: "batch", 1: "seq"},
        "visual_embeds": {1: "batch", 2: "seq"},
        "attention_mask": {0: "batch", 1: "total"},
        "position_ids": {1: "batch", 2: "seq"},
        "logits": {0: "batch"},
        "last_hidden_state": {0: "batch", 1: "seq"},
    }
    for i in range(graph.num_layers):
        for kind in ("key", "value"):
            args.append(torch.zeros(b, graph.num_kv_heads, past, graph.head_dim))
            dyn[f"past_key_values.{i}.{kind}"] = {0: "batch", 2: "past"}
            dyn[f"present.{i}.{kind}"] = {0: "batch", 2: "total"}
    with torch.no_grad(), warnings.catch_warnings():
        # The TorchScript exporter is deprecated but handles the dynamic B/S/past axes of this graph
        # without specialising them; its deprecation notices are noise here.
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            graph,
            tuple(args),
            str(path),
            dynamo=False,
            export_params=False,
            # Weights stay named graph inputs, and the exporter skips its by-value initializer
            # dedup (a full comparison of every same-shaped pair of matrices in a large model).
            keep_initializers_as_inputs=True,
            opset_version=OPSET,
            custom_opsets=CUSTOM_OPSETS,
            input_names=in_names,
            output_names=out_names,
            dynamic_axes=dyn,
            do_constant_folding=True,
        )


def _weight_consumers(model: onnx.ModelProto, names: set[str]) -> dict[str, list[onnx.NodeProto]]:
    uses: dict[str, list[onnx.NodeProto]] = {n: [] for n in names}
    for node in model.graph.node:
        for inp in node.input:
            if inp in uses:
                uses[inp].append(node)
    return uses


def _cast(src: str, dst: str, to: int) -> onnx.NodeProto:
    return helper.make_node("Cast", [src], [dst], to=to, name=f"cast_{dst}")


def _nbits_quantise(weight: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Blockwise (32 along K) symmetric 4- or 8-bit weights with onnxruntime's own MatMulNBits packer.

    weight [K, N] f32 -> packed [N, K/32, 32 * bits / 8] u8 (4 bits: low nibble first) and scales
    [N, K/32] f32 (zero point 2^(bits-1) implied).
    """
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits, quantize_matmul_8bits

    k, n = weight.shape
    blocks = k // INT4_BLOCK
    packed = np.zeros((n, blocks, INT4_BLOCK * bits // 8), dtype=np.uint8)
    scales = np.zeros((n, blocks), dtype=np.float32)
    zero_points = np.zeros((n, (blocks * bits + 7) // 8), dtype=np.uint8)  # unused when symmetric
    packer = {4: quantize_matmul_4bits, 8: quantize_matmul_8bits}[bits]
    packer(
        packed, np.ascontiguousarray(weight, dtype=np.float32), scales, zero_points, INT4_BLOCK, n, k, True
    )
    return packed, scales


def _matmul_nbits(inputs: list[str], output: str, name: str, k: int, n: int, bits: int) -> onnx.NodeProto:
    """A [*, K] x [K, N] product over _nbits_quantise's blocks, multiplied in int8."""
    return helper.make_node(
        "MatMulNBits",
        inputs,
        [output],
        name=name,
        domain="com.microsoft",
        K=k,
        N=n,
        bits=bits,
        block_size=INT4_BLOCK,
        accuracy_level=INT4_ACCURACY_LEVEL,
    )


class _WeightWriter:
    """Adds initializers one at a time, inline or appended to one external data file."""

    def __init__(self, model: onnx.ModelProto, data_path: Path | None) -> None:
        self.model = model
        self.data_path = data_path
        self.offset = 0
        self.handle = open(data_path, "wb") if data_path is not None else None  # noqa: SIM115

    def add(self, name: str, array: np.ndarray) -> None:
        array = np.ascontiguousarray(array)
        if self.handle is None or self.data_path is None:
            self.model.graph.initializer.append(numpy_helper.from_array(array, name))
            return
        tensor = TensorProto()
        tensor.name = name
        tensor.data_type = helper.np_dtype_to_tensor_dtype(array.dtype)
        tensor.dims.extend(array.shape)
        pad = (-self.offset) % 64  # aligned offsets let onnxruntime mmap the tensors
        self.handle.write(b"\0" * pad)
        self.offset += pad
        raw = array.tobytes()
        self.handle.write(raw)
        tensor.data_location = TensorProto.EXTERNAL
        for key, value in (
            ("location", self.data_path.name),
            ("offset", str(self.offset)),
            ("length", str(len(raw))),
        ):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
        self.offset += len(raw)
        self.model.graph.initializer.append(tensor)

    def close(self) -> None:
        if self.handle is not None:
            self.handle.close()


def _attach_weights(
    model: onnx.ModelProto,
    graph: LanguageModelGraph,
    dtype: str,
    data_path: Path | None,
    int8_table: bool = False,
) -> None:
    """Turn the weight graph inputs into initializers, converting matrices for fp16 / int4.

    fp16: matrices used by MatMul / Gather are stored in fp16; the MatMul's activation is cast to
    fp16 and its product back to fp32, the Gather's rows back to fp32, so norms, RoPE, softmax and
    the residual stream stay fp32. int4: MatMuls with a [K, N] weight become MatMulNBits (block 32);
    the embedding table stays fp16, or with `int8_table` (the tied table, _tied_table_int8) becomes
    8-bit blocks.
    """
    params = dict(graph.named_parameters())
    weight_inputs = [i for i in model.graph.input if i.name in params]
    unknown = [
        i.name
        for i in model.graph.input
        if i.name not in params and i.name not in language_model_io_names(graph.num_layers)[0]
    ]
    if unknown:
        raise ModelkitError("EXPORT_FAILED", f"the traced language model has unexpected inputs {unknown}")
    for i in weight_inputs:
        model.graph.input.remove(i)
    uses = _weight_consumers(model, {i.name for i in weight_inputs})

    new_nodes: dict[
        int, tuple[list[onnx.NodeProto], list[onnx.NodeProto]]
    ] = {}  # id(node) -> (before, after)
    replaced: dict[int, onnx.NodeProto] = {}
    writer = _WeightWriter(model, data_path)
    try:
        for name in [i.name for i in weight_inputs]:
            tensor = params[name].detach()
            consumers = uses[name]
            if name == TABLE and not consumers and int8_table:
                # The packer takes the head's B = table^T [K = H, N = V]; the blocks are the table's rows.
                packed, scales = _nbits_quantise(tensor.to(torch.float32).numpy().T, 8)
                writer.add(TABLE_Q8, packed.reshape(tensor.shape[0], -1))  # [V, H] u8
                writer.add(TABLE_SCALES, scales)
                continue
            is_matrix = (
                tensor.dim() == 2 and consumers and all(n.op_type in ("MatMul", "Gather") for n in consumers)
            )
            if dtype == "fp32" or not is_matrix:
                writer.add(name, tensor.to(torch.float32).contiguous().numpy())
                continue
            quantisable = (
                dtype == "int4"
                and len(consumers) == 1
                and consumers[0].op_type == "MatMul"
                and consumers[0].input[1] == name
                and tensor.shape[0] % INT4_BLOCK == 0
            )
            if quantisable:
                node = consumers[0]
                k, n = tensor.shape
                packed, scales = _nbits_quantise(tensor.to(torch.float32).numpy(), 4)
                writer.add(f"{name}.q4", packed)
                writer.add(f"{name}.scales", scales)
                inputs = [node.input[0], f"{name}.q4", f"{name}.scales"]
                replaced[id(node)] = _matmul_nbits(inputs, node.output[0], f"{node.name}_q4", k, n, 4)
                continue
            writer.add(name, tensor.to(torch.float16).contiguous().numpy())
            for node in consumers:
                before, after = new_nodes.setdefault(id(node), ([], []))
                if node.op_type == "MatMul":
                    for slot, inp in enumerate(node.input):
                        if inp != name and not inp.endswith("_f16"):
                            before.append(_cast(inp, f"{inp}_{node.name}_f16", TensorProto.FLOAT16))
                            node.input[slot] = f"{inp}_{node.name}_f16"
                out = node.output[0]
                node.output[0] = f"{out}_f16"
                after.append(_cast(f"{out}_f16", out, TensorProto.FLOAT))
    finally:
        writer.close()

    nodes: list[onnx.NodeProto] = []
    for node in model.graph.node:
        before, after = new_nodes.get(id(node), ([], []))
        nodes += before + [replaced.get(id(node), node)] + after
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    if dtype == "int4" and not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))


def _replace_tied_head(model: onnx.ModelProto, head: list[onnx.NodeProto]) -> None:
    """Replace the traced tied head Transpose -> MatMul(embed_tokens, h^T) -> Transpose ([B, H] ->
    [B, V]) by `head`, nodes reading h [B, H] from the input named "h" and writing "logits"."""
    nodes = list(model.graph.node)
    producer = {o: n for n in nodes for o in n.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in nodes:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    for mm in nodes:
        if mm.op_type != "MatMul" or mm.input[0] != TABLE:
            continue
        into = producer.get(mm.input[1])
        out = consumers.get(mm.output[0], [])
        if into is None or into.op_type != "Transpose" or len(out) != 1 or out[0].op_type != "Transpose":
            break
        wiring = {"h": into.input[0], "logits": out[0].output[0]}
        for node in head:
            node.input[:] = [wiring.get(i, i) for i in node.input]
            node.output[:] = [wiring.get(o, o) for o in node.output]
        kept = [n for n in nodes if n not in (into, mm, out[0])]
        at = kept.index(next(n for n in kept if out[0].output[0] in n.input))
        kept[at:at] = head
        del model.graph.node[:]
        model.graph.node.extend(kept)
        return
    raise ModelkitError("EXPORT_FAILED", "the tied head's MatMul pattern was not found in the traced graph")


def _tied_head_as_gemm(model: onnx.ModelProto) -> None:
    """The fp32 tied head as one Gemm(h, embed_tokens, transB=1).

    onnxruntime's CPU kernel pads MatMul's single column to its tile width, which makes the head (a
    [151936, H] product per decode step) about twice as slow as the Gemm, whose constant B it
    prepacks once at load (more memory, the same pack): at 2B widths and fp32 the head took 82 ms of
    a 120 ms step.
    """
    _replace_tied_head(
        model, [helper.make_node("Gemm", ["h", TABLE], ["logits"], name="lm_head_gemm", transB=1)]
    )


# The int4 graphs' tied table as 8-bit blocks (below).
TABLE_Q8, TABLE_SCALES = f"{TABLE}.q8", f"{TABLE}.scales"


def _tied_table_int8(model: onnx.ModelProto, hidden: int, vocab: int) -> None:
    """int4 graphs: the tied table as symmetric 8-bit blocks of 32 along H, read by the embedding
    (com.microsoft GatherBlockQuantized, f32 rows) and by the head (MatMulNBits, 8 bits, int8
    products) from one initializer [V, H] u8 (+ scales [V, H/32]); _attach_weights writes them.

    Kept fp16 (as before), the head was a FusedMatMul over 622 MB at 2B widths: 73 ms of a 121 ms
    step on 2 cores, while all 4 text layers' int4 MatMulNBits took 6 ms. 8-bit blocks halve the
    table and the head's bytes (13.7 ms for the head in isolation) at 0.4 % of the weights' scale.
    """
    blocks = hidden // INT4_BLOCK
    shape = numpy_helper.from_array(np.array([-1, blocks, INT4_BLOCK], dtype=np.int64), f"{TABLE}.blocks")
    model.graph.initializer.append(shape)
    _replace_tied_head(
        model,
        [
            # MatMulNBits wants B as [N, K/32, 32]: the same bytes, reshaped (folded at load).
            helper.make_node("Reshape", [TABLE_Q8, shape.name], [f"{TABLE}.q8_blocks"], name="lm_head_b"),
            _matmul_nbits(
                ["h", f"{TABLE}.q8_blocks", TABLE_SCALES], "logits", "lm_head_q8", hidden, vocab, 8
            ),
        ],
    )
    for node in model.graph.node:
        if node.op_type == "Gather" and node.input[0] == TABLE:
            ids = node.input[1]
            node.CopyFrom(
                helper.make_node(
                    "GatherBlockQuantized",
                    [TABLE_Q8, ids, TABLE_SCALES],
                    list(node.output),
                    name=node.name,
                    domain="com.microsoft",
                    gather_axis=0,
                    quantize_axis=1,
                    block_size=INT4_BLOCK,
                    bits=8,
                )
            )


def _compact_embedding(proto: onnx.ModelProto, graph: LanguageModelGraph, option: bool | None) -> bool:
    """Keep only the embedding rows that are not all zero (compact_embedding.py), in the traced graph
    before its weights are written; `graph.embed_tokens` becomes the compact table."""
    table = graph.embed_tokens.detach()
    if not should_compact(table.numpy(), option):
        return False
    rows, remap = compact_plan(table.numpy())
    graph.embed_tokens = nn.Parameter(table[torch.from_numpy(rows)], requires_grad=False)
    proto.graph.initializer.append(numpy_helper.from_array(remap, f"{TABLE}.remap"))
    rewrite_table_uses(proto, TABLE, f"{TABLE}.remap")
    return True


def export_language_model(
    model: Qwen3VLForConditionalGeneration,
    out_path: Path,
    dtype: str = "fp32",
    compact_embedding: bool | None = None,
) -> GraphSpec:
    """Write `out_path` (decoder_model_merged.onnx) and return its GraphSpec (manifest entry).

    dtype: "fp32", "fp16" (matrices fp16, I/O, norms, RoPE and softmax fp32) or "int4" (MatMulNBits,
    block 32, int8 products; the embedding fp16, or in 8-bit blocks when it is also the head).
    Weights go to `<out_path>_data` when they exceed ~1.5 GB.
    compact_embedding: store only the embedding rows that are not all zero plus a remap table (same
    outputs, bit for bit); None (default) does it when at least half the rows are zero (a model
    trained from scratch on a small world), True/False force it.
    """
    if dtype not in DTYPES:
        raise ModelkitError("INVALID_INPUT", f"dtype must be one of {', '.join(DTYPES)}; got {dtype!r}")
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    graph = LanguageModelGraph(model).eval()
    with tempfile.TemporaryDirectory() as tmp:
        skeleton = Path(tmp) / "language_model_structure.onnx"
        try:
            _trace_structure(graph, skeleton)
        except Exception as e:  # the exporter raises many types; the message is what matters
            raise ModelkitError("EXPORT_FAILED", f"tracing the language model failed: {e}") from e
        proto = onnx.load(str(skeleton))
    if dtype == "fp32" and graph.tied:
        _tied_head_as_gemm(proto)
    compacted = _compact_embedding(proto, graph, compact_embedding)
    # A compact table is a few rows: its head costs nothing, it stays as it is.
    int8_table = dtype == "int4" and graph.tied and not compacted and graph.hidden_size % INT4_BLOCK == 0
    if int8_table:
        _tied_table_int8(proto, graph.hidden_size, int(graph.embed_tokens.shape[0]))
    weight_bytes = sum(p.numel() * 4 for p in graph.parameters())
    data_file = out_path.with_name(external_data_name(out_path))
    data_path = data_file if weight_bytes > INLINE_LIMIT_BYTES else None
    if data_path is None and data_file.exists():
        os.remove(data_file)  # a stale file from an earlier large export
    _attach_weights(proto, graph, dtype, data_path, int8_table)
    spec = language_model_graph_spec(graph, out_path.name)
    check_io(graph_spec(proto, out_path.name), spec["inputs"], spec["outputs"])  # graph == contract
    proto.producer_name = "modelkit"
    onnx.save(proto, str(out_path))
    return spec
