"""DAPO's dynamic sampling (Yu et al. 2025, arXiv 2503.14476, §3.2): train only on groups whose
rewards differ.

A group (one prompt's G samples) whose scores are all equal has a group-normalised advantage of 0
(GRPO, Dr.GRPO): it adds no gradient but still dilutes the batch. ``fill_batch`` drops such groups
and generates more prompts in extra rounds until every rank holds B groups with differing scores,
or ``max_extra_rounds`` ran out. Per generation step k, on every rank:

    round 0     the step's batch (B prompts), already generated: keep the groups whose scores differ
    round j     while some rank holds fewer than B, every short rank draws more prompts (what it
                lacks over the step's keep rate so far, at most B), generates them, keeps as above;
                the ranks agree on each round with one ``all_gather`` (a rank that is full draws
                none but joins the collectives)
    cap         a rank still short fills its batch with dropped groups, in generation order: their
                advantage is 0 under a group estimator, and every rank keeps its fixed B*G rows

Where extra prompts come from: a permutation of the training split drawn from (run seed, step,
round) (``DynamicSampling.draw``), cut into consecutive slices for the ranks in rank order and
skipping every prompt already generated at this step. The epoch's order is untouched (the loader
still yields each prompt once per epoch; an extra prompt may be one the epoch holds elsewhere), and
a resumed run draws the same prompts: exact resume needs no extra state. verl instead consumes
the next loader batches, which shortens the epoch by a varying number of batches.

Sampling seeds: an extra round's requests are numbered after the step's earlier ones (over all
ranks), so their streams never repeat round 0's and do not depend on the engine that draws them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from maye_pl.rollout.group_comm import GroupComm
from maye_pl.types import Rollout

Generate = Callable[[list[dict], int], tuple[list[Rollout], list[float], int]]
"""(this rank's prompts, index of the round's first request over all ranks) -> (their rollouts,
each engine's seconds, all engines' tokens); every rank calls it (collective)."""


@dataclass(frozen=True)
class DynamicSampling:
    """What the rollout pipeline needs from the module and the data for dynamic sampling."""

    group_size: int
    """G, samples per prompt."""
    max_extra_rounds: int
    """Generation rounds after the step's own batch, at most; then dropped groups fill the batch."""
    scores: Callable[[list[dict], list[Rollout]], torch.Tensor]
    """(B prompts, their B*G rollouts) -> (B*G,) the scores the advantages are computed from."""
    draw: Callable[[int, int, int, set[str]], list[dict]]
    """(seed, start, count, excluded prompt ids) -> ``count`` training prompts from position
    ``start`` of the split's permutation by ``seed``, skipping the excluded ones."""


@dataclass
class FillStats:
    """What ``fill_batch`` did at one generation step, summed over all ranks (for ``rollout/`` metrics)."""

    rounds: int = 1
    """Generation rounds (1 = the step's batch sufficed)."""
    generated_groups: int = 0
    """Groups generated over all rounds."""
    kept_groups: int = 0
    """Groups whose scores differ, of ``generated_groups``."""
    filled_groups: int = 0
    """Groups with equal scores trained on because the cap was reached."""
    engine_seconds: list[float] = field(default_factory=list)
    """Each engine's generation seconds in the extra rounds (empty without one)."""
    tokens: int = 0
    """Response tokens all engines generated in the extra rounds."""


def differing_groups(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """(B,) bool: True where a group's G scores are not all equal; ``scores`` is (B*G,) request-major."""
    grouped = scores.reshape(-1, group_size)  # (B, G)
    return grouped.amax(dim=1) > grouped.amin(dim=1)  # (B,)


def fill_batch(
    prompts: list[dict],
    rollouts: list[Rollout],
    dynamic: DynamicSampling,
    comm: GroupComm,
    *,
    generate: Generate,
    draw_seed: Callable[[int], int],
    first_request: int,
) -> tuple[list[dict], list[Rollout], FillStats]:
    """This rank's B prompts and B*G rollouts to train on, and what it took (module docstring).

    Args:
        prompts: this rank's batch (B prompts), generated in round 0.
        rollouts: their B*G rollouts, request-major.
        dynamic: group size, cap, score and draw functions.
        comm: this rank's collectives (every rank calls ``fill_batch``).
        generate: generates an extra round's prompts (collective).
        draw_seed: round -> the seed of its prompt draw (from the run seed and the step).
        first_request: round 0's request count over all ranks (extra rounds are numbered after it).
    """
    B, G = len(prompts), dynamic.group_size
    kept: list[tuple[dict, list[Rollout]]] = []
    dropped: list[tuple[dict, list[Rollout]]] = []
    seen = {prompt_id for ids in comm.all_gather([sample["id"] for sample in prompts]) for prompt_id in ids}
    stats = FillStats()

    def sort(batch: list[dict], batch_rollouts: list[Rollout]) -> None:
        if batch:
            differ = differing_groups(dynamic.scores(batch, batch_rollouts), G).tolist()
            for index, (sample, keep) in enumerate(zip(batch, differ)):
                (kept if keep else dropped).append((sample, batch_rollouts[index * G : (index + 1) * G]))

    sort(prompts, rollouts)
    generated = B
    while True:
        # One collective per round: every rank's (groups missing, kept, generated).
        counts = comm.all_gather((max(B - len(kept), 0), len(kept), generated))
        missing = [count[0] for count in counts]
        stats.kept_groups, stats.generated_groups = sum(c[1] for c in counts), sum(c[2] for c in counts)
        if not any(missing) or stats.rounds > dynamic.max_extra_rounds:
            break
        # Draw what a rank lacks over the step's keep rate so far (at most B): the same on every rank.
        rate = stats.kept_groups / stats.generated_groups
        draws = [min(B, math.ceil(m / rate)) if m and rate > 0 else B if m else 0 for m in missing]
        start = sum(draws[: comm.rank])
        extra = dynamic.draw(draw_seed(stats.rounds), start, draws[comm.rank], seen) if draws[comm.rank] else []
        extra_rollouts, seconds, tokens = generate(extra, first_request)
        first_request += sum(draws)
        seen |= {prompt_id for ids in comm.all_gather([sample["id"] for sample in extra]) for prompt_id in ids}
        stats.engine_seconds = [a + b for a, b in zip(stats.engine_seconds, seconds)] if stats.engine_seconds else seconds
        stats.tokens += tokens
        stats.rounds += 1
        generated += len(extra)
        sort(extra, extra_rollouts)
    # The cap: dropped groups (advantage 0 under a group estimator) keep B groups per rank.
    chosen = kept[:B] + dropped[: max(B - len(kept), 0)]
    stats.filled_groups = sum(missing)
    return [sample for sample, _ in chosen], [r for _, group in chosen for r in group], stats
