"""Reinforce++ math as pure tensor functions: logprobs, masks, KL, advantages, loss.

No Lightning here; torch.distributed is used only through an optional ``group`` argument where a
statistic must span the global batch.
"""

from maye_pl.rl.advantages import (
    ADVANTAGE_ESTIMATORS,
    discounted_returns,
    estimate_advantages,
    grpo_advantages,
    masked_whiten,
    reinforce_pp_advantages,
    reinforce_pp_baseline_advantages,
    token_rewards,
)
from maye_pl.rl.kl import KL_ESTIMATORS, kl_estimate, kl_k1, kl_k2, kl_k3
from maye_pl.rl.logprobs import token_entropy, token_logprobs
from maye_pl.rl.loss import LOSS_AGGREGATIONS, PPOLossStats, ppo_clip_loss
from maye_pl.rl.off_policy import BehaviourWeightStats, truncated_importance_weights
from maye_pl.rl.masks import apply_penalty, needs_length_penalty, response_lengths, truncate_at_stop

__all__ = [
    "ADVANTAGE_ESTIMATORS",
    "BehaviourWeightStats",
    "KL_ESTIMATORS",
    "LOSS_AGGREGATIONS",
    "PPOLossStats",
    "apply_penalty",
    "discounted_returns",
    "estimate_advantages",
    "grpo_advantages",
    "kl_estimate",
    "kl_k1",
    "kl_k2",
    "kl_k3",
    "masked_whiten",
    "needs_length_penalty",
    "ppo_clip_loss",
    "reinforce_pp_advantages",
    "reinforce_pp_baseline_advantages",
    "response_lengths",
    "token_entropy",
    "token_logprobs",
    "token_rewards",
    "truncate_at_stop",
    "truncated_importance_weights",
]
