"""Off-policy correction for rollouts sampled by an older policy (decoupled PPO).

Notation: b rows, T response tokens. Three policies score each sampled token:

    pi_behav  the engine's weights that sampled it (``Rollout.logprobs``; with
              ``rollout.max_staleness`` 1 one policy version behind, and in bf16 never bit-equal
              to the trainer's numerics)
    pi_old    the trainer's own log-probs before this update: the proximal policy that the PPO
              ratio r_t = pi_theta / pi_old is clipped around
    pi_theta  the policy being trained

Decoupled PPO (Hilton et al. 2022, "Batch size-invariance for policy optimization"; AReaL, Fu et
al. 2025) weights each token's clipped surrogate by the importance weight pi_old / pi_behav,
truncated at C so that a token the behaviour policy found unlikely cannot dominate the update
(truncated IS, as in verl's and AReaL's asynchronous recipes):

    w_t    = min(exp(old_t - behav_t), C)        (no gradient)
    loss_t = w_t * max(-A_t r_t, -A_t clip(r_t, 1 - eps_low, 1 + eps_high)) + beta * k3_t
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


class BehaviourWeightStats(NamedTuple):
    """Detached diagnostics of the untruncated ratio pi_old / pi_behav over valid tokens."""

    ratio_mean: Tensor
    """() mean ratio (1 when the engine sampled with the trainer's current weights)."""
    ratio_max: Tensor
    """() largest ratio."""
    clip_fraction: Tensor
    """() share of tokens whose ratio exceeds the cap C (their weight is C)."""


def truncated_importance_weights(
    old_logprobs: Tensor, behaviour_logprobs: Tensor, response_mask: Tensor, cap: float
) -> tuple[Tensor, BehaviourWeightStats]:
    """Per-token weights w_t = min(pi_old / pi_behav, cap), 0 on padding.

    Args:
        old_logprobs: (b, T) the trainer's log-probs before the update (proximal policy).
        behaviour_logprobs: (b, T) the sampling engine's log-probs of the same tokens.
        response_mask: (b, T) bool, True on valid tokens.
        cap: C > 0, the largest weight.

    Returns:
        ``(weights, stats)``: weights (b, T) fp32 without grad.
    """
    if cap <= 0:
        raise ValueError(f"truncated_importance_weights: cap={cap} must be > 0 (the largest weight C).")
    mask = response_mask.bool()
    ratio = torch.exp(old_logprobs.detach().float() - behaviour_logprobs.float()).masked_fill(~mask, 0.0)  # (b, T)
    count = mask.sum().clamp(min=1)
    stats = BehaviourWeightStats(
        ratio_mean=ratio.sum() / count,
        ratio_max=ratio.max() if mask.any() else ratio.new_zeros(()),
        clip_fraction=((ratio > cap) & mask).sum() / count,
    )
    return ratio.clamp(max=cap), stats
