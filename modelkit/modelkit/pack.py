"""Model pack assembly: ONNX graphs + tokenizer + pack.json (docs/design.md), written atomically.

A pack has the vision encoder and the language model, and the mask decoder when one was given: a
pack without it (an official Qwen3-VL checkpoint before a decoder is trained for it) has no
`graphs.mask_decoder` and no `model.mask_decoder`, and `provenance.mask_decoder` is null; the runtime
then answers `ground` and `describe_region` and refuses `segment` (MASK_DECODER_MISSING).

A pack is built in a hidden sibling folder and renamed into place only when every file and checksum
is written, so an error at any step (export, copy, hashing) never leaves a half-written pack behind.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import importlib.metadata
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch
import transformers
from torch import nn

from .answers import pack_prompts
from .errors import ModelkitError
from .onnx_utils import GraphSpec
from .preprocess import ALPHA_BACKGROUND, IMAGE_MEAN, IMAGE_STD, MERGE_SIZE, PATCH_SIZE, TEMPORAL_PATCH_SIZE

PACK_FORMAT = "qwen3-vl-seg-pack"
PACK_FORMAT_VERSION = 1
MANIFEST = "pack.json"
DTYPES = ("fp32", "fp16", "int4")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
# Graph roles in pack.json -> file names; the language model's file keeps the name transformers.js
# and onnxruntime-genai give the merged (prefill + decode) graph.
GRAPH_FILES = {
    "vision_encoder": "vision_encoder.onnx",
    "language_model": "decoder_model_merged.onnx",
    "mask_decoder": "mask_decoder.onnx",
}
SPECIAL_TOKENS = {
    "image_pad": "<|image_pad|>",
    "vision_start": "<|vision_start|>",
    "vision_end": "<|vision_end|>",
    "im_start": "<|im_start|>",
    "im_end": "<|im_end|>",
    "endoftext": "<|endoftext|>",
}
# What `validate` and the export summary say about a pack without a mask decoder.
NO_MASK_DECODER = "no mask decoder: segment unavailable (ground and describe_region work)"
REQUIRED_GRAPHS = ("vision_encoder", "language_model")
MASK_DECODER_KEYS = (
    "dim",
    "pixel_dim",
    "num_layers",
    "num_heads",
    "ffn_dim",
    "fourier_octaves",
    "gate_alpha",
    "gate_expand",
    "output_stride",
    "query_token",
)


def check_output_dir(out_dir: Path, force: bool) -> None:
    """Refuse to overwrite a pack unless asked; cheap, so the CLI calls it before loading weights."""
    if out_dir.exists() and not force:
        raise ModelkitError("OUTPUT_EXISTS", f"{out_dir} already exists; pass --force to replace it")
    if out_dir.exists() and not out_dir.is_dir():
        raise ModelkitError("OUTPUT_EXISTS", f"{out_dir} exists and is not a folder; remove it first")


def check_dtype(dtype: str) -> None:
    if dtype not in DTYPES:
        raise ModelkitError("INVALID_INPUT", f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")


def check_pixels(min_pixels: int, max_pixels: int) -> None:
    factor = PATCH_SIZE * MERGE_SIZE
    if min_pixels < factor * factor or max_pixels < min_pixels:
        raise ModelkitError(
            "INVALID_INPUT",
            f"need {factor * factor} <= min_pixels <= max_pixels, got min_pixels {min_pixels}, "
            f"max_pixels {max_pixels}",
        )


def read_tokenizer_ids(tokenizer_dir: Path) -> dict[str, int]:
    """Special token ids and the highest id from tokenizer.json (never guessed from the model)."""
    for f in TOKENIZER_FILES:
        if not (tokenizer_dir / f).is_file():
            raise ModelkitError(
                "TOKENIZER_INVALID",
                f"{tokenizer_dir} has no {f}; pass a folder with tokenizer.json and tokenizer_config.json",
            )
    try:
        tok = json.loads((tokenizer_dir / "tokenizer.json").read_text(encoding="utf-8"))
        by_content = {t["content"]: int(t["id"]) for t in tok.get("added_tokens", [])}
        vocab_ids = tok["model"]["vocab"].values()
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ModelkitError(
            "TOKENIZER_INVALID", f"{tokenizer_dir / 'tokenizer.json'} is not readable: {e}"
        ) from e
    ids: dict[str, int] = {}
    for key, content in SPECIAL_TOKENS.items():
        if content not in by_content:
            raise ModelkitError("TOKENIZER_INVALID", f"tokenizer.json has no added token {content}")
        ids[key] = by_content[content]
    ids["max_token_id"] = max(max(vocab_ids), max(by_content.values()))
    return ids


def model_section(config: Any) -> dict[str, Any]:
    """Sizes the runtime needs, from a transformers Qwen3VLConfig."""
    text, vision = config.text_config, config.vision_config
    rope = text.rope_parameters
    return {
        "text": {
            "hidden_size": text.hidden_size,
            "num_hidden_layers": text.num_hidden_layers,
            "num_attention_heads": text.num_attention_heads,
            "num_key_value_heads": text.num_key_value_heads,
            "head_dim": text.head_dim,
            "vocab_size": text.vocab_size,
            "rope_theta": rope["rope_theta"],
            "mrope_section": list(rope["mrope_section"]),
            "rms_norm_eps": text.rms_norm_eps,
        },
        "vision": {
            "hidden_size": vision.hidden_size,
            "depth": vision.depth,
            "num_heads": vision.num_heads,
            "head_dim": vision.hidden_size // vision.num_heads,
            "patch_size": vision.patch_size,
            "temporal_patch_size": vision.temporal_patch_size,
            "spatial_merge_size": vision.spatial_merge_size,
            "num_position_embeddings": vision.num_position_embeddings,
            "deepstack_visual_indexes": list(vision.deepstack_visual_indexes),
            "out_hidden_size": vision.out_hidden_size,
        },
    }


def mask_decoder_section(config: Any) -> dict[str, Any]:
    values = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else vars(config)
    missing = [k for k in MASK_DECODER_KEYS if k not in values]
    if missing:
        raise ModelkitError("INVALID_CONFIG", f"mask decoder config lacks {', '.join(missing)}")
    return {k: values[k] for k in MASK_DECODER_KEYS}


def preprocess_section(min_pixels: int, max_pixels: int) -> dict[str, Any]:
    return {
        "patch_size": PATCH_SIZE,
        "merge_size": MERGE_SIZE,
        "temporal_patch_size": TEMPORAL_PATCH_SIZE,
        "image_mean": list(IMAGE_MEAN),
        "image_std": list(IMAGE_STD),
        "min_pixels": min_pixels,
        "max_pixels": max_pixels,
        "resample": "bicubic",
        "alpha_background": list(ALPHA_BACKGROUND),
    }


def tokens_section(
    tokenizer_ids: dict[str, int], config: Any, stop: list[int] | None = None
) -> dict[str, Any]:
    # The model's own ids must agree with the tokenizer's, or image features land on the wrong rows.
    for key, attr in (("image_pad", "image_token_id"), ("vision_start", "vision_start_token_id")):
        model_id = getattr(config, attr, None)
        if model_id is not None and model_id != tokenizer_ids[key]:
            raise ModelkitError(
                "TOKENIZER_INVALID",
                f"tokenizer has {SPECIAL_TOKENS[key]} = {tokenizer_ids[key]} but the model config says "
                f"{attr} = {model_id}; use the tokenizer that ships with the checkpoint",
            )
    section = {k: tokenizer_ids[k] for k in SPECIAL_TOKENS}
    section["stop"] = stop if stop is not None else [tokenizer_ids["im_end"], tokenizer_ids["endoftext"]]
    section["max_token_id"] = tokenizer_ids["max_token_id"]
    return section


def check_domain(domain: str | None) -> str | None:
    """The pack's `domain` text, stripped; None (key left out) when not given, refused when blank."""
    if domain is None:
        return None
    text = domain.strip()
    if not text:
        raise ModelkitError(
            "INVALID_INPUT",
            '--domain is empty; describe what the model knows (e.g. "general images (Qwen3-VL-4B-Instruct)") '
            "or leave the option out",
        )
    return text


