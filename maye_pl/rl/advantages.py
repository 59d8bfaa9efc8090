"""Token rewards, returns and advantages: Reinforce++ (and variants) without a critic.

Notation: B prompts, G samples per prompt, N = B*G rows in request-major order (prompt i owns rows
i*G .. i*G+G-1), T response tokens. ``response_mask`` (N, T) bool is True on valid tokens (first
stop token included) and is expected to be a prefix: valid tokens, then padding.

Reinforce++ (Hu, arXiv 2501.03262, Eq. 1): the per-token reward is
    r_t = -beta * KL_t            for every valid token t,
    r_T = score - beta * KL_T      at the last valid token (the EOS position),
the return is the discounted sum G_t = r_t + gamma * G_{t+1}, and the advantage is G_t normalised
over the batch. This follows torchtune's ``rlhf/rewards.py`` (``get_rewards_ppo``, ``whiten``) as
MAYE's copy modifies it (``maye.rlhf``: ``get_rewards_from_ref``, ``estimate_advantages``).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from maye_pl.rl.kl import kl_k3

WHITEN_EPS = 1e-8
"""Added to the variance before rsqrt, as torchtune/MAYE's ``whiten``."""
ADVANTAGE_ESTIMATORS = ("reinforce_pp", "reinforce_pp_baseline", "grpo", "dr_grpo")
"""The names ``estimate_advantages`` accepts."""


def token_rewards(scores: Tensor, kl: Tensor, response_mask: Tensor, kl_coef: float) -> Tensor:
    """Per-token rewards: -kl_coef * kl on valid tokens, plus the score on the last valid token.

    Args:
        scores: (N,) sequence scores.
        kl: (N, T) per-token KL estimate (values at padding are ignored).
        response_mask: (N, T) bool.
        kl_coef: beta of the KL reward (the paper runs 0).

    Returns:
        (N, T) fp32, 0 on padding. A row without valid tokens gets no score (there is no token to
        put it on), so all its rewards are 0.
    """
    mask = response_mask.float()  # (N, T)
    rewards = -kl_coef * kl.float() * mask  # (N, T)
    positions = torch.arange(mask.shape[1], device=mask.device)  # (T,)
    last = (positions * response_mask).argmax(dim=-1, keepdim=True)  # (N, 1)
    has_tokens = response_mask.any(dim=-1)  # (N,)
    score = torch.where(has_tokens, scores.float(), 0.0).unsqueeze(-1)  # (N, 1)
    return rewards.scatter_add(1, last, score)  # (N, T)


def discounted_returns(rewards: Tensor, response_mask: Tensor, gamma: float) -> Tensor:
    """Reward-to-go G_t = r_t + gamma * G_{t+1}, over valid tokens only.

    Args:
        rewards: (N, T) per-token rewards.
        response_mask: (N, T) bool (a prefix of valid tokens).
        gamma: discount factor (the paper runs 1).

    Returns:
        (N, T) fp32 returns, 0 on padding; padding rewards are ignored.
    """
    masked = rewards.float() * response_mask  # (N, T)
    returns = torch.zeros_like(masked)  # (N, T)
    running = torch.zeros_like(masked[:, 0])  # (N,)
    # A loop over T (not a cumsum of gamma^t-scaled rewards) because gamma^t underflows for long T.
    for t in reversed(range(masked.shape[1])):
        running = masked[:, t] + gamma * running
        returns[:, t] = running
    return returns * response_mask  # (N, T)


def _all_reduce_sum(tensor: Tensor, group: dist.ProcessGroup | None) -> Tensor:
    if group is not None:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
    return tensor


