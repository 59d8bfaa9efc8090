"""Qwen2-VL: ViT (full attention), 2x2 patch-merger connector, Qwen2 LLM with M-RoPE."""

from __future__ import annotations

from maye_pl.models.adapters.base import ModelAdapter

# Pixel bounds of the tiny builds: a multiple of (patch 14 * merge 2)^2 = 784 pixels per vision
# token, so a 64 px image resizes to 56 x 56 (4 tokens) and no image exceeds 112 x 112 (16 tokens).
QWEN2_VL_PIXELS = {"min_pixels": 56 * 56, "max_pixels": 112 * 112}


def qwen2_text_config(tokenizer) -> dict:
    """The tiny Qwen2 decoder the Qwen2-VL and Qwen2.5-VL builds share."""
    token_id = tokenizer.convert_tokens_to_ids
    return {
        "vocab_size": len(tokenizer),
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,  # head size 32: the smallest vLLM's CPU attention accepts
        "num_key_value_heads": 1,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-6,
        # M-RoPE splits the 16 rotary frequencies of a 32-wide head over (time, height, width).
        "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [4, 6, 6]},
        # Wider than Qwen's 0.02 so a random model's next-token distribution is peaked enough for
        # greedy decoding to be unambiguous across engines (tiny fp32 differences cannot flip it).
        "initializer_range": 0.1,
        "bos_token_id": token_id("<|endoftext|>"),
        "eos_token_id": token_id("<|im_end|>"),
        "pad_token_id": token_id("<|endoftext|>"),
        "dtype": "float32",
    }


def qwen2_vl_processor(processor_class, tokenizer, chat_template: str, pixels: dict, patch_size: int = 14):
    """A Qwen-VL processor over the Qwen2-VL image and video processors with the given pixel bounds."""
    from transformers import Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    return processor_class(
        image_processor=Qwen2VLImageProcessor(**pixels, patch_size=patch_size),
        video_processor=Qwen2VLVideoProcessor(**pixels, patch_size=patch_size),
        tokenizer=tokenizer,
        chat_template=chat_template,
    )


def tiny_config(tokenizer):
    """Text as Qwen2.5-VL's tiny build; ViT embed 64 (2 heads of 32), merger into hidden 64."""
    from transformers import Qwen2VLConfig

    token_id = tokenizer.convert_tokens_to_ids
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
    return Qwen2VLConfig(
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
    from transformers import Qwen2VLProcessor

    return qwen2_vl_processor(Qwen2VLProcessor, tokenizer, chat_template, QWEN2_VL_PIXELS)


ADAPTER = ModelAdapter(
    family="Qwen2-VL",
    model_type="qwen2_vl",
    vit=("model.visual.",),
    connector=("model.visual.merger.",),
    llm=("model.language_model.", "lm_head."),
    shard_containers=("model.visual.blocks", "model.language_model.layers"),
    tiny_config=tiny_config,
    tiny_processor=tiny_processor,
)
