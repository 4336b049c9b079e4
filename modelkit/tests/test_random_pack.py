"""`modelkit random-pack`: the released configs, the depth cut and its DeepStack tap rule, and the
writer end to end.

A real-width pack (2B: a 1.2 GB embedding alone) takes about a minute and 6 GB of RAM, too much for
the suite; the end-to-end test runs the same command on the 8B config with its widths shrunk (real
vocabulary, untied head, cut depth), and checks that the pack's graphs and the reference folder hold
the same weights.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import torch
from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

import modelkit.random_pack as random_pack
from modelkit.cli import main
from modelkit.defaults import DEFAULT_TOKENIZER
from modelkit.mask_decoder import load_mask_decoder_checkpoint
from modelkit.pack import load_manifest, mask_decoder_section, model_section, verify_pack
from modelkit.random_pack import MASK_DECODER_FILE, random_config, remap_taps
from modelkit.released_configs import SHAPES, released_config

REPO = Path(__file__).resolve().parents[2]
TOKENIZER = REPO / DEFAULT_TOKENIZER

# qwen3-vl-spec.md section 1.1, column by column.
TABLE = {
    "qwen3-vl-2b": {"text": (2048, 28, 16, 6144), "vision": (24, 1024, 4096, 2048), "taps": [5, 11, 17]},
    "qwen3-vl-4b": {"text": (2560, 36, 32, 9728), "vision": (24, 1024, 4096, 2560), "taps": [5, 11, 17]},
    "qwen3-vl-8b": {"text": (4096, 36, 32, 12288), "vision": (27, 1152, 4304, 4096), "taps": [8, 16, 24]},
}


@pytest.mark.parametrize("shape", SHAPES)
def test_released_configs(shape: str) -> None:
    config = Qwen3VLConfig(**released_config(shape))
    tc, vc, want = config.text_config, config.vision_config, TABLE[shape]
    assert (tc.hidden_size, tc.num_hidden_layers, tc.num_attention_heads, tc.intermediate_size) == want[
        "text"
    ]
    assert (vc.depth, vc.hidden_size, vc.intermediate_size, vc.out_hidden_size) == want["vision"]
    assert list(vc.deepstack_visual_indexes) == want["taps"]
    assert (tc.num_key_value_heads, tc.head_dim, tc.vocab_size, tc.rms_norm_eps) == (8, 128, 151936, 1e-6)
    assert tc.rope_parameters == {
        "rope_type": "default",
        "rope_theta": 5_000_000.0,
        "mrope_section": [24, 20, 20],
        "mrope_interleaved": True,
    }
    assert (vc.num_heads, vc.patch_size, vc.temporal_patch_size, vc.spatial_merge_size) == (16, 16, 2, 2)
    assert vc.num_position_embeddings == 2304 and vc.hidden_act == "gelu_pytorch_tanh"
    assert config.tie_word_embeddings == (shape != "qwen3-vl-8b")
    assert (config.image_token_id, config.vision_start_token_id) == (151655, 151652)
    # The data is copied out: editing one result leaves the table alone.
    released_config(shape)["vision_config"]["deepstack_visual_indexes"].append(99)
    assert released_config(shape)["vision_config"]["deepstack_visual_indexes"] == want["taps"]


def test_tap_rule() -> None:
    assert remap_taps([5, 11, 17], 24, 4) == [0, 1, 2]
    assert remap_taps([5, 11, 17], 24, 3) == [0, 1, 2]
    assert remap_taps([5, 11, 17], 24, 12) == [2, 5, 8]
    assert remap_taps([8, 16, 24], 27, 4) == [0, 2, 3]
    for taps, depth in (([5, 11, 17], 24), ([8, 16, 24], 27)):
        assert remap_taps(taps, depth, depth) == taps
        for d in range(3, depth + 1):
            got = remap_taps(taps, depth, d)
            assert len(got) == 3 and got == sorted(set(got)) and 0 <= got[0] and got[-1] < d, (d, got)
    with pytest.raises(ValueError):
        remap_taps([5, 11, 17], 24, 2)


def test_depth_cut_keeps_widths() -> None:
    full = Qwen3VLConfig(**released_config("qwen3-vl-2b"))
    cut = random_config("qwen3-vl-2b", 4, 4)
    a, b = model_section(full), model_section(cut)
    assert b["text"]["num_hidden_layers"] == 4 and b["vision"]["depth"] == 4
    assert b["vision"]["deepstack_visual_indexes"] == [0, 1, 2]
    for part, cut_keys in (
        ("text", {"num_hidden_layers"}),
        ("vision", {"depth", "deepstack_visual_indexes"}),
    ):
        assert {k: v for k, v in a[part].items() if k not in cut_keys} == {
            k: v for k, v in b[part].items() if k not in cut_keys
        }
    assert cut.text_config.intermediate_size == 6144 and cut.vision_config.intermediate_size == 4096
    assert model_section(random_config("qwen3-vl-8b")) == model_section(
        Qwen3VLConfig(**released_config("qwen3-vl-8b"))
    )


@pytest.mark.parametrize(("flag", "value"), [("--text-layers", "2"), ("--vision-depth", "25")])
def test_bad_depth_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], flag: str, value: str
) -> None:
    argv = ["random-pack", "--shape", "qwen3-vl-2b", flag, value, "--tokenizer", str(TOKENIZER)]
    rc = main([*argv, "--out", str(tmp_path / "rp")])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("INVALID_INPUT: ") and flag in err, err
    assert not (tmp_path / "rp").exists()


def _shrunk(shape: str) -> dict[str, Any]:
    """`shape`'s config at tiny widths (real vocabulary, token ids, depths, taps and tying)."""
    kwargs = released_config(shape)
    kwargs["text_config"].update(
        hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=32
    )
    kwargs["text_config"]["rope_parameters"]["mrope_section"] = [6, 5, 5]
    kwargs["vision_config"].update(hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=32)
    return kwargs


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("random-pack") / "rp"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(random_pack, "released_config", _shrunk)
        argv = ["random-pack", "--shape", "qwen3-vl-8b", "--text-layers", "3", "--vision-depth", "4"]
        argv += ["--out", str(out), "--tokenizer", str(TOKENIZER), "--min-pixels", "65536"]
        argv += ["--domain", "nothing: random weights"]
        assert main([*argv, "--max-pixels", "262144"]) == 0
    return out


