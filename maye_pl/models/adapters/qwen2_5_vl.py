"""Qwen2.5-VL (MAYE's model): ViT with window attention, 2x2 patch-merger connector, Qwen2 LLM."""

from __future__ import annotations

from maye_pl.models.adapters.base import ModelAdapter
from maye_pl.models.adapters.qwen2_vl import QWEN2_ROPE
from maye_pl.models.adapters.tiny_parts import tiny_qwen_processor, tiny_text_config, tiny_vision_config, tiny_vlm_config


def tiny_config(tokenizer):
    """Qwen2 text (hidden 64); ViT hidden 64, patch 14, window attention in block 0."""
    from transformers import Qwen2_5_VLConfig

    vision_config = tiny_vision_config(patch_size=14, window_size=112, fullatt_block_indexes=[1])
    text_config = tiny_text_config(tokenizer, rope_parameters=QWEN2_ROPE)
    return tiny_vlm_config(Qwen2_5_VLConfig, tokenizer, text_config, vision_config)


def tiny_processor(tokenizer, chat_template: str):
    from transformers import Qwen2_5_VLProcessor

    return tiny_qwen_processor(Qwen2_5_VLProcessor, tokenizer, chat_template, patch_size=14)


ADAPTER = ModelAdapter(
    family="Qwen2.5-VL", model_type="qwen2_5_vl", tiny_config=tiny_config, tiny_processor=tiny_processor
)
