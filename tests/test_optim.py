"""The shared LR schedule and loss denominator (maye_pl/optim.py), against hand-computed values.

Proves: warmup ramps 1/w .. 1, the cosine passes its midpoint halfway and ends at the floor, and
stays there past the end; tokens_per_rank is the local count in one process and the mean count
per rank over two gloo ranks, so sum/denominator averaged over ranks is the global token mean.
"""

from __future__ import annotations

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from maye_pl.optim import tokens_per_rank, warmup_cosine


def test_warmup_then_cosine_to_the_floor():
    # warmup 4, total 14: steps 0-3 ramp 1/4 .. 4/4; cosine over the 10 steps after.
    factors = [warmup_cosine(step, 4, 14, 0.1) for step in range(16)]
    assert factors[:5] == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0])
    assert factors[9] == pytest.approx(0.1 + 0.9 * 0.5)  # halfway: cos(pi/2) = 0 -> midpoint 0.55
    assert factors[14] == pytest.approx(0.1) and factors[15] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(factors[3:], factors[4:]))  # never rises after warmup
    assert warmup_cosine(0, 0, 10, 0.0) == 1.0  # no warmup: the first step at the peak


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
