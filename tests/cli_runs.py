"""Helpers for tests that run `python -m maye_pl fit` in real processes (test_resume, tests/faults).

- ``fit_workdir``: a directory with what ``fit_command`` trains on (the tiny model, a geometry set).
- ``fit_command``: the arguments of a tiny demo `fit` (2 prompts x 2 samples per step, 12 new
  tokens, no validation; after ``MAYE_PL`` for a fresh process, alone for ``run_maye_pl_here``)
  that records each step's prompt ids as the step starts (``PromptIdsRecorder``), with the
  console a user gets (the default progress bar and summary).
- ``RunningFit``: such a run in the background, in its own session, to signal it mid-step or
  mid-validation; its waits are on events (a step or validation batch started, a line printed),
  never fixed sleeps, so the time bounds the tests assert start at the event they bound. With
  ``nodes`` > 1, one process per simulated node on this machine (NODE_RANK 0..n-1, a shared
  MASTER_PORT: what a cluster's launcher sets on each node).
- ``has_letter_e``: a reward by import path for runs whose groups must sometimes score alike.
- ``RunningFit.engines``: the run's vLLM engine processes (to prove none outlives it; other
  programs' engines on the same machine are not counted).
- ``run_maye_pl``: `python -m maye_pl ...` to its end, failing the test (with its output) unless it succeeds.
- ``run_maye_pl_here``: the same command through the CLI's entry point in the test's process.
- ``engine_processes_started_in``: the same proof for runs that have ended (`fit` run to completion
  by ``subprocess.run``), by the engines' working directory.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import psutil
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
MAYE_PL = [sys.executable, "-m", "maye_pl"]
"""What starts maye_pl in a fresh interpreter; the subcommand and its arguments follow."""


def tests_on_path() -> dict[str, str]:
    """This environment with tests/ on PYTHONPATH, so that a fresh `fit` imports the tests' rewards
    and callbacks by their import paths (``test_learning.letter_share_reward``, ``cli_runs.…``)."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}


def has_letter_e(responses: list[str], samples: list[dict]) -> torch.Tensor:
    """1.0 where the response contains the letter "e" (the tiny model: about half of them): (B,)."""
    return torch.tensor([float("e" in text) for text in responses])


class PromptIdsRecorder(pl.Callback):
    """Appends each training batch's prompt ids to ``<out_dir>/ids_rank<r>.jsonl`` (one line per
    step) and each validation batch's to ``val_ids_rank<r>.jsonl``, as the batch starts (before the
    engine generates: the CLI appends its own callbacks after the configured ones)."""

    def __init__(self, out_dir: str) -> None:
        """
        Args:
            out_dir: Directory of the ids files.
        """
        self.out_dir = out_dir

    def _append(self, name: str, trainer: pl.Trainer, row: dict) -> None:
        with open(os.path.join(self.out_dir, f"{name}_rank{trainer.global_rank}.jsonl"), "a") as file:
            file.write(json.dumps(row) + "\n")

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: Any, batch: list[dict], batch_idx: int) -> None:
        self._append("ids", trainer, {"generation_step": pl_module.generation_step,
                                      "ids": [sample["id"] for sample in batch]})

    def on_validation_batch_start(self, trainer: pl.Trainer, pl_module: Any, batch: list[dict], batch_idx: int,
                                  dataloader_idx: int = 0) -> None:
        self._append("val_ids", trainer, {"generation_step": pl_module.generation_step,
                                          "ids": [sample["id"] for sample in batch]})


def fit_workdir(root: Path, n_train: int) -> Path:
    """``root`` with the tiny model (``tiny/``) and ``n_train`` training samples (``geo/``: a step
    takes 2), the files ``fit_command`` points at."""
    from maye_pl.data import generate_geometry_dataset
    from maye_pl.models.tiny import ensure_tiny_model

    ensure_tiny_model(root / "tiny")
    generate_geometry_dataset(root / "geo", n_train=n_train, n_val=0, n_test=0)
    return root


