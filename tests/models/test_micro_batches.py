"""Token-budget micro-batches on hand-made lengths: the next-fit by length, the cost of each layout,
the minimum count (gradient accumulation), lone over-long rows, and the count shared by two gloo
ranks (FSDP2 needs every rank to run as many forward passes)."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from maye_pl.models.micro_batches import Lengths, micro_batch_cost, token_budget_micro_batches

# Four rows: prompts of 10 tokens, responses of 50, 5, 40 and 8 (sizes 60, 15, 50, 18).
LENGTHS = Lengths(torch.tensor([10, 10, 10, 10]), torch.tensor([50, 5, 40, 8]), torch.tensor([0, 0, 1, 1]))


def _rows(batches):
    return [b.tolist() for b in batches]


def test_layout_costs():
    # padded: 2 rows x (max p 10 + max t 50); packed: (10+50) + (10+5); responses: 2 rows x 50.
    assert micro_batch_cost(LENGTHS, [0, 1], "padded") == 120
    assert micro_batch_cost(LENGTHS, [0, 1], "packed") == 75
    assert micro_batch_cost(LENGTHS, [0, 1], "responses") == 100


def test_next_fit_groups_rows_by_length():
    # Longest first: 0 (60), 2 (50), 3 (18), 1 (15). [0, 2] costs 2 x 60 = 120 <= 120; adding 3
    # would cost 3 x 60 = 180, so 3 opens the next micro-batch, and [3, 1] costs 2 x 18 = 36.
    assert _rows(token_budget_micro_batches(LENGTHS, 120)) == [[0, 2], [3, 1]]
    # Packed: 60 + 50 = 110 <= 120, + 18 = 128 > 120; then 18 + 15 = 33.
    assert _rows(token_budget_micro_batches(LENGTHS, 120, layout="packed")) == [[0, 2], [3, 1]]
    # Responses only (the prompts ran before): 4 rows x 50 = 200 <= 200.
    assert _rows(token_budget_micro_batches(LENGTHS, 200, layout="responses")) == [[0, 2, 3, 1]]


def test_min_count_splits_the_costliest_where_it_saves_most():
    # Three micro-batches asked for: [0, 2] (cost 120) is split, not [3, 1] (cost 36).
    assert _rows(token_budget_micro_batches(LENGTHS, 120, min_count=3)) == [[3, 1], [0], [2]]
    # Two from one (sorted 0, 2, 3, 1): [0] + [2, 3, 1] costs 60 + 3 x 50 = 210, [0, 2] + [3, 1]
    # 120 + 2 x 18 = 156, [0, 2, 3] + [1] 180 + 15 = 195: the cut after the second row.
    assert _rows(token_budget_micro_batches(LENGTHS, 1000, min_count=2)) == [[0, 2], [3, 1]]
    # One long row among short ones: [100] + [5, 5, 5] (110 + 3 x 15 = 155) beats [100, 5] + [5, 5] (220 + 30).
    skewed = Lengths(torch.full((4,), 10), torch.tensor([100, 5, 5, 5]), torch.arange(4))
    assert _rows(token_budget_micro_batches(skewed, 1000, min_count=2)) == [[0], [1, 2, 3]]


def test_long_rows_run_alone():
    # A budget below row 0's 60 tokens: it still runs, alone; the rest fit as before.
    assert _rows(token_budget_micro_batches(LENGTHS, 55)) == [[0], [2], [3, 1]]


def test_too_few_rows_for_the_count():
    with pytest.raises(ValueError, match="5 micro-batches .* but this rank has 4 rows"):
        token_budget_micro_batches(LENGTHS, 1000, min_count=5)
    # ghosts: empty micro-batches fill the count (the caller repeats a row there).
    assert _rows(token_budget_micro_batches(LENGTHS, 1000, min_count=5, ghosts=True))[-1] == []


def _worker(rank: int, port: int, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        # Rank 0's rows fit in one micro-batch of 1000 tokens, rank 1's long rows need three.
        responses = torch.tensor([5, 6, 7, 8]) if rank == 0 else torch.tensor([900, 800, 300, 10])
        lengths = Lengths(torch.full((4,), 10), responses, torch.arange(4))
        batches = token_budget_micro_batches(lengths, 1000, process_group=dist.group.WORLD)
        torch.save(_rows(batches), f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_ranks_run_the_same_number_of_micro_batches(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(port, str(tmp_path)), nprocs=2, join=True)
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    assert rank1 == [[0], [1], [2, 3]]  # 2 x 910 > 1000, 2 x 810 > 1000, 2 x 310 <= 1000
    # Rank 0 splits its one micro-batch (cost 4 x 18) until it also runs three.
    assert len(rank0) == 3 and sorted(sum(rank0, [])) == [0, 1, 2, 3]
