"""CPU cores for the trainer and a CPU engine: disjoint when both compute at once.

On a CPU the trainer (torch's intra-op thread pool) and a vLLM engine (its OpenMP pool, in the
engine host process) each start a thread per core they may use. With synchronous rollouts
(``rollout.max_staleness`` 0, MAYE's loop) they take turns, so each may use every core. With
pipelined rollouts (>= 1) the engine generates while the trainer updates: two pools of n busy
threads on n cores thrash (OpenMP threads spin while they wait for each other's share of a
parallel region): at the TRL-matched settings of ``scripts/bench_step.py`` a pipelined step took
3.5 s against 0.42 s synchronous on 2 cores. So when the engine runs on the trainer's CPU, the
cores are divided:

- ``rollout.engine_cores`` None (auto): pipelined, the engine gets half the cores the trainer
  process may use (``os.sched_getaffinity``; at least one each), the trainer the rest;
  synchronous, nothing is divided (today's behaviour: both use every core).
- ``rollout.engine_cores`` k: the engine gets k cores, the trainer the rest, in either mode.
  k at or above the cores available leaves the trainer none of its own: both then use every core,
  and with pipelining that oversubscribes them, which one warning line says.

Each side is pinned to its cores (every thread's affinity) and sizes its thread pool to them
(``torch.set_num_threads``); the engine host does so before vLLM builds its worker, the trainer
at the rollout callback's setup. A node's local trainer ranks split the trainer's cores.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CoreSplit:
    """Which cores each side runs on (sorted core ids, disjoint)."""

    trainer: tuple[int, ...]
    engine: tuple[int, ...]


def divide_cores(available: set[int], engine_cores: int | None, max_staleness: int) -> tuple[CoreSplit | None, str | None]:
    """The trainer's and the engine's cores, or None to let both use every core; and a warning
    (one line) when the result oversubscribes the cores, else None.

    Args:
        available: The cores the trainer process may run on (``os.sched_getaffinity(0)``).
        engine_cores: ``rollout.engine_cores``: None (auto) or the engine's core count (>= 1).
        max_staleness: ``rollout.max_staleness``: 0 synchronous, >= 1 pipelined.
    """
    cores = sorted(available)
    pipelined = max_staleness >= 1
    if engine_cores is None:
        if not pipelined:
            return None, None
        engine_cores = len(cores) // 2
        if engine_cores == 0:
            return None, (
                f"rollout.max_staleness={max_staleness} on 1 CPU core: the engine and the trainer share it, so "
                "generation cannot overlap the update; run synchronously (max_staleness 0) or give the run more cores."
            )
    if engine_cores >= len(cores):
        warning = (
            f"`rollout.engine_cores`={engine_cores} leaves the trainer none of the {len(cores)} CPU cores this run may "
            f"use: both use all {len(cores)}, and with `rollout.max_staleness`={max_staleness} they run at once and "
            f"slow each other down; set `rollout.engine_cores` to at most {len(cores) - 1} (or leave it unset: half)."
        ) if pipelined else None
        return None, warning
    # The engine takes the highest-numbered cores, the trainer the rest (rank 0's first).
    return CoreSplit(trainer=tuple(cores[:-engine_cores]), engine=tuple(cores[-engine_cores:])), None


def rank_cores(trainer_cores: tuple[int, ...], local_rank: int, local_world_size: int) -> tuple[int, ...]:
    """This local rank's share of the trainer's cores: contiguous slices, as even as they come;
    every rank gets them all when there are fewer cores than ranks."""
    if len(trainer_cores) < local_world_size:
        return trainer_cores
    per_rank, extra = divmod(len(trainer_cores), local_world_size)
    start = local_rank * per_rank + min(local_rank, extra)
    return trainer_cores[start : start + per_rank + (local_rank < extra)]


def pin_process(cores: tuple[int, ...], threads: int | None = None) -> tuple[tuple[int, ...], int]:
    """Run every thread of this process on ``cores`` (threads started later inherit it) and size
    torch's thread pool (and the OpenMP pool behind it) to ``threads`` (default: one per core).
    Returns what it replaces, ``(cores, threads)``, for ``pin_process(*previous)`` to restore."""
    previous = tuple(sorted(os.sched_getaffinity(0))), torch.get_num_threads()
    for task in Path("/proc/self/task").iterdir():
        try:
            os.sched_setaffinity(int(task.name), cores)
        except ProcessLookupError:  # the thread ended meanwhile
            pass
    torch.set_num_threads(threads or len(cores))
    return previous


def place_trainer_beside_cpu_engine(engine_cores: int | None, max_staleness: int, local_rank: int,
                                    local_world_size: int) -> tuple[tuple[int, ...] | None, tuple | None]:
    """Divide this process's cores between the trainer and a CPU engine (``divide_cores``) and pin
    this rank to its share of the trainer's. Returns the engine's cores and this process's
    previous placement (for ``pin_process(*previous)`` once the engine is gone), both None when
    nothing is divided (the engine uses every core). Local rank 0 logs the one warning line, if
    any; every local rank calls this before the engine starts (the engine host pins itself).
    """
    split, warning = divide_cores(os.sched_getaffinity(0), engine_cores, max_staleness)
    if warning and local_rank == 0:
        logger.warning(warning)
    if split is None:
        return None, None
    previous = pin_process(rank_cores(split.trainer, local_rank, local_world_size))
    logger.debug("trainer rank %d on cores %s, engine on %s", local_rank, split.trainer, split.engine)
    return split.engine, previous
