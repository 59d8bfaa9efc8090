"""Policy losses under one signature, registered by name in ``POLICY_LOSSES``.

Notation: b rows of one micro-batch, T response tokens, |y_i| the valid tokens of row i;
lp = log π_θ (with grad), old = log π_old (the proximal policy), A the advantages, sg = stop-gradient.

    f(logprobs, old_logprobs, advantages, mask, *, clip_low, clip_high, **options) -> (loss, stats)

Every loss takes these options: ``agg``, ``normalizer``, ``max_tokens`` (the aggregation,
``rl.aggregation``: exact under gradient accumulation and across ranks) and ``weights``, the
(b, T) off-policy weights π_old/π_behaviour (``rl.off_policy``, no gradient) that multiply each
token's loss. ``stats`` holds detached () token means over THIS micro-batch's valid tokens
(``policy_loss``, ``clip_fraction``, ``ratio_mean``, ``approx_kl``), whatever the aggregation.

ppo_clip (Schulman et al. 2017, Eq. 7; clip_high > clip_low is DAPO's clip-higher):
    r_t = exp(lp_t - old_t),   l_t = max(-A_t r_t, -A_t clip(r_t, 1 - ε_low, 1 + ε_high))
    A clipped token (the clipped term is the larger) has no gradient.

gspo (Zheng et al. 2025, arXiv 2507.18071, GSPO-token, Eq. 13-14):
    s_i = exp(sum_t (lp_it - old_it) / |y_i|)              the length-normalised sequence ratio
    s_it = sg[s_i] · exp(lp_it - sg[lp_it])                value s_i, gradient s_i ∇lp_it
    l_it = max(-A_it s_it, -A_it clip(s_it, 1 - ε_low, 1 + ε_high))
    A whole response clips together. With one advantage per response and "seq_mean_token_mean"
    it is GSPO's sequence objective mean_i max(-A_i s_i, -A_i clip(s_i, ...)) in value and
    gradient; per-token advantages (Reinforce++ with γ < 1 or a KL reward) still work.
    The paper's ranges are tiny: ε_low 3e-4, ε_high 4e-4 (configs/recipes/gspo.yaml).

cispo (MiniMax-M1, arXiv 2506.13585, Eq. 4-5):
    r̂_t = clip(r_t, 1 - ε_low, 1 + ε_high),   l_t = -sg[r̂_t] A_t lp_t
    The clipped ratio is only a coefficient: every token keeps its gradient r̂_t A_t ∇lp_t. Its
    value is not a PPO surrogate's (it scales with lp); compare ``loss/policy`` within a loss only.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from maye_pl.rl.aggregation import aggregate
from maye_pl.rl.kl import kl_k3

PolicyLoss = Callable[..., tuple[Tensor, dict[str, Tensor]]]


def ppo_clip(
    logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, *, clip_low: float, clip_high: float,
    **options,
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO's clipped surrogate per token (module docstring).

    Args:
        logprobs: (b, T) log π_θ of the sampled tokens, with grad.
        old_logprobs: (b, T) log π_old, no grad.
        advantages: (b, T).
        mask: (b, T) bool, True on valid tokens.
        clip_low: ε_low in [0, 1]: the ratio's floor is 1 - ε_low.
        clip_high: ε_high >= 0: the ratio's ceiling is 1 + ε_high.
        **options: ``agg``, ``normalizer``, ``max_tokens``, ``weights`` (module docstring).

    Returns:
        ``(loss, stats)``: loss () fp32 with grad; stats as the module docstring lists.
    """
    _check_clip("ppo_clip", clip_low, clip_high)
    ratio = torch.exp(logprobs.float() - old_logprobs.float())  # (b, T)
    return _clipped_surrogate(ratio, logprobs, old_logprobs, advantages, mask, clip_low, clip_high, options)


def gspo(
    logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, *, clip_low: float, clip_high: float,
    **options,
) -> tuple[Tensor, dict[str, Tensor]]:
    """GSPO-token: PPO's clipped surrogate on the sequence ratio s_i (module docstring).

    Arguments and returns as ``ppo_clip``'s; ``ratio_mean`` is the mean of s_i over tokens.
    """
    _check_clip("gspo", clip_low, clip_high)
    lp, fmask = logprobs.float(), mask.float()
    log_ratio = (lp - old_logprobs.float()) * fmask  # (b, T)
    seq_log_ratio = log_ratio.sum(dim=1) / fmask.sum(dim=1).clamp(min=1)  # (b,) log s_i
    ratio = torch.exp(seq_log_ratio.detach().unsqueeze(1) + lp - lp.detach())  # (b, T) s_it
    return _clipped_surrogate(ratio, logprobs, old_logprobs, advantages, mask, clip_low, clip_high, options)


