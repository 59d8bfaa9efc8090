"""Token rewards, discounted returns, whitening and the advantage estimators on hand-computed
tensors; maye_compat equals MAYE's formula written out independently; errors name the fix."""

import pytest
import torch

from maye_pl.rl.advantages import (
    discounted_returns,
    dr_grpo_advantages,
    estimate_advantages,
    grpo_advantages,
    masked_whiten,
    reinforce_pp_advantages,
    reinforce_pp_baseline_advantages,
    token_rewards,
)

T_, F_ = True, False


def test_token_rewards_kl_on_valid_tokens_score_on_last():
    scores = torch.tensor([1.0, -0.5, 2.0])
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.4, 0.5, 0.6], [0.7, 0.8, 0.9]])
    mask = torch.tensor([[T_, T_, F_], [T_, T_, T_], [F_, F_, F_]])
    rewards = token_rewards(scores, kl, mask, kl_coef=0.5)
    expected = torch.tensor(
        [
            [-0.05, -0.1 + 1.0, 0.0],  # -0.5*0.1, -0.5*0.2 + score 1 at t=1 (last valid), pad 0
            [-0.2, -0.25, -0.3 - 0.5],  # -0.5*[0.4, 0.5, 0.6], score -0.5 at t=2
            [0.0, 0.0, 0.0],  # no valid token: no KL, nowhere to put the score
        ]
    )
    torch.testing.assert_close(rewards, expected)


def test_discounted_returns_over_valid_tokens():
    rewards = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[T_, T_, F_], [T_, T_, T_]])
    # gamma 0.5, row 0: G1 = 2, G0 = 1 + 0.5*2 = 2, pad (reward 3 ignored) -> 0
    #            row 1: G2 = 6, G1 = 5 + 0.5*6 = 8, G0 = 4 + 0.5*8 = 8
    torch.testing.assert_close(
        discounted_returns(rewards, mask, 0.5), torch.tensor([[2.0, 2.0, 0.0], [8.0, 8.0, 6.0]])
    )
    # gamma 1: suffix sums [3, 2, 0] and [15, 11, 6]
    torch.testing.assert_close(
        discounted_returns(rewards, mask, 1.0), torch.tensor([[3.0, 2.0, 0.0], [15.0, 11.0, 6.0]])
    )


def test_masked_whiten_unbiased_zero_on_padding():
    values = torch.tensor([[1.0, 2.0, 100.0], [3.0, 4.0, 5.0]])
    mask = torch.tensor([[T_, T_, F_], [T_, T_, T_]])
    # valid 1..5: mean 3, squared deviations 4+1+0+1+4 = 10, unbiased var 10/4 = 2.5,
    # std 1.5811388; (x - 3)/std = [-1.264911, -0.632456, 0, 0.632456, 1.264911]; 100 is padding.
    a, b = 1.264911, 0.632456
    torch.testing.assert_close(
        masked_whiten(values, mask), torch.tensor([[-a, -b, 0.0], [0.0, b, a]]), atol=1e-5, rtol=0
    )
    # shift_mean=False adds the mean 3 back on valid tokens (torchtune/MAYE's whiten default).
    torch.testing.assert_close(
        masked_whiten(values, mask, shift_mean=False),
        torch.tensor([[3 - a, 3 - b, 0.0], [3.0, 3 + b, 3 + a]]),
        atol=1e-5,
        rtol=0,
    )


def test_masked_whiten_needs_two_valid_tokens():
    with pytest.raises(ValueError, match="1 valid token"):
        masked_whiten(torch.ones(2, 2), torch.tensor([[T_, F_], [F_, F_]]))


def test_reinforce_pp_hand_computed():
    scores = torch.tensor([1.0, 0.0])
    lp = torch.full((2, 3), -1.0)
    mask = torch.tensor([[T_, T_, F_], [T_, T_, T_]])
    adv, ret = reinforce_pp_advantages(scores, lp, lp.clone(), mask, kl_coef=0.1, gamma=1.0)
    # kl = 0; rewards row 0 = [0, 1, 0] (score on t=1), row 1 = 0 -> returns [1, 1, 0], [0, 0, 0]
    torch.testing.assert_close(ret, torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]]))
    # valid returns 1,1,0,0,0: mean 0.4, squared deviations 2*0.36 + 3*0.16 = 1.2, var 1.2/4 = 0.3,
    # std 0.5477226: (1-0.4)/std = 1.095445, (0-0.4)/std = -0.730297
    hi, lo = 1.095445, -0.730297
    torch.testing.assert_close(
        adv, torch.tensor([[hi, hi, 0.0], [lo, lo, lo]]), atol=1e-5, rtol=0
    )
    adv_m, ret_m = reinforce_pp_advantages(
        scores, lp, lp.clone(), mask, kl_coef=0.1, gamma=1.0, maye_compat=True
    )
    # MAYE adds the mean 0.4 back: 1.495445 and -0.330297.
    torch.testing.assert_close(
        adv_m, torch.tensor([[hi + 0.4, hi + 0.4, 0.0], [lo + 0.4] * 3]), atol=1e-5, rtol=0
    )
    torch.testing.assert_close(ret_m, ret)


