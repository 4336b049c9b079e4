"""The pack's `tokenizer.json` through the `tokenizers` library, with the runtime's two encodings.

`encode` recognises added tokens (`<|im_start|>`, `<|image_pad|>`, ...) and is used for prompt
templates; `encode_plain` does not (src/runtime/tokenizer.ts's encodePlain), so user text such as an
expression containing "<|im_end|>" stays ordinary BPE tokens. Neither adds a BOS (Qwen has none).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from tokenizers import Tokenizer

from .errors import ModelkitError


class TextTokenizer:
    def __init__(self, folder: Path, file: str = "tokenizer.json") -> None:
        path = Path(folder) / file
        if not path.is_file():
            raise ModelkitError("TOKENIZER_INVALID", f"{folder} has no {file}; pass --tokenizer DIR")
        self.tok = Tokenizer.from_file(os.fspath(path))

    def encode(self, text: str) -> list[int]:
        return list(self.tok.encode(text, add_special_tokens=False).ids)

    def encode_plain(self, text: str) -> list[int]:
        """Normaliser, pre-tokeniser and BPE only: the added-token matcher never sees `text`."""
        tok = self.tok
        normalized = text if tok.normalizer is None else tok.normalizer.normalize_str(text)
        pieces = (
            [(normalized, (0, len(normalized)))]
            if tok.pre_tokenizer is None
            else tok.pre_tokenizer.pre_tokenize_str(normalized)
        )
        return [t.id for piece, _ in pieces for t in tok.model.tokenize(piece)]

    def decode(self, ids: Sequence[int]) -> str:
        return str(self.tok.decode(list(ids), skip_special_tokens=True))

    def token_text(self, token: int) -> str:
        return str(self.tok.decode([int(token)], skip_special_tokens=False))
