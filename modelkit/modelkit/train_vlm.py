"""Train a tiny Qwen3-VL (transformers' own model, real tokenizer and vocabulary) on referring data.

Data: any annotation file in docs/data-format.md (synthetic shapes or converted RefCOCO), or a stream of
fresh synthetic scenes rendered by data-loader workers (`--stream-seed`; with `--device cuda` this is
how the demo pack was trained, modelkit/scripts/train_demo_gpu.sh). Tasks:
- grounding: CHAT_TEMPLATE + GROUND_TEMPLATE, answer = `grounding_answer_ids` (the exact ids the
  runtime's grammar emits) + <|im_end|>; referents sorted left to right; `[]` for absent targets;
- "every shape": training-only grounding of every object of the image (the list-everything stage);
- descriptions (describe_mode "crop"): the crop `crop_box(box)` as the image, DESCRIBE_CROP_TEMPLATE.

Restricted softmax. Only K "world" token ids ever occur, so the model trains with a K-row embedding
(tied lm_head) and ONE extra constant logit log(V - K) standing for the V - K other tokens. On export
those rows are exactly zero, so their logits are exactly 0 and the training loss is the true
full-vocabulary cross-entropy of the exported model (`export_full_model`).

Auxiliary training-only heads (not exported), on the final-norm hidden states: per visual token
(objectness, colour, shape, size, box of the object whose centre is in that token's cell), a pointer
from the token before each box's first coordinate digit to the visual token holding that box's centre,
and a present/absent classifier at the answer's first decision.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import random
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

from . import answers
from .defaults import DEFAULT_TOKENIZER, DEMO_MAX_PIXELS, DEMO_MIN_PIXELS
from .evaluate import box_iou
from .hf import small_config
from .preprocess import IMAGE_MEAN, IMAGE_STD, MERGE_SIZE, PATCH_SIZE, TEMPORAL_PATCH_SIZE
from .refdata import RefDataset, load_refdata

VOCAB_SIZE = 151936
SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
EVERY_SHAPE = "every shape"
DIGITS = tuple("0123456789")
# Per coordinate, the first three characters of str(value in 0..1000): a digit or 10 = "none".
DIGIT_SLOTS = 3


# --------------------------------------------------------------------------------------------------
# Config and tokenizer


def shapes_config(text_hidden: int = 128, vision_hidden: int = 128, text_layers: int = 4) -> Qwen3VLConfig:
    """The demo model: 4 ViT blocks (4 heads, MLP 2x), `text_layers` text layers (MLP 3x)."""
    return small_config(
        text_hidden=text_hidden,
        text_mlp=3 * text_hidden,
        text_layers=text_layers,
        vision_depth=4,
        vision_hidden=vision_hidden,
        vision_mlp=2 * vision_hidden,
        vision_heads=4,
    )


class Tok:
    """The real Qwen tokenizer (tokenizer.json) with the `encode(text) -> ids` answers.py needs."""

    def __init__(self, folder: Path) -> None:
        from tokenizers import Tokenizer

        self.folder = folder
        self.tk = Tokenizer.from_file(str(folder / "tokenizer.json"))

    def encode(self, text: str) -> list[int]:
        return list(self.tk.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: Sequence[int]) -> str:
        return str(self.tk.decode(list(ids), skip_special_tokens=False))

    def special(self, name: str) -> int:
        tid = self.tk.token_to_id(name)
        if tid is None:
            raise ValueError(f"{name} is not in the vocabulary")
        return int(tid)


# --------------------------------------------------------------------------------------------------
# Images


@dataclass
class Pixels:
    resized: np.ndarray | None  # [Hr, Wr, 3] uint8; None: drawn later on the device (DeviceData)
    grid: tuple[int, int]  # (gh, gw) patches


def resize_for_model(img: Image.Image, min_pixels: int, max_pixels: int) -> Pixels:
    """smart_resize + PIL bicubic on uint8: the resize step of preprocess.preprocess_image."""
    hr, wr = smart_resize(
        img.height, img.width, factor=PATCH_SIZE * MERGE_SIZE, min_pixels=min_pixels, max_pixels=max_pixels
    )
    arr = np.asarray(img.resize((wr, hr), Image.Resampling.BICUBIC), dtype=np.uint8)  # [Hr, Wr, 3]
    return Pixels(arr, (hr // PATCH_SIZE, wr // PATCH_SIZE))


def patch_bytes(px: Pixels) -> np.ndarray:
    """[Hr, Wr, 3] uint8 -> [gh*gw, 3, 16, 16] uint8 patches in merge-window order (as the processor).

    Data workers ship these (1/8 of the float pixel values) and the model's device normalises them."""
    assert px.resized is not None
    gh, gw = px.grid
    p, m = PATCH_SIZE, MERGE_SIZE
    x = px.resized.transpose(2, 0, 1).reshape(3, gh // m, m, p, gw // m, m, p)  # (C, bh, mh, py, bw, mw, px)
    x = x.transpose(1, 4, 2, 5, 0, 3, 6)  # (bh, bw, mh, mw, C, py, px)
    return np.ascontiguousarray(x.reshape(gh * gw, 3, p, p))


def values_from_bytes(u8: torch.Tensor) -> torch.Tensor:
    """[P, 3, 16, 16] uint8 -> pixel_values [P, 1536] f32: normalised, the frame repeated in time."""
    mean = torch.tensor(IMAGE_MEAN, dtype=torch.float32, device=u8.device).view(1, 3, 1, 1, 1)
    std = torch.tensor(IMAGE_STD, dtype=torch.float32, device=u8.device).view(1, 3, 1, 1, 1)
    x = ((u8.to(torch.float32) / 255.0)[:, :, None] - mean) / std  # [P, C, 1, py, px]
    return x.expand(-1, -1, TEMPORAL_PATCH_SIZE, -1, -1).reshape(u8.shape[0], -1)


def patchify(px: Pixels) -> np.ndarray:
    """[Hr, Wr, 3] uint8 -> pixel_values [gh*gw, 1536] f32 in merge-window order (as the processor)."""
    return values_from_bytes(torch.from_numpy(patch_bytes(px))).numpy()


# --------------------------------------------------------------------------------------------------
# Samples


@dataclass
class Target:
    box: tuple[float, float, float, float]  # pixel x0, y0, x1, y1 in the sample's image
    attrs: dict[str, str]


@dataclass
class Sample:
    image_id: int
    crop: tuple[int, int, int, int] | None  # crop of the image (descriptions), else whole image
    question: str
    answer_ids: list[int]
    kind: str  # ground kinds, "every", "describe"
    targets: list[Target] = field(default_factory=list)  # grounding referents, answer order
    box_first_digit: list[int] = field(default_factory=list)  # answer index of each box's first digit
    # Per box, the answer positions [start, end] (inclusive) that write it: from the one before its
    # first digit through its label. Their attention is pointed at the box's visual token.
    box_spans: list[tuple[int, int]] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)  # per answer token
    n_objects: int = 0
    text: str = ""  # description text (eval)


