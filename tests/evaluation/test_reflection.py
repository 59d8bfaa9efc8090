"""Reflection metrics against hand counts: whole-word matching by default ("yeti" is not "yet"),
MAYE's substring matching on request, ratios from counts summed over ranks (and how they differ
from MAYE's average of per-rank ratios), 0.0 for empty denominators."""

import pytest

from maye_pl.evaluation import (
    RATIO_KEYS,
    REFLECTION_WORDS,
    ratios_from_counts,
    reflection_counts,
    reflection_metrics,
)

TEXTS = [
    "Wait, let me re-check. Wait again.",  # wait x2, re-check x1
    "I saw a yeti yesterday.",  # whole words: nothing; substrings: "yet" in "yeti"
    "Not YET. Let me verify: check   again.",  # yet, verify, "check again" (any whitespace run)
    "The answer is 5.",  # nothing
    "We await the result; verifying it.",  # whole words: nothing; substrings: wait, verify
]
IS_CORRECT = [True, False, True, False, True]


def word_counts(metrics: dict[str, float]) -> dict[str, float]:
    prefix = "word_count/"
    return {k.removeprefix(prefix): v for k, v in metrics.items() if k.startswith(prefix) and v}


def test_whole_word_matching_hand_counts() -> None:
    counts = reflection_counts(TEXTS, IS_CORRECT)
    # texts 0 and 2 reflect, both correct; 3 of 5 texts correct
    raw_keys = ("n_texts", "n_correct", "n_reflective", "n_reflective_correct")
    assert {k: counts[k] for k in raw_keys} == {
        "n_texts": 5.0,
        "n_correct": 3.0,
        "n_reflective": 2.0,
        "n_reflective_correct": 2.0,
    }
    metrics = reflection_metrics(TEXTS, IS_CORRECT)
    assert list(metrics)[:5] == list(RATIO_KEYS)
    assert len(metrics) == 5 + len(REFLECTION_WORDS)
    assert metrics["reflection_ratio"] == pytest.approx(2 / 5)
    assert metrics["reflection_ratio_in_correct_answers"] == pytest.approx(2 / 3)
    assert metrics["reflection_ratio_in_incorrect_answers"] == 0.0  # 0 of the 2 incorrect texts
    assert metrics["correct_ratio_in_reflection_texts"] == 1.0  # 2 of 2
    # text 4 is the one correct text among the plain texts 1, 3, 4
    assert metrics["correct_ratio_in_no_reflection_texts"] == pytest.approx(1 / 3)
    # occurrences, not texts: "wait" appears twice in text 0
    expected = {"wait": 2, "re-check": 1, "yet": 1, "verify": 1, "check again": 1}
    assert word_counts(metrics) == expected


def test_substring_matching_reproduces_maye() -> None:
    metrics = reflection_metrics(TEXTS, IS_CORRECT, match="substring")
    # MAYE: "yet" in "yeti" (and "YET"), "wait" in "await", "verify" in "verifying";
    # "check   again" (three spaces) is not the literal "check again".
    assert word_counts(metrics) == {"wait": 3, "re-check": 1, "yet": 2, "verify": 2}
    # reflective: texts 0, 1, 2, 4; correct among them: 0, 2, 4
    assert metrics["reflection_ratio"] == pytest.approx(4 / 5)
    assert metrics["reflection_ratio_in_correct_answers"] == 1.0
    assert metrics["reflection_ratio_in_incorrect_answers"] == pytest.approx(1 / 2)
    assert metrics["correct_ratio_in_reflection_texts"] == pytest.approx(3 / 4)
    assert metrics["correct_ratio_in_no_reflection_texts"] == 0.0  # text 3 is incorrect


def test_word_boundaries() -> None:
    cases = {
        "yeti": 0,
        "yet": 1,
        "Yet,": 1,
        "(yet)": 1,
        "yet's": 1,
        "not yet2": 1,  # digits are not letters
        "wait-and-see": 1,  # a hyphen is a boundary
        "awaiting": 0,
        "verifying": 0,
        "rethinking": 0,
    }
    for text, expected in cases.items():
        found = sum(word_counts(reflection_metrics([text], [False])).values())
        assert found == expected, text
    assert word_counts(reflection_metrics(["A reevaluation; Re-Evaluate"], [True])) == {
        "reevaluation": 1,
        "re-evaluate": 1,
    }


def test_summed_counts_differ_from_per_rank_average() -> None:
    rank_a = reflection_counts(["Wait, it is 2."], [True])  # 1 text: reflective, correct
    rank_b = reflection_counts(["1", "2", "3"], [False, False, False])  # 3 plain incorrect texts
    summed = {key: rank_a[key] + rank_b[key] for key in rank_a}
    global_ratios = ratios_from_counts(summed)
    per_rank = [ratios_from_counts(rank_a), ratios_from_counts(rank_b)]
    maye = {key: (per_rank[0][key] + per_rank[1][key]) / 2 for key in RATIO_KEYS}
    # 1 of the 4 texts reflects; MAYE averages 1/1 and 0/3
    assert global_ratios["reflection_ratio"] == pytest.approx(0.25)
    assert maye["reflection_ratio"] == pytest.approx(0.5)
    # the only correct text reflects: 1/1; rank B has no correct text, its 0.0 halves MAYE's mean
    assert global_ratios["reflection_ratio_in_correct_answers"] == 1.0
    assert maye["reflection_ratio_in_correct_answers"] == pytest.approx(0.5)
    assert global_ratios["word_count/wait"] == 1.0


def test_empty_denominators_give_zero() -> None:
    metrics = reflection_metrics([], [])
    assert all(metrics[key] == 0.0 for key in RATIO_KEYS)
    all_correct = reflection_metrics(["wait"], [True])
    assert all_correct["reflection_ratio_in_incorrect_answers"] == 0.0  # no incorrect texts
    assert all_correct["correct_ratio_in_no_reflection_texts"] == 0.0  # no plain texts


def test_bad_inputs() -> None:
    with pytest.raises(ValueError, match=r"len\(texts\)=2 != len\(is_correct\)=1"):
        reflection_counts(["a", "b"], [True])
    with pytest.raises(ValueError, match="match='regex' must be"):
        reflection_counts(["a"], [True], match="regex")
    with pytest.raises(KeyError, match="n_reflective"):
        ratios_from_counts({"n_texts": 1.0, "n_correct": 1.0})
