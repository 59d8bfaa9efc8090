"""`maye_pl report RUN_DIR [RUN_DIR ...] --out DIR`: the paper's Table 3 and Fig. 4/5-style plots.

Inputs: run directories (or parents of them) holding metrics.jsonl and config.yaml; seeds of one
configuration are grouped (rule in maye_pl/evaluation/runs.py). Outputs in --out:
  table.md, table.csv   per group and eval metric (val/test x pass@k setting), each averaged over
                        the group's seeds: Vanilla (the metric in the first row with step == 0, the
                        validation before training), Mean and Max over epochs (Vanilla excluded;
                        a run's epoch logged twice keeps its last value), and the gain of Max over
                        Vanilla in % = (Max - Vanilla) / Vanilla * 100 from the seed averages
                        (empty when Vanilla is missing or 0); then the metric after each epoch
                        (rows "Epoch e" in table.md, statistic "epoch_e" in table.csv: the seed
                        mean after e epochs). table.md shows accuracies in %, table.csv the logged
                        fractions.
  train_accuracy.png    reward/accuracy_epoch per epoch
  response_length.png   rollout/response_length_mean per generation_step
  reflection_ratios.png the five reflection/<ratio> per generation_step
  reflection_words.png  the N_WORDS reflection/word_count/<word> curves whose seed-mean changes
                        most from the first to the last point (largest |last - first| in any group)
  eval_accuracy.png     every val/test pass@k metric per epoch, Vanilla drawn at epoch 0 and the
                        evaluation after epoch e (0-based) at e + 1
Every curve is the mean over a group's seeds with a +-1 std band (sample std), one line per
group. A figure whose metrics no run has is skipped with a printed notice.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import re
from collections.abc import Callable
from statistics import fmean

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from maye_pl.evaluation.names import (
    GENERATION_STEP,
    REFLECTION_PREFIX,
    RESPONSE_LENGTH_MEAN,
    TRAIN_ACCURACY_EPOCH,
)
from maye_pl.evaluation.passk import PAPER_EVAL_SETTINGS, SPLITS, metric_name
from maye_pl.evaluation.reflection import RATIO_KEYS, REFLECTION_WORDS, WORD_COUNT_PREFIX
from maye_pl.evaluation.runs import (
    ReportError,
    Run,
    RunGroup,
    curve,
    epoch_values,
    find_run_dirs,
    group_runs,
    load_run,
    mean_std,
    vanilla_value,
)

STATISTICS = ("vanilla", "mean", "max", "max_gain_pct")
_STAT_TITLES = {
    "vanilla": "Vanilla",
    "mean": "Mean",
    "max": "Max",
    "max_gain_pct": "Max gain over Vanilla (%)",
}
N_WORDS = 4
_EVAL_METRIC = re.compile(rf"^({'|'.join(SPLITS)})/pass@\d+_t\S+$")

Extract = Callable[[Run], dict[float, float]]


# ---------------------------------------------------------------- Table 3


def eval_metrics(runs: list[Run]) -> list[str]:
    """The val/test pass@k metrics present in any run: per split, the paper's settings in its
    order, then any other setting sorted."""
    present = {key for run in runs for row in run.rows for key in row if _EVAL_METRIC.match(key)}
    ordered = []
    for split in SPLITS:
        paper = [metric_name(split, s) for s in PAPER_EVAL_SETTINGS()]
        others = sorted(m for m in present if m.startswith(split + "/") and m not in paper)
        ordered += [m for m in paper if m in present] + others
    return ordered


def _average(values: list[float]) -> float | None:
    return fmean(values) if values else None


def table_statistics(group: RunGroup, metric: str) -> dict[str, float | None]:
    """STATISTICS of `metric` for one group (definitions in the module docstring); None where no
    seed has the value."""
    per_epoch = [v for v in (epoch_values(run.rows, metric) for run in group.runs) if v]
    vanillas = [vanilla_value(run.rows, metric) for run in group.runs]
    vanilla = _average([v for v in vanillas if v is not None])
    best = _average([max(values.values()) for values in per_epoch])
    gain = None
    if vanilla and best is not None:  # no gain relative to a missing or zero Vanilla
        gain = (best - vanilla) / vanilla * 100
    return {
        "vanilla": vanilla,
        "mean": _average([fmean(values.values()) for values in per_epoch]),
        "max": best,
        "max_gain_pct": gain,
    }


def epoch_statistics(group: RunGroup, metric: str) -> dict[int, float]:
    """`metric` after each epoch, averaged over the group's seeds that have it: {epoch (1-based):
    value}; the evaluation after epoch e (0-based in metrics.jsonl) is epoch e + 1, as in the plots."""
    per_epoch: dict[int, list[float]] = {}
    for run in group.runs:
        for epoch, value in epoch_values(run.rows, metric).items():
            per_epoch.setdefault(epoch + 1, []).append(value)
    return {epoch: fmean(values) for epoch, values in sorted(per_epoch.items())}


def _md_cell(statistic: str, value: float | None) -> str:
    if value is None:
        return "–"
    return f"{value:+.2f}" if statistic == "max_gain_pct" else f"{100 * value:.2f}"


def write_tables(groups: list[RunGroup], metrics: list[str], out_dir: str) -> list[str]:
    """Write table.md and table.csv; returns their paths."""
    md = [
        "# maye_pl report: accuracy (Table 3 layout)",
        "",
        "Accuracy in %, averaged over seeds. Vanilla: before training (first row with step 0); "
        "Mean/Max: over epochs, Vanilla excluded; gain: (Max - Vanilla) / Vanilla.",
    ]
    csv_rows = []
    for group in groups:
        table = {metric: table_statistics(group, metric) for metric in metrics}
        seeds = ["?" if run.seed is None else run.seed for run in group.runs]
        runs = ", ".join(f"`{run.path}` (seed {seed})" for run, seed in zip(group.runs, seeds))
        md += ["", f"## {group.label}", "", f"Runs: {runs}", ""]
        md += ["| | " + " | ".join(metrics) + " |", "|---|" + "---:|" * len(metrics)]
        for stat in STATISTICS:
            values = [table[m][stat] for m in metrics]
            cells = [_md_cell(stat, v) for v in values]
            md.append(f"| {_STAT_TITLES[stat]} | " + " | ".join(cells) + " |")
            csv_values = ["" if v is None else repr(v) for v in values]
            csv_rows.append([group.label, len(group.runs), stat, *csv_values])
        # The rise epoch by epoch: Vanilla, then the evaluation after each epoch.
        per_epoch = {metric: epoch_statistics(group, metric) for metric in metrics}
        md += ["", "Per epoch:", "", "| | " + " | ".join(metrics) + " |", "|---|" + "---:|" * len(metrics)]
        md.append("| Vanilla | " + " | ".join(_md_cell("vanilla", table[m]["vanilla"]) for m in metrics) + " |")
        for epoch in sorted(set().union(*per_epoch.values())):
            values = [per_epoch[m].get(epoch) for m in metrics]
            md.append(f"| Epoch {epoch} | " + " | ".join(_md_cell("epoch", v) for v in values) + " |")
            csv_rows.append([group.label, len(group.runs), f"epoch_{epoch}",
                             *("" if v is None else repr(v) for v in values)])
    md_path, csv_path = os.path.join(out_dir, "table.md"), os.path.join(out_dir, "table.csv")
    with open(md_path, "w", encoding="utf-8") as f:
        f.write("\n".join(md) + "\n")
    with open(csv_path, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["group", "n_runs", "statistic", *metrics])
        writer.writerows(csv_rows)
    return [md_path, csv_path]


# ---------------------------------------------------------------- figures


def _draw(ax, groups: list[RunGroup], extract: Extract) -> bool:
    drawn = False
    for group in groups:
        curves = [points for points in map(extract, group.runs) if points]
        if not curves:
            continue
        xs, mean, std = mean_std(curves)
        marker = "o" if len(xs) <= 30 else None
        (line,) = ax.plot(xs, mean, marker=marker, markersize=3, label=group.label)
        ax.fill_between(xs, mean - std, mean + std, color=line.get_color(), alpha=0.2, linewidth=0)
        drawn = True
    return drawn


def plot_panels(
    groups: list[RunGroup], panels: list[tuple[str, Extract]], xlabel: str, path: str
) -> bool:
    """One subplot per (title, extract) panel, at most 3 per row; writes `path` and returns True,
    or returns False without writing when no panel has data."""
    ncols = min(3, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig = Figure(figsize=(4.5 * ncols, 3.4 * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    drawn = [_draw(ax, groups, extract) for ax, (_, extract) in zip(axes, panels)]
    if not any(drawn):
        return False
    for ax, (title, _), has_data in zip(axes, panels, drawn):
        ax.set_title(title, fontsize="medium")
        ax.set_xlabel(xlabel)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs and steps are counts
        ax.grid(alpha=0.3)
        if not has_data:
            ax.text(0.5, 0.5, "no data", transform=ax.transAxes, ha="center", color="gray")
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    axes[drawn.index(True)].legend(fontsize="small")
    fig.savefig(path, dpi=110)
    return True


def _steps(metric: str) -> Extract:
    return lambda run: curve(run.rows, metric, GENERATION_STEP)


def _epochs(metric: str) -> Extract:
    # Epoch e (0-based) has ended after e + 1 epochs of training; Vanilla sits at 0.
    def extract(run: Run) -> dict[float, float]:
        points = {epoch + 1.0: value for epoch, value in epoch_values(run.rows, metric).items()}
        vanilla = vanilla_value(run.rows, metric)
        return points if vanilla is None else {0.0: vanilla, **points}

    return extract


def changing_words(groups: list[RunGroup], n: int = N_WORDS) -> list[str]:
    """The n reflection words whose group seed-mean count changes most, |last - first|, over
    generation steps (ties keep REFLECTION_WORDS order); words nobody logged are left out."""
    change = {}
    for word in REFLECTION_WORDS:
        extract = _steps(REFLECTION_PREFIX + WORD_COUNT_PREFIX + word)
        for group in groups:
            curves = [points for points in map(extract, group.runs) if points]
            if curves:
                _, mean, _ = mean_std(curves)
                change[word] = max(change.get(word, 0.0), abs(mean[-1] - mean[0]))
    return sorted(change, key=lambda w: -change[w])[:n]


def write_figures(groups: list[RunGroup], metrics: list[str], out_dir: str) -> list[str]:
    """Write the PNG figures listed in the module docstring; returns the paths written and prints
    a notice for each figure skipped for lack of data."""
    words = changing_words(groups)
    figures = {
        "train_accuracy.png": ([(TRAIN_ACCURACY_EPOCH, _epochs(TRAIN_ACCURACY_EPOCH))], "epoch"),
        "response_length.png": (
            [(RESPONSE_LENGTH_MEAN, _steps(RESPONSE_LENGTH_MEAN))],
            GENERATION_STEP,
        ),
        "reflection_ratios.png": (
            [(REFLECTION_PREFIX + k, _steps(REFLECTION_PREFIX + k)) for k in RATIO_KEYS],
            GENERATION_STEP,
        ),
        "reflection_words.png": (
            [(f'count of "{w}"', _steps(REFLECTION_PREFIX + WORD_COUNT_PREFIX + w)) for w in words],
            GENERATION_STEP,
        ),
        "eval_accuracy.png": ([(m, _epochs(m)) for m in metrics], "epoch"),
    }
    written = []
    for filename, (panels, xlabel) in figures.items():
        path = os.path.join(out_dir, filename)
        if panels and plot_panels(groups, panels, xlabel, path):
            written.append(path)
        else:
            needed = ", ".join(title for title, _ in panels) or "its metrics"
            print(f"maye_pl report: skipping {filename}: no run has {needed} (with {xlabel}).")
    return written


# ---------------------------------------------------------------- command


def write_report(paths: list[str], out_dir: str) -> list[str]:
    """Load the runs under `paths`, write tables and figures to `out_dir`; returns written paths."""
    runs = [load_run(d) for d in find_run_dirs(paths)]
    for run in runs:
        if run.config is None:
            print(f"maye_pl report: {run.path} has no config.yaml; it forms a group of its own.")
    groups = group_runs(runs)
    os.makedirs(out_dir, exist_ok=True)
    metrics = eval_metrics(runs)
    written = []
    if metrics:
        written += write_tables(groups, metrics, out_dir)
    else:
        print("maye_pl report: skipping table.md/table.csv: no run has a val|test/pass@k metric.")
    return written + write_figures(groups, metrics, out_dir)


def main(argv: list[str] | None = None) -> None:
    """Entry point of `python -m maye_pl report RUN_DIR [RUN_DIR ...] --out DIR`."""
    parser = argparse.ArgumentParser(
        prog="maye_pl report",
        description="Accuracy table (paper Table 3) and training curves (Fig. 4/5) from maye_pl "
        "run directories.",
    )
    parser.add_argument(
        "run_dirs", nargs="+", metavar="RUN_DIR", help="a run directory, or a directory above runs"
    )
    parser.add_argument(
        "--out", required=True, metavar="DIR", help="where table.md, table.csv and *.png go"
    )
    args = parser.parse_args(argv)
    try:
        written = write_report(args.run_dirs, args.out)
    except ReportError as err:
        parser.exit(2, f"maye_pl report: error: {err}\n")
    for path in written:
        print(f"maye_pl report: wrote {path}")


if __name__ == "__main__":
    main()