def has_mask_decoder(manifest: dict[str, Any]) -> bool:
    """Whether a pack carries a mask decoder (`segment` works); see `manifest_problems` for consistency."""
    return "mask_decoder" in manifest.get("graphs", {})


def default_provenance(
    base: str, mask_decoder: str | None, extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    """`mask_decoder` is None (JSON null) for a pack without a mask decoder."""
    prov: dict[str, Any] = {
        "base": base,
        "mask_decoder": mask_decoder,
        # From the installed metadata: `python -m modelkit` run in the repository root imports the
        # outer modelkit/ folder as a namespace package, which has no __version__.
        "exporter": f"modelkit {importlib.metadata.version('modelkit')}",
        "transformers": transformers.__version__,
        "torch": torch.__version__.split("+")[0],
        "created": dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat(),
    }
    if extra:
        prov.update(extra)
    return prov


def file_digest(path: Path) -> dict[str, Any]:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return {"sha256": h.hexdigest(), "bytes": path.stat().st_size}


def files_section(pack_dir: Path) -> dict[str, dict[str, Any]]:
    """sha256 + size of every file in the pack except the manifest itself, sorted by path."""
    files = sorted(p for p in pack_dir.rglob("*") if p.is_file() and p.name != MANIFEST)
    return {p.relative_to(pack_dir).as_posix(): file_digest(p) for p in files}


def graph_entry(spec: GraphSpec, file: str) -> dict[str, Any]:
    """The manifest entry of one graph; `file` is relative to the pack (the exporter saw a temp path)."""
    return {"file": file, "inputs": list(spec["inputs"]), "outputs": list(spec["outputs"])}


def build_pack(
    model: nn.Module,
    mask_decoder: nn.Module | None,
    out_dir: Path,
    name: str,
    description: str,
    dtype: str,
    tokenizer_dir: Path,
    provenance: dict[str, Any],
    force: bool = False,
    *,
    min_pixels: int = 65536,
    max_pixels: int = 1048576,
    stop_tokens: list[int] | None = None,
    describe_mode: str = "box",
    domain: str | None = None,
    compact_embedding: bool | None = None,
) -> dict[str, Any]:
    """Export `model` (Qwen3VLForConditionalGeneration) and `mask_decoder` (MaskDecoder) into a pack.

    `mask_decoder` None writes a pack without one: no `graphs.mask_decoder`, no `model.mask_decoder`
    (`provenance.mask_decoder` is the caller's, null by convention). `domain`, when given, is stored as
    the top-level `"domain"`: a human description of what the model knows (left out otherwise).
    `describe_mode` "box" asks for a region by its 0..1000 box on the whole image (Qwen3-VL's way);
    "crop" shows the model a crop around the region instead (answers.crop_box).
    `compact_embedding` (export_language_model): keep only the embedding rows that are not all zero;
    None (default) when at least half are (a model trained from scratch on a small world).

    Returns the manifest. Raises ModelkitError (nothing written) for bad input; any other error
    during export also leaves `out_dir` untouched (the old pack stays when `force` was given).
    """
    # Imported here: the exporters pull in onnx/onnxscript, which the cheap CLI checks don't need.
    from .export_language import export_language_model
    from .export_mask import export_mask_decoder
    from .export_vision import export_vision_encoder

    out_dir = Path(out_dir)
    check_dtype(dtype)
    check_pixels(min_pixels, max_pixels)
    check_output_dir(out_dir, force)
    domain = check_domain(domain)
    tokenizer_ids = read_tokenizer_ids(Path(tokenizer_dir))
    model_info = model_section(model.config)
    if mask_decoder is not None:
        model_info["mask_decoder"] = mask_decoder_section(mask_decoder.config)
    manifest: dict[str, Any] = {
        "format": PACK_FORMAT,
        "format_version": PACK_FORMAT_VERSION,
        "name": name,
        "description": description,
        **({"domain": domain} if domain is not None else {}),
        "dtype": dtype,
        "provenance": provenance,
        "model": model_info,
        "preprocess": preprocess_section(min_pixels, max_pixels),
        "tokens": tokens_section(tokenizer_ids, model.config, stop_tokens),
        "prompts": pack_prompts(describe_mode),
        "tokenizer": {"file": TOKENIZER_FILES[0], "config": TOKENIZER_FILES[1]},
    }

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.partial-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        specs = {
            "vision_encoder": export_vision_encoder(model, tmp / GRAPH_FILES["vision_encoder"], dtype=dtype),
            "language_model": export_language_model(
                model, tmp / GRAPH_FILES["language_model"], dtype=dtype, compact_embedding=compact_embedding
            ),
        }
        if mask_decoder is not None:
            specs["mask_decoder"] = export_mask_decoder(
                mask_decoder, tmp / GRAPH_FILES["mask_decoder"], dtype=dtype
            )
        manifest["graphs"] = {k: graph_entry(spec, GRAPH_FILES[k]) for k, spec in specs.items()}
        # GroupQueryAttention takes one buffer as past and present: the runtime keeps the cache in place.
        manifest["graphs"]["language_model"]["attention"] = "group_query"
        for f in TOKENIZER_FILES:
            shutil.copyfile(Path(tokenizer_dir) / f, tmp / f)
        manifest["files"] = files_section(tmp)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        swap_into_place(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def swap_into_place(tmp: Path, out_dir: Path) -> None:
    """Rename the finished pack into place; an existing pack (force) is moved aside first, then removed."""
    old: Path | None = None
    if out_dir.exists():
        old = out_dir.parent / f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(out_dir, old)
    try:
        os.replace(tmp, out_dir)
    except BaseException:
        if old is not None:
            os.replace(old, out_dir)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def summary_line(out: Path, manifest: dict[str, Any]) -> str:
    total = sum(f["bytes"] for f in manifest["files"].values())
    count = len(manifest["files"])
    line = f"pack {manifest['name']} ({manifest['dtype']}): {count} files, {total / 1e6:.1f} MB in {out}"
    return line if has_mask_decoder(manifest) else f"{line}; {NO_MASK_DECODER}"


def load_manifest(pack_dir: Path) -> dict[str, Any]:
    path = Path(pack_dir) / MANIFEST
    if not path.is_file():
        raise ModelkitError("PACK_INVALID", f"{pack_dir} has no {MANIFEST}; is it a model pack folder?")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ModelkitError("PACK_INVALID", f"{path} is not valid JSON: {e}") from e
    if manifest.get("format") != PACK_FORMAT:
        raise ModelkitError("PACK_INVALID", f"{path} is not a {PACK_FORMAT} manifest")
    return manifest


def verify_pack(pack_dir: Path) -> list[str]:
    """Check every file's size and sha256 against the manifest; return the problems (empty = OK)."""
    pack_dir = Path(pack_dir)
    manifest = load_manifest(pack_dir)
    problems: list[str] = []
    listed = manifest.get("files", {})
    for rel, want in sorted(listed.items()):
        path = pack_dir / rel
        if not path.is_file():
            problems.append(f"{rel}: missing")
            continue
        got = file_digest(path)
        if got["bytes"] != want["bytes"]:
            problems.append(f"{rel}: {got['bytes']} bytes, manifest says {want['bytes']}")
        elif got["sha256"] != want["sha256"]:
            problems.append(f"{rel}: sha256 {got['sha256']} does not match the manifest")
    needed = {g["file"] for g in manifest.get("graphs", {}).values()} | set(TOKENIZER_FILES)
    for rel in sorted(needed - set(listed)):
        problems.append(f"{rel}: not listed in the manifest's files")
    for rel in sorted(set(files_section(pack_dir)) - set(listed)):
        problems.append(f"{rel}: present but not listed in the manifest")
    return problems


def manifest_problems(manifest: dict[str, Any]) -> list[str]:
    """What makes a manifest unusable by the runtime (empty = OK): the format, the sections every pack
    has, the two required graphs, and a mask decoder that is either wholly there (graph and sizes) or
    wholly absent (no graph, no sizes, `provenance.mask_decoder` null). Checksums: `verify_pack`."""
    problems: list[str] = []
    if manifest.get("format_version") != PACK_FORMAT_VERSION:
        problems.append(
            f"format_version is {manifest.get('format_version')!r}, expected {PACK_FORMAT_VERSION}"
        )
    for key, kind in (("name", str), ("description", str), ("dtype", str), ("provenance", dict)):
        if not isinstance(manifest.get(key), kind):
            problems.append(f"{key}: missing or not a {kind.__name__}")
    if isinstance(manifest.get("dtype"), str) and manifest["dtype"] not in DTYPES:
        problems.append(f"dtype {manifest['dtype']!r} is not one of {', '.join(DTYPES)}")
    if "domain" in manifest and not (isinstance(manifest["domain"], str) and manifest["domain"].strip()):
        problems.append("domain: present but not a non-empty string (leave it out when unknown)")
    for key in ("model", "preprocess", "tokens", "prompts", "tokenizer", "graphs", "files"):
        if not isinstance(manifest.get(key), dict):
            problems.append(f"{key}: missing or not an object")
    if problems:
        return problems
    model, graphs = manifest["model"], manifest["graphs"]
    for part in ("text", "vision"):
        if not isinstance(model.get(part), dict):
            problems.append(f"model.{part}: missing")
    for role in REQUIRED_GRAPHS:
        if role not in graphs:
            problems.append(f"graphs.{role}: missing")
    for role, entry in graphs.items():
        if role not in GRAPH_FILES:
            problems.append(f"graphs.{role}: unknown graph role (expected {', '.join(GRAPH_FILES)})")
        elif not (isinstance(entry, dict) and {"file", "inputs", "outputs"} <= set(entry)):
            problems.append(f"graphs.{role}: needs file, inputs and outputs")
    for prompt in ("chat", "ground", "describe"):
        if not isinstance(manifest["prompts"].get(prompt), str):
            problems.append(f"prompts.{prompt}: missing")
    graph, sizes = "mask_decoder" in graphs, "mask_decoder" in model
    if graph != sizes:
        have, lack = ("graphs", "model") if graph else ("model", "graphs")
        problems.append(
            f"{have}.mask_decoder is present but {lack}.mask_decoder is not: a pack has both or neither"
        )
    elif sizes:
        decoder = model["mask_decoder"]
        missing = [k for k in MASK_DECODER_KEYS if not isinstance(decoder, dict) or k not in decoder]
        if missing:
            problems.append(f"model.mask_decoder lacks {', '.join(missing)}")
    elif manifest["provenance"].get("mask_decoder") is not None:
        problems.append("provenance.mask_decoder names a mask decoder but the pack has none (expected null)")
    return problems