def fit_command(tmp_path: Path, name: str, *extra: str) -> tuple[list[str], dict[str, str], Path]:
    """The `fit` arguments on ``tmp_path``'s tiny model and geometry set (from the subcommand on), its
    environment and its output directory ``tmp_path/name`` (created; prompt ids land there, metrics
    in runs/demo/name)."""
    out = tmp_path / name
    out.mkdir()
    args = [
        "fit", "--config", str(REPO / "configs/demo.yaml"),
        "--demo_assets", "false", "--model.model_path", str(tmp_path / "tiny"),
        "--data.train_path", str(tmp_path / "geo/train.jsonl"), "--data.val_path", "null", "--data.test_path", "null",
        "--model.validate_before_fit", "false", "--trainer.limit_val_batches", "0",
        "--data.batch_size", "2", "--model.sampling.n", "2", "--model.sampling.max_tokens", "12",
        "--model.ppo.batch_size", "2", "--model.ppo.gradient_accumulation_steps", "1", "--model.lr", "1e-3",
        "--trainer.max_epochs", "1",
        "--trainer.enable_model_summary", "false",
        "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"), "--trainer.logger.init_args.version", name,
        "--data.token_count_cache", str(tmp_path / "token_counts"),
        "--trainer.callbacks+=cli_runs.PromptIdsRecorder", "--trainer.callbacks.out_dir", str(out),
        *extra,
    ]
    return args, tests_on_path(), out


class RunningFit:
    """A `fit` started in the background in its own session; its output (stdout, where the engine
    logs, and stderr) goes to ``<out>/output.txt`` (node n > 0: ``output_node<n>.txt``)."""

    def __init__(self, command: tuple[list[str], dict[str, str], Path], cwd: Path, nodes: int = 1) -> None:
        """
        Args:
            command: ``(args, env, out)`` as ``fit_command`` returns them.
            cwd: Working directory of the run.
            nodes: processes to start, one per simulated node (the command passes
                ``--trainer.num_nodes`` itself).
        """
        args, env, self.out = command
        port = _free_port()
        self._paths = [self.out / ("output.txt" if node == 0 else f"output_node{node}.txt") for node in range(nodes)]
        self._outputs = [open(path, "w") for path in self._paths]
        self.processes = [
            subprocess.Popen([*MAYE_PL, *args], cwd=cwd, stdout=output, stderr=subprocess.STDOUT, start_new_session=True,
                             env={**env, **({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                                             "NODE_RANK": str(node)} if nodes > 1 else {})})
            for node, output in enumerate(self._outputs)
        ]
        self.process = self.processes[0]
        """Node 0's process (global rank 0)."""

    @property
    def output(self) -> str:
        """What the user sees on the terminal so far (stdout and stderr interleaved; every node's)."""
        return "".join(path.read_text() for path in self._paths)

    def engines(self) -> list[psutil.Process]:
        """The run's engine hosts (found by maye_pl's "vLLM engine on cpu ready in 3.1 s (pid N)" line,
        or the ``(maye_pl-vllm-engine pid=N)`` prefix of vLLM's own log lines) and whatever they
        started; call while the run is alive."""
        hosts = []
        found = re.findall(r"\(maye_pl-vllm-engine pid=(\d+)\)|ready in [\d.]+ s \(pid (\d+)\)", self.output)
        for pid in {int(prefix or ready) for prefix, ready in found}:
            try:
                hosts.append(psutil.Process(pid))
            except psutil.NoSuchProcess:
                pass
        return [*hosts, *(child for host in hosts for child in host.children(recursive=True))]

    def ranks(self) -> list[psutil.Process]:
        """The trainer processes: the launched one (rank 0) and the ranks Lightning started."""
        children = psutil.Process(self.process.pid).children()
        return [psutil.Process(self.process.pid), *(p for p in children if "--config" in p.cmdline())]

    def wait_for_step(self, step: int, timeout_s: float = 400) -> None:
        """Return once generation step ``step`` (1-based) has started on rank 0."""
        ids = self.out / "ids_rank0.jsonl"
        self._wait_until(lambda: ids.exists() and len(ids.read_text().splitlines()) >= step, f"step {step}", timeout_s)

    def wait_for_validation_batch(self, count: int, timeout_s: float = 400) -> None:
        """Return once the ``count``-th validation batch (1-based, over the whole run) has started on rank 0."""
        ids = self.out / "val_ids_rank0.jsonl"
        self._wait_until(lambda: ids.exists() and len(ids.read_text().splitlines()) >= count,
                         f"validation batch {count}", timeout_s)

    def wait_for_output(self, text: str, timeout_s: float = 400) -> None:
        """Return once the run has printed ``text``."""
        self._wait_until(lambda: text in self.output, repr(text), timeout_s)

    def _wait_until(self, happened: Any, what: str, timeout_s: float) -> None:
        """Poll ``happened()`` until it is true; fail if the run ends first. ``timeout_s`` only
        guards against a hang: what the tests time is measured from such an event."""
        deadline = time.monotonic() + timeout_s
        while not happened():
            assert self.process.poll() is None, f"the run ended before {what}:\n{self.output[-6000:]}"
            assert time.monotonic() < deadline, f"the run did not reach {what} in {timeout_s} s"
            time.sleep(0.05)

    def interrupt(self) -> None:
        """Ctrl-C as a terminal sends it: SIGINT to node 0's whole process group (its ranks and
        its engine processes)."""
        os.killpg(self.process.pid, signal.SIGINT)

    def wait(self, timeout_s: float) -> tuple[int | tuple[int, ...] | None, float]:
        """(exit status, or every node's when they differ, or None if one still runs after
        ``timeout_s``; seconds waited)."""
        start = time.monotonic()
        try:
            codes = [process.wait(timeout=max(start + timeout_s - time.monotonic(), 0)) for process in self.processes]
        except subprocess.TimeoutExpired:
            return None, time.monotonic() - start
        return (codes[0] if len(set(codes)) == 1 else tuple(codes)), time.monotonic() - start

    def kill(self) -> None:
        """SIGKILL whatever of the run's sessions is left (its ranks; engines die with their owner)."""
        for process in self.processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        for output in self._outputs:
            output.close()


