"""The PPO-clip policy loss with MAYE's k3 KL penalty, accumulation-exact.

Notation: b rows of one micro-batch (a slice of a minibatch), T response tokens.

Per valid token t (Schulman et al. 2017, Eq. 7, as MAYE's ``PPOLoss``):
    r_t    = exp(lp_t - old_t)
    pg_t   = max(-A_t * r_t, -A_t * clip(r_t, 1 - eps_low, 1 + eps_high))
    loss_t = pg_t + kl_loss_coef * k3(pi || pi_ref)_t
A positive ``kl_loss_coef`` penalises drifting from the reference (MAYE: ``loss = policy_loss +
kl_loss_coeff * kl_loss``).

Gradient accumulation: a minibatch is split into micro-batches that each call ``ppo_clip_loss``
and backward their loss. Pass the WHOLE minibatch's count as ``normalizer`` (its valid tokens for
"token_mean", its rows for "seq_mean"); each micro-batch loss is then its partial sum over that
shared count, and the micro-batch losses (and gradients) add up to exactly the loss of the full
minibatch computed in one call with ``normalizer=None``. (MAYE instead divides each micro-batch's
own token mean by the accumulation steps, which weights tokens of short micro-batches more.)
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from maye_pl.rl.kl import kl_k3

LOSS_AGGREGATIONS = ("token_mean", "seq_mean")
"""The names ``ppo_clip_loss`` accepts as ``loss_agg``."""


class PPOLossStats(NamedTuple):
    """Detached scalar diagnostics of one micro-batch, each a mean over its valid tokens.

    They are token means of THIS micro-batch whatever ``loss_agg`` and ``normalizer`` are, so
    averaging them over micro-batches weights micro-batches equally (as MAYE's logging does).
    A micro-batch without valid tokens reports 0 for each.
    """

    policy_loss: Tensor
    """() PPO-clip surrogate pg_t (times the importance weight, when given), token mean."""
    kl_loss: Tensor
    """() k3(pi || pi_ref), token mean (before ``kl_loss_coef``)."""
    clip_fraction: Tensor
    """() share of tokens where the clipped term is larger (clipping binds), as MAYE's clipfrac."""
    ratio_mean: Tensor
    """() mean of r_t = exp(lp - old)."""
    approx_kl: Tensor
    """() 0.5 * mean((lp - old)^2), the old-vs-new policy KL estimate of MAYE's and torchtune's
    PPO recipes (``approx_policy_kls``)."""


def _check_loss_args(
    clip_eps_low: float, clip_eps_high: float, loss_agg: str, normalizer: float | Tensor | None
) -> None:
    problems = []
    if not 0 <= clip_eps_low < 1:
        problems.append(f"clip_eps_low={clip_eps_low} must be in [0, 1) (ratio floor 1 - it)")
    if clip_eps_high < 0:
        problems.append(f"clip_eps_high={clip_eps_high} must be >= 0")
    if loss_agg not in LOSS_AGGREGATIONS:
        problems.append(f"loss_agg={loss_agg!r} must be one of {list(LOSS_AGGREGATIONS)}")
    if normalizer is not None and float(normalizer) <= 0:
        problems.append(
            f"normalizer={float(normalizer)} must be > 0 (the minibatch's valid-token count for "
            "token_mean, its row count for seq_mean) or None"
        )
    if problems:
        raise ValueError("maye_pl/rl/loss.py ppo_clip_loss: " + "; ".join(problems) + ".")


def _token_mean(values: Tensor, mask: Tensor, count: Tensor) -> Tensor:
    return ((values * mask).sum() / count.clamp(min=1)).detach()


def ppo_clip_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    ref_logprobs: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    *,
    clip_eps_low: float = 0.2,
    clip_eps_high: float = 0.2,
    kl_loss_coef: float = 0.0,
    loss_agg: str = "token_mean",
    normalizer: float | Tensor | None = None,
    importance_weights: Tensor | None = None,
) -> tuple[Tensor, PPOLossStats]:
    """PPO-clip loss plus ``kl_loss_coef`` * k3 KL to the reference, aggregated over valid tokens.

    Args:
        logprobs: (b, T) log-probs under the policy being trained (with grad).
        old_logprobs: (b, T) log-probs under the policy that sampled (no grad).
        ref_logprobs: (b, T) log-probs under the frozen reference policy.
        advantages: (b, T).
        response_mask: (b, T) bool, True on valid tokens.
        clip_eps_low: the ratio is clipped from below at 1 - clip_eps_low.
        clip_eps_high: the ratio is clipped from above at 1 + clip_eps_high (> low = "clip-higher").
        kl_loss_coef: beta of the k3 KL loss (the paper runs 0.001).
        loss_agg: "token_mean": sum over valid tokens / normalizer (None -> this micro-batch's
            valid-token count); "seq_mean": sum over rows of each row's token mean / normalizer
            (None -> b). See the module docstring for gradient accumulation.
        normalizer: the whole minibatch's count when it is split into micro-batches.
        importance_weights: (b, T) per-token weights of the policy-gradient term (the off-policy
            correction, ``rl.truncated_importance_weights``); None = 1 (on-policy).

    Returns:
        ``(loss, stats)``: loss () fp32 with grad; stats as ``PPOLossStats``.
    """
    _check_loss_args(clip_eps_low, clip_eps_high, loss_agg, normalizer)
    mask = response_mask.float()  # (b, T)
    lp = logprobs.float()  # (b, T)
    old_lp = old_logprobs.float()  # (b, T)
    adv = advantages.float()  # (b, T)

    ratio = torch.exp(lp - old_lp)  # (b, T)
    unclipped = -adv * ratio  # (b, T)
    clipped = -adv * ratio.clamp(1.0 - clip_eps_low, 1.0 + clip_eps_high)  # (b, T)
    policy_loss = torch.maximum(unclipped, clipped)  # (b, T)
    if importance_weights is not None:
        policy_loss = importance_weights.detach().float() * policy_loss  # (b, T)
    kl = kl_k3(lp, ref_logprobs.float())  # (b, T)
    per_token = (policy_loss + kl_loss_coef * kl) * mask  # (b, T)

    if loss_agg == "token_mean":
        total = per_token.sum()
        count = mask.sum().clamp(min=1) if normalizer is None else normalizer
    else:
        row_means = per_token.sum(dim=1) / mask.sum(dim=1).clamp(min=1)  # (b,)
        total = row_means.sum()
        count = mask.shape[0] if normalizer is None else normalizer
    loss = total / count

    num_tokens = mask.sum()
    stats = PPOLossStats(
        policy_loss=_token_mean(policy_loss, mask, num_tokens),
        kl_loss=_token_mean(kl, mask, num_tokens),
        clip_fraction=_token_mean((clipped > unclipped).float(), mask, num_tokens),
        ratio_mean=_token_mean(ratio, mask, num_tokens),
        approx_kl=_token_mean(0.5 * (lp - old_lp).pow(2), mask, num_tokens),
    )
    return loss, stats
