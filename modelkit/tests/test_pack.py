"""Pack assembly: manifest contents, checksums, refusal to overwrite, atomicity on failure."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from modelkit import export_mask
from modelkit.cli import DEFAULT_TOKENIZER, build_tiny_models
from modelkit.errors import ModelkitError
from modelkit.pack import GRAPH_FILES, MASK_DECODER_KEYS, build_pack, default_provenance, verify_pack

REPO = Path(__file__).resolve().parents[2]
TOKENIZER = REPO / DEFAULT_TOKENIZER


@pytest.fixture(scope="module")
def models() -> tuple[Any, Any]:
    return build_tiny_models(seed=0, weight_scale=8.0)


def _build(models: tuple[Any, Any], out: Path, force: bool = False) -> dict[str, Any]:
    model, mask_decoder = models
    return build_pack(
        model,
        mask_decoder,
        out,
        name="t",
        description="test pack",
        dtype="fp32",
        tokenizer_dir=TOKENIZER,
        provenance=default_provenance("random", "random", {"random": {"seed": 0}}),
        force=force,
        min_pixels=65536,
        max_pixels=262144,
    )


@pytest.fixture(scope="module")
def built(models: tuple[Any, Any], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("packs") / "t"
    _build(models, out)
    return out


def test_manifest_fields(built: Path) -> None:
    m = json.loads((built / "pack.json").read_text())
    assert (m["format"], m["format_version"], m["name"], m["dtype"]) == ("qwen3-vl-seg-pack", 1, "t", "fp32")
    assert m["model"]["text"] == {
        "hidden_size": 32,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 32,
        "vocab_size": 151936,
        "rope_theta": 5000000.0,
        "mrope_section": [6, 5, 5],
        "rms_norm_eps": 1e-6,
    }
    assert m["model"]["vision"] == {
        "hidden_size": 32,
        "depth": 5,
        "num_heads": 2,
        "head_dim": 16,
        "patch_size": 16,
        "temporal_patch_size": 2,
        "spatial_merge_size": 2,
        "num_position_embeddings": 2304,
        "deepstack_visual_indexes": [1, 2, 3],
        "out_hidden_size": 32,
    }
    assert list(m["model"]["mask_decoder"]) == list(MASK_DECODER_KEYS)
    assert m["model"]["mask_decoder"]["dim"] == 32 and m["model"]["mask_decoder"]["pixel_dim"] == 16
    assert m["preprocess"] == {
        "patch_size": 16,
        "merge_size": 2,
        "temporal_patch_size": 2,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
        "min_pixels": 65536,
        "max_pixels": 262144,
        "resample": "bicubic",
        "alpha_background": [255, 255, 255],
    }
    assert m["tokens"] == {
        "image_pad": 151655,
        "vision_start": 151652,
        "vision_end": 151653,
        "im_start": 151644,
        "im_end": 151645,
        "endoftext": 151643,
        "stop": [151645, 151643],
        "max_token_id": 151668,
    }
    assert m["prompts"]["chat"].count("<|image_pad|>") == 1 and "{question}" in m["prompts"]["chat"]
    assert "{expression}" in m["prompts"]["ground"]
    assert all(f"{{{k}}}" in m["prompts"]["describe"] for k in ("x1", "y1", "x2", "y2"))
    assert m["tokenizer"] == {"file": "tokenizer.json", "config": "tokenizer_config.json"}
    assert set(m["provenance"]) >= {"base", "mask_decoder", "exporter", "transformers", "torch", "created"}
    assert "domain" not in m  # only written when given

    graphs = m["graphs"]
    assert {k: g["file"] for k, g in graphs.items()} == GRAPH_FILES
    names = {
        k: ([i["name"] for i in g["inputs"]], [o["name"] for o in g["outputs"]]) for k, g in graphs.items()
    }
    assert names["vision_encoder"] == (
        ["pixel_values", "pos_embed_idx", "pos_embed_weight", "rotary_cos", "rotary_sin"],
        ["image_features", "deepstack_features", "vit_ms"],
    )
    kv_in = [f"past_key_values.{i}.{kv}" for i in range(4) for kv in ("key", "value")]
    kv_out = [f"present.{i}.{kv}" for i in range(4) for kv in ("key", "value")]
    assert names["language_model"] == (
        ["input_ids", "visual_embeds", "attention_mask", "position_ids", *kv_in],
        ["logits", "last_hidden_state", *kv_out],
    )
    assert names["mask_decoder"] == (
        ["vit_ms", "mm_embeds", "query_hidden", "boxes", "gate_boxes", "gate_valid", "hr_image"],
        ["mask_logits", "mask_logits_coarse", "iou_pred"],
    )

    on_disk = sorted(p.relative_to(built).as_posix() for p in built.rglob("*") if p.is_file())
    assert sorted(m["files"]) == [f for f in on_disk if f != "pack.json"]
    assert set(GRAPH_FILES.values()) | {"tokenizer.json", "tokenizer_config.json"} <= set(m["files"])
    for rel, entry in m["files"].items():
        assert entry["bytes"] == (built / rel).stat().st_size and len(entry["sha256"]) == 64


def test_verify_detects_corruption_and_strays(built: Path, tmp_path: Path) -> None:
    assert verify_pack(built) == []
    copy = tmp_path / "copy"
    shutil.copytree(built, copy)
    data = bytearray((copy / "mask_decoder.onnx").read_bytes())
    data[-1] ^= 0xFF
    (copy / "mask_decoder.onnx").write_bytes(bytes(data))
    (copy / "stray.txt").write_text("x")
    (copy / "tokenizer_config.json").unlink()
    problems = verify_pack(copy)
    assert any(p.startswith("mask_decoder.onnx: sha256") for p in problems)
    assert "stray.txt: present but not listed in the manifest" in problems
    assert "tokenizer_config.json: missing" in problems


def test_refuses_existing_output_without_force(models: tuple[Any, Any], tmp_path: Path) -> None:
    out = tmp_path / "existing"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ModelkitError) as e:
        _build(models, out)
    assert e.value.code == "OUTPUT_EXISTS" and "--force" in e.value.message
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing"]


def test_force_replaces_existing_pack(models: tuple[Any, Any], tmp_path: Path) -> None:
    out = tmp_path / "p"
    out.mkdir()
    (out / "old.txt").write_text("old")
    _build(models, out, force=True)
    assert not (out / "old.txt").exists() and verify_pack(out) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p"]


def _failing_export(*_args: Any, **_kwargs: Any) -> Any:
    raise RuntimeError("simulated exporter crash")


def test_failed_export_leaves_nothing(
    models: tuple[Any, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(export_mask, "export_mask_decoder", _failing_export)
    with pytest.raises(RuntimeError, match="simulated exporter crash"):
        _build(models, tmp_path / "new")
    assert list(tmp_path.iterdir()) == []


def test_failed_forced_export_keeps_the_old_pack(
    models: tuple[Any, Any], built: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    old = tmp_path / "old"
    shutil.copytree(built, old)
    before = (old / "pack.json").read_bytes()
    monkeypatch.setattr(export_mask, "export_mask_decoder", _failing_export)
    with pytest.raises(RuntimeError):
        _build(models, old, force=True)
    assert (old / "pack.json").read_bytes() == before and verify_pack(old) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old"]


def test_rejects_bad_dtype_and_tokenizer(models: tuple[Any, Any], tmp_path: Path) -> None:
    model, mask_decoder = models
    with pytest.raises(ModelkitError) as e:
        build_pack(model, mask_decoder, tmp_path / "a", "a", "", "bf16", TOKENIZER, {})
    assert e.value.code == "INVALID_INPUT" and "fp32, fp16, int4" in e.value.message
    with pytest.raises(ModelkitError) as e:
        build_pack(model, mask_decoder, tmp_path / "b", "b", "", "fp32", tmp_path, {})
    assert e.value.code == "TOKENIZER_INVALID" and "tokenizer.json" in e.value.message
    assert list(tmp_path.iterdir()) == []
