"""Embedding compaction (compact_embedding.py): a tiny checkpoint whose embedding has only some live
rows, exported with and without compaction (fp32: Gemm head; fp16: MatMul head), must give the same
outputs bit for bit on prefill (image rows, live and dead ids) and KV-cache decode steps; the
graph-surgery path for an existing pack (`compact_pack`) must agree with the exporter's and change
only that graph's `files` entry in pack.json."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper

from modelkit.compact_embedding import (
    compact_embedding,
    compact_pack,
    compact_plan,
    should_compact,
    zero_rows,
)
from modelkit.errors import ModelkitError
from modelkit.export_language import export_language_model
from modelkit.hf import build_random_model, tiny_config
from modelkit.pack import PACK_FORMAT, file_digest, load_manifest

SEED = 11
N_LIVE = 300
IMAGE_ROWS = 12


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.set_num_threads(2)
    model = build_random_model(tiny_config(), SEED, weight_scale=20.0)
    cfg = model.config
    gen = torch.Generator().manual_seed(SEED)
    vocab = cfg.text_config.vocab_size
    live = torch.randperm(vocab, generator=gen)[:N_LIVE]
    live = torch.cat([live, torch.tensor([cfg.image_token_id, cfg.vision_start_token_id])]).unique()
    with torch.no_grad():
        table = model.model.language_model.embed_tokens.weight  # tied with lm_head
        keep = torch.zeros(vocab, dtype=torch.bool)
        keep[live] = True
        table[~keep] = 0.0
    assert model.lm_head.weight.data_ptr() == table.data_ptr()
    return model


def live_ids(model: torch.nn.Module) -> np.ndarray:
    table = model.model.language_model.embed_tokens.weight.detach().numpy()
    return np.flatnonzero(~zero_rows(table))


def session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run_script(sessions: list[ort.InferenceSession], model: torch.nn.Module) -> list[list[np.ndarray]]:
    """The same prefill + decode calls on every session; returns each session's outputs, all calls."""
    cfg = model.config
    tc = cfg.text_config
    rng = np.random.default_rng(SEED)
    live = live_ids(model)
    text = live[(live != cfg.image_token_id)]
    dead = np.setdiff1d(np.arange(tc.vocab_size), live)
    ids = np.concatenate(
        [
            rng.choice(text, 5),
            np.full(IMAGE_ROWS, cfg.image_token_id),
            rng.choice(dead, 3),
            rng.choice(text, 6),
        ]
    )
    ve = np.zeros((4, 1, ids.size, tc.hidden_size), np.float32)
    ve[:, 0, ids == cfg.image_token_id] = rng.normal(0, 1, (4, IMAGE_ROWS, tc.hidden_size))
    past = {
        f"past_key_values.{i}.{kind}": np.zeros((1, tc.num_key_value_heads, 0, tc.head_dim), np.float32)
        for i in range(tc.num_hidden_layers)
        for kind in ("key", "value")
    }
    calls = [(ids, ve)]
    for step in range(4):  # decode: a live id, a dead id, a chunk of both, a live id
        chunk = [
            [rng.choice(text)],
            [rng.choice(dead)],
            [rng.choice(text), rng.choice(dead)],
            [rng.choice(text)],
        ]
        tokens = np.array(chunk[step], np.int64)
        calls.append((tokens, np.zeros((4, 1, tokens.size, tc.hidden_size), np.float32)))
    results: list[list[np.ndarray]] = []
    for sess in sessions:
        names = [o.name for o in sess.get_outputs()]
        state, start, outs = dict(past), 0, []
        for tokens, visual in calls:
            feeds = {
                "input_ids": tokens[None].astype(np.int64),
                "visual_embeds": visual,
                "attention_mask": np.ones((1, start + tokens.size), np.int64),
                "position_ids": np.tile(np.arange(start, start + tokens.size), (3, 1))[:, None].astype(
                    np.int64
                ),
                **state,
            }
            got = dict(zip(names, sess.run(None, feeds), strict=True))
            outs += list(got.values())
            state = {
                n.replace("present.", "past_key_values."): v
                for n, v in got.items()
                if n.startswith("present.")
            }
            start += tokens.size
        results.append(outs)
    return results


