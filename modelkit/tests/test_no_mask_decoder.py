"""Packs without a mask decoder (`export` without `--mask-decoder`), the `domain` field, `validate`.

An official Qwen3-VL checkpoint has no trained mask decoder yet: its pack has the vision encoder,
the language model and the tokenizer, no `graphs.mask_decoder` / `model.mask_decoder`, and
`provenance.mask_decoder` null. The export runs once, on the tiny random model saved as an HF folder.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

from modelkit.cli import DEFAULT_TOKENIZER, build_tiny_models, main, models_for_pack
from modelkit.defaults import SHAPES_DOMAIN
from modelkit.fixtures import CASES, load_case, record_fixtures
from modelkit.hf import tiny_config
from modelkit.pack import NO_MASK_DECODER, has_mask_decoder, load_manifest, manifest_problems, verify_pack

REPO = Path(__file__).resolve().parents[2]
TOKENIZER = REPO / DEFAULT_TOKENIZER
COMMITTED_PACK = REPO / "models" / "tiny-random"
COMMITTED_FIXTURES = REPO / "test" / "fixtures" / "tiny-random"
SHAPES_PACK = REPO / "models" / "shapes"
DOMAIN = "random weights for tests; knows nothing"


def _copy_tokenizer(folder: Path) -> None:
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(TOKENIZER / f, folder / f)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model the committed pack was built from, as a Hugging Face folder (no mask decoder)."""
    model, _ = build_tiny_models(seed=0, weight_scale=8.0)
    folder = tmp_path_factory.mktemp("ckpt") / "Qwen3-VL-tiny"
    model.save_pretrained(folder)
    _copy_tokenizer(folder)
    return folder


