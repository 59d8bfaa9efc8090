"""The rollout contract: what the trainer asks of any generation engine.

The types it speaks (``RolloutRequest``, ``SamplingConfig``, ``Rollout``, ``RolloutHandle``,
``NamedTensors``) live in ``maye_pl.types``, below every layer that uses them.
Notation: B prompts in a request list, G samples per prompt (``SamplingConfig.n``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from typing import Protocol, runtime_checkable

import torch

from maye_pl.types import NamedTensors, Rollout, RolloutHandle, RolloutRequest, SamplingConfig


@runtime_checkable
class RolloutEngine(Protocol):
    """A generation engine the trainer drives (vLLM, HF ``generate``).

    Generation is submitted and resolved later, so the trainer can work while the engine samples;
    operations reach the engine in the order they are issued, so a weight update issued after a
    submit never changes the weights that submission samples with. A weight update is one
    transaction: ``with engine.weight_update() as push: push(bucket) ...`` loads every bucket and
    finishes once at the end (one finalize, one cache reset). An error inside the block aborts the
    transaction; an engine that cannot roll back a partial update shuts itself down rather than
    serve half-updated weights.
    """

    def submit(self, requests: list[RolloutRequest], sampling: SamplingConfig, *, policy_version: int = 0) -> RolloutHandle:
        """Start sampling ``sampling.n`` responses per request; returns at once (or when done, for
        an engine without concurrency). ``policy_version`` is stamped on every rollout."""
        ...

    def generate(self, requests: list[RolloutRequest], sampling: SamplingConfig, *, policy_version: int = 0) -> list[Rollout]:
        """``submit(...).result()``: B*G rollouts, request-major (request i's samples are ``[i*G:(i+1)*G]``)."""
        ...

    def weight_update(self) -> AbstractContextManager[Callable[[NamedTensors], None]]:
        """One weight-update transaction; the context yields ``push(bucket)`` (HF names, full
        tensors, consumed before ``push`` returns)."""
        ...

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load new policy weights (HF parameter names) in one ``weight_update`` transaction."""
        ...

    def shutdown(self) -> None:
        """Release the engine and every process it started. Safe to call twice."""
        ...
