"""The off-policy correction on hand-computed numbers: truncated importance weights
w = min(pi_old / pi_behav, C) with their stats, and ppo_clip_loss weighting only the
policy-gradient term by them (the k3 KL term stays unweighted)."""

import math

import pytest
import torch

from maye_pl.rl.loss import ppo_clip_loss
from maye_pl.rl.off_policy import truncated_importance_weights

# Row 0: old - behav = [ln 3, ln 0.5, (pad)]; row 1: [0, ln 1.5, ln 2.5].
OLD = torch.tensor([[math.log(3.0), math.log(0.5), 9.0], [0.0, math.log(1.5), math.log(2.5)]])
BEHAV = torch.zeros(2, 3)
MASK = torch.tensor([[True, True, False], [True, True, True]])


def test_weights_are_the_ratio_truncated_at_the_cap():
    weights, stats = truncated_importance_weights(OLD, BEHAV, MASK, cap=2.0)
    # ratios [3, 0.5, -] and [1, 1.5, 2.5]; capped at 2: [2, 0.5, 0] and [1, 1.5, 2]
    assert torch.allclose(weights, torch.tensor([[2.0, 0.5, 0.0], [1.0, 1.5, 2.0]]), atol=1e-6)
    # mean of the UNtruncated ratios over the 5 valid tokens: (3 + 0.5 + 1 + 1.5 + 2.5) / 5 = 1.7
    assert stats.ratio_mean.item() == pytest.approx(1.7, abs=1e-6)
    assert stats.ratio_max.item() == pytest.approx(3.0, abs=1e-6)  # the pad's e^9 is ignored
    assert stats.clip_fraction.item() == pytest.approx(2 / 5)  # 3 and 2.5 exceed 2
    assert not weights.requires_grad


def test_weights_carry_no_gradient_and_reject_a_bad_cap():
    old = OLD.clone().requires_grad_(True)
    weights, _ = truncated_importance_weights(old, BEHAV, MASK, cap=2.0)
    assert not weights.requires_grad
    with pytest.raises(ValueError, match="cap=0"):
        truncated_importance_weights(OLD, BEHAV, MASK, cap=0)


def test_loss_weights_the_policy_gradient_term_only():
    lp = torch.zeros(1, 2, requires_grad=True)  # r = 1 everywhere: no clipping
    old = torch.zeros(1, 2)
    adv = torch.tensor([[1.0, -2.0]])
    ref = torch.full((1, 2), math.log(0.5))  # k3 with d = ref - lp = -ln 2: 0.5 + ln 2 - 1 = 0.193147
    mask = torch.ones(1, 2, dtype=torch.bool)
    weights = torch.tensor([[2.0, 0.5]])
    loss, stats = ppo_clip_loss(lp, old, ref, adv, mask, kl_loss_coef=0.1, importance_weights=weights)
    # pg: [-1 * 2, +2 * 0.5] = [-2, 1] -> mean -0.5; kl 0.1 * 0.193147 -> loss -0.480685
    assert stats.policy_loss.item() == pytest.approx(-0.5, abs=1e-6)
    assert loss.item() == pytest.approx(-0.5 + 0.1 * 0.193147, abs=1e-6)
    loss.backward()
    # d loss / d lp_t = (-A_t * w_t * r_t + 0.1 * (1 - exp(ref - lp))) / 2 = ([-2, 1] + 0.05) / 2
    assert torch.allclose(lp.grad, torch.tensor([[-0.975, 0.525]]), atol=1e-6)


def test_unit_weights_equal_no_correction():
    lp = torch.tensor([[0.1, -0.3]])
    old, ref, adv = torch.zeros(1, 2), torch.zeros(1, 2), torch.tensor([[1.0, 1.0]])
    mask = torch.ones(1, 2, dtype=torch.bool)
    plain, _ = ppo_clip_loss(lp, old, ref, adv, mask)
    weighted, _ = ppo_clip_loss(lp, old, ref, adv, mask, importance_weights=torch.ones(1, 2))
    assert weighted.item() == plain.item()