def test_pack_and_reference_layout(built: Path) -> None:
    pack, reference = built / "pack", built / "reference"
    assert verify_pack(pack) == []
    m = load_manifest(pack)
    assert m["model"]["text"]["num_hidden_layers"] == 3 and m["model"]["text"]["hidden_size"] == 32
    assert m["model"]["vision"]["depth"] == 4 and m["model"]["vision"]["deepstack_visual_indexes"] == [
        0,
        2,
        3,
    ]
    assert m["provenance"]["random_pack"]["shape"] == "qwen3-vl-8b"
    assert m["domain"] == "nothing: random weights"
    assert m["tokens"]["stop"] == [151645, 151643]
    names = {p.name for p in reference.iterdir()}
    assert {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"} <= names
    assert MASK_DECODER_FILE in names and any(
        n.endswith(".safetensors") and n.startswith("model") for n in names
    )
    assert json.loads((reference / "generation_config.json").read_text())["eos_token_id"] == [151645, 151643]
    model = Qwen3VLForConditionalGeneration.from_pretrained(reference, dtype=torch.float32)
    assert model_section(model.config) == {k: m["model"][k] for k in ("text", "vision")}
    lm = model.model.language_model
    assert model.lm_head.weight.data_ptr() != lm.embed_tokens.weight.data_ptr()  # 8B: untied head
    assert not torch.equal(model.lm_head.weight, lm.embed_tokens.weight)
    mask_decoder = load_mask_decoder_checkpoint(reference / MASK_DECODER_FILE)
    assert mask_decoder_section(mask_decoder.config) == m["model"]["mask_decoder"]
    # --force is needed to build again, and nothing is touched without it
    before = (pack / "pack.json").read_bytes()
    assert (
        main(["random-pack", "--shape", "qwen3-vl-8b", "--tokenizer", str(TOKENIZER), "--out", str(built)])
        == 2
    )
    assert (pack / "pack.json").read_bytes() == before


def test_pack_graphs_hold_the_reference_weights(built: Path) -> None:
    """The language model graph and the HF model loaded from the reference folder agree (text-only
    prompt, plain positions), so transformers sees exactly the pack's weights."""
    model = Qwen3VLForConditionalGeneration.from_pretrained(built / "reference", dtype=torch.float32).eval()
    text = model.config.text_config
    session = ort.InferenceSession(
        str(built / "pack" / "decoder_model_merged.onnx"), providers=["CPUExecutionProvider"]
    )
    ids = np.array([[151644, 872, 198, 9707, 1052, 151645, 198, 151644, 77091, 198]], dtype=np.int64)
    seq = ids.shape[1]
    feeds: dict[str, np.ndarray] = {
        "input_ids": ids,
        "visual_embeds": np.zeros((4, 1, seq, text.hidden_size), np.float32),
        "attention_mask": np.ones((1, seq), np.int64),
        "position_ids": np.tile(np.arange(seq), (3, 1, 1)).reshape(3, 1, seq),
    }
    for i in range(text.num_hidden_layers):
        for kind in ("key", "value"):
            feeds[f"past_key_values.{i}.{kind}"] = np.zeros(
                (1, text.num_key_value_heads, 0, text.head_dim), np.float32
            )
    logits = session.run(["logits"], feeds)[0][0, 0]  # [V]
    with torch.no_grad():
        want = model(input_ids=torch.from_numpy(ids)).logits[0, -1].numpy()
    assert float(np.abs(logits - want).max()) <= 1e-4 * max(1.0, float(np.abs(want).max()))
    assert int(logits.argmax()) == int(want.argmax())

    # the mask decoder graph and the reference's mask decoder agree too
    from modelkit.export_mask import example_inputs

    mask_decoder = load_mask_decoder_checkpoint(built / "reference" / MASK_DECODER_FILE)
    inputs = example_inputs(mask_decoder, 4, 6)
    mask_session = ort.InferenceSession(
        str(built / "pack" / "mask_decoder.onnx"), providers=["CPUExecutionProvider"]
    )
    names = [i.name for i in mask_session.get_inputs()]
    got = mask_session.run(["mask_logits"], {n: t.numpy() for n, t in zip(names, inputs, strict=True)})[0]
    with torch.no_grad():
        ref = mask_decoder(*inputs)[0].numpy()
    assert float(np.abs(got - ref).max()) <= 1e-4 * max(1.0, float(np.abs(ref).max()))
