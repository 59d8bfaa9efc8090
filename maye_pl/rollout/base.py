"""The rollout contract: what the trainer asks of any generation engine.

Notation: B prompts in a request list, G samples per prompt (``SamplingConfig.n``).
"""

from __future__ import annotations

from collections.abc import Iterable
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
    """Sampling seed; None draws a fresh one per call."""
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

    The engine's ``logprobs`` are for diagnostics only (engine/trainer mismatch); the trainer
    recomputes old log-probs itself.
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


@runtime_checkable
class RolloutEngine(Protocol):
    """A generation engine the trainer drives (vLLM, HF ``generate``)."""

    def generate(self, requests: list[RolloutRequest], sampling: SamplingConfig) -> list[Rollout]:
        """Sample ``sampling.n`` responses per request.

        Returns B*G rollouts, request-major: request i's samples are ``[i*G:(i+1)*G]``.
        """
        ...

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load new policy weights (HF parameter names), streamed one tensor or bucket at a time."""
        ...

    def shutdown(self) -> None:
        """Release the engine and every process it started. Safe to call twice."""
        ...