def quantise(b1000: Sequence[int], step: int) -> list[int]:
    """Coordinates rounded to multiples of `step` (training answers: step 10 spares the model an
    unpredictable last digit at a cost of <= 0.5% of the image side per edge)."""
    return [min(1000, step * answers.round_half_up(v / step)) for v in b1000]


def _label(attrs: dict[str, str], category: str) -> str:
    if "colour" in attrs and "shape" in attrs:
        return f"{attrs['colour']} {attrs['shape']}"
    return category


class SampleBuilder:
    def __init__(self, tok: Tok, coord_step: int = 1) -> None:
        self.tok = tok
        self.coord_step = coord_step
        self.im_end = tok.special("<|im_end|>")
        self.digit_ids = {tok.encode(d)[0] for d in DIGITS}
        self.decision_ids = {tok.encode(c)[0] for c in ("{", "]", ",")}
        self.n_label_prefix = len(tok.encode(', "label": "'))

    def ground(
        self, ds: RefDataset, image_id: int, expression: str, ann_ids: Sequence[int], kind: str
    ) -> Sample:
        img = ds.images[image_id]
        anns = [ds.annotations[a] for a in ann_ids]
        boxes = [(a.bbox[0], a.bbox[1], a.bbox[0] + a.bbox[2], a.bbox[1] + a.bbox[3]) for a in anns]
        order = sorted(range(len(anns)), key=lambda i: (boxes[i][0], boxes[i][1]))
        b1000 = [
            quantise(answers.box_to_1000(boxes[i], img.width, img.height), self.coord_step) for i in order
        ]
        labels = [_label(anns[i].attributes, anns[i].category) for i in order]
        ans = answers.grounding_answer_ids(self.tok, b1000, labels)
        ids = ans.ids + [self.im_end]
        first: list[int] = []
        spans: list[tuple[int, int]] = []
        start = 0
        for k, last in enumerate(ans.last_coordinate):
            j = start
            while ids[j] not in self.digit_ids:
                j += 1
            first.append(j)
            start = last + 1
            label_last = last + 1 + self.n_label_prefix + len(self.tok.encode(labels[k]))
            spans.append((j - 1, min(label_last, len(ids) - 1)))
        # Digits and the choices that decide how many boxes follow count x3.
        weights = [3.0 if (t in self.digit_ids or t in self.decision_ids) else 1.0 for t in ids]
        return Sample(
            image_id=image_id,
            crop=None,
            question=answers.GROUND_TEMPLATE.format(expression=expression),
            answer_ids=ids,
            kind=kind,
            targets=[Target(boxes[i], anns[i].attributes) for i in order],
            box_first_digit=first,
            box_spans=spans,
            weights=weights,
            n_objects=len(ds.annotations_for_image(image_id)),
        )

    def describe(self, ds: RefDataset, ann_id: int, text: str) -> Sample:
        ann = ds.annotations[ann_id]
        img = ds.images[ann.image_id]
        x, y, w, h = ann.bbox
        crop = answers.crop_box((x, y, x + w, y + h), img.width, img.height)
        ids = self.tok.encode(text) + [self.im_end]
        return Sample(
            image_id=ann.image_id,
            crop=crop,
            question=answers.DESCRIBE_CROP_TEMPLATE,
            answer_ids=ids,
            kind="describe",
            weights=[2.0] * len(ids),
            n_objects=len(ds.annotations_for_image(ann.image_id)),
            text=text,
        )


def build_samples(ds: RefDataset, builder: SampleBuilder, every_shape: bool = True) -> list[Sample]:
    out: list[Sample] = []
    for r in ds.refs:
        out.append(builder.ground(ds, r.image_id, r.expression, r.ann_ids, r.kind))
    if every_shape:
        for image_id in ds.images:
            anns = [a.id for a in ds.annotations_for_image(image_id)]
            if anns:
                out.append(builder.ground(ds, image_id, EVERY_SHAPE, anns, "every"))
    for d in ds.descriptions:
        out.append(builder.describe(ds, d.ann_id, d.text))
    return out


# --------------------------------------------------------------------------------------------------
# World vocabulary


def world_ids(tok: Tok, samples: Sequence[Sample], extra_texts: Sequence[str] = ()) -> list[int]:
    """Every id that occurs in a prompt or answer, plus the specials, sorted."""
    ids: set[int] = {tok.special(s) for s in SPECIAL_TOKENS}
    chat = answers.CHAT_TEMPLATE.split("{question}")
    for part in chat:
        ids.update(tok.encode(part))
    for s in samples:
        ids.update(tok.encode(s.question))
        ids.update(s.answer_ids)
    for t in extra_texts:
        ids.update(tok.encode(t))
    # Everything the grammar can choose, so the exported model has trained rows for each.
    for ch in ("[", "]", "{", ",", '"', " ", *DIGITS):
        ids.update(tok.encode(ch))
    for text in ('"bbox_2d": [', ' {"bbox_2d": [', ', "label": "', "}", "[]"):
        ids.update(tok.encode(text))
    return sorted(ids)


@dataclass(frozen=True)
class Vocab:
    """World token ids -> rows of the K-row training embedding (picklable for data workers)."""

    world: tuple[int, ...]
    image_token: int  # the row of <|image_pad|>

    @staticmethod
    def of(world: Sequence[int], tok: Tok) -> Vocab:
        return Vocab(tuple(world), list(world).index(tok.special("<|image_pad|>")))

    @cached_property
    def index(self) -> dict[int, int]:
        return {t: i for i, t in enumerate(self.world)}

    def covers(self, ids: Sequence[int]) -> bool:
        idx = self.index
        return all(t in idx for t in ids)

    def map_ids(self, ids: Sequence[int]) -> list[int]:
        idx = self.index
        return [idx[t] for t in ids]


