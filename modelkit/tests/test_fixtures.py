"""The committed tiny pack and golden fixtures: reproducible, and the graphs reproduce the reference.

1. Re-recording a case with the PyTorch reference writes byte-identical files (fixtures are a pure
   function of the pack's provenance, the images and the code).
2. End-to-end parity of the committed artifacts: the pack's three ONNX graphs in onnxruntime
   reproduce the fixtures (vision outputs, prefill logits/hidden, 20 greedy tokens through the KV
   cache, mask logits) within the tolerances stored in each case.json.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image

from modelkit.cli import main
from modelkit.fixtures import CASES, load_case
from modelkit.images import FIXTURE_IMAGES, write_fixture_images
from modelkit.pack import load_manifest, verify_pack
from modelkit.preprocess import load_rgb, preprocess_image, to_rgb, unpatchify

REPO = Path(__file__).resolve().parents[2]
PACK = REPO / "models" / "tiny-random"
FIXTURES = REPO / "test" / "fixtures" / "tiny-random"
IMAGES = REPO / "test" / "fixtures" / "images"
CASE_NAMES = [c.name for c in CASES]


@pytest.fixture(scope="module")
def manifest() -> dict[str, Any]:
    assert verify_pack(PACK) == [], "the committed pack does not match its checksums"
    return load_manifest(PACK)


@pytest.fixture(scope="module")
def sessions(manifest: dict[str, Any]) -> dict[str, ort.InferenceSession]:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    return {
        role: ort.InferenceSession(str(PACK / g["file"]), opts, providers=["CPUExecutionProvider"])
        for role, g in manifest["graphs"].items()
    }


def _close(doc: dict[str, Any], name: str, got: np.ndarray, want: np.ndarray) -> float:
    tol = doc["tolerances"][name]
    assert got.shape == want.shape, f"{name}: shape {got.shape} != {want.shape}"
    np.testing.assert_allclose(got, want, atol=tol["atol"], rtol=tol["rtol"], err_msg=name)
    return float(np.abs(got.astype(np.float64) - want).max())


def test_index_lists_the_cases() -> None:
    index = json.loads((FIXTURES / "index.json").read_text())
    assert index == {"pack": "tiny-random", "cases": CASE_NAMES}


def test_images_are_reproducible(tmp_path: Path) -> None:
    fresh = write_fixture_images(tmp_path)
    for name in FIXTURE_IMAGES:
        with Image.open(IMAGES / name) as committed, Image.open(fresh[name]) as new:
            assert committed.mode == new.mode and committed.size == new.size
            assert np.array_equal(np.asarray(committed), np.asarray(new)), name


def test_rerecording_is_byte_identical(tmp_path: Path) -> None:
    """`modelkit fixtures` on the committed pack rebuilds the models from its provenance and writes
    exactly the committed files."""
    out = tmp_path / "fixtures" / "tiny-random"
    rc = main(["fixtures", "--pack", str(PACK), "--out", str(out), "--images", str(tmp_path / "images")])
    assert rc == 0
    committed = sorted(p.relative_to(FIXTURES) for p in FIXTURES.rglob("*") if p.is_file())
    assert sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file()) == committed
    for rel in committed:
        if rel.name == "case.json":
            # the image path is relative to the case folder, so it follows --images
            new_doc, old_doc = json.loads((out / rel).read_text()), json.loads((FIXTURES / rel).read_text())
            assert Path(new_doc.pop("image")).name == Path(old_doc.pop("image")).name
            assert new_doc == old_doc, rel
            continue
        assert (out / rel).read_bytes() == (FIXTURES / rel).read_bytes(), rel


@pytest.mark.parametrize("case_name", CASE_NAMES)
def test_vision_encoder_reproduces_fixtures(
    sessions: dict[str, ort.InferenceSession], case_name: str
) -> None:
    doc, t = load_case(FIXTURES / case_name)
    feeds = {
        k: t[k] for k in ("pixel_values", "pos_embed_idx", "pos_embed_weight", "rotary_cos", "rotary_sin")
    }
    image_features, deepstack, vit_ms = sessions["vision_encoder"].run(None, feeds)
    _close(doc, "image_features", image_features, t["image_features"])
    _close(doc, "deepstack_features", deepstack, t["deepstack_features"])
    _close(doc, "vit_ms", vit_ms, t["vit_ms"])


def _visual_embeds(t: dict[str, np.ndarray], pad_id: int) -> np.ndarray:
    ids = t["input_ids"]  # [S]
    hidden = t["image_features"].shape[1]
    out = np.zeros((4, 1, ids.shape[0], hidden), dtype=np.float32)  # [4, B, S, H]
    rows = np.flatnonzero(ids == pad_id)
    out[0, 0, rows] = t["image_features"]
    out[1:, 0, rows] = t["deepstack_features"]
    return out


@pytest.mark.parametrize("case_name", CASE_NAMES)
def test_language_model_prefill_and_greedy_with_kv_cache(
    manifest: dict[str, Any], sessions: dict[str, ort.InferenceSession], case_name: str
) -> None:
    doc, t = load_case(FIXTURES / case_name)
    text = manifest["model"]["text"]
    n_layers, n_kv, hd, hidden = (
        text["num_hidden_layers"],
        text["num_key_value_heads"],
        text["head_dim"],
        text["hidden_size"],
    )
    sess = sessions["language_model"]
    out_names = [o.name for o in sess.get_outputs()]
    seq = t["input_ids"].shape[0]
    rope_delta = doc["meta"]["rope_delta"]

    past = {
        f"past_key_values.{i}.{kv}": np.zeros((1, n_kv, 0, hd), dtype=np.float32)
        for i in range(n_layers)
        for kv in ("key", "value")
    }
    feeds = {
        "input_ids": t["input_ids"][None],  # [1, S]
        "visual_embeds": _visual_embeds(t, manifest["tokens"]["image_pad"]),
        "attention_mask": np.ones((1, seq), dtype=np.int64),
        "position_ids": t["position_ids"][:, None, :],  # [3, 1, S]
        **past,
    }
    res = dict(zip(out_names, sess.run(None, feeds), strict=True))
    _close(doc, "prefill_logits", res["logits"][0, 0], t["prefill_logits"])
    _close(doc, "prefill_hidden", res["last_hidden_state"][0], t["prefill_hidden"])

    tokens: list[int] = [int(res["logits"][0, 0].argmax())]
    hiddens: list[np.ndarray] = []
    for step in range(t["greedy_tokens"].shape[0]):
        past = {
            f"past_key_values.{k[len('present.') :]}": v for k, v in res.items() if k.startswith("present.")
        }
        total = seq + step + 1
        feeds = {
            "input_ids": np.array([[tokens[-1]]], dtype=np.int64),
            "visual_embeds": np.zeros((4, 1, 1, hidden), dtype=np.float32),
            "attention_mask": np.ones((1, total), dtype=np.int64),
            # text positions after the prompt: cache index + rope_delta on all three axes
            "position_ids": np.full((3, 1, 1), seq + step + rope_delta, dtype=np.int64),
            **past,
        }
        res = dict(zip(out_names, sess.run(None, feeds), strict=True))
        hiddens.append(res["last_hidden_state"][0, 0])
        tokens.append(int(res["logits"][0, 0].argmax()))
    greedy = np.asarray(tokens[: t["greedy_tokens"].shape[0]], dtype=np.int64)
    np.testing.assert_array_equal(greedy, t["greedy_tokens"])
    _close(doc, "greedy_hidden", np.stack(hiddens), t["greedy_hidden"])


@pytest.mark.parametrize("case_name", CASE_NAMES)
def test_mask_decoder_reproduces_fixtures(
    manifest: dict[str, Any], sessions: dict[str, ort.InferenceSession], case_name: str
) -> None:
    doc, t = load_case(FIXTURES / case_name)
    pad_rows = np.flatnonzero(t["input_ids"] == manifest["tokens"]["image_pad"])
    feeds = {
        "vit_ms": t["vit_ms"],
        "mm_embeds": t["prefill_hidden"][pad_rows],  # [M, H]
        "query_hidden": t["mask_query_hidden"],
        "boxes": t["mask_boxes"],
        "gate_boxes": t["mask_gate_boxes"],
        "gate_valid": t["mask_gate_valid"],
        "hr_image": t["hr_image"],
    }
    np.testing.assert_array_equal(t["mask_query_hidden"], t["greedy_hidden"][doc["meta"]["mask_query_rows"]])
    mask_logits, coarse, iou = sessions["mask_decoder"].run(None, feeds)
    _close(doc, "mask_logits", mask_logits, t["mask_logits"])
    _close(doc, "mask_logits_coarse", coarse, t["mask_logits_coarse"])
    _close(doc, "iou_pred", iou, t["iou_pred"])


# Reference preprocessing (modelkit.preprocess), which the fixtures' pixel tensors come from.


@pytest.mark.parametrize(
    ("name", "resized"),
    [
        ("halfeven_400x208.png", (192, 384)),  # 6.5 and 12.5 round half to even (half-up: 224x416)
        ("tall_144x520.png", (512, 128)),  # 4.5 -> 4, exactly min_pixels
        ("small_rgba_120x90.png", (224, 320)),  # below min_pixels: scaled up
    ],
)
def test_smart_resize_paths(name: str, resized: tuple[int, int]) -> None:
    prep = preprocess_image(load_rgb(IMAGES / name), 65536, 262144)
    assert prep.resized_hw == resized
    gh, gw = resized[0] // 16, resized[1] // 16
    assert prep.image_grid_thw.tolist() == [[1, gh, gw]]
    assert prep.pixel_values.shape == (gh * gw, 1536) and prep.hr_image.shape == (1, 3, *resized)
    assert np.array_equal(unpatchify(prep.pixel_values, gh, gw), prep.hr_image)


def test_alpha_is_composited_on_white() -> None:
    rgb = np.asarray(load_rgb(IMAGES / "small_rgba_120x90.png"))  # [90, 120, 3]
    assert (rgb[:, :30][20:50] == 255).all()  # the fully transparent strip (no shapes drawn there)
    palette = Image.new("P", (4, 4), 0)
    palette.putpalette([10, 20, 30] * 256)
    palette.info["transparency"] = 0
    assert (np.asarray(to_rgb(palette)) == 255).all()


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    img = Image.new("RGB", (40, 20), (200, 10, 10))
    img.paste((10, 10, 200), (0, 0, 10, 20))  # blue on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    path = tmp_path / "rotated.png"
    img.save(path, exif=exif)
    shown = np.asarray(load_rgb(path))
    assert shown.shape == (40, 20, 3)
    assert tuple(shown[0, 10]) == (10, 10, 200) and tuple(shown[-1, 10]) == (200, 10, 10)
