"""Mask decoder: ONNX parity on several grids, parameter budget, checkpoint, width check, losses and a
quick overfit sanity run. Tiny widths throughout except the parameter count."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from modelkit.errors import ModelkitError
from modelkit.export_mask import INPUT_NAMES, OUTPUT_NAMES, example_inputs, export_mask_decoder
from modelkit.mask_decoder import (
    BoxGate,
    MaskDecoder,
    MaskDecoderConfig,
    check_mask_decoder_matches,
    count_parameters,
    load_mask_decoder_checkpoint,
    mask_losses,
    save_mask_decoder_checkpoint,
)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: on a shared 2-core machine intra-op threads cost more than they give (7x here)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_config() -> MaskDecoderConfig:
    return MaskDecoderConfig(
        vision_hidden=32, text_hidden=32, dim=32, pixel_dim=16, num_layers=2, num_heads=2, ffn_dim=64
    )


@pytest.fixture(scope="module")
def tiny_model() -> MaskDecoder:
    torch.manual_seed(0)
    return MaskDecoder(tiny_config()).eval()


@pytest.fixture(scope="module")
def exported(tiny_model: MaskDecoder, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    path = tmp_path_factory.mktemp("mask") / "mask_decoder.onnx"
    spec = export_mask_decoder(tiny_model, path, "fp32")
    return path, dict(spec)


def _run_both(model: MaskDecoder, session: ort.InferenceSession, gh: int, gw: int, q: int, k: int):
    inputs = example_inputs(model, gh, gw, q, k)
    with torch.no_grad():
        ref = [t.numpy() for t in model(*inputs)]
    got = session.run(list(OUTPUT_NAMES), {n: t.numpy() for n, t in zip(INPUT_NAMES, inputs, strict=True)})
    return ref, got


def test_spec_has_contract_names_and_symbolic_dims(exported: tuple[Path, dict]) -> None:
    path, spec = exported
    assert spec["file"] == "mask_decoder.onnx"
    shapes = {t["name"]: t["shape"] for t in spec["inputs"] + spec["outputs"]}
    assert shapes == {
        "vit_ms": [4, "P", 32],
        "mm_embeds": ["M", 32],
        "query_hidden": ["Q", 32],
        "boxes": ["Q", 4],
        "gate_boxes": ["Q", "K", 4],
        "gate_valid": ["Q", "K"],
        "hr_image": [1, 3, "Hr", "Wr"],
        "mask_logits": ["Q", 1, "Hr/4", "Wr/4"],
        "mask_logits_coarse": ["Q", 1, "Hr/4", "Wr/4"],
        "iou_pred": ["Q", 1],
    }
    assert all(t["dtype"] == "float32" for t in spec["inputs"] + spec["outputs"])
    assert path.is_file() and not path.with_name("mask_decoder.onnx_data").exists()


@pytest.mark.parametrize(
    ("gh", "gw", "q", "k"), [(18, 24, 1, 2), (8, 14, 3, 2), (18, 24, 3, 1), (2, 2, 1, 1)]
)
def test_onnx_matches_pytorch(
    tiny_model: MaskDecoder, exported: tuple[Path, dict], gh: int, gw: int, q: int, k: int
) -> None:
    path, _ = exported
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ref, got = _run_both(tiny_model, session, gh, gw, q, k)
    assert [r.shape for r in ref] == [(q, 1, 4 * gh, 4 * gw), (q, 1, 4 * gh, 4 * gw), (q, 1)]
    for name, r, g in zip(OUTPUT_NAMES, ref, got, strict=True):
        assert g.shape == r.shape, name
        scale = max(1.0, float(np.abs(r).max()))
        err = float(np.abs(g - r).max()) / scale
        assert err < 1e-4, f"{name}: max abs diff {err * scale:.3g} at scale {scale:.3g}"


@pytest.mark.parametrize(("gh", "gw"), [(6, 8), (12, 20)])
def test_onnx_degenerate_and_padded_gate_boxes(
    tiny_model: MaskDecoder, exported: tuple[Path, dict], gh: int, gw: int
) -> None:
    """Zero-size boxes hit the in-graph minimum gate side (2 patches of this grid), a box touching
    the border and an all-padding query: still the same numbers as PyTorch."""
    path, _ = exported
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    inputs = list(example_inputs(tiny_model, gh, gw, 3, 2))
    inputs[3] = torch.tensor([[0.4, 0.4, 0.4, 0.4], [0.0, 0.0, 0.5, 1.0], [0.2, 0.3, 0.6, 0.9]])
    inputs[4] = torch.tensor(
        [
            [[0.4, 0.4, 0.4, 0.4], [0.0, 0.0, 0.0, 0.0]],
            [[0.0, 0.0, 0.5, 1.0], [0.6, 0.1, 0.6, 0.2]],
            [[0.2, 0.3, 0.6, 0.9], [0.1, 0.1, 0.2, 0.2]],
        ]
    )
    inputs[5] = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 0.0]])
    with torch.no_grad():
        ref = [t.numpy() for t in tiny_model(*inputs)]
    got = session.run(list(OUTPUT_NAMES), {n: t.numpy() for n, t in zip(INPUT_NAMES, inputs, strict=True)})
    for name, r, g in zip(OUTPUT_NAMES, ref, got, strict=True):
        scale = max(1.0, float(np.abs(r).max()))
        assert float(np.abs(g - r).max()) / scale < 1e-4, name


def test_fp16_export_runs_close(tiny_model: MaskDecoder, tmp_path: Path) -> None:
    path = tmp_path / "mask_decoder.onnx"
    export_mask_decoder(tiny_model, path, "fp16")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ref, got = _run_both(tiny_model, session, 8, 14, 2, 2)
    for name, r, g in zip(OUTPUT_NAMES, ref, got, strict=True):
        assert g.dtype == np.float32
        scale = max(1.0, float(np.abs(r).max()))
        # fp16 activations through ~20 layers: a few 1e-3 of the logit scale.
        assert float(np.abs(g - r).max()) / scale < 2e-2, name


def test_int4_export_runs_close(tiny_model: MaskDecoder, tmp_path: Path) -> None:
    path = tmp_path / "mask_decoder.onnx"
    export_mask_decoder(tiny_model, path, "int4")
    nbits = [n for n in onnx.load(str(path)).graph.node if n.op_type == "MatMulNBits"]
    # Every linear layer, multiplied in int8 (accuracy level 4).
    assert len(nbits) == 34
    assert all({a.name: a.i for a in n.attribute}["accuracy_level"] == 4 for n in nbits)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ref, got = _run_both(tiny_model, session, 8, 14, 2, 2)
    for name, r, g in zip(OUTPUT_NAMES, ref, got, strict=True):
        scale = max(1.0, float(np.abs(r).max()))
        # Random tiny weights in 4-bit blocks: ~5 % of the logit scale (4.3-5.1 % measured).
        assert float(np.abs(g - r).max()) / scale < 0.1, name


def test_gates_of_batched_queries_do_not_mix() -> None:
    """Each query's gate depends on its own boxes only (the pixel path is batched over Q)."""
    gate = BoxGate(20.0, 0.15)
    level = torch.zeros(1, 1, 32, 48)
    boxes = torch.tensor([[[0.1, 0.1, 0.3, 0.4]], [[0.6, 0.5, 0.9, 0.9]]])  # [2, 1, 4]
    both = gate(boxes, torch.ones(2, 1), level, torch.tensor(0.05), torch.tensor(0.05))
    alone = gate(boxes[:1], torch.ones(1, 1), level, torch.tensor(0.05), torch.tensor(0.05))
    assert torch.allclose(both[:1], alone, atol=1e-6)


