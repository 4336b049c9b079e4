"""`modelkit random-pack`: random weights at a released Qwen3-VL size, as a pack and as an HF folder.

The model has the exact config of Qwen3-VL-2B/4B/8B-Instruct (released_configs.py), optionally with
fewer text layers and ViT blocks; widths, vocabulary, heads and token ids stay real, so graph shapes
and per-layer costs are those of the real checkpoint. Weights are transformers' own random init times
`weight_scale` (hf.build_random_model, as `modelkit tiny`), so greedy argmaxes are decisive. Writes

    <out>/pack/        the exported pack (pack.build_pack)
    <out>/reference/   config.json, model*.safetensors, generation_config.json, tokenizer files and
                       mask_decoder.safetensors: the same weights for transformers (bench-reference)

Depth cuts. DeepStack needs three distinct ViT taps and three text layers to add them after, so
both depths must be at least 3. A tap after block i of the full D-block tower sits after the fraction
(i + 1) / D of it; in a d-block tower it moves to the block ending nearest that fraction,
round_half_up((i + 1) * d / D) - 1, then taps that collide are pushed apart (later ones up, then
down from the last block) so they stay distinct, increasing and inside [0, d - 1]. For 2B/4B
([5, 11, 17] of 24): d = 4 -> [0, 1, 2], d = 12 -> [2, 5, 8]; for 8B ([8, 16, 24] of 27): d = 4 ->
[0, 2, 3]; the full depth keeps the released taps.
"""

from __future__ import annotations

import argparse
import math
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

import torch
from transformers import GenerationConfig, Qwen3VLConfig, Qwen3VLForConditionalGeneration

from .errors import ModelkitError
from .hf import build_random_model
from .mask_decoder import MaskDecoder, MaskDecoderConfig, save_mask_decoder_checkpoint
from .pack import (
    TOKENIZER_FILES,
    build_pack,
    check_domain,
    check_dtype,
    check_output_dir,
    check_pixels,
    default_provenance,
    read_tokenizer_ids,
    summary_line,
    swap_into_place,
)
from .released_configs import SHAPES, released_config

MIN_DEPTH = 3  # three DeepStack taps
MASK_DECODER_FILE = "mask_decoder.safetensors"


def remap_taps(taps: list[int], depth: int, new_depth: int) -> list[int]:
    """The DeepStack tap blocks of a `depth`-block tower moved into a `new_depth`-block one (see the
    module docstring for the rule)."""
    if not MIN_DEPTH <= new_depth <= depth or len(taps) > new_depth:
        raise ValueError(f"cannot place {len(taps)} taps in {new_depth} of {depth} blocks")
    out = [math.floor((i + 1) * new_depth / depth + 0.5) - 1 for i in taps]
    for k in range(len(out)):  # distinct and increasing
        out[k] = max(out[k], 0 if k == 0 else out[k - 1] + 1)
    for k in reversed(range(len(out))):  # inside the tower
        out[k] = min(out[k], new_depth - 1 if k == len(out) - 1 else out[k + 1] - 1)
    return out


def random_config(
    shape: str, text_layers: int | None = None, vision_depth: int | None = None
) -> Qwen3VLConfig:
    """The released config of `shape` with the text and vision depths cut (None keeps the full depth)."""
    kwargs = released_config(shape)
    text, vision = kwargs["text_config"], kwargs["vision_config"]
    full_layers, full_depth = int(text["num_hidden_layers"]), int(vision["depth"])
    layers = full_layers if text_layers is None else text_layers
    depth = full_depth if vision_depth is None else vision_depth
    for flag, value, full in (("--text-layers", layers, full_layers), ("--vision-depth", depth, full_depth)):
        if not MIN_DEPTH <= value <= full:
            raise ModelkitError(
                "INVALID_INPUT",
                f"Expected {flag} in {MIN_DEPTH}..{full} for {shape} but received {value} "
                f"(DeepStack needs {MIN_DEPTH} ViT taps and {MIN_DEPTH} text layers to add them after)",
            )
    text["num_hidden_layers"] = layers
    vision["deepstack_visual_indexes"] = remap_taps(vision["deepstack_visual_indexes"], full_depth, depth)
    vision["depth"] = depth
    return Qwen3VLConfig(**kwargs)


