"""Scoring predictions against referring-segmentation annotations (`modelkit score`).

Predictions format (JSON), written by `modelkit predict` (PyTorch) and by the TypeScript runtime's
evaluation script alike, so both paths are scored by the same code:

    {"refs": [{"ref_id": 1, "found": true,
               "instances": [{"box": [x1, y1, x2, y2], "score": 0.9,
                              "mask": {"size": [H, W], "counts": [...]} | null}]}],
     "descriptions": [{"ann_id": 7, "text": "a small red circle"}]}

Boxes are pixels of the original image (x2, y2 exclusive); masks are COCO RLE, uncompressed counts,
column-major (refdata.rle_encode / mask-post.ts rleEncode). A ref missing from the file counts as
`found: false` with no instances.

Metrics (per ref kind and overall; refs with targets unless said otherwise):
- masks (only when the file holds masks): cIoU = sum of intersections / sum of unions and
  mIoU = mean IoU, both of the union of a ref's predicted masks against the union of its target
  masks; Prec@0.5/0.7/0.9: the share of refs
  whose predictions and targets pair up one to one (greedy, highest mask IoU first) with every pair at
  IoU >= the threshold (for one target and one prediction: plain IoU >= t);
- boxes: Acc@0.5, the same one-to-one rule with box IoU;
- absent refs (no target): no-target accuracy = share with `found == false`; present refs: found rate;
- category refs (kind "category"): instance recall = targets matched by a prediction at box IoU >= 0.5
  (greedy one-to-one) / targets; extra-instance rate = predictions matched to no target / predictions;
- descriptions: colour-, shape- and size-word accuracy over the descriptions whose reference text
  names one (the predicted text must name exactly the reference's words of that group).
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ModelkitError
from .refdata import DescriptionRecord, RefDataset, load_refdata, rle_decode, rle_encode
from .synth import COLOURS, SHAPES, SIZES

PRED_FORMAT = "qwen3-vl-seg-predictions"
MASK_THRESHOLDS = (0.5, 0.7, 0.9)
BOX_THRESHOLD = 0.5
WORD_GROUPS: dict[str, dict[str, str]] = {
    # word -> canonical word (plurals fold onto the singular)
    "colour": {c: c for c in COLOURS},
    "shape": {**{s: s for s in SHAPES}, **{s + "s": s for s in SHAPES}},
    "size": {s: s for s in SIZES},
}


# --------------------------------------------------------------------------------------------------
# predictions file


@dataclass(frozen=True)
class Instance:
    box: tuple[float, float, float, float]
    score: float
    mask: Mapping[str, Any] | None


@dataclass(frozen=True)
class RefPrediction:
    ref_id: int
    found: bool
    instances: list[Instance]


@dataclass(frozen=True)
class Predictions:
    refs: dict[int, RefPrediction]
    descriptions: dict[int, str]
    mode: str | None = None
    image_ids: frozenset[int] | None = None  # None: every image of the annotations


def instance_json(box: Sequence[float], score: float, mask: np.ndarray | None) -> dict[str, Any]:
    """One predicted instance in the file's form (mask: [H, W] bool at the original size)."""
    return {
        "box": [round(float(v), 2) for v in box],
        "score": round(float(score), 5),
        "mask": None if mask is None else rle_encode(mask),
    }


def write_predictions(
    path: Path,
    refs: Sequence[Mapping[str, Any]],
    descriptions: Sequence[Mapping[str, Any]],
    mode: str | None = None,
    image_ids: Sequence[int] | None = None,
) -> None:
    """`mode` and `image_ids` are optional: `image_ids` limits scoring to those images (a subset
    run); mode "box" makes absent refs (which box prompting never sees) drop out of the score."""
    doc: dict[str, Any] = {"format": PRED_FORMAT, "version": 1}
    if mode is not None:
        doc["mode"] = mode
    if image_ids is not None:
        doc["image_ids"] = [int(i) for i in image_ids]
    doc.update(refs=list(refs), descriptions=list(descriptions))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, separators=(",", ":")) + "\n", encoding="utf-8")


