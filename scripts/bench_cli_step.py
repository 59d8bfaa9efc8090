"""Benchmark pipelined rollouts through the command line a user runs: `python -m maye_pl fit` with
``--rollout.max_staleness 1`` against the synchronous ``0``, in one invocation, real vLLM engine
on the CPU.

    python scripts/bench_cli_step.py                # TRL-matched settings, 12 measured steps per mode
    python scripts/bench_cli_step.py --runs 2 --json
    python scripts/bench_cli_step.py -- --rollout.engine_cores 1     # extra `fit` flags after --

Unlike ``scripts/bench_step.py`` (which builds the Trainer itself and pins the two processes by
hand), nothing here touches threads or affinities: the CLI divides the cores itself
(``rollout.engine_cores``, ``maye_pl/rollout/cores.py``), so this measures what a user gets.

Settings (``bench_step.py``'s, the TRL GRPOTrainer comparison): the tiny random Qwen2.5-VL, 8
prompts x 4 samples per step, 32 new tokens, one optimizer step per rollout batch (ppo batch 32),
beta_loss 0.001 with a frozen reference, fp32, vision tower frozen; the rest from
``configs/demo.yaml``; validation and checkpoints off. Each mode runs ``--steps`` + ``--warmup``
generation steps in a fresh `fit` process; ``--runs`` > 1 alternates the modes (0, 1, 0, 1, ...)
so that a change in the machine's load hits both.

Measured: each step's wall time, from one step's start to the next's (``StepClock``, added to the
`fit`'s callbacks), the first ``--warmup`` not counted; per mode the median over all its runs, and
the medians of the phases the run logs (``perf/generate_s``: engine busy on the step's batch,
``perf/rollout_wait_s``: trainer blocked for it, ``perf/trajectory_s``, ``perf/update_s``). Printed:
those and the ratio pipelined / synchronous of the median steps.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import maye_pl  # noqa: F401, I001  (the torchvision shim before lightning imports torchvision)
import lightning.pytorch as pl

REPO = Path(__file__).resolve().parents[1]
PHASES = ("perf/generate_s", "perf/rollout_wait_s", "perf/trajectory_s", "perf/update_s")


class StepClock(pl.Callback):
    """Appends the wall clock at every training step's start, and at the end of training, to ``path``."""

    def __init__(self, path: str) -> None:
        """
        Args:
            path: The file the times (seconds since the epoch, one per line) are appended to.
        """
        self.path = path

    def _stamp(self) -> None:
        with open(self.path, "a") as file:
            file.write(f"{time.time()}\n")

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self._stamp()

    def on_train_end(self, trainer: pl.Trainer, pl_module: Any) -> None:
        self._stamp()


def fit_command(work: Path, name: str, max_staleness: int, fit_args: list[str]) -> list[str]:
    """The `fit` of one run on the work directory's tiny model and data set."""
    return [
        sys.executable, "-m", "maye_pl", "fit", "--config", str(REPO / "configs/demo.yaml"),
        "--demo_assets", "false", "--model.model_path", str(work / "tiny"),
        "--data.train_path", str(work / "geo/train.jsonl"), "--data.val_path", "null", "--data.test_path", "null",
        "--model.validate_before_fit", "false", "--trainer.limit_val_batches", "0",
        "--data.batch_size", "8", "--model.sampling.n", "4", "--model.sampling.max_tokens", "32",
        "--model.ppo.batch_size", "32", "--model.ppo.gradient_accumulation_steps", "1",
        "--model.loss.kl_coef", "0.001", "--model.lr", "1e-5", "--trainer.max_epochs", "1",
        "--trainer.enable_checkpointing", "false", "--trainer.enable_progress_bar", "false",
        "--trainer.logger.init_args.save_dir", str(work / "runs"), "--trainer.logger.init_args.version", name,
        "--data.token_count_cache", str(work / "token_counts"),
        "--rollout.max_staleness", str(max_staleness),
        "--trainer.callbacks+=bench_cli_step.StepClock", "--trainer.callbacks.path", str(work / f"{name}.times"),
        *fit_args,
    ]


def run(work: Path, name: str, max_staleness: int, args: argparse.Namespace) -> dict[str, list[float]]:
    """One `fit`: its measured step times and per-step phases."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "scripts"), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(fit_command(work, name, max_staleness, args.fit_args), cwd=work, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if result.returncode != 0:
        sys.exit(f"bench_cli_step: {name} failed (exit {result.returncode}):\n{result.stderr[-4000:]}")
    times = [float(line) for line in (work / f"{name}.times").read_text().split()]
    rows = [json.loads(line) for line in (work / "runs/demo" / name / "metrics.jsonl").read_text().splitlines()]
    steps = [row for row in rows if "loss/total" in row][args.warmup:]
    return {"step_s": [end - start for start, end in zip(times, times[1:])][args.warmup:],
            **{phase: [row.get(phase, 0.0) for row in steps] for phase in PHASES}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=12, help="Measured generation steps per run.")
    parser.add_argument("--warmup", type=int, default=2, help="Steps run first and not measured.")
    parser.add_argument("--runs", type=int, default=1, help="Runs per mode, alternating the modes.")
    parser.add_argument("--json", action="store_true", help="Print one JSON object instead of the table.")
    parser.add_argument("fit_args", nargs="*", help="Further `fit` flags for both modes (after --).")
    args = parser.parse_args()

    from maye_pl.data import generate_geometry_dataset
    from maye_pl.models.tiny import ensure_tiny_model

    measured: dict[int, dict[str, list[float]]] = {0: {}, 1: {}}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        ensure_tiny_model(work / "tiny")
        generate_geometry_dataset(work / "geo", n_train=8 * (args.steps + args.warmup), n_val=0, n_test=0)
        for index in range(args.runs):
            for staleness in (0, 1):
                for key, values in run(work, f"staleness{staleness}_run{index}", staleness, args).items():
                    measured[staleness].setdefault(key, []).extend(values)
    results = [{"max_staleness": staleness, "steps": len(values["step_s"]),
                **{key: statistics.median(series) for key, series in values.items()}}
               for staleness, values in measured.items()]
    ratio = results[1]["step_s"] / results[0]["step_s"]
    if args.json:
        print(json.dumps({"results": results, "ratio_pipelined_to_sync": ratio}))
        return
    names = ["step_s", *PHASES]
    print(f"{'max_staleness':>13} " + " ".join(f"{name.removeprefix('perf/'):>16}" for name in names) + "  (medians, s)")
    for row in results:
        print(f"{row['max_staleness']:>13} " + " ".join(f"{row[name]:>16.3f}" for name in names))
    print(f"pipelined / synchronous median step through the CLI: {ratio:.2f}x")


if __name__ == "__main__":
    main()