class WorldModel(nn.Module):
    """A Qwen3-VL over the K world tokens, plus the training-only heads."""

    def __init__(self, config: Qwen3VLConfig, world: Sequence[int], tok: Tok, n_attr: dict[str, int]) -> None:
        super().__init__()
        self.world = list(world)
        self.vocab = Vocab.of(world, tok)
        self.attr_names = sorted(n_attr)
        self.full_vocab = int(config.text_config.vocab_size)
        self.index = self.vocab.index
        small = Qwen3VLConfig.from_dict(config.to_dict())
        small.text_config.vocab_size = len(self.world)
        for name in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id"):
            setattr(small, name, self.index[int(getattr(config, name))])
        self.small_config = small
        self.full_config = config
        self.lm = Qwen3VLForConditionalGeneration(small)
        # Eager text attention returns its probabilities, which the pointer loss supervises; the
        # vision tower keeps SDPA (one shared config object per tower).
        self.lm.config.text_config._attn_implementation = "eager"
        self.captured: dict[str, torch.Tensor] = {}
        layers = self.lm.model.language_model.layers
        for i in (-1, -2):
            layers[i].self_attn.register_forward_hook(self._keep(f"attn{i}", 1))
        layers[-2].register_forward_hook(self._keep("mid", None))
        d = int(config.text_config.hidden_size)
        self.heads = nn.ModuleDict(
            {
                "obj": nn.Linear(d, 1),
                "box": nn.Linear(d, 4),
                "q": nn.Linear(d, d),
                "k": nn.Linear(d, d),
                "present": nn.Linear(d, 1),
                "digits": nn.Linear(d, 4 * DIGIT_SLOTS * 11),
                "cellpos": nn.Linear(d, 2),
                **{k: nn.Linear(d, n) for k, n in n_attr.items()},
            }
        )
        self.other_logit = math.log(self.full_vocab - len(self.world))

    def _keep(self, name: str, index: int | None) -> Any:
        def hook(_m: nn.Module, _inp: Any, out: Any) -> None:
            v = out if index is None else out[index]
            self.captured[name] = v[0] if isinstance(v, tuple) else v

        return hook

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[..., D] -> [..., K + 1]: world logits and the constant logit of all other tokens."""
        w = self.lm.lm_head.weight  # [K, D], tied with the embedding
        lg = hidden @ w.t()
        other = torch.full((*lg.shape[:-1], 1), self.other_logit, dtype=lg.dtype, device=lg.device)
        return torch.cat([lg, other], dim=-1)


def export_full_model(wm: WorldModel) -> Qwen3VLForConditionalGeneration:
    """The full-vocabulary model: world rows in place, every other embedding row exactly zero."""
    sd = {k: v.detach().cpu().clone() for k, v in wm.lm.state_dict().items()}
    emb_key = "model.language_model.embed_tokens.weight"
    small_emb = sd.pop(emb_key)  # [K, D]
    full = Qwen3VLForConditionalGeneration(wm.full_config).to(small_emb.dtype)
    sd.pop("lm_head.weight", None)
    big = torch.zeros(wm.full_vocab, small_emb.shape[1], dtype=small_emb.dtype)
    big[torch.tensor(wm.world)] = small_emb
    sd[emb_key] = big
    missing, unexpected = full.load_state_dict(sd, strict=False)
    if unexpected or any(m != "lm_head.weight" for m in missing):
        raise RuntimeError(f"state dict mismatch: missing {missing}, unexpected {unexpected}")
    full.tie_weights()
    full.generation_config.eos_token_id = None
    return full.eval()


def pack_world(full: Qwen3VLForConditionalGeneration, world: Sequence[int]) -> list[int]:
    """The world of a run started from a pack: this run's ids plus every id whose row the pack trained
    (not all zero), so no token the pack knows is dropped. Ids new to the pack get its (zero) rows."""
    from .compact_embedding import zero_rows

    table = full.model.language_model.embed_tokens.weight.detach().numpy()  # [V, D]
    dead = zero_rows(table)
    if not dead.any():
        raise ValueError("the pack's embedding has no all-zero rows: it is not a train-vlm world model")
    live = {int(i) for i in np.flatnonzero(~dead)}
    out = sorted(live | set(world))
    print(
        f"world from pack: {len(live)} live ids in the pack, {len(set(world) - live)} new in this run's "
        f"data (zero rows, as in the pack), {len(live - set(world))} kept only from the pack: K={len(out)}",
        flush=True,
    )
    return out


def init_world_model(wm: WorldModel, full: Qwen3VLForConditionalGeneration) -> None:
    """wm.lm's weights from a full-vocabulary model (the inverse of export_full_model): every tensor
    as is, the embedding's world rows; the training heads keep their fresh init."""
    from .pack import model_section

    def arch(c: Qwen3VLConfig) -> tuple[Any, ...]:
        return (
            model_section(c),
            c.text_config.intermediate_size,
            c.vision_config.intermediate_size,
            c.tie_word_embeddings,
        )

    if arch(full.config) != arch(wm.full_config):
        raise ValueError(
            f"the pack's model {arch(full.config)} is not the one train-vlm builds at its sizes "
            f"{arch(wm.full_config)} (shapes_config)"
        )
    sd = {k: v.detach() for k, v in full.state_dict().items()}
    emb_key = "model.language_model.embed_tokens.weight"
    sd[emb_key] = sd[emb_key][torch.tensor(wm.world)]  # [V, D] -> [K, D]
    sd.pop("lm_head.weight", None)  # tied with the embedding in both models
    missing, unexpected = wm.lm.load_state_dict(sd, strict=False)
    if unexpected or any(m != "lm_head.weight" for m in missing):
        raise RuntimeError(f"pack weights mismatch: missing {missing}, unexpected {unexpected}")
    if wm.lm.lm_head.weight.data_ptr() != wm.lm.model.language_model.embed_tokens.weight.data_ptr():
        raise RuntimeError("the training model's head is no longer tied to its embedding")


# --------------------------------------------------------------------------------------------------
# Batches


