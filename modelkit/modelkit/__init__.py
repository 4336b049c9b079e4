"""Builds qwen3-vl-seg-mcp model packs from Qwen3-VL checkpoints (see modelkit/README.md)."""

__version__ = "0.1.0"
