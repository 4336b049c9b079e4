"""Reference image preprocessing for golden fixtures: PIL decode + transformers' Qwen2-VL processor.

The TypeScript runtime (src/runtime/preprocess.ts) must reproduce these tensors. The steps:
decode, apply the EXIF orientation, composite any alpha onto white, convert to RGB, then
`Qwen2VLImageProcessorPil` (smart_resize with factor 32, PIL bicubic on uint8, x/255, (x-0.5)/0.5,
patchify in merge-window order). `hr_image` is the same resized, normalised image before patchify.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from .errors import ModelkitError

PATCH_SIZE = 16
MERGE_SIZE = 2
TEMPORAL_PATCH_SIZE = 2
IMAGE_MEAN = (0.5, 0.5, 0.5)
IMAGE_STD = (0.5, 0.5, 0.5)
ALPHA_BACKGROUND = (255, 255, 255)


@dataclass(frozen=True)
class PreprocessedImage:
    pixel_values: np.ndarray  # [P, 1536] f32, merge-window order
    image_grid_thw: np.ndarray  # [1, 3] i64: (1, gh, gw)
    hr_image: np.ndarray  # [1, 3, 16gh, 16gw] f32 in [-1, 1]
    original_hw: tuple[int, int]  # (H0, W0) after EXIF orientation
    resized_hw: tuple[int, int]  # (Hr, Wr)


def load_rgb(path: Path) -> Image.Image:
    """Decode an image file the way the runtime must: EXIF orientation, alpha over white, RGB."""
    try:
        with Image.open(path) as img:
            img.load()
            oriented = ImageOps.exif_transpose(img)
    except (OSError, SyntaxError) as e:
        raise ModelkitError("IMAGE_DECODE_FAILED", f"could not decode {path}: {e}") from e
    return to_rgb(oriented)


def to_rgb(img: Image.Image) -> Image.Image:
    # Palette images may carry transparency too; go through RGBA so it is composited, not dropped.
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*ALPHA_BACKGROUND, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def make_processor(min_pixels: int, max_pixels: int) -> Qwen2VLImageProcessorPil:
    return Qwen2VLImageProcessorPil(
        min_pixels=min_pixels,
        max_pixels=max_pixels,
        patch_size=PATCH_SIZE,
        merge_size=MERGE_SIZE,
        temporal_patch_size=TEMPORAL_PATCH_SIZE,
        image_mean=list(IMAGE_MEAN),
        image_std=list(IMAGE_STD),
    )


def unpatchify(pixel_values: np.ndarray, grid_h: int, grid_w: int) -> np.ndarray:
    """Invert the merge-window patch order: [P, 1536] -> [1, 3, 16gh, 16gw] (temporal slice 0)."""
    p, m, t = PATCH_SIZE, MERGE_SIZE, TEMPORAL_PATCH_SIZE
    x = pixel_values.reshape(grid_h // m, grid_w // m, m, m, 3, t, p, p)  # (bh, bw, mh, mw, C, T, py, px)
    x = x[:, :, :, :, :, 0]  # both temporal slices are the same frame
    x = x.transpose(4, 0, 2, 5, 1, 3, 6)  # (C, bh, mh, py, bw, mw, px)
    return np.ascontiguousarray(x.reshape(1, 3, grid_h * p, grid_w * p))


def preprocess_image(
    img: Image.Image, min_pixels: int, max_pixels: int, *, check: bool = True
) -> PreprocessedImage:
    """Run the HF processor on an RGB image and derive `hr_image`, checking it against the patches
    (`check=False` skips the independent re-computation, for timing)."""
    if img.mode != "RGB":
        raise ModelkitError("INVALID_INPUT", f"preprocess_image needs an RGB image, got mode {img.mode}")
    out = make_processor(min_pixels, max_pixels)(images=[img], return_tensors="np")
    pixel_values = np.ascontiguousarray(out["pixel_values"], dtype=np.float32)  # [P, 1536]
    grid = np.asarray(out["image_grid_thw"], dtype=np.int64)  # [1, 3]
    _, gh, gw = (int(v) for v in grid[0])
    if pixel_values.shape != (gh * gw, 3 * TEMPORAL_PATCH_SIZE * PATCH_SIZE * PATCH_SIZE):
        raise AssertionError(f"unexpected pixel_values shape {pixel_values.shape} for grid {gh}x{gw}")
    hr_image = unpatchify(pixel_values, gh, gw)  # [1, 3, Hr, Wr]
    hr, wr = gh * PATCH_SIZE, gw * PATCH_SIZE
    if not check:
        return PreprocessedImage(pixel_values, grid, hr_image, (img.height, img.width), (hr, wr))
    per_frame = pixel_values.reshape(gh * gw, 3, TEMPORAL_PATCH_SIZE, PATCH_SIZE * PATCH_SIZE)
    if not np.array_equal(per_frame[:, :, 0], per_frame[:, :, 1]):
        raise AssertionError("the two temporal slices of a still image differ")

    # Independent check of the layout: resize + normalise by hand and compare with the un-patchified
    # processor output (the processor resizes uint8 with PIL bicubic).
    resized = np.asarray(img.resize((wr, hr), Image.Resampling.BICUBIC), dtype=np.float32)  # [Hr, Wr, 3]
    mean = np.asarray(IMAGE_MEAN, dtype=np.float32)
    std = np.asarray(IMAGE_STD, dtype=np.float32)
    by_hand = ((resized / 255.0 - mean) / std).transpose(2, 0, 1)[None]
    err = float(np.abs(by_hand - hr_image).max())
    if err > 1e-6:
        raise AssertionError(f"un-patchified pixel_values differ from the resized image by {err}")
    return PreprocessedImage(
        pixel_values=pixel_values,
        image_grid_thw=grid,
        hr_image=hr_image,
        original_hw=(img.height, img.width),
        resized_hw=(hr, wr),
    )
