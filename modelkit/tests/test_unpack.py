"""unpack: a pack's graphs give back the HF Qwen3-VL they were exported from (fp16 widened, the compact
embedding expanded), `unpack` + `export` gives back the same graphs, and train-vlm --init-pack starts
from the pack's weights."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch
from onnxruntime.transformers.float16 import convert_np_to_float16
from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

from modelkit import train_vlm as tv
from modelkit.cli import main
from modelkit.defaults import DEFAULT_TOKENIZER
from modelkit.errors import ModelkitError
from modelkit.export_language import LanguageModelGraph
from modelkit.export_vision import VisionEncoderForExport
from modelkit.hf import build_random_model, tiny_config
from modelkit.pack import build_pack, default_provenance, model_section
from modelkit.unpack import REMAP, graph_weights, unpack_model

REPO = Path(__file__).resolve().parents[2]
TOKENIZER = REPO / DEFAULT_TOKENIZER
GRID = (1, 4, 6)  # t, h, w patches: 6 merged image tokens

pytestmark = pytest.mark.skipif(not (TOKENIZER / "tokenizer.json").is_file(), reason="no Qwen tokenizer")


def live_ids() -> list[int]:
    """Ids whose embedding rows stay trained in a "world" model: the specials and a few dozen words."""
    tok = tv.Tok(TOKENIZER)
    ids = {tok.special(s) for s in tv.SPECIAL_TOKENS}
    ids.update(tok.encode('Locate every red circle [{"bbox_2d": [0, 1, 2, 3], "label": "x"}] 456789'))
    return sorted(ids)


def world_model(config: Qwen3VLConfig, seed: int, live: list[int]) -> Qwen3VLForConditionalGeneration:
    """A random model whose embedding is exactly zero outside `live` (what train-vlm exports)."""
    model = build_random_model(config, seed, weight_scale=8.0)
    with torch.no_grad():
        emb = model.model.language_model.embed_tokens.weight  # [V, H]
        keep = emb[live].clone()
        emb.zero_()
        emb[live] = keep
    return model


def make_model(kind: str) -> Qwen3VLForConditionalGeneration:
    if kind == "full":  # every embedding row live: no compaction
        return build_random_model(tiny_config(), 0, weight_scale=8.0)
    config = tiny_config()
    if kind == "untied":
        config.tie_word_embeddings = False
        config.text_config.tie_word_embeddings = False
    model = world_model(config, 1, live_ids())
    if kind == "untied":
        assert model.lm_head.weight.data_ptr() != model.model.language_model.embed_tokens.weight.data_ptr()
    return model


def export_pack(model: Qwen3VLForConditionalGeneration, out: Path, dtype: str) -> Path:
    build_pack(
        model,
        None,
        out,
        name=out.name,
        description="unpack test",
        dtype=dtype,
        tokenizer_dir=TOKENIZER,
        provenance=default_provenance("random", None),
        min_pixels=65536,
        max_pixels=262144,
    )
    return out


def export_views(model: Qwen3VLForConditionalGeneration) -> dict[str, dict[str, torch.nn.Parameter]]:
    """The exporters' parameters of `model` by graph and initializer name (views of its weights)."""
    return {
        "vision_encoder.onnx": dict(VisionEncoderForExport(model).named_parameters()),
        "decoder_model_merged.onnx": dict(LanguageModelGraph(model).named_parameters()),
    }


def stored(model: Qwen3VLForConditionalGeneration, pack: Path) -> Qwen3VLForConditionalGeneration:
    """`model` with every weight the pack stores in fp16 rounded as its exporter rounds it: torch's
    cast in the language graph, onnxruntime's converter in the vision graph (which maps magnitudes
    below 5.96e-8 to +-5.96e-8 instead of rounding them to zero); written through the export views."""
    want = copy.deepcopy(model)
    for file, params in export_views(want).items():
        weights = graph_weights(pack / file)
        for name, param in params.items():
            if weights[name].dtype != np.float16:
                continue
            x = param.detach().numpy()
            half = x.astype(np.float16) if file.startswith("decoder") else convert_np_to_float16(x)
            with torch.no_grad():
                param.copy_(torch.from_numpy(half.astype(np.float32)))
    return want


