"""Deterministic synthetic test images (coloured shapes on a gradient), drawn with PIL.

Each size is picked to exercise one preprocessing path of smart_resize (factor 32) while keeping the
fixtures small (every patch costs ~10 kB of golden tensors):
- `halfeven_400x208.png`: 400/32 = 12.5 and 208/32 = 6.5 both round half to even (Python `round`),
  so HF resizes to 384x192; a half-up rounding would give 416x224.
- `tall_144x520.png`: aspect 3.6, 520/32 = 16.25 -> 512, 144/32 = 4.5 -> 128 (half to even again),
  exactly min_pixels = 65536 (not scaled).
- `small_rgba_120x90.png`: RGBA with transparent and half-transparent regions (composited on white),
  smaller than min_pixels so smart_resize scales it UP to 320x224.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw


def _gradient(
    width: int, height: int, top_left: tuple[int, int, int], bottom_right: tuple[int, int, int]
) -> Image.Image:
    # Diagonal gradient: t = (x/W + y/H) / 2, computed in float64 then rounded, so it is exact anywhere.
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float64)
    t = (xs / max(width - 1, 1) + ys / max(height - 1, 1)) / 2.0  # [H, W]
    a = np.asarray(top_left, dtype=np.float64)
    b = np.asarray(bottom_right, dtype=np.float64)
    rgb = a[None, None, :] * (1.0 - t[..., None]) + b[None, None, :] * t[..., None]  # [H, W, 3]
    return Image.fromarray(np.rint(rgb).astype(np.uint8), mode="RGB")


def halfeven_scene() -> Image.Image:
    img = _gradient(400, 208, (40, 60, 120), (200, 220, 250))
    d = ImageDraw.Draw(img)
    d.rectangle((30, 40, 150, 170), fill=(220, 40, 40))  # red square-ish box
    d.ellipse((190, 30, 300, 140), fill=(40, 180, 60))  # green circle
    d.polygon([(320, 180), (390, 180), (355, 90)], fill=(250, 210, 30))  # yellow triangle
    d.line((10, 195, 390, 195), fill=(0, 0, 0), width=3)
    return img


def tall_scene() -> Image.Image:
    img = _gradient(144, 520, (250, 240, 200), (60, 30, 90))
    d = ImageDraw.Draw(img)
    d.ellipse((20, 30, 124, 134), fill=(30, 90, 220))  # blue circle at the top
    d.rectangle((40, 220, 110, 380), fill=(230, 120, 20))  # orange bar in the middle
    d.polygon([(10, 500), (134, 500), (72, 420)], fill=(20, 160, 160))  # teal triangle at the bottom
    return img


def small_rgba_scene() -> Image.Image:
    base = _gradient(120, 90, (10, 120, 40), (240, 240, 240)).convert("RGBA")
    px = np.asarray(base).copy()  # [90, 120, 4]
    px[:, :30, 3] = 0  # left strip fully transparent -> white after compositing
    px[:, 30:60, 3] = 128  # half-transparent strip -> blended with white
    img = Image.fromarray(px, mode="RGBA")
    d = ImageDraw.Draw(img)
    d.ellipse((50, 15, 110, 75), fill=(200, 30, 160, 255))  # opaque magenta disc
    d.rectangle((5, 60, 45, 85), fill=(20, 20, 20, 200))  # mostly opaque dark box over transparency
    return img


FIXTURE_IMAGES: dict[str, Callable[[], Image.Image]] = {
    "halfeven_400x208.png": halfeven_scene,
    "tall_144x520.png": tall_scene,
    "small_rgba_120x90.png": small_rgba_scene,
}


def write_fixture_images(out_dir: Path) -> dict[str, Path]:
    """Write every fixture image as PNG (re-running writes the same pixels)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    for name, draw in FIXTURE_IMAGES.items():
        path = out_dir / name
        draw().save(path, format="PNG", optimize=False, compress_level=9)
        paths[name] = path
    return paths
