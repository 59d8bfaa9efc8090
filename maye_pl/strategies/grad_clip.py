"""Gradient-norm clipping that is correct for FSDP2 (DTensor) gradients and returns a loggable norm.

Under FSDP2 every rank holds a shard of each gradient. ``torch.nn.utils.get_total_norm`` over
DTensor gradients already reduces the local shard norms across the mesh (it returns a
``Replicate`` DTensor holding the norm of the FULL gradient), and Lightning's
``LightningModule.clip_gradients(..., gradient_clip_algorithm="norm")`` calls
``torch.nn.utils.clip_grad_norm_`` on the optimizer's parameters, so Lightning's path clips
correctly under ``FSDP2Strategy`` too (tests/strategies/test_fsdp2.py checks both against an
unsharded run). What Lightning's path does not give is the norm: it returns None. This function
returns it as a plain tensor, so the module can log ``policy/grad_norm``.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch.distributed.tensor import DTensor


def clip_grad_norm_(
    parameters: Iterable[torch.Tensor] | torch.Tensor,
    max_norm: float,
    norm_type: float = 2.0,
    error_if_nonfinite: bool = False,
) -> torch.Tensor:
    """Scale gradients in place so their total norm is at most ``max_norm``; return the pre-clip norm.

    The norm is taken over ALL shards of every gradient (the same number an unsharded run gets),
    and every rank computes the same clip coefficient. ``max_norm=float("inf")`` measures without
    clipping.

    Args:
        parameters: parameters (plain tensors or FSDP2 DTensors, all on one mesh) whose ``.grad``
            to clip; parameters without a gradient are skipped.
        max_norm: the largest allowed total norm.
        norm_type: the p of the p-norm (``float("inf")`` for the max norm).
        error_if_nonfinite: raise if the total norm is nan or inf.

    Returns:
        The total norm before clipping: a 0-dim plain tensor on the gradients' device, equal on
        every rank.
    """
    params = [parameters] if isinstance(parameters, torch.Tensor) else list(parameters)
    grads = [p.grad for p in params if p.grad is not None]
    total_norm = torch.nn.utils.get_total_norm(grads, norm_type, error_if_nonfinite)
    if isinstance(total_norm, DTensor):
        # Already all-reduced (Replicate): full_tensor is the local value, no extra communication.
        total_norm = total_norm.full_tensor()
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, total_norm)
    return total_norm
