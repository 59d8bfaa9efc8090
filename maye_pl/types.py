"""The types every layer shares: what the trainer asks an engine for and what comes back.

Below ``models/``, ``rollout/``, ``strategies/`` and the module (``tests/test_layering.py`` keeps
it there): a data class here imports nothing of maye_pl.

Notation: B prompts in a request list, G samples per prompt (``SamplingConfig.n``), T_i tokens of
response i.
"""

from __future__ import annotations

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
    """Generation step of the call (set by the rollout pipeline); each sample's stream derives from
    (``seed``, ``step``, request, sample) by ``maye_pl.rollout.seeds.sampling_seed``; None = evaluation."""
    request_offset: int = 0
    """Index of the call's first request among all the requests of its generation step (every
    rank's, in rank order): request i of the call seeds as request ``request_offset + i``, so
    rollouts do not depend on which engine drew them (the pipeline sets it per engine group)."""
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
    """A ``RolloutHandle`` over rollouts that already exist (an engine without concurrency, or
    rollouts restored from a checkpoint)."""

    def __init__(self, rollouts: list[Rollout], engine_seconds: float | None = None) -> None:
        self._rollouts = rollouts
        self.engine_seconds = engine_seconds

    def done(self) -> bool:
        return True

    def result(self) -> list[Rollout]:
        return self._rollouts
