"""The shared LR schedule and loss denominator (maye_pl/optim.py), against hand-computed values.

Proves: warmup ramps 1/w .. 1, the cosine passes its midpoint halfway and ends at the floor, and
stays there past the end; tokens_per_rank is the local count in one process and the mean count
per rank over two gloo ranks, so sum/denominator averaged over ranks is the global token mean.
"""

from __future__ import annotations

import math
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from maye_pl.optim import OptimArgs, build_adamw, tokens_per_rank, warmup_cosine, warmup_length


def test_warmup_then_cosine_to_the_floor():
    # warmup 4, total 14: steps 0-3 ramp 1/4 .. 4/4; cosine over the 10 steps after.
    factors = [warmup_cosine(step, 4, 14, 0.1) for step in range(16)]
    assert factors[:5] == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0])
    assert factors[9] == pytest.approx(0.1 + 0.9 * 0.5)  # halfway: cos(pi/2) = 0 -> midpoint 0.55
    assert factors[14] == pytest.approx(0.1) and factors[15] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(factors[3:], factors[4:]))  # never rises after warmup
    assert warmup_cosine(0, 0, 10, 0.0) == 1.0  # no warmup: the first step at the peak


def test_warmup_ratio_counts_steps_as_maye_and_adamw_takes_every_setting():
    # MAYE warms up while step < 0.1 * total: 320 steps of 3200 (not 321 from 0.1 * 3200's
    # rounding), and ceil(2.5) = 3 steps of 25 (steps 0, 1, 2 < 2.5).
    assert warmup_length(None, 0.1, 3200) == 320 and warmup_length(None, 0.1, 25) == 3
    assert warmup_length(7, None, 3200) == 7 and warmup_length(None, None, 3200) == 0
    optim = OptimArgs(weight_decay=0.01, betas=(0.9, 0.95), eps=1e-5, warmup_ratio=0.1)
    optimizer, scheduler = build_adamw([torch.nn.Parameter(torch.zeros(2))], 5e-6, optim, total_steps=40)
    group = optimizer.param_groups[0]
    assert (group["betas"], group["eps"], group["weight_decay"]) == ((0.9, 0.95), 1e-5, 0.01)
    lrs = []
    for _ in range(6):
        lrs.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    # 4 warmup steps of 40: 1/4 .. 4/4 of 5e-6, then the cosine starts at the peak.
    assert lrs == pytest.approx([1.25e-6, 2.5e-6, 3.75e-6, 5e-6, 5e-6, 5e-6 * 0.5 * (1 + math.cos(math.pi / 36))])


def test_tokens_per_rank_in_one_process_is_the_local_count():
    mask = torch.tensor([[True, True, False], [True, False, False]])
    assert tokens_per_rank(mask) == 3.0
    assert tokens_per_rank(torch.zeros(2, 3, dtype=torch.bool)) == 1.0  # never divides by zero


def _worker(rank: int, port: int, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        # Rank 0 holds 3 loss tokens, rank 1 holds 1: (3 + 1) / 2 ranks = 2 per rank.
        mask = torch.tensor([[True, True, True]]) if rank == 0 else torch.tensor([[True, False, False]])
        torch.save(tokens_per_rank(mask), f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_tokens_per_rank_over_two_ranks_is_the_mean_count(tmp_path):
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    assert [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)] == [2.0, 2.0]
