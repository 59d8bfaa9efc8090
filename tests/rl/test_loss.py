"""ppo_clip_loss on hand-computed ratios (clipping on both sides, both aggregations, KL term and
stats), the gradient-accumulation identity, the direction of one SGD step, and argument errors."""

import math

import pytest
import torch

from maye_pl.rl.logprobs import token_logprobs
from maye_pl.rl.loss import ppo_clip_loss

LN15, LN05 = math.log(1.5), math.log(0.5)
# Row 0: ratios [1.5, 0.5, (pad)], A = +1.  Row 1: ratios [0.5, 1.5, 1.0], A = -1.
OLD = torch.zeros(2, 3)
LP = torch.tensor([[LN15, LN05, 0.0], [LN05, LN15, 0.0]])
ADV = torch.tensor([[1.0, 1.0, 5.0], [-1.0, -1.0, -1.0]])
MASK = torch.tensor([[True, True, False], [True, True, True]])


def test_policy_loss_clipping_and_stats():
    loss, stats = ppo_clip_loss(LP, OLD, LP.clone(), ADV, MASK)
    # Row 0 (A=+1): r=1.5: max(-1.5, -1.2) = -1.2 (clipped); r=0.5: max(-0.5, -0.8) = -0.5
    # Row 1 (A=-1): r=0.5: max(0.5, 0.8) = 0.8 (clipped); r=1.5: max(1.5, 1.2) = 1.5; r=1: 1.0
    # token_mean = (-1.2 - 0.5 + 0.8 + 1.5 + 1.0) / 5 = 1.6 / 5 = 0.32 (A=5 at the pad ignored)
    assert loss.item() == pytest.approx(0.32, abs=1e-6)
    assert stats.policy_loss.item() == pytest.approx(0.32, abs=1e-6)
    assert stats.clip_fraction.item() == pytest.approx(2 / 5)
    # ratio mean (1.5 + 0.5 + 0.5 + 1.5 + 1) / 5 = 1.0
    assert stats.ratio_mean.item() == pytest.approx(1.0, abs=1e-6)
    # approx_kl = 0.5 * mean((lp-old)^2) = 0.5 * (2*ln1.5^2 + 2*ln0.5^2 + 0) / 5
    #           = 0.5 * (2*0.164402 + 2*0.480453) / 5 = 0.128971
    assert stats.approx_kl.item() == pytest.approx(0.128971, abs=1e-5)
    assert stats.kl_loss.item() == 0.0  # ref == lp
    assert all(not s.requires_grad and s.dim() == 0 for s in stats)

    # seq_mean: row means (-1.2 - 0.5)/2 = -0.85 and (0.8 + 1.5 + 1.0)/3 = 1.1 -> (-0.85 + 1.1)/2
    loss_seq, _ = ppo_clip_loss(LP, OLD, LP.clone(), ADV, MASK, loss_agg="seq_mean")
    assert loss_seq.item() == pytest.approx(0.125, abs=1e-6)


def test_asymmetric_clip_and_kl_term():
    ref = torch.zeros(2, 3)
    loss, stats = ppo_clip_loss(
        LP[:1], OLD[:1], ref[:1], ADV[:1], MASK[:1], clip_eps_high=0.28, kl_loss_coef=0.1
    )
    # r=1.5 clipped at 1.28: max(-1.5, -1.28) = -1.28; r=0.5: -0.5 -> policy (-1.28 - 0.5)/2 = -0.89
    # k3 with d = ref - lp: d=-ln1.5: 2/3 + 0.405465 - 1 = 0.072132;
    #                      d=ln2:    2 - 0.693147 - 1 = 0.306853
    # kl mean 0.189492; loss = -0.89 + 0.1 * 0.189492 = -0.871051
    assert stats.policy_loss.item() == pytest.approx(-0.89, abs=1e-6)
    assert stats.kl_loss.item() == pytest.approx(0.189492, abs=1e-5)
    assert loss.item() == pytest.approx(-0.871051, abs=1e-5)


@pytest.mark.parametrize("loss_agg", ["token_mean", "seq_mean"])
def test_micro_batch_losses_and_gradients_add_up_to_the_minibatch(loss_agg):
    gen = torch.Generator().manual_seed(5)
    lengths = torch.tensor([4, 1, 3, 2])
    mask = torch.arange(4).unsqueeze(0) < lengths.unsqueeze(1)  # (4, 4), 10 valid tokens
    old = -torch.rand(4, 4, generator=gen)
    ref = -torch.rand(4, 4, generator=gen)
    adv = torch.randn(4, 4, generator=gen)
    lp = (old + 0.3 * torch.randn(4, 4, generator=gen)).requires_grad_()
    kwargs = dict(kl_loss_coef=0.01, loss_agg=loss_agg)

    full, _ = ppo_clip_loss(lp, old, ref, adv, mask, **kwargs)
    (full_grad,) = torch.autograd.grad(full, lp)

    normalizer = mask.sum() if loss_agg == "token_mean" else 4  # 10 tokens or 4 rows
    parts = [
        ppo_clip_loss(
            lp[rows], old[rows], ref[rows], adv[rows], mask[rows], normalizer=normalizer, **kwargs
        )[0]
        for rows in (slice(0, 2), slice(2, 4))
    ]
    accumulated = parts[0] + parts[1]
    (acc_grad,) = torch.autograd.grad(accumulated, lp)
    torch.testing.assert_close(accumulated, full)
    torch.testing.assert_close(acc_grad, full_grad)


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_sgd_step_moves_the_advantaged_token(sign):
    gen = torch.Generator().manual_seed(6)
    logits = torch.nn.Parameter(torch.randn(1, 3, 5, generator=gen))  # (b, T, V)
    ids = torch.tensor([[1, 4, 2]])
    mask = torch.ones(1, 3, dtype=torch.bool)
    adv = torch.tensor([[sign, 0.0, 0.0]])  # advantage on token 0 only
    before = token_logprobs(logits, ids).detach()

    loss, _ = ppo_clip_loss(token_logprobs(logits, ids), before, before, adv, mask)
    loss.backward()
    torch.optim.SGD([logits], lr=0.5).step()
    after = token_logprobs(logits, ids).detach()

    # A > 0 raises log p of token 0, A < 0 lowers it; zero-advantage tokens do not move.
    assert sign * (after[0, 0] - before[0, 0]).item() > 1e-3
    torch.testing.assert_close(after[0, 1:], before[0, 1:])


def test_micro_batch_without_valid_tokens_gives_zero_not_nan():
    mask = torch.zeros(1, 3, dtype=torch.bool)
    loss, stats = ppo_clip_loss(LP[:1], OLD[:1], OLD[:1], ADV[:1], mask)
    assert loss.item() == 0.0 and all(s.item() == 0.0 for s in stats)


def test_bad_arguments_raise_together():
    with pytest.raises(ValueError) as err:
        ppo_clip_loss(LP, OLD, OLD, ADV, MASK, clip_eps_low=1.0, loss_agg="sum", normalizer=0)
    message = str(err.value)
    for part in ("clip_eps_low=1.0", "loss_agg='sum'", "normalizer=0"):
        assert part in message
