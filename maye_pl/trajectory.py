"""The Trajectory: everything the policy update needs, built once per rollout batch.

Notation: N = B*G rows on this rank (B prompts, G samples each, request-major), P prompt tokens
(left-padded), T response tokens (right-padded).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from maye_pl.models.forward import PolicyInputs, select_rows
from maye_pl.types import Rollout


@dataclass
class Trajectory:
    """One rollout batch, scored and ready for PPO epochs."""

    inputs: PolicyInputs
    """Prompt+response ids, attention mask, vision inputs; ``inputs.response_ids`` is (N, T)."""
    response_mask: torch.Tensor
    """(N, T) bool: True on valid response tokens, the stop token included."""
    old_logprobs: torch.Tensor | None
    """(N, T) log π_old of the sampled tokens: the trainer's policy before this update (the proximal
    policy), 0 on padding. None until Step IV fills it in when its own first forward stands in
    for Step III.2 (one PPO epoch of one minibatch, no KL reward)."""
    ref_logprobs: torch.Tensor | None
    """(N, T) log π_ref of the sampled tokens; None when no reference is built (no KL term)."""
    behaviour_logprobs: torch.Tensor | None
    """(N, T) the engine's log-probs of the sampled tokens (the behaviour policy), 0 on padding;
    None when the engine returned none."""
    staleness: torch.Tensor
    """(N,) optimizer steps between the weights that sampled each response and the policy now."""
    scores: torch.Tensor
    """(N,) sequence scores after the length penalty."""
    advantages: torch.Tensor
    """(N, T) advantages, 0 on padding."""
    returns: torch.Tensor
    """(N, T) discounted returns, 0 on padding."""
    reward_components: dict[str, torch.Tensor]
    """Each reward term's (N,) values before weighting and penalty (for logging)."""
    penalized: torch.Tensor
    """(N,) bool: the score was replaced by the length penalty (no stop token or too short)."""

    @property
    def num_rows(self) -> int:
        return self.scores.shape[0]

    def select(self, rows: torch.Tensor) -> Trajectory:
        """The trajectory restricted to ``rows`` (a 1-D index tensor); vision inputs re-collated."""
        return Trajectory(
            inputs=select_rows(self.inputs, rows),
            response_mask=self.response_mask[rows],
            old_logprobs=_rows(self.old_logprobs, rows),
            ref_logprobs=_rows(self.ref_logprobs, rows),
            behaviour_logprobs=_rows(self.behaviour_logprobs, rows),
            staleness=self.staleness[rows],
            scores=self.scores[rows],
            advantages=self.advantages[rows],
            returns=self.returns[rows],
            reward_components={name: values[rows] for name, values in self.reward_components.items()},
            penalized=self.penalized[rows],
        )


def _rows(values: torch.Tensor | None, rows: torch.Tensor) -> torch.Tensor | None:
    return None if values is None else values[rows]


def engine_logprobs(rollouts: list[Rollout], response_mask: torch.Tensor) -> torch.Tensor | None:
    """(N, T) the engine's log-prob of each sampled token, 0 past ``response_mask``; None when any
    rollout lacks them (``SamplingConfig.logprobs`` off)."""
    if any(rollout.logprobs is None for rollout in rollouts):
        return None
    logprobs = torch.zeros(response_mask.shape, dtype=torch.float32)
    for row, rollout in enumerate(rollouts):
        width = min(len(rollout.logprobs), logprobs.shape[1])
        logprobs[row, :width] = torch.tensor(rollout.logprobs[:width], dtype=torch.float32)
    return logprobs.to(response_mask.device) * response_mask
