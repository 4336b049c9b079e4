"""Train the mask decoder on a frozen Qwen3-VL base from referring-segmentation data.

The base (an HF checkpoint folder) is never updated, so everything it contributes is computed once
per ref and cached (`FeatureCache`): the ViT taps `vit_ms`, the image-token states `mm_embeds`, the
T_seg states `query_hidden` at each box's last coordinate token of the teacher-forced canonical answer
(answers.grounding_answer_ids, exactly what the runtime's grammar emits), the resized image `hr_image`
and the stride-4 target masks. Training then runs only the mask decoder (docs/mask-decoder.md) with
`mask_losses`, time-boxed, with periodic checkpoints, `--resume`, and a validation mIoU computed at
the original image resolution as the runtime computes masks (src/runtime/mask-post.ts).

    modelkit train-mask-decoder --checkpoint DIR --data annotations.json --out mask_decoder.safetensors \
        [--minutes N] [--steps N] [--size tiny|small|paper] [--resume] [--device auto|cpu|cuda]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .answers import CHAT_TEMPLATE, GROUND_TEMPLATE, box_to_1000, chat_prompt_ids, grounding_answer_ids
from .defaults import BOX_JITTER, DEFAULT_TOKENIZER
from .errors import ModelkitError
from .mask_decoder import (
    MaskDecoder,
    MaskDecoderConfig,
    check_mask_decoder_matches,
    load_mask_decoder_checkpoint,
    mask_losses,
    save_mask_decoder_checkpoint,
)
from .preprocess import IMAGE_MEAN, IMAGE_STD, PreprocessedImage, preprocess_image
from .refdata import RefDataset, RefRecord, load_refdata
from .tokenizer import TextTokenizer

# Decoder sizes: "paper" is MaskDecoderConfig's default (~17 M at 4B widths); "small" trains well on a
# 2-core CPU in ~20 minutes on the synthetic shapes; "tiny" is for tests.
SIZES: dict[str, dict[str, int]] = {
    "tiny": {"dim": 32, "pixel_dim": 16, "num_layers": 2, "num_heads": 2, "ffn_dim": 64},
    "small": {"dim": 96, "pixel_dim": 48, "num_layers": 2, "num_heads": 4, "ffn_dim": 256},
    "paper": {},
}
STATE_SUFFIX = ".train.pt"  # optimizer state next to the checkpoint, for --resume
CACHE_VERSION = 2


# --------------------------------------------------------------------------------------------------
# the frozen base


def set_threads(n: int) -> None:
    if n < 1:
        raise ModelkitError("INVALID_INPUT", f"Expected --threads >= 1 but received {n}")
    torch.set_num_threads(n)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ModelkitError("INVALID_INPUT", "--device cuda was asked for but torch sees no CUDA device")
    if name not in ("cpu", "cuda"):
        raise ModelkitError("INVALID_INPUT", f"Expected --device auto, cpu or cuda but received {name!r}")
    return torch.device(name)


@dataclass
class EncodedImage:
    """What the frozen base computes from the image alone (independent of the question)."""

    prep: PreprocessedImage
    grid: torch.Tensor  # [1, 3] i64 (1, gh, gw)
    vision: Any  # the vision tower's output (pooler_output + deepstack_features), reused per prompt
    vit_ms: torch.Tensor  # [4, P, Cv] f32, merge-window order

    @property
    def num_merged(self) -> int:
        _, gh, gw = (int(v) for v in self.grid[0])
        return (gh // 2) * (gw // 2)


class SparseRowsHead(torch.nn.Module):
    """lm_head for a vocabulary whose unused rows are exactly zero (the demo base keeps only the
    token ids its world uses): their logits are exactly 0, so only the other rows are multiplied.
    Same logits as the full head up to summation order; ~20x less weight traffic per token."""

    def __init__(self, weight: torch.Tensor, rows: torch.Tensor) -> None:
        super().__init__()
        self.vocab = int(weight.shape[0])
        self.register_buffer("rows", rows)  # [K] i64
        self.register_buffer("weight", weight[rows].clone())  # [K, H]

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        small = torch.matmul(hidden, self.weight.t())  # [..., K]
        out = small.new_zeros((*hidden.shape[:-1], self.vocab))  # [..., V]
        return out.index_copy_(-1, self.rows, small)


def sparse_rows_head(head: torch.nn.Module) -> torch.nn.Module:
    """SparseRowsHead when most rows of a bias-free head are zero, else the head unchanged."""
    weight = getattr(head, "weight", None)
    if weight is None or getattr(head, "bias", None) is not None:
        return head
    rows = torch.nonzero(weight.detach().abs().amax(dim=1) > 0).reshape(-1)
    if rows.numel() > weight.shape[0] // 2:
        return head
    return SparseRowsHead(weight.detach(), rows)


class FrozenBase:
    """A Qwen3-VL checkpoint used read-only: vision once per image, then any number of prompts."""

    def __init__(
        self,
        checkpoint: Path,
        tokenizer_dir: Path | None,
        min_pixels: int,
        max_pixels: int,
        device: torch.device,
        model: Any = None,
    ) -> None:
        from .hf import load_checkpoint

        self.device = device
        self.min_pixels, self.max_pixels = min_pixels, max_pixels
        if model is None:
            model = load_checkpoint(Path(checkpoint))
        # bf16 on a GPU for the large bases (features are cast back to f32); f32 on the CPU.
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        self.model = model.to(device=device, dtype=dtype).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        folder = tokenizer_dir
        if folder is None:
            folder = (
                Path(checkpoint) if (Path(checkpoint) / "tokenizer.json").is_file() else DEFAULT_TOKENIZER
            )
        self.tokenizer = TextTokenizer(folder)
        cfg = self.model.config
        self.image_pad = int(cfg.image_token_id)
        self.vision_hidden = int(cfg.vision_config.hidden_size)
        self.text_hidden = int(cfg.text_config.hidden_size)
        self.taps = [*cfg.vision_config.deepstack_visual_indexes, cfg.vision_config.depth - 1]
        self.stop = self._stop_tokens()
        self.model.lm_head = sparse_rows_head(self.model.lm_head)

    def _stop_tokens(self) -> list[int]:
        ids = [self.tokenizer.encode(t) for t in ("<|im_end|>", "<|endoftext|>")]
        return [i[0] for i in ids if len(i) == 1]

    @torch.no_grad()
    def encode_image(self, img: Image.Image) -> EncodedImage:
        prep = preprocess_image(img, self.min_pixels, self.max_pixels)
        pixel_values = torch.from_numpy(prep.pixel_values).to(self.device, self.model.dtype)  # [P, 1536]
        grid = torch.from_numpy(prep.image_grid_thw).to(self.device)  # [1, 3]
        visual = self.model.model.visual
        captured: dict[int, torch.Tensor] = {}
        hooks = [
            visual.blocks[i].register_forward_hook(
                lambda _m, _inp, out, i=i: captured.__setitem__(i, out[0] if isinstance(out, tuple) else out)
            )
            for i in self.taps
        ]
        try:
            vision = self.model.model.get_image_features(pixel_values, grid, return_dict=True)
        finally:
            for h in hooks:
                h.remove()
        vit_ms = torch.stack([captured[i] for i in self.taps]).float()  # [4, P, Cv]
        return EncodedImage(prep=prep, grid=grid, vision=vision, vit_ms=vit_ms)

    def prompt_ids(self, question: str, num_merged: int) -> list[int]:
        """Chat prompt ids as the runtime builds them (answers.chat_prompt_ids)."""
        return chat_prompt_ids(self.tokenizer, CHAT_TEMPLATE, question, num_merged, self.image_pad)

    @torch.no_grad()
    def hidden_states(self, image: EncodedImage, sequences: Sequence[Sequence[int]]) -> list[torch.Tensor]:
        """Final-norm states [S_i, H] f32 of each token sequence (same image), one batched pass.

        Sequences are right-padded; with causal attention the padding never reaches a real row.
        The vision tower's output is reused (`mm_encoder_outputs`), not recomputed per sequence.
        """
        n = len(sequences)
        longest = max(len(s) for s in sequences)
        ids = torch.zeros(n, longest, dtype=torch.long)
        mask = torch.zeros(n, longest, dtype=torch.long)
        for r, s in enumerate(sequences):
            ids[r, : len(s)] = torch.tensor(list(s), dtype=torch.long)
            mask[r, : len(s)] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        mm_types = (ids == self.image_pad).to(torch.int32)  # [n, S]
        vision = SimpleNamespace(
            pooler_output=tuple(image.vision.pooler_output) * n,
            deepstack_features=[tuple(f) * n for f in image.vision.deepstack_features],
        )
        out = self.model.model(
            input_ids=ids,
            attention_mask=mask,
            mm_token_type_ids=mm_types,
            image_grid_thw=image.grid.repeat(n, 1),
            mm_encoder_outputs={"image": vision},
        )
        hidden = out.last_hidden_state.float()  # [n, S, H]
        return [hidden[r, : len(s)] for r, s in enumerate(sequences)]


# --------------------------------------------------------------------------------------------------
# cached features


def ref_label(ds: RefDataset, ann_id: int) -> str:
    """The label the base is taught to write for one box: "{colour} {shape}" for the synthetic
    shapes, the category name for user data."""
    ann = ds.annotations[ann_id]
    colour, shape = ann.attributes.get("colour"), ann.attributes.get("shape")
    if colour and shape:
        return f"{colour} {shape}"
    return ann.category


def sorted_targets(ds: RefDataset, ref: RefRecord) -> list[int]:
    """The ref's annotation ids left to right (then top to bottom), the order of the answer's boxes."""

    def key(a: int) -> tuple[float, float]:
        x, y, _, _ = ds.annotations[a].bbox
        return (x, y)

    return sorted(ref.ann_ids, key=key)


def _xyxy(bbox: Sequence[float]) -> list[float]:
    x, y, w, h = bbox
    return [x, y, x + w, y + h]


def stride4_targets(masks: np.ndarray, grid_hw: tuple[int, int]) -> torch.Tensor:
    """[K, H0, W0] bool -> [K, 4gh, 4gw] bool: area fraction over each stride-4 cell of the resized
    image (which squashes the original), kept where >= 0.5."""
    gh, gw = grid_hw
    t = torch.from_numpy(masks.astype(np.float32))[:, None]  # [K, 1, H0, W0]
    frac = F.adaptive_avg_pool2d(t, (4 * gh, 4 * gw))[:, 0]  # [K, 4gh, 4gw]
    return frac >= 0.5


def hr_to_u8(hr: np.ndarray) -> np.ndarray:
    """hr_image [1, 3, Hr, Wr] f32 -> uint8 pixels (exact: it was made from uint8 by x/255 mean/std)."""
    mean = np.asarray(IMAGE_MEAN, dtype=np.float32)[:, None, None]
    std = np.asarray(IMAGE_STD, dtype=np.float32)[:, None, None]
    return np.clip(np.rint((hr[0] * std + mean) * 255.0), 0, 255).astype(np.uint8)  # [3, Hr, Wr]


def u8_to_hr(u8: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGE_MEAN, dtype=torch.float32)[:, None, None]
    std = torch.tensor(IMAGE_STD, dtype=torch.float32)[:, None, None]
    return ((u8.float() / 255.0 - mean) / std)[None]  # [1, 3, Hr, Wr]


def _compact(t: torch.Tensor) -> torch.Tensor:
    """fp16 when the values fit (halves the cache), f32 otherwise."""
    h = t.detach().cpu().to(torch.float16)
    return h if bool(torch.isfinite(h).all()) else t.detach().cpu().float()


@dataclass
class RefSample:
    ref_id: int
    kind: str
    ann_ids: list[int]  # sorted left to right, the answer's box order
    query_hidden: torch.Tensor  # [K, H] T_seg per box of the teacher-forced answer (ground)
    box_query_hidden: torch.Tensor  # [K, H] T_seg with each box given alone (segment with a box)
    boxes: torch.Tensor  # [K, 4] f32 GT boxes x1, y1, x2, y2 normalised by the original size
    targets: torch.Tensor  # [K, 4gh, 4gw] bool


@dataclass
class ImageSample:
    image_id: int
    vit_ms: torch.Tensor  # [4, P, Cv] f16/f32
    mm_embeds: torch.Tensor  # [M, H] f16/f32
    hr_u8: torch.Tensor  # [3, Hr, Wr] uint8
    grid: tuple[int, int]  # (gh, gw)
    original_hw: tuple[int, int]
    refs: list[RefSample] = field(default_factory=list)

    def tensors(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(vit_ms [4, P, Cv], mm_embeds [M, H], hr_image [1, 3, Hr, Wr]) f32 on `device`."""
        return (
            self.vit_ms.to(device, torch.float32),
            self.mm_embeds.to(device, torch.float32),
            u8_to_hr(self.hr_u8).to(device),
        )


