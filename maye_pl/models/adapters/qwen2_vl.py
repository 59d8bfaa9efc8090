"""Qwen2-VL: ViT (full attention), 2x2 patch-merger connector, Qwen2 LLM with M-RoPE."""

from __future__ import annotations

from maye_pl.models.adapters.base import ModelAdapter
from maye_pl.models.adapters.tiny_parts import tiny_qwen_processor, tiny_text_config, tiny_vlm_config

# M-RoPE splits the 16 rotary frequencies of a 32-wide head over (time, height, width).
QWEN2_ROPE = {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [4, 6, 6]}


def tiny_config(tokenizer):
    """Qwen2 text (hidden 64); ViT embed 64 (2 heads of 32), patch 14, merger into hidden 64."""
    from transformers import Qwen2VLConfig

    vision_config = {
        "depth": 2,
        "embed_dim": 64,
        "hidden_size": 64,  # Qwen2-VL's name for the merger's output size (= text hidden size)
        "mlp_ratio": 2,
        "num_heads": 2,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "dtype": "float32",
    }
    text_config = tiny_text_config(tokenizer, rope_parameters=QWEN2_ROPE)
    return tiny_vlm_config(Qwen2VLConfig, tokenizer, text_config, vision_config)


def tiny_processor(tokenizer, chat_template: str):
    from transformers import Qwen2VLProcessor

    return tiny_qwen_processor(Qwen2VLProcessor, tokenizer, chat_template, patch_size=14)


ADAPTER = ModelAdapter(
    family="Qwen2-VL", model_type="qwen2_vl", tiny_config=tiny_config, tiny_processor=tiny_processor
)
