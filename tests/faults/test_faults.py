"""The fault suite: real `python -m maye_pl fit` processes and real vLLM engines, killed mid-step.

Each test asserts what the user sees (the message it prints), that no engine process is left, that
the run ends within its bound (functional guarantees, not speed benchmarks: a wedged shutdown or
an orphaned rank would exceed them by far), and that the metrics file keeps the finished steps.

- Bad data (a non-UTF-8 line, a prompt longer than the engine's budget) stops `fit` before the
  engine starts, naming file:line, with exit status 2 and no traceback (through the CLI's entry
  point in the test's process: a fresh interpreter would add ~15 s of imports and prove nothing more).
- An engine process SIGKILLed mid-step, the second of two (`rollout.num_engines 2` on 2 ranks, so
  its owner is not rank 0): the run stops within 15 s saying that engine died and naming it
  (`engine 1 of 2 (node 0, rank 1)`), nothing left. (One engine's death in one process is the same
  path: tests/rollout/test_vllm_engine.py kills an engine mid-transfer.)
- Ctrl-C twice (SIGINT to the process group, as a terminal sends it) mid-step: the first one
  prints that the run will checkpoint (and reaches no engine process: they ignore SIGINT), the
  second stops it at once: exit status 1 within 15 s, Lightning's graceful shutdown message, no
  checkpoint. One Ctrl-C checkpoints like SIGTERM: tests/test_resume.py.
- One of two FSDP2 ranks SIGKILLed mid-step: rank 0, the one owning the engine, so this also covers
  a SIGKILLed trainer; the engine is gone within 10 s and the other rank within 30 s.
- SIGTERM mid-step and during validation, one Ctrl-C (checkpoint, exit 143 within 15 s of it,
  exact resume from `--ckpt_path last`) are tested in tests/test_resume.py, where the
  uninterrupted reference run already exists.

Every wait is on an event (a step started, a line printed, a process gone) with a generous hang
guard; each bound the tests assert is measured from the event it bounds, so a loaded machine
slows the runs without breaking the bounds.
"""

from __future__ import annotations

import json
import re
import signal
import sys
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest

from maye_pl.evaluation.metrics_file import read_metrics
from maye_pl.rollout.vllm_host import HOST_PROCESS_NAME