def load_predictions(path: Path) -> Predictions:
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise ModelkitError("DATA_INVALID", f"predictions file {path} does not exist") from e
    except json.JSONDecodeError as e:
        raise ModelkitError("DATA_INVALID", f"{path} is not valid JSON: {e}") from e
    if not isinstance(doc, Mapping) or not isinstance(doc.get("refs", []), list):
        raise ModelkitError("DATA_INVALID", f"{path}: Expected an object with a 'refs' list")
    refs: dict[int, RefPrediction] = {}
    for n, r in enumerate(doc.get("refs", [])):
        where = f"{path}: refs[{n}]"
        if not isinstance(r, Mapping) or not isinstance(r.get("ref_id"), int):
            raise ModelkitError("DATA_INVALID", f"{where}: Expected an object with an integer ref_id")
        instances = []
        for k, inst in enumerate(r.get("instances") or []):
            box = inst.get("box") if isinstance(inst, Mapping) else None
            if not (isinstance(box, list) and len(box) == 4 and all(isinstance(v, int | float) for v in box)):
                raise ModelkitError("DATA_INVALID", f"{where}.instances[{k}]: Expected box [x1, y1, x2, y2]")
            mask = inst.get("mask")
            if mask is not None and not isinstance(mask, Mapping):
                raise ModelkitError("DATA_INVALID", f"{where}.instances[{k}]: Expected mask as RLE or null")
            instances.append(Instance(tuple(float(v) for v in box), float(inst.get("score", 0.0)), mask))  # type: ignore[arg-type]
        found = r.get("found")
        refs[int(r["ref_id"])] = RefPrediction(
            int(r["ref_id"]), bool(found) if found is not None else bool(instances), instances
        )
    descriptions: dict[int, str] = {}
    for n, d in enumerate(doc.get("descriptions") or []):
        if not (
            isinstance(d, Mapping) and isinstance(d.get("ann_id"), int) and isinstance(d.get("text"), str)
        ):
            raise ModelkitError("DATA_INVALID", f"{path}: descriptions[{n}]: Expected {{ann_id, text}}")
        descriptions[int(d["ann_id"])] = str(d["text"])
    mode = doc.get("mode")
    ids = doc.get("image_ids")
    if ids is not None and not (isinstance(ids, list) and all(isinstance(i, int) for i in ids)):
        raise ModelkitError("DATA_INVALID", f"{path}: Expected image_ids as a list of integers")
    return Predictions(
        refs,
        descriptions,
        str(mode) if mode is not None else None,
        frozenset(ids) if ids is not None else None,
    )


# --------------------------------------------------------------------------------------------------
# geometry


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _mask_inter_union(a: np.ndarray, b: np.ndarray) -> tuple[int, int]:
    return int(np.logical_and(a, b).sum()), int(np.logical_or(a, b).sum())


def greedy_match(iou: np.ndarray) -> list[tuple[int, int, float]]:
    """One-to-one pairs (pred, target, iou) taken by decreasing IoU (pairs with IoU 0 included, so
    every prediction or every target is paired)."""
    pairs: list[tuple[int, int, float]] = []
    if iou.size == 0:
        return pairs
    m = iou.astype(np.float64).copy()
    for _ in range(min(m.shape)):
        p, t = np.unravel_index(int(np.argmax(m)), m.shape)
        pairs.append((int(p), int(t), float(iou[p, t])))
        m[p, :] = -1.0
        m[:, t] = -1.0
    return pairs


def one_to_one_correct(iou: np.ndarray, threshold: float) -> bool:
    """Predictions [P] and targets [T] pair up one to one with every pair at IoU >= threshold."""
    n_pred, n_tgt = iou.shape
    if n_pred != n_tgt:
        return False
    return all(v >= threshold for _, _, v in greedy_match(iou))


def text_words(text: str, group: str) -> set[str]:
    words = re.findall(r"[a-z]+", text.lower())
    table = WORD_GROUPS[group]
    return {table[w] for w in words if w in table}


# --------------------------------------------------------------------------------------------------
# scoring