def masked_whiten(
    values: Tensor,
    mask: Tensor,
    *,
    shift_mean: bool = True,
    group: dist.ProcessGroup | None = None,
) -> Tensor:
    """Normalise ``values`` to unit variance over the valid tokens, zero on padding.

    Statistics: mean = sum / n and the unbiased variance sum((x - mean)^2) / (n - 1) over the
    n valid tokens, the same Bessel correction as torchtune's ``masked_var(unbiased=True)``
    (which MAYE's ``whiten`` uses). With ``group`` the sum, the count and then the sum of squared
    deviations are all-reduced over that process group, so the statistics are those of the GLOBAL
    batch (two passes rather than sum/sum-of-squares, which cancels catastrophically when the
    mean is large against the spread). Every rank of the group must call this.

    Naming trap: torchtune's and MAYE's ``whiten(shift_mean=True)`` ADD the mean back. Here the
    flag names what happens to the output: ``shift_mean=True`` gives zero mean; ``shift_mean=False``
    adds the mean back, so MAYE's ``whiten(x, mask)`` equals ``masked_whiten(x, mask,
    shift_mean=False)`` (up to MAYE's 1e-8 in the mean's denominator).

    Args:
        values: (N, T) float.
        mask: (N, T) bool, True on valid tokens.
        shift_mean: True: (x - mean) / std; False: (x - mean) / std + mean.
        group: a torch.distributed process group for global statistics; None = this process only.

    Returns:
        (N, T) fp32, 0 where ``mask`` is False.

    Raises:
        ValueError: fewer than 2 valid tokens (in the group): the unbiased variance is undefined.
    """
    x = values.float()  # (N, T)
    fmask = mask.float()  # (N, T)
    sum_count = _all_reduce_sum(torch.stack([(x * fmask).sum(), fmask.sum()]), group)  # (2,)
    total, count = sum_count[0], sum_count[1]
    if count.item() < 2:
        raise ValueError(
            f"maye_pl/rl/advantages.py masked_whiten: {int(count.item())} valid token(s) "
            f"({'global' if group is not None else 'local'}); the unbiased variance needs at least "
            "2. Pass more rows (prompts × samples per prompt) or check the response mask."
        )
    mean = total / count
    centered = (x - mean) * fmask  # (N, T)
    sq_dev = _all_reduce_sum(centered.pow(2).sum(), group)
    var = sq_dev / (count - 1)
    whitened = centered * torch.rsqrt(var + WHITEN_EPS)  # (N, T)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * fmask  # (N, T)


def reinforce_pp_advantages(
    scores: Tensor,
    logprobs: Tensor,
    ref_logprobs: Tensor,
    response_mask: Tensor,
    *,
    kl_coef: float,
    gamma: float,
    maye_compat: bool = False,
    group: dist.ProcessGroup | None = None,
) -> tuple[Tensor, Tensor]:
    """Reinforce++ advantages and returns (paper Eq. 1).

    The reward-side KL is k3 (``kl.kl_k3``), matching MAYE's ``get_rewards_from_ref`` (which
    replaced torchtune's k1 ``logprobs - ref_logprobs`` with the clamped k3); with the paper's
    ``kl_coef = 0`` the choice has no effect.

    Args:
        scores: (N,) sequence scores (penalties already applied).
        logprobs: (N, T) old policy log-probs of the sampled tokens.
        ref_logprobs: (N, T) reference policy log-probs.
        response_mask: (N, T) bool.
        kl_coef: beta of the per-token KL reward.
        gamma: discount factor.
        maye_compat: False (default): whiten the returns over the valid tokens of the GLOBAL batch
            (all-reduced over ``group``) to zero mean. True: MAYE's exact formula, whitening over
            this rank's rows only (``group`` ignored) and adding the mean back.
        group: process group spanning the data-parallel ranks; None = this process only.

    Returns:
        ``(advantages, returns)``, both (N, T) fp32 and 0 on padding; returns are not whitened.
    """
    kl = kl_k3(logprobs.float(), ref_logprobs.float())  # (N, T)
    rewards = token_rewards(scores, kl, response_mask, kl_coef)  # (N, T)
    returns = discounted_returns(rewards, response_mask, gamma)  # (N, T)
    if maye_compat:
        advantages = masked_whiten(returns, response_mask, shift_mean=False)
    else:
        advantages = masked_whiten(returns, response_mask, group=group)
    return advantages, returns


def _check_group_size(num_rows: int, group_size: int, caller: str) -> None:
    if group_size < 2 or num_rows % group_size != 0:
        raise ValueError(
            f"maye_pl/rl/advantages.py {caller}: group_size={group_size} (samples per prompt) "
            f"must be >= 2 and divide the number of rows N={num_rows}; a per-prompt baseline "
            "needs at least 2 samples of each prompt, stored request-major. Pass group_size >= 2."
        )


def reinforce_pp_baseline_advantages(
    scores: Tensor,
    logprobs: Tensor,
    ref_logprobs: Tensor,
    response_mask: Tensor,
    *,
    group_size: int,
    kl_coef: float,
    gamma: float,
    maye_compat: bool = False,
    group: dist.ProcessGroup | None = None,
) -> tuple[Tensor, Tensor]:
    """Reinforce++ with a per-prompt baseline: subtract the mean score of each prompt's G samples.

    Args:
        scores: (N,) with N = B*G, request-major (prompt i owns rows i*G .. i*G+G-1).
        group_size: G, samples per prompt.
        Others: as ``reinforce_pp_advantages``.

    Returns:
        ``(advantages, returns)``, both (N, T) fp32, 0 on padding.

    Raises:
        ValueError: ``group_size`` < 2 or not a divisor of N.
    """
    _check_group_size(scores.shape[0], group_size, "reinforce_pp_baseline_advantages")
    by_prompt = scores.float().view(-1, group_size)  # (B, G)
    centered = (by_prompt - by_prompt.mean(dim=1, keepdim=True)).view(-1)  # (N,)
    return reinforce_pp_advantages(
        centered,
        logprobs,
        ref_logprobs,
        response_mask,
        kl_coef=kl_coef,
        gamma=gamma,
        maye_compat=maye_compat,
        group=group,
    )