class Data:
    """Samples of one dataset with lazily cached resized images and per-cell targets."""

    def __init__(
        self,
        ds: RefDataset,
        samples: list[Sample],
        min_pixels: int,
        max_pixels: int,
        attr_values: dict[str, list[str]],
        coord_step: int = 1,
    ) -> None:
        self.ds = ds
        self.coord_step = coord_step
        self.samples = samples
        self.min_pixels = min_pixels
        self.max_pixels = max_pixels
        self.attr_values = attr_values
        self._img: dict[int, Image.Image] = {}
        self._px: dict[tuple[int, tuple[int, int, int, int] | None], Pixels] = {}

    def image(self, image_id: int) -> Image.Image:
        img = self._img.get(image_id)
        if img is None:
            img = self.ds.load_image(image_id)
            if len(self._img) < 20000:
                self._img[image_id] = img
        return img

    def pixels(self, s: Sample) -> Pixels:
        key = (s.image_id, s.crop)
        px = self._px.get(key)
        if px is None:
            img = self.image(s.image_id)
            if s.crop is not None:
                img = img.crop(s.crop)
            px = resize_for_model(img, self.min_pixels, self.max_pixels)
            self._px[key] = px
        return px

    def cell_targets(self, s: Sample, grid: tuple[int, int]) -> dict[str, np.ndarray]:
        """Per merged cell (row-major, as the image pads): the object whose box centre lies in it."""
        mh, mw = grid[0] // MERGE_SIZE, grid[1] // MERGE_SIZE
        n = mh * mw
        out = {"obj": np.zeros(n, np.float32), "box": np.full((n, 4), np.nan, np.float32)}
        for k in self.attr_values:
            out[k] = np.full(n, -100, np.int64)
        out["digits"] = np.full((n, 4 * DIGIT_SLOTS), -100, np.int64)
        # Each cell's own centre: absolute position in the token's content, which boxes are made of.
        rows, cols = np.divmod(np.arange(n), mw)
        out["cellpos"] = np.stack([(cols + 0.5) / mw, (rows + 0.5) / mh], axis=1).astype(np.float32)
        if s.crop is not None:
            return {"obj": np.full(n, np.nan, np.float32), **{k: v for k, v in out.items() if k != "obj"}}
        rec = self.ds.images[s.image_id]
        anns = sorted(self.ds.annotations_for_image(s.image_id), key=lambda a: -a.bbox[2] * a.bbox[3])
        for a in anns:  # larger first, so a small object sharing a cell wins it
            x, y, w, h = a.bbox
            cx, cy = (x + w / 2) / rec.width, (y + h / 2) / rec.height
            c = min(mh - 1, int(cy * mh)) * mw + min(mw - 1, int(cx * mw))
            out["obj"][c] = 1.0
            out["box"][c] = [x / rec.width, y / rec.height, (x + w) / rec.width, (y + h) / rec.height]
            b1000 = quantise(
                answers.box_to_1000((x, y, x + w, y + h), rec.width, rec.height), self.coord_step
            )
            for ci, v in enumerate(b1000):
                sv = str(v)
                for k in range(DIGIT_SLOTS):
                    out["digits"][c, ci * DIGIT_SLOTS + k] = int(sv[k]) if k < len(sv) else 10
            for k, values in self.attr_values.items():
                v = a.attributes.get(k)
                out[k][c] = values.index(v) if v in values else -100
        return out

    def target_cell(self, s: Sample, t: Target, grid: tuple[int, int]) -> int:
        rec = self.ds.images[s.image_id]
        mh, mw = grid[0] // MERGE_SIZE, grid[1] // MERGE_SIZE
        cx = (t.box[0] + t.box[2]) / 2 / rec.width
        cy = (t.box[1] + t.box[3]) / 2 / rec.height
        return min(mh - 1, int(cy * mh)) * mw + min(mw - 1, int(cx * mw))


