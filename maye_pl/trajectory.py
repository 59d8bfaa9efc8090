"""The Trajectory: everything the policy update needs, built once per rollout batch.

Notation: N = B*G rows on this rank (B prompts, G samples each, request-major), P prompt tokens
(left-padded), T response tokens (right-padded).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from maye_pl.models.forward import PolicyInputs, select_rows


@dataclass
class Trajectory:
    """One rollout batch, scored and ready for PPO epochs."""

    inputs: PolicyInputs
    """Prompt+response ids, attention mask, vision inputs; ``inputs.response_ids`` is (N, T)."""
    response_mask: torch.Tensor
    """(N, T) bool: True on valid response tokens, the stop token included."""
    old_logprobs: torch.Tensor
    """(N, T) log π_old of the sampled tokens (the policy that generated them), 0 on padding."""
    ref_logprobs: torch.Tensor
    """(N, T) log π_ref of the sampled tokens; equals ``old_logprobs`` when no reference is built."""
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
            old_logprobs=self.old_logprobs[rows],
            ref_logprobs=self.ref_logprobs[rows],
            scores=self.scores[rows],
            advantages=self.advantages[rows],
            returns=self.returns[rows],
            reward_components={name: values[rows] for name, values in self.reward_components.items()},
            penalized=self.penalized[rows],
        )
