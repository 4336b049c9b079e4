"""Rebuild the Hugging Face Qwen3-VL a pack was exported from, from the pack alone (issue #14).

A pack is the only thing kept of a training run (the demo pack's checkpoint was not), so the next run
starts from it: `unpack_model` is the inverse of the two exporters. It builds the model from the
config that pack.json and the graphs' weight shapes give, wraps it in the exporters' own modules
(`VisionEncoderForExport`, `LanguageModelGraph`), whose parameters are views of the HF weights (the
transposes of `w_t` / `q_proj`..., the conv kernel flattened to [Cv, 1536], the tied head), and copies
every graph initializer into the view of the same name: what each export transform did is undone by
writing through the very same view, so the mapping cannot drift from the exporters. fp16 weights are
widened to fp32 (exact), the compact embedding (compact_embedding.py) is expanded back to its [V, H]
table with `compact[remap]` (the dead rows are the zero row, as they were bit for bit). int4 packs are
refused (MatMulNBits blocks are a lossy rounding, not a storage dtype).

What pack.json does not say, and how it is recovered: the MLP widths and the patch's input channels
come from the weight shapes, the tied head from the absence of a `lm_head` initializer, the video token
id from the pack's tokenizer.json. Activations (SiLU text MLP, tanh-GELU vision MLP), no attention
biases, default interleaved M-RoPE and LayerNorm eps 1e-6 are what the exporters accept or hard-code.
`max_position_embeddings` is in neither; no weight and no default-rope position depends on it, and the
released Qwen3-VL value is written.

`python -m modelkit unpack --pack DIR --out DIR` writes the HF folder (save_pretrained, the pack's
tokenizer files, generation_config.json with the pack's stop ids); `modelkit export` of it gives the
pack's graphs back. The mask decoder is not part of the HF model and is not unpacked.
"""

from __future__ import annotations

import argparse
import json
import shutil
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from transformers import GenerationConfig, Qwen3VLConfig, Qwen3VLForConditionalGeneration

from .compact_embedding import TABLE
from .errors import ModelkitError
from .pack import TOKENIZER_FILES, check_output_dir, load_manifest, model_section, swap_into_place

# Not stored in a pack (see the module docstring); the released Qwen3-VL checkpoints' value.
MAX_POSITION_EMBEDDINGS = 262144
REMAP = f"{TABLE}.remap"


def graph_weights(path: Path) -> dict[str, np.ndarray]:
    """Every weight a graph reads, by name, in its stored dtype (fp32 or fp16).

    The vision export (torch.onnx, constant folding on) stores weights of equal value once and gives
    the others as `Identity(kept)` (a fresh model's all-ones LayerNorm weights, its zero biases); those
    names resolve to the kept initializer's value."""
    if not path.is_file():
        raise ModelkitError("PACK_INVALID", f"{path} does not exist")
    model = onnx.load(str(path), load_external_data=True)
    found = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    if any(n.op_type == "MatMulNBits" for n in model.graph.node):
        raise ModelkitError(
            "UNSUPPORTED_MODEL",
            f"{path.name} has int4 (MatMulNBits) weights, a lossy rounding that cannot be unpacked; "
            "unpack the fp32 or fp16 pack of the same model",
        )
    for node in model.graph.node:
        if node.op_type == "Identity" and node.input[0] in found:
            found[node.output[0]] = found[node.input[0]]
    return found


def _put(name: str, param: torch.nn.Parameter, array: np.ndarray, graph: str) -> None:
    if tuple(param.shape) != array.shape:
        raise ModelkitError(
            "PACK_INVALID", f"{graph}: {name} is {list(array.shape)}, the model needs {list(param.shape)}"
        )
    if array.dtype not in (np.float32, np.float16):
        raise ModelkitError("PACK_INVALID", f"{graph}: {name} is {array.dtype}, not fp32 or fp16")
    with torch.no_grad():
        param.copy_(torch.from_numpy(array.astype(np.float32)))  # fp16 -> fp32 is exact