class DeviceData(Data):
    """Samples of a stream pool whose pixels the training device draws (`--render device`): a batch
    carries its scenes' packed layouts (synth_torch.pack) and, per sample, the scene, crop and resized
    size; `synth_torch.attach_pixels` turns them into the `pixel_bytes` of `collate`."""

    def __init__(
        self,
        pool: Any,  # synth_torch.Pool
        ds: RefDataset,
        samples: list[Sample],
        min_pixels: int,
        max_pixels: int,
        attr_values: dict[str, list[str]],
        coord_step: int = 1,
    ) -> None:
        super().__init__(ds, samples, min_pixels, max_pixels, attr_values, coord_step)
        self.pool = pool

    def pixels(self, s: Sample) -> Pixels:
        rec = self.ds.images[s.image_id]
        x0, y0, x1, y1 = s.crop if s.crop is not None else (0, 0, rec.width, rec.height)
        f = PATCH_SIZE * MERGE_SIZE
        hr, wr = smart_resize(
            y1 - y0, x1 - x0, factor=f, min_pixels=self.min_pixels, max_pixels=self.max_pixels
        )
        return Pixels(None, (hr // PATCH_SIZE, wr // PATCH_SIZE))

    def render_fields(self, batch: Sequence[Sample]) -> dict[str, torch.Tensor]:
        from .synth_torch import pack

        ids = list(dict.fromkeys(s.image_id for s in batch))  # the scenes this batch shows, in order
        index = {i: k for k, i in enumerate(ids)}
        req = []
        for s in batch:
            rec = self.ds.images[s.image_id]
            x0, y0, x1, y1 = s.crop if s.crop is not None else (0, 0, rec.width, rec.height)
            gh, gw = self.pixels(s).grid
            req.append([index[s.image_id], x0, y0, x1, y1, gh * PATCH_SIZE, gw * PATCH_SIZE])
        packed = pack([self.pool.layouts[i] for i in ids], [self.pool.geoms[i] for i in ids])
        return {**packed, "render_req": torch.tensor(req, dtype=torch.long)}


def prompt_ids(tok: Tok, question: str, n_pads: int) -> list[int]:
    """The chat prompt with its one <|image_pad|> expanded to `n_pads` copies."""
    ids = tok.encode(answers.CHAT_TEMPLATE.format(question=question))
    pad = tok.special("<|image_pad|>")
    j = ids.index(pad)
    return ids[:j] + [pad] * n_pads + ids[j + 1 :]


def collate(
    data: Data, tok: Tok, vocab: Vocab, batch: Sequence[Sample], with_answer: bool = True
) -> dict[str, Any]:
    """Model inputs, LM labels and every auxiliary target as padded tensors (no Sample needed later)."""
    pixel_bytes: list[np.ndarray] = []
    grids: list[list[int]] = []
    seqs: list[list[int]] = []
    prompt_lens: list[int] = []
    pad_starts: list[int] = []
    pad = tok.special("<|image_pad|>")
    for s in batch:
        px = data.pixels(s)
        gh, gw = px.grid
        if px.resized is not None:
            pixel_bytes.append(patch_bytes(px))
        grids.append([1, gh, gw])
        p = prompt_ids(tok, s.question, gh * gw // (MERGE_SIZE * MERGE_SIZE))
        seqs.append(p + (s.answer_ids if with_answer else []))
        prompt_lens.append(len(p))
        pad_starts.append(p.index(pad))
    L = max(len(q) for q in seqs)
    B = len(batch)
    N = max(gh * gw for _, gh, gw in grids) // (MERGE_SIZE * MERGE_SIZE)
    ids = torch.zeros(B, L, dtype=torch.long)
    mask = torch.zeros(B, L, dtype=torch.long)
    labels = torch.full((B, L), -100, dtype=torch.long)
    weights = torch.zeros(B, L)
    # Per visual token (merged cell), padded to N: its sequence position and the auxiliary targets.
    cell_pos = torch.zeros(B, N, dtype=torch.long)
    cell_valid = torch.zeros(B, N, dtype=torch.bool)
    cell = {
        "obj": torch.full((B, N), math.nan),  # nan: no objectness target (crops)
        "box": torch.full((B, N, 4), math.nan),
        "digits": torch.full((B, N, 4 * DIGIT_SLOTS), -100, dtype=torch.long),
        "cellpos": torch.zeros(B, N, 2),
        **{k: torch.full((B, N), -100, dtype=torch.long) for k in data.attr_values},
    }
    pres: list[tuple[int, int, float]] = []  # (b, position of the answer's "[", present?)
    ptr: list[tuple[int, int, int]] = []  # (b, position before a box's first digit, target cell)
    att: list[tuple[int, int, int]] = []  # (b, answer position, position of the box's visual token)
    for b, (s, q) in enumerate(zip(batch, seqs, strict=True)):
        ids[b, : len(q)] = torch.tensor(vocab.map_ids(q))
        mask[b, : len(q)] = 1
        _, gh, gw = grids[b]
        n = gh * gw // (MERGE_SIZE * MERGE_SIZE)
        ps = pad_starts[b]
        cell_pos[b, :n] = torch.arange(ps, ps + n)
        cell_valid[b, :n] = True
        for k, v in data.cell_targets(s, (gh, gw)).items():
            cell[k][b, :n] = torch.from_numpy(v)
        if not with_answer:
            continue
        pl = prompt_lens[b]
        # position t predicts token t+1
        labels[b, pl - 1 : len(q) - 1] = torch.tensor(vocab.map_ids(s.answer_ids))
        weights[b, pl - 1 : len(q) - 1] = torch.tensor(s.weights)
        if s.kind == "describe":
            continue
        pres.append((b, pl, 1.0 if s.targets else 0.0))
        for t, j, (a0, a1) in zip(s.targets, s.box_first_digit, s.box_spans, strict=True):
            c = data.target_cell(s, t, (gh, gw))
            ptr.append((b, pl + j - 1, c))
            att.extend((b, pl + r, ps + c) for r in range(a0, a1 + 1))

    def cols(rows: list[tuple[int, int, Any]], last_float: bool = False) -> tuple[torch.Tensor, ...]:
        t = torch.tensor(rows, dtype=torch.float64).reshape(-1, 3)
        return t[:, 0].long(), t[:, 1].long(), (t[:, 2].float() if last_float else t[:, 2].long())

    if isinstance(data, DeviceData):  # the device draws the pixels: synth_torch.attach_pixels
        pixels: dict[str, torch.Tensor] = data.render_fields(batch)
    else:
        pixels = {"pixel_bytes": torch.from_numpy(np.concatenate(pixel_bytes, axis=0))}  # [P, 3, 16, 16] u8
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "mm_token_type_ids": (ids == vocab.image_token).int(),
        **pixels,
        "image_grid_thw": torch.tensor(grids, dtype=torch.long),
        "labels": labels,
        "weights": weights,
        "cell_pos": cell_pos,
        "cell_valid": cell_valid,
        **{f"cell_{k}": v for k, v in cell.items()},
        **dict(zip(("pres_b", "pres_pos", "pres_y"), cols(pres, last_float=True), strict=True)),
        **dict(zip(("ptr_b", "ptr_pos", "ptr_cell"), cols(ptr), strict=True)),
        **dict(zip(("att_b", "att_row", "att_col"), cols(att), strict=True)),
    }


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {
        k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()
    }


# --------------------------------------------------------------------------------------------------
# Loss


def compute_loss(
    wm: WorldModel, batch: dict[str, Any], aux_weight: float = 1.0
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Weighted answer CE (restricted softmax) + the auxiliary losses, batched. Logs stay tensors."""
    out = wm.lm.model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        mm_token_type_ids=batch["mm_token_type_ids"],
        pixel_values=values_from_bytes(batch["pixel_bytes"]),  # [P, 1536]
        image_grid_thw=batch["image_grid_thw"],
    )
    h = out.last_hidden_state  # [B, L, D], after the final RMSNorm
    labels = batch["labels"]
    sel = labels != -100
    logits = wm.logits(h[sel])  # [T, K+1]
    ce = F.cross_entropy(logits, labels[sel], reduction="none")  # [T]
    w = batch["weights"][sel]
    lm_loss = (ce * w).sum() / w.sum()
    logs: dict[str, torch.Tensor] = {"lm": ce.mean().detach()}
    if aux_weight == 0.0:
        return lm_loss, logs

    heads = wm.heads
    bidx = torch.arange(h.shape[0], device=h.device)[:, None]  # [B, 1]
    valid = batch["cell_valid"]  # [B, N]
    # Cell heads read the input of the last layer, the values the last layer attends to.
    mp = wm.captured["mid"][bidx, batch["cell_pos"]]  # [B, N, D]
    hp = h[bidx, batch["cell_pos"]]  # [B, N, D]
    obj = batch["cell_obj"]  # [B, N]
    has_obj = valid & ~obj.isnan()  # cells of whole-image samples
    has = valid & (obj > 0)  # cells holding an object's centre
    terms: dict[str, torch.Tensor] = {
        "cpos": F.l1_loss(heads["cellpos"](mp[valid]).sigmoid(), batch["cell_cellpos"][valid]),
    }
    if bool(has_obj.any()):
        terms["obj"] = F.binary_cross_entropy_with_logits(heads["obj"](mp[has_obj])[:, 0], obj[has_obj])
    if bool(has.any()):
        mo = mp[has]  # [O, D]
        terms["cbox"] = F.l1_loss(heads["box"](mo).sigmoid(), batch["cell_box"][has])
        terms["digits"] = F.cross_entropy(
            heads["digits"](mo).view(-1, 11), batch["cell_digits"][has].view(-1)
        )
        for k in wm.attr_names:
            y = batch[f"cell_{k}"][has]
            if bool((y != -100).any()):
                terms[k] = F.cross_entropy(heads[k](mo), y)
    if batch["pres_b"].numel():
        # The answer's "[" predicts "{" or "]": present or absent.
        x = heads["present"](h[batch["pres_b"], batch["pres_pos"]])[:, 0]
        terms["pres"] = F.binary_cross_entropy_with_logits(x, batch["pres_y"])
    if batch["ptr_b"].numel():
        # From the token before each box's first digit to the visual token holding its centre.
        pb = batch["ptr_b"]
        q = heads["q"](h[pb, batch["ptr_pos"]])  # [P, D]
        keys = heads["k"](hp)[pb]  # [P, N, D]
        scores = (keys @ q[:, :, None])[:, :, 0] / math.sqrt(q.shape[1])  # [P, N]
        scores = scores.masked_fill(~valid[pb], float("-inf"))
        terms["ptr"] = F.cross_entropy(scores, batch["ptr_cell"])
        # Head 0 of the last two layers: every position writing box k attends its visual token.
        ab, ar, ac = batch["att_b"], batch["att_row"], batch["att_col"]
        att = [-torch.log(wm.captured[f"attn{i}"][ab, 0, ar, ac] + 1e-6).mean() for i in (-1, -2)]
        terms["att"] = torch.stack(att).mean()
    aux = torch.zeros((), device=h.device)
    for name, v in terms.items():
        aux = aux + (5.0 * v if name in ("cbox", "cpos") else v)
        logs[name] = v.detach()
    return lm_loss + aux_weight * aux, logs


# --------------------------------------------------------------------------------------------------
# Evaluation


def parse_boxes(text: str) -> list[list[float]] | None:
    try:
        v = json.loads(text)
        return [[float(c) for c in o["bbox_2d"]] for o in v]
    except (ValueError, KeyError, TypeError):
        return None


@torch.no_grad()
def evaluate(
    full: Qwen3VLForConditionalGeneration, data: Data, tok: Tok, wm: WorldModel, samples: Sequence[Sample]
) -> dict[str, float]:
    """Greedy decode with the exported full-vocabulary model."""
    im_end = tok.special("<|im_end|>")
    n_box = ok_box = n_abs = ok_abs = n_desc = ok_desc = n_ref = ok_ref = bad = 0
    for s in samples:
        px = data.pixels(s)
        gh, gw = px.grid
        ids = torch.tensor([prompt_ids(tok, s.question, gh * gw // 4)])
        gen = full.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            mm_token_type_ids=(ids == full.config.image_token_id).int(),
            pixel_values=torch.from_numpy(patchify(px)),
            image_grid_thw=torch.tensor([[1, gh, gw]]),
            max_new_tokens=80,
            do_sample=False,
            eos_token_id=im_end,
            pad_token_id=im_end,
        )
        out = gen[0, ids.shape[1] :].tolist()
        if out and out[-1] == im_end:
            out = out[:-1]
        text = tok.decode(out)
        if s.kind == "describe":
            n_desc += 1
            words = s.text.split()
            ok_desc += int(all(w in text.split() for w in words[-2:]))  # colour and shape
            continue
        rec = data.ds.images[s.image_id]
        gt = [answers.box_to_1000(t.box, rec.width, rec.height) for t in s.targets]
        pred = parse_boxes(text)
        if pred is None:
            bad += 1
            pred = []
        if not gt:
            n_abs += 1
            ok_abs += int(pred == [])
            continue
        n_ref += 1
        used: set[int] = set()
        hits = 0
        for g in gt:
            best = max(
                ((i, box_iou(g, p)) for i, p in enumerate(pred) if i not in used),
                key=lambda x: x[1],
                default=None,
            )
            if best is not None and best[1] >= 0.5:
                used.add(best[0])
                hits += 1
        n_box += len(gt)
        ok_box += hits
        ok_ref += int(hits == len(gt) and len(pred) == len(gt))
    return {
        "box_acc50": ok_box / max(1, n_box),
        "ref_acc50": ok_ref / max(1, n_ref),
        "absent_acc": ok_abs / max(1, n_abs),
        "desc_acc": ok_desc / max(1, n_desc),
        "unparsable": bad,
    }


# --------------------------------------------------------------------------------------------------
# Saving


def save_checkpoint(
    wm: WorldModel, folder: Path, tokenizer_dir: Path, state: dict[str, Any] | None = None
) -> None:
    """HF folder (config, safetensors, tokenizer, generation_config) + training_state.pt."""
    tmp = folder.with_name(folder.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    full = export_full_model(wm)
    full.save_pretrained(tmp)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        src = tokenizer_dir / name
        if src.is_file():
            shutil.copy(src, tmp / name)
    if state is not None:
        torch.save(state, tmp / "training_state.pt")
    if folder.exists():
        shutil.rmtree(folder)
    tmp.rename(folder)


def write_generation_config(folder: Path, tok: Tok) -> None:
    im_end, eot = tok.special("<|im_end|>"), tok.special("<|endoftext|>")
    cfg = {"eos_token_id": [im_end, eot], "pad_token_id": eot, "do_sample": False}
    (folder / "generation_config.json").write_text(json.dumps(cfg, indent=2) + "\n")


# --------------------------------------------------------------------------------------------------
# Training


@dataclass
class TrainArgs:
    train: Path | None  # dataset folder or annotations.json; None with stream_seed
    val: Path | None
    out: Path
    minutes: float = 60.0
    batch: int = 24
    lr: float = 2e-3
    warmup: int = 100
    threads: int = 2
    seed: int = 0
    min_pixels: int = DEMO_MIN_PIXELS
    max_pixels: int = DEMO_MAX_PIXELS
    text_hidden: int = 128
    vision_hidden: int = 128
    text_layers: int = 4
    tokenizer: Path = DEFAULT_TOKENIZER
    eval_every_s: float = 420.0
    save_every_s: float = 300.0
    eval_n: int = 30
    aux_weight: float = 1.0
    curriculum: float = 0.2  # share of the time on scenes with at most 2 objects
    max_steps: int | None = None
    resume: bool = False
    # Start from the weights of this pack (unpack.py) instead of random ones; its sizes win.
    init_pack: Path | None = None
    log_every: int = 10
    device: str = "cpu"
    # Train on fresh synthetic scenes of this seed (modelkit.synth) instead of a dataset folder.
    stream_seed: int | None = None
    workers: int = 0  # data-loading processes (stream mode)
    # Stream mode: "workers" draw the scenes with PIL (synth.py); "device": the workers lay out the
    # scenes and write the texts, the training device draws the pixels (synth_torch.py).
    render: str = "workers"
    coord_step: int = 1  # answer coordinates rounded to multiples of this
    # Save only the model weights (<out>/training_state.pt, no optimizer, no HF folder): for bringing
    # a run back from a remote machine; `--resume` on it here writes the checkpoint folders.
    light: bool = False
    # Shares of grounding refs, "every shape" and descriptions after the curriculum.
    mix: tuple[float, float, float] = (0.6, 0.1, 0.3)


STREAM_POOL = 48  # scenes rendered at a time by a data worker
STREAM_VOCAB_SCENES = 300  # scenes whose words make the world vocabulary of a stream
STREAM_BATCHES_PER_POOL = 4


def attribute_values(ds: RefDataset) -> dict[str, list[str]]:
    vals: dict[str, set[str]] = {}
    for a in ds.annotations.values():
        for k, v in a.attributes.items():
            vals.setdefault(k, set()).add(v)
    return {k: sorted(v) for k, v in sorted(vals.items())}


Pools = tuple[dict[str, list[Sample]], dict[str, list[Sample]]]


def sample_pools(ds: RefDataset, samples: Sequence[Sample]) -> Pools:
    """(all samples, samples of scenes with at most 2 objects) by kind: ref, every, describe."""
    small_images = {i for i in ds.images if len(ds.annotations_for_image(i)) <= 2}
    pools_all: dict[str, list[Sample]] = {"ref": [], "every": [], "describe": []}
    pools_easy: dict[str, list[Sample]] = {"ref": [], "every": [], "describe": []}
    for s in samples:
        key = s.kind if s.kind in ("every", "describe") else "ref"
        pools_all[key].append(s)
        if s.image_id in small_images and s.kind in ("every", "describe", "attribute", "absent", "category"):
            pools_easy[key].append(s)
    return pools_all, pools_easy


def pick_batch(rng: random.Random, pools: Pools, frac: float, a: TrainArgs) -> list[Sample]:
    """A batch for training progress `frac` in [0, 1]: the easy curriculum first, then everything."""
    easy = frac < a.curriculum
    chosen = pools[1] if easy else pools[0]
    late = dict(zip(("ref", "every", "describe"), a.mix, strict=True))
    mix = {"ref": 0.45, "every": 0.3, "describe": 0.25} if easy else late
    names = [k for k in mix if chosen.get(k)]
    out: list[Sample] = []
    for _ in range(a.batch):
        k = rng.choices(names, weights=[mix[n] for n in names])[0]
        out.append(rng.choice(chosen[k]))
    return out


class SceneStream(torch.utils.data.IterableDataset[dict[str, Any]]):
    """Endless collated batches of fresh scenes: each data worker renders its own disjoint scenes."""

    def __init__(
        self, a: TrainArgs, vocab: Vocab, attr_values: dict[str, list[str]], t0: float, first: int
    ) -> None:
        self.a, self.vocab, self.attr_values, self.t0, self.first = a, vocab, attr_values, t0, first

    def __iter__(self) -> Any:
        from .refdata import MemoryRefDataset
        from .synth import memory_dataset
        from .synth_torch import stream_pool

        a = self.a
        assert a.stream_seed is not None
        info = torch.utils.data.get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        tok = Tok(a.tokenizer)
        builder = SampleBuilder(tok, a.coord_step)
        rng = random.Random(a.seed * 1000 + wid)
        for k in itertools.count():
            first = self.first + (k * nw + wid) * STREAM_POOL
            pool = None
            try:
                if a.render == "device":
                    pool = stream_pool(a.stream_seed, first, STREAM_POOL)
                    ds: RefDataset = MemoryRefDataset(pool.records, {})
                else:
                    ds = memory_dataset(a.stream_seed, first, STREAM_POOL)
            except Exception as e:  # one bad pool must not end a long run
                print(f"worker {wid}: skipped scenes {first}+{STREAM_POOL}: {e!r}", flush=True)
                continue
            # A word the world vocabulary lacks (never seen so far) is skipped, not a crash.
            samples = [
                s
                for s in build_samples(ds, builder)
                if self.vocab.covers(s.answer_ids) and self.vocab.covers(tok.encode(s.question))
            ]
            data = (
                DeviceData(pool, ds, samples, a.min_pixels, a.max_pixels, self.attr_values, a.coord_step)
                if pool is not None
                else Data(ds, samples, a.min_pixels, a.max_pixels, self.attr_values, a.coord_step)
            )
            pools = sample_pools(ds, samples)
            for _ in range(STREAM_BATCHES_PER_POOL):
                frac = (time.time() - self.t0) / max(a.minutes * 60.0, 1e-9)
                yield collate(data, tok, self.vocab, pick_batch(rng, pools, frac, a))


def _dataset_batches(a: TrainArgs, tok: Tok, vocab: Vocab, data: Data, t0: float) -> Any:
    rng = random.Random(a.seed)
    pools = sample_pools(data.ds, data.samples)
    while True:
        frac = (time.time() - t0) / max(a.minutes * 60.0, 1e-9)
        yield collate(data, tok, vocab, pick_batch(rng, pools, frac, a))


def train(a: TrainArgs) -> dict[str, Any]:
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    device = torch.device(a.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if a.render not in ("workers", "device"):
        raise ValueError(f"render is 'workers' or 'device', not {a.render!r}")
    if a.render == "device" and a.stream_seed is None:
        raise ValueError("render 'device' draws stream scenes: it needs a stream seed, not a dataset folder")
    tok = Tok(a.tokenizer)
    builder = SampleBuilder(tok, a.coord_step)
    if a.train is not None:
        ds = load_refdata(a.train)
    elif a.stream_seed is not None:
        from .synth import memory_dataset

        # The vocabulary and attribute values of the stream, read off scenes no worker renders.
        ds = memory_dataset(a.stream_seed, 10**8, STREAM_VOCAB_SCENES)
    else:
        raise ValueError("give a training dataset or a stream seed")
    samples = build_samples(ds, builder)
    val_ds = load_refdata(a.val) if a.val is not None else None
    val_samples = build_samples(val_ds, builder, every_shape=False) if val_ds is not None else []
    attr_values = attribute_values(ds)
    world = world_ids(tok, samples + val_samples)
    state_path = (a.out if a.light else a.out / "last") / "training_state.pt"
    state: dict[str, Any] | None = None
    if a.resume and state_path.is_file():
        state = torch.load(state_path, weights_only=False, map_location="cpu")
        world = state["world"]
        attr_values = state["attr_values"]
        a.text_hidden, a.vision_hidden, a.text_layers = state.get(
            "dims", (a.text_hidden, a.vision_hidden, a.text_layers)
        )
    init: Qwen3VLForConditionalGeneration | None = None
    if a.init_pack is not None and state is not None:
        print(f"--init-pack {a.init_pack} ignored: resuming from {state_path}", flush=True)
    elif a.init_pack is not None:
        from .unpack import unpack_model

        init = unpack_model(a.init_pack)
        world = pack_world(init, world)
        tc, vc = init.config.text_config, init.config.vision_config
        a.text_hidden, a.vision_hidden, a.text_layers = tc.hidden_size, vc.hidden_size, tc.num_hidden_layers
    config = shapes_config(a.text_hidden, a.vision_hidden, a.text_layers)
    wm = WorldModel(config, world, tok, {k: len(v) for k, v in attr_values.items()})
    if init is not None:
        init_world_model(wm, init)
        print(
            f"initialised from pack {a.init_pack} (text {a.text_hidden} x {a.text_layers} layers, vision "
            f"{a.vision_hidden}); training heads, optimizer state and step count start fresh",
            flush=True,
        )
        del init
    step, elapsed0 = 0, 0.0
    history: list[dict[str, Any]] = []
    opt_state: dict[str, Any] | None = None
    if state is not None:
        missing, unexpected = wm.load_state_dict(state["model"], strict=False)
        if unexpected or any(not m.startswith("heads.") for m in missing):
            raise RuntimeError(f"checkpoint mismatch: missing {missing}, unexpected {unexpected}")
        if missing or "opt" not in state:  # new training-only heads or a light save: fresh optimizer
            print(f"optimizer state reset (new heads: {missing})", flush=True)
        else:
            opt_state = state["opt"]
        step, elapsed0, history = state["step"], state["elapsed"], state["history"]
        print(f"resumed at step {step}, {elapsed0 / 60:.1f} min", flush=True)
    wm.to(device)
    opt = torch.optim.AdamW(wm.parameters(), lr=a.lr, weight_decay=0.01, betas=(0.9, 0.98))
    if opt_state is not None:
        opt.load_state_dict(opt_state)
    n_params = sum(p.numel() for p in wm.lm.parameters())
    print(
        f"train samples {len(samples)}{' (stream)' if a.train is None else ''}, val {len(val_samples)}, "
        f"world K={len(world)}, params {n_params / 1e6:.2f}M (world vocab), full-vocab params "
        f"{(n_params + (VOCAB_SIZE - len(world)) * a.text_hidden) / 1e6:.2f}M, device {device}",
        flush=True,
    )

    val = Data(val_ds, val_samples, a.min_pixels, a.max_pixels, attr_values, a.coord_step) if val_ds else None
    eval_set: list[Sample] = []
    if val is not None:
        vrng = random.Random(1234)
        refs = [s for s in val_samples if s.kind != "describe"]
        descs = [s for s in val_samples if s.kind == "describe"]
        eval_set = vrng.sample(refs, min(a.eval_n, len(refs))) + vrng.sample(
            descs, min(a.eval_n // 2, len(descs))
        )

    def run_eval() -> None:
        assert val is not None
        wm.eval()
        te = time.time()
        res = evaluate(export_full_model(wm), val, tok, wm, eval_set)
        wm.train()
        res = {"step": step, "minutes": round((time.time() - t0) / 60, 1), **res}
        history.append(res)
        print(f"eval {json.dumps(res)} ({time.time() - te:.0f}s)", flush=True)

    total_s = a.minutes * 60.0
    t0 = time.time() - elapsed0
    batches: Any
    if a.train is None:
        stream = SceneStream(a, wm.vocab, attr_values, t0, first=step * a.batch)
        batches = iter(
            torch.utils.data.DataLoader(
                stream,
                batch_size=None,
                num_workers=a.workers,
                pin_memory=device.type == "cuda",
                prefetch_factor=4 if a.workers else None,
                persistent_workers=a.workers > 0,
            )
        )
    else:
        data = Data(ds, samples, a.min_pixels, a.max_pixels, attr_values, a.coord_step)
        batches = _dataset_batches(a, tok, wm.vocab, data, t0)
    last_save = last_eval = time.time()
    wm.train()
    run_logs: dict[str, torch.Tensor] = {}
    n_logs = 0
    t_log = time.time()
    t_data = 0.0  # seconds waiting for batches (and drawing them with --render device) since the last log
    first_loss: float | None = None
    loss = torch.zeros(())
    while True:
        elapsed = time.time() - t0
        if elapsed >= total_s or (a.max_steps is not None and step >= a.max_steps):
            break
        frac = elapsed / total_s
        lr = a.lr * min(1.0, (step + 1) / a.warmup) * (0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, frac))))
        for g in opt.param_groups:
            g["lr"] = lr
        td = time.time()
        batch = to_device(next(batches), device)
        if "render_req" in batch:
            from .synth_torch import attach_pixels

            batch = attach_pixels(batch)
        t_data += time.time() - td
        loss, logs = compute_loss(wm, batch, a.aux_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(wm.parameters(), 1.0)
        opt.step()
        step += 1
        if first_loss is None:
            first_loss = float(loss.detach())
        for k, v in logs.items():
            run_logs[k] = run_logs.get(k, 0.0) + v
        n_logs += 1
        if step % a.log_every == 0 or step == a.max_steps:
            dt = (time.time() - t_log) / n_logs
            parts = " ".join(f"{k} {float(v) / n_logs:.3f}" for k, v in run_logs.items())
            easy = "easy " if frac < a.curriculum else ""
            wait = t_data / n_logs
            print(
                f"step {step} t {elapsed / 60:.1f}m lr {lr:.2e} {easy}{parts} data {wait:.3f}s "
                f"{dt:.3f}s/step",
                flush=True,
            )
            run_logs, n_logs, t_log, t_data = {}, 0, time.time(), 0.0
        now = time.time()
        if val is not None and now - last_eval >= a.eval_every_s:
            run_eval()
            last_eval = t_log = time.time()
        if now - last_save >= a.save_every_s:
            _save(wm, a, tok, opt, step, time.time() - t0, history, attr_values)
            last_save = t_log = time.time()
    last_loss = float(loss.detach())
    _save(wm, a, tok, opt, step, time.time() - t0, history, attr_values)
    if a.light:
        print(f"done: {step} steps, weights in {state_path}", flush=True)
        return {"steps": step, "first_loss": first_loss, "last_loss": last_loss, "history": history, "wm": wm}
    final = a.out / "final"
    if final.exists():
        shutil.rmtree(final)
    shutil.copytree(a.out / "last", final)
    (final / "training_state.pt").unlink()
    if val is not None:
        run_eval()
    (a.out / "history.json").write_text(json.dumps(history, indent=2) + "\n")
    print(f"done: {step} steps, final checkpoint {final}", flush=True)
    return {"steps": step, "first_loss": first_loss, "last_loss": last_loss, "history": history, "wm": wm}


def _save(
    wm: WorldModel,
    a: TrainArgs,
    tok: Tok,
    opt: torch.optim.Optimizer,
    step: int,
    elapsed: float,
    history: list[dict[str, Any]],
    attr_values: dict[str, list[str]],
) -> None:
    state: dict[str, Any] = {
        "model": {k: v.detach().cpu() for k, v in wm.state_dict().items()},
        "step": step,
        "elapsed": elapsed,
        "history": history,
        "world": wm.world,
        "attr_values": attr_values,
        "dims": (a.text_hidden, a.vision_hidden, a.text_layers),
    }
    a.out.mkdir(parents=True, exist_ok=True)
    if a.light:
        # Weights only (no training heads, no optimizer): small enough to bring back from a remote run.
        state["model"] = {k: v for k, v in state["model"].items() if not k.startswith("heads.")}
        tmp = a.out / "training_state.pt.tmp"
        torch.save(state, tmp)
        tmp.replace(a.out / "training_state.pt")
        print(f"saved {a.out / 'training_state.pt'} at step {step}", flush=True)
        return
    state["opt"] = opt.state_dict()
    folder = a.out / "last"
    save_checkpoint(wm, folder, a.tokenizer, state)
    write_generation_config(folder, tok)
    print(f"saved {folder} at step {step}", flush=True)


# --------------------------------------------------------------------------------------------------
# the command (its arguments are declared in cli.py)


def cmd_train_vlm(args: argparse.Namespace) -> int:
    train(
        TrainArgs(
            train=args.train,
            val=args.val,
            out=args.out,
            minutes=args.minutes,
            batch=args.batch,
            lr=args.lr,
            warmup=args.warmup,
            threads=args.threads,
            seed=args.seed,
            min_pixels=args.min_pixels,
            max_pixels=args.max_pixels,
            text_hidden=args.text_hidden,
            vision_hidden=args.vision_hidden,
            text_layers=args.text_layers,
            device=args.device,
            stream_seed=args.stream_seed,
            workers=args.workers,
            render=args.render,
            coord_step=args.coord_step,
            light=args.light,
            tokenizer=args.tokenizer,
            eval_every_s=args.eval_every,
            save_every_s=args.save_every,
            eval_n=args.eval_n,
            aux_weight=args.aux_weight,
            curriculum=args.curriculum,
            mix=(*(float(v) for v in args.mix.split(",")),),
            max_steps=args.max_steps,
            resume=args.resume,
            init_pack=args.init_pack,
        )
    )
    return 0
