"""k1, k2, k3 on hand-computed log-probs, k3's clamps (value and overflow guard with finite
gradients), and kl_estimate's dispatch and error."""

import math

import pytest
import torch

from maye_pl.rl.kl import kl_estimate, kl_k1, kl_k2, kl_k3

LP = torch.tensor([[-1.0, -2.0]])
REF = torch.tensor([[-1.5, -0.5]])


def test_estimators_hand_computed():
    # k1 = lp - ref = [-1 + 1.5, -2 + 0.5] = [0.5, -1.5]
    torch.testing.assert_close(kl_k1(LP, REF), torch.tensor([[0.5, -1.5]]))
    # k2 = 0.5 * [0.25, 2.25] = [0.125, 1.125]
    torch.testing.assert_close(kl_k2(LP, REF), torch.tensor([[0.125, 1.125]]))
    # k3 with d = ref - lp = [-0.5, 1.5]: e^-0.5 + 0.5 - 1 = 0.106531, e^1.5 - 1.5 - 1 = 1.981689
    expected = [math.exp(-0.5) + 0.5 - 1, math.exp(1.5) - 2.5]
    torch.testing.assert_close(kl_k3(LP, REF), torch.tensor([expected]))


def test_k3_clamps_and_keeps_gradient_finite():
    lp = torch.tensor([[0.0, -3.0, -100.0, 0.0]], requires_grad=True)
    ref = torch.tensor([[-20.0, 0.0, 0.0, 0.0]])
    k3 = kl_k3(lp, ref)
    # d = -20 -> clamped to -10: e^-10 + 10 - 1 = 9.0000454
    # d = 3: e^3 - 4 = 16.09 -> value clamp 10;  d = 100: clamped to 10, value 10;  d = 0: 0
    torch.testing.assert_close(k3, torch.tensor([[9.0000454, 10.0, 10.0, 0.0]]))
    k3.sum().backward()
    assert torch.isfinite(lp.grad).all()
    # Clamped entries carry no gradient; d = 0 is k3's minimum (gradient e^0 - 1 = 0).
    assert lp.grad.tolist() == [[0.0, 0.0, 0.0, 0.0]]


def test_kl_estimate_dispatch_and_unknown_name():
    for name, fn in (("k1", kl_k1), ("k2", kl_k2), ("k3", kl_k3)):
        torch.testing.assert_close(kl_estimate(name, LP, REF), fn(LP, REF))
    with pytest.raises(ValueError, match=r"name='k4'.*\['k1', 'k2', 'k3'\]"):
        kl_estimate("k4", LP, REF)