def assert_identical(a: list[np.ndarray], b: list[np.ndarray]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.shape == y.shape and x.dtype == y.dtype
        np.testing.assert_array_equal(x.view(np.uint32), y.view(np.uint32))  # bit for bit


def io_of(path: Path) -> list[tuple]:
    sess = session(path)
    return [(v.name, v.type, v.shape) for v in [*sess.get_inputs(), *sess.get_outputs()]]


def test_plan_keeps_live_rows_and_one_zero_row() -> None:
    table = np.zeros((10, 3), np.float16)
    table[[2, 5, 7]] = np.arange(9, dtype=np.float16).reshape(3, 3) + 1
    table[9, 1] = -0.0  # a -0.0 row is not all-zero bits: kept, so its sign survives
    rows, remap = compact_plan(table)
    assert rows.tolist() == [0, 2, 5, 7, 9]
    assert remap.dtype == np.int32 and remap.tolist() == [0, 0, 1, 0, 0, 2, 0, 3, 0, 4]
    np.testing.assert_array_equal(table[rows][remap].view(np.uint16), table.view(np.uint16))
    assert should_compact(table, None)  # 6 of 10 rows zero
    assert not should_compact(table, False)
    live = np.ones((4, 3), np.float32)
    assert not should_compact(live, None)
    with pytest.raises(ModelkitError) as e:
        should_compact(live, True)
    assert e.value.code == "INVALID_INPUT"


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_export_compacts_and_outputs_are_identical(
    model: torch.nn.Module, tmp_path: Path, dtype: str
) -> None:
    tc = model.config.text_config
    full_path, compact_path = tmp_path / "full" / "d.onnx", tmp_path / "compact" / "d.onnx"
    full_spec = export_language_model(model, full_path, dtype, compact_embedding=False)
    spec = export_language_model(model, compact_path, dtype)  # default: mostly dead -> compacted
    assert spec == {**full_spec, "file": spec["file"]}
    assert io_of(full_path) == io_of(compact_path)

    proto = onnx.load(str(compact_path))
    inits = {t.name: t for t in proto.graph.initializer}
    n_live = live_ids(model).size
    assert list(inits["embed_tokens"].dims) == [n_live + 1, tc.hidden_size]
    assert list(inits["embed_tokens.remap"].dims) == [tc.vocab_size]
    assert not [
        t for t in proto.graph.initializer if tc.vocab_size in t.dims and t.name != "embed_tokens.remap"
    ]
    head = "Gemm" if dtype == "fp32" else "MatMul"
    assert sorted(n.op_type for n in proto.graph.node if "embed_tokens" in n.input) == sorted(
        ["Gather", head]
    )
    assert compact_path.stat().st_size < full_path.stat().st_size / 10

    full, compact = run_script([session(full_path), session(compact_path)], model)
    assert_identical(full, compact)
    # the dead ids' logits are exactly 0, in both
    logits = full[0][0, 0]
    assert np.all(logits[zero_rows(model.model.language_model.embed_tokens.weight.detach().numpy())] == 0)

    # graph surgery on the uncompacted export gives the same graph outputs too
    surgery_path = tmp_path / "surgery.onnx"
    onnx.save(compact_embedding(onnx.load(str(full_path))), str(surgery_path))
    (surgery,) = run_script([session(surgery_path)], model)
    assert_identical(full, surgery)


def test_all_live_table_is_left_alone(tmp_path: Path) -> None:
    model = build_random_model(tiny_config(), SEED)
    path = tmp_path / "d.onnx"
    export_language_model(model, path, "fp32")
    proto = onnx.load(str(path), load_external_data=False)
    names = [t.name for t in proto.graph.initializer]
    assert "embed_tokens.remap" not in names
    table = next(t for t in proto.graph.initializer if t.name == "embed_tokens")
    assert list(table.dims)[0] == model.config.text_config.vocab_size
    with pytest.raises(ModelkitError):
        compact_embedding(proto)


def test_compact_pack_changes_only_the_graph_and_its_file_entry(
    model: torch.nn.Module, tmp_path: Path
) -> None:
    pack = tmp_path / "pack"
    export_language_model(model, pack / "decoder_model_merged.onnx", "fp16", compact_embedding=False)
    (pack / "tokenizer.json").write_text("{}", encoding="utf-8")
    manifest = {
        "format": PACK_FORMAT,
        "format_version": 1,
        "name": "t",
        "domain": "a small world",
        "graphs": {"language_model": {"file": "decoder_model_merged.onnx", "inputs": [], "outputs": []}},
        "files": {p: file_digest(pack / p) for p in ("decoder_model_merged.onnx", "tokenizer.json")},
        "calibration": {"grounding": {"threshold": 0.09982424567321171, "weights": [1.5, 2.0]}},
    }
    text = json.dumps(manifest, indent=2) + "\n"
    (pack / "pack.json").write_text(text, encoding="utf-8")
    before = (pack / "decoder_model_merged.onnx").stat().st_size

    info = compact_pack(pack)

    after = load_manifest(pack)
    assert info["rows"] == [model.config.text_config.vocab_size, live_ids(model).size + 1]
    assert info["bytes_before"] == before and info["bytes_after"] < before / 10
    assert after["files"]["decoder_model_merged.onnx"] == file_digest(pack / "decoder_model_merged.onnx")
    want = {
        **manifest,
        "files": {
            **manifest["files"],
            "decoder_model_merged.onnx": after["files"]["decoder_model_merged.onnx"],
        },
    }
    assert (pack / "pack.json").read_text(encoding="utf-8") == json.dumps(want, indent=2) + "\n"
    assert list(after) == list(manifest)
    inits = {
        t.name: numpy_helper.to_array(t)
        for t in onnx.load(str(pack / "decoder_model_merged.onnx")).graph.initializer
    }
    assert inits["embed_tokens"].dtype == np.float16 and not np.any(inits["embed_tokens"][0])
