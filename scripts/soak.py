"""Soak test: run a real `python -m maye_pl fit` for N generation steps and report each process's
memory (RSS) over time: the trainer's and the vLLM engine host's.

    python scripts/soak.py --steps 320                     # the demo config, validation off
    python scripts/soak.py --steps 320 --json              # one JSON object on stdout
    python scripts/soak.py --steps 40 -- --rollout.max_staleness 1    # extra `fit` flags after --

Method: the `fit` runs with ``SoakProbe`` added to its callbacks (``--trainer.callbacks+=``). At the
end of every training step the probe reads the RSS of its own process (the trainer, global rank 0)
and of the engine host (its child process named ``maye_pl-engine``) from /proc, appends one JSON
line per step to a file, and stops the fit after ``--steps`` steps (the epochs are endless; a large
``max_steps`` only sizes the LR schedule, so the learning rate stays near its peak). Validation is off (``limit_val_batches 0``, no
Vanilla row), so every step is the same work: what grows is what leaks.

Reported per process: RSS after the first step, at the middle step and at the last, the growth over
the second half ((last - middle) / middle, in %; the issue's bound is 2 %) and over the whole run,
and a row every ``--every`` steps. "anon" is the process's anonymous RSS (heap, mmaps; RssAnon):
file-backed pages (libraries, the model's safetensors) are in RSS but not in it.

The demo config runs from the repository root, as `make demo` does (its assets are built under
``.cache/`` and ``datasets/`` on first use, nothing is downloaded); its run directory is temporary.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import maye_pl  # noqa: F401, I001  (the torchvision shim before lightning imports torchvision)
import lightning.pytorch as pl

REPO = Path(__file__).resolve().parents[1]
ENGINE_PROCESS_NAME = "maye_pl-engine"  # maye_pl.rollout's HOST_PROCESS_NAME (not imported: keeps vLLM out)


def _rss_mib(pid: int) -> tuple[float, float]:
    """(RSS, anonymous RSS) of process ``pid`` in MiB, from /proc/<pid>/status."""
    fields = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            name, _, value = line.partition(":")
            if name in ("VmRSS", "RssAnon"):
                fields[name] = int(value.split()[0]) / 1024  # kB -> MiB
    return fields["VmRSS"], fields["RssAnon"]


def _engine_pids() -> list[int]:
    """The engine hosts among this process's children (named by prctl; see maye_pl.rollout)."""
    pids = []
    for task in Path(f"/proc/{os.getpid()}/task").iterdir():
        children = (task / "children").read_text().split()
        for pid in map(int, children):
            try:
                if Path(f"/proc/{pid}/comm").read_text().strip() == ENGINE_PROCESS_NAME:
                    pids.append(pid)
            except FileNotFoundError:  # exited meanwhile
                pass
    return pids


class SoakProbe(pl.Callback):
    """Appends ``{"step", "seconds", "trainer_rss", "trainer_anon", "engine_rss", "engine_anon"}``
    (MiB; seconds since the first step began) to ``path`` after every training step on global rank 0,
    and stops the fit after ``steps`` steps."""

    def __init__(self, path: str, steps: int) -> None:
        """
        Args:
            path: The JSON-lines file the rows are appended to.
            steps: Generation steps to run before stopping the fit.
        """
        self.path = path
        self.steps = steps
        self._count = 0
        self._start: float | None = None

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if self._start is None:
            self._start = time.monotonic()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._count += 1
        if trainer.is_global_zero:
            row: dict[str, float] = {"step": self._count, "seconds": round(time.monotonic() - self._start, 1)}
            row["trainer_rss"], row["trainer_anon"] = _rss_mib(os.getpid())
            engines = _engine_pids()
            if engines:
                row["engine_rss"], row["engine_anon"] = (sum(values) for values in zip(*map(_rss_mib, engines)))
            with open(self.path, "a") as file:
                file.write(json.dumps(row) + "\n")
        if self._count >= self.steps:
            trainer.should_stop = True


