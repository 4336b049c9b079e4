"""3-axis (T, H, W) position ids for Qwen3-VL's M-RoPE, images only.

Same result as transformers' `Qwen3VLModel.get_rope_index` for a single unpadded sequence: text tokens
count up on all three axes; the M merged tokens of an image with merged grid (t, gh, gw) get
(start + ti, start + hi, start + wi) in row-major order, and the text after it resumes at
start + max(gh, gw). The TypeScript runtime (src/runtime/rope.ts) ports this function.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .errors import ModelkitError


def rope_index(
    input_ids: np.ndarray,
    image_grid_thw: Sequence[tuple[int, int, int]],
    image_token_id: int,
    vision_start_token_id: int,
    merge: int = 2,
) -> tuple[np.ndarray, int]:
    """Position ids [3, S] int64 for one prompt, and rope_delta = max position + 1 - S.

    `input_ids` [S] already holds the expanded image pads: each `<|vision_start|>` followed by an
    image pad starts an image block of exactly t * (h/merge) * (w/merge) pads, which takes the next
    row of `image_grid_thw` (patch grid, before merging). Decode steps then use position
    n + rope_delta on all three axes for the token at cache index n.
    """
    ids = np.asarray(input_ids).reshape(-1)
    seq_len = int(ids.shape[0])
    out = np.zeros((3, seq_len), dtype=np.int64)  # [3, S] rows T, H, W
    grids = list(image_grid_thw)
    next_grid = 0
    next_pos = 0  # position the next text token gets
    i = 0
    while i < seq_len:
        token = int(ids[i])
        if token == image_token_id:
            if i == 0 or int(ids[i - 1]) != vision_start_token_id:
                raise ModelkitError(
                    "INVALID_INPUT",
                    f"image pad at index {i} does not follow <|vision_start|> ({vision_start_token_id})",
                )
            if next_grid >= len(grids):
                raise ModelkitError(
                    "INVALID_INPUT",
                    f"the prompt has more image blocks than image_grid_thw rows ({len(grids)})",
                )
            t, h, w = (int(v) for v in grids[next_grid])
            next_grid += 1
            if h % merge or w % merge:
                raise ModelkitError(
                    "INVALID_INPUT", f"grid {(t, h, w)} is not divisible by merge size {merge}"
                )
            gh, gw = h // merge, w // merge
            count = t * gh * gw
            block = ids[i : i + count]
            if block.shape[0] != count or not np.all(block == image_token_id):
                raise ModelkitError(
                    "INVALID_INPUT",
                    f"image block at index {i} must hold {count} image pads for grid {(t, h, w)}",
                )
            ti, hi, wi = np.meshgrid(np.arange(t), np.arange(gh), np.arange(gw), indexing="ij")  # [t, gh, gw]
            out[0, i : i + count] = next_pos + ti.reshape(-1)
            out[1, i : i + count] = next_pos + hi.reshape(-1)
            out[2, i : i + count] = next_pos + wi.reshape(-1)
            # The text after an image resumes past the image's largest spatial extent.
            next_pos += max(gh, gw)
            i += count
            continue
        out[:, i] = next_pos
        next_pos += 1
        i += 1
    if next_grid != len(grids):
        raise ModelkitError(
            "INVALID_INPUT",
            f"image_grid_thw has {len(grids)} rows but the prompt has {next_grid} image blocks",
        )
    rope_delta = int(out.max()) + 1 - seq_len if seq_len else 0
    return out, rope_delta