def grpo_advantages(
    scores: Tensor, response_mask: Tensor, *, group_size: int, eps: float = 1e-6
) -> tuple[Tensor, Tensor]:
    """GRPO outcome advantages: (score - prompt mean) / (prompt std + eps) on every valid token.

    The std is the unbiased one (``torch.std``), as DeepSeekMath's GRPO implementations (TRL,
    verl) use.

    Args:
        scores: (N,) with N = B*G, request-major.
        response_mask: (N, T) bool.
        group_size: G, samples per prompt.
        eps: keeps prompts whose samples all scored the same at advantage 0 instead of nan.

    Returns:
        ``(advantages, returns)``, both (N, T) fp32 and equal (GRPO has no separate return), 0 on
        padding.

    Raises:
        ValueError: ``group_size`` < 2 or not a divisor of N.
    """
    _check_group_size(scores.shape[0], group_size, "grpo_advantages")
    by_prompt = scores.float().view(-1, group_size)  # (B, G)
    mean = by_prompt.mean(dim=1, keepdim=True)  # (B, 1)
    std = by_prompt.std(dim=1, keepdim=True)  # (B, 1)
    normalised = (by_prompt - mean) / (std + eps)  # (B, G)
    advantages = normalised.view(-1, 1) * response_mask  # (N, T)
    return advantages, advantages


def dr_grpo_advantages(scores: Tensor, response_mask: Tensor, *, group_size: int) -> tuple[Tensor, Tensor]:
    """Dr. GRPO outcome advantages: score - prompt mean on every valid token, no std division.

    Dr. GRPO (Liu et al. 2025, "Understanding R1-Zero-Like Training", arXiv 2503.20783, Eq. 3)
    drops GRPO's division by the prompt's std, which weights prompts that are nearly always (or
    never) solved more; its other half, the constant loss normaliser, is the aggregation
    "seq_mean_token_sum_norm" (``rl.aggregation``).

    Args:
        scores: (N,) with N = B*G, request-major.
        response_mask: (N, T) bool.
        group_size: G, samples per prompt.

    Returns:
        ``(advantages, returns)``, both (N, T) fp32 and equal, 0 on padding.

    Raises:
        ValueError: ``group_size`` < 2 or not a divisor of N.
    """
    _check_group_size(scores.shape[0], group_size, "dr_grpo_advantages")
    by_prompt = scores.float().view(-1, group_size)  # (B, G)
    centered = by_prompt - by_prompt.mean(dim=1, keepdim=True)  # (B, G)
    advantages = centered.view(-1, 1) * response_mask  # (N, T)
    return advantages, advantages


def estimate_advantages(
    estimator: str,
    scores: Tensor,
    logprobs: Tensor,
    ref_logprobs: Tensor,
    response_mask: Tensor,
    *,
    kl_coef: float,
    gamma: float,
    group_size: int,
    maye_compat: bool,
    group: dist.ProcessGroup | None,
) -> tuple[Tensor, Tensor]:
    """Dispatch to an advantage estimator by name (one of ``ADVANTAGE_ESTIMATORS``).

    "grpo" and "dr_grpo" use only ``scores``, ``response_mask`` and ``group_size``; "reinforce_pp" ignores
    ``group_size``. Shapes and returns as the estimators'.
    """
    if estimator == "reinforce_pp":
        return reinforce_pp_advantages(
            scores,
            logprobs,
            ref_logprobs,
            response_mask,
            kl_coef=kl_coef,
            gamma=gamma,
            maye_compat=maye_compat,
            group=group,
        )
    if estimator == "reinforce_pp_baseline":
        return reinforce_pp_baseline_advantages(
            scores,
            logprobs,
            ref_logprobs,
            response_mask,
            group_size=group_size,
            kl_coef=kl_coef,
            gamma=gamma,
            maye_compat=maye_compat,
            group=group,
        )
    if estimator == "grpo":
        return grpo_advantages(scores, response_mask, group_size=group_size)
    if estimator == "dr_grpo":
        return dr_grpo_advantages(scores, response_mask, group_size=group_size)
    raise ValueError(
        f"maye_pl/rl/advantages.py estimate_advantages: unknown estimator={estimator!r}; choose "
        f"one of {list(ADVANTAGE_ESTIMATORS)}."
    )
