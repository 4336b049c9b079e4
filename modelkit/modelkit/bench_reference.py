"""`modelkit bench-reference`: the PyTorch reference timed on exactly the runtime's inputs.

For the TypeScript benchmark to run as a subprocess: transformers' `Qwen3VLForConditionalGeneration`
(eager PyTorch, attention "sdpa" unless `--attn eager`) on an HF folder holding the pack's weights
(`modelkit random-pack` writes one), with the pack's own prompts, tokenizer and pixel bounds, and
modelkit's PIL-exact preprocessing. Prints one JSON object on stdout.

Per run (medians over `--runs` after one warm-up run, milliseconds):
- ground: preprocess (decode + `preprocess_image`), vision (visual tower: image features, DeepStack
  features, and the ViT taps the mask decoder reads), prefill (the language model on the whole
  prompt with the image features, KV cache kept, lm_head on the last position only), then greedy
  decoding without grammar or stop tokens: token 1 is the prefill's argmax and tokens 2..N take one
  KV-cache step each, as src/runtime/generate.ts does (N - 1 steps; `decode_ms_per_token` is their
  mean); `ground_total_ms` is the whole pass;
- segment_box: preprocess, vision, one prefill of the grounding prompt for `--box-label` followed by
  the forced answer prefix `[{"bbox_2d": [x1, y1, x2, y2` of the box (answers.grounding_answer_ids,
  close=False), then the mask decoder for that box with T_seg = the last prefix token's state
  (`mask_ms`; always fp32, like the mask graph's I/O); `segment_box_total_ms` is the whole pass.

Each stage's median is taken on its own (`samples_ms` lists every run), so the parts need not add
up to the total's median. `tokens` always come from a float32 pass (run first, before the model is
cast to `--dtype`), so they are comparable with the runtime's fp32 pack, with
`greedy_min_logit_margin` saying how decisive they are; `timed_tokens` come from the timed dtype.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

from .answers import box_to_1000, chat_prompt_ids, grounding_answer_ids
from .errors import ModelkitError
from .hf import read_config
from .mask_decoder import MaskDecoder, load_mask_decoder_checkpoint
from .pack import has_mask_decoder, load_manifest, mask_decoder_section, model_section
from .preprocess import PreprocessedImage, load_rgb, preprocess_image
from .random_pack import MASK_DECODER_FILE
from .tokenizer import TextTokenizer

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
BOX_LABEL = "region"  # what segment() asks about when the agent gives a box without a label


@dataclass
class Encoded:
    prep: PreprocessedImage
    grid: torch.Tensor  # [1, 3] i64
    vision: Any  # get_image_features' output: pooler_output + deepstack_features, split per image
    vit_ms: torch.Tensor  # [4, P, Cv]

    @property
    def num_image_tokens(self) -> int:
        _, gh, gw = (int(v) for v in self.grid[0])
        return (gh // 2) * (gw // 2)


class Stopwatch:
    """Lap times in ms; on CUDA each lap waits for the queued kernels first."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.laps: dict[str, float] = {}
        self.start = self.last = self._now()

    def _now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def lap(self, name: str) -> None:
        now = self._now()
        self.laps[name] = (now - self.last) * 1000.0
        self.last = now

    def total(self) -> float:
        return (self.last - self.start) * 1000.0