def extract_image(base: FrozenBase, ds: RefDataset, image_id: int, refs: Sequence[RefRecord]) -> ImageSample:
    """One frozen pass per ref (batched per image) -> everything the mask decoder needs for training."""
    enc = base.encode_image(ds.load_image(image_id))
    _, gh, gw = (int(v) for v in enc.grid[0])
    h0, w0 = enc.prep.original_hw
    sequences: list[list[int]] = []
    rows: list[list[int]] = []
    orders: list[list[int]] = []
    box_seq: list[list[int]] = []  # per ref: indices into box_seq_extra of targets 2, 3, ...
    box_seq_extra: list[list[int]] = []  # box-prompt prefixes of the targets after the first
    for ref in refs:
        order = sorted_targets(ds, ref)
        boxes1000 = [box_to_1000(_xyxy(ds.annotations[a].bbox), w0, h0) for a in order]
        answer = grounding_answer_ids(base.tokenizer, boxes1000, [ref_label(ds, a) for a in order])
        prompt = base.prompt_ids(GROUND_TEMPLATE.replace("{expression}", ref.expression), enc.num_merged)
        sequences.append(prompt + answer.ids)
        rows.append([len(prompt) + i for i in answer.last_coordinate])  # T_seg rows
        orders.append(order)
        # `segment` with a box (local-engine.ts): the prefix up to that box's 4th coordinate as the
        # first box. For the first target it is a prefix of the answer above (same causal states).
        extra = []
        for b in boxes1000[1:]:
            prefix = grounding_answer_ids(base.tokenizer, [b], [ref.expression], close=False)
            extra.append(len(box_seq_extra))
            box_seq_extra.append(prompt + prefix.ids)
        box_seq.append(extra)
    first_rows = [r[0] for r in rows]
    hidden = base.hidden_states(enc, sequences + box_seq_extra) if sequences else []
    prompt0 = base.prompt_ids("", enc.num_merged)
    pad_rows = [i for i, t in enumerate(prompt0) if t == base.image_pad]
    # Causal attention: the image rows do not depend on the question, so any sequence gives T_mm.
    mm = hidden[0][pad_rows] if hidden else base.hidden_states(enc, [prompt0])[0][pad_rows]  # [M, H]
    sample = ImageSample(
        image_id=image_id,
        vit_ms=_compact(enc.vit_ms),
        mm_embeds=_compact(mm),
        hr_u8=torch.from_numpy(hr_to_u8(enc.prep.hr_image)),
        grid=(gh, gw),
        original_hw=(h0, w0),
    )
    for n, (ref, r, order) in enumerate(zip(refs, rows, orders, strict=True)):
        hid = hidden[n]
        # box-prompt T_seg: the first target's row of the answer, the last row of the other prefixes
        box_query = [hid[first_rows[n]]] + [hidden[len(sequences) + i][-1] for i in box_seq[n]]
        masks = np.stack([ds.mask_for(a) for a in order])  # [K, H0, W0]
        boxes = np.asarray([ds.annotations[a].bbox for a in order], dtype=np.float64)  # x, y, w, h
        norm = np.stack(
            [
                boxes[:, 0] / w0,
                boxes[:, 1] / h0,
                (boxes[:, 0] + boxes[:, 2]) / w0,
                (boxes[:, 1] + boxes[:, 3]) / h0,
            ],
            axis=1,
        )
        sample.refs.append(
            RefSample(
                ref_id=ref.ref_id,
                kind=ref.kind,
                ann_ids=order,
                query_hidden=_compact(hid[r]),
                box_query_hidden=_compact(torch.stack(box_query)),
                boxes=torch.from_numpy(norm.astype(np.float32)),
                targets=stride4_targets(masks, (gh, gw)),
            )
        )
    return sample


