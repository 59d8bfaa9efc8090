"""Loading finished runs for `maye_pl report`: find run directories, group seeds, extract curves.

A run directory holds metrics.jsonl (MetricsFileCallback) and usually config.yaml (LightningCLI's
config dump). Runs whose configs are equal after dropping these keys are seeds of one group:
  - seed_everything and ckpt_path (top level);
  - trainer.default_root_dir;
  - in trainer.logger and trainer.callbacks (a single class_path/init_args node or a list of
    them), the init_args keys in RUN_PATH_KEYS: where a run writes, not what it trains.
A run without config.yaml forms a group of its own.

A group's label names the config keys that set it apart. Runs of different recipes
(``model.init_args.recipe``, set by ``configs/recipes/*.yaml``) are labelled by their recipe
(``recipe=none`` without one), followed only by the keys that differ among runs of that recipe:
a recipe changes many keys, and its name says which.
"""

from __future__ import annotations

import copy
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import yaml

from maye_pl.evaluation.metrics_file import METRICS_FILENAME, read_metrics

CONFIG_FILENAME = "config.yaml"
RUN_PATH_KEYS = ("save_dir", "dir", "name", "version", "sub_dir", "id", "dirpath")
RECIPE_KEY = "model.init_args.recipe"
"""The flattened config key of a run's recipe name."""


class ReportError(ValueError):
    """A run directory or its files cannot be reported on; the message says which and why."""


@dataclass
class Run:
    """One training run as the report sees it."""

    path: str
    """The run directory."""
    rows: list[dict[str, Any]]
    """metrics.jsonl rows in file order."""
    config: dict[str, Any] | None
    """config.yaml contents; None when the run has none."""

    @property
    def seed(self) -> int | None:
        """seed_everything from config.yaml (None when absent or not an int)."""
        seed = (self.config or {}).get("seed_everything")
        return seed if isinstance(seed, int) and not isinstance(seed, bool) else None


@dataclass
class RunGroup:
    """Runs of one configuration over different seeds."""

    label: str
    """Legend/table name: the config keys that set this group apart from the others."""
    runs: list[Run] = field(default_factory=list)


def find_run_dirs(paths: list[str]) -> list[str]:
    """Run directories named by `paths`: each path itself if it holds metrics.jsonl, else every
    directory below it that does (so a parent of several runs may be given), sorted."""
    found: list[str] = []
    for path in paths:
        if not os.path.isdir(path):
            raise ReportError(
                f"{path}: not a directory; pass run directories (holding {METRICS_FILENAME})."
            )
        if not os.listdir(path):
            raise ReportError(
                f"{path}: empty directory; the run wrote no {METRICS_FILENAME} (did it start?)."
            )
        below = sorted(root for root, _, files in os.walk(path) if METRICS_FILENAME in files)
        if not below:
            raise ReportError(
                f"{path}: no {METRICS_FILENAME} in it or below; not a maye_pl run directory "
                "(train with MetricsFileCallback, which the maye_pl CLI adds)."
            )
        found.extend(d for d in below if d not in found)
    return found


def load_run(run_dir: str) -> Run:
    """Read one run directory (metrics.jsonl required, config.yaml optional)."""
    try:
        rows = read_metrics(run_dir)
    except (FileNotFoundError, ValueError) as err:
        raise ReportError(str(err)) from err
    config_path = os.path.join(run_dir, CONFIG_FILENAME)
    config = None
    if os.path.isfile(config_path):
        with open(config_path, encoding="utf-8") as f:
            try:
                config = yaml.safe_load(f)
            except yaml.YAMLError as err:
                raise ReportError(f"{config_path}: not valid YAML ({err}); fix it.") from err
        if not isinstance(config, dict):
            raise ReportError(
                f"{config_path}: top level must be a mapping, got {type(config).__name__}."
            )
    return Run(path=run_dir, rows=rows, config=config)


def _strip_run_paths(node: Any) -> None:
    for entry in node if isinstance(node, list) else [node]:
        if isinstance(entry, dict) and isinstance(entry.get("init_args"), dict):
            for key in RUN_PATH_KEYS:
                entry["init_args"].pop(key, None)