class Reference:
    """The HF model + mask decoder of one reference folder, run the way the runtime runs the pack."""

    def __init__(
        self,
        model: Qwen3VLForConditionalGeneration,
        mask_decoder: MaskDecoder,
        manifest: dict[str, Any],
        tokenizer: TextTokenizer,
        device: torch.device,
    ) -> None:
        self.model, self.mask_decoder = model, mask_decoder
        self.manifest, self.tokenizer, self.device = manifest, tokenizer, device
        self.image_pad = int(manifest["tokens"]["image_pad"])
        vcfg = model.config.vision_config
        self.taps = [*vcfg.deepstack_visual_indexes, vcfg.depth - 1]
        self._captured: dict[int, torch.Tensor] = {}
        for i in sorted(set(self.taps)):
            model.model.visual.blocks[i].register_forward_hook(self._capture(i))

    def _capture(self, i: int) -> Callable[[Any, Any, Any], None]:
        def hook(_module: Any, _inputs: Any, out: Any) -> None:
            self._captured[i] = out[0] if isinstance(out, tuple) else out

        return hook

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def to(self, dtype: torch.dtype) -> None:
        """Cast the language and vision model; the mask decoder always runs in fp32 (its module builds
        fp32 tensors internally, and the pack's mask graph has fp32 I/O in every dtype)."""
        self.model.to(dtype=dtype)

    def preprocess(self, image: Path) -> PreprocessedImage:
        pre = self.manifest["preprocess"]
        return preprocess_image(load_rgb(image), pre["min_pixels"], pre["max_pixels"], check=False)

    @torch.no_grad()
    def vision(self, prep: PreprocessedImage) -> Encoded:
        pixels = torch.from_numpy(prep.pixel_values).to(self.device, self.dtype)  # [P, 1536]
        grid = torch.from_numpy(prep.image_grid_thw).to(self.device)  # [1, 3]
        self._captured.clear()
        vision = self.model.model.get_image_features(pixels, grid, return_dict=True)
        vit_ms = torch.stack([self._captured[i] for i in self.taps])  # [4, P, Cv]
        return Encoded(prep, grid, vision, vit_ms)

    def prompt_ids(self, question: str, num_image_tokens: int) -> list[int]:
        chat = self.manifest["prompts"]["chat"]
        return chat_prompt_ids(self.tokenizer, chat, question, num_image_tokens, self.image_pad)

    @torch.no_grad()
    def prefill(self, enc: Encoded, ids: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor, Any]:
        """(last-position logits [V], final-norm states [S, H], KV cache) of the whole prompt."""
        input_ids = torch.tensor([list(ids)], dtype=torch.long, device=self.device)  # [1, S]
        out = self.model.model(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            mm_token_type_ids=(input_ids == self.image_pad).to(torch.int32),
            image_grid_thw=enc.grid,
            mm_encoder_outputs={"image": enc.vision},  # the vision output, not recomputed
            use_cache=True,
        )
        hidden = out.last_hidden_state[0]  # [S, H]
        logits = self.model.lm_head(hidden[-1:])[0]  # [V]
        return logits, hidden, out.past_key_values

    @torch.no_grad()
    def decode(
        self, logits: torch.Tensor, cache: Any, past: int, n_tokens: int, margins: list[float] | None = None
    ) -> list[int]:
        """`n_tokens` greedy tokens: the argmax of the prefill's `logits`, then one KV-cache step per
        further token, positions continuing from the prefill's rope delta (kept by the model) as
        decodePositions does. `margins` receives each choice's top-1 minus top-2 logit."""
        tokens: list[int] = []
        delta = int(self.model.model.rope_deltas.reshape(-1)[0])  # set by the prefill's get_rope_index
        for k in range(n_tokens):
            if margins is not None:
                top2 = torch.topk(logits.float(), 2).values
                margins.append(float(top2[0] - top2[1]))
            tokens.append(int(logits.argmax()))
            if k == n_tokens - 1:
                break
            ids = torch.tensor([[tokens[-1]]], dtype=torch.long, device=self.device)  # [1, 1]
            mask = torch.ones(1, past + k + 1, dtype=torch.long, device=self.device)
            # T/H/W all at cache length + rope delta (Qwen3VLModel would derive positions from the
            # whole attention mask here, one per key).
            pos = torch.full((3, 1, 1), past + k + delta, dtype=torch.long, device=self.device)
            out = self.model.model(
                input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True
            )
            cache = out.past_key_values
            logits = self.model.lm_head(out.last_hidden_state[0, -1:])[0]  # [V]
        return tokens

    @torch.no_grad()
    def mask(
        self, enc: Encoded, ids: Sequence[int], hidden: torch.Tensor, box1000: Sequence[int]
    ) -> torch.Tensor:
        """The mask decoder (fp32) for one box: mm_embeds = the prefill states at the image pads,
        T_seg = the last state. Returns mask_logits [1, 1, 4gh, 4gw]."""
        f32 = torch.float32
        rows = torch.tensor([t == self.image_pad for t in ids], device=self.device)
        boxes = torch.tensor([list(box1000)], dtype=f32, device=self.device) / 1000.0  # [1, 4]
        logits, _, _ = self.mask_decoder(
            enc.vit_ms.to(f32),
            hidden[rows].to(f32),  # [M, H]
            hidden[-1:].to(f32),  # [1, H]
            boxes,
            boxes[:, None, :],  # gate boxes [1, 1, 4]
            torch.ones(1, 1, dtype=f32, device=self.device),
            torch.from_numpy(enc.prep.hr_image).to(self.device),
        )
        return logits