class FeatureCache:
    """Per-image feature files in a folder (`<image_id>.pt`), kept in memory once loaded.

    `meta.json` records what the features were computed from; a folder made for another checkpoint,
    data file or resize setting is rebuilt rather than silently reused.
    """

    def __init__(self, folder: Path, meta: dict[str, Any], in_memory: bool = True) -> None:
        self.folder = Path(folder)
        self.meta = meta
        self.in_memory = in_memory
        self.memory: dict[int, ImageSample] = {}
        self.folder.mkdir(parents=True, exist_ok=True)
        meta_path = self.folder / "meta.json"
        old = json.loads(meta_path.read_text()) if meta_path.is_file() else None
        if old != meta:
            for f in self.folder.glob("*.pt"):
                f.unlink()
            meta_path.write_text(json.dumps(meta, indent=2) + "\n")

    def path(self, image_id: int) -> Path:
        return self.folder / f"{image_id}.pt"

    def has(self, image_id: int) -> bool:
        return image_id in self.memory or self.path(image_id).is_file()

    def put(self, sample: ImageSample) -> None:
        tmp = self.path(sample.image_id).with_suffix(".partial")
        torch.save(sample.__dict__ | {"refs": [r.__dict__ for r in sample.refs]}, tmp)
        os.replace(tmp, self.path(sample.image_id))
        if self.in_memory:
            self.memory[sample.image_id] = sample

    def get(self, image_id: int) -> ImageSample:
        hit = self.memory.get(image_id)
        if hit is not None:
            return hit
        raw = torch.load(self.path(image_id), weights_only=False)
        sample = ImageSample(**{**raw, "refs": [RefSample(**r) for r in raw["refs"]]})
        if self.in_memory:
            self.memory[image_id] = sample
        return sample


