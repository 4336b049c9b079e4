"""The synthetic shapes world (modelkit.synth) rendered in batches by torch tensor ops, on any device.

synth.py draws one scene at a time with PIL and float64 numpy on a CPU; streaming training on a GPU
waited on that. Here the work is split so that only the pixels move to the device:

- `sample_layout(rng)`: the scene's description (size, background, objects with their shape,
  colour, size, side, centre and colour jitter) drawn by synth.py's own helpers with the same RNG
  calls in the same order as `synth.render_scene`, so the distribution is synth.py's by
  construction. `exact=True` also draws the background noise from `rng` as render_scene does: the
  same seed then gives synth.py's scene, pixel for pixel (tests). By default the noise is left to the
  device's generator and a layout costs tens of microseconds.
- `object_geometry`: each object's outline as PIL receives it in `synth._coverage` (integer
  vertices on the 4x canvas, the ellipse's integer bounding box) and the window it is drawn in.
- `rasterise`: per-object coverage by PIL's own rules, vectorised: the polygon filler's scanline
  spans (float32 edge intersections, ROUND_UP / ROUND_DOWN ends, rows from the top to the bottom
  vertex), the ellipse's integer walk (a per-size row table), then the 4x4 BOX filter with PIL's two
  rounding passes (horizontal, then vertical). Masks ("covers at least half": 8 of 16 subpixels or
  more) and tight boxes follow from it as in synth.py.
- `render`: backgrounds (plain / gradient / noisy), compositing and rounding of a batch of scenes of
  different sizes on one padded [S, 3, Hmax, Wmax] canvas.
- `pixel_bytes`: the training preprocessing of train_vlm (crop, smart_resize'd bicubic resize in two
  rounded passes as PIL, 16-px patches in merge-window order) on the device.

Tests: tests/test_synth_torch.py (coverage, pixels, annotations and statistics against synth.py).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

from . import synth
from .errors import ModelkitError

SHAPE_IDS = {s: i for i, s in enumerate(synth.SHAPES)}
BACKGROUND_IDS = {b: i for i, b in enumerate(synth.BACKGROUNDS)}
S = synth.SUPERSAMPLE
PAD = 2  # window margin of synth._coverage
MAX_VERTS = 10  # the star
# PIL's BOX 4->1 horizontal pass on a 0/255 canvas: round(n * 255 / 4) for n covered subpixels.
BOX_H = (0, 64, 128, 191, 255)
BIG = 2**28  # an empty span is [BIG, -BIG]


# --------------------------------------------------------------------------------------------------
# Layout: what synth.render_scene draws from its generator, without the pixels


@dataclass(frozen=True)
class ObjectLayout:
    shape: str
    colour: str
    size: str
    cx: float
    cy: float
    side: float
    rgb: tuple[float, float, float]  # the named colour + jitter, clipped (what synth composites)


@dataclass(frozen=True)
class SceneLayout:
    width: int
    height: int
    background: str
    bg_a: tuple[float, float, float]
    bg_b: tuple[float, float, float]  # = bg_a for plain
    angle: float  # gradient direction (0 for plain)
    sigma: float  # noise level (0 unless noisy)
    objects: tuple[ObjectLayout, ...]
    noise: np.ndarray | None = None  # [H, W, 3] f64, only with exact=True and a noisy background


def sample_layout(
    rng: np.random.Generator,
    width: int | None = None,
    height: int | None = None,
    *,
    n_objects: int | None = None,
    background: str | None = None,
    exact: bool = False,
) -> SceneLayout:
    """The description of one scene, drawn exactly as `synth.render_scene` draws it (same helpers,
    same calls, same order; see the module doc for `exact`)."""
    w, h = synth._pick_size(rng, width, height)
    if n_objects is None:
        n_objects = int(rng.integers(1, synth.MAX_OBJECTS + 1))
    elif not 1 <= n_objects <= synth.MAX_OBJECTS:
        raise ModelkitError(
            "INVALID_INPUT", f"Expected n_objects 1..{synth.MAX_OBJECTS} but received {n_objects}"
        )
    if background is None:
        background = synth.BACKGROUNDS[int(rng.integers(len(synth.BACKGROUNDS)))]
    elif background not in synth.BACKGROUNDS:
        raise ModelkitError(
            "INVALID_INPUT", f"Expected background in {synth.BACKGROUNDS} but received {background!r}"
        )
    # synth._background's draws
    a = synth._light_colour(rng)
    b, angle, sigma, noise = a, 0.0, 0.0, None
    if background != "plain":
        b = synth._light_colour(rng)
        angle = float(rng.uniform(0.0, 2.0 * math.pi))
        if background == "noisy":
            sigma = float(rng.uniform(3.0, 7.0))
            if exact:
                noise = rng.normal(0.0, sigma, size=(h, w, 3))

    short = min(w, h)
    gap = max(4.0, 0.03 * short)
    margin = 2.0
    footprints: list[tuple[float, float, float, float]] = []
    attrs: list[tuple[str, str, str]] = []
    objects: list[ObjectLayout] = []
    for _ in range(n_objects):
        shape, colour, size = synth._pick_attributes(rng, attrs)
        side = synth._object_side(rng, size, short)
        placed = synth._place(rng, side, w, h, margin, gap, footprints)
        if placed is None:
            continue
        cx, cy, fp = placed
        jitter = rng.integers(-12, 13, size=3)
        col = np.clip(np.asarray(synth.COLOURS[colour], dtype=np.float64) + jitter, 0.0, 255.0)
        footprints.append(fp)
        attrs.append((shape, colour, size))
        objects.append(ObjectLayout(shape, colour, size, cx, cy, side, (col[0], col[1], col[2])))
    return SceneLayout(
        width=w,
        height=h,
        background=background,
        bg_a=(float(a[0]), float(a[1]), float(a[2])),
        bg_b=(float(b[0]), float(b[1]), float(b[2])),
        angle=angle,
        sigma=sigma,
        objects=tuple(objects),
        noise=noise,
    )


# --------------------------------------------------------------------------------------------------
# Geometry: the integer outlines PIL draws in synth._coverage


@dataclass(frozen=True)
class Geometry:
    window: tuple[int, int, int, int]  # x0, y0, x1, y1 in image pixels (x1, y1 exclusive)
    verts: tuple[tuple[int, int], ...]  # polygon vertices on the window's 4x canvas; () for a circle
    ellipse: tuple[int, int, int, int]  # circle: PIL's integer box x0, y0, x1, y1 on the canvas


def object_geometry(o: ObjectLayout, width: int, height: int) -> Geometry:
    """The window and outline of `synth._coverage(o.shape, o.cx, o.cy, o.side, width, height)`, with
    its float -> int conversions (PIL truncates; every coordinate here is positive)."""
    cx, cy, side = o.cx, o.cy, o.side
    x0 = max(0, math.floor(cx - side / 2.0) - PAD)
    y0 = max(0, math.floor(cy - side / 2.0) - PAD)
    x1 = min(width, math.ceil(cx + side / 2.0) + PAD)
    y1 = min(height, math.ceil(cy + side / 2.0) + PAD)
    lx, ly = cx - x0, cy - y0
    poly = synth._shape_outline(o.shape, lx, ly, side)
    if poly is None:
        r = side / 2.0
        box = ((lx - r) * S, (ly - r) * S, (lx + r) * S - 1, (ly + r) * S - 1)
        return Geometry((x0, y0, x1, y1), (), tuple(int(v) for v in box))  # type: ignore[arg-type]
    verts = tuple((int(u * S - 0.5), int(v * S - 0.5)) for u, v in poly)
    return Geometry((x0, y0, x1, y1), verts, (0, 0, 0, 0))


def window_coverage(o: ObjectLayout, width: int, height: int) -> tuple[tuple[int, int, int, int], np.ndarray]:
    """(window, [Hw, Ww] uint8 0..255): `synth._coverage` of the object drawn by PIL with the same
    calls, on its window only (synth.py's coverage there is this / 255; zero outside)."""
    x0 = max(0, math.floor(o.cx - o.side / 2.0) - PAD)
    y0 = max(0, math.floor(o.cy - o.side / 2.0) - PAD)
    x1 = min(width, math.ceil(o.cx + o.side / 2.0) + PAD)
    y1 = min(height, math.ceil(o.cy + o.side / 2.0) + PAD)
    canvas = Image.new("L", ((x1 - x0) * S, (y1 - y0) * S), 0)
    draw = ImageDraw.Draw(canvas)
    lx, ly = o.cx - x0, o.cy - y0
    poly = synth._shape_outline(o.shape, lx, ly, o.side)
    if poly is None:
        r = o.side / 2.0
        draw.ellipse(((lx - r) * S, (ly - r) * S, (lx + r) * S - 1, (ly + r) * S - 1), fill=255)
    else:
        draw.polygon([(u * S - 0.5, v * S - 0.5) for u, v in poly], fill=255)
    small = canvas.resize((x1 - x0, y1 - y0), Image.Resampling.BOX)
    return (x0, y0, x1, y1), np.asarray(small, dtype=np.uint8)


@functools.lru_cache(maxsize=4096)
def ellipse_rows(a: int, b: int) -> tuple[int, ...]:
    """PIL's filled ellipse (Draw.c quarter_* walk) with doubled axes a, b: for each row index j
    (doubled row Y = b % 2 + 2 j), the largest doubled X it fills (the row spans -X..X)."""
    a2, b2 = a * a, b * b
    a2b2 = a2 * b2

    def delta(x: int, y: int) -> int:
        return abs(a2 * y * y + b2 * x * x - a2b2)

    cx, cy, ex, ey = a, b % 2, a % 2, b
    out: list[int] = []
    last_y = -1
    while True:
        if cy != last_y:
            out.append(cx)
            last_y = cy
        if cx == ex and cy == ey:
            break
        nx, ny = cx, cy + 2
        nd = delta(nx, ny)
        if nx > 1:
            d = delta(cx - 2, cy + 2)
            if nd > d:
                nx, ny, nd = cx - 2, cy + 2, d
            d = delta(cx - 2, cy)
            if nd > d:
                nx, ny = cx - 2, cy
        cx, cy = nx, ny
    return tuple(out)


# --------------------------------------------------------------------------------------------------
# Packed layouts: tensors for a batch of scenes (what travels from a data worker to the device)


def pack(layouts: Sequence[SceneLayout], geoms: Sequence[Sequence[Geometry]] | None = None) -> dict[str, Any]:
    """Tensors of a batch of layouts (CPU): scene_* per scene, obj_* per object."""
    if geoms is None:
        geoms = [[object_geometry(o, sc.width, sc.height) for o in sc.objects] for sc in layouts]
    n_obj = sum(len(sc.objects) for sc in layouts)
    tables = []
    verts = np.zeros((n_obj, MAX_VERTS, 2), np.int32)
    nv = np.zeros(n_obj, np.int64)
    ell = np.zeros((n_obj, 4), np.int64)
    win = np.zeros((n_obj, 4), np.int64)
    rgb = np.zeros((n_obj, 3), np.float64)
    obj_scene = np.zeros(n_obj, np.int64)
    k = 0
    for si, (sc, gs) in enumerate(zip(layouts, geoms, strict=True)):
        for o, g in zip(sc.objects, gs, strict=True):
            obj_scene[k] = si
            win[k] = g.window
            rgb[k] = o.rgb
            if g.verts:
                nv[k] = len(g.verts)
                verts[k, : len(g.verts)] = g.verts
                tables.append(())
            else:
                ex0, ey0, ex1, ey1 = g.ellipse
                ell[k] = (ex0, ey0, ex1 - ex0, ey1 - ey0)
                tables.append(ellipse_rows(ex1 - ex0, ey1 - ey0))
            k += 1
    t_len = max([len(t) for t in tables] + [1])
    table = np.zeros((n_obj, t_len), np.int32)
    for i, t in enumerate(tables):
        table[i, : len(t)] = t
    noise = [sc.noise for sc in layouts]
    out: dict[str, Any] = {
        "scene_size": torch.tensor([[sc.width, sc.height] for sc in layouts], dtype=torch.long).view(-1, 2),
        "scene_bg": torch.tensor(
            [[BACKGROUND_IDS[sc.background], *sc.bg_a, *sc.bg_b, sc.angle, sc.sigma] for sc in layouts],
            dtype=torch.float64,
        ).reshape(-1, 9),
        "obj_scene": torch.from_numpy(obj_scene),
        "obj_win": torch.from_numpy(win),
        "obj_verts": torch.from_numpy(verts),
        "obj_nv": torch.from_numpy(nv),
        "obj_ell": torch.from_numpy(ell),
        "obj_table": torch.from_numpy(table),
        "obj_rgb": torch.from_numpy(rgb),
    }
    if any(n is not None for n in noise):
        hm = max(sc.height for sc in layouts)
        wm = max(sc.width for sc in layouts)
        arr = np.zeros((len(layouts), 3, hm, wm), np.float64)
        for i, n in enumerate(noise):
            if n is not None:
                arr[i, :, : n.shape[0], : n.shape[1]] = n.transpose(2, 0, 1)
        out["scene_noise"] = torch.from_numpy(arr)
    return out


# --------------------------------------------------------------------------------------------------
# Rasterising


def _polygon_spans(verts: torch.Tensor, nv: torch.Tensor, n_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """PIL's polygon_generic on each object's canvas, rows 0..n_rows-1: spans [L, R] (inclusive
    subpixel columns) [O, n_rows, K], empty spans have L > R. Not emulated: PIL's "connect
    discontiguous corners" tweak (moves a spike's end on its vertex row; never seen to matter here)."""
    dev = verts.device
    o_n = verts.shape[0]
    k = torch.arange(MAX_VERTS, device=dev)
    nxt = (k[None, :] + 1) % nv.clamp(min=1)[:, None]  # [O, E]
    valid_e = k[None, :] < nv[:, None]
    x0, y0 = verts[..., 0], verts[..., 1]  # [O, E] int32
    x1 = torch.gather(x0, 1, nxt)
    y1 = torch.gather(y0, 1, nxt)
    ymin_e, ymax_e = torch.minimum(y0, y1), torch.maximum(y0, y1)
    horiz = y0 == y1
    big = BIG
    ymax_p = torch.where(valid_e, ymax_e, -big).amax(1).clamp(max=n_rows)  # [O]
    dx = (x1 - x0).to(torch.float32) / torch.where(horiz, 1, y1 - y0).to(torch.float32)  # [O, E]
    ys = torch.arange(n_rows, device=dev, dtype=torch.int32)[None, :, None]  # [1, R, 1]
    slant = (valid_e & ~horiz)[:, None, :]
    active = slant & (ys >= ymin_e[:, None, :]) & (ys <= ymax_e[:, None, :])  # [O, R, E]
    xx = (ys - y0[:, None, :]).to(torch.float32) * dx[:, None, :] + x0[:, None, :].to(torch.float32)
    dup = active & (ys == ymax_e[:, None, :]) & (ys < ymax_p[:, None, None])
    inf = torch.tensor(float("inf"), device=dev)
    entries = torch.cat([torch.where(active, xx, inf), torch.where(dup, xx, inf)], dim=2)  # [O, R, 2E]
    entries = entries.sort(dim=2).values
    lo, hi = entries[..., 0::2], entries[..., 1::2]  # [O, R, E] pairs
    ok = torch.isfinite(hi)
    left = torch.floor(torch.where(ok, lo, 0.0) + 0.5).to(torch.int32)
    right = torch.ceil(torch.where(ok, hi, 0.0) - 0.5).to(torch.int32)
    left = torch.where(ok, left, big)
    right = torch.where(ok, right, -big)
    # horizontal edges: PIL draws them as lines of their own
    h_ok = (valid_e & horiz)[:, None, :] & (ys == y0[:, None, :])
    h_left = torch.where(h_ok, torch.minimum(x0, x1)[:, None, :], big)
    h_right = torch.where(h_ok, torch.maximum(x0, x1)[:, None, :], -big)
    del o_n
    return torch.cat([left, h_left], 2), torch.cat([right, h_right], 2)


def _ellipse_spans(ell: torch.Tensor, table: torch.Tensor, n_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """PIL's filled ellipse rows: [O, n_rows, 1] spans from the walk tables (`ellipse_rows`)."""
    dev = ell.device
    ex0, ey0, a, b = (ell[:, i, None] for i in range(4))  # [O, 1]
    ys = torch.arange(n_rows, device=dev)[None, :]
    yd = (2 * (ys - ey0) - b).abs()  # doubled distance from the centre row
    inside = yd <= b
    j = ((yd - b % 2) // 2).clamp(0, table.shape[1] - 1)
    r = torch.gather(table.to(torch.long), 1, j)
    big = BIG
    left = torch.where(inside, ex0 + (a - r) // 2, big)
    right = torch.where(inside, ex0 + (a + r) // 2, -big)
    return left[..., None].to(torch.int32), right[..., None].to(torch.int32)


def _coverage_chunk(
    verts: torch.Tensor,
    nv: torch.Tensor,
    ell: torch.Tensor,
    table: torch.Tensor,
    hw: int,
    ww: int,
) -> torch.Tensor:
    """[O, hw, ww] uint8: PIL's BOX-filtered value (0..255) of each object's 4x canvas."""
    n_rows = hw * S
    pl, pr = _polygon_spans(verts, nv, n_rows)
    el, er = _ellipse_spans(ell, table, n_rows)
    is_poly = (nv > 0)[:, None, None]
    left = torch.cat([torch.where(is_poly, pl, BIG), torch.where(is_poly, BIG, el)], 2)
    right = torch.cat([torch.where(is_poly, pr, -BIG), torch.where(is_poly, -BIG, er)], 2)
    valid = left <= right
    left = torch.where(valid, left, BIG)
    right = torch.where(valid, right, -BIG)
    # union of possibly overlapping spans: sort by the left end (empty ones last), then start each
    # after the ends of the ones before
    order = left.argsort(dim=2)
    left = torch.gather(left, 2, order)
    right = torch.gather(right, 2, order)
    kk = max(1, int(valid.sum(2).amax().item()))
    left, right = left[..., :kk], right[..., :kk]
    prev = torch.cummax(right, dim=2).values
    prev = torch.cat([torch.full_like(prev[..., :1], -BIG), prev[..., :-1]], 2)
    left = torch.maximum(left, prev + 1)
    # covered subpixels of pixel column x on each subpixel row: |[L, R + 1) & [4x, 4x + 4)|
    xs = torch.arange(ww, device=verts.device, dtype=torch.int32)[None, None, None, :] * S  # [1,1,1,W]
    lo = (left[..., None] - xs).clamp(0, S)
    hi = (right[..., None] + 1 - xs).clamp(0, S)
    n = (hi - lo).clamp(min=0).sum(2)  # [O, R, W] in 0..4
    box_h = torch.tensor(BOX_H, dtype=torch.int32, device=verts.device)
    h = box_h[n.long()]
    v = (h.view(h.shape[0], hw, S, ww).sum(2) + 2) // 4
    return v.to(torch.uint8)


def rasterise(packed: dict[str, Any], chunk: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Every object's coverage in its window: ([O, Hw, Ww] uint8 PIL-box values, [O, 2] window size
    (w, h)); windows are padded to the largest (values 0 outside). Objects are grouped by window size
    in chunks of `chunk` so a small object does not pay for a large one."""
    win = packed["obj_win"]
    dev = win.device
    n_obj = win.shape[0]
    size = torch.stack([win[:, 2] - win[:, 0], win[:, 3] - win[:, 1]], 1)  # [O, 2] (w, h)
    if n_obj == 0:
        return torch.zeros(0, 1, 1, dtype=torch.uint8, device=dev), size
    size_cpu = size.cpu()
    hmax, wmax = int(size_cpu[:, 1].max()), int(size_cpu[:, 0].max())
    out = torch.zeros(n_obj, hmax, wmax, dtype=torch.uint8, device=dev)
    order = size_cpu.amax(1).argsort().tolist()
    for i in range(0, n_obj, chunk):
        idx_list = order[i : i + chunk]
        hw = int(size_cpu[idx_list, 1].max())
        ww = int(size_cpu[idx_list, 0].max())
        idx = torch.tensor(idx_list, device=dev)
        v = _coverage_chunk(
            packed["obj_verts"][idx],
            packed["obj_nv"][idx],
            packed["obj_ell"][idx],
            packed["obj_table"][idx],
            hw,
            ww,
        )
        out[idx, :hw, :ww] = v
    # outside a window's own size nothing is drawn (the canvas ends there)
    ys = torch.arange(hmax, device=dev)[None, :, None]
    xs = torch.arange(wmax, device=dev)[None, None, :]
    inside = (ys < size[:, 1, None, None]) & (xs < size[:, 0, None, None])
    return out * inside, size


def boxes_from_coverage(cov: torch.Tensor, win: torch.Tensor) -> torch.Tensor:
    """[O, 4] long tight boxes x0, y0, x1, y1 (exclusive) of the masks (coverage >= 128 of 255, i.e.
    >= 0.5) in image pixels; an empty mask gives (0, 0, 0, 0)."""
    m = cov >= 128
    rows, cols = m.any(2), m.any(1)  # [O, Hw], [O, Ww]
    hw, ww = rows.shape[1], cols.shape[1]
    r0 = rows.to(torch.int8).argmax(1)
    r1 = hw - rows.flip(1).to(torch.int8).argmax(1)
    c0 = cols.to(torch.int8).argmax(1)
    c1 = ww - cols.flip(1).to(torch.int8).argmax(1)
    box = torch.stack([win[:, 0] + c0, win[:, 1] + r0, win[:, 0] + c1, win[:, 1] + r1], 1)
    return torch.where(rows.any(1)[:, None], box, 0)


# --------------------------------------------------------------------------------------------------
# Rendering


@dataclass
class Rendered:
    images: torch.Tensor  # [S, 3, Hmax, Wmax] uint8, scene s valid in [:, :h_s, :w_s]
    sizes: torch.Tensor  # [S, 2] (w, h)
    coverage: torch.Tensor  # [O, Hw, Ww] uint8 (0..255), per object in its window
    windows: torch.Tensor  # [O, 4] x0, y0, x1, y1
    boxes: torch.Tensor  # [O, 4] tight boxes of the masks
    obj_scene: torch.Tensor  # [O] scene of each object

    def masks(self, o: int) -> torch.Tensor:
        """[H, W] bool mask of object `o` on its scene's full image."""
        s = int(self.obj_scene[o])
        w, h = (int(v) for v in self.sizes[s])
        x0, y0, x1, y1 = (int(v) for v in self.windows[o])
        m = torch.zeros(h, w, dtype=torch.bool, device=self.coverage.device)
        m[y0:y1, x0:x1] = self.coverage[o, : y1 - y0, : x1 - x0] >= 128
        return m


def _backgrounds(packed: dict[str, Any], hmax: int, wmax: int, dtype: torch.dtype, gen: Any) -> torch.Tensor:
    """[S, 3, Hmax, Wmax] synth._background of each scene (float, unrounded)."""
    bg = packed["scene_bg"].to(dtype)
    dev = bg.device
    size = packed["scene_size"].to(dtype)
    kind = bg[:, 0].round().long()
    a, b, angle, sigma = bg[:, 1:4], bg[:, 4:7], bg[:, 7], bg[:, 8]
    cos, sin = torch.cos(angle), torch.sin(angle)
    if dtype == torch.float64:  # the same values math.cos / math.sin give synth.py
        cs = torch.tensor(
            [[math.cos(v), math.sin(v)] for v in packed["scene_bg"][:, 7].tolist()], dtype=dtype
        ).reshape(-1, 2)
        cos, sin = cs[:, 0].to(dev), cs[:, 1].to(dev)
    xs = torch.arange(wmax, device=dev, dtype=dtype)[None, None, :]
    ys = torch.arange(hmax, device=dev, dtype=dtype)[None, :, None]
    proj = xs * cos[:, None, None] + ys * sin[:, None, None]  # [S, H, W]
    # min and max over the scene's own grid sit on its corners
    wl, hl = size[:, 0] - 1.0, size[:, 1] - 1.0
    zero = torch.zeros_like(wl)
    corners = torch.stack(
        [zero * cos + zero * sin, wl * cos + zero * sin, zero * cos + hl * sin, wl * cos + hl * sin], 1
    )
    pmin, pmax = corners.amin(1), corners.amax(1)
    t = (proj - pmin[:, None, None]) / torch.clamp(pmax - pmin, min=1e-9)[:, None, None]
    t = torch.where((kind == BACKGROUND_IDS["plain"])[:, None, None], 0.0, t)
    rgb = a[:, :, None, None] * (1.0 - t[:, None]) + b[:, :, None, None] * t[:, None]  # [S, 3, H, W]
    noisy = kind == BACKGROUND_IDS["noisy"]
    if "scene_noise" in packed:
        rgb = rgb + packed["scene_noise"].to(dtype)[:, :, :hmax, :wmax]
    elif bool(noisy.any()):
        z = torch.randn(rgb.shape, device=dev, dtype=torch.float32, generator=gen).to(dtype)
        rgb = rgb + z * torch.where(noisy, sigma, 0.0)[:, None, None, None]
    return rgb


def render(packed: dict[str, Any], *, dtype: torch.dtype = torch.float32, generator: Any = None) -> Rendered:
    """Draw the packed scenes on the device their tensors are on. float64 reproduces synth.py's
    arithmetic exactly; float32 (the default, for GPUs) may move a pixel by one level."""
    sizes = packed["scene_size"]
    dev = sizes.device
    n_s = sizes.shape[0]
    sz = sizes.cpu()
    wmax, hmax = int(sz[:, 0].max()), int(sz[:, 1].max())
    rgb = _backgrounds(packed, hmax, wmax, dtype, generator)
    cov, wsize = rasterise(packed)
    win = packed["obj_win"]
    if cov.shape[0]:
        o_n, hw, ww = cov.shape
        c = cov.to(dtype) / 255.0
        ys = win[:, 1, None, None] + torch.arange(hw, device=dev)[None, :, None]
        xs = win[:, 0, None, None] + torch.arange(ww, device=dev)[None, None, :]
        ok = (ys < hmax) & (xs < wmax)
        flat = packed["obj_scene"][:, None, None] * (hmax * wmax) + ys.clamp(max=hmax - 1) * wmax
        flat = (flat + xs.clamp(max=wmax - 1)).reshape(-1)
        c = torch.where(ok, c, 0.0).reshape(-1)
        # objects never share a pixel (footprints >= 4 px apart): compositing them one after the
        # other as synth.py does equals this single blend
        cov_sum = torch.zeros(n_s * hmax * wmax, dtype=dtype, device=dev).index_add_(0, flat, c)
        col = packed["obj_rgb"].to(dtype)  # [O, 3]
        col_sum = torch.zeros(3, n_s * hmax * wmax, dtype=dtype, device=dev)
        col_sum.index_add_(1, flat, col.t().repeat_interleave(hw * ww, dim=1) * c[None, :])
        cov_sum = cov_sum.view(n_s, 1, hmax, wmax)
        col_sum = col_sum.view(3, n_s, hmax, wmax).transpose(0, 1)
        rgb = rgb * (1.0 - cov_sum) + col_sum
    images = rgb.round().clamp(0, 255).to(torch.uint8)
    boxes = boxes_from_coverage(cov, win)
    del wsize
    return Rendered(images, sizes, cov, win, boxes, packed["obj_scene"])


# --------------------------------------------------------------------------------------------------
# Scenes and expressions


@dataclass(frozen=True)
class LayoutScene:
    """What `synth.make_expressions` reads of a scene (objects with their boxes, the image size),
    without the pixels. Objects are `synth.SceneObject`s whose `mask` is None (the masks stay on the
    device: `Rendered.masks`)."""

    objects: tuple[synth.SceneObject, ...]
    width: int
    height: int
    background: str


def scenes_of(layouts: Sequence[SceneLayout], boxes: torch.Tensor) -> list[LayoutScene]:
    """The scenes of `layouts` with the boxes the rasteriser found ([O, 4], objects in order)."""
    flat = boxes.tolist()
    out, k = [], 0
    for sc in layouts:
        objs = []
        for o in sc.objects:
            box = tuple(int(v) for v in flat[k])
            objs.append(synth.SceneObject(o.shape, o.colour, o.size, mask=None, box=box))  # type: ignore[arg-type]
            k += 1
        out.append(LayoutScene(tuple(objs), sc.width, sc.height, sc.background))
    return out


@dataclass
class Pool:
    """Scenes `first .. first + n - 1` of a stream: annotation records (docs/data-format.md; boxes from
    the rasteriser, no segmentation: training the language model reads boxes only) and what the device
    needs to draw them."""

    records: dict[str, list[dict[str, Any]]]
    layouts: dict[int, SceneLayout]  # by image id (scene index + 1, as synth.memory_dataset)
    geoms: dict[int, list[Geometry]]


def stream_pool(
    seed: int,
    first: int,
    n: int,
    *,
    refs_per_image: int = 6,
    mix: dict[str, float] | None = None,
    exact: bool = False,
) -> Pool:
    """The stream's scenes as `synth.memory_dataset` numbers them (scene i draws from
    `default_rng([seed, i])`), laid out and rasterised on the CPU (object windows only) for their
    boxes and expressions; the pixels are left to `render`.

    By default a noisy background's noise is not drawn from the scene's generator (the device draws
    it), so from the first noisy scene on the objects and expressions are other draws of the same
    distribution than `memory_dataset`'s. `exact=True` draws it as synth.py does: the same scenes,
    annotations and expressions as `memory_dataset(seed, first, n)` (and the noise travels in the
    packed layouts, [H, W, 3] float64 per noisy scene: for tests, not for training)."""
    rngs = [np.random.default_rng([seed, i]) for i in range(first, first + n)]
    layouts = [sample_layout(rng, exact=exact) for rng in rngs]
    geoms = [[object_geometry(o, sc.width, sc.height) for o in sc.objects] for sc in layouts]
    # Boxes and areas from PIL on each object's window (synth._coverage's drawing, ~0.1 ms an object):
    # on a CPU that is far cheaper than `rasterise`, and it is synth.py's mask by construction.
    box_rows: list[tuple[int, int, int, int]] = []
    areas: list[int] = []
    for sc in layouts:
        for o in sc.objects:
            (x0, y0, _, _), v = window_coverage(o, sc.width, sc.height)
            m = v >= 128
            ys, xs = np.flatnonzero(m.any(1)), np.flatnonzero(m.any(0))
            box_rows.append((x0 + int(xs[0]), y0 + int(ys[0]), x0 + int(xs[-1]) + 1, y0 + int(ys[-1]) + 1))
            areas.append(int(m.sum()))
    boxes = torch.tensor(box_rows, dtype=torch.long).reshape(-1, 4)
    data: dict[str, list[dict[str, Any]]] = {"images": [], "annotations": [], "refs": [], "descriptions": []}
    k = 0
    for i, (rng, sc) in enumerate(zip(rngs, scenes_of(layouts, boxes), strict=True)):
        image_id = first + i + 1
        refs = synth.make_expressions(sc, rng, n=refs_per_image, mix=mix)  # type: ignore[arg-type]
        ann_ids = [len(data["annotations"]) + 1 + j for j in range(len(sc.objects))]
        data["images"].append(
            {"id": image_id, "file_name": f"stream/{first + i}", "width": sc.width, "height": sc.height}
        )
        for a, o in zip(ann_ids, sc.objects, strict=True):
            data["annotations"].append(
                {
                    "id": a,
                    "image_id": image_id,
                    "bbox": o.bbox_xywh,
                    "area": int(areas[k]),
                    "segmentation": [],
                    "category": o.shape,
                    "attributes": {"shape": o.shape, "colour": o.colour, "size": o.size},
                }
            )
            data["descriptions"].append({"ann_id": a, "text": synth.describe(o)})
            k += 1
        for r in refs:
            data["refs"].append(
                {
                    "ref_id": len(data["refs"]) + 1,
                    "image_id": image_id,
                    "expression": r.expression,
                    "ann_ids": [ann_ids[t] for t in r.targets],
                    "kind": r.kind,
                }
            )
    ids = [first + i + 1 for i in range(n)]
    return Pool(data, dict(zip(ids, layouts, strict=True)), dict(zip(ids, geoms, strict=True)))


# --------------------------------------------------------------------------------------------------
# Training preprocessing on the device (train_vlm: resize_for_model + patch_bytes)


PIL_PRECISION_BITS = 32 - 8 - 2  # Pillow's Resample.c, 8-bit images


def _bicubic(x: float) -> float:
    """Pillow's bicubic filter (a = -0.5)."""
    a = -0.5
    x = abs(x)
    if x < 1.0:
        return ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    if x < 2.0:
        return (((x - 5.0) * x + 8.0) * x - 4.0) * a
    return 0.0


@functools.lru_cache(maxsize=2048)
def pil_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pillow's bicubic resampling of one axis in_size -> out_size (precompute_coeffs and
    normalize_coeffs_8bpc): ([out, T] int64 source indices, [out, T] int64 fixed-point weights,
    2**PIL_PRECISION_BITS = 1; unused taps have weight 0)."""
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = 2.0 * filterscale
    taps = int(math.ceil(support)) * 2 + 1
    idx = np.zeros((out_size, taps), np.int64)
    wts = np.zeros((out_size, taps), np.int64)
    one = 1 << PIL_PRECISION_BITS
    for xx in range(out_size):
        centre = (xx + 0.5) * scale
        xmin = max(0, int(centre - support + 0.5))
        xmax = min(in_size, int(centre + support + 0.5)) - xmin
        k = [_bicubic((x + xmin - centre + 0.5) / filterscale) for x in range(xmax)]
        total = sum(k)
        if total != 0.0:
            k = [v / total for v in k]
        idx[xx, :xmax] = np.arange(xmin, xmin + xmax)
        wts[xx, :xmax] = [int(-0.5 + v * one) if v < 0 else int(0.5 + v * one) for v in k]
    return idx, wts


def _resize_axis(x: torch.Tensor, out_size: int, dim: int) -> torch.Tensor:
    """One pass of Pillow's 8-bit bicubic resize along `dim` of x (float64 holding uint8 values):
    its fixed-point weights, its rounding and clipping, so the result is PIL's to the bit (float64
    holds the integer sums exactly)."""
    idx_np, w_np = pil_taps(x.shape[dim], out_size)
    idx = torch.from_numpy(idx_np).to(x.device)
    w = torch.from_numpy(w_np).to(x.device, torch.float64)
    xt = x.movedim(dim, -1)  # [..., in]
    y = (xt[..., idx] * w).sum(-1)  # [..., out]
    y = torch.floor((y + float(1 << (PIL_PRECISION_BITS - 1))) / float(1 << PIL_PRECISION_BITS))
    return y.clamp_(0.0, 255.0).movedim(-1, dim)


def patches_of(img: torch.Tensor) -> torch.Tensor:
    """[3, Hr, Wr] uint8 -> [gh*gw, 3, 16, 16] uint8 in merge-window order (train_vlm.patch_bytes)."""
    from .preprocess import MERGE_SIZE, PATCH_SIZE

    p, m = PATCH_SIZE, MERGE_SIZE
    _, hr, wr = img.shape
    gh, gw = hr // p, wr // p
    x = img.reshape(3, gh // m, m, p, gw // m, m, p).permute(1, 4, 2, 5, 0, 3, 6)
    return x.reshape(gh * gw, 3, p, p)


def pixel_bytes(images: torch.Tensor, req: torch.Tensor) -> torch.Tensor:
    """The patches of each request row (scene, x0, y0, x1, y1, resized h, resized w): the scene's
    image cropped to [x0, x1) x [y0, y1), resized exactly as PIL's 8-bit bicubic (`_resize_axis`),
    cut into patches; [sum of gh*gw, 3, 16, 16] uint8 on the images' device."""
    rows = [tuple(r) for r in req.tolist()]
    done: dict[tuple[int, ...], torch.Tensor] = {}
    for r in rows:
        if r in done:
            continue
        s, x0, y0, x1, y1, hr, wr = r
        x = images[s, :, y0:y1, x0:x1].to(torch.float64)  # [3, h, w]
        if wr != x1 - x0:  # PIL: the horizontal pass first, each pass only when its size changes
            x = _resize_axis(x, wr, 2)
        if hr != y1 - y0:
            x = _resize_axis(x, hr, 1)
        done[r] = patches_of(x.to(torch.uint8))
    return torch.cat([done[r] for r in rows], 0)


RENDER_KEYS = ("scene_", "obj_", "render_req")


def attach_pixels(batch: dict[str, Any], *, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """A collated batch of a device-rendered stream (train_vlm --render device), its tensors already on
    the training device: draws its scenes there and puts their `pixel_bytes` in place of the layout."""
    packed = {k: batch.pop(k) for k in list(batch) if k.startswith(RENDER_KEYS)}
    req = packed.pop("render_req")
    r = render(packed, dtype=dtype)
    batch["pixel_bytes"] = pixel_bytes(r.images, req)
    return batch
