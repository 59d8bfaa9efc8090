"""FSDP2 training for HF vision-language models: strategy, clipping, weight streaming.

(Building a model on the meta device and loading it rank-0-first is ``maye_pl.models.loading``.)
"""

from lightning.pytorch.strategies import StrategyRegistry

from maye_pl.strategies.fsdp2 import HF_PATHS_KEY, FSDP2Strategy, hf_models, shard_hf_model
from maye_pl.strategies.grad_clip import clip_grad_norm_
from maye_pl.strategies.weight_sync import (
    Relay,
    SyncStats,
    WeightSyncPlan,
    hf_name,
    iter_full_parameters,
    sync_weights,
)

__all__ = [
    "HF_PATHS_KEY",
    "FSDP2Strategy",
    "Relay",
    "SyncStats",
    "WeightSyncPlan",
    "clip_grad_norm_",
    "hf_models",
    "hf_name",
    "iter_full_parameters",
    "shard_hf_model",
    "sync_weights",
]

# `--trainer.strategy fsdp2` (or `strategy: fsdp2` in YAML) selects FSDP2Strategy with its defaults;
# `class_path: maye_pl.strategies.FSDP2Strategy` + `init_args` sets its options.
if "fsdp2" not in StrategyRegistry:
    StrategyRegistry.register("fsdp2", FSDP2Strategy, description="maye_pl's FSDP2 sharding of HF vision-language models")
