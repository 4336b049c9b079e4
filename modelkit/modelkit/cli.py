"""`modelkit` command line: the one place that declares every command and its arguments.

Each command runs a `cmd_*` function of its module, imported only when that command runs, so
`modelkit --help` loads neither torch nor transformers. Bad input prints one line `CODE: message` to
stderr and exits 2 without writing anything. The cheap checks (config, mask decoder file, output
folder, tokenizer) run before any large weights are loaded.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .defaults import (
    BOX_JITTER,
    DEFAULT_TOKENIZER,
    DEMO_MAX_PIXELS,
    DEMO_MIN_PIXELS,
    EXPORT_MAX_PIXELS,
    EXPORT_MIN_PIXELS,
    TINY_MASK_DECODER,
    TINY_MAX_PIXELS,
    TINY_MIN_PIXELS,
    TINY_WEIGHT_SCALE,
)
from .errors import ModelkitError
from .released_configs import SHAPES

THREADS_HELP = "CPU threads for torch (default 1: on a busy 2-core machine 2 threads ran 5-15x slower)"
PACK_DTYPES = ("fp32", "fp16", "int4")
DOMAIN_HELP = (
    'what the model knows, stored as "domain" in pack.json, e.g. "general images (Qwen3-VL-4B-Instruct)" '
    "(default: left out)"
)


def _command(sub: Any, name: str, run: str, help: str) -> argparse.ArgumentParser:
    """A sub-command whose implementation is `run` = "module:function" in this package."""
    p: argparse.ArgumentParser = sub.add_parser(name, help=help)
    p.set_defaults(run=run)
    return p


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="modelkit", description="Build qwen3-vl-seg-mcp model packs.")
    sub = p.add_subparsers(dest="command", required=True)

    e = _command(
        sub,
        "export",
        "cli:cmd_export",
        "export a Hugging Face Qwen3-VL checkpoint (+ a mask decoder, optional) into a pack",
    )
    e.add_argument(
        "--checkpoint", type=Path, required=True, help="HF folder: config.json, *.safetensors, tokenizer"
    )
    e.add_argument(
        "--mask-decoder",
        type=Path,
        help="mask decoder checkpoint (.safetensors); without it the pack has no mask decoder: ground and "
        "describe_region work, segment answers MASK_DECODER_MISSING",
    )
    e.add_argument("--out", type=Path, required=True, help="pack folder to create, e.g. models/qwen3-vl-4b")
    e.add_argument("--name", help="pack name (default: the --out folder's name)")
    e.add_argument("--description", default="", help="human-readable description stored in pack.json")
    e.add_argument("--domain", help=DOMAIN_HELP)
    e.add_argument("--dtype", choices=PACK_DTYPES, default="fp32", help="weight dtype (default fp32)")
    e.add_argument("--min-pixels", type=int, default=EXPORT_MIN_PIXELS, help="smart_resize lower bound")
    e.add_argument("--max-pixels", type=int, default=EXPORT_MAX_PIXELS, help="smart_resize upper bound")
    e.add_argument("--tokenizer", type=Path, help="folder with tokenizer.json (default: --checkpoint)")
    e.add_argument(
        "--describe-mode",
        choices=("box", "crop"),
        default="box",
        help="describe_region by the box in the prompt (Qwen3-VL) or by a crop around it (default box)",
    )
    e.add_argument(
        "--compact-embedding",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="store only the embedding rows that are not all zero (same outputs); default: when at least "
        "half of them are zero (a model trained from scratch on a small world)",
    )
    e.add_argument("--force", action="store_true", help="replace an existing pack folder")

    t = _command(sub, "tiny", "cli:cmd_tiny", "build the tiny random pack and record its golden fixtures")
    t.add_argument("--out", type=Path, default=Path("models/tiny-random"))
    t.add_argument("--fixtures", type=Path, default=Path("test/fixtures/tiny-random"))
    t.add_argument("--images", type=Path, help="fixture image folder (default: <fixtures>/../images)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--weight-scale", type=float, default=TINY_WEIGHT_SCALE)
    t.add_argument("--tokenizer", type=Path, default=DEFAULT_TOKENIZER)
    t.add_argument("--domain", help=DOMAIN_HELP)
    t.add_argument("--force", action="store_true", help="replace an existing pack and fixtures")

    f = _command(
        sub, "fixtures", "cli:cmd_fixtures", "re-record golden fixtures for a pack with the PyTorch reference"
    )
    f.add_argument("--pack", type=Path, required=True)
    f.add_argument("--out", type=Path, required=True)
    f.add_argument("--images", type=Path, help="fixture image folder (default: <out>/../images)")
    f.add_argument("--checkpoint", type=Path, help="HF checkpoint (packs not built by `modelkit tiny`)")
    f.add_argument(
        "--mask-decoder",
        type=Path,
        help="mask decoder checkpoint (packs not built by `modelkit tiny` that have a mask decoder)",
    )

    v = _command(sub, "verify", "cli:cmd_verify", "check a pack's files against the sha256 sums in pack.json")
    v.add_argument("pack", type=Path)

    va = _command(
        sub,
        "validate",
        "cli:cmd_validate",
        "check a pack's manifest (sections, graphs, mask decoder or none) and its checksums; "
        "say what it can do",
    )
    va.add_argument("pack", type=Path)

    r = _command(
        sub,
        "random-pack",
        "random_pack:cmd_random_pack",
        "random weights at a released Qwen3-VL size (depth optionally cut): a pack + its HF reference",
    )
    r.add_argument("--shape", choices=SHAPES, required=True, help="whose config (widths, vocabulary) to use")
    r.add_argument("--text-layers", type=int, help="keep this many text layers (default: all; at least 3)")
    r.add_argument("--vision-depth", type=int, help="keep this many ViT blocks (default: all; at least 3)")
    r.add_argument("--dtype", choices=PACK_DTYPES, default="fp32", help="the pack's weight dtype")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument(
        "--weight-scale",
        type=float,
        default=TINY_WEIGHT_SCALE,
        help=f"multiplier on the random matrices, as in `modelkit tiny` (default {TINY_WEIGHT_SCALE:g})",
    )
    r.add_argument("--out", type=Path, required=True, help="folder for <out>/pack and <out>/reference")
    r.add_argument("--tokenizer", type=Path, default=DEFAULT_TOKENIZER)
    r.add_argument("--min-pixels", type=int, default=EXPORT_MIN_PIXELS, help="smart_resize lower bound")
    r.add_argument("--max-pixels", type=int, default=EXPORT_MAX_PIXELS, help="smart_resize upper bound")
    r.add_argument("--domain", help=DOMAIN_HELP)
    r.add_argument("--force", action="store_true", help="replace an existing pack and reference")

    b = _command(
        sub,
        "bench-reference",
        "bench_reference:cmd_bench_reference",
        "time the PyTorch reference (transformers) on a pack's prompt and image; prints one JSON object",
    )
    b.add_argument("--reference", type=Path, required=True, help="HF checkpoint folder of the pack's weights")
    b.add_argument("--pack", type=Path, required=True, help="the pack (prompts, tokenizer, pixel bounds)")
    b.add_argument("--image", type=Path, required=True)
    b.add_argument("--tokens", type=int, default=32, help="greedy tokens to decode (default 32)")
    b.add_argument("--runs", type=int, default=3, help="timed runs after one warm-up (default 3)")
    b.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    b.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default="fp32", help="compute dtype")
    b.add_argument("--threads", type=int, help="torch CPU threads (default: torch's own choice)")
    b.add_argument("--expression", default="the red circle", help="the grounding question's expression")
    b.add_argument("--box", help="x1,y1,x2,y2 in pixels for segment_box (default: the middle half)")
    b.add_argument("--box-label", default="region", help="what segment_box asks about (default region)")
    b.add_argument(
        "--attn",
        choices=("sdpa", "eager"),
        default="sdpa",
        help="transformers attention implementation (default sdpa, transformers' own default)",
    )
    b.add_argument(
        "--serve",
        action="store_true",
        help="after the warm-up print one JSON line, then run one timed round per 'round' line on stdin "
        "(a JSON line each) until 'done': lets a caller interleave its own runs on a noisy machine",
    )

    s = _command(sub, "synth", "synth:cmd_synth", "write a seeded synthetic referring-segmentation dataset")
    s.add_argument("--out", type=Path, required=True, help="dataset folder: images/ + annotations.json")
    s.add_argument("--n", type=int, required=True, help="number of images")
    s.add_argument("--seed", type=int, default=0, help="seed; the same seed writes identical bytes")
    s.add_argument("--refs-per-image", type=int, default=6, help="expressions per image (default 6)")
    s.add_argument("--force", action="store_true", help="replace an existing annotations.json")

    m = _command(
        sub,
        "train-mask-decoder",
        "train_mask_decoder:cmd_train_mask_decoder",
        "train the mask decoder on a frozen Qwen3-VL base",
    )
    m.add_argument("--checkpoint", type=Path, required=True, help="HF Qwen3-VL folder (kept frozen)")
    m.add_argument("--data", type=Path, required=True, help="annotations.json (or its folder)")
    m.add_argument("--out", type=Path, required=True, help="mask decoder checkpoint to write (.safetensors)")
    m.add_argument("--val-data", type=Path, help="validation annotations (default: hold out images)")
    m.add_argument("--val-fraction", type=float, default=0.05, help="held-out image share (default 0.05)")
    m.add_argument("--val-images", type=int, default=40, help="at most this many validation images")
    m.add_argument("--minutes", type=float, help="training time budget (feature extraction not counted)")
    m.add_argument("--steps", type=int, help="training steps")
    m.add_argument("--size", default="paper", help="mask decoder size preset: tiny | small | paper (default)")
    for name in ("dim", "pixel-dim", "layers", "heads", "ffn-dim"):
        m.add_argument(f"--{name}", type=int, help=f"override the preset's {name}")
    m.add_argument("--lr", type=float, default=3e-4)
    m.add_argument("--jitter", type=float, default=BOX_JITTER, help="box edge noise, fraction of the side")
    m.add_argument("--val-every", type=int, default=500, help="steps between validations")
    m.add_argument("--save-every", type=float, default=120.0, help="seconds between checkpoints")
    m.add_argument("--min-pixels", type=int, default=DEMO_MIN_PIXELS, help="the pack's smart_resize minimum")
    m.add_argument("--max-pixels", type=int, default=DEMO_MAX_PIXELS, help="the pack's smart_resize maximum")
    m.add_argument("--tokenizer", type=Path, help="folder with tokenizer.json (default: the checkpoint's)")
    m.add_argument("--cache", type=Path, help="feature cache folder (default: <out>.features)")
    m.add_argument("--max-images", type=int, help="use only this many training images")
    m.add_argument("--resume", action="store_true", help="continue from --out and its optimizer state")
    m.add_argument("--device", default="auto", help="auto | cpu | cuda")
    m.add_argument("--threads", type=int, default=1, help=THREADS_HELP)
    m.add_argument("--seed", type=int, default=0)

    sc = _command(sub, "score", "evaluate:cmd_score", "score a predictions file against annotations")
    sc.add_argument("--data", type=Path, required=True, help="annotations.json (or its folder)")
    sc.add_argument("--pred", type=Path, required=True, help="predictions JSON")
    sc.add_argument("--json", action="store_true", help="print the metrics as JSON")

    ca = _command(
        sub,
        "calibrate",
        "calibrate:cmd_calibrate",
        "fit a pack's grounding score and threshold on held-out predictions (bench/eval.ts --min-score 0)",
    )
    ca.add_argument("--data", type=Path, required=True, help="annotations.json (or its folder)")
    ca.add_argument("--pred", type=Path, required=True, help="ground predictions with evidence")
    ca.add_argument("--pack", type=Path, help="pack folder whose pack.json gets calibration.grounding")
    ca.add_argument(
        "--holdout-images",
        type=int,
        default=60,
        help="the first N images are only measured (AUC, absent accuracy, recall); the rest fit (default 60)",
    )
    ca.add_argument("--fitted-on", help="what the data is, recorded in pack.json")
    ca.add_argument(
        "--label-agreement",
        action="store_true",
        help="a fifth feature: the share of the label's words the expression uses (see docs/demo-pack.md "
        "for when it helped and when it did not)",
    )

    pr = _command(
        sub, "predict", "predict:cmd_predict", "PyTorch predictions (ground | box | describe) for scoring"
    )
    pr.add_argument("--checkpoint", type=Path, required=True, help="HF Qwen3-VL folder")
    pr.add_argument("--mask-decoder", type=Path, help="mask decoder checkpoint (ground and box modes)")
    pr.add_argument("--data", type=Path, required=True, help="annotations.json (or its folder)")
    pr.add_argument("--out", type=Path, required=True, help="predictions JSON to write")
    pr.add_argument("--mode", choices=("ground", "box", "describe"), required=True)
    pr.add_argument("--min-pixels", type=int, default=DEMO_MIN_PIXELS, help="the pack's smart_resize minimum")
    pr.add_argument("--max-pixels", type=int, default=DEMO_MAX_PIXELS, help="the pack's smart_resize maximum")
    pr.add_argument("--max-new-tokens", type=int, default=200, help="ground answer budget")
    pr.add_argument("--max-images", type=int, help="predict only the first N images")
    pr.add_argument("--tokenizer", type=Path, help="folder with tokenizer.json (default: the checkpoint's)")
    pr.add_argument("--device", default="auto", help="auto | cpu | cuda")
    pr.add_argument("--threads", type=int, default=1, help="CPU threads for torch (default 1)")

    tv = _command(
        sub, "train-vlm", "train_vlm:cmd_train_vlm", "train a tiny Qwen3-VL on referring data (time-boxed)"
    )
    src = tv.add_mutually_exclusive_group(required=True)
    src.add_argument("--train", type=Path, help="dataset folder or annotations.json")
    src.add_argument("--stream-seed", type=int, help="train on fresh synthetic scenes of this seed instead")
    tv.add_argument("--val", type=Path, help="held-out dataset for the periodic greedy eval")
    tv.add_argument("--out", type=Path, required=True, help="output folder: last/, final/, history.json")
    tv.add_argument("--minutes", type=float, default=60.0)
    tv.add_argument("--batch", type=int, default=24)
    tv.add_argument("--lr", type=float, default=2e-3)
    tv.add_argument("--warmup", type=int, default=100, help="linear warm-up steps")
    tv.add_argument("--threads", type=int, default=2)
    tv.add_argument("--seed", type=int, default=0)
    tv.add_argument("--min-pixels", type=int, default=DEMO_MIN_PIXELS)
    tv.add_argument("--max-pixels", type=int, default=DEMO_MAX_PIXELS)
    tv.add_argument("--text-hidden", type=int, default=128)
    tv.add_argument("--vision-hidden", type=int, default=128)
    tv.add_argument("--text-layers", type=int, default=4)
    tv.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:1, ...")
    tv.add_argument("--workers", type=int, default=0, help="data-loading processes (with --stream-seed)")
    tv.add_argument(
        "--render",
        choices=("workers", "device"),
        default="workers",
        help="with --stream-seed: 'workers' draw each scene with PIL on the CPU (synth.py); 'device' has the"
        " workers lay out the scenes and write the texts while the training device rasterises the pixels"
        " of a whole batch with tensor ops (synth_torch.py)",
    )
    tv.add_argument("--coord-step", type=int, default=1, help="round answer coordinates to multiples of this")
    tv.add_argument(
        "--light", action="store_true", help="save only <out>/training_state.pt (weights, no optimizer)"
    )
    tv.add_argument("--tokenizer", type=Path, default=DEFAULT_TOKENIZER)
    tv.add_argument("--eval-every", type=float, default=420.0, help="seconds between evals")
    tv.add_argument("--save-every", type=float, default=300.0, help="seconds between checkpoints")
    tv.add_argument("--eval-n", type=int, default=30)
    tv.add_argument("--aux-weight", type=float, default=1.0)
    tv.add_argument("--curriculum", type=float, default=0.2)
    tv.add_argument(
        "--mix",
        default="0.6,0.1,0.3",
        help="shares of refs, every-shape and descriptions after the curriculum",
    )
    tv.add_argument("--max-steps", type=int)
    tv.add_argument("--resume", action="store_true", help="continue from <out>/last/training_state.pt")
    tv.add_argument(
        "--init-pack",
        type=Path,
        help="start from the weights of this fp32/fp16 pack (e.g. models/shapes; its sizes replace "
        "--text-hidden/--vision-hidden/--text-layers): training heads, optimizer and step count start "
        "fresh; ignored when --resume finds a training state",
    )

    up = _command(
        sub,
        "unpack",
        "unpack:cmd_unpack",
        "rebuild the HF Qwen3-VL checkpoint of a pack (fp32/fp16; `export` of it gives the pack's graphs)",
    )
    up.add_argument("--pack", type=Path, required=True, help="pack folder, e.g. models/shapes")
    up.add_argument("--out", type=Path, required=True, help="HF checkpoint folder to create")
    up.add_argument("--force", action="store_true", help="replace an existing --out folder")
    return p


def _resolve(run: str) -> Callable[[argparse.Namespace], int]:
    """The `cmd_*` function named "module:function", importing its module now."""
    module, name = run.split(":")
    fn: Callable[[argparse.Namespace], int] = getattr(
        importlib.import_module(f".{module}", __package__), name
    )
    return fn


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return int(_resolve(args.run)(args))
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
    from .mask_decoder import check_mask_decoder_matches, load_mask_decoder_checkpoint
    from .pack import (
        build_pack,
        check_domain,
        check_dtype,
        check_output_dir,
        check_pixels,
        default_provenance,
        read_tokenizer_ids,
        summary_line,
    )

    checkpoint: Path = args.checkpoint
    mask_decoder_path: Path | None = args.mask_decoder
    tokenizer_dir: Path = args.tokenizer or checkpoint
    check_output_dir(args.out, args.force)
    check_dtype(args.dtype)
    check_pixels(args.min_pixels, args.max_pixels)
    domain = check_domain(args.domain)
    read_config(checkpoint)
    _check_weights_present(checkpoint)
    read_tokenizer_ids(tokenizer_dir)
    config = Qwen3VLConfig.from_pretrained(checkpoint)
    mask_decoder = None
    if mask_decoder_path is not None:
        if not mask_decoder_path.is_file():
            raise ModelkitError(
                "MASK_DECODER_INVALID", f"mask decoder file {mask_decoder_path} does not exist"
            )
        mask_decoder = load_mask_decoder_checkpoint(mask_decoder_path)
        check_mask_decoder_matches(
            mask_decoder.config, config.vision_config.hidden_size, config.text_config.hidden_size
        )
    stop = _stop_tokens(checkpoint)
    if mask_decoder_path is None:
        description = f"Qwen3-VL from {checkpoint.name}, no mask decoder"
    else:
        description = f"Qwen3-VL from {checkpoint.name} with mask decoder {mask_decoder_path.name}"

    model = load_checkpoint(checkpoint)
    manifest = build_pack(
        model,
        mask_decoder,
        args.out,
        name=args.name or args.out.name,
        description=args.description or description,
        dtype=args.dtype,
        tokenizer_dir=tokenizer_dir,
        provenance=default_provenance(
            base=str(checkpoint),
            mask_decoder=None if mask_decoder_path is None else str(mask_decoder_path),
        ),
        force=args.force,
        min_pixels=args.min_pixels,
        max_pixels=args.max_pixels,
        stop_tokens=stop,
        describe_mode=args.describe_mode,
        domain=domain,
        compact_embedding=args.compact_embedding,
    )
    print(summary_line(args.out, manifest))
    return 0


def _tiny_provenance(seed: int, weight_scale: float, mask_decoder_config: dict[str, Any]) -> dict[str, Any]:
    from .pack import default_provenance

    return default_provenance(
        base="random Qwen3-VL (modelkit.hf.tiny_config)",
        mask_decoder="random MaskDecoder",
        extra={
            # Everything `modelkit fixtures` needs to rebuild the exact same PyTorch models (the key
            # names are those of the committed tiny pack).
            "random": {
                "seed": seed,
                "weight_scale": weight_scale,
                "decoder_seed": seed + 1,
                "decoder_config": mask_decoder_config,
            }
        },
    )


def build_tiny_models(
    seed: int, weight_scale: float, mask_decoder_config: dict[str, Any] | None = None
) -> tuple[Any, Any]:
    """The tiny random Qwen3-VL and its random mask decoder, deterministic in `seed`."""
    import torch

    from .hf import build_random_model, tiny_config
    from .mask_decoder import MaskDecoder, MaskDecoderConfig

    config = tiny_config()
    model = build_random_model(config, seed, weight_scale=weight_scale)
    if mask_decoder_config is None:
        mcfg = MaskDecoderConfig(
            vision_hidden=config.vision_config.hidden_size,
            text_hidden=config.text_config.hidden_size,
            **TINY_MASK_DECODER,
        )
    else:
        mcfg = MaskDecoderConfig.from_dict(mask_decoder_config)
    torch.manual_seed(seed + 1)
    mask_decoder = MaskDecoder(mcfg).eval()
    return model, mask_decoder


def cmd_tiny(args: argparse.Namespace) -> int:
    from .fixtures import record_fixtures
    from .pack import build_pack, check_domain, check_output_dir, read_tokenizer_ids, summary_line

    check_output_dir(args.out, args.force)
    if args.fixtures.exists() and not args.force:
        raise ModelkitError("OUTPUT_EXISTS", f"{args.fixtures} already exists; pass --force to replace it")
    domain = check_domain(args.domain)
    read_tokenizer_ids(args.tokenizer)
    model, mask_decoder = build_tiny_models(args.seed, args.weight_scale)
    manifest = build_pack(
        model,
        mask_decoder,
        args.out,
        name=args.out.name,
        description="Tiny random Qwen3-VL + mask decoder for tests (real tokenizer, meaningless output).",
        dtype="fp32",
        tokenizer_dir=args.tokenizer,
        provenance=_tiny_provenance(args.seed, args.weight_scale, mask_decoder.config.to_dict()),
        force=args.force,
        min_pixels=TINY_MIN_PIXELS,
        max_pixels=TINY_MAX_PIXELS,
        domain=domain,
    )
    print(summary_line(args.out, manifest))
    images = args.images or args.fixtures.parent / "images"
    cases = record_fixtures(model, mask_decoder, args.out, args.fixtures, images)
    print(f"fixtures: {len(cases)} cases in {args.fixtures} ({', '.join(cases)})")
    return 0


def models_for_pack(
    pack_dir: Path, checkpoint: Path | None, mask_decoder_path: Path | None
) -> tuple[Any, Any]:
    """Rebuild the PyTorch models a pack was exported from (the reference for its fixtures); the mask
    decoder is None for a pack without one."""
    from .hf import load_checkpoint, tiny_config
    from .mask_decoder import load_mask_decoder_checkpoint
    from .pack import has_mask_decoder, load_manifest, model_section

    manifest = load_manifest(pack_dir)
    if not has_mask_decoder(manifest):
        if checkpoint is None:
            raise ModelkitError(
                "INVALID_INPUT", f"{pack_dir} has no mask decoder; pass the --checkpoint it was exported from"
            )
        if mask_decoder_path is not None:
            raise ModelkitError(
                "INVALID_INPUT",
                f"{pack_dir} has no mask decoder; leave out --mask-decoder (its fixtures have no mask "
                "tensors)",
            )
        return load_checkpoint(checkpoint), None
    random = manifest.get("provenance", {}).get("random")
    if random is not None and checkpoint is None:
        if model_section(tiny_config()) != {k: manifest["model"][k] for k in ("text", "vision")}:
            raise ModelkitError(
                "PACK_INVALID",
                f"{pack_dir} was built from another tiny config than modelkit.hf.tiny_config(); "
                "rebuild it with `modelkit tiny --force`",
            )
        return build_tiny_models(int(random["seed"]), float(random["weight_scale"]), random["decoder_config"])
    if checkpoint is None or mask_decoder_path is None:
        raise ModelkitError(
            "INVALID_INPUT",
            f"{pack_dir} is not a tiny random pack; pass the --checkpoint and --mask-decoder it was "
            "exported from",
        )
    if not mask_decoder_path.is_file():
        raise ModelkitError("MASK_DECODER_INVALID", f"mask decoder file {mask_decoder_path} does not exist")
    return load_checkpoint(checkpoint), load_mask_decoder_checkpoint(mask_decoder_path)


def cmd_fixtures(args: argparse.Namespace) -> int:
    from .fixtures import record_fixtures

    model, mask_decoder = models_for_pack(args.pack, args.checkpoint, args.mask_decoder)
    images = args.images or args.out.parent / "images"
    cases = record_fixtures(model, mask_decoder, args.pack, args.out, images)
    print(f"fixtures: {len(cases)} cases in {args.out} ({', '.join(cases)})")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from .pack import NO_MASK_DECODER, has_mask_decoder, load_manifest, verify_pack

    problems = verify_pack(args.pack)
    if problems:
        raise ModelkitError(
            "PACK_CHECKSUM_MISMATCH", f"{args.pack}: {len(problems)} problem(s): " + "; ".join(problems)
        )
    manifest = load_manifest(args.pack)
    print(f"OK: {args.pack}: {len(manifest['files'])} files match pack.json")
    if not has_mask_decoder(manifest):
        print(NO_MASK_DECODER)
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from .pack import NO_MASK_DECODER, has_mask_decoder, load_manifest, manifest_problems, verify_pack

    manifest = load_manifest(args.pack)
    problems = manifest_problems(manifest)
    if problems:
        raise ModelkitError(
            "PACK_INVALID", f"{args.pack}: {len(problems)} problem(s): " + "; ".join(problems)
        )
    problems = verify_pack(args.pack)
    if problems:
        raise ModelkitError(
            "PACK_CHECKSUM_MISMATCH", f"{args.pack}: {len(problems)} problem(s): " + "; ".join(problems)
        )
    graphs = ", ".join(manifest["graphs"])
    print(
        f"OK: {args.pack}: pack {manifest['name']} ({manifest['dtype']}), {len(manifest['files'])} files "
        f"match pack.json; graphs: {graphs}"
    )
    print(f"domain: {manifest.get('domain', '(not stated)')}")
    if not has_mask_decoder(manifest):
        print(NO_MASK_DECODER)
    return 0


if __name__ == "__main__":
    sys.exit(main())
