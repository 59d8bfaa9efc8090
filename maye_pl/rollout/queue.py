"""The hand-off between the rollout pipeline (which generates) and the module (which trains).

Rollout batches are keyed by generation step (the module's ``generation_step`` when it trains on
them). With ``rollout.max_staleness`` s > 0 the pipeline submits batch k+s while the module trains
on batch k, so the queue holds up to s+1 steps: submitted (on each engine's owner, a handle the
engine resolves later) and ready (on every rank, this rank's rollouts, taken once by the module).
What a checkpoint keeps of it is the pipeline's (``RolloutPipeline.state_dict``).
"""

from __future__ import annotations

from dataclasses import dataclass

from maye_pl.types import Rollout, RolloutHandle


@dataclass
class Submission:
    """One generation step's rollouts, submitted to the engines before the step that trains on them."""

    prompt_ids: list[list[str]]
    """Every rank's sample ids of the batch, in rank order (to check the batch is the one trained on)."""
    handle: RolloutHandle | None
    """On an engine's owner: its group's B*G rollouts per rank, in rank order, request-major; None elsewhere."""


class RolloutQueue:
    """Rollout batches by generation step: submitted ahead by the pipeline, taken once by the module."""

    def __init__(self) -> None:
        self.submitted: dict[int, Submission] = {}
        self._ready: dict[int, tuple[list[dict], list[Rollout]]] = {}

    def put_ready(self, generation_step: int, prompts: list[dict], rollouts: list[Rollout]) -> None:
        """This rank's B prompts and their B*G rollouts for ``generation_step`` (the submission is
        done with). The prompts are the loader's batch, or what dynamic sampling kept of it and drew."""
        self.submitted.pop(generation_step, None)
        self._ready[generation_step] = (prompts, rollouts)

    def take(self, generation_step: int, expected: int) -> tuple[list[dict], list[Rollout]]:
        """This rank's B prompts and N = B*G rollouts for ``generation_step``; each batch is taken once."""
        prompts, rollouts = self._ready.pop(generation_step, (None, None))
        if rollouts is None or len(rollouts) != expected:
            got = "none" if rollouts is None else len(rollouts)
            raise RuntimeError(
                f"expected {expected} rollouts for generation step {generation_step} from RolloutCallback "
                f"before training_step, got {got}; the CLI adds the callback — when building a Trainer by "
                "hand, add `maye_pl.rollout.callback.RolloutCallback` to its callbacks."
            )
        return prompts, rollouts

    def clear(self) -> None:
        self.submitted.clear()
        self._ready.clear()
