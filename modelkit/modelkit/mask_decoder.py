"""The Qwen3-VL-Seg box-guided mask decoder ("QVS-Dec", spec 6.4), its checkpoint and its losses.

Four parts, as in the paper's abstract (spec 6.1): multi-scale spatial feature injection (ViT taps +
the LLM's image-token states T_mm -> one memory map), a spatial-semantic query (Fourier box code +
T_seg, refined by a small transformer decoder over the memory), box-guided high-resolution pixel
fusion (shallow CNN on the image, soft box gate, progressive upsampling to stride 4) and one round of
mask-aware query refinement (dynamic kernels -> M1, masked pooling -> Q2 -> M2, IoU head).

Everything is written for `torch.onnx.export(dynamo=False)` with dynamic P, M, Q, K, Hr, Wr: sizes
come from tensor shapes (traced), never from tensor values, and there is no Python branching on data.
docs/mask-decoder.md explains the choices (gate units in particular).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ModelkitError

CHECKPOINT_FORMAT = "qwen3-vl-seg-mask-decoder"
CHECKPOINT_FORMAT_VERSION = 1

# The query hidden state the runtime feeds (docs/design.md, "T_seg on a frozen base").
QUERY_TOKENS = ("last_coordinate",)

LN_EPS = 1e-5
GN_EPS = 1e-5
# Smallest side of an enlarged gate box, in ViT patches (16 px of the resized image): a degenerate
# box still opens a few stride-4 pixels instead of a gate that is zero everywhere.
GATE_MIN_PATCHES = 2.0
# w, h below this are clamped before the log in the box code (0.2 ln(1e-4) + 0.5 = -1.34).
BOX_MIN_SIZE = 1e-4
POOL_EPS = 1e-6


@dataclass
class MaskDecoderConfig:
    """Sizes of the decoder; the defaults at the 4B widths (1024, 2560) give about 17.1 M parameters.

    gate_alpha is the gate's slope per unit of the *enlarged box's own side length* (box-relative
    units, see docs/mask-decoder.md); gate_expand is the total enlargement (0.15 = 7.5 % per side).
    """

    vision_hidden: int
    text_hidden: int
    dim: int = 256
    pixel_dim: int = 128
    num_layers: int = 6
    num_heads: int = 8
    ffn_dim: int = 2048
    fourier_octaves: int = 8
    gate_alpha: float = 20.0
    gate_expand: float = 0.15
    pos_grid: int = 48
    num_levels: int = 4
    # Fixed by this architecture; recorded so the pack manifest can state them.
    output_stride: int = 4
    query_token: str = "last_coordinate"

    def __post_init__(self) -> None:
        positive = ("vision_hidden", "text_hidden", "dim", "pixel_dim", "num_layers", "num_heads", "ffn_dim")
        for name in (*positive, "fourier_octaves", "pos_grid", "num_levels"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ModelkitError(
                    "INVALID_CONFIG", f"mask decoder {name} must be a positive integer, got {value!r}"
                )
        if self.dim % self.num_heads:
            raise ModelkitError(
                "INVALID_CONFIG",
                f"mask decoder dim {self.dim} is not divisible by num_heads {self.num_heads}",
            )
        if self.pixel_dim % 2:
            raise ModelkitError(
                "INVALID_CONFIG", f"mask decoder pixel_dim must be even, got {self.pixel_dim}"
            )
        if not (self.gate_alpha > 0 and self.gate_expand >= 0):
            raise ModelkitError(
                "INVALID_CONFIG",
                f"gate_alpha must be > 0 and gate_expand >= 0, got {self.gate_alpha} and {self.gate_expand}",
            )
        if self.output_stride != 4:
            raise ModelkitError(
                "INVALID_CONFIG", f"output_stride is 4 in this decoder, got {self.output_stride}"
            )
        if self.query_token not in QUERY_TOKENS:
            raise ModelkitError(
                "INVALID_CONFIG",
                f"query_token must be one of {', '.join(QUERY_TOKENS)}, got {self.query_token!r}",
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> MaskDecoderConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ModelkitError("INVALID_CONFIG", f"unknown mask decoder config keys: {', '.join(unknown)}")
        missing = [k for k in ("vision_hidden", "text_hidden") if k not in values]
        if missing:
            raise ModelkitError("INVALID_CONFIG", f"mask decoder config lacks {', '.join(missing)}")
        return cls(**values)


# ---------------------------------------------------------------------------------------------------
# building blocks


class Linear(nn.Linear):
    """nn.Linear exported as MatMul with a constant [in, out] B (foldable transpose) + Add, not Gemm,
    so the int4 quantiser (MatMulNBits handles MatMul only) sees every linear layer."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.matmul(x, self.weight.t())
        return y if self.bias is None else y + self.bias


