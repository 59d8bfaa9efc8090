"""The paper's rewards. Each is ``fn(responses, samples) -> Tensor`` of shape (B,), float32.

Notation: B responses (prompts times samples per prompt, flattened). ``samples[i]`` is the data
record ``responses[i]`` answers: a dict with at least ``"answer"`` (the golden short answer)
and ``"solution"``. Definitions follow MAYE's ``accuracy_reward_fn``, ``language_reward_fn``
and ``format_reward_fn`` (GAIR-NLP/MAYE, ``maye/rlhf``), with the differences noted.
"""

from __future__ import annotations

import torch

from maye_pl.rewards.judge import math_judge_batch

# CJK Unified Ideographs, the block MAYE counts (`re.findall(r"[\u4e00-\u9fff]", text)`).
_CJK_FIRST, _CJK_LAST = "\u4e00", "\u9fff"
LANGUAGE_PENALTY = -0.1


def accuracy_reward(responses: list[str], samples: list[dict]) -> torch.Tensor:
    """1.0 where the response's last boxed answer equals ``sample["answer"]``, else 0.0.

    Judged by ``math_judge`` (5 s per response at most). MAYE judges against the boxed
    ``"solution"``; the short ``"answer"`` is the same value without the box.

    Returns:
        (B,) float32.
    """
    _check_batch("accuracy_reward", responses, samples)
    golden = [_golden(sample, index) for index, sample in enumerate(samples)]
    return torch.tensor(math_judge_batch(responses, golden), dtype=torch.float32)  # (B,)


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


def _think_then_answer(text: str) -> bool:
    # str.find instead of MAYE's regex: the lazy DOTALL match is quadratic on many unclosed <think>.
    blocks, position, last_close = 0, 0, -1
    while (start := text.find("<think>", position)) >= 0:
        close = text.find("</think>", start + len("<think>"))
        if close < 0:
            break
        blocks, last_close, position = blocks + 1, close, close + len("</think>")
    if blocks != 1:
        return False
    answer_start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    return answer_start < 0 or answer_start > last_close


def _golden(sample: dict, index: int) -> str:
    if "answer" not in sample:
        raise KeyError(
            f"accuracy_reward: samples[{index}] has no 'answer' key (keys: {sorted(sample)}); "
            "the data module must put the golden short answer under 'answer'."
        )
    return str(sample["answer"])


def _check_batch(reward: str, responses: list[str], samples: list[dict]) -> None:
    if len(responses) != len(samples):
        raise ValueError(
            f"{reward}: got {len(responses)} responses and {len(samples)} samples; pass one "
            "sample per response (repeat each prompt's sample for its G responses)."
        )
