"""Grounding calibration (`modelkit calibrate`): from the token evidence of the boxes a pack writes on
held-out scenes to one grounding score per box and a threshold, stored in the pack's pack.json.

Input: predictions of `bench/eval.ts --mode ground --min-score 0` (every box the model wrote, with
its evidence: the natural-log probabilities of the token that opened the object, the mean and least of
its coordinate tokens, and the mean of its label tokens; the label it wrote; and per ref how many empty
masks were left out). With `label_agreement` a fifth feature is the label's agreement with the
expression (the share of the label's words the expression uses; the runtime's confidence.ts computes
the same). A box is right when its box IoU with one of the ref's targets is >= 0.5.

The fit: logistic regression (Newton's method, a very little L2) of right/wrong on the features,
on the scenes after the first `holdout` (in annotation order); the threshold is picked on those same
fit boxes where it best separates right from wrong ones (the largest true-positive rate minus
false-positive rate, Youden's J). A threshold picked on refs instead (absent accuracy + recall) runs
to where nothing is returned when the model is mostly wrong, which helps no one; `min_score` moves
it per call. The first `holdout` scenes are only measured: the AUC of the score for right vs wrong
boxes, the precision of the boxes returned, and absent-target accuracy (an absent ref returns
nothing) and single-target recall (a one-target ref returns a right box) before (every box
returned, empty masks counted as found: the runtime before calibration) and after (boxes below the
threshold and empty masks left out).
"""

from __future__ import annotations

import argparse
import functools
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ModelkitError
from .evaluate import box_iou
from .refdata import RefDataset, load_refdata

TOKEN_FEATURES = ("open", "coord_mean", "coord_min", "label_mean")
AGREEMENT = "label_agreement"
RIGHT_IOU = 0.5


def _words(text: str) -> set[str]:
    """Lower-case runs of letters and digits, a plural "s" dropped (but not "ss") from longer words."""
    out = set()
    for w in re.findall(r"[^\W_]+", text.lower()):
        out.add(w[:-1] if len(w) > 3 and w.endswith("s") and not w.endswith("ss") else w)
    return out


def label_agreement(label: str, expression: str) -> float:
    """The share of the label's distinct words that the expression also uses (0 for no words); the
    runtime's labelAgreement (src/runtime/confidence.ts), checked on test/fixtures/label-agreement.json."""
    said = _words(label)
    return len(said & _words(expression)) / len(said) if said else 0.0


@dataclass(frozen=True)
class Box:
    features: tuple[float, ...]  # TOKEN_FEATURES, then AGREEMENT when asked for
    right: bool


@dataclass(frozen=True)
class RefOutcome:
    ref_id: int
    image_id: int
    targets: int
    boxes: list[Box]
    empty_masks: int


def collect(
    ds: RefDataset, doc: Mapping[str, Any], label_agreement_feature: bool = False
) -> list[RefOutcome]:
    """Pair every predicted box with whether it is right; refs missing from the file are skipped."""
    by_id = {r.ref_id: r for r in ds.refs}
    out: list[RefOutcome] = []
    for n, r in enumerate(doc.get("refs") or []):
        ref = by_id.get(r.get("ref_id")) if isinstance(r, Mapping) else None
        if ref is None:
            raise ModelkitError("DATA_INVALID", f"refs[{n}]: ref_id not in the annotations")
        targets = ds.boxes_for(ref)  # [K, 4]
        boxes: list[Box] = []
        for k, inst in enumerate(r.get("instances") or []):
            ev = inst.get("evidence")
            label = inst.get("label")
            if not (isinstance(ev, list) and len(ev) == 4) or (
                label_agreement_feature and not isinstance(label, str)
            ):
                missing = "evidence or label" if label_agreement_feature else "evidence"
                raise ModelkitError(
                    "DATA_INVALID",
                    f"refs[{n}].instances[{k}] has no {missing}: write the predictions with "
                    "bench/eval.ts --mode ground --min-score 0",
                )
            right = any(box_iou(inst["box"], t) >= RIGHT_IOU for t in targets)
            features = tuple(float(v) for v in ev)
            if label_agreement_feature:
                features = (*features, label_agreement(label, ref.expression))
            boxes.append(Box(features, right))
        out.append(
            RefOutcome(ref.ref_id, ref.image_id, len(ref.ann_ids), boxes, int(r.get("empty_masks", 0)))
        )
    return out


def fit_logistic(
    x: np.ndarray, y: np.ndarray, l2: float = 1e-4, steps: int = 100
) -> tuple[np.ndarray, float]:
    """x [N, F], y [N] in {0, 1} -> weights [F], bias; Newton's method on the L2-penalised log loss."""
    n, f = x.shape
    a = np.concatenate([x, np.ones((n, 1))], axis=1)  # [N, F + 1]
    theta = np.zeros(f + 1)
    penalty = np.diag([l2] * f + [0.0])  # the bias is not penalised
    for _ in range(steps):
        p = 1.0 / (1.0 + np.exp(-(a @ theta)))
        grad = a.T @ (p - y) / n + penalty @ theta
        hess = (a * (p * (1 - p))[:, None]).T @ a / n + penalty + 1e-9 * np.eye(f + 1)
        delta = np.linalg.solve(hess, grad)
        theta -= delta
        if float(np.abs(delta).max()) < 1e-10:
            break
    return theta[:f], float(theta[f])


