"""Rollout: the engine contract, the vLLM and HF engines, where engines run, and the pipeline
that feeds the trainer (``maye_pl.rollout.pipeline``; the Lightning callback around it is
``maye_pl.rollout.callback``).
"""

from maye_pl.rollout.base import RolloutEngine
from maye_pl.rollout.hf_engine import HFEngine
from maye_pl.rollout.placement import engine_devices, engine_environment
from maye_pl.rollout.vllm_engine import VLLMEngine, VLLMEngineError
from maye_pl.types import Rollout, RolloutRequest, SamplingConfig

__all__ = [
    "HFEngine",
    "Rollout",
    "RolloutEngine",
    "RolloutRequest",
    "SamplingConfig",
    "VLLMEngine",
    "VLLMEngineError",
    "engine_devices",
    "engine_environment",
]
