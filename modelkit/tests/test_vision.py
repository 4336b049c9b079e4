"""vision_encoder.onnx and its host inputs against transformers' Qwen3VLVisionModel (tiny random model).

Parity is measured as max |onnx - hf| / max |hf| per output ("relative" below).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper
from transformers.vision_utils import get_vision_interpolation_indices_and_weights

from modelkit.errors import ModelkitError
from modelkit.export_vision import VisionEncoderForExport, export_vision_encoder, vision_io
from modelkit.hf import build_random_model, tiny_config
from modelkit.onnx_utils import INT4_ACCURACY_LEVEL, load_onnx, save_onnx
from modelkit.vision_inputs import merge_window_positions, vision_host_inputs

# 10x the library's init (std 0.2 weights): attention is far from uniform and activations are O(1-10),
# so layout mistakes show and float32 rounding stays small. Scale 1 gives near-uniform attention.
WEIGHT_SCALE = 10.0
GRIDS = [(18, 24), (8, 14)]
FP32_REL_TOL = 1e-4
OUTPUTS = ("image_features", "deepstack_features", "vit_ms")


@pytest.fixture(scope="module")
def model():
    return build_random_model(tiny_config(), seed=0, weight_scale=WEIGHT_SCALE)


@pytest.fixture(scope="module")
def dims(model) -> dict[str, int]:
    cfg = model.model.visual.config
    return {
        "cv": cfg.hidden_size,
        "dv": cfg.hidden_size // cfg.num_heads,
        "h": cfg.out_hidden_size,
        "n_pos": cfg.num_position_embeddings,
    }


@pytest.fixture(scope="module")
def exported(model, tmp_path_factory) -> dict[str, tuple[dict, ort.InferenceSession, Path]]:
    """The graph exported once per weight dtype, with its spec and a CPU session."""
    out: dict[str, tuple[dict, ort.InferenceSession, Path]] = {}
    for dtype in ("fp32", "fp16", "int4"):
        path = tmp_path_factory.mktemp(f"vision-{dtype}") / "vision_encoder.onnx"
        spec = export_vision_encoder(model, path, dtype)
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        out[dtype] = (dict(spec), session, path)
    return out


def hf_reference(
    model, grid: tuple[int, int], seed: int = 1
) -> tuple[torch.Tensor, dict[str, np.ndarray], dict]:
    """Random pixel_values [P, 1536], HF's outputs and the tensors HF computed internally."""
    gh, gw = grid
    visual = model.model.visual
    gen = torch.Generator().manual_seed(seed)
    pixel_values = torch.randn(gh * gw, 1536, generator=gen)  # [P, 1536], merge-window order
    captured: dict = {"blocks": {}}
    hooks = [
        block.register_forward_hook(lambda _m, _i, out, i=i: captured["blocks"].__setitem__(i, out))
        for i, block in enumerate(visual.blocks)
    ]
    hooks.append(
        visual.rotary_pos_emb.register_forward_hook(lambda _m, _i, out: captured.__setitem__("rot", out))
    )
    hooks.append(
        visual.pos_embed.register_forward_hook(lambda _m, inp, _o: captured.__setitem__("idx", inp[0]))
    )
    try:
        with torch.no_grad():
            out = visual(pixel_values, grid_thw=torch.tensor([[1, gh, gw]]))
    finally:
        for h in hooks:
            h.remove()
    taps = [*visual.config.deepstack_visual_indexes, len(visual.blocks) - 1]
    ref = {
        "image_features": out.pooler_output.numpy(),  # [M, H]
        "deepstack_features": torch.stack(out.deepstack_features).numpy(),  # [3, M, H]
        "vit_ms": torch.stack([captured["blocks"][i] for i in taps]).numpy(),  # [4, P, Cv]
    }
    return pixel_values, ref, captured


def run_graph(session: ort.InferenceSession, pixel_values: torch.Tensor, host: dict[str, np.ndarray]):
    feeds = dict(host, pixel_values=pixel_values.numpy())
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, feeds), strict=True))


def relative_errors(got: dict[str, np.ndarray], ref: dict[str, np.ndarray]) -> dict[str, float]:
    rel = {}
    for name in OUTPUTS:
        assert got[name].shape == ref[name].shape, name
        rel[name] = float(np.abs(got[name] - ref[name]).max() / np.abs(ref[name]).max())
    return rel


# ---------------------------------------------------------------------------------------------- (a)


