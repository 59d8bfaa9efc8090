"""Qwen3-VL: ViT with learned position embeddings, a patch merger plus DeepStack mergers (ViT
features of intermediate blocks added into the first LLM layers: connectors too), Qwen3 LLM."""

from __future__ import annotations

from maye_pl.models.adapters.base import ModelAdapter
from maye_pl.models.adapters.qwen2_vl import qwen2_vl_processor

# Patch 16, merge 2: 1024 pixels per vision token; a 64 px image is 4 tokens, at most 16.
QWEN3_VL_PIXELS = {"min_pixels": 64 * 64, "max_pixels": 128 * 128}


def tiny_config(tokenizer):
    """Text hidden 64 (2 layers, 2 heads of 32, 1 KV head); ViT depth 2, hidden 64, patch 16, and
    a DeepStack merger on both ViT blocks."""
    from transformers import Qwen3VLConfig

    token_id = tokenizer.convert_tokens_to_ids
    text_config = {
        "vocab_size": len(tokenizer),
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "head_dim": 32,  # the smallest head vLLM's CPU attention accepts
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-6,
        # Interleaved M-RoPE over the 16 rotary frequencies of a 32-wide head (Qwen3-VL's layout).
        "rope_parameters": {
            "rope_type": "default", "rope_theta": 5e6, "mrope_section": [8, 4, 4], "mrope_interleaved": True,
        },
        "initializer_range": 0.1,  # peaked random logits (see the Qwen2-VL tiny build)
        "bos_token_id": token_id("<|endoftext|>"),
        "eos_token_id": token_id("<|im_end|>"),
        "pad_token_id": token_id("<|endoftext|>"),
        "dtype": "float32",
    }
    vision_config = {
        "depth": 2,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_heads": 2,
        "out_hidden_size": 64,  # = text hidden size
        "patch_size": 16,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "num_position_embeddings": 64,  # an 8 x 8 grid, interpolated to each image's patch grid
        "deepstack_visual_indexes": [0, 1],
        "dtype": "float32",
    }
    return Qwen3VLConfig(
        text_config=text_config,
        vision_config=vision_config,
        image_token_id=token_id("<|image_pad|>"),
        video_token_id=token_id("<|video_pad|>"),
        vision_start_token_id=token_id("<|vision_start|>"),
        vision_end_token_id=token_id("<|vision_end|>"),
        tie_word_embeddings=False,
        dtype="float32",
    )


def tiny_processor(tokenizer, chat_template: str):
    from transformers import Qwen3VLProcessor

    return qwen2_vl_processor(Qwen3VLProcessor, tokenizer, chat_template, QWEN3_VL_PIXELS, patch_size=16)


ADAPTER = ModelAdapter(
    family="Qwen3-VL",
    model_type="qwen3_vl",
    vit=("model.visual.",),
    connector=("model.visual.merger.", "model.visual.deepstack_merger_list."),
    llm=("model.language_model.", "lm_head."),
    shard_containers=("model.visual.blocks", "model.language_model.layers"),
    tiny_config=tiny_config,
    tiny_processor=tiny_processor,
)