def expand_embedding(weights: dict[str, np.ndarray], vocab: int) -> np.ndarray:
    """The [V, H] embedding table: as stored, or compact [K, H] gathered by remap [V] (row 0 is zero)."""
    table = weights[TABLE]
    if REMAP not in weights:
        return table
    remap = weights[REMAP].astype(np.int64)  # [V] -> compact row
    if remap.shape != (vocab,) or remap.min() < 0 or remap.max() >= table.shape[0]:
        raise ModelkitError("PACK_INVALID", f"{REMAP} does not map {vocab} ids into {table.shape[0]} rows")
    if np.any(table[0] != 0):
        raise ModelkitError("PACK_INVALID", f"row 0 of the compact {TABLE} is not the zero row")
    return table[remap]  # [V, H]


def _token_id(pack_dir: Path, content: str) -> int:
    tok = json.loads((pack_dir / TOKENIZER_FILES[0]).read_text(encoding="utf-8"))
    for t in tok.get("added_tokens", []):
        if t["content"] == content:
            return int(t["id"])
    raise ModelkitError("TOKENIZER_INVALID", f"{pack_dir / TOKENIZER_FILES[0]} has no added token {content}")


def pack_config(
    manifest: dict[str, Any], vision: dict[str, np.ndarray], language: dict[str, np.ndarray], pack_dir: Path
) -> Qwen3VLConfig:
    """The Qwen3VLConfig of a pack: pack.json's `model` section plus what the weight shapes say."""
    text, vis, tokens = manifest["model"]["text"], manifest["model"]["vision"], manifest["tokens"]
    patch_in = vision["patch_embed.w_t"].shape[0]  # C * tp * p * p
    per_channel = vis["temporal_patch_size"] * vis["patch_size"] ** 2
    if patch_in % per_channel:
        raise ModelkitError("PACK_INVALID", f"patch_embed.w_t takes {patch_in} values per patch")
    tied = "lm_head" not in language  # the exporter writes [H, V] `lm_head` only for an untied head
    config = Qwen3VLConfig(
        text_config=dict(
            vocab_size=text["vocab_size"],
            hidden_size=text["hidden_size"],
            intermediate_size=int(language["layers.0.gate_proj"].shape[1]),  # [H, I]
            num_hidden_layers=text["num_hidden_layers"],
            num_attention_heads=text["num_attention_heads"],
            num_key_value_heads=text["num_key_value_heads"],
            head_dim=text["head_dim"],
            hidden_act="silu",
            attention_bias=False,
            rope_parameters=dict(
                rope_type="default",
                rope_theta=text["rope_theta"],
                mrope_section=list(text["mrope_section"]),
                mrope_interleaved=True,
            ),
            max_position_embeddings=MAX_POSITION_EMBEDDINGS,
            rms_norm_eps=text["rms_norm_eps"],
            tie_word_embeddings=tied,
        ),
        vision_config=dict(
            depth=vis["depth"],
            hidden_size=vis["hidden_size"],
            intermediate_size=int(vision["blocks.0.fc1.w_t"].shape[1]),  # [Cv, I]
            num_heads=vis["num_heads"],
            out_hidden_size=vis["out_hidden_size"],
            deepstack_visual_indexes=list(vis["deepstack_visual_indexes"]),
            patch_size=vis["patch_size"],
            temporal_patch_size=vis["temporal_patch_size"],
            spatial_merge_size=vis["spatial_merge_size"],
            num_position_embeddings=vis["num_position_embeddings"],
            in_channels=patch_in // per_channel,
            hidden_act="gelu_pytorch_tanh",
        ),
        image_token_id=tokens["image_pad"],
        video_token_id=_token_id(pack_dir, "<|video_pad|>"),
        vision_start_token_id=tokens["vision_start"],
        vision_end_token_id=tokens["vision_end"],
        tie_word_embeddings=tied,
    )
    got = model_section(config)
    want = {k: manifest["model"][k] for k in ("text", "vision")}
    if got != want:  # a pack.json field this rebuild does not read the way the exporter wrote it
        raise ModelkitError("PACK_INVALID", f"rebuilt config gives model {got}, pack.json says {want}")
    return config