@pytest.mark.parametrize("grid", GRIDS)
def test_host_inputs_equal_what_hf_computes(model, dims, grid):
    gh, gw = grid
    visual = model.model.visual
    _, _, captured = hf_reference(model, grid)
    host = vision_host_inputs(gh, gw, dims["n_pos"], dims["dv"])
    p = gh * gw
    assert host["pos_embed_idx"].shape == (p, 4) and host["pos_embed_idx"].dtype == np.int64
    assert host["pos_embed_weight"].shape == (p, 4) and host["pos_embed_weight"].dtype == np.float32
    assert host["rotary_cos"].shape == (p, dims["dv"]) and host["rotary_cos"].dtype == np.float32

    # Indices: exactly the ones the HF forward gathered (captured at its nn.Embedding).
    np.testing.assert_array_equal(host["pos_embed_idx"], captured["idx"].numpy())
    # Weights: HF's own helper called exactly as Qwen3VLVisionModel.forward calls it; bit-equal.
    _, hf_weight = get_vision_interpolation_indices_and_weights(
        torch.tensor([[1, gh, gw]]),
        num_grid_per_side=visual.num_grid_per_side,
        mode=visual.interpolation_mode,
        align_corners=visual.interpolation_align_corners,
        spatial_merge_size=visual.config.spatial_merge_size,
    )
    np.testing.assert_array_equal(host["pos_embed_weight"], hf_weight.numpy())
    # Rotary: the (cos, sin) HF's rotary module produced in the forward; torch's f32 cos/sin are
    # within one f32 ulp of the correctly rounded values computed here.
    cos, sin = captured["rot"]
    np.testing.assert_allclose(host["rotary_cos"], cos.numpy(), rtol=0, atol=1e-6)
    np.testing.assert_allclose(host["rotary_sin"], sin.numpy(), rtol=0, atol=1e-6)


def test_merge_window_order_matches_spec():
    # spec 7.5: row 1 is the patch right of row 0, row 2 the one below it, row 4 starts the next window
    row, col = merge_window_positions(4, 6)
    assert list(zip(row[:6].tolist(), col[:6].tolist(), strict=True)) == [
        (0, 0), (0, 1), (1, 0), (1, 1), (0, 2), (0, 3)
    ]  # fmt: skip
    assert (row[-1], col[-1]) == (3, 5)


def test_host_inputs_reject_bad_grids():
    with pytest.raises(ModelkitError) as err:
        vision_host_inputs(7, 8, 2304, 16)
    assert err.value.code == "INVALID_INPUT" and "multiples of the merge size 2" in err.value.message
    with pytest.raises(ModelkitError) as err:
        vision_host_inputs(8, 8, 2300, 16)
    assert err.value.code == "INVALID_CONFIG"


# ---------------------------------------------------------------------------------------------- (b)


def test_graph_spec_is_the_contract(exported, dims):
    inputs, outputs = vision_io(dims["cv"], dims["h"], dims["dv"], 3)
    for dtype in ("fp32", "fp16", "int4"):
        spec, session, path = exported[dtype]
        assert spec == {"file": "vision_encoder.onnx", "inputs": inputs, "outputs": outputs}
        assert json.loads(json.dumps(spec)) == spec
        assert [i.name for i in session.get_inputs()] == [t["name"] for t in inputs]
        assert not path.with_name("vision_encoder.onnx_data").exists()  # tiny graph: one file


def test_attention_is_fused_multi_head_attention(model, exported):
    """One com.microsoft MultiHeadAttention per block (no unfused Softmax) in every dtype; in fp16
    graphs it runs in f32 (its v input is cast up, its output cast back down to fp16)."""
    cfg = model.model.visual.config
    for dtype in ("fp32", "fp16", "int4"):
        proto = load_onnx(exported[dtype][2])
        graph = proto.graph
        assert ("com.microsoft", 1) in {(o.domain, o.version) for o in proto.opset_import}
        assert not [n for n in graph.node if n.op_type == "Softmax"]
        mha = [n for n in graph.node if n.op_type == "MultiHeadAttention"]
        assert len(mha) == cfg.depth
        for node in mha:
            attrs = {a.name: a.i for a in node.attribute}
            assert node.domain == "com.microsoft" and attrs == {"num_heads": cfg.num_heads}
        if dtype != "fp16":
            continue
        producer = {out: n for n in graph.node for out in n.output}
        readers = {name: [n for n in graph.node if name in n.input] for name in producer}
        for node in mha:
            v_in = producer[producer[node.input[2]].input[0]]  # MHA <- Reshape <- Cast
            assert v_in.op_type == "Cast" and v_in.attribute[0].i == onnx.TensorProto.FLOAT
            (out,) = readers[node.output[0]]  # MHA -> Reshape -> Cast
            (cast,) = readers[out.output[0]]
            assert cast.op_type == "Cast" and cast.attribute[0].i == onnx.TensorProto.FLOAT16


