"""Reflection metrics: how often responses use "aha"-style reflection words (paper Fig. 5).

Matching, compared with MAYE (`log_reflection_analysis` in recipes/full_ppo_vllm_distributed.py):
MAYE lower-cases the text and tests plain substrings, so "yet" fires inside "yeti", "wait"
inside "await" and "verify" inside "verifying" (but not "verified"). maye_pl matches whole words
by default (match="word"): case-insensitive, the word may not touch a letter on either side
("yet," and "Wait:" count, "yeti" and "await" do not), and the space inside a phrase such as
"check again" matches any run of whitespace. match="substring" reproduces MAYE's counts exactly.

Per-word counts are OCCURRENCES summed over texts (as MAYE: "wait ... wait" counts 2), not the
number of texts containing the word. A text is "reflective" when it has at least one occurrence.

Aggregating across ranks: MAYE computes the five ratios on every rank and averages them
(pandas mean over ranks). That is biased whenever ranks hold different numbers of texts in a
category: e.g. rank A has 1 correct reflective text and rank B has 3 non-reflective texts, the
mean of per-rank reflection ratios is (1/1 + 0/3)/2 = 0.5, while 1 of the 4 texts reflects
(0.25). maye_pl therefore splits the computation: `reflection_counts` gives raw sums, the trainer
all-reduces (SUMs) them over ranks, and `ratios_from_counts` divides once.

Division by zero (no texts, no correct texts, ...) yields 0.0, as in MAYE, so the logged curves
stay finite; read such a 0.0 together with the counts.
"""

from __future__ import annotations

import re
from typing import Literal

REFLECTION_WORDS: tuple[str, ...] = (
    "re-check",
    "re-evaluate",
    "re-examine",
    "re-think",
    "recheck",
    "reevaluate",
    "reexamine",
    "reevaluation",
    "rethink",
    "check again",
    "think again",
    "try again",
    "verify",
    "wait",
    "yet",
)
"""MAYE's 15 reflection words and phrases, in its order."""

COUNT_KEYS: tuple[str, ...] = ("n_texts", "n_correct", "n_reflective", "n_reflective_correct")
"""Raw sums returned by `reflection_counts` besides the per-word counts."""

RATIO_KEYS: tuple[str, ...] = (
    "reflection_ratio",
    "reflection_ratio_in_correct_answers",
    "reflection_ratio_in_incorrect_answers",
    "correct_ratio_in_reflection_texts",
    "correct_ratio_in_no_reflection_texts",
)
"""The five ratios of `ratios_from_counts`, MAYE's names."""

WORD_COUNT_PREFIX = "word_count/"

_WORD_PATTERNS = {
    word: re.compile(
        r"(?<![a-z])" + r"\s+".join(map(re.escape, word.split())) + r"(?![a-z])", re.IGNORECASE
    )
    for word in REFLECTION_WORDS
}


def _occurrences(text: str, word: str, match: str) -> int:
    if match == "word":
        return len(_WORD_PATTERNS[word].findall(text))
    return text.lower().count(word)


def reflection_counts(
    texts: list[str], is_correct: list[bool], match: Literal["word", "substring"] = "word"
) -> dict[str, float]:
    """Raw reflection sums over a batch of responses; sum these across ranks before dividing.

    Args:
        texts: response texts, length N (any N, e.g. one rank's B*G responses).
        is_correct: whether each response's answer is correct, length N.
        match: "word" (default, whole words) or "substring" (MAYE's matching); see module doc.

    Returns:
        Floats (ready for a tensor all-reduce), in this key order: "n_texts", "n_correct",
        "n_reflective" (texts with >= 1 reflection word), "n_reflective_correct", then
        "word_count/<word>" = occurrences of <word> summed over the texts, for each of
        REFLECTION_WORDS.
    """
    if len(texts) != len(is_correct):
        raise ValueError(
            f"reflection_counts: len(texts)={len(texts)} != len(is_correct)={len(is_correct)}; "
            "pass one correctness flag per text."
        )
    if match not in ("word", "substring"):
        raise ValueError(f"reflection_counts: match={match!r} must be 'word' or 'substring'.")
    word_counts = dict.fromkeys(REFLECTION_WORDS, 0)
    n_reflective = n_reflective_correct = 0
    for text, correct in zip(texts, is_correct):
        found = {word: _occurrences(text, word, match) for word in REFLECTION_WORDS}
        for word, count in found.items():
            word_counts[word] += count
        if any(found.values()):
            n_reflective += 1
            n_reflective_correct += bool(correct)
    counts = {
        "n_texts": float(len(texts)),
        "n_correct": float(sum(bool(c) for c in is_correct)),
        "n_reflective": float(n_reflective),
        "n_reflective_correct": float(n_reflective_correct),
    }
    counts.update({WORD_COUNT_PREFIX + word: float(n) for word, n in word_counts.items()})
    return counts


def _ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator > 0 else 0.0


def ratios_from_counts(counts: dict[str, float]) -> dict[str, float]:
    """The five reflection ratios (MAYE's names) plus the per-word counts, from (summed) counts.

    Args:
        counts: `reflection_counts` output, or the element-wise sum of several of them.

    Returns:
        RATIO_KEYS in order, each 0.0 when its denominator is 0, then every "word_count/<word>"
        passed through unchanged.
        With R = n_reflective, RC = n_reflective_correct, N = n_texts, C = n_correct:
          reflection_ratio                      = R / N
          reflection_ratio_in_correct_answers   = RC / C
          reflection_ratio_in_incorrect_answers = (R - RC) / (N - C)
          correct_ratio_in_reflection_texts     = RC / R
          correct_ratio_in_no_reflection_texts  = (C - RC) / (N - R)
    """
    missing = [key for key in COUNT_KEYS if key not in counts]
    if missing:
        raise KeyError(
            f"ratios_from_counts: counts lack {missing}; pass reflection_counts output (summed)."
        )
    n, n_correct = counts["n_texts"], counts["n_correct"]
    n_refl, n_refl_correct = counts["n_reflective"], counts["n_reflective_correct"]
    ratios = {
        "reflection_ratio": _ratio(n_refl, n),
        "reflection_ratio_in_correct_answers": _ratio(n_refl_correct, n_correct),
        "reflection_ratio_in_incorrect_answers": _ratio(n_refl - n_refl_correct, n - n_correct),
        "correct_ratio_in_reflection_texts": _ratio(n_refl_correct, n_refl),
        "correct_ratio_in_no_reflection_texts": _ratio(n_correct - n_refl_correct, n - n_refl),
    }
    ratios.update({k: v for k, v in counts.items() if k.startswith(WORD_COUNT_PREFIX)})
    return ratios


def reflection_metrics(
    texts: list[str], is_correct: list[bool], match: Literal["word", "substring"] = "word"
) -> dict[str, float]:
    """Single-process reflection metrics: `ratios_from_counts(reflection_counts(...))`.

    Args and matching as `reflection_counts`. Returns the five RATIO_KEYS and the 15
    "word_count/<word>" occurrence counts. Under data parallelism sum the counts across ranks
    first (see module docstring) instead of averaging this function's per-rank output.
    """
    return ratios_from_counts(reflection_counts(texts, is_correct, match))
