"""What the console shows of a run: the evaluation table and the end-of-run summary (plain text).

Both are pure functions of logged values, so they print the same thing for every logger; the
console callback (maye_pl/console.py) calls them on global rank 0.
"""

from __future__ import annotations

import re
from collections import defaultdict
from statistics import fmean
from typing import Any

from maye_pl.evaluation.names import TRAIN_ACCURACY_EPOCH
from maye_pl.evaluation.runs import epoch_values, is_number, vanilla_value

SPLITS = ("val", "test")
"""Metric name prefixes shown as table columns (MayeDataModule's eval splits)."""

REWARD_TOTAL = "reward/total"
GENERATE_TOKENS_PER_S = "perf/generate_tokens_per_s"
UPDATE_TOKENS_PER_S = "perf/update_tokens_per_s"
_DATALOADER_SUFFIX = re.compile(r"/dataloader_idx_\d+$")


def eval_table(metrics: dict[str, float], title: str = "Validation") -> str:
    """One row per metric, one column per split: ``val/pass@1_t0.6`` is row ``pass@1_t0.6``,
    column ``val``. Names without a split prefix (and Lightning's ``/dataloader_idx_N`` suffix
    dropped) go in a ``value`` column. Values print with 4 decimals; "" where a split lacks one.
    """
    cells: dict[str, dict[str, float]] = defaultdict(dict)  # row → column → value
    for name, value in metrics.items():
        name = _DATALOADER_SUFFIX.sub("", name)
        split, _, rest = name.partition("/")
        if split in SPLITS and rest:
            cells[rest][split] = value
        else:
            cells[name]["value"] = value
    columns = [c for c in (*SPLITS, "value") if any(c in row for row in cells.values())]
    header = [f"{title} metric", *columns]
    body = [[row, *(_number(cells[row][c]) if c in cells[row] else "" for c in columns)] for row in sorted(cells)]
    table = _layout([header, *body]).split("\n")
    return "\n".join([table[0], "-" * len(table[0]), *table[1:]])


def run_summary(
    rows: list[dict[str, Any]],
    run_dir: str,
    *,
    steps: int,
    train_seconds: float | None,
) -> str:
    """The end-of-run summary from a run's metrics.jsonl rows.

    Args:
        rows: metrics.jsonl rows (MetricsFileCallback), in file order.
        run_dir: the run directory.
        steps: training steps (rollout batches) this fit ran.
        train_seconds: wall time of those steps, validation excluded; None when unknown.

    Lines: the run directory; reward (epoch mean of ``reward/total``) and training accuracy
    (``reward/accuracy_epoch``) from the first to the last epoch; every val/test metric from its
    Vanilla value (the validation before training) to its last; seconds per step and the mean
    generation and update throughput in tokens/s; the `maye_pl report` command for this run.
    """
    lines = [f"Run directory: {run_dir}"]
    train = []
    for label, per_epoch in (("reward", _epoch_means(rows, REWARD_TOTAL)),
                             ("accuracy", epoch_values(rows, TRAIN_ACCURACY_EPOCH))):
        if per_epoch:
            first, last = min(per_epoch), max(per_epoch)
            train.append([f"  {label}", f"epoch {first} {_number(per_epoch[first])}",
                          f"→ epoch {last} {_number(per_epoch[last])}"])
    if train:
        lines += ["Training:", _layout(train)]
    evaluation = []
    for name in sorted({k for row in rows for k in row if k.partition("/")[0] in SPLITS}):
        last = next((float(row[name]) for row in reversed(rows) if is_number(row.get(name))), None)
        if last is None:  # only NaN/inf logged
            continue
        vanilla = vanilla_value(rows, name)
        evaluation.append([f"  {name}", "-" if vanilla is None else _number(vanilla), f"→ {_number(last)}"])
    if evaluation:
        lines += ["Evaluation (Vanilla → last):", _layout(evaluation)]
    speed = []
    if steps and train_seconds is not None:
        speed.append(f"{train_seconds / steps:.2f} s/step over {steps} steps")
    for label, name in (("generation", GENERATE_TOKENS_PER_S), ("update", UPDATE_TOKENS_PER_S)):
        values = [float(row[name]) for row in rows if is_number(row.get(name))]
        if values:
            speed.append(f"{label} {fmean(values):.0f} tokens/s")
    if speed:
        lines.append("Speed: " + ", ".join(speed))
    lines.append(f"Tables and plots: python -m maye_pl report {run_dir} --out {run_dir}/report")
    return "\n".join(lines)


def _epoch_means(rows: list[dict[str, Any]], metric: str) -> dict[int, float]:
    per_epoch: dict[int, list[float]] = defaultdict(list)
    for row in rows:
        if is_number(row.get(metric)):
            per_epoch[row["epoch"]].append(float(row[metric]))
    return {epoch: fmean(values) for epoch, values in per_epoch.items()}


def _number(value: float) -> str:
    return f"{value:.4f}"


def _layout(rows: list[list[str]]) -> str:
    """Left-aligned columns, two spaces apart."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)