def test_mlp_activation_is_fused_fast_gelu(model, exported):
    """One com.microsoft FastGelu per block and no element-wise tanh formula left, in every dtype; in
    fp16 graphs it reads and writes f32 (onnxruntime's CPU kernel has no fp16)."""
    depth = model.model.visual.config.depth
    for dtype in ("fp32", "fp16", "int4"):
        graph = load_onnx(exported[dtype][2]).graph
        assert not [n for n in graph.node if n.op_type == "Tanh"]
        gelu = [n for n in graph.node if n.op_type == "FastGelu"]
        assert len(gelu) == depth and all(n.domain == "com.microsoft" for n in gelu)
        if dtype != "fp16":
            continue
        producer = {out: n for n in graph.node for out in n.output}
        for node in gelu:
            cast = producer[node.input[0]]
            assert cast.op_type == "Cast" and cast.attribute[0].i == onnx.TensorProto.FLOAT


@pytest.mark.parametrize("grid", GRIDS)
def test_fp32_graph_matches_hf(model, dims, exported, grid):
    _, session, _ = exported["fp32"]
    pixel_values, ref, _ = hf_reference(model, grid)
    got = run_graph(session, pixel_values, vision_host_inputs(*grid, dims["n_pos"], dims["dv"]))
    rel = relative_errors(got, ref)
    print(
        f"fp32 {grid}: " + ", ".join(f"{k} {v:.2e} of max {np.abs(ref[k]).max():.1f}" for k, v in rel.items())
    )
    assert max(rel.values()) < FP32_REL_TOL, rel


# fp16 weights/activations (f32 LayerNorm, softmax, rotary): ~11 bits of mantissa through 5 blocks,
# measured ~6e-4 relative; 5e-3 leaves headroom and is still 10x below the layout failures below.
FP16_REL_TOL = 5e-3
# int4 RTN with blocks of 32 on random (not smooth, heavy-tailed at scale 10) weights: each weight
# carries ~10% relative noise; measured ~0.1-0.2 of the max and ~0.1 RMS. The check is that the
# graph still tracks the reference (RMS error well under the signal), not bit parity.
INT4_REL_RMS_TOL = 0.25


def test_fp16_graph_matches_hf_loosely(model, dims, exported):
    _, session, path = exported["fp16"]
    # The rotary tables go straight into f32 rope nodes, not through an fp16 round trip: each is
    # unsqueezed once (broadcast over heads) inside a rope scope, and the result feeds only the rope
    # Muls of every block (q and k).
    nodes = load_onnx(path).graph.node
    consumers = [n for n in nodes if {"rotary_cos", "rotary_sin"} & set(n.input)]
    assert len(consumers) == 2 and all(n.op_type == "Unsqueeze" and "/rope" in n.name for n in consumers)
    tables = {n.output[0] for n in consumers}
    muls = [n for n in nodes if tables & set(n.input)]
    assert len(muls) == 4 * len(model.model.visual.blocks)  # q and k, cos and sin
    assert all(n.op_type == "Mul" and "/rope" in n.name for n in muls)
    pixel_values, ref, _ = hf_reference(model, GRIDS[0])
    got = run_graph(session, pixel_values, vision_host_inputs(*GRIDS[0], dims["n_pos"], dims["dv"]))
    rel = relative_errors(got, ref)
    print("fp16: " + ", ".join(f"{k} {v:.2e}" for k, v in rel.items()))
    assert max(rel.values()) < FP16_REL_TOL, rel


def test_int4_graph_tracks_hf(model, dims, exported):
    _, session, path = exported["int4"]
    ops = {n.op_type for n in load_onnx(path).graph.node}
    assert "MatMulNBits" in ops
    pixel_values, ref, _ = hf_reference(model, GRIDS[0])
    got = run_graph(session, pixel_values, vision_host_inputs(*GRIDS[0], dims["n_pos"], dims["dv"]))
    rms = {k: float(np.linalg.norm(got[k] - ref[k]) / np.linalg.norm(ref[k])) for k in OUTPUTS}
    print("int4 relative RMS: " + ", ".join(f"{k} {v:.3f}" for k, v in rms.items()))
    assert max(rms.values()) < INT4_REL_RMS_TOL, rms


def dequantise_matmul_nbits(b: np.ndarray, scales: np.ndarray, k: int) -> np.ndarray:
    """W^T [K, N] f32 from MatMulNBits' B (uint8 [N, blocks, block/2], two 4-bit values per byte,
    low nibble first) and scales [N, blocks]; symmetric quantisation has the implicit zero point 8."""
    n, blocks, half = b.shape
    q = np.stack([b & 0x0F, b >> 4], axis=-1).reshape(n, blocks, 2 * half).astype(np.float32)
    w = (q - 8.0) * scales.reshape(n, blocks, 1)  # [N, blocks, block]
    return w.reshape(n, -1)[:, :k].T.copy()