def test_reward_side_kl_is_k3():
    # One row, score 0, kl_coef 1, gamma 1; lp = [-1, -2], ref = [-1.5, -0.5]:
    # k3 = [0.106531, 1.981689] (see test_kl) -> rewards -k3, returns [-2.088220, -1.981689].
    # (k1 would give rewards [-0.5, 1.5].)
    lp = torch.tensor([[-1.0, -2.0], [-1.0, -1.0]])
    ref = torch.tensor([[-1.5, -0.5], [-1.0, -1.0]])
    mask = torch.ones(2, 2, dtype=torch.bool)
    _, ret = reinforce_pp_advantages(torch.zeros(2), lp, ref, mask, kl_coef=1.0, gamma=1.0)
    torch.testing.assert_close(ret[0], torch.tensor([-2.088220, -1.981689]))


def _maye_reference(scores, logprobs, ref_logprobs, mask, kl_coef, gamma):
    """MAYE's trajectory -> advantages path, written out from GAIR-NLP/MAYE
    recipes/full_ppo_vllm_distributed.py and maye.rlhf (get_rewards_from_ref, estimate_advantages,
    whiten, masked_mean, masked_var, get_unmasked_sequence_lengths)."""
    padding = ~mask
    logprobs = logprobs.clone()
    ref_logprobs = ref_logprobs.clone()
    logprobs[padding] = 1.0  # the recipe's "mask out all the invalid values"
    ref_logprobs[padding] = 1.0
    seq_lens = (~padding).cumsum(dim=-1).argmax(dim=-1).clip(0, mask.shape[1] - 1)
    log_ratio = ref_logprobs - logprobs
    kl = torch.clamp((torch.exp(log_ratio) - 1) - log_ratio, min=-10, max=10)
    rewards = (-kl_coef * kl).float()
    rewards.scatter_add_(1, seq_lens.unsqueeze(-1), scores.unsqueeze(-1))
    returns = torch.zeros_like(rewards)
    running = torch.zeros(rewards.shape[0])
    for t in reversed(range(rewards.shape[1])):
        running = rewards[:, t] + gamma * running
        returns[:, t] = running
    fmask = mask.float()
    mean = (returns * fmask).sum() / (fmask.sum() + 1e-8)
    var = ((returns - mean).pow(2) * fmask).sum() / (fmask.sum() + 1e-8)
    n = fmask.sum() + 1e-8
    var = var * n / (n - 1)
    advantages = (returns - mean) * torch.rsqrt(var + 1e-8) + mean  # torchtune shift_mean=True
    advantages[~mask] = 0.0
    return advantages, returns