def comparable_config(config: dict[str, Any]) -> dict[str, Any]:
    """`config` without the seed and run-path keys listed in the module docstring."""
    config = copy.deepcopy(config)
    config.pop("seed_everything", None)
    config.pop("ckpt_path", None)
    trainer = config.get("trainer")
    if isinstance(trainer, dict):
        trainer.pop("default_root_dir", None)
        _strip_run_paths(trainer.get("logger"))
        _strip_run_paths(trainer.get("callbacks"))
    return config


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict):
        items = node.items()
    elif isinstance(node, list):
        items = ((str(i), v) for i, v in enumerate(node))
    else:
        return {prefix: node}
    flat: dict[str, Any] = {}
    for key, value in items:
        flat.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def group_runs(runs: list[Run]) -> list[RunGroup]:
    """Group seeds of one configuration (rule in the module docstring), in first-seen order."""
    groups: dict[str, RunGroup] = {}
    flat_configs: dict[str, dict[str, Any]] = {}
    for run in runs:
        if run.config is None:
            key = "no-config:" + run.path
        else:
            comparable = comparable_config(run.config)
            key = json.dumps(comparable, sort_keys=True, default=str)
            flat_configs.setdefault(key, _flatten(comparable))
        groups.setdefault(key, RunGroup(label="")).runs.append(run)
    differing = _differing_keys(list(flat_configs.values()))
    for key, group in groups.items():
        if key in flat_configs and RECIPE_KEY in differing:
            recipe = flat_configs[key].get(RECIPE_KEY)
            same_recipe = [flat for flat in flat_configs.values() if flat.get(RECIPE_KEY) == recipe]
            label = ", ".join([f"recipe={recipe or 'none'}"] + [
                f"{k}={flat_configs[key].get(k)}" for k in _differing_keys(same_recipe)])
        elif key in flat_configs and differing:
            label = ", ".join(f"{k}={flat_configs[key].get(k)}" for k in differing)
        elif len(group.runs) > 1:
            common = os.path.commonpath([os.path.abspath(r.path) for r in group.runs])
            label = os.path.basename(common)
        else:
            label = os.path.basename(os.path.abspath(group.runs[0].path))
        group.label = label if len(label) <= 80 else label[:77] + "..."
    return list(groups.values())


def _differing_keys(flat_configs: list[dict[str, Any]]) -> list[str]:
    """The keys whose values are not the same in all of ``flat_configs``, sorted."""
    all_keys = set().union(*flat_configs) if flat_configs else set()
    return sorted(k for k in all_keys if len({repr(flat.get(k)) for flat in flat_configs}) > 1)


def is_number(value: Any) -> bool:
    """A finite int or float (not a bool): a value a metrics.jsonl row can plot."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def vanilla_row_index(rows: list[dict[str, Any]], metric: str) -> int | None:
    """Index of the Vanilla row of `metric`: the first row holding it with step == 0 (the
    validation before any training step), or None."""
    for i, row in enumerate(rows):
        if row["step"] == 0 and is_number(row.get(metric)):
            return i
    return None


def vanilla_value(rows: list[dict[str, Any]], metric: str) -> float | None:
    """`metric` in its Vanilla row (see vanilla_row_index), or None."""
    i = vanilla_row_index(rows, metric)
    return None if i is None else float(rows[i][metric])


def epoch_values(rows: list[dict[str, Any]], metric: str) -> dict[int, float]:
    """`metric` per epoch, {epoch: value}, leaving out the Vanilla row; an epoch logged twice
    keeps its last value."""
    skip = vanilla_row_index(rows, metric)
    return {
        row["epoch"]: float(row[metric])
        for i, row in enumerate(rows)
        if i != skip and is_number(row.get(metric))
    }


def curve(rows: list[dict[str, Any]], metric: str, x: str) -> dict[float, float]:
    """{x value: metric} over the rows that hold both; a repeated x keeps its last value."""
    return {
        float(row[x]): float(row[metric])
        for row in rows
        if is_number(row.get(x)) and is_number(row.get(metric))
    }


def mean_std(curves: list[dict[float, float]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean and spread of several runs' curves at every x any of them has.

    Returns (xs, mean, std), each shape (X,): std is the sample std (ddof=1) over the runs that
    have the point, 0 where only one has it.
    """
    xs = sorted(set().union(*curves))
    means, stds = [], []
    for x in xs:
        values = np.array([c[x] for c in curves if x in c])
        means.append(values.mean())
        stds.append(values.std(ddof=1) if len(values) > 1 else 0.0)
    return np.array(xs), np.array(means), np.array(stds)
