"""`modelkit bench-reference` on the committed tiny pack and a reference folder of the same weights
(`modelkit tiny`'s models written by random_pack.write_reference): the JSON's keys, the greedy tokens
against transformers' own `generate` and the golden fixture, the prompt ids against the fixture."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from modelkit.answers import grounding_answer_ids
from modelkit.bench_reference import default_box, load_reference
from modelkit.cli import main
from modelkit.defaults import DEFAULT_TOKENIZER
from modelkit.fixtures import load_case
from modelkit.pack import load_manifest
from modelkit.preprocess import load_rgb, preprocess_image
from modelkit.random_pack import write_reference

REPO = Path(__file__).resolve().parents[2]
PACK = REPO / "models" / "tiny-random"
FIXTURES = REPO / "test" / "fixtures" / "tiny-random"
IMAGE = REPO / "test" / "fixtures" / "images" / "halfeven_400x208.png"
TOKENIZER = REPO / DEFAULT_TOKENIZER
KEYS = {
    "vision_ms",
    "prefill_ms",
    "decode_ms_per_token",
    "mask_ms",
    "ground_total_ms",
    "segment_box_total_ms",
    "tokens",
    "prompt_tokens",
    "image_tokens",
    "peak_rss_mb",
    "threads",
    "torch",
    "transformers",
    "device",
    "dtype",
    "attn_implementation",
}


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from modelkit.cli import build_tiny_models

    random = load_manifest(PACK)["provenance"]["random"]
    model, mask_decoder = build_tiny_models(random["seed"], random["weight_scale"], random["decoder_config"])
    out = tmp_path_factory.mktemp("bench") / "reference"
    write_reference(model, mask_decoder, TOKENIZER, out, [151645, 151643], 151643)
    return out


def _bench(capsys: pytest.CaptureFixture[str], reference: Path, *extra: str) -> dict[str, Any]:
    capsys.readouterr()
    argv = ["bench-reference", "--reference", str(reference), "--pack", str(PACK), "--image", str(IMAGE)]
    assert main([*argv, "--runs", "1", "--threads", "1", *extra]) == 0
    out = capsys.readouterr().out
    assert len(out.strip().splitlines()) == 1  # one JSON object, nothing else on stdout
    result: dict[str, Any] = json.loads(out)
    return result


def _generate(reference: Path, ids: list[int], n: int) -> list[int]:
    """transformers' own greedy `generate` on the same image and prompt ids."""
    from transformers import Qwen3VLForConditionalGeneration

    model = Qwen3VLForConditionalGeneration.from_pretrained(reference, dtype=torch.float32).eval()
    pre = load_manifest(PACK)["preprocess"]
    prep = preprocess_image(load_rgb(IMAGE), pre["min_pixels"], pre["max_pixels"])
    input_ids = torch.tensor([ids])
    with torch.no_grad():
        out = model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            mm_token_type_ids=(input_ids == 151655).to(torch.int32),
            pixel_values=torch.from_numpy(prep.pixel_values),
            image_grid_thw=torch.from_numpy(prep.image_grid_thw),
            do_sample=False,
            max_new_tokens=n,
            min_new_tokens=n,
        )
    return [int(t) for t in out[0, len(ids) :]]


