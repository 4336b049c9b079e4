"""Seeded synthetic referring-segmentation data: coloured shapes, expressions, region descriptions.

The world the demo pack is trained on (docs/data-format.md describes the files):
- images 128..640 px per side, aspect ratio up to 2:1, plain / gradient / lightly noisy light backgrounds;
- 1..6 non-overlapping objects: shape x colour x size (`small`, `large` ~2x the side of `small`);
- expressions whose referent set is exactly determined by the scene (see `make_expressions`).

Everything is drawn with PIL at 4x resolution and box-filtered down (anti-aliasing). An object's binary
mask is "covers at least half of the pixel", computed from the same supersampled drawing, so the mask
and the anti-aliased pixels agree; boxes are the tight boxes of those masks.

Determinism: a scene depends only on the `np.random.Generator` it is given; `generate_dataset` gives
image `i` the generator `default_rng([seed, i])`, so the same seed writes identical bytes.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from PIL import Image, ImageDraw

from .errors import ModelkitError

if TYPE_CHECKING:
    from .refdata import RefDataset

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (214, 39, 40),
    "green": (44, 160, 44),
    "blue": (31, 90, 220),
    "yellow": (240, 200, 20),
    "purple": (140, 60, 180),
    "orange": (250, 130, 10),
}
SIZES: tuple[str, ...] = ("small", "large")
PLURALS: dict[str, str] = {s: s + "s" for s in SHAPES}
BACKGROUNDS: tuple[str, ...] = ("plain", "gradient", "noisy")

RefKind = Literal["attribute", "size", "position", "category", "absent"]
REF_KINDS: tuple[str, ...] = ("attribute", "size", "position", "category", "absent")
# Default share of each kind among a scene's expressions; "absent" is the probability that a slot
# asks for something the scene does not hold (the server must answer found: false).
DEFAULT_MIX: dict[str, float] = {
    "attribute": 0.24,
    "size": 0.16,
    "position": 0.20,
    "category": 0.18,
    "absent": 0.22,
}

MIN_SIDE = 128
MAX_SIDE = 640
MAX_ASPECT = 2.0
SUPERSAMPLE = 4
MAX_OBJECTS = 6
# Small objects must survive a 32-px merge grid: their tight box is >= 14 px on both sides.
MIN_SMALL_PX = 14
# Side of a `small` object is base * U(0.9, 1.1) and of a `large` one base * U(1.8, 2.2), with
# base = max(SMALL_BASE_MIN, SMALL_BASE_FRAC * short side): the two classes never overlap (ratio >= 1.6).
# A triangle is sqrt(3)/2 as tall as its side and anti-aliasing can cost an edge row, hence
# side >= 14 / 0.866 + 1 ~ 17.2 px.
SMALL_BASE_FRAC = 0.11
SMALL_BASE_MIN = (MIN_SMALL_PX / (math.sqrt(3.0) / 2.0) + 1.0) / 0.9
STAR_INNER = 0.5  # inner/outer radius: fat enough that a 14-px star still has visible arms


@dataclass(frozen=True)
class SceneObject:
    shape: str
    colour: str
    size: str
    mask: np.ndarray = field(repr=False)  # [H, W] bool, the pixels the object covers at least half of
    box: tuple[int, int, int, int]  # tight box of `mask`: x0, y0, x1, y1 (x1, y1 exclusive), pixels

    @property
    def centre(self) -> tuple[float, float]:
        """Centre of the tight box (x, y) in pixels: what positional expressions compare."""
        x0, y0, x1, y1 = self.box
        return ((x0 + x1) / 2.0, (y0 + y1) / 2.0)

    @property
    def bbox_xywh(self) -> list[int]:
        x0, y0, x1, y1 = self.box
        return [x0, y0, x1 - x0, y1 - y0]

    def matches(self, shape: str | None = None, colour: str | None = None, size: str | None = None) -> bool:
        return (
            (shape is None or self.shape == shape)
            and (colour is None or self.colour == colour)
            and (size is None or self.size == size)
        )


@dataclass(frozen=True)
class Scene:
    image: Image.Image  # RGB
    objects: tuple[SceneObject, ...]
    background: str

    @property
    def width(self) -> int:
        return self.image.width

    @property
    def height(self) -> int:
        return self.image.height


@dataclass(frozen=True)
class Referral:
    expression: str
    kind: str  # one of REF_KINDS
    targets: tuple[int, ...]  # indices into Scene.objects, ascending; empty for "absent"


def describe(obj: SceneObject) -> str:
    """Region description of one object: "a small red circle"."""
    return f"a {obj.size} {obj.colour} {obj.shape}"


# --------------------------------------------------------------------------------------------------
# Rendering


def _check_side(name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not MIN_SIDE <= value <= MAX_SIDE:
        raise ModelkitError(
            "INVALID_INPUT", f"Expected an integer {MIN_SIDE}..{MAX_SIDE} for {name} but received {value!r}"
        )


def _pick_size(rng: np.random.Generator, width: int | None, height: int | None) -> tuple[int, int]:
    if width is not None:
        _check_side("width", width)
    if height is not None:
        _check_side("height", height)
    if width is not None and height is not None:
        if max(width, height) > MAX_ASPECT * min(width, height):
            raise ModelkitError(
                "INVALID_INPUT",
                f"Expected an aspect ratio up to {MAX_ASPECT:g}:1 but received {width}x{height}",
            )
        return width, height
    if width is None and height is None:
        long = int(rng.integers(MIN_SIDE, MAX_SIDE + 1))
        aspect = float(rng.uniform(1.0, MAX_ASPECT))
        short = max(MIN_SIDE, round(long / aspect))
        return (long, short) if rng.random() < 0.5 else (short, long)
    given = width if width is not None else height
    assert given is not None
    lo = max(MIN_SIDE, math.ceil(given / MAX_ASPECT))
    hi = min(MAX_SIDE, math.floor(given * MAX_ASPECT))
    other = int(rng.integers(lo, hi + 1))
    return (given, other) if width is not None else (other, given)


def _light_colour(rng: np.random.Generator) -> np.ndarray:
    return rng.uniform(205.0, 250.0, size=3)  # [3] f64


def _background(rng: np.random.Generator, width: int, height: int, kind: str) -> np.ndarray:
    """[H, W, 3] float64 light background."""
    a = _light_colour(rng)
    if kind == "plain":
        return np.broadcast_to(a, (height, width, 3)).copy()
    b = _light_colour(rng)
    angle = float(rng.uniform(0.0, 2.0 * math.pi))
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float64)  # [H, W] each
    proj = xs * math.cos(angle) + ys * math.sin(angle)
    t = (proj - proj.min()) / max(float(proj.max() - proj.min()), 1e-9)  # [H, W] in 0..1
    rgb = a[None, None, :] * (1.0 - t[..., None]) + b[None, None, :] * t[..., None]  # [H, W, 3]
    if kind == "noisy":
        sigma = float(rng.uniform(3.0, 7.0))
        rgb = rgb + rng.normal(0.0, sigma, size=rgb.shape)
    return rgb


def _shape_outline(shape: str, cx: float, cy: float, side: float) -> list[tuple[float, float]] | None:
    """Polygon of a shape centred on (cx, cy) that fits a side x side square; None for a circle."""
    r = side / 2.0
    if shape == "square":
        return [(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == "triangle":
        # Equilateral, pointing up, base as wide as the square; centred on its own bounding box.
        h = side * math.sqrt(3.0) / 2.0
        return [(cx, cy - h / 2.0), (cx + r, cy + h / 2.0), (cx - r, cy + h / 2.0)]
    if shape == "star":
        # 5 points, one pointing up; shifted so the star's bounding box is centred on (cx, cy).
        pts = []
        for k in range(10):
            rad = r if k % 2 == 0 else r * STAR_INNER
            a = -math.pi / 2.0 + k * math.pi / 5.0
            pts.append((rad * math.cos(a), rad * math.sin(a)))
        ymin = min(p[1] for p in pts)
        ymax = max(p[1] for p in pts)
        dy = -(ymin + ymax) / 2.0
        return [(cx + x, cy + y + dy) for x, y in pts]
    if shape == "circle":
        return None
    raise ModelkitError("INVALID_INPUT", f"Expected a shape in {SHAPES} but received {shape!r}")


def _coverage(shape: str, cx: float, cy: float, side: float, width: int, height: int) -> np.ndarray:
    """[H, W] float64 in 0..1: fraction of each pixel the shape covers (4x4 supersampled)."""
    pad = 2
    x0 = max(0, math.floor(cx - side / 2.0) - pad)
    y0 = max(0, math.floor(cy - side / 2.0) - pad)
    x1 = min(width, math.ceil(cx + side / 2.0) + pad)
    y1 = min(height, math.ceil(cy + side / 2.0) + pad)
    s = SUPERSAMPLE
    canvas = Image.new("L", ((x1 - x0) * s, (y1 - y0) * s), 0)
    draw = ImageDraw.Draw(canvas)
    # Supersampled pixel (i, j) covers [i/s, (i+1)/s) of the image; its centre is (i + 0.5)/s, so an
    # image coordinate u maps to u * s - 0.5 in PIL's pixel-centre coordinates.
    lx, ly = cx - x0, cy - y0
    poly = _shape_outline(shape, lx, ly, side)
    if poly is None:
        r = side / 2.0
        draw.ellipse(((lx - r) * s, (ly - r) * s, (lx + r) * s - 1, (ly + r) * s - 1), fill=255)
    else:
        draw.polygon([(u * s - 0.5, v * s - 0.5) for u, v in poly], fill=255)
    small = canvas.resize((x1 - x0, y1 - y0), Image.Resampling.BOX)
    cov = np.zeros((height, width), dtype=np.float64)
    cov[y0:y1, x0:x1] = np.asarray(small, dtype=np.float64) / 255.0
    return cov


def _place(
    rng: np.random.Generator,
    side: float,
    w: int,
    h: int,
    margin: float,
    gap: float,
    footprints: list[tuple[float, float, float, float]],
) -> tuple[float, float, tuple[float, float, float, float]] | None:
    """A centre (cx, cy) and footprint for an object of `side` at least `gap` from every footprint
    placed so far (200 random tries), or None where none was found."""
    for _try in range(200):
        cx = float(rng.uniform(margin + side / 2.0, w - margin - side / 2.0))
        cy = float(rng.uniform(margin + side / 2.0, h - margin - side / 2.0))
        fp = (cx - side / 2.0, cy - side / 2.0, cx + side / 2.0, cy + side / 2.0)
        if all(
            fp[2] + gap <= o[0] or o[2] + gap <= fp[0] or fp[3] + gap <= o[1] or o[3] + gap <= fp[1]
            for o in footprints
        ):
            return cx, cy, fp
    return None


def _object_side(rng: np.random.Generator, size: str, short_side: int) -> float:
    base = max(SMALL_BASE_MIN, SMALL_BASE_FRAC * short_side)
    lo, hi = (0.9, 1.1) if size == "small" else (1.8, 2.2)
    return base * float(rng.uniform(lo, hi))


def _pick_attributes(
    rng: np.random.Generator, placed: Sequence[tuple[str, str, str]]
) -> tuple[str, str, str]:
    # A third of the time repeat an existing shape+colour: that makes the scenes where size or position
    # is needed to tell two objects apart (and positional groups) common instead of rare.
    if placed and rng.random() < 0.33:
        shape, colour, _ = placed[int(rng.integers(len(placed)))]
    else:
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
    size = SIZES[int(rng.integers(len(SIZES)))]
    return shape, colour, size


def render_scene(
    rng: np.random.Generator,
    width: int | None = None,
    height: int | None = None,
    *,
    n_objects: int | None = None,
    background: str | None = None,
) -> Scene:
    """Draw one random scene. Unset width/height/n_objects/background are drawn from `rng`.

    `n_objects` is what the scene asks for; on a crowded small image an object that finds no free
    place after 200 tries is dropped, so a scene may hold fewer (never zero).
    """
    w, h = _pick_size(rng, width, height)
    if n_objects is None:
        n_objects = int(rng.integers(1, MAX_OBJECTS + 1))
    elif not 1 <= n_objects <= MAX_OBJECTS:
        raise ModelkitError("INVALID_INPUT", f"Expected n_objects 1..{MAX_OBJECTS} but received {n_objects}")
    if background is None:
        background = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
    elif background not in BACKGROUNDS:
        raise ModelkitError(
            "INVALID_INPUT", f"Expected background in {BACKGROUNDS} but received {background!r}"
        )
    rgb = _background(rng, w, h, background)  # [H, W, 3] f64

    short = min(w, h)
    gap = max(4.0, 0.03 * short)  # between footprints: boxes never touch, masks never overlap
    margin = 2.0
    footprints: list[tuple[float, float, float, float]] = []
    attrs: list[tuple[str, str, str]] = []
    objects: list[SceneObject] = []
    for _ in range(n_objects):
        shape, colour, size = _pick_attributes(rng, attrs)
        side = _object_side(rng, size, short)
        placed = _place(rng, side, w, h, margin, gap, footprints)
        if placed is None:
            continue
        cx, cy, fp = placed
        cov = _coverage(shape, cx, cy, side, w, h)  # [H, W]
        jitter = rng.integers(-12, 13, size=3)
        col = np.clip(np.asarray(COLOURS[colour], dtype=np.float64) + jitter, 0.0, 255.0)  # [3]
        rgb = rgb * (1.0 - cov[..., None]) + col[None, None, :] * cov[..., None]
        mask = cov >= 0.5  # [H, W] bool
        ys = np.flatnonzero(mask.any(axis=1))
        xs = np.flatnonzero(mask.any(axis=0))
        box = (int(xs[0]), int(ys[0]), int(xs[-1]) + 1, int(ys[-1]) + 1)
        footprints.append(fp)
        attrs.append((shape, colour, size))
        objects.append(SceneObject(shape=shape, colour=colour, size=size, mask=mask, box=box))
    image = Image.fromarray(np.clip(np.rint(rgb), 0, 255).astype(np.uint8), mode="RGB")
    return Scene(image=image, objects=tuple(objects), background=background)


# --------------------------------------------------------------------------------------------------
# Expressions


def _select(
    objects: Sequence[SceneObject],
    shape: str | None = None,
    colour: str | None = None,
    size: str | None = None,
) -> tuple[int, ...]:
    return tuple(i for i, o in enumerate(objects) if o.matches(shape, colour, size))


def _attribute_candidates(objs: Sequence[SceneObject]) -> list[Referral]:
    out: list[Referral] = []
    for shape in SHAPES:
        for colour in COLOURS:
            sel = _select(objs, shape, colour)
            if len(sel) == 1:
                out.append(Referral(f"the {colour} {shape}", "attribute", sel))
        sel = _select(objs, shape)
        if len(sel) == 1:
            out.append(Referral(f"the {shape}", "attribute", sel))
    for colour in COLOURS:
        sel = _select(objs, colour=colour)
        if len(sel) == 1:
            out.append(Referral(f"the {colour} shape", "attribute", sel))
    return out


def _size_candidates(objs: Sequence[SceneObject]) -> tuple[list[Referral], list[Referral]]:
    """(size words that disambiguate, size words that are merely true)."""
    needed: list[Referral] = []
    redundant: list[Referral] = []
    for shape in SHAPES:
        for size in SIZES:
            for colour in COLOURS:
                sel = _select(objs, shape, colour, size)
                if len(sel) == 1:
                    r = Referral(f"the {size} {colour} {shape}", "size", sel)
                    (needed if len(_select(objs, shape, colour)) > 1 else redundant).append(r)
            sel = _select(objs, shape, size=size)
            if len(sel) == 1:
                r = Referral(f"the {size} {shape}", "size", sel)
                (needed if len(_select(objs, shape)) > 1 else redundant).append(r)
    return needed, redundant


def _position_candidates(objs: Sequence[SceneObject], width: int, height: int) -> list[Referral]:
    out: list[Referral] = []
    groups: list[tuple[str, tuple[int, ...]]] = []
    for shape in SHAPES:
        groups.append((shape, _select(objs, shape)))
        for colour in COLOURS:
            sel = _select(objs, shape, colour)
            # "the red circle on the left" only adds something when not all circles are red.
            if len(sel) >= 2 and sel != _select(objs, shape):
                groups.append((f"{colour} {shape}", sel))
    for noun, sel in groups:
        if len(sel) < 2:
            continue
        for axis, length, words in (
            (0, width, {"min": ("left", "leftmost"), "max": ("right", "rightmost")}),
            (1, height, {"min": ("top", "topmost"), "max": ("bottom", "bottommost")}),
        ):
            need = max(10.0, 0.08 * length)  # clear margin between the extreme and the runner-up
            ranked = sorted(sel, key=lambda i: objs[i].centre[axis])
            lo, lo2, hi2, hi = ranked[0], ranked[1], ranked[-2], ranked[-1]
            for end, best, runner in (("min", lo, lo2), ("max", hi, hi2)):
                if abs(objs[best].centre[axis] - objs[runner].centre[axis]) < need:
                    continue
                pair_word, most_word = words[end]
                if len(sel) == 2:
                    text = f"the {noun} on the {pair_word}" if axis == 0 else f"the {noun} at the {pair_word}"
                    out.append(Referral(text, "position", (best,)))
                    # "the left/right X" reads as geometry for triangles ("a right triangle").
                    if axis == 1:
                        out.append(Referral(f"the {pair_word} {noun}", "position", (best,)))
                else:
                    out.append(Referral(f"the {most_word} {noun}", "position", (best,)))
    return out


def _category_candidates(objs: Sequence[SceneObject]) -> list[Referral]:
    out: list[Referral] = []
    for shape in SHAPES:
        sel = _select(objs, shape)
        if sel:
            out.append(Referral(f"all {PLURALS[shape]}", "category", sel))
            out.append(Referral(f"every {shape}", "category", sel))
        for colour in COLOURS:
            sel_c = _select(objs, shape, colour)
            if sel_c and sel_c != sel:
                out.append(Referral(f"all {colour} {PLURALS[shape]}", "category", sel_c))
    for colour in COLOURS:
        sel = _select(objs, colour=colour)
        if sel:
            out.append(Referral(f"every {colour} shape", "category", sel))
    for size in SIZES:
        sel = _select(objs, size=size)
        if sel:
            out.append(Referral(f"all {size} shapes", "category", sel))
    if len(objs) >= 2:
        out.append(Referral("all shapes", "category", tuple(range(len(objs)))))
    return out


def _absent_candidate(objs: Sequence[SceneObject], rng: np.random.Generator) -> Referral:
    """A description that matches nothing in the scene (always exists: 48 colour+shape pairs, <= 6 used)."""
    colours = list(COLOURS)
    for _ in range(100):
        form = int(rng.integers(4))
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        colour = colours[int(rng.integers(len(colours)))]
        size = SIZES[int(rng.integers(len(SIZES)))]
        if form == 0 and not _select(objs, shape, colour):
            return Referral(f"the {colour} {shape}", "absent", ())
        if form == 1 and not _select(objs, shape, colour, size):
            return Referral(f"the {size} {colour} {shape}", "absent", ())
        if form == 2 and not _select(objs, shape):
            return Referral(f"all {PLURALS[shape]}", "absent", ())
        if form == 3 and not _select(objs, colour=colour):
            return Referral(f"every {colour} shape", "absent", ())
    for shape in SHAPES:  # unreachable in practice; kept so the function is total
        for colour in colours:
            if not _select(objs, shape, colour):
                return Referral(f"the {colour} {shape}", "absent", ())
    raise AssertionError("a scene cannot hold every colour+shape pair")


def make_expressions(
    scene: Scene,
    rng: np.random.Generator,
    n: int = 6,
    mix: Mapping[str, float] | None = None,
) -> list[Referral]:
    """Up to `n` unambiguous referring expressions for `scene`, distinct texts.

    Each slot is an "absent" target with probability mix["absent"]; otherwise a kind is drawn among
    the other kinds in proportion to `mix`, over the kinds that still have an unused candidate. The
    list ends early when the scene offers nothing more (a single object has no positional ones).
    """
    weights = dict(DEFAULT_MIX if mix is None else mix)
    unknown = set(weights) - set(REF_KINDS)
    if unknown or any(v < 0 for v in weights.values()):
        raise ModelkitError(
            "INVALID_INPUT", f"Expected mix weights >= 0 for kinds {REF_KINDS} but received {weights}"
        )
    present_total = sum(weights.get(k, 0.0) for k in REF_KINDS if k != "absent")
    absent_p = weights.get("absent", 0.0) / max(present_total + weights.get("absent", 0.0), 1e-12)

    objs = scene.objects
    needed, redundant = _size_candidates(objs)
    pools: dict[str, list[Referral]] = {
        "attribute": _attribute_candidates(objs),
        "size": needed,
        "position": _position_candidates(objs, scene.width, scene.height),
        "category": _category_candidates(objs),
    }
    # Disambiguating size words first; redundant ones ("the large red circle" as the only red circle)
    # are true but teach less.
    for k in pools:
        order = rng.permutation(len(pools[k]))
        pools[k] = [pools[k][int(i)] for i in order]
    pools["size"] += [redundant[int(i)] for i in rng.permutation(len(redundant))]

    out: list[Referral] = []
    used: set[str] = set()
    while len(out) < n:
        if rng.random() < absent_p:
            r = _absent_candidate(objs, rng)
            if r.expression not in used:
                used.add(r.expression)
                out.append(r)
            continue
        live = [k for k, pool in pools.items() if pool and weights.get(k, 0.0) > 0]
        if not live:
            break
        p = np.asarray([weights[k] for k in live], dtype=np.float64)
        kind = live[int(rng.choice(len(live), p=p / p.sum()))]
        r = pools[kind].pop(0)
        if r.expression not in used:
            used.add(r.expression)
            out.append(r)
    return out


# --------------------------------------------------------------------------------------------------
# Dataset files


def scene_records(
    scene: Scene,
    refs: Sequence[Referral],
    image_id: int,
    file_name: str,
    first_ann_id: int,
    first_ref_id: int,
) -> dict[str, list[dict[str, Any]]]:
    """The annotation-file records (docs/data-format.md) of one scene."""
    from .refdata import rle_encode

    ann_ids = [first_ann_id + i for i in range(len(scene.objects))]
    annotations = [
        {
            "id": ann_ids[i],
            "image_id": image_id,
            "bbox": o.bbox_xywh,
            "area": int(o.mask.sum()),
            "segmentation": rle_encode(o.mask),
            "category": o.shape,
            "attributes": {"shape": o.shape, "colour": o.colour, "size": o.size},
        }
        for i, o in enumerate(scene.objects)
    ]
    ref_records = [
        {
            "ref_id": first_ref_id + j,
            "image_id": image_id,
            "expression": r.expression,
            "ann_ids": [ann_ids[t] for t in r.targets],
            "kind": r.kind,
        }
        for j, r in enumerate(refs)
    ]
    descriptions = [{"ann_id": ann_ids[i], "text": describe(o)} for i, o in enumerate(scene.objects)]
    image = {"id": image_id, "file_name": file_name, "width": scene.width, "height": scene.height}
    return {"images": [image], "annotations": annotations, "refs": ref_records, "descriptions": descriptions}


ANNOTATION_FILE = "annotations.json"


def _file_name(i: int) -> str:
    return f"images/{i:06d}.png"


def _collect_scenes(
    data: dict[str, list[dict[str, Any]]],
    seed: int,
    indices: Iterable[int],
    refs_per_image: int,
    mix: Mapping[str, float] | None,
) -> Iterator[tuple[int, Scene]]:
    """Render scene `i` of `seed` for each index (image id i + 1), append its records to `data`, and
    yield it."""
    for i in indices:
        rng = np.random.default_rng([seed, i])
        scene = render_scene(rng)
        refs = make_expressions(scene, rng, n=refs_per_image, mix=mix)
        rec = scene_records(
            scene,
            refs,
            image_id=i + 1,
            file_name=_file_name(i),
            first_ann_id=len(data["annotations"]) + 1,
            first_ref_id=len(data["refs"]) + 1,
        )
        for key, rows in rec.items():
            data[key].extend(rows)
        yield i, scene


def generate_dataset(
    out_dir: Path | str,
    n_images: int,
    seed: int,
    *,
    refs_per_image: int = 6,
    mix: Mapping[str, float] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write `n_images` scenes as out_dir/images/NNNNNN.png and out_dir/annotations.json.

    Returns the annotation file's path. Image `i` uses `default_rng([seed, i])`, so a dataset's first
    k images do not depend on n_images.
    """
    if not isinstance(n_images, int) or n_images < 1:
        raise ModelkitError(
            "INVALID_INPUT", f"Expected a positive integer for n_images but received {n_images!r}"
        )
    if not isinstance(seed, int) or seed < 0:
        raise ModelkitError("INVALID_INPUT", f"Expected a non-negative integer seed but received {seed!r}")
    out = Path(out_dir)
    ann_path = out / ANNOTATION_FILE
    if ann_path.exists() and not overwrite:
        raise ModelkitError("OUTPUT_EXISTS", f"{ann_path} already exists; pass --force to replace it")
    (out / "images").mkdir(parents=True, exist_ok=True)
    data: dict[str, Any] = {
        "info": {
            "format": "qwen3-vl-seg-refs",
            "version": 1,
            "generator": "modelkit.synth",
            "seed": seed,
            "mix": dict(DEFAULT_MIX if mix is None else mix),
        },
        "images": [],
        "annotations": [],
        "refs": [],
        "descriptions": [],
    }
    for i, scene in _collect_scenes(data, seed, range(n_images), refs_per_image, mix):
        scene.image.save(out / _file_name(i), format="PNG", optimize=False)
    tmp = ann_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, separators=(",", ":")) + "\n", encoding="utf-8")
    tmp.replace(ann_path)
    return ann_path