def cispo(
    logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, *, clip_low: float, clip_high: float,
    **options,
) -> tuple[Tensor, dict[str, Tensor]]:
    """CISPO: REINFORCE with the clipped importance ratio as a stop-gradient coefficient (module docstring).

    Arguments and returns as ``ppo_clip``'s; ``clip_fraction`` is the share of tokens whose ratio
    left [1 - ε_low, 1 + ε_high] (their coefficient is the bound; their gradient stays).
    """
    _check_clip("cispo", clip_low, clip_high)
    lp = logprobs.float()
    ratio = torch.exp(lp - old_logprobs.float()).detach()  # (b, T)
    coefficient = ratio.clamp(1.0 - clip_low, 1.0 + clip_high)  # (b, T) r̂_t, no grad
    per_token = -coefficient * advantages.float() * lp  # (b, T)
    return _finish(per_token, ratio, coefficient != ratio, logprobs, old_logprobs, mask, options)


POLICY_LOSSES: dict[str, PolicyLoss] = {"ppo_clip": ppo_clip, "gspo": gspo, "cispo": cispo}
"""Every policy loss by the name ``model.loss.policy_loss`` takes."""


def kl_loss(logprobs: Tensor, ref_logprobs: Tensor, mask: Tensor, **aggregation) -> tuple[Tensor, Tensor]:
    """MAYE's k3 KL(π‖π_ref) loss term, aggregated like the policy loss (``agg``, ``normalizer``,
    ``max_tokens``); returns it () with grad and its detached token mean (for logging)."""
    kl = kl_k3(logprobs.float(), ref_logprobs.float())  # (b, T)
    return aggregate(kl, mask, **aggregation), _token_mean(kl, mask)


def _clipped_surrogate(
    ratio: Tensor, logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor,
    clip_low: float, clip_high: float, options: dict,
) -> tuple[Tensor, dict[str, Tensor]]:
    """max(-A ratio, -A clip(ratio)) per token, then ``_finish``; ``ratio`` (b, T) carries the gradient."""
    adv = advantages.float()
    unclipped = -adv * ratio  # (b, T)
    clipped = -adv * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)  # (b, T)
    per_token = torch.maximum(unclipped, clipped)  # (b, T)
    return _finish(per_token, ratio, clipped > unclipped, logprobs, old_logprobs, mask, options)


def _finish(
    per_token: Tensor, ratio: Tensor, clipped: Tensor, logprobs: Tensor, old_logprobs: Tensor, mask: Tensor,
    options: dict,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Weight (off-policy), aggregate, and the statistics every loss reports."""
    weights = options.pop("weights", None)
    if weights is not None:
        per_token = weights.detach().float() * per_token  # (b, T)
    unknown = set(options) - {"agg", "normalizer", "max_tokens"}
    if unknown:
        raise TypeError(f"maye_pl/rl/policy_loss.py: unknown options {sorted(unknown)}; a policy loss takes "
                        "agg, normalizer, max_tokens and weights.")
    loss = aggregate(per_token, mask, **options)
    log_ratio = logprobs.float() - old_logprobs.float()  # (b, T)
    stats = {
        "policy_loss": _token_mean(per_token, mask),
        "clip_fraction": _token_mean(clipped.float(), mask),
        "ratio_mean": _token_mean(ratio, mask),
        "approx_kl": _token_mean(0.5 * log_ratio.pow(2), mask),
    }
    return loss, stats


def _token_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Detached mean of ``values`` over the valid tokens; 0 when there are none."""
    fmask = mask.float()
    return ((values.detach().float() * fmask).sum() / fmask.sum().clamp(min=1)).detach()


def _check_clip(name: str, clip_low: float, clip_high: float) -> None:
    problems = []
    if not 0 <= clip_low <= 1:
        problems.append(f"clip_low={clip_low} must lie in [0, 1] (the ratio's floor 1 - clip_low; 1 = no floor)")
    if clip_high < 0:
        problems.append(f"clip_high={clip_high} must be >= 0 (the ratio's ceiling 1 + clip_high)")
    if problems:
        raise ValueError(f"maye_pl/rl/policy_loss.py {name}: " + "; ".join(problems) + ".")
