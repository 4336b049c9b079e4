"""Synthetic data generator and annotation format: determinism, geometry, expression semantics, files."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from modelkit.cli import main
from modelkit.errors import ModelkitError
from modelkit.refdata import (
    convert_refcoco,
    load_refdata,
    polygons_to_mask,
    rle_counts_from_string,
    rle_counts_to_string,
    rle_decode,
    rle_encode,
)
from modelkit.synth import (
    COLOURS,
    EXAMPLES,
    REF_KINDS,
    SHAPES,
    SIZES,
    Referral,
    Scene,
    describe,
    example_scene,
    generate_dataset,
    make_expressions,
    render_scene,
)

N_SCENES = 50


@pytest.fixture(scope="module")
def scenes() -> list[tuple[Scene, list[Referral]]]:
    out = []
    for i in range(N_SCENES):
        rng = np.random.default_rng([7, i])
        scene = render_scene(rng)
        out.append((scene, make_expressions(scene, rng)))
    return out


# -- an independent reading of the expression grammar ------------------------------------------------

POSITION_WORDS = {
    "left": (0, min),
    "leftmost": (0, min),
    "right": (0, max),
    "rightmost": (0, max),
    "top": (1, min),
    "topmost": (1, min),
    "bottom": (1, max),
    "bottommost": (1, max),
}
PLURAL_TO_SHAPE = {s + "s": s for s in SHAPES}


def expected_targets(scene: Scene, expression: str) -> tuple[set[int], bool]:
    """(referent set, whether the expression names a set) by reading the words of the expression."""
    words = expression.split()
    shape = next((w for w in words if w in SHAPES), None) or next(
        (PLURAL_TO_SHAPE[w] for w in words if w in PLURAL_TO_SHAPE), None
    )
    colour = next((w for w in words if w in COLOURS), None)
    size = next((w for w in words if w in SIZES), None)
    position = next((w for w in words if w in POSITION_WORDS), None)
    is_set = words[0] in ("all", "every")
    known = set(SHAPES) | set(PLURAL_TO_SHAPE) | set(COLOURS) | set(SIZES) | set(POSITION_WORDS)
    assert set(words) - known <= {"the", "all", "every", "shape", "shapes", "on", "at"}, expression
    group = {
        i
        for i, o in enumerate(scene.objects)
        if (shape is None or o.shape == shape)
        and (colour is None or o.colour == colour)
        and (size is None or o.size == size)
    }
    if position is None:
        return group, is_set
    axis, pick = POSITION_WORDS[position]
    assert len(group) >= 2, f"{expression!r}: positional among fewer than 2"
    coords = {i: scene.objects[i].centre[axis] for i in group}
    best = pick(coords, key=lambda i: coords[i])
    runner = min(abs(coords[i] - coords[best]) for i in group if i != best)
    assert runner >= 10.0, f"{expression!r}: no clear margin ({runner:.1f} px)"
    return {best}, False


# -- rendering -------------------------------------------------------------------------------------


def test_same_seed_same_scene_and_expressions() -> None:
    a_rng, b_rng = np.random.default_rng(123), np.random.default_rng(123)
    a, b = render_scene(a_rng), render_scene(b_rng)
    assert a.image.tobytes() == b.image.tobytes()
    assert [(o.shape, o.colour, o.size, o.box) for o in a.objects] == [
        (o.shape, o.colour, o.size, o.box) for o in b.objects
    ]
    assert all(np.array_equal(x.mask, y.mask) for x, y in zip(a.objects, b.objects, strict=True))
    assert make_expressions(a, a_rng) == make_expressions(b, b_rng)
    c = render_scene(np.random.default_rng(124))
    assert c.image.tobytes() != a.image.tobytes()


def test_sizes_aspects_and_counts(scenes: list[tuple[Scene, list[Referral]]]) -> None:
    for scene, _ in scenes:
        w, h = scene.width, scene.height
        assert 128 <= w <= 640 and 128 <= h <= 640
        assert max(w, h) <= 2 * min(w, h) + 1
        assert 1 <= len(scene.objects) <= 6
        assert scene.image.mode == "RGB"
    counts = Counter(len(s.objects) for s, _ in scenes)
    assert len(counts) >= 5, counts  # the whole 1..6 range shows up
    assert {s.background for s, _ in scenes} == {"plain", "gradient", "noisy"}


def test_masks_disjoint_inside_and_boxes_tight(scenes: list[tuple[Scene, list[Referral]]]) -> None:
    for scene, _ in scenes:
        union = np.zeros((scene.height, scene.width), dtype=np.int32)
        for o in scene.objects:
            assert o.mask.shape == (scene.height, scene.width) and o.mask.dtype == bool
            union += o.mask
            ys, xs = np.nonzero(o.mask)
            assert o.box == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
            x0, y0, x1, y1 = o.box
            assert 0 <= x0 < x1 <= scene.width and 0 <= y0 < y1 <= scene.height
            # Tight: every edge row/column of the box holds mask pixels.
            m = o.mask[y0:y1, x0:x1]
            assert m[0].any() and m[-1].any() and m[:, 0].any() and m[:, -1].any()
            assert min(x1 - x0, y1 - y0) >= 14  # small objects survive a 32-px merge grid
        assert union.max() <= 1


def test_small_and_large_are_distinct(scenes: list[tuple[Scene, list[Referral]]]) -> None:
    for scene, _ in scenes:
        widths = {s: [o.box[2] - o.box[0] for o in scene.objects if o.size == s] for s in SIZES}
        if widths["small"] and widths["large"]:
            assert min(widths["large"]) >= 1.4 * max(widths["small"])


def test_pixels_show_the_object_colour() -> None:
    scene = render_scene(np.random.default_rng(5), 320, 240, n_objects=4, background="plain")
    px = np.asarray(scene.image, dtype=np.int32)  # [H, W, 3]
    for o in scene.objects:
        # Interior pixels (mask eroded by one pixel) are within the colour jitter of the named colour.
        m = o.mask
        inner = m & np.roll(m, 1, 0) & np.roll(m, -1, 0) & np.roll(m, 1, 1) & np.roll(m, -1, 1)
        mean = px[inner].mean(axis=0)
        assert np.abs(mean - np.asarray(COLOURS[o.colour])).max() <= 13


def test_bad_sizes_are_refused() -> None:
    rng = np.random.default_rng(0)
    with pytest.raises(ModelkitError, match="Expected an integer 128..640 for width but received 100"):
        render_scene(rng, 100, 200)
    with pytest.raises(ModelkitError, match="aspect ratio up to 2:1 but received 640x200"):
        render_scene(rng, 640, 200)
    with pytest.raises(ModelkitError, match="background"):
        render_scene(rng, background="stripes")
    scene = render_scene(rng, width=600)
    assert scene.width == 600 and 300 <= scene.height <= 640


# -- expressions -----------------------------------------------------------------------------------


def test_every_kind_appears_with_the_planned_mix(scenes: list[tuple[Scene, list[Referral]]]) -> None:
    kinds = Counter(r.kind for _, refs in scenes for r in refs)
    assert set(kinds) == set(REF_KINDS), kinds
    total = sum(kinds.values())
    assert 0.15 <= kinds["absent"] / total <= 0.30, kinds
    assert all(kinds[k] / total >= 0.08 for k in REF_KINDS), kinds
    texts = {r.expression for _, refs in scenes for r in refs}
    for form in ("the red circle", "on the left", "leftmost", "the top", "all ", "every ", "shape"):
        assert any(form in t for t in texts), form
    assert any(r.kind == "size" and r.expression.count(" ") == 3 for _, refs in scenes for r in refs)


def test_referents_follow_from_the_words(scenes: list[tuple[Scene, list[Referral]]]) -> None:
    for scene, refs in scenes:
        assert len({r.expression for r in refs}) == len(refs)
        for r in refs:
            want, is_set = expected_targets(scene, r.expression)
            if r.kind == "absent":
                assert want == set() and r.targets == (), r
                continue
            assert set(r.targets) == want, (r, [describe(o) for o in scene.objects])
            assert list(r.targets) == sorted(r.targets)
            if r.kind == "category":
                assert is_set
            else:
                assert not is_set and len(r.targets) == 1, r


def test_mix_controls_the_kinds() -> None:
    rng = np.random.default_rng(3)
    scene = render_scene(rng, 400, 300, n_objects=5)
    only_cat = make_expressions(scene, rng, n=8, mix={"category": 1.0})
    assert only_cat and all(r.kind == "category" for r in only_cat)
    only_absent = make_expressions(scene, rng, n=8, mix={"absent": 1.0})
    assert len(only_absent) == 8 and all(r.kind == "absent" and r.targets == () for r in only_absent)
    with pytest.raises(ModelkitError, match="mix"):
        make_expressions(scene, rng, mix={"colour": 1.0})


def test_describe() -> None:
    scene = render_scene(np.random.default_rng(1), 256, 256, n_objects=1)
    o = scene.objects[0]
    assert describe(o) == f"a {o.size} {o.colour} {o.shape}"


# -- RLE -------------------------------------------------------------------------------------------


def test_rle_round_trip_and_layout() -> None:
    rng = np.random.default_rng(0)
    masks = [
        np.zeros((5, 7), bool),
        np.ones((5, 7), bool),
        rng.random((13, 9)) < 0.5,
        rng.random((1, 1)) < 2,
    ]
    first = np.zeros((3, 4), bool)
    first[0, 0] = True
    masks.append(first)
    for m in masks:
        rle = rle_encode(m)
        assert rle["size"] == list(m.shape) and sum(rle["counts"]) == m.size
        assert np.array_equal(rle_decode(rle), m)
        assert np.array_equal(rle_decode({**rle, "counts": rle_counts_to_string(rle["counts"])}), m)
    # Column-major, background first: a mask whose only pixel is (y=0, x=1) in a 2x2 image.
    m = np.zeros((2, 2), bool)
    m[0, 1] = True
    assert rle_encode(m)["counts"] == [2, 1, 1]
    assert rle_encode(first)["counts"] == [0, 1, 11]


def test_rle_string_matches_pycocotools_layout() -> None:
    # Hand-worked pycocotools encoding: counts [3, 40, 5, 38] -> deltas from the third run on are
    # taken against the run two back only for i > 2: [3, 40, 5, 38 - 40 = -2].
    s = rle_counts_to_string([3, 40, 5, 38])
    assert s == "3X15N"
    assert rle_counts_from_string(s) == [3, 40, 5, 38]


def test_rle_decode_errors() -> None:
    with pytest.raises(ModelkitError, match="RLE counts sum to 5, a 2x2 mask needs 4"):
        rle_decode({"size": [2, 2], "counts": [2, 3]})
    with pytest.raises(ModelkitError, match="RLE size"):
        rle_decode({"size": [2], "counts": [4]})


def test_polygons_to_mask() -> None:
    m = polygons_to_mask([[2, 2, 8, 2, 8, 6, 2, 6]], 10, 12)
    ys, xs = np.nonzero(m)
    assert (xs.min(), xs.max(), ys.min(), ys.max()) == (2, 8, 2, 6)


# -- dataset files ---------------------------------------------------------------------------------


def _digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_dataset_is_byte_identical_for_a_seed(tmp_path: Path) -> None:
    a = generate_dataset(tmp_path / "a", 3, seed=11)
    b = generate_dataset(tmp_path / "b", 3, seed=11)
    assert _digest(a.parent) == _digest(b.parent)
    assert len(_digest(a.parent)) == 4
    c = generate_dataset(tmp_path / "c", 3, seed=12)
    assert _digest(c.parent) != _digest(a.parent)
    with pytest.raises(ModelkitError, match="OUTPUT_EXISTS|already exists"):
        generate_dataset(tmp_path / "a", 3, seed=11)


def test_dataset_loads_back_to_the_scenes(tmp_path: Path) -> None:
    path = generate_dataset(tmp_path / "ds", 4, seed=2, refs_per_image=5)
    ds = load_refdata(tmp_path / "ds")
    assert len(ds.images) == 4 and ds.info["seed"] == 2
    for i in range(4):
        rng = np.random.default_rng([2, i])
        scene = render_scene(rng)
        refs = make_expressions(scene, rng, n=5)
        image_id = i + 1
        img = ds.load_image(image_id)
        assert img.tobytes() == scene.image.tobytes()
        anns = ds.annotations_for_image(image_id)
        assert len(anns) == len(scene.objects)
        for ann, o in zip(anns, scene.objects, strict=True):
            assert ann.bbox == tuple(float(v) for v in o.bbox_xywh)
            assert np.array_equal(ds.mask_for(ann.id), o.mask)
            assert ann.attributes == {"shape": o.shape, "colour": o.colour, "size": o.size}
            assert ds.description_of(ann.id) == describe(o)
        got = ds.refs_for_image(image_id)
        assert [(r.expression, r.kind) for r in got] == [(r.expression, r.kind) for r in refs]
        for rec, ref in zip(got, refs, strict=True):
            masks = ds.masks_for(rec)  # [K, H, W]
            assert masks.shape == (len(ref.targets), scene.height, scene.width)
            for k, t in enumerate(ref.targets):
                assert np.array_equal(masks[k], scene.objects[t].mask)
            assert ds.boxes_for(rec).shape == (len(ref.targets), 4)
    assert json.loads(path.read_text())["info"]["format"] == "qwen3-vl-seg-refs"


def _minimal() -> dict:
    mask = np.zeros((4, 6), bool)
    mask[1:3, 2:5] = True
    return {
        "images": [{"id": 1, "file_name": "a.png", "width": 6, "height": 4}],
        "annotations": [
            {
                "id": 10,
                "image_id": 1,
                "bbox": [2, 1, 3, 2],
                "segmentation": rle_encode(mask),
                "category": "box",
            }
        ],
        "refs": [
            {"ref_id": 1, "image_id": 1, "expression": "the box", "ann_ids": [10], "kind": "attribute"},
            {"ref_id": 2, "image_id": 1, "expression": "the dog", "ann_ids": [], "kind": "absent"},
        ],
        "descriptions": [{"ann_id": 10, "text": "a box"}],
    }


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d["annotations"][0].update(image_id=2), r"annotations\[0\]: image_id 2 is not in images"),
        (
            lambda d: d["annotations"][0].update(bbox=[4, 1, 3, 2]),
            r"bbox \[4, 1, 3, 2\] does not fit image 1",
        ),
        (
            lambda d: d["annotations"][0]["segmentation"].update(size=[6, 4]),
            r"RLE size \[6, 4\] differs from image 1",
        ),
        (
            lambda d: d["refs"][0].update(ann_ids=[11]),
            r"refs\[0\]: annotation 11 is not an annotation of image 1",
        ),
        (lambda d: d["refs"][1].update(kind="attribute"), r"kind 'absent' goes with empty ann_ids"),
        (lambda d: d["refs"][0].update(kind="colour"), r"Expected kind in"),
        (lambda d: d["images"][0].update(width=0), r"images\[0\]: Expected an integer >= 1 for width"),
        (lambda d: d.pop("refs"), r"Expected a list under 'refs'"),
        (
            lambda d: d["descriptions"][0].update(ann_id=3),
            r"descriptions\[0\]: ann_id 3 is not in annotations",
        ),
    ],
)
def test_load_rejects_bad_files(tmp_path: Path, edit: Callable[[dict], object], message: str) -> None:
    data = _minimal()
    edit(data)
    (tmp_path / "annotations.json").write_text(json.dumps(data))
    with pytest.raises(ModelkitError, match=message) as e:
        load_refdata(tmp_path)
    assert e.value.code == "DATA_INVALID"


def test_minimal_file_and_image_size_check(tmp_path: Path) -> None:
    (tmp_path / "annotations.json").write_text(json.dumps(_minimal()))
    ds = load_refdata(tmp_path / "annotations.json")
    assert ds.masks_for(ds.refs[1]).shape == (0, 4, 6)
    assert ds.masks_for(ds.refs[0]).sum() == 6
    Image.new("RGB", (5, 4)).save(tmp_path / "a.png")
    with pytest.raises(ModelkitError, match="is 5x4, the annotations say 6x4"):
        ds.load_image(1)


def test_convert_refcoco(tmp_path: Path) -> None:
    instances = {
        "images": [
            {"id": 5, "file_name": "COCO_train2014_5.jpg", "width": 20, "height": 10},
            {"id": 6, "file_name": "COCO_train2014_6.jpg", "width": 20, "height": 10},
        ],
        "annotations": [
            {
                "id": 50,
                "image_id": 5,
                "category_id": 1,
                "bbox": [1.5, 2, 6, 5],
                "segmentation": [[1.5, 2, 7.5, 2, 7.5, 7]],
            },
            {
                "id": 60,
                "image_id": 6,
                "category_id": 2,
                "bbox": [0, 0, 20, 10],
                "segmentation": {"counts": rle_counts_to_string([0, 200]), "size": [10, 20]},
            },
        ],
        "categories": [{"id": 1, "name": "person"}, {"id": 2, "name": "wall"}],
    }
    refs = [
        {
            "ref_id": 0,
            "ann_id": 50,
            "image_id": 5,
            "split": "train",
            "sentences": [{"sent": "man left"}, {"sent": "guy"}],
        },
        {"ref_id": 1, "ann_id": 60, "image_id": 6, "split": "val", "sentences": [{"sent": "the wall"}]},
    ]
    data = convert_refcoco(refs, instances, split="train", image_prefix="train2014/")
    assert [r["expression"] for r in data["refs"]] == ["man left", "guy"]
    assert data["images"][0]["file_name"] == "train2014/COCO_train2014_5.jpg"
    (tmp_path / "annotations.json").write_text(json.dumps(data))
    ds = load_refdata(tmp_path)
    assert ds.annotations[50].category == "person"
    assert ds.masks_for(ds.refs[0]).shape == (1, 10, 20) and ds.masks_for(ds.refs[0]).any()
    both = convert_refcoco(refs, instances)
    (tmp_path / "annotations.json").write_text(json.dumps(both))
    assert load_refdata(tmp_path).masks_for(load_refdata(tmp_path).refs[2]).all()


def test_cli_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["synth", "--out", str(tmp_path / "d"), "--n", "2", "--seed", "4"]) == 0
    assert "wrote 2 images" in capsys.readouterr().out
    assert len(load_refdata(tmp_path / "d").images) == 2


def test_examples_folder_matches_the_generator() -> None:
    folder = Path(__file__).resolve().parents[2] / "examples"
    for name, seed, width, height, background in EXAMPLES:
        path = folder / name
        assert path.stat().st_size < 50_000, name
        scene, refs = example_scene(seed, width, height, background)
        with Image.open(path) as im:
            assert im.size == (width, height)
            assert im.convert("RGB").tobytes() == scene.image.tobytes(), name
        assert name in (folder / "README.md").read_text(encoding="utf-8")
