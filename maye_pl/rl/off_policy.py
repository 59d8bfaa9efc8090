"""Off-policy correction for rollouts the engine sampled: truncated or masked importance sampling.

Notation: b rows, T response tokens. Three policies score each sampled token:

    pi_behav  the engine's weights that sampled it (``Rollout.logprobs``; with
              ``rollout.max_staleness`` 1 one policy version behind, and in bf16 never bit-equal
              to the trainer's numerics)
    pi_old    the trainer's own log-probs before this update: the proximal policy that the
              policy loss's ratio pi_theta / pi_old is taken around
    pi_theta  the policy being trained

Decoupled PPO (Hilton et al. 2022, "Batch size-invariance for policy optimization"; AReaL, Fu et
al. 2025) weights each token's policy loss by the importance ratio rho = pi_old / pi_behav (no
gradient), bounded so that a token the behaviour policy found unlikely cannot dominate the update:

    level "token":     rho_t = exp(old_t - behav_t)
    level "sequence":  rho_i = exp(sum_t (old_it - behav_it)), the same for every token of row i
    mode "truncate":   w = min(rho, high)                          (truncated IS; verl's TIS)
    mode "mask":       w = rho if low <= rho <= high, else 0       (masked IS; verl's MIS: the
                                                                    token or response is dropped)
    loss_t = w_t * l_t(policy loss) + beta * k3_t

A masked token adds nothing to the loss but still counts in the aggregation's denominator.
"""

from __future__ import annotations

import torch
from torch import Tensor

OFF_POLICY_MODES = ("truncate", "mask")
"""How ``behaviour_weights`` bounds the ratio."""
OFF_POLICY_LEVELS = ("token", "sequence")
"""Where ``behaviour_weights`` takes the ratio."""


def behaviour_weights(
    old_logprobs: Tensor,
    behaviour_logprobs: Tensor,
    response_mask: Tensor,
    *,
    mode: str = "truncate",
    level: str = "token",
    low: float = 0.0,
    high: float = 2.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Importance weights of the sampled tokens from pi_old / pi_behav (module docstring).

    Args:
        old_logprobs: (b, T) the trainer's log-probs before the update (proximal policy).
        behaviour_logprobs: (b, T) the sampling engine's log-probs of the same tokens.
        response_mask: (b, T) bool, True on valid tokens.
        mode: "truncate" (min(rho, high)) or "mask" (rho inside [low, high], else 0).
        level: "token" (one ratio per token) or "sequence" (the product over the response).
        low: the smallest ratio kept by "mask" (truncation ignores it).
        high: the largest weight (truncate) or the largest ratio kept (mask); > 0.

    Returns:
        ``(weights, stats)``: weights (b, T) fp32 without grad, 0 on padding; stats of the
        unbounded ratio over valid tokens, detached (): ``ratio_mean``, ``ratio_max`` and
        ``clip_fraction`` (the share of tokens truncated or masked).
    """
    _check(mode, level, low, high)
    mask = response_mask.bool()
    log_ratio = (old_logprobs.detach().float() - behaviour_logprobs.float()).masked_fill(~mask, 0.0)  # (b, T)
    if level == "sequence":
        log_ratio = log_ratio.sum(dim=1, keepdim=True).expand_as(log_ratio)  # (b, T)
    ratio = torch.exp(log_ratio).masked_fill(~mask, 0.0)  # (b, T)
    if mode == "truncate":
        bounded = ratio > high  # (b, T)
        weights = ratio.clamp(max=high)
    else:
        bounded = (ratio < low) | (ratio > high)  # (b, T)
        weights = torch.where(bounded, 0.0, ratio)
    count = mask.sum().clamp(min=1)
    stats = {
        "ratio_mean": ratio.sum() / count,
        "ratio_max": ratio.max() if mask.any() else ratio.new_zeros(()),
        "clip_fraction": (bounded & mask).sum() / count,
    }
    return weights.masked_fill(~mask, 0.0), stats


def _check(mode: str, level: str, low: float, high: float) -> None:
    problems = []
    if mode not in OFF_POLICY_MODES:
        problems.append(f"mode={mode!r} must be one of {list(OFF_POLICY_MODES)}")
    if level not in OFF_POLICY_LEVELS:
        problems.append(f"level={level!r} must be one of {list(OFF_POLICY_LEVELS)}")
    if high <= 0:
        problems.append(f"high={high} must be > 0 (the largest weight)")
    if not 0 <= low <= high:
        problems.append(f"low={low} must lie in [0, high={high}] (the smallest ratio mask keeps)")
    if problems:
        raise ValueError("maye_pl/rl/off_policy.py behaviour_weights: " + "; ".join(problems) + ".")
