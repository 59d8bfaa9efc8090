"""The off-policy weights on hand-computed numbers: truncated and masked importance sampling at
token and sequence level, with their stats; no gradient; bad settings named together."""

import math

import pytest
import torch

from maye_pl.rl.off_policy import behaviour_weights

# Row 0: old - behav = [ln 3, ln 0.5, (pad)]; row 1: [0, ln 1.5, ln 2.5].
OLD = torch.tensor([[math.log(3.0), math.log(0.5), 9.0], [0.0, math.log(1.5), math.log(2.5)]])
BEHAV = torch.zeros(2, 3)
MASK = torch.tensor([[True, True, False], [True, True, True]])


@pytest.mark.parametrize(("mode", "level", "expected", "bounded"), [
    # token ratios [3, 0.5, -] and [1, 1.5, 2.5]
    ("truncate", "token", [[2.0, 0.5, 0.0], [1.0, 1.5, 2.0]], 2 / 5),  # min(ratio, 2): 3 and 2.5 capped
    ("mask", "token", [[0.0, 0.0, 0.0], [1.0, 1.5, 0.0]], 3 / 5),  # outside [0.6, 2]: 3, 0.5, 2.5 dropped
    # sequence ratios: 3 * 0.5 = 1.5 and 1 * 1.5 * 2.5 = 3.75, the same for every token of the row
    ("truncate", "sequence", [[1.5, 1.5, 0.0], [2.0, 2.0, 2.0]], 3 / 5),
    ("mask", "sequence", [[1.5, 1.5, 0.0], [0.0, 0.0, 0.0]], 3 / 5),  # row 1's 3.75 > 2: dropped whole
])
def test_weights_by_mode_and_level(mode, level, expected, bounded):
    weights, stats = behaviour_weights(OLD, BEHAV, MASK, mode=mode, level=level, low=0.6, high=2.0)
    torch.testing.assert_close(weights, torch.tensor(expected))
    assert stats["clip_fraction"].item() == pytest.approx(bounded)
    assert not weights.requires_grad


def test_stats_are_of_the_unbounded_ratio():
    _, stats = behaviour_weights(OLD, BEHAV, MASK, high=2.0)
    # mean over the 5 valid tokens: (3 + 0.5 + 1 + 1.5 + 2.5) / 5 = 1.7; the pad's e^9 is ignored
    assert stats["ratio_mean"].item() == pytest.approx(1.7, abs=1e-6)
    assert stats["ratio_max"].item() == pytest.approx(3.0, abs=1e-6)
    _, sequence = behaviour_weights(OLD, BEHAV, MASK, level="sequence", high=2.0)
    assert sequence["ratio_mean"].item() == pytest.approx((2 * 1.5 + 3 * 3.75) / 5, abs=1e-5)


def test_weights_carry_no_gradient_and_bad_settings_are_named():
    old = OLD.clone().requires_grad_(True)
    weights, _ = behaviour_weights(old, BEHAV, MASK)
    assert not weights.requires_grad
    with pytest.raises(ValueError) as err:
        behaviour_weights(OLD, BEHAV, MASK, mode="clip", level="row", low=3.0, high=0.0)
    for part in ("mode='clip'", "level='row'", "high=0.0 must be > 0", "low=3.0 must lie in [0, high=0.0]"):
        assert part in str(err.value)
