"""Checks of ReinforcePP's hyperparameters that need no model: each problem names the key, the
value, the rule and the fix; the module collects them all and raises once."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from maye_pl import rl


def reinforce_pp_problems(hp: Mapping[str, Any]) -> list[str]:
    """Every problem of the RL settings in ``hp`` (the module's hyperparameters, read as attributes),
    [] when none; the optimizer's and the judge's are ``optim.optimizer_problems`` and
    ``rewards.judge_problems``."""
    problems = []
    if hp.ppo_batch_size % hp.gradient_accumulation_steps:
        problems.append(
            f"`model.gradient_accumulation_steps`={hp.gradient_accumulation_steps} must divide "
            f"`model.ppo_batch_size`={hp.ppo_batch_size}; pick a divisor."
        )
    if hp.advantage_estimator not in rl.ADVANTAGE_ESTIMATORS:
        problems.append(
            f"`model.advantage_estimator`={hp.advantage_estimator!r} is unknown; "
            f"choose one of {sorted(rl.ADVANTAGE_ESTIMATORS)}."
        )
    if hp.advantage_estimator in ("reinforce_pp_baseline", "grpo") and hp.sampling.n < 2:
        problems.append(
            f"`model.advantage_estimator`={hp.advantage_estimator!r} compares samples of the same "
            f"prompt, but `model.sampling.n`={hp.sampling.n}; set it to 2 or more."
        )
    if hp.loss_agg not in rl.LOSS_AGGREGATIONS:
        problems.append(f"`model.loss_agg`={hp.loss_agg!r} must be one of {sorted(rl.LOSS_AGGREGATIONS)}.")
    if not (hp.train_vit or hp.train_connector or hp.train_llm):
        problems.append("`model.train_vit`, `train_connector` and `train_llm` are all false; nothing would train.")
    if hp.behaviour_weight_cap <= 0:
        problems.append(f"`model.behaviour_weight_cap`={hp.behaviour_weight_cap} must be > 0 (the largest importance weight).")
    if hp.off_policy_correction and not hp.sampling.logprobs:
        problems.append("`model.off_policy_correction` needs the engine's log-probs; set `model.sampling.logprobs` true.")
    for name in ("ppo_epochs", "ppo_batch_size", "forward_batch_size", "gradient_accumulation_steps"):
        if hp[name] < 1:
            problems.append(f"`model.{name}`={hp[name]} must be at least 1.")
    if hp.max_tokens_per_micro_batch is not None and hp.max_tokens_per_micro_batch < 1:
        problems.append(
            f"`model.max_tokens_per_micro_batch`={hp.max_tokens_per_micro_batch} must be a positive token count "
            "(e.g. 16384), or null for row micro-batches."
        )
    return problems