def _groups(channels: int) -> int:
    """GroupNorm groups: 32 where possible (spec 6.4 'GN32'), else the largest divisor below 32."""
    for g in range(min(32, channels), 0, -1):
        if channels % g == 0:
            return g
    return 1


def _gn(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(_groups(channels), channels, eps=GN_EPS)


class ConvGnGelu(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, stride=stride, padding=1)
        self.norm = _gn(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.norm(self.conv(x)))


def _up2(x: torch.Tensor) -> torch.Tensor:
    """Bilinear x2 (half-pixel centres, the ONNX Resize default)."""
    return F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)


class Adapter(nn.Module):
    """One MSFI level: X0 = Conv1x1(F_vis); X0 + s * GELU(GN(DWConv3x3(X0))), s initialised to 1e-3 so
    the adapter starts as (nearly) the identity on the lateral projection."""

    def __init__(self, cv: int, dim: int) -> None:
        super().__init__()
        self.lateral = nn.Conv2d(cv, dim, 1)
        self.dw = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.norm = _gn(dim)
        self.scale = nn.Parameter(torch.tensor(1e-3))

    def project(self, rows: torch.Tensor) -> torch.Tensor:
        """The lateral 1x1 conv on channel-last rows [P, Cv] -> [P, d]: a plain GEMM, so the caller
        reorders the d-wide result to NCHW instead of the Cv-wide input."""
        return F.linear(rows, self.lateral.weight.flatten(1), self.lateral.bias)

    def forward(self, x0: torch.Tensor) -> torch.Tensor:
        """x0: the lateral projection, NCHW [1, d, gh, gw]."""
        return x0 + self.scale * F.gelu(self.norm(self.dw(x0)))


class FourierBox(nn.Module):
    """gamma(v) for v = [x1, y1, 0.2 ln w + 0.5, 0.2 ln h + 0.5]: sin and cos of 2^k pi v, k < octaves.

    Its own module so that its nodes can stay f32 in an fp16 graph (2^7 pi v loses its phase in fp16).
    """

    def __init__(self, octaves: int) -> None:
        super().__init__()
        freqs = (2.0 ** torch.arange(octaves, dtype=torch.float32)) * math.pi  # [F]
        self.register_buffer("freqs", freqs, persistent=False)

    def forward(self, boxes: torch.Tensor) -> torch.Tensor:
        # boxes [Q, 4] x1, y1, x2, y2 in [0, 1]
        x1, y1, x2, y2 = boxes.unbind(-1)
        w = torch.clamp(x2 - x1, min=BOX_MIN_SIZE)
        h = torch.clamp(y2 - y1, min=BOX_MIN_SIZE)
        v = torch.stack([x1, y1, 0.2 * torch.log(w) + 0.5, 0.2 * torch.log(h) + 0.5], dim=-1)  # [Q, 4]
        phase = (v.unsqueeze(-1) * self.freqs).flatten(1)  # [Q, 4F]
        return torch.cat([torch.sin(phase), torch.cos(phase)], dim=-1)  # [Q, 8F]