def build_features(
    base: FrozenBase,
    ds: RefDataset,
    image_ids: Sequence[int],
    cache: FeatureCache,
    log: Any = print,
) -> list[int]:
    """Extract (or load) the features of every image with at least one present-target ref."""
    refs_by_image: dict[int, list[RefRecord]] = {}
    for ref in ds.refs:
        if ref.ann_ids:
            refs_by_image.setdefault(ref.image_id, []).append(ref)
    done: list[int] = []
    todo = [i for i in image_ids if i in refs_by_image]
    start = time.monotonic()
    for n, image_id in enumerate(todo):
        if not cache.has(image_id):
            cache.put(extract_image(base, ds, image_id, refs_by_image[image_id]))
        else:
            cache.get(image_id)
        done.append(image_id)
        if (n + 1) % 50 == 0 or n + 1 == len(todo):
            rate = (time.monotonic() - start) / (n + 1)
            log(f"features: {n + 1}/{len(todo)} images ({rate:.2f} s/image)")
    return done


# --------------------------------------------------------------------------------------------------
# masks at the original resolution (as src/runtime/mask-post.ts)


def logits_to_masks(
    logits: torch.Tensor, resized_hw: tuple[int, int], original_hw: tuple[int, int]
) -> torch.Tensor:
    """[Q, 1, 4gh, 4gw] stride-4 logits -> [Q, H0, W0] bool: bilinear (half-pixel) to the resized
    image, then to the original size, then logit > 0 (mask-post.ts's maskFromLogits)."""
    x = F.interpolate(logits.float(), size=resized_hw, mode="bilinear", align_corners=False)
    x = F.interpolate(x, size=original_hw, mode="bilinear", align_corners=False)
    return x[:, 0] > 0


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of two bool masks; two empty masks count as 1."""
    union = int(np.logical_or(a, b).sum())
    return 1.0 if union == 0 else int(np.logical_and(a, b).sum()) / union


def boxes_1000(boxes: torch.Tensor) -> torch.Tensor:
    """Normalised boxes -> the 0..1000 grid and back, as the runtime feeds them (box1000 / 1000)."""
    return torch.clamp(torch.floor(boxes * 1000.0 + 0.5), 0, 1000) / 1000.0


def run_mask_decoder(
    mask_decoder: MaskDecoder,
    image: ImageSample,
    ref: RefSample,
    boxes: torch.Tensor,
    device: torch.device,
    box_prompt: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The mask decoder on one ref: T_seg of the ground answer, or (box_prompt) of each box given alone."""
    vit_ms, mm, hr = image.tensors(device)
    boxes = boxes.to(device)  # [K, 4]
    query = ref.box_query_hidden if box_prompt else ref.query_hidden  # [K, H]
    return mask_decoder(
        vit_ms,
        mm,
        query.to(device, torch.float32),
        boxes,
        boxes[:, None, :],  # gate boxes [K, 1, 4]
        torch.ones(boxes.shape[0], 1, device=device),
        hr,
    )


