"""`modelkit score`: metrics on hand-made predictions (perfect, empty, absent, partial overlap,
multi-instance), the predictions file format, and the grounding-answer parser of `predict`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from modelkit.cli import main
from modelkit.errors import ModelkitError
from modelkit.evaluate import (
    greedy_match,
    instance_json,
    load_predictions,
    one_to_one_correct,
    score,
    text_words,
    write_predictions,
)
from modelkit.predict import last_coordinate_tokens, parse_boxes
from modelkit.refdata import load_refdata, rle_decode, rle_encode

H, W = 20, 30


def rect(x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
    m = np.zeros((H, W), dtype=bool)
    m[y0:y1, x0:x1] = True
    return m


# Three objects: A (x 0..10, y 0..10), B (x 12..20, y 0..10), C (x 22..30, y 10..20).
OBJECTS = {1: (0, 0, 10, 10), 2: (12, 0, 20, 10), 3: (22, 10, 30, 20)}


def write_dataset(root: Path) -> Path:
    anns = [
        {
            "id": a,
            "image_id": 1,
            "bbox": [x0, y0, x1 - x0, y1 - y0],
            "segmentation": rle_encode(rect(x0, y0, x1, y1)),
            "category": "square",
            "attributes": {"shape": "square", "colour": c, "size": "small"},
        }
        for (a, (x0, y0, x1, y1)), c in zip(OBJECTS.items(), ("red", "blue", "red"), strict=True)
    ]
    refs = [
        {"ref_id": 1, "image_id": 1, "expression": "the blue square", "ann_ids": [2], "kind": "attribute"},
        {"ref_id": 2, "image_id": 1, "expression": "all red squares", "ann_ids": [1, 3], "kind": "category"},
        {"ref_id": 3, "image_id": 1, "expression": "the green star", "ann_ids": [], "kind": "absent"},
        {"ref_id": 4, "image_id": 1, "expression": "the left square", "ann_ids": [1], "kind": "position"},
    ]
    doc = {
        "images": [{"id": 1, "file_name": "img.png", "width": W, "height": H}],
        "annotations": anns,
        "refs": refs,
        "descriptions": [
            {"ann_id": 1, "text": "a small red square"},
            {"ann_id": 2, "text": "a small blue square"},
        ],
    }
    path = root / "annotations.json"
    path.write_text(json.dumps(doc))
    return path


def inst(box: tuple[int, int, int, int], mask: np.ndarray | None = None) -> dict[str, Any]:
    return instance_json(box, 0.9, rect(*box) if mask is None else mask)


def run_score(
    tmp_path: Path, refs: list[dict[str, Any]], descriptions: list[dict[str, Any]] | None = None
) -> dict:
    data = write_dataset(tmp_path)
    pred = tmp_path / "pred.json"
    write_predictions(pred, refs, descriptions or [])
    return score(load_refdata(data), load_predictions(pred))


def perfect() -> list[dict[str, Any]]:
    return [
        {"ref_id": 1, "found": True, "instances": [inst(OBJECTS[2])]},
        {"ref_id": 2, "found": True, "instances": [inst(OBJECTS[3]), inst(OBJECTS[1])]},
        {"ref_id": 3, "found": False, "instances": []},
        {"ref_id": 4, "found": True, "instances": [inst(OBJECTS[1])]},
    ]


def test_perfect_predictions_score_one(tmp_path: Path) -> None:
    r = run_score(
        tmp_path,
        perfect(),
        [{"ann_id": 1, "text": "a small red square"}, {"ann_id": 2, "text": "A blue Square."}],
    )
    o = r["overall"]
    assert o["refs"] == 4
    for key in (
        "miou",
        "ciou",
        "prec@0.5",
        "prec@0.7",
        "prec@0.9",
        "box_acc@0.5",
        "found_rate",
        "no_target_acc",
    ):
        assert o[key] == pytest.approx(1.0), key
    assert o["instance_recall@0.5"] == 1.0 and o["extra_instance_rate"] == 0.0
    assert set(r["by_kind"]) == {"attribute", "category", "absent", "position"}
    d = r["descriptions"]
    # "A blue Square." names blue + square but not the size word: size fails, colour and shape pass.
    assert d["colour_acc"] == 1.0 and d["shape_acc"] == 1.0 and d["size_acc"] == 0.5
    assert d["exact_acc"] == 0.5


def test_empty_predictions(tmp_path: Path) -> None:
    refs = [{"ref_id": i, "found": False, "instances": []} for i in (1, 2, 3, 4)]
    o = run_score(tmp_path, refs)["overall"]
    # Masks are not scored for a file without any mask; boxes and found are.
    assert "miou" not in o
    assert o["box_acc@0.5"] == 0.0 and o["found_rate"] == 0.0
    assert o["no_target_acc"] == 1.0
    assert o["instance_recall@0.5"] == 0.0


def test_missing_refs_count_as_not_found(tmp_path: Path) -> None:
    r = run_score(tmp_path, [{"ref_id": 1, "found": True, "instances": [inst(OBJECTS[2])]}])
    assert r["missing_refs"] == 3
    assert r["overall"]["found_rate"] == pytest.approx(1 / 3)
    assert r["overall"]["no_target_acc"] == 1.0
    # ref 1 (80 px) perfect, refs 2 (A + C, 180 px) and 4 (A, 100 px) empty: 80 / (80 + 180 + 100)
    assert r["overall"]["ciou"] == pytest.approx(80 / 360)


def test_absent_ref_found_is_wrong(tmp_path: Path) -> None:
    refs = perfect()
    refs[2] = {"ref_id": 3, "found": True, "instances": [inst(OBJECTS[1])]}
    r = run_score(tmp_path, refs)
    assert r["by_kind"]["absent"]["no_target_acc"] == 0.0
    assert r["overall"]["miou"] == 1.0  # absent refs do not enter the mask metrics


def test_partial_overlap(tmp_path: Path) -> None:
    refs = perfect()
    # ref 1: predicted x 14..20 (60 px) inside the 80-px target: IoU 0.75, box IoU 0.75.
    refs[0] = {"ref_id": 1, "found": True, "instances": [inst((14, 0, 20, 10))]}
    r = run_score(tmp_path, refs)
    a = r["by_kind"]["attribute"]
    assert a["miou"] == pytest.approx(0.75)
    assert a["prec@0.5"] == 1.0 and a["prec@0.7"] == 1.0 and a["prec@0.9"] == 0.0
    assert a["box_acc@0.5"] == 1.0
    o = r["overall"]
    assert o["miou"] == pytest.approx((0.75 + 1 + 1) / 3)
    # cIoU: intersections 60 + 180 + 100, unions 80 + 180 + 100
    assert o["ciou"] == pytest.approx(340 / 360)


def test_multi_instance_matching(tmp_path: Path) -> None:
    refs = perfect()
    # One of the two red squares, plus a wrong extra (the blue one): instance recall 1/2, extra 1/2.
    refs[1] = {"ref_id": 2, "found": True, "instances": [inst(OBJECTS[1]), inst(OBJECTS[2])]}
    c = run_score(tmp_path, refs)["by_kind"]["category"]
    assert c["instance_recall@0.5"] == 0.5 and c["extra_instance_rate"] == 0.5
    assert c["prec@0.5"] == 0.0 and c["box_acc@0.5"] == 0.0
    # union mask: predicted A+B (180 px) vs target A+C (180 px), intersection A (100): 100 / 260
    assert c["miou"] == pytest.approx(100 / 260)
    # Only one of the two: recall 1/2, nothing extra, not one-to-one.
    refs[1] = {"ref_id": 2, "found": True, "instances": [inst(OBJECTS[3])]}
    c = run_score(tmp_path, refs)["by_kind"]["category"]
    assert c["instance_recall@0.5"] == 0.5 and c["extra_instance_rate"] == 0.0 and c["prec@0.5"] == 0.0


def test_instance_without_mask_counts_empty_when_file_has_masks(tmp_path: Path) -> None:
    refs = perfect()
    refs[0] = {
        "ref_id": 1,
        "found": True,
        "instances": [{"box": list(OBJECTS[2]), "score": 1.0, "mask": None}],
    }
    a = run_score(tmp_path, refs)["by_kind"]["attribute"]
    assert a["miou"] == 0.0 and a["box_acc@0.5"] == 1.0


def test_rle_is_column_major(tmp_path: Path) -> None:
    # A 2x3 mask with only the top-right pixel set: column-major runs are 4 background, 1, 1 bg.
    m = np.zeros((2, 3), dtype=bool)
    m[0, 2] = True
    assert instance_json((2, 0, 3, 1), 1.0, m)["mask"] == {"size": [2, 3], "counts": [4, 1, 1]}
    assert np.array_equal(rle_decode({"size": [2, 3], "counts": [4, 1, 1]}), m)


def test_mask_of_wrong_size_is_rejected(tmp_path: Path) -> None:
    refs = perfect()
    refs[0] = {
        "ref_id": 1,
        "found": True,
        "instances": [instance_json((0, 0, 2, 2), 1.0, np.ones((2, 2), bool))],
    }
    with pytest.raises(ModelkitError) as e:
        run_score(tmp_path, refs)
    assert e.value.code == "DATA_INVALID" and "ref 1" in e.value.message


def test_subset_and_box_mode(tmp_path: Path) -> None:
    data = write_dataset(tmp_path)
    pred = tmp_path / "pred.json"
    refs = [r for r in perfect() if r["ref_id"] != 3]
    write_predictions(pred, refs, [], mode="box", image_ids=[1])
    r = score(load_refdata(data), load_predictions(pred))
    assert r["overall"]["refs"] == 3 and "absent" not in r["by_kind"] and "descriptions" not in r
    write_predictions(pred, refs, [], image_ids=[])
    assert score(load_refdata(data), load_predictions(pred))["overall"]["refs"] == 0


def test_score_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = write_dataset(tmp_path)
    pred = tmp_path / "pred.json"
    write_predictions(pred, perfect(), [])
    assert main(["score", "--data", str(data), "--pred", str(pred)]) == 0
    table = capsys.readouterr().out
    assert table.splitlines()[0].split()[:3] == ["kind", "refs", "mIoU"]
    assert "overall" in table
    assert main(["score", "--data", str(data), "--pred", str(pred), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["overall"]["miou"] == 1.0
    write_predictions(pred, [], [{"ann_id": 1, "text": "a red square"}], mode="describe")
    assert main(["score", "--data", str(data), "--pred", str(pred)]) == 0
    assert capsys.readouterr().out.startswith("descriptions (1/2 predicted): colour 0.500 (n=2)")
    pred.write_text("{")
    assert main(["score", "--data", str(data), "--pred", str(pred)]) == 2
    assert "DATA_INVALID" in capsys.readouterr().err


def test_helpers() -> None:
    iou = np.array([[0.2, 0.9], [0.8, 0.1]])
    assert sorted(greedy_match(iou)) == [(0, 1, 0.9), (1, 0, 0.8)]
    assert one_to_one_correct(iou, 0.8) and not one_to_one_correct(iou, 0.85)
    assert not one_to_one_correct(np.zeros((1, 2)), 0.0)
    assert one_to_one_correct(np.zeros((0, 0)), 0.5)
    assert text_words("Two Red circles and a square", "shape") == {"circle", "square"}
    assert text_words("a large purple star", "colour") == {"purple"}


def test_parse_boxes_like_grounding_ts() -> None:
    text = (
        '[{"bbox_2d": [12, 40, 300, 480], "label": "red circle"}, '
        '{"bbox_2d": [500, 7, 999, 1000], "label": "blue star"}]'
    )
    got = parse_boxes(text)
    assert [(p.label, p.box1000, p.index) for p in got] == [
        ("red circle", (12, 40, 300, 480), 0),
        ("blue star", (500, 7, 999, 1000), 1),
    ]
    # fence, swapped corners, out-of-range, degenerate and duplicate boxes, python quotes, truncation
    text = (
        "```json\n[{'bbox_2d': [300, 480, 12, 40], 'label': 'a'}, {\"bbox_2d\": [5, 5, 5, 9]}, "
        '{"bbox_2d": [12, 40, 300, 480]}, {"bbox_2d": [-3, 0, 1200, 10], "label": "b"}, {"bbox_2d": [1, 2'
    )
    got = parse_boxes(text)
    assert [(p.label, p.box1000, p.index) for p in got] == [
        ("a", (12, 40, 300, 480), 0),
        ("b", (0, 0, 1000, 10), 3),
    ]
    assert parse_boxes("[]") == [] and parse_boxes("nothing here") == []
    assert [p.box1000 for p in parse_boxes('bbox_2d: [1, 2, 3, 4] and "bbox": [5,6,7,8]')] == [
        (1, 2, 3, 4),
        (5, 6, 7, 8),
    ]


class CharTok:
    """One token per character (ids = code points): decode is exact and easy to reason about."""

    def decode(self, ids: list[int]) -> str:
        return "".join(chr(i) for i in ids)


def test_last_coordinate_tokens() -> None:
    text = '[{"bbox_2d": [1, 22, 333, 4444], "label": "x"}, {"bbox_2d": [5, 6, 7, 80]}]'
    ids = [ord(c) for c in text]
    got = last_coordinate_tokens(CharTok(), ids)
    assert [text[i] for i in got] == ["4", "0"]
    assert got[0] == text.index("4444") + 3
