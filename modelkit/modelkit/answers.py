"""Prompts and answer token ids exactly as the TypeScript runtime produces them.

Training must show the model the token sequences it will meet at inference. The runtime's box
grammar (src/runtime/grammar.ts) emits a grounding answer as a mix of *forced* fixed text (tokenised
as one piece) and *chosen* tokens; the canonical choice is the single-character token (`{`, `,`,
`]`, `"`, one digit) and, inside a label, the label's own tokenisation. `grounding_answer_ids`
reproduces that sequence; test/grammar-canonical.test.ts checks it against BoxGrammar.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from .errors import ModelkitError

CHAT_TEMPLATE = (
    "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>{question}<|im_end|>\n"
    "<|im_start|>assistant\n"
)
GROUND_TEMPLATE = (
    'Locate every object that matches the description "{expression}" in the image. '
    "Report bbox coordinates in JSON format."
)
DESCRIBE_BOX_TEMPLATE = (
    'Describe the object inside {{"bbox_2d": [{x1}, {y1}, {x2}, {y2}]}} in a short phrase.'
)
DESCRIBE_CROP_TEMPLATE = "Describe the object in the middle of the image in a short phrase."

# Crop rule for describe_mode "crop": the box grown on every side by this fraction of the image's
# shorter side, clamped to the image. A margin tied to the image (not the box) keeps the object's
# share of the crop, and so its size relative to the image, visible to the model.
CROP_MARGIN = 0.15


DESCRIBE_MODES = ("box", "crop")


def pack_prompts(describe_mode: str = "box") -> dict[str, str]:
    """The `prompts` section of pack.json (docs/design.md)."""
    if describe_mode not in DESCRIBE_MODES:
        raise ValueError(f"describe_mode must be one of {DESCRIBE_MODES}, got {describe_mode!r}")
    prompts = {"chat": CHAT_TEMPLATE, "ground": GROUND_TEMPLATE}
    if describe_mode == "box":
        prompts["describe"] = DESCRIBE_BOX_TEMPLATE.replace("{{", "{").replace("}}", "}")
    else:
        prompts["describe"] = DESCRIBE_CROP_TEMPLATE
        prompts["describe_mode"] = "crop"
    return prompts


class Tokenizer(Protocol):
    """What this module needs from a tokenizer (transformers' or `tokenizers`')."""

    def encode(self, text: str) -> list[int]: ...  # pragma: no cover - protocol


class ChatTokenizer(Tokenizer, Protocol):
    """A tokenizer that can also encode user text without added-token matching (tokenizer.py)."""

    def encode_plain(self, text: str) -> list[int]: ...  # pragma: no cover - protocol


def chat_prompt_ids(
    tok: ChatTokenizer, chat_template: str, question: str, num_image_tokens: int, image_pad: int
) -> list[int]:
    """Prompt ids as prompt.ts's buildChatIds builds them: the template split at `{question}`, its
    parts encoded with added tokens recognised, the question without; the single `<|image_pad|>`
    then expanded to `num_image_tokens` copies by id (docs/design.md)."""
    parts = chat_template.split("{question}")
    if len(parts) != 2:
        raise ModelkitError(
            "INVALID_INPUT", f"the chat template must contain {{question}} once, found {len(parts) - 1}"
        )
    ids = tok.encode(parts[0]) + tok.encode_plain(question) + tok.encode(parts[1])
    if ids.count(image_pad) != 1:
        raise ModelkitError(
            "INVALID_INPUT", f"the chat prompt must hold exactly one image pad, found {ids.count(image_pad)}"
        )
    at = ids.index(image_pad)
    return ids[:at] + [image_pad] * num_image_tokens + ids[at + 1 :]


def round_half_up(v: float) -> int:
    """JavaScript's Math.round for the values used here (non-negative)."""
    import math

    return int(math.floor(v + 0.5))


