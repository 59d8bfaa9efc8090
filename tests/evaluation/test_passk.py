"""pass@k equals 1 - C(n-c,k)/C(n,k) on hand-computed and exhaustive small cases; the eval
settings and their metric names match the paper's three settings."""

from math import comb

import pytest

from maye_pl.evaluation import PAPER_EVAL_SETTINGS, EvalSetting, metric_name, pass_at_k


@pytest.mark.parametrize(
    ("n", "c", "k", "expected"),
    [
        (8, 2, 1, 0.25),  # one draw is correct with probability c/n = 2/8
        (8, 2, 8, 1.0),  # all 8 drawn: the 2 correct are among them
        (5, 0, 1, 0.0),  # nothing correct
        (5, 0, 5, 0.0),
        (4, 1, 2, 0.5),  # C(3,2)/C(4,2) = 3/6 misses -> 1 - 0.5
        (4, 2, 2, 5 / 6),  # C(2,2)/C(4,2) = 1/6 misses
        (8, 7, 2, 1.0),  # n - c = 1 < k: every pair holds a correct sample
        (1, 1, 1, 1.0),
    ],
)
def test_pass_at_k_hand_cases(n: int, c: int, k: int, expected: float) -> None:
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_k_matches_binomial_definition_exhaustively() -> None:
    for n in range(1, 13):
        for c in range(n + 1):
            for k in range(1, n + 1):
                exact = 1 - comb(n - c, k) / comb(n, k)
                assert pass_at_k(n, c, k) == pytest.approx(exact, abs=1e-12), (n, c, k)


def test_pass_at_k_large_n_is_finite() -> None:
    # C(2000, 1000) overflows a float; the product form does not form it.
    assert pass_at_k(2000, 1, 1000) == pytest.approx(0.5)


@pytest.mark.parametrize(
    ("n", "c", "k", "error", "match"),
    [
        (4, 1, 5, ValueError, "k=5 must be <= n=4"),
        (4, 5, 1, ValueError, "c=5 must be <= n=4"),
        (-1, 0, 1, ValueError, "n=-1 must be >= 0"),
        (4, -1, 1, ValueError, "c=-1 must be >= 0"),
        (4, 1, 0, ValueError, "k=0 must be >= 1"),
        (4, 0.5, 1, TypeError, "c=0.5 must be an int"),
    ],
)
def test_pass_at_k_rejects_bad_counts(n, c, k, error, match) -> None:
    with pytest.raises(error, match=match):
        pass_at_k(n, c, k)


def test_paper_settings_and_metric_names() -> None:
    settings = PAPER_EVAL_SETTINGS()
    assert [(s.k, s.temperature, s.top_p) for s in settings] == [
        (8, 1.0, 1.0),
        (1, 0.6, 1.0),
        (1, 0.01, 0.001),
    ]
    assert [metric_name("val", s) for s in settings] == [
        "val/pass@8_t1.0",
        "val/pass@1_t0.6",
        "val/pass@1_t0.01",
    ]
    assert metric_name("test", settings[2]) == "test/pass@1_t0.01"
    assert EvalSetting(k=4, temperature=1).name == "pass@4_t1.0"  # an int temperature as a float
    settings.append(EvalSetting(k=2, temperature=0.5))
    assert len(PAPER_EVAL_SETTINGS()) == 3  # every call builds a fresh list


def test_bad_settings_and_splits_are_rejected() -> None:
    all_problems = r"k=0 must be an int >= 1; temperature=-1.0 must be >= 0; top_p=0.0"
    with pytest.raises(ValueError, match=all_problems):
        EvalSetting(k=0, temperature=-1.0, top_p=0.0)
    with pytest.raises(ValueError, match="split='validation' must be one of"):
        metric_name("validation", PAPER_EVAL_SETTINGS()[0])
