"""Referring-segmentation annotations (RefCOCO-like), shared by synthetic and user data.

One JSON file (docs/data-format.md):
  images       [{id, file_name, width, height}]               file_name relative to the JSON's folder
  annotations  [{id, image_id, bbox [x,y,w,h], segmentation, category, attributes?, area?}]
  refs         [{ref_id, image_id, expression, ann_ids, kind}] ann_ids [] = absent target
  descriptions [{ann_id, text}]
Segmentation is COCO RLE (uncompressed `counts` list, or pycocotools' compressed string), column-major,
or COCO polygons. Everything is checked on load; a bad file raises ModelkitError("DATA_INVALID", ...)
naming the record and field.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from .errors import ModelkitError

FORMAT_NAME = "qwen3-vl-seg-refs"
# "other" is for converted user data whose expressions have no known kind (e.g. RefCOCO).
KINDS: tuple[str, ...] = ("attribute", "size", "position", "category", "absent", "other")
ANNOTATION_FILE = "annotations.json"


# --------------------------------------------------------------------------------------------------
# RLE


def rle_encode(mask: np.ndarray) -> dict[str, Any]:
    """COCO uncompressed RLE of a [H, W] mask: runs over the column-major pixel order, background first.

    Same layout as the runtime's rleEncode (src/runtime/mask-post.ts) and pycocotools' `counts` list.
    """
    if mask.ndim != 2:
        raise ModelkitError("INVALID_INPUT", f"Expected a [H, W] mask but received shape {list(mask.shape)}")
    h, w = mask.shape
    flat = np.asarray(mask, dtype=bool).T.reshape(-1)  # [W*H], column-major order of the image
    if flat.size == 0:
        return {"size": [h, w], "counts": [0]}
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1  # indices where a new run starts
    bounds = np.concatenate(([0], change, [flat.size]))
    runs = np.diff(bounds).tolist()
    counts = ([0] + runs) if flat[0] else runs  # the first run is background, possibly empty
    return {"size": [h, w], "counts": [int(c) for c in counts]}


def rle_decode(rle: Mapping[str, Any]) -> np.ndarray:
    """[H, W] bool from a COCO RLE with a `counts` list or a compressed `counts` string."""
    size = rle.get("size")
    if not (isinstance(size, Sequence) and len(size) == 2 and all(_is_int(v) and v >= 0 for v in size)):
        raise ModelkitError("DATA_INVALID", f"Expected RLE size [height, width] but received {size!r}")
    h, w = int(size[0]), int(size[1])
    counts = rle.get("counts")
    if isinstance(counts, str):
        counts = rle_counts_from_string(counts)
    if not (isinstance(counts, Sequence) and all(_is_int(c) and c >= 0 for c in counts)):
        raise ModelkitError("DATA_INVALID", "Expected RLE counts as non-negative integers or a COCO string")
    total = sum(counts)
    if total != h * w:
        raise ModelkitError("DATA_INVALID", f"RLE counts sum to {total}, a {w}x{h} mask needs {h * w}")
    values = np.zeros(len(counts), dtype=bool)
    values[1::2] = True  # runs alternate background, foreground, ...
    flat = np.repeat(values, np.asarray(counts, dtype=np.int64))  # [H*W] column-major
    return flat.reshape(w, h).T.copy()


def rle_counts_to_string(counts: Sequence[int]) -> str:
    """pycocotools' compressed counts: each run (minus the run two back, from the third on) as
    little-endian 5-bit groups with a continuation bit (0x20), sign in 0x10 of the last group, +48."""
    out: list[str] = []
    for i, c in enumerate(counts):
        x = int(c) - (int(counts[i - 2]) if i > 2 else 0)
        more = True
        while more:
            group = x & 0x1F
            x >>= 5  # arithmetic shift: negative deltas end at -1
            more = not ((group & 0x10 == 0 and x == 0) or (group & 0x10 != 0 and x == -1))
            if more:
                group |= 0x20
            out.append(chr(group + 48))
    return "".join(out)


def rle_counts_from_string(s: str) -> list[int]:
    counts: list[int] = []
    pos = 0
    while pos < len(s):
        x = 0
        k = 0
        more = True
        while more:
            if pos >= len(s):
                raise ModelkitError("DATA_INVALID", "compressed RLE counts end in the middle of a number")
            c = ord(s[pos]) - 48
            if not 0 <= c < 64:
                raise ModelkitError(
                    "DATA_INVALID", f"compressed RLE counts hold an invalid character {s[pos]!r}"
                )
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            pos += 1
            k += 1
            if not more and c & 0x10:
                x |= -1 << (5 * k)
        if len(counts) > 2:
            x += counts[-2]
        counts.append(x)
    return counts


def polygons_to_mask(polygons: Sequence[Sequence[float]], height: int, width: int) -> np.ndarray:
    """[H, W] bool from COCO polygons ([x1, y1, x2, y2, ...] in pixels). PIL fills boundary pixels too,
    so edges may differ from pycocotools by a pixel; fine for training, not for bit-exact scoring."""
    img = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(img)
    for poly in polygons:
        if len(poly) < 6 or len(poly) % 2:
            raise ModelkitError(
                "DATA_INVALID", f"Expected a polygon of >= 3 x,y pairs but received {len(poly)} numbers"
            )
        pts = [(float(poly[i]), float(poly[i + 1])) for i in range(0, len(poly), 2)]
        draw.polygon(pts, fill=1)
    return np.asarray(img, dtype=bool)


def _is_int(v: Any) -> bool:
    return isinstance(v, int | np.integer) and not isinstance(v, bool)


# --------------------------------------------------------------------------------------------------
# Records


@dataclass(frozen=True)
class ImageRecord:
    id: int
    file_name: str
    width: int
    height: int


@dataclass(frozen=True)
class AnnotationRecord:
    id: int
    image_id: int
    bbox: tuple[float, float, float, float]  # COCO x, y, w, h in pixels
    segmentation: Any  # RLE dict or list of polygons, as stored
    category: str
    attributes: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class RefRecord:
    ref_id: int
    image_id: int
    expression: str
    ann_ids: tuple[int, ...]
    kind: str


@dataclass(frozen=True)
class DescriptionRecord:
    ann_id: int
    text: str


class RefDataset:
    """A loaded annotation file. Build with `load_refdata`; records are validated and cross-checked."""

    def __init__(self, root: Path, data: Mapping[str, Any]) -> None:
        self.root = root
        self.info: dict[str, Any] = dict(data.get("info") or {})
        self.images: dict[int, ImageRecord] = {}
        self.annotations: dict[int, AnnotationRecord] = {}
        self.refs: list[RefRecord] = []
        self.descriptions: list[DescriptionRecord] = []
        self._parse(data)
        self._anns_by_image: dict[int, list[int]] = {i: [] for i in self.images}
        for a in self.annotations.values():
            self._anns_by_image[a.image_id].append(a.id)

    # -- parsing ---------------------------------------------------------------------------------

    def _parse(self, data: Mapping[str, Any]) -> None:
        for key in ("images", "annotations", "refs"):
            if not isinstance(data.get(key), list):
                raise ModelkitError("DATA_INVALID", f"Expected a list under {key!r} in the annotation file")
        descriptions = data.get("descriptions", [])
        if not isinstance(descriptions, list):
            raise ModelkitError("DATA_INVALID", "Expected a list under 'descriptions' in the annotation file")

        for n, r in enumerate(data["images"]):
            where = f"images[{n}]"
            img = ImageRecord(
                id=_int(r, "id", where),
                file_name=_str(r, "file_name", where),
                width=_int(r, "width", where, minimum=1),
                height=_int(r, "height", where, minimum=1),
            )
            if img.id in self.images:
                raise ModelkitError("DATA_INVALID", f"{where}: duplicate image id {img.id}")
            self.images[img.id] = img

        for n, r in enumerate(data["annotations"]):
            where = f"annotations[{n}]"
            ann_id = _int(r, "id", where)
            image_id = _int(r, "image_id", where)
            if ann_id in self.annotations:
                raise ModelkitError("DATA_INVALID", f"{where}: duplicate annotation id {ann_id}")
            img = self.images.get(image_id)
            if img is None:
                raise ModelkitError("DATA_INVALID", f"{where}: image_id {image_id} is not in images")
            bbox = r.get("bbox")
            if not (
                isinstance(bbox, list) and len(bbox) == 4 and all(isinstance(v, int | float) for v in bbox)
            ):
                raise ModelkitError(
                    "DATA_INVALID", f"{where}: Expected bbox [x, y, w, h] but received {bbox!r}"
                )
            x, y, w, h = (float(v) for v in bbox)
            if w < 0 or h < 0 or x < 0 or y < 0 or x + w > img.width + 1e-6 or y + h > img.height + 1e-6:
                raise ModelkitError(
                    "DATA_INVALID",
                    f"{where}: bbox {bbox} does not fit image {image_id} ({img.width}x{img.height})",
                )
            seg = r.get("segmentation")
            if isinstance(seg, Mapping):
                size = seg.get("size")
                if list(size or []) != [img.height, img.width]:
                    raise ModelkitError(
                        "DATA_INVALID",
                        f"{where}: RLE size {size} differs from image {image_id}'s [height, width] "
                        f"[{img.height}, {img.width}]",
                    )
            elif not isinstance(seg, list):
                raise ModelkitError(
                    "DATA_INVALID",
                    f"{where}: Expected segmentation as an RLE object or polygons but received {seg!r}",
                )
            attrs = r.get("attributes") or {}
            if not isinstance(attrs, Mapping):
                raise ModelkitError("DATA_INVALID", f"{where}: Expected attributes as an object")
            category = r.get("category", "object")
            if not isinstance(category, str):
                raise ModelkitError("DATA_INVALID", f"{where}: Expected category as a string")
            self.annotations[ann_id] = AnnotationRecord(
                id=ann_id,
                image_id=image_id,
                bbox=(x, y, w, h),
                segmentation=seg,
                category=category,
                attributes={str(k): str(v) for k, v in attrs.items()},
            )

        seen_refs: set[int] = set()
        for n, r in enumerate(data["refs"]):
            where = f"refs[{n}]"
            ref_id = _int(r, "ref_id", where)
            image_id = _int(r, "image_id", where)
            if ref_id in seen_refs:
                raise ModelkitError("DATA_INVALID", f"{where}: duplicate ref_id {ref_id}")
            seen_refs.add(ref_id)
            if image_id not in self.images:
                raise ModelkitError("DATA_INVALID", f"{where}: image_id {image_id} is not in images")
            ann_ids = r.get("ann_ids")
            if not (isinstance(ann_ids, list) and all(_is_int(a) for a in ann_ids)):
                raise ModelkitError("DATA_INVALID", f"{where}: Expected ann_ids as a list of integers")
            for a in ann_ids:
                ann = self.annotations.get(a)
                if ann is None or ann.image_id != image_id:
                    raise ModelkitError(
                        "DATA_INVALID", f"{where}: annotation {a} is not an annotation of image {image_id}"
                    )
            if len(set(ann_ids)) != len(ann_ids):
                raise ModelkitError("DATA_INVALID", f"{where}: ann_ids {ann_ids} repeat an annotation")
            kind = r.get("kind", "absent" if not ann_ids else "other")
            if kind not in KINDS:
                raise ModelkitError(
                    "DATA_INVALID", f"{where}: Expected kind in {KINDS} but received {kind!r}"
                )
            if (kind == "absent") != (not ann_ids):
                raise ModelkitError(
                    "DATA_INVALID", f"{where}: kind 'absent' goes with empty ann_ids and only with them"
                )
            self.refs.append(
                RefRecord(
                    ref_id=ref_id,
                    image_id=image_id,
                    expression=_str(r, "expression", where),
                    ann_ids=tuple(int(a) for a in ann_ids),
                    kind=kind,
                )
            )

        for n, r in enumerate(descriptions):
            where = f"descriptions[{n}]"
            ann_id = _int(r, "ann_id", where)
            if ann_id not in self.annotations:
                raise ModelkitError("DATA_INVALID", f"{where}: ann_id {ann_id} is not in annotations")
            self.descriptions.append(DescriptionRecord(ann_id=ann_id, text=_str(r, "text", where)))

    # -- access ----------------------------------------------------------------------------------

    def image_path(self, image_id: int) -> Path:
        return self.root / self.images[image_id].file_name

    def load_image(self, image_id: int) -> Image.Image:
        """The image as RGB, checked against the recorded width and height."""
        path = self.image_path(image_id)
        try:
            with Image.open(path) as im:
                img = im.convert("RGB")
        except OSError as e:
            raise ModelkitError("IMAGE_DECODE_FAILED", f"cannot read {path}: {e}") from e
        rec = self.images[image_id]
        if img.size != (rec.width, rec.height):
            raise ModelkitError(
                "DATA_INVALID",
                f"{path} is {img.width}x{img.height}, the annotations say {rec.width}x{rec.height}",
            )
        return img

    def mask_for(self, ann_id: int) -> np.ndarray:
        """[H, W] bool mask of one annotation."""
        ann = self.annotations[ann_id]
        img = self.images[ann.image_id]
        if isinstance(ann.segmentation, Mapping):
            return rle_decode(ann.segmentation)
        return polygons_to_mask(ann.segmentation, img.height, img.width)

    def masks_for(self, ref: RefRecord) -> np.ndarray:
        """[K, H, W] bool, one mask per referent in ann_ids order; K = 0 for an absent target."""
        img = self.images[ref.image_id]
        out = np.zeros((len(ref.ann_ids), img.height, img.width), dtype=bool)
        for k, a in enumerate(ref.ann_ids):
            out[k] = self.mask_for(a)
        return out

    def boxes_for(self, ref: RefRecord) -> np.ndarray:
        """[K, 4] float64 boxes x0, y0, x1, y1 in pixels (from the COCO x, y, w, h)."""
        rows = [self.annotations[a].bbox for a in ref.ann_ids]
        return np.asarray([[x, y, x + w, y + h] for x, y, w, h in rows], dtype=np.float64).reshape(-1, 4)

    def refs_for_image(self, image_id: int) -> list[RefRecord]:
        return [r for r in self.refs if r.image_id == image_id]

    def annotations_for_image(self, image_id: int) -> list[AnnotationRecord]:
        return [self.annotations[a] for a in self._anns_by_image[image_id]]

    def description_of(self, ann_id: int) -> str | None:
        for d in self.descriptions:
            if d.ann_id == ann_id:
                return d.text
        return None


class MemoryRefDataset(RefDataset):
    """A RefDataset whose images are held in memory (scenes generated while training)."""

    def __init__(self, data: Mapping[str, Any], images: Mapping[int, Image.Image]) -> None:
        super().__init__(Path("."), data)
        self._images = dict(images)

    def load_image(self, image_id: int) -> Image.Image:
        return self._images[image_id]


def _int(r: Any, key: str, where: str, minimum: int | None = None) -> int:
    if not isinstance(r, Mapping):
        raise ModelkitError("DATA_INVALID", f"{where}: Expected an object but received {type(r).__name__}")
    v = r.get(key)
    if not _is_int(v) or (minimum is not None and v < minimum):
        bound = "" if minimum is None else f" >= {minimum}"
        raise ModelkitError(
            "DATA_INVALID", f"{where}: Expected an integer{bound} for {key} but received {v!r}"
        )
    return int(v)


def _str(r: Mapping[str, Any], key: str, where: str) -> str:
    v = r.get(key)
    if not isinstance(v, str) or not v:
        raise ModelkitError(
            "DATA_INVALID", f"{where}: Expected a non-empty string for {key} but received {v!r}"
        )
    return v


def load_refdata(path: Path | str) -> RefDataset:
    """Load an annotation file, or a folder holding annotations.json. Image paths resolve against
    the file's folder."""
    p = Path(path)
    if p.is_dir():
        p = p / ANNOTATION_FILE
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise ModelkitError("DATA_INVALID", f"{p} does not exist") from e
    except json.JSONDecodeError as e:
        raise ModelkitError("DATA_INVALID", f"{p} is not valid JSON: {e}") from e
    if not isinstance(data, Mapping):
        raise ModelkitError("DATA_INVALID", f"{p}: Expected a JSON object at the top level")
    return RefDataset(p.parent, data)


