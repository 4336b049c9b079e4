"""Host-side inputs of `vision_encoder.onnx`: pos-embed interpolation taps and ViT rotary tables.

Qwen3-VL's vision tower computes these from `grid_thw` with data-dependent index logic that does not
belong in an ONNX graph, so the host computes them and feeds them in (spec 3.2, 3.3 and appendix A).
This module is the reference the TypeScript runtime ports (`src/runtime/vision-inputs.ts`); every
float operation below is a float32 operation in the same order as transformers 5.23
(`vision_utils.get_vision_interpolation_indices_and_weights`, `Qwen3VLVisionRotaryEmbedding`), so
the results are bit-identical to what the HF model computes internally. In TypeScript, wrap each
step in `Math.fround` to get the same float32 rounding.

Every row is one patch in merge-window order (spec 2.3): windows of merge x merge patches, windows
row-major over the (grid_h / merge, grid_w / merge) merged grid, patches row-major inside a window.
"""

from __future__ import annotations

import math

import numpy as np

from .errors import ModelkitError

F32 = np.float32


def merge_window_positions(grid_h: int, grid_w: int, merge: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """(row, col) patch coordinates of every patch in merge-window order, each int64 [P]."""
    _check_grid(grid_h, grid_w, merge)
    p = np.arange(grid_h * grid_w, dtype=np.int64)  # [P]
    window, inner = p // (merge * merge), p % (merge * merge)
    windows_per_row = grid_w // merge
    row = (window // windows_per_row) * merge + inner // merge  # [P]
    col = (window % windows_per_row) * merge + inner % merge  # [P]
    return row, col


def _axis_taps(
    pos: np.ndarray, size: int, side: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Bilinear taps (align_corners=True) on one axis of the side x side table, in float32 like HF.

    src = pos * (side - 1) / (size - 1)   (f32; size 1 maps everything to 0)
    taps floor(src) and floor(src) + 1 clamped to side - 1; the weights are 1 - |src - tap| where
    HF evaluates |src - tap| as (src - floor) - offset, so w0 = 1 - frac and w1 = 1 - (1 - frac),
    both rounded to f32 (w1 is not always bit-equal to frac).
    """
    src = (pos.astype(F32) * F32(side - 1)) / F32(max(size - 1, 1))  # [P] f32
    floor = np.floor(src)  # [P] f32
    frac = src - floor  # exact
    w0 = F32(1) - frac  # [P] f32
    w1 = F32(1) - np.abs(frac - F32(1))  # [P] f32, = 1 - fl(1 - frac)
    t0 = floor.astype(np.int64)
    t1 = np.minimum(t0 + 1, side - 1)
    return t0, t1, w0, w1


def pos_embed_taps(
    grid_h: int, grid_w: int, num_position_embeddings: int, merge: int = 2
) -> tuple[np.ndarray, np.ndarray]:
    """Corner rows of the learned position table and their weights, int64 [P, 4] and float32 [P, 4].

    Corner order is (h0, w0), (h0, w1), (h1, w0), (h1, w1); the graph computes
    pe[p] = sum_k weight[p, k] * table[idx[p, k]].
    """
    side = math.isqrt(num_position_embeddings)
    if side * side != num_position_embeddings:
        raise ModelkitError(
            "INVALID_CONFIG",
            "num_position_embeddings must be a square (48*48 = 2304 in Qwen3-VL), "
            f"got {num_position_embeddings}",
        )
    row, col = merge_window_positions(grid_h, grid_w, merge)
    h0, h1, wh0, wh1 = _axis_taps(row, grid_h, side)
    c0, c1, wc0, wc1 = _axis_taps(col, grid_w, side)
    idx = np.stack([h0 * side + c0, h0 * side + c1, h1 * side + c0, h1 * side + c1], axis=1)  # [P, 4]
    weight = np.stack([wh0 * wc0, wh0 * wc1, wh1 * wc0, wh1 * wc1], axis=1).astype(F32)  # [P, 4]
    return idx.astype(np.int64), weight


def vision_inv_freq(vision_head_dim: int, rope_theta: float = 10000.0) -> np.ndarray:
    """float32 [dv / 4] inverse frequencies of the ViT's axial rotary (one set shared by rows and cols).

    HF: 1 / theta ** (arange(0, dv/2, 2) / (dv/2)) in float32. The exponent is an f32 division, the
    power is evaluated in double and rounded to f32 (this matches torch's f32 pow bit for bit for
    dv in 16..128), and the reciprocal is an f32 division.
    """
    if vision_head_dim % 4 != 0:
        raise ModelkitError(
            "INVALID_CONFIG", f"vision head_dim must be a multiple of 4, got {vision_head_dim}"
        )
    spatial = vision_head_dim // 2
    exponent = np.arange(0, spatial, 2, dtype=F32) / F32(spatial)  # [dv/4] f32
    power = np.power(float(rope_theta), exponent.astype(np.float64)).astype(F32)
    return F32(1) / power  # [dv/4] f32


def rotary_tables(
    grid_h: int, grid_w: int, vision_head_dim: int, merge: int = 2, rope_theta: float = 10000.0
) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin, each float32 [P, dv], of the ViT 2-D rotary in merge-window order.

    Per patch the angles are [row * f, col * f, row * f, col * f] with f = vision_inv_freq (each
    product rounded to f32, as HF multiplies in f32); cos/sin are evaluated in double and rounded to
    f32, which is within one f32 ulp of torch's f32 cos/sin.
    """
    row, col = merge_window_positions(grid_h, grid_w, merge)
    inv_freq = vision_inv_freq(vision_head_dim, rope_theta)  # [dv/4]
    ang_h = row.astype(F32)[:, None] * inv_freq[None, :]  # [P, dv/4] f32
    ang_w = col.astype(F32)[:, None] * inv_freq[None, :]  # [P, dv/4] f32
    half = np.concatenate([ang_h, ang_w], axis=1).astype(np.float64)  # [P, dv/2]
    emb = np.concatenate([half, half], axis=1)  # [P, dv]
    return np.cos(emb).astype(F32), np.sin(emb).astype(F32)


def vision_host_inputs(
    grid_h: int,
    grid_w: int,
    num_position_embeddings: int,
    vision_head_dim: int,
    merge: int = 2,
    rope_theta: float = 10000.0,
) -> dict[str, np.ndarray]:
    """All host-computed inputs of vision_encoder.onnx for one image of grid_h x grid_w patches.

    Returns `pos_embed_idx` int64 [P, 4], `pos_embed_weight` f32 [P, 4], `rotary_cos` and
    `rotary_sin` f32 [P, dv], P = grid_h * grid_w, rows in merge-window order.
    """
    idx, weight = pos_embed_taps(grid_h, grid_w, num_position_embeddings, merge)
    cos, sin = rotary_tables(grid_h, grid_w, vision_head_dim, merge, rope_theta)
    return {"pos_embed_idx": idx, "pos_embed_weight": weight, "rotary_cos": cos, "rotary_sin": sin}


def _check_grid(grid_h: int, grid_w: int, merge: int) -> None:
    if merge < 1 or grid_h < merge or grid_w < merge or grid_h % merge or grid_w % merge:
        raise ModelkitError(
            "INVALID_INPUT",
            f"grid {grid_h}x{grid_w} patches must be positive multiples of the merge size {merge} "
            "(smart_resize makes both sides multiples of patch_size * merge)",
        )
