"""The pieces every family's tiny random build shares (``ModelAdapter.tiny_config`` /
``tiny_processor``): a 2-layer LLM, a depth-2 ViT, the vision token ids, a small-image processor.

``maye_pl.models.tiny`` writes the checkpoint (tokenizer, weights, processor) from them.
"""

from __future__ import annotations


def tiny_text_config(tokenizer, **family: object) -> dict:
    """The LLM part of a tiny config: 2 layers, 2 heads of 32 (the smallest head vLLM's CPU
    attention accepts), 1 KV head, hidden 64; ``family`` adds or overrides keys."""
    token_id = tokenizer.convert_tokens_to_ids
    return {
        "vocab_size": len(tokenizer),
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-6,
        # Wider than Qwen's 0.02 so a random model's next-token distribution is peaked enough for
        # greedy decoding to be unambiguous across engines (tiny fp32 differences cannot flip it).
        "initializer_range": 0.1,
        "bos_token_id": token_id("<|endoftext|>"),
        "eos_token_id": token_id("<|im_end|>"),
        "pad_token_id": token_id("<|endoftext|>"),
        "dtype": "float32",
        **family,
    }


def tiny_vision_config(**family: object) -> dict:
    """The ViT part of a tiny config: depth 2, hidden 64 (2 heads of 32), 2x2 merge into the
    LLM's hidden 64; ``family`` adds or overrides keys (patch size, merger width ...)."""
    return {
        "depth": 2,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_heads": 2,
        "out_hidden_size": 64,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "dtype": "float32",
        **family,
    }


def tiny_vlm_config(config_class, tokenizer, text_config: dict, vision_config: dict):
    """A Qwen-style VLM config: the two parts, the vision token ids from the tokenizer, fp32, untied."""
    token_id = tokenizer.convert_tokens_to_ids
    return config_class(
        text_config=text_config,
        vision_config=vision_config,
        image_token_id=token_id("<|image_pad|>"),
        video_token_id=token_id("<|video_pad|>"),
        vision_start_token_id=token_id("<|vision_start|>"),
        vision_end_token_id=token_id("<|vision_end|>"),
        tie_word_embeddings=False,
        dtype="float32",
    )


def tiny_qwen_processor(processor_class, tokenizer, chat_template: str, patch_size: int):
    """A Qwen-VL processor whose pixel bounds make 4 vision tokens of a 64 px image and at most 16.

    One token covers (patch * merge 2)^2 pixels: min 4 and max 16 tokens' worth, so a 64 px image
    resizes to 56 x 56 at patch 14 (stays 64 x 64 at patch 16).
    """
    from transformers import Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    side = 2 * patch_size
    pixels = {"min_pixels": 4 * side * side, "max_pixels": 16 * side * side, "patch_size": patch_size}
    return processor_class(
        image_processor=Qwen2VLImageProcessor(**pixels),
        video_processor=Qwen2VLVideoProcessor(**pixels),
        tokenizer=tokenizer,
        chat_template=chat_template,
    )