def box_to_1000(box: Sequence[float], width: int, height: int) -> list[int]:
    """Pixel box [x1, y1, x2, y2) -> 0..1000 integers, as prompt.ts's boxTo1000."""
    x1, y1, x2, y2 = box

    def conv(v: float, size: int) -> int:
        return min(1000, max(0, round_half_up(v / size * 1000)))

    a, b, c, d = conv(x1, width), conv(x2, width), conv(y1, height), conv(y2, height)
    return [min(a, b), min(c, d), max(a, b), max(c, d)]


def crop_box(box: Sequence[float], width: int, height: int) -> tuple[int, int, int, int]:
    """Integer crop [x1, y1, x2, y2) around `box` for describe_mode "crop" (as local-engine.ts)."""
    m = CROP_MARGIN * min(width, height)
    x1 = max(0, int(box[0] - m))
    y1 = max(0, int(box[1] - m))
    x2 = min(width, int(box[2] + m + 0.999999))
    y2 = min(height, int(box[3] + m + 0.999999))
    return x1, y1, max(x2, x1 + 1), max(y2, y1 + 1)


@dataclass(frozen=True)
class AnswerIds:
    ids: list[int]
    # Index in `ids` of each box's last coordinate token (the T_seg rows).
    last_coordinate: list[int]


def _single(tok: Tokenizer, ch: str) -> int:
    ids = tok.encode(ch)
    if len(ids) != 1:
        raise ValueError(f"{ch!r} is not a single token in this vocabulary")
    return ids[0]


def grounding_answer_ids(
    tok: Tokenizer, boxes1000: Sequence[Sequence[int]], labels: Sequence[str], *, close: bool = True
) -> AnswerIds:
    """Token ids of `[{"bbox_2d": [..], "label": ".."}, ...]` as the runtime's grammar emits them.

    With `close=False` the sequence stops after the first box's fourth coordinate (the prefix the
    runtime feeds for box-prompted segmentation).
    """
    if len(boxes1000) != len(labels):
        raise ValueError("one label per box")
    if close:  # labels are not part of the open prefix
        for label in labels:
            check_label(label)
    ids: list[int] = []
    last: list[int] = []

    def forced(text: str) -> None:
        ids.extend(tok.encode(text))

    def choose(ch: str) -> None:
        ids.append(_single(tok, ch))

    forced("[")
    if not boxes1000:
        choose("]")
        return AnswerIds(ids, last)
    for i, (box, label) in enumerate(zip(boxes1000, labels, strict=True)):
        if i == 0:
            choose("{")
            forced('"bbox_2d": [')
        else:
            choose(",")
            forced(' {"bbox_2d": [')
        for k, v in enumerate(box):
            if isinstance(v, bool) or int(v) != v or not 0 <= int(v) <= 1000:
                raise ValueError(f"coordinates must be integers in 0..1000, got {list(box)}")
            for d in str(int(v)):
                choose(d)
            if k < 3:
                choose(",")
                forced(" ")
        last.append(len(ids) - 1)
        if not close:
            return AnswerIds(ids, last)
        choose("]")
        forced(', "label": "')
        ids.extend(tok.encode(label))
        choose('"')
        forced("}")
    choose("]")
    return AnswerIds(ids, last)


MAX_LABEL_CHARS = 64


def check_label(label: str) -> None:
    """A label the runtime's grammar can emit: 1..64 printable characters, no `"` or backslash."""
    if not 1 <= len(label) <= MAX_LABEL_CHARS:
        raise ValueError(f"label must have 1..{MAX_LABEL_CHARS} characters, got {label!r}")
    if any(c in '"\\' or ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F for c in label):
        raise ValueError(f"label {label!r} has a quote, backslash or control character")


def answer_text(boxes1000: Sequence[Sequence[int]], labels: Sequence[str]) -> str:
    """The decoded text of `grounding_answer_ids` (what parseBoxes reads)."""
    objs = [
        f'{{"bbox_2d": [{", ".join(str(int(v)) for v in b)}], "label": "{label}"}}'
        for b, label in zip(boxes1000, labels, strict=True)
    ]
    return "[" + ", ".join(objs) + "]"
