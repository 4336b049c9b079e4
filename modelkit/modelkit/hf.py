"""Loading Qwen3-VL models from Hugging Face checkpoint folders, and building tiny random ones.

The reference implementation is transformers' own `Qwen3VLForConditionalGeneration`; everything the
modelkit exports is checked against it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

from .errors import ModelkitError

QWEN3_VL_MODEL_TYPE = "qwen3_vl"


def small_config(
    *,
    text_hidden: int,
    text_mlp: int,
    text_layers: int,
    vision_depth: int,
    vision_hidden: int,
    vision_mlp: int,
    vision_heads: int,
) -> Qwen3VLConfig:
    """A small Qwen3-VL with the real vocabulary and token ids, real patch/merge sizes and 48x48 pos
    table, tied embeddings, DeepStack taps after vision blocks 1, 2, 3 (so text_layers >= 3), GQA 4/2
    with head_dim 32 and interleaved M-RoPE section [6, 5, 5] (sums to head_dim / 2, like [24, 20, 20]
    for 128)."""
    return Qwen3VLConfig(
        text_config=dict(
            vocab_size=151936,
            hidden_size=text_hidden,
            intermediate_size=text_mlp,
            num_hidden_layers=text_layers,
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
            depth=vision_depth,
            hidden_size=vision_hidden,
            intermediate_size=vision_mlp,
            num_heads=vision_heads,
            out_hidden_size=text_hidden,
            deepstack_visual_indexes=[1, 2, 3],
            patch_size=16,
            temporal_patch_size=2,
            spatial_merge_size=2,
            num_position_embeddings=2304,
        ),
        tie_word_embeddings=True,
    )


def tiny_config() -> Qwen3VLConfig:
    """A Qwen3-VL small enough for golden fixtures: text hidden 32 x 4 layers, vision 5 blocks x 32."""
    return small_config(
        text_hidden=32,
        text_mlp=64,
        text_layers=4,
        vision_depth=5,
        vision_hidden=32,
        vision_mlp=64,
        vision_heads=2,
    )


def build_random_model(
    config: Qwen3VLConfig, seed: int, weight_scale: float = 1.0
) -> Qwen3VLForConditionalGeneration:
    """Instantiate a random-weight model with transformers itself.

    `weight_scale` multiplies every weight matrix after the library's own init (std 0.02), so that a
    random model has decisive argmaxes: with std 0.02 the 151,936 logits are nearly tied and greedy
    tokens would hinge on float rounding, which makes a poor parity test.
    """
    torch.manual_seed(seed)
    model = Qwen3VLForConditionalGeneration(config).eval()
    if weight_scale != 1.0:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.dim() >= 2 and "norm" not in name:
                    p.mul_(weight_scale)
    return model


def read_config(checkpoint: Path) -> dict[str, Any]:
    cfg_path = checkpoint / "config.json"
    if not checkpoint.is_dir():
        raise ModelkitError("CHECKPOINT_INVALID", f"checkpoint folder {checkpoint} does not exist")
    if not cfg_path.is_file():
        raise ModelkitError(
            "CHECKPOINT_INVALID",
            f"{checkpoint} has no config.json; pass the folder of a Hugging Face Qwen3-VL checkpoint",
        )
    try:
        cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise ModelkitError("CHECKPOINT_INVALID", f"{cfg_path} is not valid JSON: {e}") from e
    model_type = cfg.get("model_type")
    if model_type != QWEN3_VL_MODEL_TYPE:
        raise ModelkitError(
            "CHECKPOINT_INVALID",
            f"{cfg_path} has model_type {model_type!r}; only {QWEN3_VL_MODEL_TYPE!r} "
            "(Qwen3-VL-2B/4B/8B-Instruct and their fine-tunes) can be exported",
        )
    return cfg


def load_checkpoint(checkpoint: Path) -> Qwen3VLForConditionalGeneration:
    """Load a Qwen3-VL checkpoint folder in float32 on the CPU, with clear errors for bad folders."""
    read_config(checkpoint)
    weights = list(checkpoint.glob("*.safetensors")) + list(checkpoint.glob("*.bin"))
    if not weights:
        raise ModelkitError(
            "CHECKPOINT_INVALID", f"{checkpoint} has config.json but no weights (*.safetensors or *.bin)"
        )
    try:
        model = Qwen3VLForConditionalGeneration.from_pretrained(
            checkpoint, dtype=torch.float32, low_cpu_mem_usage=True
        )
    except Exception as e:  # transformers raises many types; the user needs the message
        raise ModelkitError("CHECKPOINT_INVALID", f"could not load {checkpoint}: {e}") from e
    return model.eval()