class _Acc:
    """Sums for one group of refs (a kind, or all)."""

    def __init__(self) -> None:
        self.inter = 0
        self.union = 0
        self.ious: list[float] = []
        self.mask_hits = {t: 0 for t in MASK_THRESHOLDS}
        self.mask_refs = 0
        self.box_hits = 0
        self.present = 0
        self.found_present = 0
        self.absent = 0
        self.absent_correct = 0
        self.cat_targets = 0
        self.cat_recalled = 0
        self.cat_preds = 0
        self.cat_extra = 0

    def result(self) -> dict[str, Any]:
        out: dict[str, Any] = {"refs": self.present + self.absent}
        if self.present:
            out["found_rate"] = self.found_present / self.present
            out["box_acc@0.5"] = self.box_hits / self.present
        if self.mask_refs:
            out["ciou"] = self.inter / self.union if self.union else 0.0
            out["miou"] = float(np.mean(self.ious))
            for t in MASK_THRESHOLDS:
                out[f"prec@{t}"] = self.mask_hits[t] / self.mask_refs
        if self.absent:
            out["no_target_acc"] = self.absent_correct / self.absent
        if self.cat_targets:
            out["instance_recall@0.5"] = self.cat_recalled / self.cat_targets
            out["extra_instance_rate"] = self.cat_extra / self.cat_preds if self.cat_preds else 0.0
        return out


def score(ds: RefDataset, preds: Predictions) -> dict[str, Any]:
    """All metrics, overall and per ref kind (see the module docstring)."""
    groups: dict[str, _Acc] = {"all": _Acc()}
    missing = 0
    # Mask metrics for segmentation files (modes ground/box, or any mask present); a boxes-only file
    # (e.g. the `ground` tool's output) is scored on boxes alone.
    with_masks = preds.mode in ("ground", "box") or any(
        i.mask is not None for r in preds.refs.values() for i in r.instances
    )
    for ref in ds.refs if preds.mode != "describe" else []:
        if preds.image_ids is not None and ref.image_id not in preds.image_ids:
            continue
        if preds.mode == "box" and not ref.ann_ids:
            continue  # box prompting has no absent targets
        pred = preds.refs.get(ref.ref_id)
        if pred is None:
            missing += 1
            pred = RefPrediction(ref.ref_id, False, [])
        accs = [groups["all"], groups.setdefault(ref.kind, _Acc())]
        instances = pred.instances if pred.found else []
        if not ref.ann_ids:
            for a in accs:
                a.absent += 1
                a.absent_correct += int(not pred.found)
            continue
        img = ds.images[ref.image_id]
        gt_masks = ds.masks_for(ref)  # [T, H, W]
        gt_boxes = ds.boxes_for(ref)  # [T, 4]
        box_ious = np.asarray(
            [[box_iou(p.box, g) for g in gt_boxes] for p in instances], dtype=np.float64
        ).reshape(len(instances), len(gt_boxes))
        pred_masks = np.zeros((len(instances), img.height, img.width), dtype=bool)  # [P, H, W]
        for i, p in enumerate(instances):
            if p.mask is not None:
                pred_masks[i] = _decode_pred_mask(p.mask, img.height, img.width, ref.ref_id)
        for a in accs:
            a.present += 1
            a.found_present += int(pred.found and bool(instances))
            a.box_hits += int(one_to_one_correct(box_ious, BOX_THRESHOLD))
        if with_masks:
            # An instance without a mask in a file that has masks counts as an empty mask.
            inter, union = _mask_inter_union(pred_masks.any(0), gt_masks.any(0))
            miou = np.zeros((len(instances), len(gt_masks)))
            for i in range(len(instances)):
                for j in range(len(gt_masks)):
                    ii, uu = _mask_inter_union(pred_masks[i], gt_masks[j])
                    miou[i, j] = ii / uu if uu else 0.0
            for a in accs:
                a.mask_refs += 1
                a.inter += inter
                a.union += union
                a.ious.append(inter / union if union else 0.0)
                for t in MASK_THRESHOLDS:
                    a.mask_hits[t] += int(one_to_one_correct(miou, t))
        if ref.kind == "category":
            matched = [v for _, _, v in greedy_match(box_ious) if v >= BOX_THRESHOLD]
            for a in accs:
                a.cat_targets += len(gt_boxes)
                a.cat_recalled += len(matched)
                a.cat_preds += len(instances)
                a.cat_extra += len(instances) - len(matched)

    result: dict[str, Any] = {
        "overall": groups["all"].result(),
        "by_kind": {k: v.result() for k, v in sorted(groups.items()) if k != "all"},
        "missing_refs": missing,
    }
    if ds.descriptions and preds.mode in (None, "describe"):
        wanted = [
            d
            for d in ds.descriptions
            if preds.image_ids is None or ds.annotations[d.ann_id].image_id in preds.image_ids
        ]
        result["descriptions"] = score_descriptions(wanted, preds.descriptions)
    return result