def test_maye_compat_equals_maye_formula():
    gen = torch.Generator().manual_seed(3)
    lengths = torch.tensor([5, 2, 7, 4])
    mask = torch.arange(7).unsqueeze(0) < lengths.unsqueeze(1)  # (4, 7) prefix masks
    lp = -torch.rand(4, 7, generator=gen) * 3
    ref = lp + 0.3 * torch.randn(4, 7, generator=gen)
    scores = torch.tensor([1.0, -0.2, 0.9, 0.0])
    adv, ret = reinforce_pp_advantages(
        scores, lp, ref, mask, kl_coef=0.05, gamma=0.9, maye_compat=True
    )
    maye_adv, maye_ret = _maye_reference(scores, lp, ref, mask, kl_coef=0.05, gamma=0.9)
    torch.testing.assert_close(ret * mask, maye_ret * mask, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(adv, maye_adv, atol=1e-5, rtol=1e-5)
    # The default differs from MAYE exactly by the mean MAYE adds back.
    default_adv, _ = reinforce_pp_advantages(scores, lp, ref, mask, kl_coef=0.05, gamma=0.9)
    mean = (ret * mask).sum() / mask.sum()
    torch.testing.assert_close(default_adv + mean * mask, maye_adv, atol=1e-5, rtol=1e-5)


def test_baseline_subtracts_prompt_mean():
    scores = torch.tensor([1.0, 0.0, 0.5, 0.5])  # prompts (rows 0,1) and (rows 2,3), G = 2
    lp = torch.full((4, 2), -1.0)
    mask = torch.ones(4, 2, dtype=torch.bool)
    adv, ret = reinforce_pp_baseline_advantages(
        scores, lp, lp.clone(), mask, group_size=2, kl_coef=0.0, gamma=1.0
    )
    # centered scores: [1 - 0.5, 0 - 0.5, 0.5 - 0.5, 0.5 - 0.5] = [0.5, -0.5, 0, 0], on both tokens
    expected_ret = torch.tensor([[0.5, 0.5], [-0.5, -0.5], [0.0, 0.0], [0.0, 0.0]])
    torch.testing.assert_close(ret, expected_ret)
    expected_adv, _ = reinforce_pp_advantages(
        torch.tensor([0.5, -0.5, 0.0, 0.0]), lp, lp.clone(), mask, kl_coef=0.0, gamma=1.0
    )
    torch.testing.assert_close(adv, expected_adv)


def test_grpo_per_prompt_normalisation():
    scores = torch.tensor([1.0, 0.0, 0.0, 0.0])
    mask = torch.tensor([[T_, T_], [T_, F_], [T_, T_], [F_, F_]])
    adv, ret = grpo_advantages(scores, mask, group_size=2)
    # prompt 0: mean 0.5, unbiased std sqrt((0.25 + 0.25)/1) = 0.707107 -> +-0.707106 (eps 1e-6)
    # prompt 1: all equal, std 0 -> 0 / (0 + eps) = 0
    v = 0.5 / (0.7071068 + 1e-6)
    torch.testing.assert_close(
        adv, torch.tensor([[v, v], [-v, 0.0], [0.0, 0.0], [0.0, 0.0]]), atol=1e-6, rtol=0
    )
    assert ret is adv


def test_dr_grpo_centres_on_the_prompt_mean_without_the_std():
    scores = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 1.0])
    mask = torch.ones(8, 2, dtype=torch.bool)
    mask[3, 1] = False
    adv, ret = dr_grpo_advantages(scores, mask, group_size=4)
    # prompt 0: mean 0.25 -> [0.75, -0.25, -0.25, -0.25]; prompt 1: mean 0.75 -> [0.25, 0.25, -0.75, 0.25]
    # (GRPO would divide prompt 0 by its std 0.5 and prompt 1 by 0.5 too: twice these.)
    expected = torch.tensor([0.75, -0.25, -0.25, -0.25, 0.25, 0.25, -0.75, 0.25])[:, None].expand(8, 2).clone()
    expected[3, 1] = 0.0  # padding
    torch.testing.assert_close(adv, expected)
    assert ret is adv
    with pytest.raises(ValueError, match="dr_grpo_advantages: group_size=3"):
        dr_grpo_advantages(scores, mask, group_size=3)


@pytest.mark.parametrize("group_size", [1, 3])
def test_bad_group_size_raises(group_size):
    scores = torch.zeros(4)
    lp = torch.zeros(4, 2)
    mask = torch.ones(4, 2, dtype=torch.bool)
    with pytest.raises(ValueError, match=rf"group_size={group_size} \(samples per prompt\)"):
        grpo_advantages(scores, mask, group_size=group_size)
    with pytest.raises(ValueError, match="Pass group_size >= 2"):
        reinforce_pp_baseline_advantages(
            scores, lp, lp, mask, group_size=group_size, kl_coef=0.0, gamma=1.0
        )


def test_estimate_advantages_dispatch():
    gen = torch.Generator().manual_seed(4)
    scores = torch.rand(4, generator=gen)
    lp = -torch.rand(4, 3, generator=gen)
    ref = -torch.rand(4, 3, generator=gen)
    mask = torch.tensor([[T_, T_, T_], [T_, F_, F_], [T_, T_, F_], [T_, T_, T_]])
    common = dict(kl_coef=0.1, gamma=1.0)
    calls = {
        "reinforce_pp": reinforce_pp_advantages(scores, lp, ref, mask, **common),
        "reinforce_pp_baseline": reinforce_pp_baseline_advantages(
            scores, lp, ref, mask, group_size=2, **common
        ),
        "grpo": grpo_advantages(scores, mask, group_size=2),
        "dr_grpo": dr_grpo_advantages(scores, mask, group_size=2),
    }
    for name, (adv, ret) in calls.items():
        got_adv, got_ret = estimate_advantages(
            name, scores, lp, ref, mask, group_size=2, maye_compat=False, group=None, **common
        )
        torch.testing.assert_close(got_adv, adv)
        torch.testing.assert_close(got_ret, ret)
    choices = r"'reinforce_pp', 'reinforce_pp_baseline', 'grpo'"
    with pytest.raises(ValueError, match=rf"estimator='ppo'.*{choices}"):
        estimate_advantages(
            "ppo", scores, lp, ref, mask, group_size=2, maye_compat=False, group=None, **common
        )
