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
MAX_COLUMNS = 8
"""The most epochs (Vanilla included) the summary lists; longer runs show the first and last four."""
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
    (``reward/accuracy_epoch``) per epoch; every val/test metric from its Vanilla value (the
    validation before training) through each epoch's, with the change from Vanilla to the last;
    seconds per step and the mean generation and update throughput in tokens/s; the
    `maye_pl report` command for this run. Epochs count from 1 (Vanilla is epoch 0, as in the
    report's plots); past ``MAX_COLUMNS`` epochs the middle ones are left out.
    """
    lines = [f"Run directory: {run_dir}"]
    train = {label: per_epoch for label, per_epoch in (("reward", _epoch_means(rows, REWARD_TOTAL)),
                                                        ("accuracy", epoch_values(rows, TRAIN_ACCURACY_EPOCH)))
             if per_epoch}
    if train:
        epochs = _shown(sorted(set().union(*train.values())))
        lines.append(f"Training (epoch {' → '.join('…' if e is None else str(e + 1) for e in epochs)}):")
        lines.append(_layout([[f"  {label}", *_arrowed(per_epoch, epochs)] for label, per_epoch in train.items()]))
    evaluation = {}
    for name in sorted({k for row in rows for k in row if k.partition("/")[0] in SPLITS}):
        vanilla = vanilla_value(rows, name)
        per_epoch = {epoch + 1: value for epoch, value in epoch_values(rows, name).items()}
        if vanilla is not None:
            per_epoch[0] = vanilla
        if per_epoch:  # not only NaN/inf logged
            evaluation[name] = per_epoch
    if evaluation:
        epochs = _shown(sorted(set().union(*evaluation.values())))
        names = ["…" if e is None else "Vanilla" if e == 0 else f"epoch {e}" for e in epochs]
        lines.append(f"Evaluation ({' → '.join(names)}):")
        table = []
        for name, per_epoch in evaluation.items():
            first, last = per_epoch[min(per_epoch)], per_epoch[max(per_epoch)]
            change = f"({last - first:+.4f})" if 0 in per_epoch and len(per_epoch) > 1 else ""
            table.append([f"  {name}", *_arrowed(per_epoch, epochs), change])
        lines.append(_layout(table))
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


def _shown(epochs: list[int]) -> list[int | None]:
    """``epochs`` as the summary shows them: all up to MAX_COLUMNS, else the first and last
    halves around a None (printed "…")."""
    if len(epochs) <= MAX_COLUMNS:
        return list(epochs)
    half = MAX_COLUMNS // 2
    return [*epochs[:half], None, *epochs[-half:]]


def _arrowed(per_epoch: dict[int, float], epochs: list[int | None]) -> list[str]:
    """One cell per shown epoch, every cell after the first led by an arrow; "-" where missing."""
    cells = ["…" if e is None else _number(per_epoch[e]) if e in per_epoch else "-" for e in epochs]
    return [cells[0], *(f"→ {cell}" for cell in cells[1:])]


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
