"""POLICY_LOSSES (ppo_clip, gspo, cispo) on hand-computed numbers: values, gradients, which tokens
clip, checked on held-out cases against the papers' own objectives (GSPO's sequence objective,
CISPO's Eq. 4); the off-policy weights scale the policy term only; one SGD step moves the
advantaged token; bad arguments are named."""

import math

import pytest
import torch

from maye_pl import rl
from maye_pl.rl.logprobs import token_logprobs
from maye_pl.rl.policy_loss import POLICY_LOSSES, cispo, gspo, kl_loss, ppo_clip

LN15, LN05 = math.log(1.5), math.log(0.5)
# Row 0: ratios [1.5, 0.5, (pad)], A = +1.  Row 1: ratios [0.5, 1.5, 1.0], A = -1.
OLD = torch.zeros(2, 3)
LP = torch.tensor([[LN15, LN05, 0.0], [LN05, LN15, 0.0]])
ADV = torch.tensor([[1.0, 1.0, 5.0], [-1.0, -1.0, -1.0]])
MASK = torch.tensor([[True, True, False], [True, True, True]])
CLIP = dict(clip_low=0.2, clip_high=0.2)


def _grad(loss_fn, adv=ADV, **kwargs):
    lp = LP.clone().requires_grad_()
    loss, stats = loss_fn(lp, OLD, adv, MASK, **kwargs)
    (grad,) = torch.autograd.grad(loss, lp)
    return loss, stats, grad


def test_ppo_clip_values_clipped_tokens_and_gradients():
    loss, stats, grad = _grad(ppo_clip, **CLIP)
    # Row 0 (A=+1): r=1.5: max(-1.5, -1.2) = -1.2 (clipped); r=0.5: max(-0.5, -0.8) = -0.5
    # Row 1 (A=-1): r=0.5: max(0.5, 0.8) = 0.8 (clipped); r=1.5: max(1.5, 1.2) = 1.5; r=1: 1.0
    # token_mean = (-1.2 - 0.5 + 0.8 + 1.5 + 1.0) / 5 = 0.32 (A=5 at the pad ignored)
    assert loss.item() == pytest.approx(0.32, abs=1e-6)
    assert stats["policy_loss"].item() == pytest.approx(0.32, abs=1e-6)
    assert stats["clip_fraction"].item() == pytest.approx(2 / 5)
    assert stats["ratio_mean"].item() == pytest.approx(1.0, abs=1e-6)  # (1.5+0.5+0.5+1.5+1)/5
    # approx_kl = 0.5 * (2 ln1.5^2 + 2 ln0.5^2) / 5 = 0.5 * (0.328804 + 0.960906) / 5 = 0.128971
    assert stats["approx_kl"].item() == pytest.approx(0.128971, abs=1e-5)
    assert all(not s.requires_grad and s.dim() == 0 for s in stats.values())
    # d/dlp of -A r is -A r / 5 where unclipped; the clipped tokens (r=1.5, A>0; r=0.5, A<0) get 0.
    torch.testing.assert_close(grad, torch.tensor([[0.0, -0.1, 0.0], [0.0, 0.3, 0.2]]))

    # clip-higher: ε_high 0.28 lets row 0's r=1.5 climb to 1.28: (-1.28 - 0.5) / 2 = -0.89
    loss_high, _ = ppo_clip(LP[:1], OLD[:1], ADV[:1], MASK[:1], clip_low=0.2, clip_high=0.28)
    assert loss_high.item() == pytest.approx(-0.89, abs=1e-6)


def test_gspo_clips_whole_responses_on_the_sequence_ratio():
    # s_0 = exp((ln1.5 + ln0.5)/2) = 0.75^(1/2) = 0.866025; s_1 = 0.75^(1/3) = 0.908560.
    s0, s1 = 0.75 ** 0.5, 0.75 ** (1 / 3)
    loss, stats, grad = _grad(gspo, **CLIP)  # both inside [0.8, 1.2]: no clipping
    # tokens: -A s_i -> [-s0, -s0] and [s1, s1, s1]: (-2 s0 + 3 s1) / 5 = 0.198726
    assert loss.item() == pytest.approx((-2 * s0 + 3 * s1) / 5, abs=1e-6)
    assert stats["ratio_mean"].item() == pytest.approx((2 * s0 + 3 * s1) / 5, abs=1e-6)
    assert stats["clip_fraction"].item() == 0.0
    # the gradient of s_it is s_i ∇lp_it: -A_t s_i / 5 per token
    torch.testing.assert_close(grad, torch.tensor([[-s0, -s0, 0.0], [s1, s1, s1]]) / 5)

    # The paper's range (3e-4, 4e-4): row 1 (A<0, s_1 below 1 - 3e-4) clips as a whole, row 0
    # (A>0, a ratio below 1 does not bind) keeps every token; seq_mean_token_mean as the paper.
    loss, stats, grad = _grad(gspo, clip_low=3e-4, clip_high=4e-4, agg="seq_mean_token_mean")
    assert stats["clip_fraction"].item() == pytest.approx(3 / 5)
    assert loss.item() == pytest.approx((-s0 + (1 - 3e-4)) / 2, abs=1e-6)  # rows -s0 and +0.9997
    torch.testing.assert_close(grad, torch.tensor([[-s0 / 4, -s0 / 4, 0.0], [0.0, 0.0, 0.0]]))