def _decode_pred_mask(rle: Mapping[str, Any] | None, h: int, w: int, ref_id: int) -> np.ndarray:
    if rle is None:
        raise AssertionError("unreachable: masks are decoded only when present")
    mask = rle_decode(rle)
    if mask.shape != (h, w):
        raise ModelkitError(
            "DATA_INVALID",
            f"ref {ref_id}: predicted mask is {mask.shape[1]}x{mask.shape[0]}, the image is {w}x{h}",
        )
    return mask


def score_descriptions(wanted: Sequence[DescriptionRecord], predicted: Mapping[int, str]) -> dict[str, Any]:
    out: dict[str, Any] = {"descriptions": len(wanted), "predicted": 0}
    for group in WORD_GROUPS:
        hits, total = 0, 0
        for d in wanted:
            want = text_words(d.text, group)
            if not want:
                continue
            total += 1
            got = predicted.get(d.ann_id)
            hits += int(got is not None and text_words(got, group) == want)
        if total:
            out[f"{group}_acc"] = hits / total
            out[f"{group}_n"] = total
    out["predicted"] = sum(1 for d in wanted if d.ann_id in predicted)
    exact = [predicted.get(d.ann_id, "").strip().lower() == d.text.strip().lower() for d in wanted]
    out["exact_acc"] = float(np.mean(exact)) if exact else 0.0
    return out


# --------------------------------------------------------------------------------------------------
# report


COLUMNS = (
    ("refs", "refs", "{:d}"),
    ("miou", "mIoU", "{:.3f}"),
    ("ciou", "cIoU", "{:.3f}"),
    ("prec@0.5", "P@.5", "{:.3f}"),
    ("prec@0.7", "P@.7", "{:.3f}"),
    ("prec@0.9", "P@.9", "{:.3f}"),
    ("box_acc@0.5", "box@.5", "{:.3f}"),
    ("found_rate", "found", "{:.3f}"),
    ("no_target_acc", "no-tgt", "{:.3f}"),
    ("instance_recall@0.5", "inst-R", "{:.3f}"),
    ("extra_instance_rate", "extra", "{:.3f}"),
)


def format_report(result: Mapping[str, Any]) -> str:
    rows = [("overall", result["overall"]), *result["by_kind"].items()]
    header = f"{'kind':<10}" + "".join(f"{title:>8}" for _, title, _ in COLUMNS)
    lines = [header] if result["overall"]["refs"] else []
    for name, r in rows if lines else []:
        cells = "".join(f"{fmt.format(r[key]) if key in r else '-':>8}" for key, _, fmt in COLUMNS)
        lines.append(f"{name:<10}" + cells)
    d = result.get("descriptions")
    if d:
        parts = [f"{g} {d[g + '_acc']:.3f} (n={d[g + '_n']})" for g in WORD_GROUPS if g + "_acc" in d]
        lines.append(f"descriptions ({d['predicted']}/{d['descriptions']} predicted): " + ", ".join(parts))
    if result.get("missing_refs"):
        lines.append(f"refs without a prediction (scored as not found): {result['missing_refs']}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# the command (its arguments are declared in cli.py)


def cmd_score(args: argparse.Namespace) -> int:
    result = score(load_refdata(args.data), load_predictions(args.pred))
    print(json.dumps(result, indent=2) if args.json else format_report(result))
    return 0
