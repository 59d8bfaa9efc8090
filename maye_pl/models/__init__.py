"""Policy models: one adapter per family, the tiny random builds, loading (also on the meta device) and freezing, the trainer forward."""

from maye_pl.models.adapters import ADAPTERS, ModelAdapter, adapter_for
from maye_pl.models.forward import PolicyInputs, build_policy_inputs, response_logprobs, select_rows
from maye_pl.models.loading import (
    freeze_modules,
    has_meta_tensors,
    init_empty_pretrained,
    load_policy,
    load_pretrained_weights,
    load_processor,
    stop_token_ids,
)
from maye_pl.models.tiny import build_tiny_model, ensure_tiny_model

__all__ = [
    "ADAPTERS",
    "ModelAdapter",
    "PolicyInputs",
    "adapter_for",
    "build_policy_inputs",
    "build_tiny_model",
    "ensure_tiny_model",
    "freeze_modules",
    "has_meta_tensors",
    "init_empty_pretrained",
    "load_policy",
    "load_pretrained_weights",
    "load_processor",
    "response_logprobs",
    "select_rows",
    "stop_token_ids",
]
