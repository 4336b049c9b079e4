"""Golden fixtures: what the PyTorch reference computes for a few (image, question) cases.

Everything here comes from transformers' Qwen3VLForConditionalGeneration and the PyTorch MaskDecoder,
never from the exported graphs; the graphs and the TypeScript runtime are checked against these
numbers. Layout (docs/design.md): `<out>/<case>/case.json` + one `.npy` per tensor, images in
`test/fixtures/images/`. Re-recording with the same pack and model writes byte-identical files.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .answers import chat_prompt_ids
from .errors import ModelkitError
from .images import write_fixture_images
from .pack import has_mask_decoder
from .preprocess import load_rgb, preprocess_image
from .tokenizer import TextTokenizer
from .vision_inputs import vision_host_inputs

NUM_GREEDY = 20


@dataclass(frozen=True)
class FixtureCase:
    name: str
    image: str  # file name in the images folder
    task: str  # "ground" | "describe" | "chat": which prompt template renders the question
    text: str  # the expression (ground), "x1,y1,x2,y2" in 0..1000 (describe) or the question (chat)
    mask_boxes: tuple[tuple[float, float, float, float], ...]  # Q query boxes, normalised x1,y1,x2,y2
    query_rows: tuple[int, ...]  # rows of greedy_hidden used as the Q query hidden states


CASES: tuple[FixtureCase, ...] = (
    FixtureCase(
        name="ground_halfeven",
        image="halfeven_400x208.png",
        task="ground",
        text="the red box",
        mask_boxes=((0.075, 0.19, 0.375, 0.82), (0.47, 0.14, 0.75, 0.68)),
        query_rows=(7, 19),
    ),
    FixtureCase(
        name="describe_tall",
        image="tall_144x520.png",
        task="describe",
        text="140,58,860,258",
        mask_boxes=((0.14, 0.058, 0.86, 0.258), (0.28, 0.42, 0.76, 0.73)),
        query_rows=(3, 12),
    ),
    FixtureCase(
        name="chat_small_rgba",
        image="small_rgba_120x90.png",
        task="chat",
        text="What colour is the disc on the right?",
        mask_boxes=((0.42, 0.17, 0.92, 0.83), (0.0, 0.0, 0.5, 1.0)),
        query_rows=(0, 10),
    ),
)

# Per-tensor tolerances for consumers (the ORT graphs, the TypeScript runtime). Integer tensors and
# the host-side tables must match exactly (or to f32 rounding); pixels may differ by 2 uint8 steps
# (1/127.5 each) between resamplers; network outputs get an absolute tolerance scaled by the
# tensor's magnitude (see `_tolerance`).
EXACT = {"image_grid_thw", "input_ids", "position_ids", "greedy_tokens", "pos_embed_idx"}
PIXEL_ATOL = 2.0 / 127.5
HOST_TABLE_ATOL = 1e-6
NETWORK_RTOL = 1e-4
NETWORK_ATOL_REL = 1e-4  # atol = NETWORK_ATOL_REL * max(1, max|x|)


def render_question(prompts: dict[str, str], case: FixtureCase) -> str:
    if case.task == "ground":
        return prompts["ground"].replace("{expression}", case.text)
    if case.task == "describe":
        x1, y1, x2, y2 = (s.strip() for s in case.text.split(","))
        return (
            prompts["describe"]
            .replace("{x1}", x1)
            .replace("{y1}", y1)
            .replace("{x2}", x2)
            .replace("{y2}", y2)
        )
    if case.task == "chat":
        return case.text
    raise ModelkitError("INVALID_INPUT", f"unknown fixture task {case.task!r}")


@contextlib.contextmanager
def _deterministic_torch() -> Iterator[None]:
    # One thread: CPU reductions then run in a fixed order, so re-recording is byte-identical.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            yield
    finally:
        torch.set_num_threads(threads)


def _vision_taps(model: nn.Module) -> list[int]:
    vision_cfg = model.config.vision_config
    return [*vision_cfg.deepstack_visual_indexes, vision_cfg.depth - 1]


def record_case(
    model: nn.Module,
    mask_decoder: nn.Module | None,
    manifest: dict[str, Any],
    tokenizer: TextTokenizer,
    case: FixtureCase,
    image_path: Path,
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Compute every golden tensor of one case; returns (tensors, meta). Without a mask decoder (a
    pack without one) the `mask_*` / `iou_pred` tensors and `meta.mask_query_rows` are left out."""
    pre = manifest["preprocess"]
    tokens = manifest["tokens"]
    vis_cfg = manifest["model"]["vision"]
    image_pad = int(tokens["image_pad"])

    img = load_rgb(image_path)
    prep = preprocess_image(img, pre["min_pixels"], pre["max_pixels"])
    _, gh, gw = (int(v) for v in prep.image_grid_thw[0])
    merge = int(vis_cfg["spatial_merge_size"])
    num_merged = (gh // merge) * (gw // merge)  # M
    host = vision_host_inputs(gh, gw, vis_cfg["num_position_embeddings"], vis_cfg["head_dim"], merge)

    pixel_values = torch.from_numpy(prep.pixel_values)  # [P, 1536]
    grid = torch.from_numpy(prep.image_grid_thw)  # [1, 3]

    # Vision tower with forward hooks on the tapped blocks: [4, P, Cv] multi-scale maps.
    visual = model.model.visual
    taps = _vision_taps(model)
    captured: dict[int, torch.Tensor] = {}
    hooks = [
        visual.blocks[i].register_forward_hook(
            lambda _m, _inp, out, i=i: captured.__setitem__(i, out[0] if isinstance(out, tuple) else out)
        )
        for i in taps
    ]
    try:
        vis_out = visual(pixel_values, grid_thw=grid, return_dict=True)
    finally:
        for h in hooks:
            h.remove()
    image_features = vis_out.pooler_output  # [M, H]
    deepstack = torch.stack(list(vis_out.deepstack_features))  # [3, M, H]
    vit_ms = torch.stack([captured[i] for i in taps])  # [4, P, Cv]
    if not torch.equal(vit_ms[-1], vis_out.last_hidden_state):
        raise AssertionError("the last-block hook disagrees with the vision tower's last_hidden_state")

    question = render_question(manifest["prompts"], case)
    prompt_text = manifest["prompts"]["chat"].replace("{question}", question)
    chat_ids = chat_prompt_ids(tokenizer, manifest["prompts"]["chat"], question, num_merged, image_pad)
    ids_np = np.asarray(chat_ids, dtype=np.int64)  # [S]
    seq = ids_np.shape[0]
    input_ids = torch.from_numpy(ids_np)[None]  # [1, S]
    mm_types = (input_ids == image_pad).to(torch.int32)  # [1, S]: 1 at image pads
    mask = torch.ones_like(input_ids)
    position_ids, rope_deltas = model.model.get_rope_index(
        input_ids, mm_types, image_grid_thw=grid
    )  # [3,1,S]
    rope_delta = int(rope_deltas.reshape(-1)[0])

    vision_kwargs = {"pixel_values": pixel_values, "image_grid_thw": grid}
    prefill = model.model(
        input_ids=input_ids, attention_mask=mask, mm_token_type_ids=mm_types, **vision_kwargs
    )
    prefill_hidden = prefill.last_hidden_state[0]  # [S, H], after the final RMSNorm
    prefill_logits_all = model.lm_head(prefill_hidden)  # [S, V]
    # Cross-check against the full model's own head (the same reference, computed the usual way).
    full = model(input_ids=input_ids, attention_mask=mask, mm_token_type_ids=mm_types, **vision_kwargs)
    if not torch.allclose(full.logits[0, -1], prefill_logits_all[-1], atol=1e-5, rtol=1e-5):
        raise AssertionError("lm_head(last_hidden_state) disagrees with the model's logits")
    prefill_logits = prefill_logits_all[-1]  # [V]

    generated = model.generate(
        input_ids=input_ids,
        attention_mask=mask,
        mm_token_type_ids=mm_types,
        do_sample=False,
        max_new_tokens=NUM_GREEDY,
        min_new_tokens=NUM_GREEDY,
        pad_token_id=int(tokens["endoftext"]),
        **vision_kwargs,
    )
    greedy = generated[0, seq:]  # [20]
    if greedy.shape[0] != NUM_GREEDY:
        raise AssertionError(f"generate returned {greedy.shape[0]} tokens, expected {NUM_GREEDY}")

    # Final-norm state at each generated token's input position: one causal pass over prompt + tokens.
    ext_ids = torch.cat([input_ids, greedy[None]], dim=1)  # [1, S+20]
    ext_types = torch.cat([mm_types, torch.zeros_like(greedy[None], dtype=torch.int32)], dim=1)
    ext = model.model(
        input_ids=ext_ids,
        attention_mask=torch.ones_like(ext_ids),
        mm_token_type_ids=ext_types,
        **vision_kwargs,
    )
    ext_hidden = ext.last_hidden_state[0]  # [S+20, H]
    greedy_hidden = ext_hidden[seq:]  # [20, H]
    # The tokens must be plain argmaxes (min_new_tokens never had to suppress a stop token), with
    # the margin recorded: consumers can only be asked to reproduce decisive choices.
    step_logits = model.lm_head(ext_hidden[seq - 1 : seq - 1 + NUM_GREEDY])  # [20, V]
    top2 = torch.topk(step_logits, 2, dim=-1).values  # [20, 2]
    if not torch.equal(step_logits.argmax(-1), greedy):
        raise AssertionError("greedy tokens are not the argmax of the reference logits")
    min_margin = float((top2[:, 0] - top2[:, 1]).min())

    tensors: dict[str, np.ndarray] = {
        "pixel_values": prep.pixel_values,
        "image_grid_thw": prep.image_grid_thw,
        "hr_image": prep.hr_image,
        **host,
        "image_features": image_features.numpy(),
        "deepstack_features": deepstack.numpy(),
        "vit_ms": vit_ms.numpy(),
        "input_ids": ids_np,
        "position_ids": position_ids[:, 0].numpy(),  # [3, S]
        "prefill_logits": prefill_logits.numpy(),
        "prefill_hidden": prefill_hidden.numpy(),
        "greedy_tokens": greedy.numpy(),
        "greedy_hidden": greedy_hidden.numpy(),
    }
    meta: dict[str, Any] = {
        "grid": [1, gh, gw],
        "resized": list(prep.resized_hw),
        "original": list(prep.original_hw),
        "rope_delta": rope_delta,
        "num_image_tokens": num_merged,
        "seq_len": seq,
    }
    if mask_decoder is not None:
        # Mask decoder on the reference states.
        pad_rows = (input_ids[0] == image_pad).nonzero().reshape(-1)  # [M]
        mm_embeds = prefill_hidden[pad_rows]  # [M, H]
        query_hidden = greedy_hidden[list(case.query_rows)]  # [Q, H]
        boxes = torch.tensor(case.mask_boxes, dtype=torch.float32)  # [Q, 4]
        gate_boxes = boxes[:, None, :].clone()  # [Q, K=1, 4]
        gate_valid = torch.ones(boxes.shape[0], 1, dtype=torch.float32)  # [Q, 1]
        hr_image = torch.from_numpy(prep.hr_image)  # [1, 3, 16gh, 16gw]
        mask_logits, mask_coarse, iou_pred = mask_decoder(
            vit_ms, mm_embeds, query_hidden, boxes, gate_boxes, gate_valid, hr_image
        )
        tensors.update(
            {
                "mask_query_hidden": query_hidden.numpy(),
                "mask_boxes": boxes.numpy(),
                "mask_gate_boxes": gate_boxes.numpy(),
                "mask_gate_valid": gate_valid.numpy(),
                "mask_logits": mask_logits.numpy(),
                "mask_logits_coarse": mask_coarse.numpy(),
                "iou_pred": iou_pred.numpy(),
            }
        )
        meta["mask_query_rows"] = list(case.query_rows)
    meta["mm_embeds"] = "prefill_hidden rows where input_ids == tokens.image_pad"
    meta["greedy_min_logit_margin"] = round(min_margin, 4)
    tensors = {k: _canonical(v) for k, v in tensors.items()}
    return tensors, {"question": question, "prompt_text": prompt_text, "meta": meta}


def _canonical(a: np.ndarray) -> np.ndarray:
    """Little-endian, C order, float32 or int64 (the fixture contract)."""
    dtype = np.int64 if np.issubdtype(a.dtype, np.integer) else np.float32
    return np.ascontiguousarray(a, dtype=np.dtype(dtype).newbyteorder("<"))


def _tolerance(name: str, a: np.ndarray) -> dict[str, float]:
    if name in EXACT:
        return {"atol": 0.0, "rtol": 0.0}
    if name in ("pixel_values", "hr_image"):
        return {"atol": PIXEL_ATOL, "rtol": 0.0}
    if name in ("pos_embed_weight", "rotary_cos", "rotary_sin"):
        return {"atol": HOST_TABLE_ATOL, "rtol": 0.0}
    if name in ("mask_boxes", "mask_gate_boxes", "mask_gate_valid"):
        return {"atol": 0.0, "rtol": 0.0}  # inputs chosen here, copied verbatim
    scale = max(1.0, float(np.abs(a).max()))
    return {"atol": float(f"{NETWORK_ATOL_REL * scale:.3g}"), "rtol": NETWORK_RTOL}


def write_case(case_dir: Path, image_rel: str, tensors: dict[str, np.ndarray], info: dict[str, Any]) -> None:
    case_dir.mkdir(parents=True, exist_ok=True)
    entries: dict[str, Any] = {}
    for name, arr in tensors.items():
        np.save(case_dir / f"{name}.npy", arr, allow_pickle=False)
        entries[name] = {"file": f"{name}.npy", "dtype": arr.dtype.name, "shape": list(arr.shape)}
    doc = {
        "image": image_rel,
        "question": info["question"],
        "prompt_text": info["prompt_text"],
        "tensors": entries,
        "tolerances": {name: _tolerance(name, arr) for name, arr in tensors.items()},
        "meta": info["meta"],
    }
    (case_dir / "case.json").write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")


def record_fixtures(
    model: nn.Module,
    mask_decoder: nn.Module | None,
    pack_dir: Path,
    out_dir: Path,
    images_dir: Path,
    cases: tuple[FixtureCase, ...] = CASES,
) -> list[str]:
    """Record `cases` into `out_dir` (replaced atomically) and write the images; returns case names.

    `mask_decoder` is None exactly when the pack has none (its cases then have no mask tensors)."""
    pack_dir, out_dir, images_dir = Path(pack_dir), Path(out_dir), Path(images_dir)
    manifest = json.loads((pack_dir / "pack.json").read_text(encoding="utf-8"))
    tokenizer = TextTokenizer(pack_dir, manifest["tokenizer"]["file"])
    image_paths = write_fixture_images(images_dir)
    if (mask_decoder is not None) != has_mask_decoder(manifest):
        raise ModelkitError(
            "INVALID_INPUT",
            f"{pack_dir} has {'a' if has_mask_decoder(manifest) else 'no'} mask decoder but one was "
            f"{'not ' if mask_decoder is None else ''}given",
        )
    model.eval()
    if mask_decoder is not None:
        mask_decoder.eval()

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with _deterministic_torch():
            for case in cases:
                tensors, info = record_case(
                    model, mask_decoder, manifest, tokenizer, case, image_paths[case.image]
                )
                image_rel = os.path.relpath(image_paths[case.image], (out_dir / case.name)).replace(
                    os.sep, "/"
                )
                write_case(tmp / case.name, image_rel, tensors, info)
        index = {"pack": manifest["name"], "cases": [c.name for c in cases]}
        (tmp / "index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return [c.name for c in cases]


def load_case(case_dir: Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Read a case folder back: (case.json, tensors by name)."""
    doc = json.loads((Path(case_dir) / "case.json").read_text(encoding="utf-8"))
    tensors = {
        name: np.load(Path(case_dir) / e["file"], allow_pickle=False) for name, e in doc["tensors"].items()
    }
    return doc, tensors