def assert_same_bits(got: Qwen3VLForConditionalGeneration, want: Qwen3VLForConditionalGeneration) -> int:
    """Every parameter equal bit for bit (so -0.0 != 0.0); returns how many were compared."""
    got_params, want_params = dict(got.named_parameters()), dict(want.named_parameters())
    assert list(got_params) == list(want_params)
    for name, w in want_params.items():
        g = got_params[name]
        assert g.dtype == torch.float32 and g.shape == w.shape, name
        assert torch.equal(g.detach().view(torch.int32), w.detach().view(torch.int32)), name
    return len(want_params)


def image_inputs(model: Qwen3VLForConditionalGeneration) -> dict[str, torch.Tensor]:
    """A chat prompt with one image (random pixels) in the model's own token ids."""
    tok = tv.Tok(TOKENIZER)
    cfg = model.config
    n_pads = GRID[0] * (GRID[1] // 2) * (GRID[2] // 2)
    ids = torch.tensor([tv.prompt_ids(tok, "Locate every red circle", n_pads)])  # [1, S]
    assert int((ids == cfg.image_token_id).sum()) == n_pads
    pixels = torch.randn(GRID[0] * GRID[1] * GRID[2], 1536, generator=torch.Generator().manual_seed(3))
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "mm_token_type_ids": (ids == cfg.image_token_id).to(torch.int32),
        "pixel_values": pixels,  # [P, 1536]
        "image_grid_thw": torch.tensor([GRID]),
    }


CASES = [("full", "fp32"), ("compact", "fp32"), ("compact", "fp16"), ("untied", "fp16")]


@pytest.fixture(scope="module")
def packs(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], tuple[Any, Path]]:
    torch.set_num_threads(2)
    root = tmp_path_factory.mktemp("unpack")
    models = {kind: make_model(kind) for kind in {k for k, _ in CASES}}
    return {(k, d): (models[k], export_pack(models[k], root / f"{k}-{d}", d)) for k, d in CASES}


@pytest.mark.parametrize(("kind", "dtype"), CASES)
def test_round_trip_is_exact(packs: dict, kind: str, dtype: str) -> None:
    model, pack = packs[(kind, dtype)]
    language = graph_weights(pack / "decoder_model_merged.onnx")
    assert (REMAP in language) == (kind != "full")  # the compact path is what the world models take
    if kind != "full":
        assert language["embed_tokens"].shape == (len(live_ids()) + 1, 32)
    assert ("lm_head" in language) == (kind == "untied")
    rebuilt = unpack_model(pack)
    for c in (rebuilt.config, model.config):
        assert c.tie_word_embeddings == (kind != "untied")
    arch = [
        (model_section(c), c.text_config.intermediate_size, c.vision_config.intermediate_size)
        for c in (rebuilt.config, model.config)
    ]
    assert arch[0] == arch[1]
    tied = rebuilt.lm_head.weight.data_ptr() == rebuilt.model.language_model.embed_tokens.weight.data_ptr()
    assert tied == (kind != "untied")
    want = model if dtype == "fp32" else stored(model, pack)
    n = assert_same_bits(rebuilt, want)
    assert n == len(list(model.parameters()))
    if dtype == "fp16":  # the rounding is real: the fp16 pack does lose bits against the fp32 model
        qkv = (m.model.visual.blocks[0].attn.qkv.weight for m in (rebuilt, model))
        assert not torch.equal(*qkv)


@pytest.mark.parametrize(("kind", "dtype"), [("compact", "fp32"), ("compact", "fp16")])
def test_rebuilt_logits_equal_the_originals(packs: dict, kind: str, dtype: str) -> None:
    model, pack = packs[(kind, dtype)]
    want_model = model if dtype == "fp32" else stored(model, pack)
    rebuilt = unpack_model(pack)
    inputs = image_inputs(model)
    with torch.no_grad():
        got = rebuilt(**inputs).logits  # [1, S, V]
        want = want_model(**inputs).logits
    assert got.shape == (1, inputs["input_ids"].shape[1], 151936)
    assert torch.equal(got, want)
    assert float(want[0, -1, live_ids()].std()) > 0.5  # spread logits over the live ids, not all equal