def test_gate_shape_is_box_relative() -> None:
    gate = BoxGate(20.0, 0.15)
    level = torch.zeros(1, 1, 400, 400)
    small = gate(
        torch.tensor([[[0.45, 0.45, 0.55, 0.55]]]),
        torch.ones(1, 1),
        level,
        torch.tensor(0.0),
        torch.tensor(0.0),
    )
    big = gate(
        torch.tensor([[[0.1, 0.1, 0.9, 0.9]]]), torch.ones(1, 1), level, torch.tensor(0.0), torch.tensor(0.0)
    )
    # Centre ~1 for both sizes (with normalised-unit alpha a 0.1 box would peak at ~0.33, spec 6.6).
    assert small[0, 0, 200, 200] > 0.99 and big[0, 0, 200, 200] > 0.99
    # Far outside ~0, and padding boxes (valid 0) contribute nothing.
    assert small[0, 0, 0, 0] < 1e-6
    two = torch.tensor([[[0.1, 0.1, 0.3, 0.3], [0.6, 0.6, 0.9, 0.9]]])
    masked = gate(two, torch.tensor([[1.0, 0.0]]), level, torch.tensor(0.0), torch.tensor(0.0))
    assert masked[0, 0, 300, 300] < 1e-6 and masked[0, 0, 80, 80] > 0.99
    maxed = gate(two, torch.ones(1, 2), level, torch.tensor(0.0), torch.tensor(0.0))
    assert maxed[0, 0, 300, 300] > 0.99 and maxed[0, 0, 80, 80] > 0.99


def test_gate_minimum_side_keeps_degenerate_box_open() -> None:
    gate = BoxGate(20.0, 0.15)
    level = torch.zeros(1, 1, 64, 64)  # stride 4 of a 16x16-patch image
    point = torch.tensor([[[0.5, 0.5, 0.5, 0.5]]])
    g = gate(point, torch.ones(1, 1), level, torch.tensor(2 / 16), torch.tensor(2 / 16))
    # a 2-patch (8 stride-4 pixels) window centred on the point
    assert g[0, 0, 31, 31] > 0.99 and g[0, 0, 31, 20] < 0.01


def test_parameter_count_at_4b_widths() -> None:
    model = MaskDecoder(MaskDecoderConfig(vision_hidden=1024, text_hidden=2560))
    n = count_parameters(model)
    assert 15_000_000 < n < 19_000_000, n
    # The layout of docs/mask-decoder.md: spec 6.4's 17,090,181 + 384 for the gate channels.
    assert n == 17_090_565