def memory_dataset(seed: int, first: int, n_images: int, *, refs_per_image: int = 6) -> RefDataset:
    """Scenes `first .. first + n_images - 1` of `seed` (the same scenes `generate_dataset` writes for
    those indices) as an in-memory RefDataset, for training on a stream of fresh scenes."""
    from .refdata import MemoryRefDataset

    data: dict[str, list[dict[str, Any]]] = {"images": [], "annotations": [], "refs": [], "descriptions": []}
    scenes = _collect_scenes(data, seed, range(first, first + n_images), refs_per_image, None)
    images = {i + 1: scene.image for i, scene in scenes}
    return MemoryRefDataset(data, images)


# The repository's examples/ folder: (file name, seed, width, height, background). Regenerate with
# `write_examples(Path("examples"))`; tests/test_synth.py checks the files still match.
EXAMPLES: tuple[tuple[str, int, int, int, str], ...] = (
    ("shapes-1.png", 100, 512, 384, "gradient"),
    ("shapes-2.png", 209, 640, 320, "plain"),
    ("shapes-3.png", 307, 176, 128, "noisy"),
    ("shapes-4.png", 402, 300, 560, "gradient"),
)


def example_scene(seed: int, width: int, height: int, background: str) -> tuple[Scene, list[Referral]]:
    rng = np.random.default_rng(seed)
    scene = render_scene(rng, width, height, background=background)
    return scene, make_expressions(scene, rng, n=10)


def write_examples(out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, seed, width, height, background in EXAMPLES:
        scene, _ = example_scene(seed, width, height, background)
        scene.image.save(out_dir / name, format="PNG")
        paths.append(out_dir / name)
    return paths


# --------------------------------------------------------------------------------------------------
# the command (its arguments are declared in cli.py)


def cmd_synth(args: argparse.Namespace) -> int:
    path = generate_dataset(
        args.out, args.n, args.seed, refs_per_image=args.refs_per_image, overwrite=args.force
    )
    print(f"wrote {args.n} images and {path}")
    return 0
