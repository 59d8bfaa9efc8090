"""RolloutQueue: the typed hand-off of rollout batches by generation step between RolloutCallback
and the module. Proves: a batch is taken once and only with the expected count (a clear error
otherwise); the saved state holds the submitted batches' rollouts resolved (global rank 0) and
restores them as resolved handles with their policy versions, and other ranks restore only the
prompt ids."""

from __future__ import annotations

import pytest

from maye_pl.rollout.base import ResolvedHandle, Rollout
from maye_pl.rollout.queue import RolloutQueue, Submission


def _rollouts(version: int) -> list[Rollout]:
    return [Rollout([5, 2], "ab", "stop", [-0.5, -0.1], [1, 2, 3], policy_version=version) for _ in range(4)]


def test_take_once_with_the_expected_count():
    queue = RolloutQueue()
    queue.put_ready(3, _rollouts(0))
    with pytest.raises(RuntimeError, match="expected 8 rollouts for generation step 3 .* got 4"):
        queue.take(3, expected=8)
    queue.put_ready(3, _rollouts(0))
    assert len(queue.take(3, expected=4)) == 4
    with pytest.raises(RuntimeError, match="got none.*RolloutCallback"):
        queue.take(3, expected=4)


def test_state_round_trip_keeps_submitted_rollouts():
    queue = RolloutQueue()
    queue.submitted[7] = Submission([["a", "b"], ["c", "d"]], ResolvedHandle(_rollouts(12)))
    queue.put_ready(6, _rollouts(10))  # ready batches are taken within their step, never saved
    state = queue.state_dict()
    assert list(state["submitted"]) == [7]

    restored = RolloutQueue()
    restored.load_state_dict(state, is_global_zero=True)
    [(step, submission)] = restored.submitted.items()
    assert step == 7 and submission.prompt_ids == [["a", "b"], ["c", "d"]]
    assert submission.handle.done() and submission.handle.result() == _rollouts(12)

    other_rank = RolloutQueue()
    other_rank.load_state_dict(state, is_global_zero=False)
    assert other_rank.submitted[7].handle is None and other_rank.submitted[7].prompt_ids[1] == ["c", "d"]
