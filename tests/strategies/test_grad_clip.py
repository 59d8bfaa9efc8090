"""clip_grad_norm_ returns the pre-clip norm and clips like torch (sharded runs: test_fsdp2.py)."""

from __future__ import annotations

import torch

from maye_pl.strategies import clip_grad_norm_


def _params(*grads: list[float]) -> list[torch.nn.Parameter]:
    params = []
    for grad in grads:
        p = torch.nn.Parameter(torch.zeros(len(grad)))
        p.grad = torch.tensor(grad)
        params.append(p)
    return params


def test_returns_the_pre_clip_norm_and_scales_to_max_norm() -> None:
    params = _params([3.0], [4.0])  # total norm sqrt(9 + 16) = 5
    norm = clip_grad_norm_(params, max_norm=1.0)
    assert norm.item() == 5.0
    # coefficient 1 / (5 + 1e-6): grads become ~(0.6, 0.8)
    torch.testing.assert_close(torch.cat([p.grad for p in params]), torch.tensor([0.6, 0.8]))


def test_matches_torch_and_skips_parameters_without_grad() -> None:
    params = _params([1.0, -2.0], [2.0])
    params.append(torch.nn.Parameter(torch.ones(3)))  # no grad
    twin = _params([1.0, -2.0], [2.0])
    norm = clip_grad_norm_(params, max_norm=0.3)
    expected = torch.nn.utils.clip_grad_norm_(twin, max_norm=0.3)
    assert norm.item() == expected.item() == 3.0  # sqrt(1 + 4 + 4)
    for p, q in zip(params[:2], twin):
        assert torch.equal(p.grad, q.grad)


def test_infinite_max_norm_only_measures() -> None:
    params = _params([3.0, 4.0])
    assert clip_grad_norm_(params, max_norm=float("inf")).item() == 5.0
    assert torch.equal(params[0].grad, torch.tensor([3.0, 4.0]))