def auc(scores: Sequence[float], labels: Sequence[bool]) -> float | None:
    """Area under the ROC curve (ties count half); None without both classes."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels, dtype=bool)
    pos, neg = s[y], s[~y]
    if len(pos) == 0 or len(neg) == 0:
        return None
    greater = (pos[:, None] > neg[None, :]).sum()
    ties = (pos[:, None] == neg[None, :]).sum()
    return float((greater + 0.5 * ties) / (len(pos) * len(neg)))


def found_metrics(
    refs: Sequence[RefOutcome], score: Any, threshold: float, empty_found: bool
) -> dict[str, Any]:
    """Absent accuracy and single-target recall when boxes below `threshold` are left out.
    `empty_found`: an empty mask still makes `found` true (the behaviour before this rule)."""
    absent = [r for r in refs if r.targets == 0]
    single = [r for r in refs if r.targets == 1]

    def kept(r: RefOutcome) -> list[Box]:
        return [b for b in r.boxes if score(b) >= threshold]

    def found(r: RefOutcome) -> bool:
        return len(kept(r)) > 0 or (empty_found and r.empty_masks > 0)

    return {
        "absent_accuracy": _share(sum(not found(r) for r in absent), len(absent)),
        "absent_refs": len(absent),
        "single_target_recall": _share(sum(any(b.right for b in kept(r)) for r in single), len(single)),
        "single_target_refs": len(single),
    }


def _share(k: int, n: int) -> float | None:
    return round(k / n, 4) if n else None


def choose_threshold(boxes: Sequence[Box], score: Any) -> float:
    """The score at which right and wrong boxes separate best: the largest true-positive rate minus
    false-positive rate (Youden's J) over the boxes' own scores (lowest on ties)."""
    s = np.asarray([score(b) for b in boxes], dtype=np.float64)  # [N]
    y = np.asarray([b.right for b in boxes], dtype=bool)  # [N]
    best, best_j = 0.0, -1.0
    for t in np.unique(s):
        j = float((s[y] >= t).mean() - (s[~y] >= t).mean())
        if j > best_j + 1e-12:
            best, best_j = float(t), j
    return best


def precision(boxes: Sequence[Box], score: Any, threshold: float) -> float | None:
    """The share of right boxes among those at or above `threshold`."""
    kept = [b.right for b in boxes if score(b) >= threshold]
    return _share(sum(kept), len(kept))


def calibrate(
    ds: RefDataset, doc: Mapping[str, Any], holdout_images: int, label_agreement_feature: bool = False
) -> dict[str, Any]:
    """The pack.json `calibration.grounding` block, with its held-out measurements in `metrics`."""
    order = list(ds.images)
    held = set(order[:holdout_images])
    refs = collect(ds, doc, label_agreement_feature)
    fit = [r for r in refs if r.image_id not in held]
    test = [r for r in refs if r.image_id in held]
    fit_boxes = [b for r in fit for b in r.boxes]
    if len({b.right for b in fit_boxes}) < 2:
        raise ModelkitError(
            "DATA_INVALID",
            f"the fit scenes hold {len(fit_boxes)} boxes, not both right and wrong ones: use more scenes",
        )
    x = np.asarray([b.features for b in fit_boxes], dtype=np.float64)  # [N, F]
    y = np.asarray([b.right for b in fit_boxes], dtype=np.float64)  # [N]
    w, bias = fit_logistic(x, y)

    @functools.cache
    def calibrated(b: Box) -> float:
        return float(1.0 / (1.0 + np.exp(-(float(np.dot(w, b.features)) + bias))))

    def uncalibrated(b: Box) -> float:  # the runtime's score without a calibration
        return float(np.exp(b.features[1]))

    threshold = choose_threshold(fit_boxes, calibrated)
    test_boxes = [b for r in test for b in r.boxes]
    labels = [b.right for b in test_boxes]
    metrics = {
        "heldout_images": len(held),
        "heldout_boxes": len(test_boxes),
        "heldout_right_boxes": sum(labels),
        "fit_images": len(order) - len(held),
        "fit_boxes": len(fit_boxes),
        "auc": _round(auc([calibrated(b) for b in test_boxes], labels)),
        "auc_uncalibrated": _round(auc([uncalibrated(b) for b in test_boxes], labels)),
        "before": {
            **found_metrics(test, calibrated, 0.0, empty_found=True),
            "precision": precision(test_boxes, calibrated, 0.0),
        },
        "after": {
            **found_metrics(test, calibrated, threshold, empty_found=False),
            "precision": precision(test_boxes, calibrated, threshold),
        },
    }
    return {
        "kind": "logistic",
        "features": [*TOKEN_FEATURES, *([AGREEMENT] if label_agreement_feature else [])],
        "weights": [round(float(v), 6) for v in w],
        "bias": round(bias, 6),
        "threshold": threshold,
        "metrics": metrics,
    }


def _round(v: float | None) -> float | None:
    return None if v is None else round(v, 4)


def write_calibration(pack_dir: Path, block: Mapping[str, Any]) -> None:
    """Set pack.json's calibration.grounding, keeping the other keys and their order."""
    path = Path(pack_dir) / "pack.json"
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise ModelkitError("PACK_INVALID", f"{path} does not exist: give the pack folder") from e
    calibration = dict(manifest.get("calibration") or {})
    calibration["grounding"] = dict(block)
    manifest["calibration"] = calibration
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    tmp.replace(path)


def cmd_calibrate(args: argparse.Namespace) -> int:
    ds = load_refdata(args.data)
    try:
        doc = json.loads(Path(args.pred).read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError) as e:
        raise ModelkitError("DATA_INVALID", f"cannot read predictions {args.pred}: {e}") from e
    block = calibrate(ds, doc, args.holdout_images, args.label_agreement)
    block["fitted_on"] = (
        args.fitted_on
        or f"{Path(args.data).parent.name or args.data}: images after the first {args.holdout_images}"
    )
    if args.pack is not None:
        write_calibration(args.pack, block)
    print(json.dumps(block, indent=2))
    return 0
