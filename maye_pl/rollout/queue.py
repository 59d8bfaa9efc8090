"""The hand-off between RolloutCallback (which generates) and the module (which trains).

Rollout batches are keyed by generation step (the module's ``generation_step`` when it trains on
them). With ``rollout.max_staleness`` s > 0 the callback submits batch k+s while the module trains
on batch k, so the queue holds up to s+1 steps: submitted (on global rank 0, a handle the engine
resolves later) and ready (on every rank, this rank's rollouts, taken once by the module).

Saved state: the submitted batches that no step has used yet, resolved (rank 0 waits for them),
so that a resumed run trains on exactly the rollouts the uninterrupted run would have: they were
sampled by weights that no checkpoint holds any more.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from maye_pl.rollout.base import ResolvedHandle, Rollout, RolloutHandle


@dataclass
class Submission:
    """One generation step's rollouts, submitted to the engine before the step that trains on them."""

    prompt_ids: list[list[str]]
    """Each rank's sample ids of the batch, in rank order (to check the batch is the one trained on)."""
    handle: RolloutHandle | None
    """On global rank 0: every rank's B*G rollouts in rank order, request-major; None elsewhere."""


class RolloutQueue:
    """Rollout batches by generation step: submitted ahead by the callback, taken once by the module."""

    def __init__(self) -> None:
        self.submitted: dict[int, Submission] = {}
        self._ready: dict[int, list[Rollout]] = {}

    def put_ready(self, generation_step: int, rollouts: list[Rollout]) -> None:
        """This rank's rollouts for ``generation_step`` (the submission is done with)."""
        self.submitted.pop(generation_step, None)
        self._ready[generation_step] = rollouts

    def take(self, generation_step: int, expected: int) -> list[Rollout]:
        """This rank's N = B*G rollouts for ``generation_step``; each batch is taken once."""
        rollouts = self._ready.pop(generation_step, None)
        if rollouts is None or len(rollouts) != expected:
            got = "none" if rollouts is None else len(rollouts)
            raise RuntimeError(
                f"expected {expected} rollouts for generation step {generation_step} from RolloutCallback "
                f"before training_step, got {got}; the CLI adds the callback — when building a Trainer by "
                "hand, add `maye_pl.rollout.callback.RolloutCallback` to its callbacks."
            )
        return rollouts

    def clear(self) -> None:
        self.submitted.clear()
        self._ready.clear()

    def state_dict(self) -> dict[str, Any]:
        """The submitted, unused batches with their rollouts (waits for those still generating).

        Only global rank 0's state is complete (it holds every rank's rollouts); it is the one a
        checkpoint keeps.
        """
        return {
            "submitted": {
                step: {
                    "prompt_ids": submission.prompt_ids,
                    "rollouts": (
                        [asdict(rollout) for rollout in submission.handle.result()]
                        if submission.handle is not None else None
                    ),
                    # Read after result(): known once the rollouts are in (the step's perf/ metrics).
                    "engine_seconds": submission.handle.engine_seconds if submission.handle is not None else None,
                }
                for step, submission in sorted(self.submitted.items())
            }
        }

    def load_state_dict(self, state: dict[str, Any], *, is_global_zero: bool) -> None:
        self.clear()
        for step, saved in state.get("submitted", {}).items():
            handle = None
            if is_global_zero:
                if saved["rollouts"] is None:
                    raise ValueError(
                        f"the checkpoint's RolloutCallback state for generation step {step} holds no "
                        "rollouts (it was not written by global rank 0); resume from a checkpoint "
                        "written by maye_pl."
                    )
                handle = ResolvedHandle([Rollout(**rollout) for rollout in saved["rollouts"]],
                                        engine_seconds=saved.get("engine_seconds"))
            self.submitted[int(step)] = Submission(saved["prompt_ids"], handle)