def unpack_model(pack_dir: Path) -> Qwen3VLForConditionalGeneration:
    """The fp32 Qwen3VLForConditionalGeneration whose export is the pack's vision and language graphs."""
    # Imported here: the exporter modules are the map from HF parameters to graph initializers.
    from .export_language import LanguageModelGraph
    from .export_vision import VisionEncoderForExport

    pack_dir = Path(pack_dir)
    manifest = load_manifest(pack_dir)
    if manifest.get("dtype") == "int4":
        raise ModelkitError(
            "UNSUPPORTED_MODEL", f"{pack_dir} is an int4 pack (lossy); unpack the fp32 or fp16 pack instead"
        )
    vision = graph_weights(pack_dir / manifest["graphs"]["vision_encoder"]["file"])
    language = graph_weights(pack_dir / manifest["graphs"]["language_model"]["file"])
    config = pack_config(manifest, vision, language, pack_dir)
    model = Qwen3VLForConditionalGeneration(config).to(torch.float32).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("nan"))  # every weight must be written below: a NaN left is a missed one

    for name, param in VisionEncoderForExport(model).named_parameters():
        if name not in vision:
            raise ModelkitError("PACK_INVALID", f"the vision graph has no weight {name}")
        _put(name, param, vision[name], "vision")
    graph = LanguageModelGraph(model)
    if graph.tied != config.tie_word_embeddings:
        raise ModelkitError("PACK_INVALID", "the rebuilt model's head tying differs from the pack's")
    for name, param in graph.named_parameters():
        if name not in language:
            raise ModelkitError("PACK_INVALID", f"the language graph has no weight {name}")
        array = expand_embedding(language, graph.vocab_size) if name == TABLE else language[name]
        _put(name, param, array, "language")

    missed = [n for n, p in model.named_parameters() if bool(torch.isnan(p).any())]
    if missed:
        raise ModelkitError("PACK_INVALID", f"no pack weight (or a NaN one) for {', '.join(missed)}")
    return model


def write_checkpoint(pack_dir: Path, out_dir: Path, force: bool = False) -> Qwen3VLForConditionalGeneration:
    """Write the HF folder of a pack: config + safetensors, tokenizer files, generation_config.json
    (eos = the pack's stop ids, read back by `modelkit export`). Built aside, renamed into place."""
    pack_dir, out_dir = Path(pack_dir), Path(out_dir)
    check_output_dir(out_dir, force)
    manifest = load_manifest(pack_dir)
    model = unpack_model(pack_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.partial-{uuid.uuid4().hex[:8]}"
    try:
        model.save_pretrained(tmp)
        for f in TOKENIZER_FILES:
            shutil.copyfile(pack_dir / f, tmp / f)
        tokens = manifest["tokens"]
        GenerationConfig(
            eos_token_id=list(tokens["stop"]), pad_token_id=tokens["endoftext"], do_sample=False
        ).save_pretrained(tmp)
        swap_into_place(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return model


def export_command(pack_dir: Path, out_dir: Path) -> str:
    """The `modelkit export` line that turns the unpacked folder back into this pack's graphs."""
    m = load_manifest(pack_dir)
    pre = m["preprocess"]
    mode = m.get("prompts", {}).get("describe_mode", "box")
    return (
        f"python -m modelkit export --checkpoint {out_dir} --out <new pack> --dtype {m['dtype']} "
        f"--min-pixels {pre['min_pixels']} --max-pixels {pre['max_pixels']} --describe-mode {mode}"
        + (" --mask-decoder <its .safetensors>" if "mask_decoder" in m["graphs"] else "")
    )


def cmd_unpack(args: argparse.Namespace) -> int:
    model = write_checkpoint(args.pack, args.out, args.force)
    n = sum(p.numel() for p in model.parameters())
    print(f"unpacked {args.pack} -> {args.out}: Qwen3-VL, {n / 1e6:.1f}M parameters (fp32)")
    print(f"re-export: {export_command(args.pack, args.out)}")
    return 0
