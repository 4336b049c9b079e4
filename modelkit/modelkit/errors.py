"""One error type for the modelkit: a code and a message that says what to do instead."""

from __future__ import annotations


class ModelkitError(Exception):
    """Raised for bad input; the CLI prints `CODE: message` and exits 2 without writing anything."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"
