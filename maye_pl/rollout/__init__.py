"""Rollout: the engine contract, the vLLM and HF engines, and where the engine runs.

The callback that owns the engine during training lives in ``maye_pl.rollout.callback``.
"""

from maye_pl.rollout.base import Rollout, RolloutEngine, RolloutRequest, SamplingConfig
from maye_pl.rollout.hf_engine import HFEngine
from maye_pl.rollout.placement import choose_engine_device, engine_environment
from maye_pl.rollout.vllm_engine import VLLMEngine, VLLMEngineError

__all__ = [
    "HFEngine",
    "Rollout",
    "RolloutEngine",
    "RolloutRequest",
    "SamplingConfig",
    "VLLMEngine",
    "VLLMEngineError",
    "choose_engine_device",
    "engine_environment",
]
