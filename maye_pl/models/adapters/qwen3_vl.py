"""Qwen3-VL: ViT with learned position embeddings, a patch merger plus DeepStack mergers (ViT
features of intermediate blocks added into the first LLM layers: connectors too), Qwen3 LLM."""

from __future__ import annotations

from maye_pl.models.adapters.base import ModelAdapter
from maye_pl.models.adapters.tiny_parts import tiny_qwen_processor, tiny_text_config, tiny_vision_config, tiny_vlm_config

QWEN3_VISION = {"patch_size": 16, "num_position_embeddings": 64}  # an 8 x 8 grid, interpolated per image


def tiny_config(tokenizer):
    """Qwen3 text (hidden 64, heads of 32); ViT hidden 64, patch 16, a DeepStack merger on both blocks."""
    from transformers import Qwen3VLConfig

    text_config = tiny_text_config(
        tokenizer,
        head_dim=32,
        # Interleaved M-RoPE over the 16 rotary frequencies of a 32-wide head (Qwen3-VL's layout).
        rope_parameters={
            "rope_type": "default", "rope_theta": 5e6, "mrope_section": [8, 4, 4], "mrope_interleaved": True,
        },
    )
    vision_config = tiny_vision_config(**QWEN3_VISION, deepstack_visual_indexes=[0, 1])
    return tiny_vlm_config(Qwen3VLConfig, tokenizer, text_config, vision_config)


def tiny_processor(tokenizer, chat_template: str):
    from transformers import Qwen3VLProcessor

    return tiny_qwen_processor(Qwen3VLProcessor, tokenizer, chat_template, patch_size=16)


ADAPTER = ModelAdapter(
    family="Qwen3-VL",
    model_type="qwen3_vl",
    tiny_config=tiny_config,
    tiny_processor=tiny_processor,
    connector=("model.visual.merger.", "model.visual.deepstack_merger_list."),
)