def _environment(ref: Reference, dtype: str) -> dict[str, Any]:
    """What a measurement ran on: peak RSS so far, threads, device, dtypes and library versions."""
    return {
        # ru_maxrss is in KiB on Linux (bytes on macOS)
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 1),
        "threads": torch.get_num_threads(),
        "device": str(ref.device),
        "dtype": dtype,
        "attn_implementation": ref.model.config._attn_implementation,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


def ground_question(manifest: dict[str, Any], expression: str) -> str:
    expr = expression.strip()
    if not expr:
        raise ModelkitError("INVALID_INPUT", "--expression is empty; describe the object to find")
    return str(manifest["prompts"]["ground"]).replace("{expression}", expr)


def default_box(width: int, height: int) -> list[float]:
    """The middle half of the image, rounded as bench.ts rounds it (Math.round)."""
    return [float(int(v + 0.5)) for v in (width * 0.25, height * 0.25, width * 0.75, height * 0.75)]


def parse_box(text: str) -> list[float]:
    try:
        box = [float(v) for v in text.split(",")]
    except ValueError:
        box = []
    if len(box) != 4 or not (box[0] < box[2] and box[1] < box[3]):
        raise ModelkitError(
            "INVALID_INPUT", f"Expected --box x1,y1,x2,y2 with x1 < x2, y1 < y2 but got {text!r}"
        )
    return box


@dataclass
class GroundPass:
    laps: dict[str, float]  # preprocess, vision, prefill, decode, total (ms)
    ids: list[int]  # the prompt
    grid: list[int]  # [1, gh, gw]
    tokens: list[int]
    margins: list[float]  # per token, when asked for


def ground_pass(
    ref: Reference, image: Path, question: str, n_tokens: int, margins: bool = False
) -> GroundPass:
    t = Stopwatch(ref.device)
    prep = ref.preprocess(image)
    t.lap("preprocess")
    enc = ref.vision(prep)
    t.lap("vision")
    ids = ref.prompt_ids(question, enc.num_image_tokens)
    logits, _, cache = ref.prefill(enc, ids)
    t.lap("prefill")
    found: list[float] | None = [] if margins else None
    tokens = ref.decode(logits, cache, len(ids), n_tokens, found)
    t.lap("decode")
    grid = [int(v) for v in enc.grid[0]]
    return GroundPass({**t.laps, "total": t.total()}, ids, grid, tokens, found or [])


def segment_box_pass(
    ref: Reference, image: Path, box: Sequence[float] | None, label: str
) -> tuple[dict[str, float], list[int]]:
    t = Stopwatch(ref.device)
    prep = ref.preprocess(image)
    t.lap("preprocess")
    enc = ref.vision(prep)
    t.lap("vision")
    h0, w0 = prep.original_hw
    box1000 = box_to_1000(box if box is not None else default_box(w0, h0), w0, h0)
    prefix = grounding_answer_ids(ref.tokenizer, [box1000], [label], close=False).ids
    ids = ref.prompt_ids(ground_question(ref.manifest, label), enc.num_image_tokens) + prefix
    _, hidden, _ = ref.prefill(enc, ids)
    t.lap("prefill")
    ref.mask(enc, ids, hidden, box1000)
    t.lap("mask")
    return {**t.laps, "total": t.total()}, ids