class BoxGate(nn.Module):
    """Soft box gate M(x, y) = max_k valid_k * prod of 4 sigmoids, on boxes enlarged by `expand`.

    Slopes are in box-relative units: the distance to an edge is divided by the enlarged box's side,
    so the gate has the same shape for every box size and image resolution (docs/mask-decoder.md).
    The enlarged box is not clamped to the image: clamping would put a box that touches the border at
    gate 0.5 along that border, while the same edge inside the image is at ~0.8.
    """

    def __init__(self, alpha: float, expand: float) -> None:
        super().__init__()
        self.alpha = float(alpha)
        self.expand = float(expand)

    def forward(
        self,
        gate_boxes: torch.Tensor,  # [Q, K, 4] x1, y1, x2, y2 in [0, 1]
        gate_valid: torch.Tensor,  # [Q, K] 1 real, 0 padding
        level: torch.Tensor,  # [*, *, h, w] any tensor at the level's resolution
        min_w: torch.Tensor,  # [] smallest enlarged side, normalised units
        min_h: torch.Tensor,  # []
    ) -> torch.Tensor:
        h, w = level.shape[-2], level.shape[-1]
        ys = (torch.arange(h, dtype=torch.float32, device=gate_boxes.device) + 0.5) / h  # [h] pixel centres
        xs = (torch.arange(w, dtype=torch.float32, device=gate_boxes.device) + 0.5) / w  # [w]
        x1, y1, x2, y2 = gate_boxes.unbind(-1)  # [Q, K] each
        cx, cy = (x1 + x2) * 0.5, (y1 + y2) * 0.5
        bw = torch.maximum((x2 - x1) * (1.0 + self.expand), min_w)  # [Q, K] enlarged sides
        bh = torch.maximum((y2 - y1) * (1.0 + self.expand), min_h)
        left, right = (cx - 0.5 * bw).unsqueeze(-1), (cx + 0.5 * bw).unsqueeze(-1)  # [Q, K, 1]
        top, bottom = (cy - 0.5 * bh).unsqueeze(-1), (cy + 0.5 * bh).unsqueeze(-1)
        ax = (self.alpha / bw).unsqueeze(-1)  # [Q, K, 1] slope per normalised unit
        ay = (self.alpha / bh).unsqueeze(-1)
        gx = torch.sigmoid(ax * (xs - left)) * torch.sigmoid(ax * (right - xs))  # [Q, K, w]
        gy = torch.sigmoid(ay * (ys - top)) * torch.sigmoid(ay * (bottom - ys))  # [Q, K, h]
        g = gy.unsqueeze(-1) * gx.unsqueeze(-2)  # [Q, K, h, w]
        g = g * gate_valid.unsqueeze(-1).unsqueeze(-1)
        return torch.amax(g, dim=1, keepdim=True)  # [Q, 1, h, w]