# --------------------------------------------------------------------------------------------------
# RefCOCO


def convert_refcoco(
    refs: Iterable[Mapping[str, Any]],
    instances: Mapping[str, Any],
    split: str | None = None,
    image_prefix: str = "",
) -> dict[str, Any]:
    """RefCOCO/+/g (`refs(unc).p` loaded with pickle, plus COCO `instances.json`) -> this format.

    Every sentence of a ref becomes one ref record with that ref's single annotation and kind
    "other". `split` keeps only refs of that split ("train", "val", "testA", ...); `image_prefix`
    is put before COCO file names (e.g. "train2014/"). Only images and annotations that some kept
    ref uses are written.
    """
    cats = {int(c["id"]): str(c["name"]) for c in instances.get("categories", [])}
    images_by_id = {int(i["id"]): i for i in instances["images"]}
    anns_by_id = {int(a["id"]): a for a in instances["annotations"]}
    out_refs: list[dict[str, Any]] = []
    used_images: set[int] = set()
    used_anns: set[int] = set()
    next_id = 1
    for ref in refs:
        if split is not None and ref.get("split") != split:
            continue
        ann_id = int(ref["ann_id"])
        image_id = int(ref["image_id"])
        if ann_id not in anns_by_id or image_id not in images_by_id:
            continue  # refs of a COCO split that was not given
        used_images.add(image_id)
        used_anns.add(ann_id)
        for sent in ref.get("sentences", []):
            text = str(sent.get("sent") or sent.get("raw") or "").strip()
            if text:
                out_refs.append(
                    {
                        "ref_id": next_id,
                        "image_id": image_id,
                        "expression": text,
                        "ann_ids": [ann_id],
                        "kind": "other",
                    }
                )
                next_id += 1
    images = [
        {
            "id": i,
            "file_name": image_prefix + str(images_by_id[i]["file_name"]),
            "width": int(images_by_id[i]["width"]),
            "height": int(images_by_id[i]["height"]),
        }
        for i in sorted(used_images)
    ]
    annotations = []
    for a in sorted(used_anns):
        src = anns_by_id[a]
        img = images_by_id[int(src["image_id"])]
        seg = src["segmentation"]
        if isinstance(seg, Mapping) and "size" not in seg:
            seg = {**seg, "size": [int(img["height"]), int(img["width"])]}
        x, y, w, h = (float(v) for v in src["bbox"])
        # COCO boxes are float and can overshoot the image by a fraction of a pixel.
        x, y = max(0.0, x), max(0.0, y)
        w, h = min(w, float(img["width"]) - x), min(h, float(img["height"]) - y)
        annotations.append(
            {
                "id": a,
                "image_id": int(src["image_id"]),
                "bbox": [x, y, w, h],
                "segmentation": seg,
                "category": cats.get(int(src.get("category_id", -1)), "object"),
            }
        )
    return {
        "info": {"format": FORMAT_NAME, "version": 1, "source": "refcoco"},
        "images": images,
        "annotations": annotations,
        "refs": out_refs,
        "descriptions": [],
    }
