"""The paper's rewards. Each is ``fn(responses, samples) -> Tensor`` of shape (B,), float32.

Notation: B responses (prompts times samples per prompt, flattened). ``samples[i]`` is the data
record ``responses[i]`` answers: a dict with at least ``"answer"`` (the golden short answer)
and ``"solution"``. Definitions follow MAYE's ``accuracy_reward_fn``, ``language_reward_fn``
and ``format_reward_fn`` (GAIR-NLP/MAYE, ``maye/rlhf``), with the differences noted.
"""

from __future__ import annotations

from typing import Literal

import torch

from maye_pl.rewards.judge import math_judge_batch
from maye_pl.rewards.maye_judge import maye_judge_batch

Judge = Literal["math_verify", "maye"]
"""An answer judge: "math_verify" (``math_judge``: last box vs ``answer``) or "maye" (``maye_judge``:
MAYE's decision, last boxed sentence vs the full ``solution``)."""
ACCURACY_REWARDS: dict[str, str] = {
    "math_verify": "maye_pl.rewards.accuracy_reward",
    "maye": "maye_pl.rewards.maye_accuracy_reward",
}
"""The accuracy reward of each judge, by the import path a ``RewardTerm`` names."""

# CJK Unified Ideographs, the block MAYE counts (`re.findall(r"[\u4e00-\u9fff]", text)`).
_CJK_FIRST, _CJK_LAST = "\u4e00", "\u9fff"
LANGUAGE_PENALTY = -0.1


def accuracy_reward(responses: list[str], samples: list[dict]) -> torch.Tensor:
    """1.0 where the response's last boxed answer equals ``sample["answer"]``, else 0.0.

    Judged by ``math_judge`` (5 s per response at most). MAYE judges against the boxed
    ``"solution"`` (``maye_accuracy_reward``); the short ``"answer"`` is the same value without the box.

    Returns:
        (B,) float32.
    """
    _check_batch("accuracy_reward", responses, samples)
    return torch.tensor(judge_responses("math_verify", responses, samples), dtype=torch.float32)  # (B,)


def maye_accuracy_reward(responses: list[str], samples: list[dict]) -> torch.Tensor:
    """MAYE's accuracy reward: 1.0 where ``maye_judge`` credits the response against
    ``sample["solution"]``, else 0.0 (5 s of math-verify per response at most).

    Returns:
        (B,) float32.
    """
    _check_batch("maye_accuracy_reward", responses, samples)
    return torch.tensor(judge_responses("maye", responses, samples), dtype=torch.float32)  # (B,)


def judge_responses(judge: Judge, responses: list[str], samples: list[dict]) -> list[bool]:
    """Whether each response is correct for its sample under ``judge`` (see ``Judge``)."""
    if judge == "maye":
        return maye_judge_batch(responses, [_golden(sample, index, "solution") for index, sample in enumerate(samples)])
    return math_judge_batch(responses, [_golden(sample, index, "answer") for index, sample in enumerate(samples)])


def judge_problems(judge: str, rewards: list | None) -> list[str]:
    """Config problems of ``model.judge`` with ``model.rewards`` (``RewardTerm``s, or their dicts as
    the CLI saves them in ``hparams``): an unknown judge, or an accuracy reward of the other judge
    (training and evaluation would then disagree on what is correct)."""
    if judge not in ACCURACY_REWARDS:
        return [f"`model.judge`={judge!r} is unknown; choose one of {sorted(ACCURACY_REWARDS)}."]
    paths = [term["fn"] if isinstance(term, dict) else term.fn for term in rewards or []]
    return [
        f"`model.rewards[{index}].fn`={fn!r} judges with another judge than `model.judge`={judge!r}; "
        f"use {ACCURACY_REWARDS[judge]!r} (or set `model.judge` to match)."
        for index, fn in enumerate(paths)
        if fn in ACCURACY_REWARDS.values() and fn != ACCURACY_REWARDS[judge]
    ]


def language_reward(responses: list[str], samples: list[dict]) -> torch.Tensor:
    """-0.1 times the share of the response's characters that are CJK ideographs (U+4E00-U+9FFF).

    As MAYE: the denominator counts every character (spaces, LaTeX, newlines); an empty response
    scores 0. Qwen2-VL drifts into Chinese mid-reasoning; this nudges it back to English.

    Returns:
        (B,) float32, in [-0.1, 0].
    """
    _check_batch("language_reward", responses, samples)
    shares = [_cjk_share(text) for text in responses]
    return torch.tensor([LANGUAGE_PENALTY * s if s else 0.0 for s in shares], dtype=torch.float32)


