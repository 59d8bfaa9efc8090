"""Optimization helpers shared by ReinforcePP and the SFT baseline: AdamW + LR schedule, the loss denominator.

Both modules step the optimizer themselves (manual optimization), so these are plain functions:
``build_adamw`` makes the AdamW optimizer and its warmup + cosine ``LambdaLR`` from the modules'
``model.lr`` and ``model.optim`` group (``OptimArgs``, which checks itself), the schedule is a
``LambdaLR`` factor per optimizer step, the denominator is what makes a data-parallel token mean
equal the token mean of one big batch.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from functools import partial

import torch
import torch.distributed as dist
from torch import Tensor


@dataclass(frozen=True)
class OptimArgs:
    """AdamW and its LR schedule, the ``model.optim`` group of ReinforcePP and SFT (the peak LR
    is ``model.lr``, a top-level argument: it is the knob a sweep turns)."""

    weight_decay: float = 0.0
    """AdamW weight decay (MAYE: 0.01)."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas (MAYE: 0.9, 0.95)."""
    eps: float = 1e-8
    """AdamW epsilon (MAYE: 1e-5, as large as a 7B model's clipped per-weight gradients)."""
    warmup_steps: int | None = None
    """Linear warmup in optimizer steps, then cosine decay; None = no warmup."""
    warmup_ratio: float | None = None
    """Warmup as a fraction of all optimizer steps (MAYE: 0.1); excludes ``warmup_steps``."""
    min_lr_ratio: float = 0.0
    """Cosine floor as a fraction of ``model.lr``."""
    max_grad_norm: float | None = 1.0
    """Clip the total gradient norm (over all shards) to this; None = no clipping."""

    def problems(self, key: str = "model.optim") -> list[str]:
        """Every problem of these settings, each naming its ``<key>.<field>``, the rule and the fix."""
        problems = []
        if self.weight_decay < 0:
            problems.append(f"`{key}.weight_decay`={self.weight_decay} must be >= 0.")
        if len(self.betas) != 2 or not all(0 <= beta < 1 for beta in self.betas):
            problems.append(f"`{key}.betas`={list(self.betas)} must be two numbers in [0, 1).")
        if not self.eps > 0:
            problems.append(f"`{key}.eps`={self.eps} must be positive (AdamW divides by sqrt(v) + eps).")
        if self.warmup_steps is not None and self.warmup_ratio is not None:
            problems.append(
                f"`{key}.warmup_steps`={self.warmup_steps} and `{key}.warmup_ratio`={self.warmup_ratio} are both "
                f"set; they say the same thing two ways: set one and the other to null (e.g. `--{key}.warmup_ratio null`)."
            )
        if self.warmup_steps is not None and self.warmup_steps < 0:
            problems.append(f"`{key}.warmup_steps`={self.warmup_steps} must be >= 0; use null for no warmup.")
        if self.warmup_ratio is not None and not 0 <= self.warmup_ratio < 1:
            problems.append(f"`{key}.warmup_ratio`={self.warmup_ratio} must lie in [0, 1) (a fraction of all optimizer steps).")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            problems.append(f"`{key}.min_lr_ratio`={self.min_lr_ratio} must lie in [0, 1].")
        if self.max_grad_norm is not None and self.max_grad_norm <= 0:
            problems.append(f"`{key}.max_grad_norm`={self.max_grad_norm} must be positive; use null for no clipping.")
        return problems


def warmup_length(warmup_steps: int | None, warmup_ratio: float | None, total_steps: int) -> int:
    """Warmup in optimizer steps: ``warmup_steps``, or ``warmup_ratio`` of ``total_steps`` rounded up.

    Rounded up as MAYE counts it (its schedule warms up while ``step < 0.1 * total``); the product
    is rounded to 9 decimals first so that 0.1 * 3200 is 320 steps, not 321.
    """
    if warmup_ratio is not None:
        return math.ceil(round(warmup_ratio * total_steps, 9))
    return warmup_steps or 0


def build_adamw(
    parameters: Iterable[torch.nn.Parameter], lr: float, optim: OptimArgs, total_steps: int
) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over ``parameters`` and its per-optimizer-step warmup + cosine schedule.

    Args:
        parameters: the trainable parameters.
        lr: the peak learning rate.
        optim: the rest of the optimizer's settings.
        total_steps: optimizer steps in the whole run (the cosine ends there; the warmup ratio's base).
    """
    optimizer = torch.optim.AdamW(
        parameters, lr=lr, betas=tuple(optim.betas), eps=optim.eps, weight_decay=optim.weight_decay
    )
    total_steps = max(1, total_steps)
    warmup = warmup_length(optim.warmup_steps, optim.warmup_ratio, total_steps)
    schedule = partial(warmup_cosine, warmup_steps=warmup, total_steps=total_steps, min_lr_ratio=optim.min_lr_ratio)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


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
