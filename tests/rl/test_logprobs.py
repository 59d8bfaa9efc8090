"""token_logprobs / token_entropy equal a naive log_softmax reference, chunked or not, at any
temperature and dtype, with hand-computed values for a two-token vocabulary."""

import math

import pytest
import torch

from maye_pl.rl.logprobs import token_entropy, token_logprobs


def _naive_logprobs(logits, ids, temperature):
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    return logp.gather(-1, ids.unsqueeze(-1)).squeeze(-1)


def _naive_entropy(logits, temperature):
    p = torch.softmax(logits.float() / temperature, dim=-1)
    return -torch.special.xlogy(p, p).sum(-1)


def test_hand_computed_two_token_vocab():
    # logits [0, ln 3] -> p = [1/4, 3/4];
    # at T=2 logits/2 = [0, ln sqrt(3)] -> p1 = sqrt(3)/(1+sqrt(3))
    logits = torch.tensor([[[0.0, math.log(3.0)]]])  # (1, 1, 2)
    ids = torch.tensor([[1]])
    assert token_logprobs(logits, ids).item() == pytest.approx(math.log(0.75), abs=1e-6)
    s3 = math.sqrt(3.0)
    assert token_logprobs(logits, ids, temperature=2.0).item() == pytest.approx(
        math.log(s3 / (1 + s3)), abs=1e-6
    )
    # H = -(1/4 ln 1/4 + 3/4 ln 3/4) = 0.346574 + 0.215762 = 0.562335
    assert token_entropy(logits).item() == pytest.approx(0.562335, abs=1e-5)


@pytest.mark.parametrize("temperature", [1.0, 0.6])
@pytest.mark.parametrize("chunk_size", [None, 1, 2, 5])
def test_matches_naive_reference(temperature, chunk_size):
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 4, 11, generator=gen) * 3  # (N, T, V)
    ids = torch.randint(0, 11, (3, 4), generator=gen)
    lp = token_logprobs(logits, ids, temperature, chunk_size)
    assert lp.shape == (3, 4) and lp.dtype == torch.float32
    torch.testing.assert_close(lp, _naive_logprobs(logits, ids, temperature))
    ent = token_entropy(logits, temperature, chunk_size)
    torch.testing.assert_close(ent, _naive_entropy(logits, temperature))


def test_bf16_logits_computed_in_fp32_and_gradient_matches():
    gen = torch.Generator().manual_seed(1)
    logits = (torch.randn(2, 3, 7, generator=gen) * 4).to(torch.bfloat16)
    ids = torch.randint(0, 7, (2, 3), generator=gen)
    lp = token_logprobs(logits, ids, chunk_size=2)
    assert lp.dtype == torch.float32
    # Same bf16 values upcast: the only error left is fp32 rounding, not bf16's 3 digits.
    torch.testing.assert_close(lp, _naive_logprobs(logits, ids, 1.0), atol=1e-6, rtol=1e-6)

    leaf = torch.randn(2, 3, 7, generator=gen, requires_grad=True)
    token_logprobs(leaf, ids, 0.7, chunk_size=2).sum().backward()
    ours = leaf.grad.clone()
    leaf.grad = None
    _naive_logprobs(leaf, ids, 0.7).sum().backward()
    torch.testing.assert_close(ours, leaf.grad)


@pytest.mark.parametrize("chunk_size", [None, 1, 3])
def test_gradient_equals_autograd_of_log_softmax_with_banned_tokens(chunk_size):
    # The hand-written backward, d logp(y)/dz_v = (1[v=y] - p_v)/T, against autograd of the naive
    # form, with a banned (-inf) vocabulary entry: its gradient is exactly 0, and nothing is nan.
    gen = torch.Generator().manual_seed(2)
    base = torch.randn(2, 5, 9, generator=gen) * 3
    base[..., 4] = -float("inf")
    ids = torch.randint(0, 4, (2, 5), generator=gen)  # never the banned token 4
    weights = torch.randn(2, 5, generator=gen)  # a non-uniform upstream gradient
    ours, naive = base.clone().requires_grad_(True), base.clone().requires_grad_(True)
    (token_logprobs(ours, ids, 0.6, chunk_size) * weights).sum().backward()
    (_naive_logprobs(naive, ids, 0.6) * weights).sum().backward()
    torch.testing.assert_close(ours.grad, naive.grad)
    assert torch.all(ours.grad[..., 4] == 0)


def test_gradient_of_bf16_logits_is_bf16():
    logits = torch.randn(1, 4, 6, dtype=torch.bfloat16, requires_grad=True)
    token_logprobs(logits, torch.zeros(1, 4, dtype=torch.long), chunk_size=2).sum().backward()
    assert logits.grad.dtype == torch.bfloat16 and torch.isfinite(logits.grad.float()).all()


def test_entropy_with_masked_vocab_is_finite():
    # -inf logits (a masked vocabulary entry) have p = 0 and add nothing: H([1/2, 1/2, 0]) = ln 2
    logits = torch.tensor([[[1.0, 1.0, -float("inf")]]])
    assert token_entropy(logits).item() == pytest.approx(math.log(2.0), abs=1e-6)


def test_bad_arguments_raise():
    logits = torch.zeros(1, 2, 3)
    with pytest.raises(ValueError, match="chunk_size=0"):
        token_logprobs(logits, torch.zeros(1, 2, dtype=torch.long), chunk_size=0)
    with pytest.raises(ValueError, match="temperature=0"):
        token_entropy(logits, temperature=0.0)
    with pytest.raises(ValueError, match="token_ids shape"):
        token_logprobs(logits, torch.zeros(1, 3, dtype=torch.long))
