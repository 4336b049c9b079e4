"""The command line's bad-input errors: one `CODE: message` line on stderr, exit 2, nothing written."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from modelkit.cli import DEFAULT_TOKENIZER, build_tiny_models, main
from modelkit.fixtures import load_case
from modelkit.hf import tiny_config
from modelkit.mask_decoder import MaskDecoder, MaskDecoderConfig, save_decoder_checkpoint
from modelkit.pack import load_manifest, verify_pack

REPO = Path(__file__).resolve().parents[2]
TOKENIZER = REPO / DEFAULT_TOKENIZER
COMMITTED_PACK = REPO / "models" / "tiny-random"
COMMITTED_FIXTURES = REPO / "test" / "fixtures" / "tiny-random"


def _decoder_file(tmp: Path, vision_hidden: int, text_hidden: int) -> Path:
    cfg = MaskDecoderConfig(
        vision_hidden=vision_hidden,
        text_hidden=text_hidden,
        dim=32,
        pixel_dim=16,
        num_layers=1,
        num_heads=2,
        ffn_dim=64,
    )
    path = tmp / f"decoder_{vision_hidden}_{text_hidden}.safetensors"
    save_decoder_checkpoint(MaskDecoder(cfg), path)
    return path


def _checkpoint(
    tmp: Path, *, config: bool = True, weights: bool = True, model_type: str | None = None
) -> Path:
    """A checkpoint folder with the tiny config; `weights` adds a placeholder file the checks look for
    (every test below must fail before any weights are read)."""
    ckpt = tmp / "ckpt"
    ckpt.mkdir()
    if config:
        cfg = tiny_config().to_dict()
        if model_type is not None:
            cfg = {"model_type": model_type, "hidden_size": 32, "num_hidden_layers": 2}
        (ckpt / "config.json").write_text(json.dumps(cfg))
    if weights:
        (ckpt / "model.safetensors").write_bytes(b"not read by these tests")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(TOKENIZER / f, ckpt / f)
    return ckpt


def _run_export(
    capsys: pytest.CaptureFixture[str], ckpt: Path, decoder: Path, out: Path, *extra: str
) -> tuple[int, str]:
    rc = main(["export", "--checkpoint", str(ckpt), "--decoder", str(decoder), "--out", str(out), *extra])
    err = capsys.readouterr().err
    return rc, err


def _assert_error(rc: int, err: str, code: str, *fragments: str) -> None:
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"{code}: "), lines[0]
    for f in fragments:
        assert f in lines[0], lines[0]


@pytest.fixture()
def good_decoder(tmp_path: Path) -> Path:
    return _decoder_file(tmp_path, 32, 32)


def test_missing_folder(tmp_path: Path, good_decoder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, err = _run_export(capsys, tmp_path / "nope", good_decoder, tmp_path / "out")
    _assert_error(rc, err, "CHECKPOINT_INVALID", "does not exist")
    assert not (tmp_path / "out").exists()


def test_folder_without_config(
    tmp_path: Path, good_decoder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt = _checkpoint(tmp_path, config=False)
    rc, err = _run_export(capsys, ckpt, good_decoder, tmp_path / "out")
    _assert_error(rc, err, "CHECKPOINT_INVALID", "no config.json")
    assert not (tmp_path / "out").exists()


def test_folder_without_weights(
    tmp_path: Path, good_decoder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt = _checkpoint(tmp_path, weights=False)
    rc, err = _run_export(capsys, ckpt, good_decoder, tmp_path / "out")
    _assert_error(rc, err, "CHECKPOINT_INVALID", "no weights")
    assert not (tmp_path / "out").exists()


def test_other_model_type(tmp_path: Path, good_decoder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = _checkpoint(tmp_path, model_type="llama")
    rc, err = _run_export(capsys, ckpt, good_decoder, tmp_path / "out")
    _assert_error(rc, err, "CHECKPOINT_INVALID", "'llama'", "qwen3_vl")
    assert not (tmp_path / "out").exists()


def test_decoder_width_mismatch(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = _checkpoint(tmp_path)
    wide = _decoder_file(tmp_path, 64, 32)  # the tiny model's vision width is 32
    rc, err = _run_export(capsys, ckpt, wide, tmp_path / "out")
    _assert_error(rc, err, "DECODER_MISMATCH", "vision width 64", "hidden_size is 32")
    assert not (tmp_path / "out").exists()


def test_missing_decoder_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = _checkpoint(tmp_path)
    rc, err = _run_export(capsys, ckpt, tmp_path / "missing.safetensors", tmp_path / "out")
    _assert_error(rc, err, "DECODER_INVALID", "does not exist")
    assert not (tmp_path / "out").exists()


def test_output_exists(tmp_path: Path, good_decoder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = _checkpoint(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    rc, err = _run_export(capsys, ckpt, good_decoder, out)
    _assert_error(rc, err, "OUTPUT_EXISTS", "--force")
    assert list(out.iterdir()) == []


def test_tiny_refuses_existing_fixtures(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fixtures = tmp_path / "fx"
    fixtures.mkdir()
    rc = main(
        ["tiny", "--out", str(tmp_path / "pack"), "--fixtures", str(fixtures), "--tokenizer", str(TOKENIZER)]
    )
    _assert_error(rc, capsys.readouterr().err, "OUTPUT_EXISTS", "--force")
    assert not (tmp_path / "pack").exists()


def test_verify_committed_pack_and_a_corrupted_copy(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["verify", str(COMMITTED_PACK)]) == 0
    assert capsys.readouterr().out.startswith("OK: ")
    copy = tmp_path / "copy"
    shutil.copytree(COMMITTED_PACK, copy)
    with (copy / "tokenizer.json").open("ab") as f:
        f.write(b" ")
    rc = main(["verify", str(copy)])
    _assert_error(rc, capsys.readouterr().err, "PACK_CHECKSUM_MISMATCH", "tokenizer.json")


def test_verify_not_a_pack(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["verify", str(tmp_path)])
    _assert_error(rc, capsys.readouterr().err, "PACK_INVALID", "pack.json")


def test_python_dash_m_entry_point() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "modelkit", "--help"], capture_output=True, text=True, check=True, cwd=REPO
    )
    for command in ("export", "tiny", "fixtures", "verify"):
        assert command in out.stdout


def test_export_hf_checkpoint_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The success path: a Hugging Face folder (save_pretrained of the tiny model the committed pack
    was built from) exports to a pack whose graphs reproduce the committed fixtures."""
    model, decoder = build_tiny_models(seed=0, weight_scale=8.0)
    ckpt = tmp_path / "ckpt"
    model.save_pretrained(ckpt)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(TOKENIZER / f, ckpt / f)
    decoder_path = tmp_path / "decoder.safetensors"
    save_decoder_checkpoint(decoder, decoder_path)
    out = tmp_path / "packs" / "exported"
    rc = main(
        ["export", "--checkpoint", str(ckpt), "--decoder", str(decoder_path), "--out", str(out)]
        + ["--min-pixels", "65536", "--max-pixels", "262144"]
    )
    assert rc == 0, capsys.readouterr().err
    assert verify_pack(out) == []
    m = load_manifest(out)
    assert m["name"] == "exported" and m["provenance"]["base"] == str(ckpt)
    assert m["model"] == load_manifest(COMMITTED_PACK)["model"]
    assert sorted(p.name for p in (tmp_path / "packs").iterdir()) == ["exported"]

    doc, t = load_case(COMMITTED_FIXTURES / "ground_halfeven")
    vision = ort.InferenceSession(str(out / "vision_encoder.onnx"), providers=["CPUExecutionProvider"])
    feeds = {
        k: t[k] for k in ("pixel_values", "pos_embed_idx", "pos_embed_weight", "rotary_cos", "rotary_sin")
    }
    image_features = vision.run(["image_features"], feeds)[0]
    tol = doc["tolerances"]["image_features"]
    np.testing.assert_allclose(image_features, t["image_features"], atol=tol["atol"], rtol=tol["rtol"])
