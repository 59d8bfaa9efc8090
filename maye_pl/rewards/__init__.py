"""Rewards: str -> score. Answer extraction, the time-limited math judges (own and MAYE's), the paper's rewards.

A reward is any callable ``fn(responses: list[str], samples: list[dict]) -> Tensor`` of shape
(B,), float32 (``samples[i]`` also holds ``response_length``, the response's tokens); the config
names rewards by import path (``RewardTerm``), with keyword arguments if it takes any.
"""

from maye_pl.rewards.answers import extract_boxed, normalize_answer
from maye_pl.rewards.combine import (
    RewardFn,
    RewardTerm,
    default_rewards,
    resolve_rewards,
    score_responses,
)
from maye_pl.rewards.functions import (
    ACCURACY_REWARDS,
    Judge,
    accuracy_reward,
    format_reward,
    judge_problems,
    judge_responses,
    language_reward,
    maye_accuracy_reward,
    maye_format_reward,
    soft_overlong_punishment,
)
from maye_pl.rewards.judge import math_judge, math_judge_batch, shutdown_judge_workers
from maye_pl.rewards.maye_judge import maye_judge, maye_judge_batch

__all__ = [
    "ACCURACY_REWARDS",
    "Judge",
    "RewardFn",
    "RewardTerm",
    "accuracy_reward",
    "default_rewards",
    "extract_boxed",
    "format_reward",
    "judge_problems",
    "judge_responses",
    "language_reward",
    "math_judge",
    "math_judge_batch",
    "maye_accuracy_reward",
    "maye_format_reward",
    "maye_judge",
    "maye_judge_batch",
    "normalize_answer",
    "resolve_rewards",
    "score_responses",
    "shutdown_judge_workers",
    "soft_overlong_punishment",
]
