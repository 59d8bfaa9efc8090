"""Policy models: the tiny random Qwen2.5-VL builder, loading and freezing, the trainer-side forward."""

from maye_pl.models.tiny import build_tiny_qwen2_5_vl, ensure_tiny_model

__all__ = ["build_tiny_qwen2_5_vl", "ensure_tiny_model"]
