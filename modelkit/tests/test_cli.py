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
from modelkit.mask_decoder import MaskDecoder, MaskDecoderConfig, save_mask_decoder_checkpoint
from modelkit.pack import load_manifest, verify_pack

REPO = Path(__file__).resolve().parents[2]
TOKENIZER = REPO / DEFAULT_TOKENIZER
COMMITTED_PACK = REPO / "models" / "tiny-random"
COMMITTED_FIXTURES = REPO / "test" / "fixtures" / "tiny-random"


def _mask_decoder_file(tmp: Path, vision_hidden: int, text_hidden: int) -> Path:
    cfg = MaskDecoderConfig(
        vision_hidden=vision_hidden,
        text_hidden=text_hidden,
        dim=32,
        pixel_dim=16,
        num_layers=1,
        num_heads=2,
        ffn_dim=64,
    )
    path = tmp / f"mask_decoder_{vision_hidden}_{text_hidden}.safetensors"
    save_mask_decoder_checkpoint(MaskDecoder(cfg), path)
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
    capsys: pytest.CaptureFixture[str], ckpt: Path, mask_decoder: Path, out: Path, *extra: str
) -> tuple[int, str]:
    rc = main(
        ["export", "--checkpoint", str(ckpt), "--mask-decoder", str(mask_decoder), "--out", str(out), *extra]
    )
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
def good_mask_decoder(tmp_path: Path) -> Path:
    return _mask_decoder_file(tmp_path, 32, 32)


def test_missing_folder(tmp_path: Path, good_mask_decoder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, err = _run_export(capsys, tmp_path / "nope", good_mask_decoder, tmp_path / "out")
    _assert_error(rc, err, "CHECKPOINT_INVALID", "does not exist")
    assert not (tmp_path / "out").exists()


def test_folder_without_config(
    tmp_path: Path, good_mask_decoder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt = _checkpoint(tmp_path, config=False)
    rc, err = _run_export(capsys, ckpt, good_mask_decoder, tmp_path / "out")
    _assert_error(rc, err, "CHECKPOINT_INVALID", "no config.json")
    assert not (tmp_path / "out").exists()


def test_folder_without_weights(
    tmp_path: Path, good_mask_decoder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt = _checkpoint(tmp_path, weights=False)
    rc, err = _run_export(capsys, ckpt, good_mask_decoder, tmp_path / "out")
    _assert_error(rc, err, "CHECKPOINT_INVALID", "no weights")
    assert not (tmp_path / "out").exists()


def test_other_model_type(
    tmp_path: Path, good_mask_decoder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt = _checkpoint(tmp_path, model_type="llama")
    rc, err = _run_export(capsys, ckpt, good_mask_decoder, tmp_path / "out")
    _assert_error(rc, err, "CHECKPOINT_INVALID", "'llama'", "qwen3_vl")
    assert not (tmp_path / "out").exists()


def test_mask_decoder_width_mismatch(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = _checkpoint(tmp_path)
    wide = _mask_decoder_file(tmp_path, 64, 32)  # the tiny model's vision width is 32
    rc, err = _run_export(capsys, ckpt, wide, tmp_path / "out")
    _assert_error(rc, err, "MASK_DECODER_MISMATCH", "vision width 64", "hidden_size is 32")
    assert not (tmp_path / "out").exists()


def test_missing_mask_decoder_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = _checkpoint(tmp_path)
    rc, err = _run_export(capsys, ckpt, tmp_path / "missing.safetensors", tmp_path / "out")
    _assert_error(rc, err, "MASK_DECODER_INVALID", "does not exist")
    assert not (tmp_path / "out").exists()


def test_output_exists(tmp_path: Path, good_mask_decoder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = _checkpoint(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    rc, err = _run_export(capsys, ckpt, good_mask_decoder, out)
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


def test_help_loads_no_torch() -> None:
    """Declaring the commands imports no implementation module (torch, transformers stay unloaded)."""
    code = "import sys; from modelkit.cli import _parser; _parser(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == "False"


def test_every_command_has_its_implementation() -> None:
    import argparse

    from modelkit.cli import _parser, _resolve

    sub = next(a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert {"random-pack", "bench-reference", "train-mask-decoder", "predict", "score"} <= set(sub.choices)
    for name, parser in sub.choices.items():
        assert callable(_resolve(parser.get_default("run"))), name


def test_export_hf_checkpoint_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The success path: a Hugging Face folder (save_pretrained of the tiny model the committed pack
    was built from) exports to a pack whose graphs reproduce the committed fixtures."""
    model, mask_decoder = build_tiny_models(seed=0, weight_scale=8.0)
    ckpt = tmp_path / "ckpt"
    model.save_pretrained(ckpt)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(TOKENIZER / f, ckpt / f)
    mask_decoder_path = tmp_path / "mask_decoder.safetensors"
    save_mask_decoder_checkpoint(mask_decoder, mask_decoder_path)
    out = tmp_path / "packs" / "exported"
    rc = main(
        ["export", "--checkpoint", str(ckpt), "--mask-decoder", str(mask_decoder_path), "--out", str(out)]
        + ["--min-pixels", "65536", "--max-pixels", "262144"]
    )
    assert rc == 0, capsys.readouterr().err
    assert verify_pack(out) == []
    m = load_manifest(out)
    assert m["name"] == "exported" and m["provenance"]["base"] == str(ckpt)
    committed = load_manifest(COMMITTED_PACK)
    assert m["model"] == committed["model"]
    # The exporter writes the committed manifest's layout: graph roles and I/O, provenance keys.
    assert m["graphs"] == committed["graphs"]
    assert list(m["provenance"]) == [k for k in committed["provenance"] if k != "random"]
    assert sorted(p.name for p in (tmp_path / "packs").iterdir()) == ["exported"]

    doc, t = load_case(COMMITTED_FIXTURES / "ground_halfeven")
    vision = ort.InferenceSession(str(out / "vision_encoder.onnx"), providers=["CPUExecutionProvider"])
    feeds = {
        k: t[k] for k in ("pixel_values", "pos_embed_idx", "pos_embed_weight", "rotary_cos", "rotary_sin")
    }
    image_features = vision.run(["image_features"], feeds)[0]
    tol = doc["tolerances"]["image_features"]
    np.testing.assert_allclose(image_features, t["image_features"], atol=tol["atol"], rtol=tol["rtol"])