def test_fixture_prompt_and_tokens(reference: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The fixture case's own image and expression: prompt ids and greedy tokens as recorded."""
    n = 8
    r = _bench(capsys, reference, "--tokens", str(n), "--expression", "the red box")
    assert KEYS <= set(r)
    for key in ("vision_ms", "prefill_ms", "decode_ms_per_token", "mask_ms", "ground_total_ms"):
        assert isinstance(r[key], float) and r[key] > 0, key
    assert r["ground_total_ms"] >= r["vision_ms"] + r["prefill_ms"]
    assert r["segment_box_total_ms"] >= r["mask_ms"]
    assert (r["device"], r["dtype"], r["threads"], r["attn_implementation"]) == ("cpu", "fp32", 1, "sdpa")
    assert r["decode_steps"] == n - 1 and r["peak_rss_mb"] > 0

    doc, t = load_case(FIXTURES / "ground_halfeven")
    assert doc["question"].count('"the red box"') == 1
    assert r["prompt_ids"] == t["input_ids"].tolist()
    assert r["prompt_tokens"] == t["input_ids"].shape[0]
    assert r["image_tokens"] == doc["meta"]["num_image_tokens"] == int(np.sum(t["input_ids"] == 151655))
    assert r["grid"] == doc["meta"]["grid"]
    assert r["tokens"] == t["greedy_tokens"][:n].tolist()
    assert r["timed_tokens"] == r["tokens"]  # fp32 timed run
    assert r["tokens"] == _generate(reference, r["prompt_ids"], n)


def test_default_expression_segment_box_and_bf16(reference: Path, capsys: pytest.CaptureFixture[str]) -> None:
    n = 5
    r = _bench(capsys, reference, "--tokens", str(n), "--dtype", "bf16")
    assert r["expression"] == "the red circle" and r["dtype"] == "bf16"
    assert len(r["tokens"]) == len(r["timed_tokens"]) == n
    assert r["tokens"] == _generate(reference, r["prompt_ids"], n)  # `tokens` stay fp32
    assert r["greedy_min_logit_margin"] > 0
    # segment_box: the ground prompt about "region" + the answer prefix of the middle-half box
    ref, manifest = load_reference(reference, PACK, torch.device("cpu"), "sdpa")
    question = manifest["prompts"]["ground"].replace("{expression}", "region")
    prompt = ref.prompt_ids(question, r["image_tokens"])
    box1000 = [250, 250, 750, 750]
    assert default_box(400, 208) == [100.0, 52.0, 300.0, 156.0]
    prefix = grounding_answer_ids(ref.tokenizer, [box1000], ["region"], close=False).ids
    assert ref.tokenizer.decode(prefix) == '[{"bbox_2d": [250, 250, 750, 750'
    assert r["segment_box_prompt_tokens"] == len(prompt) + len(prefix)


def test_serve_rounds(
    reference: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """--serve: one ready line with the fp32 tokens, one JSON line per 'round', a final line at 'done'."""
    import io

    monkeypatch.setattr("sys.stdin", io.StringIO("round\nnoise\nround 2\ndone\nround\n"))
    capsys.readouterr()
    argv = ["bench-reference", "--reference", str(reference), "--pack", str(PACK), "--image", str(IMAGE)]
    assert main([*argv, "--tokens", "4", "--threads", "1", "--expression", "the red box", "--serve"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert [("ready" in x, "done" in x) for x in lines] == [
        (True, False),
        (False, False),
        (False, False),
        (False, True),
    ]
    _, t = load_case(FIXTURES / "ground_halfeven")
    assert lines[0]["tokens"] == t["greedy_tokens"][:4].tolist()
    for r in lines[1:3]:
        assert set(r) == {
            "vision_ms",
            "prefill_ms",
            "decode_ms_per_token",
            "mask_ms",
            "ground_total_ms",
            "ground_answer_total_ms",
            "segment_box_total_ms",
        }
        assert all(v > 0 for v in r.values())
    assert lines[3]["device"] == "cpu" and lines[3]["peak_rss_mb"] > 0


def test_errors(reference: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["bench-reference", "--reference", str(reference), "--pack", str(PACK), "--image", str(IMAGE)]
    assert main([*argv, "--tokens", "1"]) == 2
    assert capsys.readouterr().err.startswith("INVALID_INPUT: Expected --tokens >= 2")
    assert main([*argv, "--box", "5,5,1,1"]) == 2
    assert "--box" in capsys.readouterr().err
    shapes = REPO / "models" / "shapes"
    assert (
        main(["bench-reference", "--reference", str(reference), "--pack", str(shapes), "--image", str(IMAGE)])
        == 2
    )
    assert capsys.readouterr().err.startswith("REFERENCE_MISMATCH: ")