@torch.no_grad()
def validate(
    mask_decoder: MaskDecoder,
    ds: RefDataset,
    cache: FeatureCache,
    image_ids: Sequence[int],
    device: torch.device,
) -> dict[str, float]:
    """Mean IoU per target at the original resolution as `segment` with the GT box computes it
    (box on the 0..1000 grid, box-prompt T_seg, mask-post.ts resizing)."""
    mask_decoder.eval()
    ious: list[float] = []
    for image_id in image_ids:
        image = cache.get(image_id)
        resized = (image.grid[0] * 16, image.grid[1] * 16)
        for ref in image.refs:
            logits, _, _ = run_mask_decoder(
                mask_decoder, image, ref, boxes_1000(ref.boxes), device, box_prompt=True
            )
            pred = logits_to_masks(logits.cpu(), resized, image.original_hw).numpy()
            for k, a in enumerate(ref.ann_ids):
                ious.append(mask_iou(pred[k], ds.mask_for(a)))
    mask_decoder.train()
    arr = np.asarray(ious) if ious else np.zeros(1)
    return {"miou": float(arr.mean()), "p50": float((arr >= 0.5).mean()), "targets": len(ious)}


# --------------------------------------------------------------------------------------------------
# training


def jitter_boxes(boxes: torch.Tensor, scale: float, gen: torch.Generator) -> torch.Tensor:
    """Each edge moved by N(0, scale * side), clamped to the image, kept at least 1/1000 wide."""
    w = (boxes[:, 2] - boxes[:, 0]).clamp(min=1e-3)
    h = (boxes[:, 3] - boxes[:, 1]).clamp(min=1e-3)
    noise = torch.randn(boxes.shape, generator=gen) * scale  # [K, 4]
    out = boxes + noise * torch.stack([w, h, w, h], dim=1)
    out = out.clamp(0.0, 1.0)
    x1 = torch.minimum(out[:, 0], out[:, 2])
    x2 = torch.maximum(torch.maximum(out[:, 0], out[:, 2]), x1 + 1e-3)
    y1 = torch.minimum(out[:, 1], out[:, 3])
    y2 = torch.maximum(torch.maximum(out[:, 1], out[:, 3]), y1 + 1e-3)
    return boxes_1000(torch.stack([x1, y1, x2, y2], dim=1))


