"""How a CPU run divides its cores between the trainer and the engine (maye_pl/rollout/cores.py)."""

from __future__ import annotations

import os
import threading

import pytest
import torch

from maye_pl.rollout.cores import CoreSplit, divide_cores, pin_process, rank_cores


@pytest.mark.parametrize(("available", "engine_cores", "max_staleness", "split"), [
    ({0, 1}, None, 0, None),  # synchronous: they take turns, both use every core
    ({0, 1}, None, 1, CoreSplit(trainer=(0,), engine=(1,))),  # pipelined: half each
    (set(range(8)), None, 1, CoreSplit(trainer=(0, 1, 2, 3), engine=(4, 5, 6, 7))),
    ({0, 1, 2}, None, 1, CoreSplit(trainer=(0, 1), engine=(2,))),  # the odd core to the trainer
    ({2, 5, 9, 11}, None, 1, CoreSplit(trainer=(2, 5), engine=(9, 11))),  # a taskset's cores, not 0..n-1
    (set(range(8)), 2, 0, CoreSplit(trainer=(0, 1, 2, 3, 4, 5), engine=(6, 7))),  # set by the user: in either mode
    (set(range(8)), 8, 0, None),  # no core left to the trainer: shared, and harmless while synchronous
])
def test_divide_cores(available, engine_cores, max_staleness, split):
    assert divide_cores(available, engine_cores, max_staleness) == (split, None)


def test_an_oversubscribing_setting_gets_one_warning_line():
    split, warning = divide_cores({0, 1, 2, 3}, 4, 1)
    assert split is None
    assert warning.startswith("`rollout.engine_cores`=4 leaves the trainer none of the 4 CPU cores") and "\n" not in warning
    assert "at most 3" in warning
    split, warning = divide_cores({0}, None, 1)  # one core: nothing to divide
    assert split is None and "on 1 CPU core" in warning and "\n" not in warning


@pytest.mark.parametrize(("cores", "world", "shares"), [
    ((0, 1, 2, 3), 2, [(0, 1), (2, 3)]),
    ((0, 1, 2, 3, 4), 2, [(0, 1, 2), (3, 4)]),
    ((0,), 2, [(0,), (0,)]),  # fewer cores than ranks: they share
])
def test_rank_cores_splits_the_trainer_cores_between_local_ranks(cores, world, shares):
    assert [rank_cores(cores, rank, world) for rank in range(world)] == shares


def test_pin_process_pins_every_thread_and_sizes_torch():
    """Pinning this process to one core moves its existing threads too; what pin_process returns
    puts the process back."""
    before, threads = os.sched_getaffinity(0), torch.get_num_threads()
    ready, stop = threading.Event(), threading.Event()
    affinity = {}

    def worker() -> None:
        ready.set()
        stop.wait()
        affinity["thread"] = os.sched_getaffinity(0)

    thread = threading.Thread(target=worker)
    thread.start()
    ready.wait()
    core = min(before)
    try:
        previous = pin_process((core,))
        assert os.sched_getaffinity(0) == {core} and torch.get_num_threads() == 1
    finally:
        stop.set()
        thread.join()
    assert affinity["thread"] == {core}  # a thread started before the pinning was pinned too
    pin_process(*previous)  # what the rollout callback does at shutdown
    assert os.sched_getaffinity(0) == before and torch.get_num_threads() == threads
