"""Optimization helpers shared by ReinforcePP and the SFT baseline: the LR schedule, the loss denominator.

Both modules step the optimizer themselves (manual optimization), so these are plain functions:
the schedule is a ``LambdaLR`` factor per optimizer step, the denominator is what makes a
data-parallel token mean equal the token mean of one big batch.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """LR factor at optimizer step ``step`` (0-based): linear warmup, then cosine decay to a floor.

    Steps ``0 .. warmup_steps-1`` ramp ``1/warmup_steps .. 1`` (never 0, so the first step moves
    the weights); then the factor falls along half a cosine from 1 at ``warmup_steps`` to
    ``min_lr_ratio`` at ``total_steps`` and stays there.

    Args:
        step: optimizer steps taken so far (``LambdaLR`` passes its ``last_epoch``).
        warmup_steps: length of the linear warmup; 0 = none.
        total_steps: optimizer steps in the whole run (warmup included).
        min_lr_ratio: the cosine floor as a fraction of the peak LR, in [0, 1].

    Returns:
        The factor the peak LR is multiplied by.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def tokens_per_rank(mask: Tensor, group: dist.ProcessGroup | None = None) -> float:
    """The denominator that turns per-rank token sums into one global token mean.

    DDP/FSDP average gradients over ranks, so dividing each rank's loss SUM by the mean token
    count per rank gives the gradient of the mean over ALL ranks' tokens; a per-rank token mean
    would weight each token by how few tokens its rank happened to get.

    Args:
        mask: (N, T) bool, True on the tokens the loss covers (this rank's batch).
        group: the data-parallel group; None = the default group when torch.distributed is
            initialised, else this process alone.

    Returns:
        Tokens summed over the group's ranks / its size, at least 1.0 (an all-padding batch).
    """
    tokens = mask.sum().to(torch.float64)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tokens, group=group)
        tokens /= dist.get_world_size(group)
    return max(float(tokens), 1.0)