class QueryLayer(nn.Module):
    """Post-norm decoder layer in the order the brief gives: cross-attn to memory, self-attn, FFN."""

    def __init__(self, dim: int, heads: int, ffn: int) -> None:
        super().__init__()
        self.heads = heads
        self.head_dim = dim // heads
        self.cq, self.ck, self.cv, self.co = (Linear(dim, dim) for _ in range(4))
        self.sq, self.sk, self.sv, self.so = (Linear(dim, dim) for _ in range(4))
        self.fc1 = Linear(dim, ffn)
        self.fc2 = Linear(ffn, dim)
        self.norm1 = nn.LayerNorm(dim, eps=LN_EPS)
        self.norm2 = nn.LayerNorm(dim, eps=LN_EPS)
        self.norm3 = nn.LayerNorm(dim, eps=LN_EPS)

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        # q [Lq, d], k/v [Lk, d] -> [Lq, d]
        d = q.shape[-1]
        q = q.reshape(-1, self.heads, self.head_dim).transpose(0, 1)  # [nh, Lq, hd]
        k = k.reshape(-1, self.heads, self.head_dim).transpose(0, 1)  # [nh, Lk, hd]
        v = v.reshape(-1, self.heads, self.head_dim).transpose(0, 1)
        probs = torch.softmax(
            torch.matmul(q, k.transpose(1, 2)) * self.head_dim**-0.5, dim=-1
        )  # [nh, Lq, Lk]
        return torch.matmul(probs, v).transpose(0, 1).reshape(-1, d)  # [Lq, d]

    def forward(self, x: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        # x [Q, d]; memory [P, d]
        x = self.norm1(x + self.co(self._attend(self.cq(x), self.ck(memory), self.cv(memory))))
        x = self.norm2(x + self.so(self._attend(self.sq(x), self.sk(x), self.sv(x))))
        return self.norm3(x + self.fc2(F.gelu(self.fc1(x))))


# ---------------------------------------------------------------------------------------------------
# the decoder


class MaskDecoder(nn.Module):
    """QVS-Dec: (vit_ms, mm_embeds, query_hidden, boxes, gate_boxes, gate_valid, hr_image) ->
    (mask_logits, mask_logits_coarse, iou_pred); see docs/design.md for the I/O contract."""

    def __init__(self, config: MaskDecoderConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        d, pd = c.dim, c.pixel_dim
        # (1) multi-scale spatial feature injection
        self.adapters = nn.ModuleList([Adapter(c.vision_hidden, d) for _ in range(c.num_levels)])
        self.fuse = nn.Conv2d(c.num_levels * d, d, 3, padding=1)
        self.fuse_norm = _gn(d)
        self.mm_proj = Linear(c.text_hidden, d)
        self.pos_table = nn.Parameter(torch.randn(1, d, c.pos_grid, c.pos_grid) * 0.02)  # P_mem
        # (2) spatial-semantic query
        self.fourier = FourierBox(c.fourier_octaves)
        self.box_fc1 = Linear(8 * c.fourier_octaves, d)
        self.box_fc2 = Linear(d, d)
        self.seg_proj = Linear(c.text_hidden, d)
        self.query_norm = nn.LayerNorm(d, eps=LN_EPS)
        self.layers = nn.ModuleList([QueryLayer(d, c.num_heads, c.ffn_dim) for _ in range(c.num_layers)])
        self.final_norm = nn.LayerNorm(d, eps=LN_EPS)
        # (3) box-guided high-resolution pixel fusion
        self.stem2 = ConvGnGelu(3, pd // 2, stride=2)  # stride 2
        self.stem4 = ConvGnGelu(pd // 2, pd, stride=2)  # stride 4: F_cnn4
        self.stem8 = ConvGnGelu(pd, d, stride=2)  # stride 8: F_cnn8
        self.p16 = ConvGnGelu(d, d)
        self.gate = BoxGate(c.gate_alpha, c.gate_expand)
        # The 1x1 fusion conv over concat[up2(P), M * F_cnn, M] is kept as its three column blocks:
        # W_a up2(P) + b + M * (W_b F_cnn + w_g), which is the same function, but W_a and W_b run once
        # per image instead of once per query (M is a per-pixel scalar, so it commutes with W_b).
        self.up8_feat = nn.Conv2d(d, d, 1)
        self.up8_cnn = nn.Conv2d(d, d, 1, bias=False)
        self.up8_gate = nn.Parameter(torch.zeros(1, d, 1, 1))
        self.up8_conv = ConvGnGelu(d, d)
        self.up4_feat = nn.Conv2d(d, pd, 1)
        self.up4_cnn = nn.Conv2d(pd, pd, 1, bias=False)
        self.up4_gate = nn.Parameter(torch.zeros(1, pd, 1, 1))
        self.up4_conv = ConvGnGelu(pd, pd)
        # (4) iterative mask-aware query refinement
        self.kernel_fc1 = Linear(d, d)
        self.kernel_fc2 = Linear(d, d)
        self.kernel_fc3 = Linear(d, pd)
        self.ref_fc1 = Linear(pd, d)
        self.ref_fc2 = Linear(d, d)
        self.ref_norm = nn.LayerNorm(d, eps=LN_EPS)
        self.iou_fc1 = Linear(d, d)
        self.iou_fc2 = Linear(d, 1)
        nn.init.kaiming_uniform_(self.up8_gate, a=math.sqrt(5))
        nn.init.kaiming_uniform_(self.up4_gate, a=math.sqrt(5))

    def _kernel(self, q: torch.Tensor) -> torch.Tensor:
        # [Q, d] -> [Q, pd] dynamic kernel (shared by both passes)
        return self.kernel_fc3(F.relu(self.kernel_fc2(F.relu(self.kernel_fc1(q)))))

    def _mask(self, q: torch.Tensor, pixels: torch.Tensor) -> torch.Tensor:
        # q [Q, d], pixels [Q, pd, h*w] -> logits [Q, 1, h*w]
        return torch.matmul(self._kernel(q).unsqueeze(1), pixels)

    def forward(
        self,
        vit_ms: torch.Tensor,  # [L, P, Cv] ViT taps, merge-window order
        mm_embeds: torch.Tensor,  # [M, H] LLM final-norm states at the image-pad rows, row-major merged grid
        query_hidden: torch.Tensor,  # [Q, H] T_seg
        boxes: torch.Tensor,  # [Q, 4] x1, y1, x2, y2 in [0, 1]
        gate_boxes: torch.Tensor,  # [Q, K, 4]
        gate_valid: torch.Tensor,  # [Q, K]
        hr_image: torch.Tensor,  # [1, 3, 16 gh, 16 gw] in [-1, 1]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        c = self.config
        d = c.dim
        gh, gw = hr_image.shape[2] // 16, hr_image.shape[3] // 16

        # (1) memory. Each level's lateral projection runs on the rows as they come (a GEMM), then the
        # d-wide result goes from merge-window order [gh/2, gw/2, 2(mh), 2(mw), d] to NCHW [1, d, gh, gw]
        # (reordering the Cv-wide input instead moved 4x the bytes at 2B widths: 15 % of the stage).
        levels = [
            adapter(
                adapter.project(vit_ms[i])  # [P, d]
                .reshape(gh // 2, gw // 2, 2, 2, d)
                .permute(4, 0, 2, 1, 3)
                .reshape(1, d, gh, gw)
            )
            for i, adapter in enumerate(self.adapters)
        ]  # L x [1, d, gh, gw]
        fused = self.fuse_norm(self.fuse(torch.cat(levels, dim=1)))  # [1, d, gh, gw]
        mm = self.mm_proj(mm_embeds).reshape(1, gh // 2, gw // 2, d).permute(0, 3, 1, 2)  # [1, d, gh/2, gw/2]
        pos = F.interpolate(
            self.pos_table, size=(gh, gw), mode="bilinear", align_corners=True
        )  # [1, d, gh, gw]
        memory_map = _up2(mm) + fused + pos  # [1, d, gh, gw]
        memory = memory_map.flatten(2)[0].transpose(0, 1)  # [P, d] row-major

        # (2) query
        box_code = self.box_fc2(F.gelu(self.box_fc1(self.fourier(boxes))))  # [Q, d]
        q = self.query_norm(box_code + self.seg_proj(query_hidden))  # Q0 [Q, d]
        for layer in self.layers:
            q = layer(q, memory)
        q1 = self.final_norm(q)  # [Q, d]

        # (3) pixels
        cnn4 = self.stem4(self.stem2(hr_image))  # [1, pd, 4gh, 4gw]
        cnn8 = self.stem8(cnn4)  # [1, d, 2gh, 2gw]
        min_w = GATE_MIN_PATCHES / gw + boxes.new_zeros(())  # [] normalised
        min_h = GATE_MIN_PATCHES / gh + boxes.new_zeros(())
        gate8 = self.gate(gate_boxes, gate_valid, cnn8, min_w, min_h)  # [Q, 1, 2gh, 2gw]
        gate4 = self.gate(gate_boxes, gate_valid, cnn4, min_w, min_h)  # [Q, 1, 4gh, 4gw]
        p16 = self.p16(memory_map)  # [1, d, gh, gw]
        x8 = self.up8_feat(_up2(p16)) + gate8 * (self.up8_cnn(cnn8) + self.up8_gate)  # [Q, d, 2gh, 2gw]
        p8 = self.up8_conv(x8)  # [Q, d, 2gh, 2gw]
        x4 = self.up4_feat(_up2(p8)) + gate4 * (self.up4_cnn(cnn4) + self.up4_gate)  # [Q, pd, 4gh, 4gw]
        pixel_map = self.up4_conv(x4)  # F_pixel [Q, pd, 4gh, 4gw]
        pixels = pixel_map.flatten(2)  # [Q, pd, h*w]

        # (4) refinement
        m1 = self._mask(q1, pixels)  # [Q, 1, h*w]
        weight = torch.sigmoid(m1)  # soft mask
        target = torch.matmul(pixels, weight.transpose(1, 2)).squeeze(-1)  # [Q, pd]
        target = target / (weight.sum(dim=-1) + POOL_EPS)  # F_tar [Q, pd]
        q2 = self.ref_norm(q1 + self.ref_fc2(F.gelu(self.ref_fc1(target))))  # [Q, d]
        m2 = self._mask(q2, pixels)  # [Q, 1, h*w]
        iou = self.iou_fc2(F.gelu(self.iou_fc1(q2)))  # [Q, 1]

        # Reshape to [Q, h, w] then Unsqueeze, so the exported graph keeps the static 1 in its shape.
        out_shape = (-1, pixel_map.shape[2], pixel_map.shape[3])
        return m2.reshape(out_shape).unsqueeze(1), m1.reshape(out_shape).unsqueeze(1), iou


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------------------------------
# checkpoint


def save_mask_decoder_checkpoint(model: MaskDecoder, path: Path) -> None:
    """One .safetensors file: the state dict (f32) plus the config JSON in the header metadata."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to(torch.float32).contiguous().cpu() for k, v in model.state_dict().items()}
    metadata = {
        "format": CHECKPOINT_FORMAT,
        "format_version": str(CHECKPOINT_FORMAT_VERSION),
        "config": json.dumps(model.config.to_dict()),
    }
    save_file(tensors, str(path), metadata=metadata)


def load_mask_decoder_checkpoint(path: Path) -> MaskDecoder:
    """Rebuild a MaskDecoder from save_mask_decoder_checkpoint's file (eval mode, f32)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file, safe_open

    path = Path(path)
    if not path.is_file():
        raise ModelkitError("CHECKPOINT_INVALID", f"mask decoder checkpoint {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise ModelkitError(
            "CHECKPOINT_INVALID", f"{path} is not a readable .safetensors file: {exc}"
        ) from exc
    if metadata.get("format") != CHECKPOINT_FORMAT or "config" not in metadata:
        raise ModelkitError(
            "CHECKPOINT_INVALID",
            f"{path} is not a mask decoder checkpoint (metadata format {metadata.get('format')!r}, "
            f"expected {CHECKPOINT_FORMAT!r}); write it with save_mask_decoder_checkpoint",
        )
    version = metadata.get("format_version")
    if version != str(CHECKPOINT_FORMAT_VERSION):
        raise ModelkitError(
            "CHECKPOINT_INVALID",
            f"{path} has mask decoder format_version {version}; "
            f"this modelkit reads {CHECKPOINT_FORMAT_VERSION}",
        )
    try:
        config = MaskDecoderConfig.from_dict(json.loads(metadata["config"]))
    except (json.JSONDecodeError, TypeError) as exc:
        raise ModelkitError("CHECKPOINT_INVALID", f"{path}: unreadable mask decoder config: {exc}") from exc
    model = MaskDecoder(config)
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    if missing or unexpected:
        raise ModelkitError(
            "CHECKPOINT_INVALID",
            f"{path}: tensors do not match the config (missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]})",
        )
    return model.eval()


def check_mask_decoder_matches(cfg: MaskDecoderConfig, vision_hidden: int, text_hidden: int) -> None:
    """Raise MASK_DECODER_MISMATCH unless the mask decoder was built for this base model's widths."""
    problems = []
    if cfg.vision_hidden != vision_hidden:
        problems.append(
            f"vision width {cfg.vision_hidden} (the base model's ViT hidden_size is {vision_hidden})"
        )
    if cfg.text_hidden != text_hidden:
        problems.append(f"text width {cfg.text_hidden} (the base model's text hidden_size is {text_hidden})")
    if problems:
        raise ModelkitError(
            "MASK_DECODER_MISMATCH",
            "the mask decoder was built for "
            + " and ".join(problems)
            + "; use a mask decoder trained on this base model (a 2B/4B/8B one only fits its own size), "
            "or pass the base model the mask decoder was trained on",
        )


# ---------------------------------------------------------------------------------------------------
# losses


def _dice_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    # logits, target [Q, 1, h, w] -> [] mean over queries of 1 - soft Dice (smoothing 1)
    prob = torch.sigmoid(logits).flatten(1)
    t = target.flatten(1)
    return (1.0 - (2.0 * (prob * t).sum(1) + 1.0) / (prob.sum(1) + t.sum(1) + 1.0)).mean()


def mask_losses(
    mask_logits: torch.Tensor,  # [Q, 1, h, w] second pass M2
    mask_logits_coarse: torch.Tensor,  # [Q, 1, h, w] first pass M1
    iou_pred: torch.Tensor,  # [Q, 1]
    target_masks: torch.Tensor,  # [Q, 1, Ht, Wt] or [Q, Ht, Wt], values in [0, 1]
    coarse_weight: float = 0.5,
    iou_weight: float = 1.0,
) -> dict[str, torch.Tensor]:
    """BCE + Dice on M2 and (deep supervision, weighted by coarse_weight) on M1, plus the IoU head's
    MSE against the IoU of (sigmoid(M2) > 0.5) with the target. A target at another resolution is
    area-resized to the logits' grid (soft fractions at the edges). Returns the parts and `loss`."""
    target = target_masks.to(mask_logits.dtype)
    if target.dim() == 3:
        target = target.unsqueeze(1)
    if target.shape[-2:] != mask_logits.shape[-2:]:
        target = F.interpolate(target, size=mask_logits.shape[-2:], mode="area")
    bce = F.binary_cross_entropy_with_logits(mask_logits, target)
    dice = _dice_loss(mask_logits, target)
    bce_c = F.binary_cross_entropy_with_logits(mask_logits_coarse, target)
    dice_c = _dice_loss(mask_logits_coarse, target)
    with torch.no_grad():
        pred = (mask_logits > 0).flatten(1).float()  # sigmoid > 0.5
        hard = (target > 0.5).flatten(1).float()
        inter = (pred * hard).sum(1)
        union = (pred + hard).clamp(max=1).sum(1)
        iou = torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))  # [Q]
    iou_mse = F.mse_loss(iou_pred.reshape(-1), iou)
    loss = bce + dice + coarse_weight * (bce_c + dice_c) + iou_weight * iou_mse
    return {
        "loss": loss,
        "bce": bce,
        "dice": dice,
        "bce_coarse": bce_c,
        "dice_coarse": dice_c,
        "iou_mse": iou_mse,
        "iou": iou.mean(),
    }