def test_gspo_token_equals_the_papers_sequence_objective():
    """Held out: with one advantage per response and sequence-mean aggregation, GSPO-token is
    GSPO's Eq. 5-7, mean_i min(s_i A_i, clip(s_i) A_i) with s_i = (π/π_old)(y_i)^(1/|y_i|), negated."""
    gen = torch.Generator().manual_seed(3)
    lengths = torch.tensor([5, 2, 4, 3])
    mask = torch.arange(5).unsqueeze(0) < lengths.unsqueeze(1)  # (4, 5)
    old = -torch.rand(4, 5, generator=gen)
    lp = (old + 0.05 * torch.randn(4, 5, generator=gen)).requires_grad_()
    adv_rows = torch.tensor([1.0, -0.5, 2.0, -1.5])
    ours, stats = gspo(lp, old, adv_rows[:, None].expand(4, 5), mask, clip_low=0.001, clip_high=0.002,
                       agg="seq_mean_token_mean")
    (our_grad,) = torch.autograd.grad(ours, lp)

    s = torch.exp(((lp - old) * mask).sum(1) / lengths)  # (4,) the sequence ratios, with grad
    paper = -torch.minimum(s * adv_rows, s.clamp(0.999, 1.002) * adv_rows).mean()
    (paper_grad,) = torch.autograd.grad(paper, lp)
    torch.testing.assert_close(ours, paper)
    torch.testing.assert_close(our_grad, paper_grad)
    # s = [1.0026, 1.0279, 0.9984, 1.0162]: only row 0 (A > 0 above 1.002) clips, its 5 of 14 tokens.
    assert stats["clip_fraction"].item() == pytest.approx(5 / 14)
    assert (our_grad[0] == 0).all() and (our_grad[1:][mask[1:]] != 0).all()


def test_cispo_keeps_every_token_gradient_with_the_clipped_weight():
    adv = torch.tensor([[1.0, 1.0, 5.0], [-2.0, -2.0, -2.0]])
    loss, stats, grad = _grad(cispo, adv=adv, **CLIP)
    # weights r̂ = clip(r, 0.8, 1.2): [1.2, 0.8] and [0.8, 1.2, 1.0]; l = -r̂ A lp:
    # row 0: -1.2 ln1.5 - 0.8 ln0.5 = -0.486558 + 0.554518; row 1: 2 (0.8 ln0.5 + 1.2 ln1.5 + 0)
    row0 = -1.2 * LN15 - 0.8 * LN05
    row1 = 2 * (0.8 * LN05 + 1.2 * LN15)
    assert loss.item() == pytest.approx((row0 + row1) / 5, abs=1e-6)
    assert stats["clip_fraction"].item() == pytest.approx(4 / 5)  # every ratio but 1.0 left [0.8, 1.2]
    # d/dlp = -r̂ A / 5: no token loses its gradient (ppo_clip gives 0 to two of these tokens).
    torch.testing.assert_close(grad, torch.tensor([[-1.2, -0.8, 0.0], [1.6, 2.4, 2.0]]) / 5)