def _cjk_share(text: str) -> float:
    """Share of ``text``'s characters that are CJK ideographs; 0 for an empty text."""
    if not text:
        return 0.0
    return sum(_CJK_FIRST <= char <= _CJK_LAST for char in text) / len(text)


def format_reward(responses: list[str], samples: list[dict]) -> torch.Tensor:
    """1.0 where the response has exactly one ``<think>...</think>`` block before its answer.

    The count is MAYE's: non-overlapping ``<think>.*?</think>`` matches (so a second
    ``<think>`` inside the block does not count). Added to MAYE's rule, as in R1-style format
    rewards: when the response has a boxed answer, it must come after ``</think>``, so an answer
    given inside the reasoning earns no format reward. Off by default, as in the paper.

    Returns:
        (B,) float32.
    """
    _check_batch("format_reward", responses, samples)
    return torch.tensor([_think_then_answer(text) for text in responses], dtype=torch.float32)


def maye_format_reward(responses: list[str], samples: list[dict]) -> torch.Tensor:
    """MAYE's format reward as its recipe adds it: 1.0 where the response has exactly one
    ``<think>...</think>`` block (non-overlapping matches), wherever its answer is.

    Returns:
        (B,) float32.
    """
    _check_batch("maye_format_reward", responses, samples)
    return torch.tensor([_think_blocks(text)[0] == 1 for text in responses], dtype=torch.float32)


def soft_overlong_punishment(
    responses: list[str], samples: list[dict], *, max_length: int, cache_length: int
) -> torch.Tensor:
    """DAPO's soft overlong punishment (Yu et al. 2025, arXiv 2503.14476, Eq. 13), added to the score.

    With L = ``samples[i]["response_length"]`` (tokens, the stop token included; the trainer puts
    it there), L_max = ``max_length`` and L_cache = ``cache_length``:

        0                                 L <= L_max - L_cache
        ((L_max - L_cache) - L) / L_cache L_max - L_cache < L <= L_max   (a linear ramp to -1)
        -1                                L > L_max

    Name it with its arguments in the config, e.g. ``{fn: maye_pl.rewards.soft_overlong_punishment,
    kwargs: {max_length: 2048, cache_length: 512}}``; set ``max_length`` to ``model.sampling.max_tokens``
    (DAPO: 20480 with a 4096-token cache, i.e. no penalty up to 16384).

    Returns:
        (B,) float32, in [-1, 0].
    """
    _check_batch("soft_overlong_punishment", responses, samples)
    if not 0 < cache_length <= max_length:
        raise ValueError(
            f"soft_overlong_punishment: cache_length={cache_length} must lie in (0, max_length={max_length}]; "
            "it is the length of the ramp before max_length (DAPO: 4096 of 20480)."
        )
    lengths = torch.tensor([_response_length(sample, index) for index, sample in enumerate(samples)],
                           dtype=torch.float32)  # (B,)
    ramp = ((max_length - cache_length) - lengths) / cache_length  # (B,), > 0 below the ramp
    return torch.where(lengths > max_length, -1.0, ramp.clamp(max=0.0))  # (B,)


def _response_length(sample: dict, index: int) -> int:
    if "response_length" not in sample:
        raise KeyError(
            f"soft_overlong_punishment: samples[{index}] has no 'response_length' (keys: {sorted(sample)}); "
            "ReinforcePP adds each response's token count there; a caller of its own must add it too."
        )
    return int(sample["response_length"])


def _think_then_answer(text: str) -> bool:
    blocks, last_close = _think_blocks(text)
    if blocks != 1:
        return False
    answer_start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    return answer_start < 0 or answer_start > last_close


def _think_blocks(text: str) -> tuple[int, int]:
    """MAYE's count of non-overlapping ``<think>.*?</think>`` blocks, and where the last one closes (-1: none)."""
    # str.find instead of MAYE's regex: the lazy DOTALL match is quadratic on many unclosed <think>.
    blocks, position, last_close = 0, 0, -1
    while (start := text.find("<think>", position)) >= 0:
        close = text.find("</think>", start + len("<think>"))
        if close < 0:
            break
        blocks, last_close, position = blocks + 1, close, close + len("</think>")
    return blocks, last_close


def _golden(sample: dict, index: int, key: str) -> str:
    if key not in sample:
        raise KeyError(
            f"accuracy reward: samples[{index}] has no {key!r} key (keys: {sorted(sample)}); the data module "
            "must put the golden short answer under 'answer' and the worked solution under 'solution'."
        )
    return str(sample[key])


def _check_batch(reward: str, responses: list[str], samples: list[dict]) -> None:
    if len(responses) != len(samples):
        raise ValueError(
            f"{reward}: got {len(responses)} responses and {len(samples)} samples; pass one "
            "sample per response (repeat each prompt's sample for its G responses)."
        )