def test_checkpoint_round_trip(tiny_model: MaskDecoder, tmp_path: Path) -> None:
    path = tmp_path / "mask_decoder.safetensors"
    save_mask_decoder_checkpoint(tiny_model, path)
    loaded = load_mask_decoder_checkpoint(path)
    assert loaded.config == tiny_model.config
    assert not loaded.training
    inputs = example_inputs(tiny_model, 4, 6, 2, 1)
    with torch.no_grad():
        for a, b in zip(tiny_model(*inputs), loaded(*inputs), strict=True):
            assert torch.equal(a, b)
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        meta = handle.metadata()
    assert meta["format"] == "qwen3-vl-seg-mask-decoder"
    assert json.loads(meta["config"])["vision_hidden"] == 32


def test_checkpoint_errors(tmp_path: Path) -> None:
    with pytest.raises(ModelkitError) as missing:
        load_mask_decoder_checkpoint(tmp_path / "nope.safetensors")
    assert missing.value.code == "CHECKPOINT_INVALID" and "does not exist" in missing.value.message
    from safetensors.torch import save_file

    other = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(2)}, str(other), metadata={"format": "something-else"})
    with pytest.raises(ModelkitError) as wrong:
        load_mask_decoder_checkpoint(other)
    assert wrong.value.code == "CHECKPOINT_INVALID" and "not a mask decoder checkpoint" in wrong.value.message


def test_mask_decoder_mismatch() -> None:
    cfg = MaskDecoderConfig(vision_hidden=1024, text_hidden=2560)
    check_mask_decoder_matches(cfg, 1024, 2560)
    with pytest.raises(ModelkitError) as text:
        check_mask_decoder_matches(cfg, 1024, 2048)
    assert text.value.code == "MASK_DECODER_MISMATCH"
    assert "text width 2560" in text.value.message and "2048" in text.value.message
    assert "vision" not in text.value.message.split(";")[0]
    with pytest.raises(ModelkitError) as vision:
        check_mask_decoder_matches(cfg, 1152, 2560)
    assert vision.value.code == "MASK_DECODER_MISMATCH" and "vision width 1024" in vision.value.message


def test_config_round_trip_and_validation() -> None:
    cfg = tiny_config()
    assert MaskDecoderConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ModelkitError) as bad:
        MaskDecoderConfig(vision_hidden=32, text_hidden=32, dim=30, num_heads=4)
    assert bad.value.code == "INVALID_CONFIG" and "num_heads" in bad.value.message
    with pytest.raises(ModelkitError) as unknown:
        MaskDecoderConfig.from_dict({**cfg.to_dict(), "colour": 1})
    assert unknown.value.code == "INVALID_CONFIG" and "colour" in unknown.value.message


def test_losses_values() -> None:
    target = torch.zeros(1, 1, 8, 8)
    target[..., 2:6, 2:6] = 1
    perfect = (target * 2 - 1) * 20  # confident and right
    out = mask_losses(perfect, perfect, torch.ones(1, 1), target)
    assert out["iou"].item() == 1.0
    assert out["loss"].item() < 0.05
    wrong = -perfect
    bad = mask_losses(wrong, wrong, torch.ones(1, 1), target)
    assert bad["iou"].item() == 0.0 and bad["iou_mse"].item() == 1.0
    assert bad["loss"].item() > 10
    # A target at twice the resolution is area-resized onto the logits grid.
    big = torch.nn.functional.interpolate(target, scale_factor=2.0, mode="nearest")[:, 0]
    assert torch.allclose(mask_losses(perfect, perfect, torch.ones(1, 1), big)["loss"], out["loss"])


def test_overfit_one_synthetic_mask() -> None:
    """A few dozen Adam steps on one ellipse inside its box must cut the loss markedly."""
    torch.manual_seed(1)
    model = MaskDecoder(tiny_config()).train()
    gh, gw = 6, 8
    inputs = list(example_inputs(model, gh, gw, 1, 1))
    box = torch.tensor([[0.2, 0.25, 0.7, 0.8]])
    inputs[3], inputs[4] = box, box.unsqueeze(1)
    h, w = 4 * gh, 4 * gw
    ys = (torch.arange(h) + 0.5) / h
    xs = (torch.arange(w) + 0.5) / w
    cx, cy, rx, ry = 0.45, 0.525, 0.25, 0.275
    target = ((((xs[None, :] - cx) / rx) ** 2 + ((ys[:, None] - cy) / ry) ** 2) <= 1).float()[None, None]
    optim = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        out = mask_losses(*model(*inputs), target)
        optim.zero_grad()
        out["loss"].backward()
        optim.step()
        losses.append(out["loss"].item())
    with torch.no_grad():
        final = mask_losses(*model.eval()(*inputs), target)
    assert final["loss"].item() < 0.3 * losses[0], (losses[0], final["loss"].item())
    assert final["iou"].item() > 0.8