def _fit_command(args: argparse.Namespace, work: Path, rows: Path) -> list[str]:
    command = [sys.executable, "-m", "maye_pl", "fit", "--config", str(args.config)]
    if args.config == REPO / "configs/demo.yaml":  # the run directory in the work directory
        command += ["--trainer.default_root_dir", str(work / "runs"),
                    "--trainer.logger.init_args.save_dir", str(work / "runs")]
    return command + [
        "--model.validate_before_fit", "false", "--trainer.limit_val_batches", "0",
        # Endless epochs; max_steps (optimizer steps) only sizes the LR schedule: the probe stops the fit.
        "--trainer.max_epochs", "-1", "--trainer.max_steps", str(10**6 * args.steps),
        "--trainer.enable_progress_bar", "false",
        "--trainer.callbacks+=soak.SoakProbe", "--trainer.callbacks.path", str(rows),
        "--trainer.callbacks.steps", str(args.steps),
        *args.fit_args,
    ]


def summarize(rows: list[dict[str, float]], every: int) -> dict[str, Any]:
    """Per process: RSS at the first, middle and last step, growth over the second half and the run."""
    middle, last = rows[(len(rows) - 1) // 2], rows[-1]
    summary: dict[str, Any] = {"steps": len(rows), "middle_step": middle["step"], "seconds": last["seconds"]}
    for process in ("trainer", "engine"):
        key = f"{process}_rss"
        if key not in last:
            continue
        summary[process] = {
            "first_mib": rows[0][key], "middle_mib": middle[key], "last_mib": last[key],
            "max_mib": max(row[key] for row in rows),
            "second_half_growth_pct": 100 * (last[key] - middle[key]) / middle[key],
            "run_growth_pct": 100 * (last[key] - rows[0][key]) / rows[0][key],
        }
    summary["rows"] = [row for row in rows if row["step"] % every == 0 or row is rows[0]]
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=320, help="Generation steps to run.")
    parser.add_argument("--every", type=int, default=20, help="Print a row every this many steps.")
    parser.add_argument("--config", type=Path, default=REPO / "configs/demo.yaml", help="The fit's config.")
    parser.add_argument("--json", action="store_true", help="Print one JSON object instead of the table.")
    parser.add_argument("fit_args", nargs="*", help="Further `fit` flags (after --).")
    args = parser.parse_args()
    args.config = args.config.resolve()

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        rows_path = work / "rss.jsonl"
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "scripts"), os.environ.get("PYTHONPATH", "")])}
        cwd = REPO if args.config == REPO / "configs/demo.yaml" else Path.cwd()
        result = subprocess.run(_fit_command(args, work, rows_path), cwd=cwd, env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if result.returncode != 0:
            sys.exit(f"soak: the fit failed (exit {result.returncode}):\n{result.stderr[-4000:]}")
        rows = [json.loads(line) for line in rows_path.read_text().splitlines()]
    summary = summarize(rows, args.every)
    if args.json:
        print(json.dumps(summary))
        return
    processes = [p for p in ("trainer", "engine") if p in summary]
    print(f"{'step':>5} {'s':>6} " + " ".join(f"{p + ' MiB':>12} {p + ' anon':>12}" for p in processes))
    for row in summary["rows"]:
        print(f"{row['step']:>5} {row['seconds']:>6.0f} " + " ".join(f"{row[p + '_rss']:>12.1f} {row[p + '_anon']:>12.1f}" for p in processes))
    for process in processes:
        s = summary[process]
        print(f"{process}: {s['first_mib']:.0f} -> {s['middle_mib']:.0f} (step {summary['middle_step']}) -> "
              f"{s['last_mib']:.0f} MiB; second half {s['second_half_growth_pct']:+.2f} %, run {s['run_growth_pct']:+.2f} %")


if __name__ == "__main__":
    main()
