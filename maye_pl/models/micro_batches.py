"""Which rows run together in one forward pass: length-grouped micro-batches within a token budget.

Notation: n rows, p_i / t_i the prompt / response tokens of row i (padding excluded).

``max_tokens_per_micro_batch`` N_tok sorts the rows by length and fills each micro-batch until the
next row would push the tokens its forward pass processes, padding included, past N_tok:

    padded rows        rows x (max p + max t)        left-padded prompt, right-padded response
    packed rows        sum (p_i + t_i)               flash-attention: one sequence, no padding
    response rows      rows x max t                  ``dedup_group_prompts``: the prompts ran before
    prompt rows        prompts x max p               ``dedup_group_prompts``: one row per prompt

A row longer than the budget runs alone (a row cannot be split).

Under FSDP2 every rank must run the same number of forward passes (each one all-gathers the
weights), so the count is the maximum over the ranks, and a rank with fewer splits its costliest
micro-batch; where nothing is left to split it runs an empty one (``ghosts``: the caller repeats a
row and discards the result). Which micro-batch a row lands in never changes a result: each row's
log-probs depend only on the row, and the loss normaliser is the minibatch's
(``optim.tokens_per_rank``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist
from torch import Tensor

Layout = Literal["padded", "packed", "responses"]


@dataclass(frozen=True)
class Lengths:
    """Per-row token counts of a set of rows, and which rows share a prompt."""

    prompt: Tensor
    """(n,) long: prompt tokens p_i (image tokens included)."""
    response: Tensor
    """(n,) long: response tokens t_i."""
    prompt_index: Tensor
    """(n,) long: rows with equal values continue the same prompt."""


def micro_batch_cost(lengths: Lengths, rows: list[int], layout: Layout) -> int:
    """Tokens one forward pass over ``rows`` processes, padding included (the module docstring's table)."""
    p, t = lengths.prompt[rows], lengths.response[rows]
    if layout == "packed":
        return int((p + t).sum())
    if layout == "responses":
        return len(rows) * int(t.max())
    return len(rows) * int(p.max() + t.max())


def sync_count(count: int, process_group) -> int:
    """The largest ``count`` over the ranks of ``process_group`` (``count`` itself in one process)."""
    if process_group is None:
        return count
    value = torch.tensor([count], dtype=torch.long)
    if dist.get_backend(process_group) == "nccl":
        value = value.cuda()
    dist.all_reduce(value, op=dist.ReduceOp.MAX, group=process_group)
    return int(value.item())


def token_budget_micro_batches(
    lengths: Lengths,
    max_tokens: int,
    *,
    layout: Layout = "padded",
    min_count: int = 1,
    process_group=None,
    ghosts: bool = False,
) -> list[Tensor]:
    """Rows grouped by length into micro-batches of at most ``max_tokens`` tokens each.

    Args:
        lengths: the rows' token counts (``Lengths``).
        max_tokens: the budget N_tok (tokens one forward pass may process, padding included).
        layout: how a pass lays its rows out, which sets its cost (the module docstring's table).
        min_count: at least this many micro-batches (``gradient_accumulation_steps``).
        process_group: ranks that must run equally many forward passes (FSDP2); None: this process.
        ghosts: where this rank has too few rows for the ranks' count, return empty micro-batches
            to fill it (else raise).

    Returns:
        row-index tensors, one per micro-batch, longest rows first; together every row once.
    """
    def cost(rows: list[int]) -> int:
        return micro_batch_cost(lengths, rows, layout)

    # Step 1 - longest rows first, next-fit into the budget: similar lengths share a micro-batch.
    size = lengths.response if layout == "responses" else lengths.prompt + lengths.response
    order = size.argsort(descending=True, stable=True).tolist()
    batches: list[list[int]] = []
    for row in order:
        if batches and cost(batches[-1] + [row]) <= max_tokens:
            batches[-1].append(row)
        else:
            batches.append([row])
    # Step 2 - the count every rank runs: split the costliest micro-batch until this rank has it,
    # where the two parts cost least (its rows are sorted: e.g. one long row apart from short ones).
    count = sync_count(max(len(batches), min_count), process_group)
    while len(batches) < count and any(len(b) > 1 for b in batches):
        costliest = max((b for b in batches if len(b) > 1), key=cost)
        cut = min(range(1, len(costliest)), key=lambda i: cost(costliest[:i]) + cost(costliest[i:]))
        batches.remove(costliest)
        batches += [costliest[:cut], costliest[cut:]]
    if len(batches) < count and not ghosts:
        raise ValueError(
            f"token_budget_micro_batches: {count} micro-batches (the most any rank needs) but this rank has "
            f"{len(order)} rows; every rank must hold at least as many rows as micro-batches."
        )
    batches += [[] for _ in range(count - len(batches))]
    return [torch.tensor(rows, dtype=torch.long) for rows in batches]
