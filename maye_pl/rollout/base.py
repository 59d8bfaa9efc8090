"""The rollout contract: what the trainer asks of any generation engine.

Notation: B prompts in a request list, G samples per prompt (``SamplingConfig.n``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch
from PIL import Image


@dataclass(frozen=True)
class SamplingConfig:
    """How to sample responses; maps 1:1 onto vLLM's ``SamplingParams``."""

    temperature: float = 1.0
    """Softmax temperature; the trainer scores with the same value."""
    top_p: float = 1.0
    """Nucleus sampling mass."""
    max_tokens: int = 2048
    """Maximum new tokens per response."""
    n: int = 1
    """Samples per prompt (G)."""
    seed: int | None = None
    """The run's sampling seed; None draws fresh randomness per call."""
    step: int | None = None
    """Generation step of the call (set by RolloutCallback); each sample's stream derives from
    (``seed``, ``step``, request, sample) by ``maye_pl.rollout.seeds.sampling_seed``; None = evaluation."""
    logprobs: bool = True
    """Return the engine's log-prob of each sampled token (for mismatch diagnostics)."""


@dataclass(frozen=True)
class RolloutRequest:
    """One prompt: chat-template text with exactly one image placeholder per image."""

    prompt: str
    images: list[Image.Image] = field(default_factory=list)


@dataclass
class Rollout:
    """One sampled response.

    The engine's ``logprobs`` are the behaviour policy's: the off-policy correction weights each
    token by ``min(π_old / π_behaviour, C)`` with them, and the engine/trainer mismatch metric
    compares them with the trainer's own scores.
    """

    token_ids: list[int]
    """Response token ids (T_i,), the stop token included when generation stopped on it."""
    text: str
    """Decoded response, special tokens skipped."""
    finish_reason: str
    """"stop" (hit EOS / a stop token) or "length" (ran into ``max_tokens``)."""
    logprobs: list[float] | None = None
    """Engine log-prob of each sampled token (T_i,), at the sampling temperature."""
    prompt_token_ids: list[int] | None = None
    """The engine's tokenization of the prompt (placeholders expanded), to check it equals the trainer's."""
    policy_version: int = 0
    """The policy version (optimizer steps taken) whose weights sampled this response."""


NamedTensors = list[tuple[str, torch.Tensor]]
"""One bucket of full (unsharded) weights under their HF names."""


@runtime_checkable
class RolloutHandle(Protocol):
    """A generation submitted to an engine and resolved later (``RolloutEngine.submit``)."""

    def done(self) -> bool:
        """True when ``result()`` would return (or raise) without waiting."""
        ...

    def result(self) -> list[Rollout]:
        """Wait for the B*G rollouts (request-major); raises the engine's error if it failed."""
        ...

    @property
    def engine_seconds(self) -> float | None:
        """Seconds the engine spent generating them (None until resolved, or when unknown)."""
        ...


class ResolvedHandle:
    """A ``RolloutHandle`` over rollouts that already exist (an engine without concurrency)."""

    def __init__(self, rollouts: list[Rollout], engine_seconds: float | None = None) -> None:
        self._rollouts = rollouts
        self.engine_seconds = engine_seconds

    def done(self) -> bool:
        return True

    def result(self) -> list[Rollout]:
        return self._rollouts


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
