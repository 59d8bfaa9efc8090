"""Loss aggregation: how per-token losses become one number, as a named choice.

Notation: b rows of one micro-batch, T response tokens, |y_i| the valid tokens of row i, L_max the
longest response the engine may sample (``sampling.max_tokens``).

    "token_mean"               sum_i sum_t l_it / sum_i |y_i|        every token weighs the same (DAPO)
    "seq_mean_token_mean"      sum_i (sum_t l_it / |y_i|) / b        every response weighs the same (GRPO, GSPO)
    "seq_mean_token_sum_norm"  sum_i (sum_t l_it / L_max) / b        a constant normaliser (Dr.GRPO)

Gradient accumulation and data parallelism: a minibatch is split into micro-batches (and ranks)
that each aggregate and backward their part. Pass the WHOLE minibatch's count as ``normalizer``
(its valid tokens per rank for "token_mean", its rows for the two sequence means): each part is
then its partial sum over that shared count, and the parts' losses and gradients add up (and
average over ranks) to exactly those of the full minibatch aggregated in one call with
``normalizer=None``.
"""

from __future__ import annotations

from torch import Tensor

LOSS_AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm")
"""The names ``aggregate`` accepts."""


def aggregate(
    values: Tensor,
    mask: Tensor,
    agg: str = "token_mean",
    *,
    normalizer: float | Tensor | None = None,
    max_tokens: int | None = None,
) -> Tensor:
    """One number from per-token ``values``, by the rule ``agg`` names (module docstring).

    Args:
        values: (b, T) per-token losses (with grad); values on padding are ignored.
        mask: (b, T) bool, True on valid tokens.
        agg: one of ``LOSS_AGGREGATIONS``.
        normalizer: the whole minibatch's count (tokens for "token_mean", rows otherwise) when
            this is one part of it; None = this call's own count.
        max_tokens: L_max, the constant of "seq_mean_token_sum_norm" (required there).

    Returns:
        () fp32; 0 for a micro-batch without valid tokens.
    """
    _check(agg, normalizer, max_tokens)
    fmask = mask.float()  # (b, T)
    per_token = values.float() * fmask  # (b, T)
    if agg == "token_mean":
        count = fmask.sum().clamp(min=1) if normalizer is None else normalizer
        return per_token.sum() / count
    if agg == "seq_mean_token_mean":
        rows = per_token.sum(dim=1) / fmask.sum(dim=1).clamp(min=1)  # (b,)
    else:
        rows = per_token.sum(dim=1) / max_tokens  # (b,)
    return rows.sum() / (mask.shape[0] if normalizer is None else normalizer)


def _check(agg: str, normalizer: float | Tensor | None, max_tokens: int | None) -> None:
    problems = []
    if agg not in LOSS_AGGREGATIONS:
        problems.append(f"agg={agg!r} must be one of {list(LOSS_AGGREGATIONS)}")
    if normalizer is not None and float(normalizer) <= 0:
        problems.append(
            f"normalizer={float(normalizer)} must be > 0 (the minibatch's valid tokens for token_mean, its rows "
            "for the sequence means) or None"
        )
    if agg == "seq_mean_token_sum_norm" and (max_tokens is None or max_tokens < 1):
        problems.append(f"max_tokens={max_tokens} must be >= 1 for seq_mean_token_sum_norm (L_max, Dr.GRPO's constant)")
    if problems:
        raise ValueError("maye_pl/rl/aggregation.py aggregate: " + "; ".join(problems) + ".")
