"""PyTorch predictions for `modelkit score` (`modelkit predict --mode ground|box|describe`).

The reference path for what the TypeScript runtime does with a pack (src/runtime/local-engine.ts):
- ground: greedy answer to the ground prompt (HF generate, no grammar), boxes parsed as grounding.ts
  parses them, T_seg per box = the final-norm state at the box's last coordinate token, the mask
  mask decoder with box1000 / 1000 as query and gate box, masks at the original size as mask-post.ts;
- box: `segment` with a box: the ground prompt with the ref's expression, then the canonical answer
  prefix up to the box's fourth coordinate as forced tokens (grounding_answer_ids(close=False)),
  T_seg = the state of its last token; one query per target, the GT box given;
- describe: describe_mode "crop": the annotation's box grown by answers.crop_box, the crop alone
  with DESCRIBE_CROP_TEMPLATE, greedy.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .answers import (
    DESCRIBE_CROP_TEMPLATE,
    GROUND_TEMPLATE,
    box_to_1000,
    crop_box,
    grounding_answer_ids,
)
from .errors import ModelkitError
from .evaluate import instance_json, write_predictions
from .mask_decoder import MaskDecoder, check_mask_decoder_matches, load_mask_decoder_checkpoint
from .refdata import RefDataset, RefRecord, load_refdata
from .train_mask_decoder import EncodedImage, FrozenBase, logits_to_masks, pick_device, set_threads

MAX_DESCRIBE_TOKENS = 16


# --------------------------------------------------------------------------------------------------
# parsing the answer (as src/runtime/grounding.ts)

_NUM = r"(-?\d+(?:\.\d+)?)"
BOX_PATTERN = re.compile(r"[\"']?bbox(?:_2d)?[\"']?\s*:\s*\[\s*" + r"\s*,\s*".join([_NUM] * 4) + r"\s*\]")
LABEL_PATTERN = re.compile(r"[\"']label[\"']\s*:\s*[\"']([^\"'\n]*)[\"']")
BOX_KEYS = ("bbox_2d", "bbox")


@dataclass(frozen=True)
class ParsedBox:
    label: str
    box1000: tuple[int, int, int, int]
    index: int  # position among all boxes in the text (dropped ones counted), as grounding.ts


def _strip_fence(text: str) -> str:
    start = text.find("```")
    if start < 0:
        return text
    start += 3
    eol = text.find("\n", start)
    info = text[start : len(text) if eol < 0 else eol]
    if re.fullmatch(r"[A-Za-z0-9_-]*\s*", info):
        start = len(text) if eol < 0 else eol + 1
    close = text.find("```", start)
    return text[start : len(text) if close < 0 else close]


def _scan_objects(text: str) -> list[str]:
    """Outermost {...} substrings, string-aware (grounding.ts's scanObjects)."""
    objects: list[str] = []
    depth = bracket = 0
    start = -1
    quote = ""
    prev = ""
    i = 0
    while i < len(text):
        ch = text[i]
        if quote:
            if ch == "\\":
                i += 1
            elif ch == quote:
                quote = ""
                prev = ch
            elif ch == "\n" and quote == "'":
                quote = ""
            i += 1
            continue
        if ch in "\"'" and (depth > 0 or bracket > 0) and (ch == '"' or prev in "[{,:"):
            quote = ch
            i += 1
            continue
        if ch == "{":
            if depth == 0:
                start = i
            depth += 1
        elif ch == "}" and depth > 0:
            depth -= 1
            if depth == 0:
                objects.append(text[start : i + 1])
        elif ch == "[" and depth == 0:
            bracket += 1
        elif ch == "]" and depth == 0 and bracket > 0:
            bracket -= 1
        if not ch.isspace():
            prev = ch
        i += 1
    return objects


def _python_to_json(source: str) -> str:
    out = []
    i = 0
    while i < len(source):
        ch = source[i]
        if ch in "\"'":
            j = i + 1
            content = ""
            while j < len(source) and source[j] != ch:
                if source[j] == "\\" and j + 1 < len(source):
                    nxt = source[j + 1]
                    content += nxt if nxt in "'\"\\" else "\\" + nxt
                    j += 2
                else:
                    content += source[j]
                    j += 1
            out.append(json.dumps(content))
            i = j + 1
            continue
        word = re.match(r"(True|False|None)\b", source[i : i + 5])
        if word and not (i > 0 and re.match(r"\w", source[i - 1])):
            out.append({"True": "true", "False": "false", "None": "null"}[word.group(1)])
            i += len(word.group(1))
            continue
        if ch == "," and re.match(r"\s*[}\]]", source[i + 1 :]):
            i += 1
            continue
        out.append(ch)
        i += 1
    return "".join(out)


def _regex_boxes(text: str) -> list[tuple[str, list[float]]]:
    matches = list(BOX_PATTERN.finditer(text))
    out = []
    for k, m in enumerate(matches):
        nxt = matches[k + 1].start() if k + 1 < len(matches) else len(text)
        label = LABEL_PATTERN.search(text[m.end() : nxt])
        out.append((label.group(1).strip() if label else "", [float(m.group(g)) for g in (1, 2, 3, 4)]))
    return out


def _to_coords(value: Any) -> list[float] | None:
    if not isinstance(value, list) or len(value) != 4:
        return None
    out = []
    for v in value:
        if isinstance(v, bool):
            return None
        if isinstance(v, int | float):
            out.append(float(v))
        elif isinstance(v, str) and v.strip():
            try:
                out.append(float(v))
            except ValueError:
                return None
        else:
            return None
    return out


def _parse_object(source: str) -> tuple[str, list[float]] | None:
    try:
        value = json.loads(source)
    except json.JSONDecodeError:
        try:
            value = json.loads(_python_to_json(source))
        except json.JSONDecodeError:
            found = _regex_boxes(source)
            return found[0] if found else None
    if not isinstance(value, dict):
        return None
    coords = None
    for key in BOX_KEYS:
        coords = _to_coords(value.get(key))
        if coords is not None:
            break
    if coords is None:
        return None
    label = value.get("label")
    text = label.strip() if isinstance(label, str) else "" if label is None else str(label)
    return text, coords


def _js_round(v: float) -> int:
    return int(np.floor(v + 0.5))


def parse_boxes(text: str) -> list[ParsedBox]:
    """Boxes of a grounding answer in 0..1000 (grounding.ts parseBoxes, before the pixel scaling)."""
    body = _strip_fence(text)
    raw = [p for p in (_parse_object(o) for o in _scan_objects(body)) if p is not None]
    if not raw:
        raw = _regex_boxes(body)
    out: list[ParsedBox] = []
    seen: set[tuple[int, ...]] = set()
    for index, (label, coords) in enumerate(raw):
        a, b, c, d = (min(1000, max(0, _js_round(v))) for v in coords)
        x1, x2, y1, y2 = min(a, c), max(a, c), min(b, d), max(b, d)
        if x2 <= x1 or y2 <= y1:
            continue
        key = (x1, y1, x2, y2)
        if key in seen:
            continue
        seen.add(key)
        out.append(ParsedBox(label, key, index))
    return out


def last_coordinate_tokens(tokenizer: Any, tokens: Sequence[int]) -> list[int]:
    """Index in `tokens` of the token holding the last character of each box's fourth coordinate,
    in text order (the grammar's box-closing events, whose hidden state is T_seg)."""
    ends: list[int] = []  # character offset after each token
    for i in range(len(tokens)):
        ends.append(len(tokenizer.decode(tokens[: i + 1])))
    text = tokenizer.decode(tokens)
    out = []
    for m in BOX_PATTERN.finditer(text):
        last_char = m.end(4) - 1
        out.append(next((i for i, e in enumerate(ends) if e > last_char), len(tokens) - 1))
    return out


# --------------------------------------------------------------------------------------------------
# prediction


class Predictor:
    def __init__(self, base: FrozenBase, mask_decoder: MaskDecoder | None) -> None:
        self.base = base
        self.mask_decoder = mask_decoder
        if mask_decoder is not None:
            mask_decoder.to(base.device).eval()

    @torch.no_grad()
    def greedy(
        self, enc: EncodedImage, prompts: Sequence[Sequence[int]], max_new_tokens: int
    ) -> list[list[int]]:
        """Greedy continuations (HF generate) of prompts on one image, batched with left padding;
        each cut before its first stop token."""
        base = self.base
        n, longest = len(prompts), max(len(p) for p in prompts)
        pad = base.stop[-1]
        input_ids = torch.full((n, longest), pad, dtype=torch.long)  # [n, S] left-padded
        mask = torch.zeros(n, longest, dtype=torch.long)
        for r, ids in enumerate(prompts):
            input_ids[r, longest - len(ids) :] = torch.tensor(list(ids), dtype=torch.long)
            mask[r, longest - len(ids) :] = 1
        input_ids, mask = input_ids.to(base.device), mask.to(base.device)
        pixels = torch.from_numpy(enc.prep.pixel_values).to(base.device, base.model.dtype)  # [P, 1536]
        out = base.model.generate(
            input_ids=input_ids,
            attention_mask=mask,
            mm_token_type_ids=(input_ids == base.image_pad).to(torch.int32),
            pixel_values=pixels.repeat(n, 1),  # one copy of the image per prompt
            image_grid_thw=enc.grid.repeat(n, 1),
            do_sample=False,
            max_new_tokens=max_new_tokens,
            eos_token_id=base.stop,
            pad_token_id=pad,
        )
        results = []
        for row in out[:, longest:].tolist():
            cut = next((i for i, t in enumerate(row) if t in base.stop), len(row))
            results.append(row[:cut])
        return results

    @torch.no_grad()
    def masks(
        self,
        enc: EncodedImage,
        mm: torch.Tensor,
        query_hidden: torch.Tensor,
        boxes1000: Sequence[Sequence[int]],
    ) -> tuple[np.ndarray, np.ndarray]:
        """[Q, H0, W0] bool masks and [Q] scores (iou_pred clamped to [0, 1], as segment reports)."""
        if self.mask_decoder is None:
            raise ModelkitError("INVALID_INPUT", "this mode needs --mask-decoder")
        dev = self.base.device
        boxes = torch.tensor(boxes1000, dtype=torch.float32, device=dev).clamp(0, 1000) / 1000.0  # [Q, 4]
        logits, _, iou = self.mask_decoder(
            enc.vit_ms.to(dev),
            mm.to(dev),
            query_hidden.to(dev),
            boxes,
            boxes[:, None, :],
            torch.ones(boxes.shape[0], 1, device=dev),
            torch.from_numpy(enc.prep.hr_image).to(dev),
        )
        masks = logits_to_masks(logits.cpu(), enc.prep.resized_hw, enc.prep.original_hw).numpy()
        return masks, iou[:, 0].clamp(0, 1).cpu().numpy()

    def _mm(self, enc: EncodedImage, hidden: torch.Tensor) -> torch.Tensor:
        rows = torch.nonzero(self._pad_mask(enc)).reshape(-1)
        return hidden[rows]  # [M, H]

    def _pad_mask(self, enc: EncodedImage) -> torch.Tensor:
        ids = self.base.prompt_ids("", enc.num_merged)
        return torch.tensor([t == self.base.image_pad for t in ids])

    def ground(
        self, enc: EncodedImage, refs: Sequence[RefRecord], max_new_tokens: int
    ) -> list[dict[str, Any]]:
        """Ground every ref of one image: batched greedy answers, then one batched pass for T_seg."""
        base = self.base
        h0, w0 = enc.prep.original_hw
        prompts = [
            base.prompt_ids(GROUND_TEMPLATE.replace("{expression}", r.expression), enc.num_merged)
            for r in refs
        ]
        answers = self.greedy(enc, prompts, max_new_tokens)
        results: list[dict[str, Any]] = []
        pending: list[tuple[int, list[ParsedBox], list[int]]] = []  # (ref index, boxes, sequence rows)
        for n, (ref, prompt, gen) in enumerate(zip(refs, prompts, answers, strict=True)):
            text = base.tokenizer.decode(gen)
            parsed = parse_boxes(text)
            results.append({"ref_id": ref.ref_id, "found": bool(parsed), "instances": [], "text": text})
            if parsed:
                coord = last_coordinate_tokens(base.tokenizer, gen)
                rows = [
                    len(prompt) + (coord[p.index] if p.index < len(coord) else len(gen) - 1) for p in parsed
                ]
                pending.append((n, parsed, rows))
        if not pending:
            return results
        hidden = base.hidden_states(enc, [prompts[n] + answers[n] for n, _, _ in pending])  # [S_i, H] each
        query = torch.cat([h[rows] for h, (_, _, rows) in zip(hidden, pending, strict=True)])  # [Q, H]
        boxes = [p.box1000 for _, parsed, _ in pending for p in parsed]
        masks, scores = self.masks(enc, self._mm(enc, hidden[0]), query, boxes)
        k = 0
        for n, parsed, _ in pending:
            for p in parsed:
                x1, y1, x2, y2 = p.box1000
                box = [x1 / 1000 * w0, y1 / 1000 * h0, x2 / 1000 * w0, y2 / 1000 * h0]
                results[n]["instances"].append(
                    {**instance_json(box, float(scores[k]), masks[k]), "label": p.label}
                )
                k += 1
        return results

    def boxes(self, enc: EncodedImage, ds: RefDataset, refs: Sequence[RefRecord]) -> list[dict[str, Any]]:
        """Box-prompted segmentation of every target of `refs` (one batched pass per image)."""
        base = self.base
        h0, w0 = enc.prep.original_hw
        sequences: list[list[int]] = []
        owners: list[tuple[int, list[float], list[int]]] = []  # (ref index, px box, box1000)
        for n, ref in enumerate(refs):
            prompt = base.prompt_ids(GROUND_TEMPLATE.replace("{expression}", ref.expression), enc.num_merged)
            for box in ds.boxes_for(ref):
                b1000 = box_to_1000(box, w0, h0)
                prefix = grounding_answer_ids(base.tokenizer, [b1000], [ref.expression], close=False)
                sequences.append(prompt + prefix.ids)
                owners.append((n, [float(v) for v in box], b1000))
        results = [{"ref_id": r.ref_id, "found": bool(r.ann_ids), "instances": []} for r in refs]
        if not sequences:
            return results
        hidden = base.hidden_states(enc, sequences)
        query = torch.stack([h[-1] for h in hidden])  # [Q, H] the last forced token's state
        masks, scores = self.masks(enc, self._mm(enc, hidden[0]), query, [o[2] for o in owners])
        for (n, box, _), mask, s in zip(owners, masks, scores, strict=True):
            results[n]["instances"].append(instance_json(box, float(s), mask))
        return results

    def describe(self, ds: RefDataset, ann_id: int, max_new_tokens: int) -> str:
        ann = ds.annotations[ann_id]
        img = ds.load_image(ann.image_id)
        x, y, w, h = ann.bbox
        crop = img.crop(crop_box((x, y, x + w, y + h), img.width, img.height))
        enc = self.base.encode_image(crop)
        ids = self.base.prompt_ids(DESCRIBE_CROP_TEMPLATE, enc.num_merged)
        return self.base.tokenizer.decode(self.greedy(enc, [ids], max_new_tokens)[0]).strip()


def predict(
    predictor: Predictor,
    ds: RefDataset,
    mode: str,
    max_images: int | None = None,
    max_new_tokens: int = 200,
    describe_tokens: int = MAX_DESCRIBE_TOKENS,
    log: Any = print,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(refs, descriptions) in the predictions format for the first `max_images` images."""
    image_ids = sorted(ds.images)[:max_images]
    keep = set(image_ids)
    refs_out: list[dict[str, Any]] = []
    desc_out: list[dict[str, Any]] = []
    start = time.monotonic()
    if mode == "describe":
        todo = [d for d in ds.descriptions if ds.annotations[d.ann_id].image_id in keep]
        for n, d in enumerate(todo):
            desc_out.append({"ann_id": d.ann_id, "text": predictor.describe(ds, d.ann_id, describe_tokens)})
            if (n + 1) % 50 == 0:
                log(f"describe: {n + 1}/{len(todo)} ({(time.monotonic() - start) / (n + 1):.2f} s each)")
        return refs_out, desc_out
    for n, image_id in enumerate(image_ids):
        refs = ds.refs_for_image(image_id)
        if not refs:
            continue
        enc = predictor.base.encode_image(ds.load_image(image_id))
        if mode == "ground":
            refs_out.extend(predictor.ground(enc, refs, max_new_tokens))
        elif mode == "box":
            refs_out.extend(predictor.boxes(enc, ds, [r for r in refs if r.ann_ids]))
        else:
            raise ModelkitError(
                "INVALID_INPUT", f"Expected mode ground, box or describe but received {mode!r}"
            )
        if (n + 1) % 10 == 0:
            log(
                f"{mode}: {n + 1}/{len(image_ids)} images ({(time.monotonic() - start) / (n + 1):.2f} s each)"
            )
    return refs_out, desc_out


def cmd_predict(args: argparse.Namespace) -> int:
    from .hf import read_config

    set_threads(args.threads)
    read_config(args.checkpoint)
    ds = load_refdata(args.data)
    mask_decoder = None
    if args.mode in ("ground", "box"):
        if args.mask_decoder is None:
            raise ModelkitError("INVALID_INPUT", f"--mode {args.mode} needs --mask-decoder")
        mask_decoder = load_mask_decoder_checkpoint(args.mask_decoder)
    base = FrozenBase(
        args.checkpoint, args.tokenizer, args.min_pixels, args.max_pixels, pick_device(args.device)
    )
    if mask_decoder is not None:
        check_mask_decoder_matches(mask_decoder.config, base.vision_hidden, base.text_hidden)
    refs, descriptions = predict(
        Predictor(base, mask_decoder), ds, args.mode, args.max_images, args.max_new_tokens
    )
    image_ids = sorted(ds.images)[: args.max_images]
    write_predictions(args.out, refs, descriptions, mode=args.mode, image_ids=image_ids)
    print(f"wrote {args.out}: {len(refs)} refs, {len(descriptions)} descriptions")
    return 0
