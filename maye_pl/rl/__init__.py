"""Reinforce++ and its family as pure tensor functions: logprobs, masks, KL, advantages, policy
losses (``POLICY_LOSSES``), loss aggregation, off-policy weights.

No Lightning here; torch.distributed is used only through an optional ``group`` argument where a
statistic must span the global batch.
"""

from maye_pl.rl.advantages import (
    ADVANTAGE_ESTIMATORS,
    discounted_returns,
    dr_grpo_advantages,
    estimate_advantages,
    grpo_advantages,
    masked_whiten,
    reinforce_pp_advantages,
    reinforce_pp_baseline_advantages,
    token_rewards,
)
from maye_pl.rl.kl import KL_ESTIMATORS, kl_estimate, kl_k1, kl_k2, kl_k3
from maye_pl.rl.logprobs import token_entropy, token_logprobs
from maye_pl.rl.aggregation import LOSS_AGGREGATIONS, aggregate
from maye_pl.rl.off_policy import OFF_POLICY_LEVELS, OFF_POLICY_MODES, behaviour_weights
from maye_pl.rl.policy_loss import POLICY_LOSSES, cispo, gspo, kl_loss, ppo_clip
from maye_pl.rl.masks import apply_penalty, needs_length_penalty, response_lengths, truncate_at_stop

__all__ = [
    "ADVANTAGE_ESTIMATORS",
    "KL_ESTIMATORS",
    "LOSS_AGGREGATIONS",
    "OFF_POLICY_LEVELS",
    "OFF_POLICY_MODES",
    "POLICY_LOSSES",
    "aggregate",
    "apply_penalty",
    "behaviour_weights",
    "cispo",
    "discounted_returns",
    "dr_grpo_advantages",
    "estimate_advantages",
    "grpo_advantages",
    "gspo",
    "kl_estimate",
    "kl_k1",
    "kl_k2",
    "kl_k3",
    "kl_loss",
    "masked_whiten",
    "needs_length_penalty",
    "ppo_clip",
    "reinforce_pp_advantages",
    "reinforce_pp_baseline_advantages",
    "response_lengths",
    "token_entropy",
    "token_logprobs",
    "token_rewards",
    "truncate_at_stop",
]