@dataclass
class TrainSettings:
    minutes: float | None = None
    steps: int | None = None
    lr: float = 3e-4
    weight_decay: float = 0.01
    warmup: int = 200
    jitter: float = BOX_JITTER
    val_every: int = 500
    save_every_s: float = 120.0
    seed: int = 0
    grad_clip: float = 1.0
    # Share of multi-target steps that use the box-prompt T_seg (segment with a box) instead of the
    # ground answer's; for single-target refs the two are the same state.
    box_prompt_share: float = 0.3


def _lr_factor(step: int, progress: float, warmup: int) -> float:
    """Linear warm-up, then cosine to 5 % over the run (progress in [0, 1], by steps or by time)."""
    w = min(1.0, (step + 1) / max(1, warmup))
    return w * (0.05 + 0.95 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress))))


@dataclass
class Validation:
    """Where validation reads GT masks (`ds`) and features (`cache`), and which images."""

    ds: RefDataset
    cache: FeatureCache
    image_ids: list[int]


def train(
    mask_decoder: MaskDecoder,
    cache: FeatureCache,
    train_ids: Sequence[int],
    val: Validation | None,
    out: Path,
    settings: TrainSettings,
    device: torch.device,
    resume_state: dict[str, Any] | None = None,
    log: Any = print,
) -> dict[str, Any]:
    """Time- and/or step-boxed AdamW on mask_losses; returns the history (loss, val mIoU)."""
    if settings.minutes is None and settings.steps is None:
        raise ModelkitError("INVALID_INPUT", "give --minutes or --steps (or both)")
    mask_decoder.to(device).train()
    opt = torch.optim.AdamW(mask_decoder.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    step, elapsed = 0, 0.0
    history: dict[str, Any] = {"loss": [], "val": []}
    if resume_state is not None:
        opt.load_state_dict(resume_state["optimizer"])
        step, elapsed, history = resume_state["step"], resume_state["elapsed"], resume_state["history"]
    gen = torch.Generator().manual_seed(settings.seed * 1_000_003 + step)
    rng = random.Random(settings.seed * 7919 + step)
    pairs = [(i, r) for i in train_ids for r in range(len(cache.get(i).refs))]
    if not pairs:
        raise ModelkitError("DATA_INVALID", "no training ref has a target (every ref is absent)")
    budget_s = None if settings.minutes is None else settings.minutes * 60.0
    t0 = time.monotonic() - elapsed
    last_save = time.monotonic()
    running: list[float] = []

    def progress() -> float:
        p = 0.0
        if settings.steps is not None:
            p = max(p, step / settings.steps)
        if budget_s is not None:
            p = max(p, (time.monotonic() - t0) / budget_s)
        return p

    def save() -> None:
        save_mask_decoder_checkpoint(mask_decoder, out)
        state = {
            "optimizer": opt.state_dict(),
            "step": step,
            "elapsed": time.monotonic() - t0,
            "history": history,
        }
        torch.save(state, str(out) + STATE_SUFFIX)

    def run_val() -> None:
        if val is None or not val.image_ids:
            return
        v = validate(mask_decoder, val.ds, val.cache, val.image_ids, device)
        v.update(step=step, minutes=round((time.monotonic() - t0) / 60.0, 2))
        history["val"].append(v)
        log(
            f"val step {step} ({v['minutes']} min): mIoU {v['miou']:.4f}  P@0.5 {v['p50']:.3f}"
            f"  ({v['targets']} targets)"
        )

    if step == 0:
        run_val()
    while progress() < 1.0:
        image_id, r = pairs[rng.randrange(len(pairs))]
        image = cache.get(image_id)
        ref = image.refs[r]
        for g in opt.param_groups:
            g["lr"] = settings.lr * _lr_factor(step, progress(), settings.warmup)
        boxes = jitter_boxes(ref.boxes, settings.jitter, gen)
        box_prompt = rng.random() < settings.box_prompt_share and ref.box_query_hidden.shape[0] > 1
        m2, m1, iou = run_mask_decoder(mask_decoder, image, ref, boxes, device, box_prompt=box_prompt)
        losses = mask_losses(m2, m1, iou, ref.targets.to(device, torch.float32))
        opt.zero_grad(set_to_none=True)
        losses["loss"].backward()
        torch.nn.utils.clip_grad_norm_(mask_decoder.parameters(), settings.grad_clip)
        opt.step()
        step += 1
        running.append(float(losses["loss"].detach()))
        if step % 50 == 0:
            mean = sum(running) / len(running)
            history["loss"].append({"step": step, "loss": mean, "minutes": (time.monotonic() - t0) / 60.0})
            log(
                f"step {step}: loss {mean:.4f}  iou {float(losses['iou']):.3f}"
                f"  lr {opt.param_groups[0]['lr']:.2e}"
            )
            running.clear()
        if settings.val_every and step % settings.val_every == 0:
            run_val()
        if time.monotonic() - last_save > settings.save_every_s:
            save()
            last_save = time.monotonic()
    if not history["val"] or history["val"][-1]["step"] != step:
        run_val()
    save()
    return history


def mask_decoder_config(base: FrozenBase, size: str, overrides: dict[str, int | None]) -> MaskDecoderConfig:
    if size not in SIZES:
        raise ModelkitError("INVALID_INPUT", f"Expected --size in {sorted(SIZES)} but received {size!r}")
    values: dict[str, Any] = dict(SIZES[size])
    values.update({k: v for k, v in overrides.items() if v is not None})
    return MaskDecoderConfig(vision_hidden=base.vision_hidden, text_hidden=base.text_hidden, **values)


def split_images(ds: RefDataset, fraction: float, limit: int, seed: int) -> tuple[list[int], list[int]]:
    """Hold out whole images (never refs of a training image) for validation."""
    ids = sorted(ds.images)
    random.Random(seed).shuffle(ids)
    n_val = min(limit, int(round(len(ids) * fraction))) if len(ids) > 1 else 0
    return ids[n_val:], ids[:n_val]


def cmd_train_mask_decoder(args: argparse.Namespace) -> int:
    from .hf import read_config

    device = pick_device(args.device)
    set_threads(args.threads)
    read_config(args.checkpoint)
    ds = load_refdata(args.data)
    val_ds = load_refdata(args.val_data) if args.val_data else None
    if args.minutes is None and args.steps is None:
        raise ModelkitError("INVALID_INPUT", "give --minutes or --steps (or both)")
    resume_state = None
    if args.resume:
        state_path = Path(str(args.out) + STATE_SUFFIX)
        if not (args.out.is_file() and state_path.is_file()):
            raise ModelkitError("INVALID_INPUT", f"--resume needs {args.out} and {state_path}")
        resume_state = torch.load(state_path, weights_only=False)
    torch.manual_seed(args.seed)
    base = FrozenBase(args.checkpoint, args.tokenizer, args.min_pixels, args.max_pixels, device)
    if args.resume:
        mask_decoder = load_mask_decoder_checkpoint(args.out)
        check_mask_decoder_matches(mask_decoder.config, base.vision_hidden, base.text_hidden)
    else:
        overrides = {
            "dim": args.dim,
            "pixel_dim": args.pixel_dim,
            "num_layers": args.layers,
            "num_heads": args.heads,
            "ffn_dim": args.ffn_dim,
        }
        mask_decoder = MaskDecoder(mask_decoder_config(base, args.size, overrides))
    n_params = sum(p.numel() for p in mask_decoder.parameters())
    print(f"mask decoder: {n_params:,} parameters {json.dumps(mask_decoder.config.to_dict())}")

    meta = {
        "version": CACHE_VERSION,
        "checkpoint": str(args.checkpoint.resolve()),
        "data": str(Path(args.data).resolve()),
        "min_pixels": args.min_pixels,
        "max_pixels": args.max_pixels,
    }
    cache = FeatureCache(args.cache or Path(str(args.out) + ".features"), meta)
    if val_ds is None:
        train_ids, val_ids = split_images(ds, args.val_fraction, args.val_images, args.seed)
        val_source, val_cache = ds, cache
    else:
        train_ids, val_ids = sorted(ds.images), sorted(val_ds.images)[: args.val_images]
        val_source = val_ds
        val_cache = FeatureCache(
            Path(str(cache.folder) + "-val"), {**meta, "data": str(Path(args.val_data).resolve())}
        )
    if args.max_images is not None:
        train_ids = train_ids[: args.max_images]
    t = time.monotonic()
    train_ids = build_features(base, ds, train_ids, cache)
    val_ids = build_features(base, val_source, val_ids, val_cache)
    print(
        f"features ready in {time.monotonic() - t:.0f} s: {len(train_ids)} train, {len(val_ids)} val images"
    )
    del base  # the frozen model is not needed any more
    settings = TrainSettings(
        minutes=args.minutes,
        steps=args.steps,
        lr=args.lr,
        jitter=args.jitter,
        val_every=args.val_every,
        save_every_s=args.save_every,
        seed=args.seed,
    )
    val = Validation(val_source, val_cache, val_ids)
    history = train(mask_decoder, cache, train_ids, val, args.out, settings, device, resume_state)
    last = history["val"][-1] if history["val"] else None
    print(f"wrote {args.out}" + (f" (val mIoU {last['miou']:.4f})" if last else ""))
    return 0