def load_reference(
    reference: Path, pack: Path, device: torch.device, attn: str
) -> tuple[Reference, dict[str, Any]]:
    read_config(reference)
    manifest = load_manifest(pack)
    if not has_mask_decoder(manifest):
        raise ModelkitError(
            "MASK_DECODER_MISSING",
            f"{pack} has no mask decoder; bench-reference times segment_box, which needs one "
            "(export the pack with --mask-decoder)",
        )
    mask_path = reference / MASK_DECODER_FILE
    if not mask_path.is_file():
        raise ModelkitError("MASK_DECODER_INVALID", f"{reference} has no {MASK_DECODER_FILE}")
    mask_decoder = load_mask_decoder_checkpoint(mask_path)
    # The same sizes or it is not the pack's model (the weights themselves are the caller's promise);
    # checked before the large weights are read.
    got = {
        **model_section(Qwen3VLConfig.from_pretrained(reference)),
        "mask_decoder": mask_decoder_section(mask_decoder.config),
    }
    want = {k: manifest["model"][k] for k in ("text", "vision", "mask_decoder")}
    if got != want:
        differ = ", ".join(sorted(k for k in want if got[k] != want[k]))
        raise ModelkitError(
            "REFERENCE_MISMATCH", f"{reference} and {pack} describe different models ({differ})"
        )
    tokenizer = TextTokenizer(pack, manifest["tokenizer"]["file"])
    try:
        model = Qwen3VLForConditionalGeneration.from_pretrained(
            reference, dtype=torch.float32, attn_implementation=attn
        ).eval()
    except Exception as e:  # transformers raises many types; the user needs the message
        raise ModelkitError("CHECKPOINT_INVALID", f"could not load {reference}: {e}") from e
    model.to(device)
    mask_decoder.to(device)
    return Reference(model, mask_decoder, manifest, tokenizer, device), manifest


def _median(samples: list[dict[str, float]], key: str) -> float:
    return round(statistics.median(s[key] for s in samples), 3)