def test_cispo_matches_minimax_m1_eq4_without_a_floor():
    """Held out: MiniMax-M1's J = sum_it sg(r̂_it) A_it log π_it / sum_i |o_i| with ε_low^IS
    large (no floor), negated: value and gradient on a random batch."""
    gen = torch.Generator().manual_seed(4)
    mask = torch.rand(3, 6, generator=gen) > 0.3
    old = -3 * torch.rand(3, 6, generator=gen)
    lp = (old + torch.randn(3, 6, generator=gen)).requires_grad_()
    adv = torch.randn(3, 6, generator=gen)
    ours, stats = cispo(lp, old, adv, mask, clip_low=1.0, clip_high=4.0)
    (our_grad,) = torch.autograd.grad(ours, lp)

    weight = torch.exp(lp - old).detach().clamp(max=5.0)  # r̂ = min(r, 1 + ε_high)
    assert (weight < 0.2).any() and (weight == 5.0).any()  # no floor; some weights capped
    paper = -(weight * adv * lp * mask).sum() / mask.sum()
    (paper_grad,) = torch.autograd.grad(paper, lp)
    torch.testing.assert_close(ours, paper)
    torch.testing.assert_close(our_grad, paper_grad)
    assert (our_grad[mask & (adv != 0)] != 0).all()


@pytest.mark.parametrize("name", sorted(POLICY_LOSSES))
def test_off_policy_weights_scale_each_token_of_every_loss(name):
    weights = torch.tensor([[2.0, 0.5, 0.0], [1.0, 0.0, 3.0]])
    plain, _, plain_grad = _grad(POLICY_LOSSES[name], **CLIP, agg="seq_mean_token_mean")
    _, _, weighted_grad = _grad(POLICY_LOSSES[name], **CLIP, agg="seq_mean_token_mean", weights=weights)
    torch.testing.assert_close(weighted_grad, weights * plain_grad)
    unit, _ = POLICY_LOSSES[name](LP, OLD, ADV, MASK, **CLIP, agg="seq_mean_token_mean", weights=torch.ones(2, 3))
    assert unit.item() == plain.item()


def test_kl_loss_is_the_k3_term_aggregated_like_the_policy_loss():
    lp = torch.zeros(1, 2, requires_grad=True)
    ref = torch.tensor([[math.log(0.5), 0.0]])  # k3 at d = ref - lp: [0.5 + ln2 - 1, 0] = [0.193147, 0]
    mask = torch.ones(1, 2, dtype=torch.bool)
    loss, mean = kl_loss(lp, ref, mask, agg="seq_mean_token_sum_norm", max_tokens=4)
    assert mean.item() == pytest.approx(0.193147 / 2, abs=1e-6)  # token mean, for logging
    assert loss.item() == pytest.approx(0.193147 / 4, abs=1e-6)  # the row's sum / L_max
    loss.backward()  # d k3 / d lp = 1 - exp(ref - lp): [0.5, 0] / 4
    torch.testing.assert_close(lp.grad, torch.tensor([[0.125, 0.0]]))


@pytest.mark.parametrize("name", sorted(POLICY_LOSSES))
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_sgd_step_moves_the_advantaged_token(name, sign):
    gen = torch.Generator().manual_seed(6)
    logits = torch.nn.Parameter(torch.randn(1, 3, 5, generator=gen))  # (b, T, V)
    ids = torch.tensor([[1, 4, 2]])
    mask = torch.ones(1, 3, dtype=torch.bool)
    adv = torch.tensor([[sign, 0.0, 0.0]])  # advantage on token 0 only
    before = token_logprobs(logits, ids).detach()

    loss, _ = POLICY_LOSSES[name](token_logprobs(logits, ids), before, adv, mask, **CLIP)
    loss.backward()
    torch.optim.SGD([logits], lr=0.5).step()
    after = token_logprobs(logits, ids).detach()
    # A > 0 raises log p of token 0, A < 0 lowers it; zero-advantage tokens do not move.
    assert sign * (after[0, 0] - before[0, 0]).item() > 1e-3
    torch.testing.assert_close(after[0, 1:], before[0, 1:])


def test_registry_and_bad_arguments():
    assert rl.POLICY_LOSSES is POLICY_LOSSES and sorted(POLICY_LOSSES) == ["cispo", "gspo", "ppo_clip"]
    with pytest.raises(ValueError, match=r"gspo: clip_low=1\.5 must lie in \[0, 1\].*clip_high=-0\.1 must be >= 0"):
        gspo(LP, OLD, ADV, MASK, clip_low=1.5, clip_high=-0.1)
    with pytest.raises(TypeError, match="unknown options"):
        ppo_clip(LP, OLD, ADV, MASK, **CLIP, normaliser=3)
    empty, stats = cispo(LP, OLD, ADV, torch.zeros(2, 3, dtype=torch.bool), **CLIP)
    assert empty.item() == 0.0 and all(s.item() == 0.0 for s in stats.values())