def test_unpack_then_export_gives_the_same_graphs(packs: dict, tmp_path: Path) -> None:
    _, pack = packs[("compact", "fp16")]
    hf = tmp_path / "hf"
    assert main(["unpack", "--pack", str(pack), "--out", str(hf)]) == 0
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json"} <= {
        p.name for p in hf.iterdir()
    }
    assert main(["unpack", "--pack", str(pack), "--out", str(hf)]) == 2  # OUTPUT_EXISTS without --force
    again = tmp_path / "again"
    assert (
        main(
            ["export", "--checkpoint", str(hf), "--out", str(again), "--dtype", "fp16"]
            + ["--min-pixels", "65536", "--max-pixels", "262144"]
        )
        == 0
    )
    for f in ("vision_encoder.onnx", "decoder_model_merged.onnx"):
        a, b = onnx.load(str(pack / f)), onnx.load(str(again / f))
        assert a.graph.SerializeToString() == b.graph.SerializeToString(), f  # weights and nodes
    m_a, m_b = (json.loads((p / "pack.json").read_text()) for p in (pack, again))
    for key in ("model", "tokens", "graphs", "preprocess"):
        assert m_a[key] == m_b[key], key


def test_refuses_int4_and_missing_weights(packs: dict, tmp_path: Path) -> None:
    _, pack = packs[("compact", "fp32")]
    bad = tmp_path / "int4"
    shutil.copytree(pack, bad)
    manifest = json.loads((bad / "pack.json").read_text())
    (bad / "pack.json").write_text(json.dumps({**manifest, "dtype": "int4"}))
    with pytest.raises(ModelkitError, match="int4"):
        unpack_model(bad)
    (bad / "pack.json").write_text(json.dumps(manifest))
    proto = onnx.load(str(bad / "decoder_model_merged.onnx"))
    kept = [t for t in proto.graph.initializer if t.name != "layers.1.q_norm"]
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(kept)
    onnx.save(proto, str(bad / "decoder_model_merged.onnx"))
    with pytest.raises(ModelkitError, match="layers.1.q_norm"):
        unpack_model(bad)


def test_init_pack_starts_training_from_the_pack(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(tv, "STREAM_VOCAB_SCENES", 20)
    tok = tv.Tok(TOKENIZER)
    # The world the run will read off its stream, as train() does.
    from modelkit.synth import memory_dataset

    ds = memory_dataset(7, 10**8, tv.STREAM_VOCAB_SCENES)
    stream_world = tv.world_ids(tok, tv.build_samples(ds, tv.SampleBuilder(tok, 10)))
    # The pack knows most of it, misses 3 ids (new: they start as its zero rows) and has 2 of its own.
    extra = tok.encode(" tomato soup")
    live = sorted(set(stream_world[3:]) | set(extra))
    model = world_model(tv.shapes_config(32, 32, 3), 5, live)
    pack = export_pack(model, tmp_path / "pack", "fp16")
    want = unpack_model(pack)

    first: dict[str, Any] = {}
    compute_loss = tv.compute_loss

    def spy(wm: tv.WorldModel, batch: dict[str, Any], aux_weight: float = 1.0) -> Any:
        if not first:  # the weights the first step starts from
            first["world"] = list(wm.world)
            first["lm"] = {k: v.detach().clone() for k, v in wm.lm.state_dict().items()}
        return compute_loss(wm, batch, aux_weight)

    monkeypatch.setattr(tv, "compute_loss", spy)
    args = tv.TrainArgs(
        train=None,
        val=None,
        out=tmp_path / "run",
        batch=2,
        max_steps=2,
        tokenizer=TOKENIZER,
        threads=1,
        stream_seed=7,
        workers=1,
        coord_step=10,
        light=True,
        init_pack=pack,
    )  # default sizes (text 128 x 4 layers): the pack's 32 x 3 win
    result = tv.train(args)
    assert result["steps"] == 2 and np.isfinite(result["last_loss"])
    out = capsys.readouterr().out
    assert "training heads, optimizer state and step count start fresh" in out
    assert "3 new in this run's data" in out and f"{len(extra)} kept only from the pack" in out

    world = first["world"]
    assert world == sorted(set(stream_world) | set(extra))
    full = want.state_dict()
    emb_key = "model.language_model.embed_tokens.weight"
    for key, value in first["lm"].items():
        expect = full[key][torch.tensor(world)] if key in (emb_key, "lm_head.weight") else full[key]
        assert torch.equal(value, expect), key
    new = [world.index(t) for t in stream_world[:3]]
    assert float(first["lm"][emb_key][new].abs().max()) == 0.0
    saved = torch.load(tmp_path / "run" / "training_state.pt", weights_only=False)
    assert saved["dims"] == (32, 32, 3) and saved["step"] == 2 and saved["world"] == world