def test_int4_graph_matches_hf_with_its_dequantised_weights(dims, exported):
    """Put the graph's own int4 weights (dequantised) into a fresh HF model: then the int4 graph must
    agree with HF to float32 accuracy, which checks the quantised graph's wiring exactly. The pack's
    graph multiplies in int8 (MatMulNBits accuracy level 4); this check runs it at level 0 (f32
    activations), where its math is exactly the dequantised weights'."""
    _, _, path = exported["int4"]
    graph = load_onnx(path)
    nbits = [n for n in graph.graph.node if n.op_type == "MatMulNBits"]
    for node in nbits:
        (level,) = [a for a in node.attribute if a.name == "accuracy_level"]
        assert level.i == INT4_ACCURACY_LEVEL == 4
        level.i = 0
    session = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    inits = {t.name: numpy_helper.to_array(t) for t in graph.graph.initializer}
    twin = build_random_model(tiny_config(), seed=0, weight_scale=WEIGHT_SCALE)
    # The export wrapper's [in, out] weights are views of the HF weights, so writing them writes HF's.
    params = dict(VisionEncoderForExport(twin).named_parameters())
    n_quantised = 0
    for node in graph.graph.node:
        if node.op_type != "MatMulNBits":
            continue
        k = next(a.i for a in node.attribute if a.name == "K")
        name = node.input[1].removesuffix("_Q4")
        w_t = dequantise_matmul_nbits(inits[node.input[1]], inits[node.input[2]], k)
        with torch.no_grad():
            params[name].copy_(torch.from_numpy(w_t))
        n_quantised += 1
    assert n_quantised == 1 + 5 * 4 + 4 * 2  # patch embed, 5 blocks x 4, 4 mergers x 2
    assert torch.equal(twin.model.visual.blocks[0].attn.qkv.weight.t(), params["blocks.0.qkv.w_t"])
    pixel_values, ref, _ = hf_reference(twin, GRIDS[0])
    got = run_graph(session, pixel_values, vision_host_inputs(*GRIDS[0], dims["n_pos"], dims["dv"]))
    rel = relative_errors(got, ref)
    print("int4 vs HF with dequantised weights: " + ", ".join(f"{k} {v:.2e}" for k, v in rel.items()))
    assert max(rel.values()) < FP32_REL_TOL, rel


# ---------------------------------------------------------------------------------------------- (c)


@pytest.mark.parametrize("mistake", ["raster_rotary", "transposed_corners", "raster_pos_embed"])
def test_wrong_layout_fails_parity(model, dims, exported, mistake):
    """The parity check must catch host-input layout bugs the TS port could make."""
    gh, gw = GRIDS[0]
    _, session, _ = exported["fp32"]
    pixel_values, ref, _ = hf_reference(model, GRIDS[0])
    host = vision_host_inputs(gh, gw, dims["n_pos"], dims["dv"])
    raster = vision_host_inputs(gh, gw, dims["n_pos"], dims["dv"], merge=1)  # rows in raster order
    if mistake == "raster_rotary":
        host["rotary_cos"], host["rotary_sin"] = raster["rotary_cos"], raster["rotary_sin"]
    elif mistake == "transposed_corners":  # (h0, w1) and (h1, w0) weights swapped
        host["pos_embed_weight"] = host["pos_embed_weight"][:, [0, 2, 1, 3]]
    else:
        host["pos_embed_idx"], host["pos_embed_weight"] = raster["pos_embed_idx"], raster["pos_embed_weight"]
    rel = relative_errors(run_graph(session, pixel_values, host), ref)
    print(f"{mistake}: " + ", ".join(f"{k} {v:.2e}" for k, v in rel.items()))
    assert max(rel.values()) > 100 * FP32_REL_TOL, rel


# ---------------------------------------------------------------------------------------------- misc


def test_external_data_layout_runs_the_same(model, dims, exported, tmp_path):
    _, session, path = exported["fp32"]
    files = save_onnx(load_onnx(path), tmp_path / "vision_encoder.onnx", external_data=True)
    assert [f.name for f in files] == ["vision_encoder.onnx", "vision_encoder.onnx_data"]
    assert all(f.is_file() for f in files)
    ext = ort.InferenceSession(str(files[0]), providers=["CPUExecutionProvider"])
    pixel_values, _, _ = hf_reference(model, GRIDS[1])
    host = vision_host_inputs(*GRIDS[1], dims["n_pos"], dims["dv"])
    a, b = run_graph(session, pixel_values, host), run_graph(ext, pixel_values, host)
    for name in OUTPUTS:
        np.testing.assert_array_equal(a[name], b[name])


def test_export_rejects_unknown_dtype(model, tmp_path):
    with pytest.raises(ModelkitError) as err:
        export_vision_encoder(model, tmp_path / "vision_encoder.onnx", "bf16")
    assert err.value.code == "INVALID_INPUT" and "fp32, fp16, int4" in err.value.message
    assert not (tmp_path / "vision_encoder.onnx").exists()
