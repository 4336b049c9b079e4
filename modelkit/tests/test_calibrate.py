"""Grounding calibration: the logistic fit, the AUC, the threshold and what lands in pack.json."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from modelkit.calibrate import auc, calibrate, cmd_calibrate, fit_logistic, label_agreement
from modelkit.errors import ModelkitError
from modelkit.refdata import RefDataset

RIGHT = [10.0, 10.0, 50.0, 50.0]
WRONG = [60.0, 60.0, 90.0, 90.0]


def _scenes(n: int, rng: np.random.Generator) -> tuple[dict[str, Any], dict[str, Any]]:
    """n scenes, each with a one-target ref (the model writes the right box, sometimes also a wrong
    one) and an absent ref (the model writes a wrong box anyway). Right boxes have surer coordinate
    tokens than wrong ones, with noise, as a model that knows a little would."""
    images, anns, refs, preds = [], [], [], []
    for i in range(1, n + 1):
        images.append({"id": i, "file_name": f"{i}.png", "width": 100, "height": 100})
        anns.append(
            {
                "id": i,
                "image_id": i,
                "bbox": [10, 10, 40, 40],
                "category": "square",
                "segmentation": [[10, 10, 50, 10, 50, 50, 10, 50]],
            }
        )
        refs.append(
            {"ref_id": 2 * i, "image_id": i, "expression": "the square", "ann_ids": [i], "kind": "attribute"}
        )
        refs.append(
            {"ref_id": 2 * i + 1, "image_id": i, "expression": "a cat", "ann_ids": [], "kind": "absent"}
        )

        def inst(box: list[float], sure: bool) -> dict[str, Any]:
            coord = (-0.2 if sure else -1.5) + 0.3 * rng.standard_normal()
            return {
                "box": box,
                "score": 0.5,
                "mask_score": 0.9,
                "evidence": [-0.1, min(coord, 0.0), min(coord * 2, 0.0), -0.3],
                # Wrong boxes are sometimes labelled as asked too: the label alone does not separate.
                "label": "square" if sure or rng.random() < 0.3 else "circle",
                "mask": None,
            }

        present = [inst(RIGHT, True)] + ([inst(WRONG, False)] if i % 3 == 0 else [])
        preds.append({"ref_id": 2 * i, "found": True, "instances": present, "empty_masks": 0})
        preds.append(
            {"ref_id": 2 * i + 1, "found": True, "instances": [inst(WRONG, False)], "empty_masks": i % 5 == 0}
        )
    return {"images": images, "annotations": anns, "refs": refs}, {"refs": preds}


def test_fit_logistic_recovers_a_known_model() -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4000, 2))
    p = 1 / (1 + np.exp(-(x @ np.array([2.0, -1.0]) + 0.5)))
    y = (rng.random(4000) < p).astype(np.float64)
    w, b = fit_logistic(x, y, l2=0.0)
    assert np.allclose(w, [2.0, -1.0], atol=0.2) and abs(b - 0.5) < 0.15


def test_auc_counts_ties_half_and_needs_both_classes() -> None:
    assert auc([0.9, 0.1], [True, False]) == 1.0
    assert auc([0.5, 0.5], [True, False]) == 0.5
    assert auc([0.2, 0.8, 0.5], [True, False, False]) == 0.0
    assert auc([0.2], [True]) is None


def test_calibration_separates_right_from_wrong_and_trades_recall_for_absent_accuracy() -> None:
    data, preds = _scenes(90, np.random.default_rng(1))
    block = calibrate(RefDataset(Path("."), data), preds, holdout_images=30)
    m = block["metrics"]
    assert block["features"] == ["open", "coord_mean", "coord_min", "label_mean"]
    assert 0 < block["threshold"] < 1
    assert m["heldout_images"] == 30 and m["fit_images"] == 60
    assert m["auc"] > 0.95
    # Before: every absent ref got a (wrong) box, so none was reported absent; every target was found.
    assert m["before"]["absent_accuracy"] == 0.0
    assert m["before"]["single_target_recall"] == 1.0
    # After: the threshold, picked on the fit scenes, drops the unsure wrong boxes.
    assert m["after"]["absent_accuracy"] > 0.8
    assert m["after"]["single_target_recall"] > 0.8


def test_cmd_writes_the_block_into_pack_json_keeping_other_keys(tmp_path: Path) -> None:
    data, preds = _scenes(40, np.random.default_rng(2))
    (tmp_path / "annotations.json").write_text(json.dumps(data))
    (tmp_path / "preds.json").write_text(json.dumps(preds))
    pack = tmp_path / "pack"
    pack.mkdir()
    (pack / "pack.json").write_text(json.dumps({"name": "p", "files": {}}))
    args = argparse.Namespace(
        data=tmp_path / "annotations.json",
        pred=tmp_path / "preds.json",
        pack=pack,
        holdout_images=10,
        fitted_on="synthetic test scenes",
        label_agreement=False,
    )
    assert cmd_calibrate(args) == 0
    manifest = json.loads((pack / "pack.json").read_text())
    assert list(manifest) == ["name", "files", "calibration"]
    g = manifest["calibration"]["grounding"]
    assert g["kind"] == "logistic" and len(g["weights"]) == 4 and g["fitted_on"] == "synthetic test scenes"


def test_label_agreement_as_a_fifth_feature() -> None:
    data, preds = _scenes(90, np.random.default_rng(1))
    block = calibrate(RefDataset(Path("."), data), preds, holdout_images=30, label_agreement_feature=True)
    assert block["features"][-1] == "label_agreement" and len(block["weights"]) == 5
    # Right boxes are always labelled as asked, wrong ones only sometimes: the label adds evidence.
    assert block["weights"][-1] > 0
    del preds["refs"][0]["instances"][0]["label"]
    with pytest.raises(ModelkitError, match="no evidence or label"):
        calibrate(RefDataset(Path("."), data), preds, holdout_images=30, label_agreement_feature=True)


def test_label_agreement_matches_the_runtime_cases() -> None:
    fixture = Path(__file__).resolve().parents[2] / "test" / "fixtures" / "label-agreement.json"
    for case in json.loads(fixture.read_text())["cases"]:
        assert label_agreement(case["label"], case["expression"]) == case["agreement"], case


def test_predictions_without_evidence_are_refused() -> None:
    data, preds = _scenes(6, np.random.default_rng(3))
    del preds["refs"][0]["instances"][0]["evidence"]
    with pytest.raises(ModelkitError, match="--min-score 0"):
        calibrate(RefDataset(Path("."), data), preds, holdout_images=2)
