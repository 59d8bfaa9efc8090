"""rl.aggregate on hand-computed numbers for each named aggregation, the gradient-accumulation
identity (micro-batches with the minibatch's normalizer add up to the minibatch), and errors."""

import pytest
import torch

from maye_pl.rl.aggregation import LOSS_AGGREGATIONS, aggregate

VALUES = torch.tensor([[1.0, 2.0, 9.0], [3.0, 4.0, 5.0]])  # the 9 sits on padding
MASK = torch.tensor([[True, True, False], [True, True, True]])


@pytest.mark.parametrize(("agg", "expected"), [
    ("token_mean", (1 + 2 + 3 + 4 + 5) / 5),  # 3.0: every token weighs the same
    ("seq_mean_token_mean", ((1 + 2) / 2 + (3 + 4 + 5) / 3) / 2),  # 2.75: every response weighs the same
    ("seq_mean_token_sum_norm", ((1 + 2) / 4 + (3 + 4 + 5) / 4) / 2),  # 1.875: L_max = 4 for every row
])
def test_each_aggregation_by_hand(agg, expected):
    assert aggregate(VALUES, MASK, agg, max_tokens=4).item() == pytest.approx(expected)


@pytest.mark.parametrize("agg", LOSS_AGGREGATIONS)
def test_micro_batches_add_up_to_the_minibatch(agg):
    gen = torch.Generator().manual_seed(5)
    lengths = torch.tensor([4, 1, 3, 2])
    mask = torch.arange(4).unsqueeze(0) < lengths.unsqueeze(1)  # (4, 4), 10 valid tokens
    values = torch.randn(4, 4, generator=gen).requires_grad_()
    full = aggregate(values, mask, agg, max_tokens=6)
    (full_grad,) = torch.autograd.grad(full, values)

    normalizer = mask.sum() if agg == "token_mean" else 4  # the minibatch's 10 tokens or 4 rows
    parts = [aggregate(values[rows], mask[rows], agg, normalizer=normalizer, max_tokens=6)
             for rows in (slice(0, 1), slice(1, 4))]
    (part_grad,) = torch.autograd.grad(parts[0] + parts[1], values)
    torch.testing.assert_close(parts[0] + parts[1], full)
    torch.testing.assert_close(part_grad, full_grad)


def test_no_valid_tokens_gives_zero_and_bad_arguments_are_named_together():
    for agg in LOSS_AGGREGATIONS:
        assert aggregate(VALUES, torch.zeros(2, 3, dtype=torch.bool), agg, max_tokens=4).item() == 0.0
    with pytest.raises(ValueError) as err:
        aggregate(VALUES, MASK, "sum", normalizer=0)
    with pytest.raises(ValueError, match="max_tokens=None must be >= 1"):
        aggregate(VALUES, MASK, "seq_mean_token_sum_norm")
    assert "agg='sum'" in str(err.value) and "normalizer=0.0" in str(err.value)