@pytest.fixture(scope="module")
def pack(ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("packs") / "no-decoder"
    argv = ["export", "--checkpoint", str(ckpt), "--out", str(out), "--domain", f"  {DOMAIN} "]
    assert main([*argv, "--min-pixels", "65536", "--max-pixels", "262144"]) == 0
    return out


def test_manifest_has_no_mask_decoder(pack: Path, ckpt: Path) -> None:
    m = load_manifest(pack)
    assert list(m)[:6] == ["format", "format_version", "name", "description", "domain", "dtype"]
    assert m["domain"] == DOMAIN  # stripped
    assert m["name"] == "no-decoder" and m["description"] == "Qwen3-VL from Qwen3-VL-tiny, no mask decoder"
    assert list(m["graphs"]) == ["vision_encoder", "language_model"]
    assert list(m["model"]) == ["text", "vision"]
    assert m["provenance"]["mask_decoder"] is None and m["provenance"]["base"] == str(ckpt)
    assert not has_mask_decoder(m)
    # Everything else is what an export with a mask decoder writes (the committed tiny pack's model).
    committed = load_manifest(COMMITTED_PACK)
    assert m["model"] == {k: committed["model"][k] for k in ("text", "vision")}
    assert {k: m["graphs"][k] for k in m["graphs"]} == {k: committed["graphs"][k] for k in m["graphs"]}
    for key in ("preprocess", "tokens", "prompts", "tokenizer"):
        assert m[key] == committed[key], key
    assert list(m["provenance"]) == [k for k in committed["provenance"] if k != "random"]


def test_files_are_exactly_what_was_written(pack: Path) -> None:
    m = load_manifest(pack)
    on_disk = sorted(p.relative_to(pack).as_posix() for p in pack.rglob("*") if p.is_file())
    assert on_disk == sorted(
        [
            "pack.json",
            "vision_encoder.onnx",
            "decoder_model_merged.onnx",
            "tokenizer.json",
            "tokenizer_config.json",
        ]
    )
    assert sorted(m["files"]) == [f for f in on_disk if f != "pack.json"]
    for rel, entry in m["files"].items():
        data = (pack / rel).read_bytes()
        assert entry == {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}, rel
    assert verify_pack(pack) == []
    assert sorted(p.name for p in pack.parent.iterdir()) == ["no-decoder"]  # no partial folder left


def test_graphs_load_and_run_in_onnxruntime(pack: Path) -> None:
    sessions = {
        role: ort.InferenceSession(str(pack / g["file"]), providers=["CPUExecutionProvider"])
        for role, g in load_manifest(pack)["graphs"].items()
    }
    m = load_manifest(pack)
    for role, session in sessions.items():
        assert [i.name for i in session.get_inputs()] == [i["name"] for i in m["graphs"][role]["inputs"]]
        assert [o.name for o in session.get_outputs()] == [o["name"] for o in m["graphs"][role]["outputs"]]
    # The vision encoder reproduces the committed fixture (same tiny model).
    doc, t = load_case(COMMITTED_FIXTURES / "ground_halfeven")
    feeds = {
        k: t[k] for k in ("pixel_values", "pos_embed_idx", "pos_embed_weight", "rotary_cos", "rotary_sin")
    }
    got = sessions["vision_encoder"].run(["image_features"], feeds)[0]
    tol = doc["tolerances"]["image_features"]
    np.testing.assert_allclose(got, t["image_features"], atol=tol["atol"], rtol=tol["rtol"])


def test_validate_and_verify_accept_it(pack: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", str(pack)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"OK: {pack}: pack no-decoder (fp32), 4 files match pack.json")
    assert out[0].endswith("graphs: vision_encoder, language_model")
    assert out[1:] == [f"domain: {DOMAIN}", NO_MASK_DECODER]
    assert NO_MASK_DECODER.startswith("no mask decoder: segment unavailable")
    assert main(["verify", str(pack)]) == 0
    assert capsys.readouterr().out.splitlines() == [f"OK: {pack}: 4 files match pack.json", NO_MASK_DECODER]


def test_validate_committed_packs(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", str(COMMITTED_PACK)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].endswith("graphs: vision_encoder, language_model, mask_decoder")
    assert out[1:] == ["domain: (not stated)"]
    assert manifest_problems(load_manifest(SHAPES_PACK)) == []


def _assert_error(rc: int, err: str, code: str, *fragments: str) -> None:
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{code}: "), err
    for f in fragments:
        assert f in lines[0], lines[0]


def test_validate_refuses_half_a_mask_decoder_and_bad_checksums(
    pack: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    half = tmp_path / "half"
    shutil.copytree(pack, half)
    m = load_manifest(half)
    m["model"]["mask_decoder"] = load_manifest(COMMITTED_PACK)["model"]["mask_decoder"]
    (half / "pack.json").write_text(json.dumps(m))
    rc = main(["validate", str(half)])
    _assert_error(rc, capsys.readouterr().err, "PACK_INVALID", "model.mask_decoder is present")

    changed = tmp_path / "changed"
    shutil.copytree(pack, changed)
    with (changed / "tokenizer_config.json").open("ab") as f:
        f.write(b" ")
    rc = main(["validate", str(changed)])
    _assert_error(rc, capsys.readouterr().err, "PACK_CHECKSUM_MISMATCH", "tokenizer_config.json")


def _broken(manifest: dict[str, Any], edit: str) -> dict[str, Any]:
    m = copy.deepcopy(manifest)
    if edit == "graph_only":
        del m["model"]["mask_decoder"]
    elif edit == "sizes_only":
        del m["graphs"]["mask_decoder"]
    elif edit == "provenance":
        del m["graphs"]["mask_decoder"], m["model"]["mask_decoder"]
    elif edit == "no_language_model":
        del m["graphs"]["language_model"]
    elif edit == "blank_domain":
        m["domain"] = " "
    elif edit == "unknown_graph":
        m["graphs"]["extra"] = m["graphs"]["vision_encoder"]
    elif edit == "decoder_keys":
        del m["model"]["mask_decoder"]["gate_alpha"]
    return m


@pytest.mark.parametrize(
    ("edit", "fragment"),
    [
        ("graph_only", "graphs.mask_decoder is present but model.mask_decoder is not"),
        ("sizes_only", "model.mask_decoder is present but graphs.mask_decoder is not"),
        ("provenance", "provenance.mask_decoder names a mask decoder but the pack has none"),
        ("no_language_model", "graphs.language_model: missing"),
        ("blank_domain", "domain: present but not a non-empty string"),
        ("unknown_graph", "graphs.extra: unknown graph role"),
        ("decoder_keys", "model.mask_decoder lacks gate_alpha"),
    ],
)
def test_manifest_problems(edit: str, fragment: str) -> None:
    committed = load_manifest(COMMITTED_PACK)
    assert manifest_problems(committed) == []
    problems = manifest_problems(_broken(committed, edit))
    assert any(fragment in p for p in problems), problems


def _placeholder_checkpoint(tmp: Path, weights: bool = True) -> Path:
    folder = tmp / "ckpt"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(tiny_config().to_dict()))
    if weights:
        (folder / "model.safetensors").write_bytes(b"not read by these tests")
    _copy_tokenizer(folder)
    return folder


def test_domain_option_of_every_pack_writer() -> None:
    from modelkit.cli import _parser

    for argv in (
        ["export", "--checkpoint", "c", "--out", "o"],
        ["tiny"],
        ["random-pack", "--shape", "qwen3-vl-2b", "--out", "o"],
    ):
        assert _parser().parse_args(argv).domain is None
        assert _parser().parse_args([*argv, "--domain", "d"]).domain == "d"


def test_export_cheap_checks_without_mask_decoder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = _placeholder_checkpoint(tmp_path, weights=False)
    rc = main(["export", "--checkpoint", str(ckpt), "--out", str(tmp_path / "out")])
    _assert_error(rc, capsys.readouterr().err, "CHECKPOINT_INVALID", "no weights")
    rc = main(["export", "--checkpoint", str(ckpt), "--out", str(tmp_path / "out"), "--domain", "  "])
    _assert_error(rc, capsys.readouterr().err, "INVALID_INPUT", "--domain is empty")
    assert not (tmp_path / "out").exists()


def test_fixtures_of_a_pack_without_mask_decoder(
    pack: Path, ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rc = main(["fixtures", "--pack", str(pack), "--out", str(tmp_path / "fx")])
    _assert_error(rc, capsys.readouterr().err, "INVALID_INPUT", "--checkpoint")
    argv = ["fixtures", "--pack", str(pack), "--out", str(tmp_path / "fx"), "--checkpoint", str(ckpt)]
    rc = main([*argv, "--mask-decoder", str(tmp_path / "m.safetensors")])
    _assert_error(rc, capsys.readouterr().err, "INVALID_INPUT", "leave out --mask-decoder")

    model, mask_decoder = models_for_pack(pack, ckpt, None)
    assert mask_decoder is None
    case = CASES[0]
    record_fixtures(model, None, pack, tmp_path / "fx", tmp_path / "images", cases=(case,))
    doc, t = load_case(tmp_path / "fx" / case.name)
    assert not any(k.startswith("mask_") or k == "iou_pred" for k in t)
    assert "mask_query_rows" not in doc["meta"]
    # The same model as the committed pack: the non-mask tensors are the committed ones.
    _, committed = load_case(COMMITTED_FIXTURES / case.name)
    assert set(t) == {k for k in committed if not (k.startswith("mask_") or k == "iou_pred")}
    for k in ("input_ids", "position_ids", "greedy_tokens"):
        assert np.array_equal(t[k], committed[k]), k


def test_bench_reference_needs_a_mask_decoder(
    pack: Path, ckpt: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    image = REPO / "test" / "fixtures" / "images" / "halfeven_400x208.png"
    argv = ["bench-reference", "--reference", str(ckpt), "--pack", str(pack), "--image", str(image)]
    _assert_error(main(argv), capsys.readouterr().err, "MASK_DECODER_MISSING", "no mask decoder")


def test_shapes_export_script_passes_the_shapes_domain(tmp_path: Path) -> None:
    """The demo pack's export command carries SHAPES_DOMAIN; run with a missing checkpoint it fails at
    the first cheap check, so its arguments parse."""
    script = REPO / "modelkit" / "scripts" / "export_shapes_pack.sh"
    assert f'--domain "{SHAPES_DOMAIN}"' in script.read_text()
    # A rebuilt pack carries the committed pack's text (once the committed pack.json has one).
    assert load_manifest(SHAPES_PACK).get("domain", SHAPES_DOMAIN) == SHAPES_DOMAIN
    env = {
        **os.environ,
        "PYTHON": sys.executable,
        "CHECKPOINT": str(tmp_path / "missing"),
        "OUT": str(tmp_path / "shapes"),
    }
    run = subprocess.run(["bash", str(script)], capture_output=True, text=True, cwd=REPO, env=env)
    assert run.returncode == 2 and run.stderr.startswith("CHECKPOINT_INVALID: "), run.stderr
    assert not (tmp_path / "shapes").exists()
