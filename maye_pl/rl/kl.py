"""Per-token estimators of KL(pi || pi_ref) from the log-probs of the sampled tokens.

Notation: N rows, T response tokens. All functions map two (N, T) tensors to (N, T); none masks
padding, the caller does. Names follow Schulman, "Approximating KL Divergence" (2020).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

K3_LOG_RATIO_BOUND = 10.0
"""|ref - lp| is clamped to this before exp, so exp (and its backward) stays finite."""
K3_VALUE_BOUND = 10.0
"""k3 values are clamped to [-10, 10] as MAYE does (see ``kl_k3``)."""


def kl_k1(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """k1 = lp - ref: unbiased, high variance, can be negative per token."""
    return logprobs - ref_logprobs


def kl_k2(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """k2 = 1/2 (lp - ref)^2: biased, low variance, never negative."""
    return 0.5 * (logprobs - ref_logprobs).pow(2)


def kl_k3(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """k3 = exp(ref - lp) - (ref - lp) - 1: unbiased, low variance, never negative.

    Clamps, and where they come from:
    - the value is clamped to [-10, 10] as MAYE does: ``maye.rlhf.get_rewards_from_ref`` computes
      ``kl = (ratio - 1) - log_ratio`` with ``log_ratio = ref_logprobs - logprobs`` and then
      ``torch.clamp(kl, min=-10, max=10)`` per token (MAYE's ``PPOLoss`` clamps the micro-batch
      mean of the same k3 to [-10, 10] instead);
    - ``ref - lp`` is clamped to [-10, 10] before ``exp`` (ours, also what verl's ``low_var_kl``
      does): without it a large log-ratio overflows exp to inf and the clamp's zero gradient times
      inf gives nan in backward. The value then differs from MAYE's only where ref - lp < -10
      (k3 = 9.00005 here, between 9.00005 and 10 in MAYE).
    """
    log_ratio = (ref_logprobs - logprobs).clamp(-K3_LOG_RATIO_BOUND, K3_LOG_RATIO_BOUND)
    return (log_ratio.exp() - log_ratio - 1).clamp(-K3_VALUE_BOUND, K3_VALUE_BOUND)


KL_ESTIMATORS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "k1": kl_k1,
    "k2": kl_k2,
    "k3": kl_k3,
}
"""Estimator name -> function, for configs that name one."""


def kl_estimate(name: str, logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """Per-token KL estimate by estimator name ("k1", "k2" or "k3"): (N, T), (N, T) -> (N, T)."""
    try:
        estimator = KL_ESTIMATORS[name]
    except KeyError:
        raise ValueError(
            f"maye_pl/rl/kl.py kl_estimate: unknown KL estimator name={name!r}; choose one of "
            f"{sorted(KL_ESTIMATORS)}."
        ) from None
    return estimator(logprobs, ref_logprobs)