def random_mask_decoder(config: Qwen3VLConfig, seed: int) -> MaskDecoder:
    """A random mask decoder of the default ("paper") size at the model's widths."""
    torch.manual_seed(seed)
    cfg = MaskDecoderConfig(
        vision_hidden=int(config.vision_config.hidden_size), text_hidden=int(config.text_config.hidden_size)
    )
    return MaskDecoder(cfg).eval()


def write_reference(
    model: Qwen3VLForConditionalGeneration,
    mask_decoder: MaskDecoder,
    tokenizer_dir: Path,
    out_dir: Path,
    stop_tokens: list[int],
    endoftext: int,
) -> None:
    """An HF checkpoint folder of `model` (+ the mask decoder), written aside and renamed into place."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.partial-{uuid.uuid4().hex[:8]}"
    try:
        # Greedy, stopping at the pack's stop tokens (what the runtime does, and what `modelkit
        # export` reads back as stop tokens); Qwen's own file uses <|endoftext|> as bos and pad.
        model.generation_config = GenerationConfig(
            bos_token_id=endoftext, eos_token_id=list(stop_tokens), pad_token_id=endoftext, do_sample=False
        )
        model.save_pretrained(tmp)
        for f in TOKENIZER_FILES:
            shutil.copyfile(Path(tokenizer_dir) / f, tmp / f)
        save_mask_decoder_checkpoint(mask_decoder, tmp / MASK_DECODER_FILE)
        swap_into_place(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def cmd_random_pack(args: argparse.Namespace) -> int:
    if args.shape not in SHAPES:
        raise ModelkitError(
            "INVALID_INPUT", f"Expected --shape in {', '.join(SHAPES)} but received {args.shape}"
        )
    out: Path = args.out
    pack_dir, reference_dir = out / "pack", out / "reference"
    check_output_dir(pack_dir, args.force)
    check_output_dir(reference_dir, args.force)
    check_dtype(args.dtype)
    check_pixels(args.min_pixels, args.max_pixels)
    domain = check_domain(args.domain)
    if not args.weight_scale > 0:
        raise ModelkitError("INVALID_INPUT", f"Expected --weight-scale > 0 but received {args.weight_scale}")
    ids = read_tokenizer_ids(args.tokenizer)
    config = random_config(args.shape, args.text_layers, args.vision_depth)
    stop = [ids["im_end"], ids["endoftext"]]

    t0 = time.monotonic()
    model = build_random_model(config, args.seed, weight_scale=args.weight_scale)
    mask_decoder = random_mask_decoder(config, args.seed + 1)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"random {args.shape}: {n_params / 1e6:.1f} M parameters in {time.monotonic() - t0:.1f} s")

    t = time.monotonic()
    write_reference(model, mask_decoder, args.tokenizer, reference_dir, stop, ids["endoftext"])
    print(
        f"reference: {_folder_bytes(reference_dir) / 1e6:.1f} MB in {reference_dir} "
        f"({time.monotonic() - t:.1f} s)"
    )

    tc, vc = config.text_config, config.vision_config
    provenance: dict[str, Any] = default_provenance(
        base=f"random {args.shape} (modelkit.released_configs), {tc.num_hidden_layers} text layers, "
        f"{vc.depth} ViT blocks",
        mask_decoder="random MaskDecoder",
        extra={
            # Not the tiny pack's "random" key: `modelkit fixtures` rebuilds this pack from the
            # reference folder (--checkpoint <out>/reference --mask-decoder .../mask_decoder.safetensors).
            "random_pack": {
                "shape": args.shape,
                "text_layers": int(tc.num_hidden_layers),
                "vision_depth": int(vc.depth),
                "seed": args.seed,
                "weight_scale": args.weight_scale,
                "mask_decoder_seed": args.seed + 1,
                "reference": "../reference",
            }
        },
    )
    t = time.monotonic()
    manifest = build_pack(
        model,
        mask_decoder,
        pack_dir,
        name=f"random-{args.shape}",
        description=f"Random-weight {args.shape} ({tc.num_hidden_layers} text layers, {vc.depth} ViT "
        "blocks) for benchmarks and parity checks; meaningless output.",
        dtype=args.dtype,
        tokenizer_dir=args.tokenizer,
        provenance=provenance,
        force=args.force,
        min_pixels=args.min_pixels,
        max_pixels=args.max_pixels,
        stop_tokens=stop,
        domain=domain,
    )
    print(f"{summary_line(pack_dir, manifest)} ({time.monotonic() - t:.1f} s)")
    print(f"total {time.monotonic() - t0:.1f} s")
    return 0