def run_maye_pl(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """``python -m maye_pl *args`` in ``cwd`` (tests/ on its path) to its end; asserts it exited 0."""
    result = subprocess.run([*MAYE_PL, *args], cwd=cwd, env=tests_on_path(), capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, f"maye_pl {args[0]} failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    return result


def run_maye_pl_here(*args: str, cwd: Path) -> None:
    """``maye_pl *args`` through the CLI's entry point (``maye_pl.cli.main``) in this process, in
    ``cwd``: what `python -m maye_pl` runs after its imports, without a fresh interpreter's ~9 s of
    them (for a test marked ``vllm``, the engine host is conftest's warm one). Raises what ``main``
    raises (``SystemExit`` for a user error)."""
    from maye_pl.cli import main

    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(cwd)
        patch.setattr("sys.argv", ["maye_pl"])  # the command line is ``args`` alone
        main(list(args))


def engine_processes_started_in(cwd: Path) -> list[psutil.Process]:
    """Engine processes (hosts and vLLM's EngineCore) running under ``cwd``: a test's own runs, not
    the engines other programs on the machine may run at the same time."""
    from maye_pl.rollout.vllm_host import HOST_PROCESS_NAME

    found = []
    for process in psutil.process_iter(["name", "cmdline"]):
        if process.info["name"] == HOST_PROCESS_NAME or "EngineCore" in " ".join(process.info["cmdline"] or []):
            try:
                if Path(process.cwd()).is_relative_to(cwd):
                    found.append(process)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
    return found


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
