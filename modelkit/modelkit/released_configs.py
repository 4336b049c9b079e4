"""The configs of the released Qwen3-VL-2B/4B/8B-Instruct checkpoints, as data.

`modelkit random-pack` builds random-weight models with these exact widths, so benchmarks and
parity checks see real tensor shapes without downloading a checkpoint. Sources (the column sources of
the spec table in qwen3-vl-spec.md section 1.1; transformers' own class defaults match no released
size, so they are not used):

- 2B: text values from two independent copies of the 2B text config (the `Qwen3VLTextModel` default
  config labelled `p1atdev/Qwen3-VL-2B-Instruct-Text-Only`, and an Ascend ONNX export script for
  `./Qwen3-VL-2B-Instruct`); vision values from sglang-jax's `Qwen3VLVisionConfig` defaults, checked
  against onnxruntime-genai's qwen3-vl test graph (`image_features` width 2048) - high confidence
  but not byte-compared with the shipped config.json; `hidden_act` assumed as in 4B/8B.
- 4B: a verbatim copy of `Qwen/Qwen3-VL-4B-Instruct/config.json` vendored in a kohya-ss loader
  (`QWEN3_VL_4B_INSTRUCT_CONFIG`).
- 8B: the Qwen3-VL-8B-Instruct config vendored in NVIDIA/TensorRT-LLM
  `tests/unittest/_torch/modeling/test_modeling_qwen3vl.py` (@840c318), which cuts
  `num_hidden_layers` to 4 for the test and states 36 for the full model.
- Shared by all three (every source): patch 16, temporal patch 2, merge 2, 3 input channels, a
  48 x 48 position table, the special token ids (also transformers' Qwen3VLConfig defaults).
"""

from __future__ import annotations

from typing import Any

# Fields that differ between the three sizes: (2B, 4B, 8B).
_TEXT: dict[str, tuple[Any, Any, Any]] = {
    "hidden_size": (2048, 2560, 4096),
    "num_hidden_layers": (28, 36, 36),
    "num_attention_heads": (16, 32, 32),
    "intermediate_size": (6144, 9728, 12288),
}
_VISION: dict[str, tuple[Any, Any, Any]] = {
    "depth": (24, 24, 27),
    "hidden_size": (1024, 1024, 1152),
    "intermediate_size": (4096, 4096, 4304),
    "out_hidden_size": (2048, 2560, 4096),  # = the text hidden size
    "deepstack_visual_indexes": ([5, 11, 17], [5, 11, 17], [8, 16, 24]),
}
_TIE_WORD_EMBEDDINGS = (True, True, False)  # 8B has its own lm_head
SHAPES = ("qwen3-vl-2b", "qwen3-vl-4b", "qwen3-vl-8b")

# Fields all three share.
_TEXT_COMMON: dict[str, Any] = {
    "vocab_size": 151936,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "hidden_act": "silu",
    "rms_norm_eps": 1e-6,
    "max_position_embeddings": 262144,
    "attention_bias": False,
    # 64 rotary frequencies: 24 T / 20 H / 20 W, interleaved (THW x 20, then T x 4).
    "rope_parameters": {
        "rope_type": "default",
        "rope_theta": 5_000_000.0,
        "mrope_section": [24, 20, 20],
        "mrope_interleaved": True,
    },
    "bos_token_id": 151643,
    "eos_token_id": 151645,
}
_VISION_COMMON: dict[str, Any] = {
    "num_heads": 16,
    "hidden_act": "gelu_pytorch_tanh",
    "patch_size": 16,
    "temporal_patch_size": 2,
    "spatial_merge_size": 2,
    "in_channels": 3,
    "num_position_embeddings": 2304,
}
_TOP_COMMON: dict[str, Any] = {
    "image_token_id": 151655,
    "video_token_id": 151656,
    "vision_start_token_id": 151652,
    "vision_end_token_id": 151653,
}


def released_config(shape: str) -> dict[str, Any]:
    """The `Qwen3VLConfig` keyword arguments of one released checkpoint (fresh dicts, safe to edit)."""
    if shape not in SHAPES:
        raise ValueError(f"shape must be one of {', '.join(SHAPES)}, got {shape!r}")
    i = SHAPES.index(shape)
    text = {**_TEXT_COMMON, **{k: v[i] for k, v in _TEXT.items()}}
    text["rope_parameters"] = dict(text["rope_parameters"])
    text["rope_parameters"]["mrope_section"] = list(text["rope_parameters"]["mrope_section"])
    vision = {**_VISION_COMMON, **{k: v[i] for k, v in _VISION.items()}}
    vision["deepstack_visual_indexes"] = list(vision["deepstack_visual_indexes"])
    return {
        "text_config": text,
        "vision_config": vision,
        "tie_word_embeddings": _TIE_WORD_EMBEDDINGS[i],
        **_TOP_COMMON,
    }
