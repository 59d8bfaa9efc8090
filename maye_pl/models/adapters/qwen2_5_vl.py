"""Qwen2.5-VL (MAYE's model): ViT with window attention, 2x2 patch-merger connector, Qwen2 LLM."""

from __future__ import annotations

from maye_pl.models.adapters.base import ModelAdapter
from maye_pl.models.adapters.qwen2_vl import QWEN2_VL_PIXELS, qwen2_text_config, qwen2_vl_processor


def tiny_config(tokenizer):
    """Text hidden 64 (2 layers, 2 heads of 32: the smallest vLLM's CPU attention accepts), ViT 64."""
    from transformers import Qwen2_5_VLConfig

    token_id = tokenizer.convert_tokens_to_ids
    vision_config = {
        "depth": 2,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_heads": 2,
        "out_hidden_size": 64,  # = text hidden size: the merger projects into the LLM
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "window_size": 112,
        "fullatt_block_indexes": [1],
        "dtype": "float32",
    }
    return Qwen2_5_VLConfig(
        text_config=qwen2_text_config(tokenizer),
        vision_config=vision_config,
        image_token_id=token_id("<|image_pad|>"),
        video_token_id=token_id("<|video_pad|>"),
        vision_start_token_id=token_id("<|vision_start|>"),
        vision_end_token_id=token_id("<|vision_end|>"),
        tie_word_embeddings=False,
        dtype="float32",
    )


def tiny_processor(tokenizer, chat_template: str):
    from transformers import Qwen2_5_VLProcessor

    return qwen2_vl_processor(Qwen2_5_VLProcessor, tokenizer, chat_template, QWEN2_VL_PIXELS)


ADAPTER = ModelAdapter(
    family="Qwen2.5-VL",
    model_type="qwen2_5_vl",
    vit=("model.visual.",),
    connector=("model.visual.merger.",),
    llm=("model.language_model.", "lm_head."),
    shard_containers=("model.visual.blocks", "model.language_model.layers"),
    tiny_config=tiny_config,
    tiny_processor=tiny_processor,
)
