"""RolloutQueue: the typed hand-off of rollout batches by generation step between the rollout
pipeline and the module. Proves: a batch is taken once and only with the expected count (a clear
error otherwise). (What a checkpoint keeps of the queue is tested in test_pipeline.py.)"""

from __future__ import annotations

import pytest

from maye_pl.rollout.queue import RolloutQueue
from maye_pl.types import Rollout


def _rollouts(version: int) -> list[Rollout]:
    return [Rollout([5, 2], "ab", "stop", [-0.5, -0.1], [1, 2, 3], policy_version=version) for _ in range(4)]


def test_take_once_with_the_expected_count():
    queue, prompts = RolloutQueue(), [{"id": "a"}, {"id": "b"}]
    queue.put_ready(3, prompts, _rollouts(0))
    with pytest.raises(RuntimeError, match="expected 8 rollouts for generation step 3 .* got 4"):
        queue.take(3, expected=8)
    queue.put_ready(3, prompts, _rollouts(0))
    taken_prompts, rollouts = queue.take(3, expected=4)
    assert taken_prompts == prompts and len(rollouts) == 4
    with pytest.raises(RuntimeError, match="got none.*RolloutCallback"):
        queue.take(3, expected=4)
