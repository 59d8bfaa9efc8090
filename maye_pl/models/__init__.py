"""Policy models: the tiny random Qwen2.5-VL builder, loading and freezing, the trainer forward."""

from maye_pl.models.forward import PolicyInputs, build_policy_inputs, response_logprobs, select_rows
from maye_pl.models.loading import (
    freeze_modules,
    load_policy,
    load_processor,
    stop_token_ids,
    vision_token_ids,
)
from maye_pl.models.tiny import build_tiny_qwen2_5_vl, ensure_tiny_model

__all__ = [
    "PolicyInputs",
    "build_policy_inputs",
    "build_tiny_qwen2_5_vl",
    "ensure_tiny_model",
    "freeze_modules",
    "load_policy",
    "load_processor",
    "response_logprobs",
    "select_rows",
    "stop_token_ids",
    "vision_token_ids",
]
