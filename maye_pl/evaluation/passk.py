"""pass@k and the paper's evaluation settings.

The paper (MAYE, arXiv 2504.02587, Sec. 4) scores every validation/test set three ways:
pass@8 at T=1.0 (exploration ceiling), pass@1 at T=0.6 (typical sampling) and pass@1 at
T=0.01, top_p=0.001 (near-greedy). MAYE draws exactly k samples and counts a prompt as solved
if any is correct, which is `pass_at_k(n=k, c, k)`; drawing n > k samples and using the
unbiased estimator below gives the same expectation with lower variance.
"""

from __future__ import annotations

from dataclasses import dataclass

SPLITS = ("val", "test")


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for one prompt: 1 - C(n-c, k) / C(n, k)  (Chen et al. 2021, Eq. 1).

    Args:
        n: samples drawn for the prompt.
        c: how many of them are correct.
        k: the budget being scored, 1 <= k <= n.

    Returns:
        The probability that at least one of k samples drawn without replacement from the n
        is correct. Average it over prompts for a dataset score.

    The ratio of binomials is computed as the product prod_{i=n-c+1}^{n} (1 - k/i), which never
    forms the huge binomials themselves (Chen et al.'s numerically stable form).
    """
    for name, value in (("n", n), ("c", c), ("k", k)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(
                f"pass_at_k: {name}={value!r} must be an int; pass sample counts, not rates."
            )
        if value < 0:
            raise ValueError(f"pass_at_k: {name}={value} must be >= 0; counts cannot be negative.")
    if k < 1:
        raise ValueError(f"pass_at_k: k={k} must be >= 1; pass@0 is undefined.")
    if k > n:
        raise ValueError(f"pass_at_k: k={k} must be <= n={n}; draw at least k samples per prompt.")
    if c > n:
        raise ValueError(f"pass_at_k: c={c} must be <= n={n}; more correct than drawn samples.")
    if n - c < k:
        # Every k-subset contains a correct sample.
        return 1.0
    miss_all = 1.0
    for i in range(n - c + 1, n + 1):
        miss_all *= 1.0 - k / i
    return 1.0 - miss_all


def _format_float(value: float) -> str:
    """Shortest round-trip text of a float: 1.0 -> '1.0', 0.6 -> '0.6', 0.01 -> '0.01'."""
    return repr(float(value))


@dataclass(frozen=True)
class EvalSetting:
    """One way of scoring an evaluation set: k samples per prompt at a temperature and top_p."""

    k: int
    """Samples per prompt; the metric is pass@k (k=1: plain accuracy of one sample)."""
    temperature: float
    """Sampling temperature used for the k samples."""
    top_p: float = 1.0
    """Nucleus sampling mass; the near-greedy setting uses 0.001."""

    def __post_init__(self) -> None:
        problems = []
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1:
            problems.append(f"k={self.k!r} must be an int >= 1")
        if not self.temperature >= 0:
            problems.append(f"temperature={self.temperature!r} must be >= 0")
        if not 0 < self.top_p <= 1:
            problems.append(f"top_p={self.top_p!r} must be in (0, 1]")
        if problems:
            raise ValueError("EvalSetting: " + "; ".join(problems) + ".")

    @property
    def name(self) -> str:
        """Metric suffix, e.g. 'pass@8_t1.0'. top_p is left out of the name: the three paper
        settings differ in (k, temperature), and hyperparameters beyond that stay out of metric
        names (STYLE.md rule 10)."""
        return f"pass@{self.k}_t{_format_float(self.temperature)}"


def PAPER_EVAL_SETTINGS() -> list[EvalSetting]:  # noqa: N802 - named as the constant it stands for
    """The paper's three evaluation settings, in its table order (a fresh list on every call)."""
    return [
        EvalSetting(k=8, temperature=1.0, top_p=1.0),
        EvalSetting(k=1, temperature=0.6, top_p=1.0),
        EvalSetting(k=1, temperature=0.01, top_p=0.001),
    ]


def metric_name(split: str, setting: EvalSetting) -> str:
    """The logged name of `setting` on `split`: 'val/pass@8_t1.0', 'test/pass@1_t0.01', ..."""
    if split not in SPLITS:
        raise ValueError(
            f"metric_name: split={split!r} must be one of {SPLITS}; the report reads only these."
        )
    return f"{split}/{setting.name}"