def _fp32_tokens_and_warm_up(
    ref: Reference,
    image: Path,
    question: str,
    n_tokens: int,
    dtype: str,
    box: Sequence[float] | None,
    box_label: str,
) -> GroundPass:
    """The fp32 tokens and their margins first, on the device, with TF32 off so they really are fp32
    (for --dtype fp32 this pass is also the ground warm-up); then the model in `dtype`, warmed up."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    ref.to(torch.float32)
    fp32 = ground_pass(ref, image, question, n_tokens, margins=True)
    ref.to(DTYPES[dtype])
    if dtype != "fp32":
        ground_pass(ref, image, question, n_tokens)  # warm-up
    segment_box_pass(ref, image, box, box_label)  # warm-up
    return fp32


def run_benchmark(
    ref: Reference,
    image: Path,
    *,
    expression: str,
    n_tokens: int,
    runs: int,
    dtype: str,
    box: Sequence[float] | None = None,
    box_label: str = BOX_LABEL,
) -> dict[str, Any]:
    """The JSON object of `modelkit bench-reference` (see the module docstring)."""
    question = ground_question(ref.manifest, expression)
    fp32 = _fp32_tokens_and_warm_up(ref, image, question, n_tokens, dtype, box, box_label)

    grounds: list[GroundPass] = []
    segments: list[dict[str, float]] = []
    seg_ids: list[int] = []
    for _ in range(runs):
        grounds.append(ground_pass(ref, image, question, n_tokens))
        laps, seg_ids = segment_box_pass(ref, image, box, box_label)
        segments.append(laps)
    steps = n_tokens - 1
    g_laps = [g.laps for g in grounds]
    return {
        "vision_ms": _median(g_laps, "vision"),
        "prefill_ms": _median(g_laps, "prefill"),
        "decode_ms_per_token": round(statistics.median(g["decode"] / steps for g in g_laps), 3),
        "mask_ms": _median(segments, "mask"),
        "preprocess_ms": _median(g_laps, "preprocess"),
        "ground_total_ms": _median(g_laps, "total"),
        "segment_box_total_ms": _median(segments, "total"),
        "segment_box_prefill_ms": _median(segments, "prefill"),
        "tokens": fp32.tokens,
        "tokens_dtype": "fp32",
        "timed_tokens": grounds[-1].tokens,
        "greedy_min_logit_margin": round(min(fp32.margins), 4),
        "decode_steps": steps,
        "prompt_tokens": len(fp32.ids),
        "image_tokens": fp32.ids.count(ref.image_pad),
        "segment_box_prompt_tokens": len(seg_ids),
        "prompt_ids": fp32.ids,
        "grid": fp32.grid,
        "expression": expression.strip(),
        "runs": runs,
        **_environment(ref, dtype),
        "python": platform.python_version(),
        # every timed run, in order, for the spread behind the medians
        "samples_ms": {
            **{f"ground_{k}": [round(g[k], 3) for g in g_laps] for k in g_laps[0]},
            **{f"segment_box_{k}": [round(x[k], 3) for x in segments] for k in segments[0]},
        },
    }


def serve_rounds(
    ref: Reference,
    image: Path,
    *,
    expression: str,
    n_tokens: int,
    dtype: str,
    box: Sequence[float] | None,
    box_label: str,
    lines: Iterable[str],
    emit: Callable[[dict[str, Any]], None],
) -> None:
    """`--serve`: warm up, emit the fp32 tokens, then one timed round per 'round [T]' line until 'done'.

    A caller that times its own implementation between our rounds sees both under the same load, which
    on a shared machine matters more than any number of runs taken one after the other. A round decodes
    `n_tokens` (`ground_total_ms`, measured); with T given it adds `ground_answer_total_ms`, the same
    pass with T answer tokens (T - 1 decode steps at the round's mean step time), to match a caller
    whose grammar-constrained answer was T tokens long.
    """
    question = ground_question(ref.manifest, expression)
    fp32 = _fp32_tokens_and_warm_up(ref, image, question, n_tokens, dtype, box, box_label)
    emit(
        {
            "ready": True,
            "tokens": fp32.tokens,
            "greedy_min_logit_margin": round(min(fp32.margins), 4),
            "prompt_tokens": len(fp32.ids),
            "image_tokens": fp32.ids.count(ref.image_pad),
        }
    )
    steps = n_tokens - 1
    for line in lines:
        command, *rest = line.split()
        if command == "done":
            break
        if command != "round":
            continue
        answer = int(rest[0]) if rest and rest[0].isdigit() else n_tokens
        g = ground_pass(ref, image, question, n_tokens).laps
        seg, _ = segment_box_pass(ref, image, box, box_label)
        per_token = g["decode"] / steps
        emit(
            {
                "vision_ms": round(g["vision"], 3),
                "prefill_ms": round(g["prefill"], 3),
                "decode_ms_per_token": round(per_token, 3),
                "mask_ms": round(seg["mask"], 3),
                "ground_total_ms": round(g["total"], 3),
                "ground_answer_total_ms": round(g["total"] - g["decode"] + (answer - 1) * per_token, 3),
                "segment_box_total_ms": round(seg["total"], 3),
            }
        )
    emit(
        {
            "done": True,
            **_environment(ref, dtype),
        }
    )


def cmd_bench_reference(args: argparse.Namespace) -> int:
    if args.tokens < 2:
        raise ModelkitError("INVALID_INPUT", f"Expected --tokens >= 2 but received {args.tokens}")
    if args.runs < 1:
        raise ModelkitError("INVALID_INPUT", f"Expected --runs >= 1 but received {args.runs}")
    if args.threads is not None:
        if args.threads < 1:
            raise ModelkitError("INVALID_INPUT", f"Expected --threads >= 1 but received {args.threads}")
        torch.set_num_threads(args.threads)
    if not args.image.is_file():
        raise ModelkitError("INVALID_INPUT", f"image {args.image} does not exist")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ModelkitError("INVALID_INPUT", "--device cuda was asked for but torch sees no CUDA device")
    box = parse_box(args.box) if args.box else None
    label = args.box_label.strip()
    if not label:
        raise ModelkitError("INVALID_INPUT", "--box-label is empty")
    transformers.utils.logging.disable_progress_bar()  # stderr stays for errors
    t = time.perf_counter()
    ref, _ = load_reference(args.reference, args.pack, torch.device(args.device), args.attn)
    load_ms = (time.perf_counter() - t) * 1000.0
    if args.serve:

        def emit(obj: dict[str, Any]) -> None:
            print(json.dumps(obj), flush=True)

        serve_rounds(
            ref,
            args.image,
            expression=args.expression,
            n_tokens=args.tokens,
            dtype=args.dtype,
            box=box,
            box_label=label,
            lines=sys.stdin,
            emit=emit,
        )
        return 0
    result = run_benchmark(
        ref,
        args.image,
        expression=args.expression,
        n_tokens=args.tokens,
        runs=args.runs,
        dtype=args.dtype,
        box=box,
        box_label=label,
    )
    result["load_ms"] = round(load_ms, 1)
    print(json.dumps(result))
    return 0