sys.path.insert(0, str(Path(__file__).parents[1]))
from cli_runs import RunningFit, fit_command, fit_workdir, run_maye_pl_here  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory with the tiny model (``tiny/``) and 16 training samples (``geo/``, 8 steps)."""
    return fit_workdir(tmp_path_factory.mktemp("faults"), n_train=16)


def _trained_steps(workdir: Path, name: str) -> list[int]:
    """Generation steps whose metrics row reached metrics.jsonl (a cut last line is ignored)."""
    return [int(row["generation_step"]) for row in read_metrics(str(workdir / "runs/demo" / name)) if "loss/total" in row]


def _stopped_before_the_engine(capfd: pytest.CaptureFixture, workdir: Path, name: str, *extra: str) -> str:
    """`fit` through the CLI's entry point in this process (what `python -m maye_pl` calls after its
    imports; the whole-process paths are the other tests'), from this directory's files: a user
    error, so its message on stderr, exit status 2, no traceback and no engine. Returns stderr."""
    args, _, _ = fit_command(workdir, name, *extra)
    with pytest.raises(SystemExit) as exited:
        run_maye_pl_here(*args, cwd=workdir)
    output = capfd.readouterr()
    assert exited.value.code == 2, output.err[-4000:]  # a user error: its message, no traceback
    assert "Traceback" not in output.out + output.err
    # Neither maye_pl's engine-ready line nor the engine's own log prefix: it never started.
    assert "vLLM engine on" not in output.out + output.err and "maye_pl-vllm-engine" not in output.out + output.err
    return output.err


def test_bad_data_stops_before_the_engine_starts(workdir, capfd):
    lines = (workdir / "geo/train.jsonl").read_bytes().splitlines(keepends=True)
    latin1 = workdir / "geo/train_latin1.jsonl"
    latin1.write_bytes(b"".join(lines[:2]) + lines[2].replace(b"\"question\": \"", b"\"question\": \"\xe9", 1)
                       + b"".join(lines[3:]))
    stderr = _stopped_before_the_engine(capfd, workdir, "latin1", "--data.train_path", str(latin1))
    assert f"DatasetError: 1 problem in the dataset files:\n  {latin1}:3: (encoding): not UTF-8 (byte 0xe9" in stderr

    record = json.loads(lines[1])
    record["question"] += " The figure is drawn to scale." * 200
    overlong = workdir / "geo/train_overlong.jsonl"
    overlong.write_bytes(lines[0] + json.dumps(record).encode() + b"\n" + b"".join(lines[2:]))
    stderr = _stopped_before_the_engine(capfd, workdir, "overlong", "--data.train_path", str(overlong))
    # The limit: rollout.max_model_len 1024 (demo.yaml) - model.sampling.max_tokens 12.
    found = re.search(rf"{re.escape(str(overlong))}:2: question: prompt is (\d+) tokens, the limit is 1012 ", stderr)
    assert found and int(found.group(1)) > 1012, stderr[-4000:]
    assert "set `data.drop_overlong: true`" in stderr


def _gone(processes: list[psutil.Process], timeout_s: float) -> bool:
    return psutil.wait_procs(processes, timeout=timeout_s)[1] == []


def _disturbed_mid_step(workdir: Path, name: str, disturb: Callable[[RunningFit, list[psutil.Process]], None],
                        timeout_s: float, *extra: str) -> tuple[RunningFit, int | None, list[psutil.Process]]:
    """Start a run (``extra``: more flags), ``disturb(run, its engine processes)`` as its step 2
    starts, then wait up to ``timeout_s`` (from the end of ``disturb``) for it to end. Returns the
    run, its exit status (None: still running) and engines."""
    run = RunningFit(fit_command(workdir, name, *extra), cwd=workdir)
    try:
        run.wait_for_step(2)
        engines = run.engines()
        disturb(run, engines)
        code, _ = run.wait(timeout_s)
    finally:
        run.kill()
    return run, code, engines


@pytest.mark.vllm
def test_one_of_two_engines_killed_mid_step_stops_the_run_naming_it(workdir):
    """2 ranks, one engine each (`rollout.num_engines 2`): rank 1's engine is SIGKILLed as step 2
    starts. Rank 1 stops with the error naming that engine, rank 0 follows (its collectives with
    rank 1 fail, or Lightning's launcher takes it down), engine 0 with it: within 15 s, nothing left."""
    started_on_rank_1 = []

    def kill_engine_1(run: RunningFit, engines: list[psutil.Process]) -> None:
        _, rank1 = run.ranks()
        [host] = [p for p in rank1.children() if p.name() == HOST_PROCESS_NAME]
        host.kill()
        started_on_rank_1.append(len((run.out / "ids_rank1.jsonl").read_text().splitlines()))

    run, code, engines = _disturbed_mid_step(
        workdir, "engine_1_killed", kill_engine_1, 15, "--trainer.devices", "2", "--trainer.strategy", "fsdp2",
        "--rollout.num_engines", "2", "--data.batch_size", "1", "--model.ppo.batch_size", "1",
    )
    assert code not in (None, 0), f"the run did not stop within 15 s of engine 1's death:\n{run.output[-4000:]}"
    assert re.search(r"vLLM engine process died during [\w ]+ \(exit code -9\): engine 1 of 2 \(node 0, rank 1\)",
                     run.output), run.output[-4000:]
    assert len(engines) >= 2 and _gone(engines, timeout_s=5)
    # No step trained after the one that needed the dead engine: step 2 as a rule; one step later
    # when a loaded machine let rank 1 finish step 2's generation before this test killed the engine.
    trained = _trained_steps(workdir, "engine_1_killed")
    assert trained == list(range(1, len(trained) + 1)) and 1 <= len(trained) <= started_on_rank_1[0], (
        trained, started_on_rank_1)


@pytest.mark.vllm
def test_ctrl_c_twice_stops_at_once(workdir):
    def ctrl_c_twice(run: RunningFit, engines: list[psutil.Process]) -> None:
        run.interrupt()  # SIGINT to the process group, as the terminal sends it
        run.wait_for_output("Ctrl-C again stops at once")  # the first one only asks for a checkpoint
        run.interrupt()

    run, code, engines = _disturbed_mid_step(workdir, "ctrl_c", ctrl_c_twice, timeout_s=15)
    assert code == 1, f"exit status {code} (None: still running 15 s after the second Ctrl-C):\n{run.output[-4000:]}"
    assert "Detected KeyboardInterrupt, attempting graceful shutdown" in run.output
    assert "Preempted by" not in run.output  # no checkpoint
    assert engines and _gone(engines, timeout_s=1)
    assert _trained_steps(workdir, "ctrl_c") == [1]


@pytest.mark.vllm
def test_a_killed_rank_takes_the_engine_and_the_other_rank_down(workdir):
    run = RunningFit(fit_command(workdir, "rank_killed", "--trainer.devices", "2", "--trainer.strategy", "fsdp2",
                                 "--data.batch_size", "1", "--model.ppo.batch_size", "1"), cwd=workdir)
    try:
        run.wait_for_step(2)
        engines = run.engines()
        rank0, rank1 = run.ranks()
        rank0.kill()  # the rank that owns the engine: a SIGKILLed trainer runs no cleanup at all
        engines_gone = _gone(engines, timeout_s=10)
        rank1_gone = _gone([rank1], timeout_s=30)
    finally:
        run.kill()
    assert engines and engines_gone, "the engine outlived its SIGKILLed trainer by 10 s"
    assert rank1_gone, f"rank 1 outlived rank 0 by 30 s:\n{run.output[-4000:]}"
    assert _trained_steps(workdir, "rank_killed") == [1]
