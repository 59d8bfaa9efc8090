"""The rollout pipeline: each rank's prompts in, its rollouts out, the engines kept in step with
the policy. Lightning-free: ``RolloutCallback`` drives it from its hooks, tests from a loop.

Per generation step k (``rollouts_for_step``), on every rank:

    1. wait     for what the engines still generate (batch k, submitted a step ago): it keeps the
                weights it was submitted with, and waiting first times the wait and the sync apart
    2. sync     stale weights into every engine, one transaction per engine (``sync_weights``)
    3. submit   batch k unless it is in flight: each group's ranks send their prompts to the
                group's owner, which queues them in its engine in one call
    4. resolve  batch k: each owner waits for its engine and sends each rank of its group its own
                rollouts
    5. refill   (DAPO's dynamic sampling, ``dynamic_sampling.fill_batch``) groups whose scores are
                all equal are dropped and more prompts are generated in extra rounds
    6. ahead    batches k+1 .. k + max_staleness not yet in flight are submitted (after the extra
                rounds, which would otherwise wait behind them); batch k's prompts and rollouts go
                into the ``RolloutQueue`` the module takes them from

Engines and rank groups: ``groups.EngineGroups`` (K contiguous groups per node, each group's first
rank owns the group's engine; one engine = one group of all ranks). Seeds: an engine's call
carries ``SamplingConfig.request_offset``, the index of its first request among all ranks'
requests of the step (extra rounds continue the count), so every sample's stream is (seed, step,
global request, sample), whichever engine draws it.

Saved state (``state_dict``): the batches submitted ahead that no step has trained on yet,
resolved and gathered to global rank 0, so that a resumed run trains on exactly the rollouts the
uninterrupted run would have: they were sampled by weights that no checkpoint holds any more.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace
from functools import partial
from itertools import accumulate
from typing import Any

from torch import nn

from maye_pl.rollout.base import RolloutEngine
from maye_pl.rollout.dynamic_sampling import DynamicSampling, FillStats, fill_batch
from maye_pl.rollout.group_comm import GroupComm
from maye_pl.rollout.queue import RolloutQueue, Submission
from maye_pl.rollout.seeds import sampling_seed
from maye_pl.strategies.weight_sync import SyncStats, WeightSyncPlan, sync_weights
from maye_pl.types import ResolvedHandle, Rollout, RolloutRequest, SamplingConfig


@dataclass(frozen=True)
class StepRollouts:
    """What ``rollouts_for_step`` did for one generation step (for the ``perf/`` metrics)."""

    prompts: list[dict]
    """This rank's B prompts trained on: the step's batch, or with dynamic sampling its kept groups'
    prompts and the extra rounds' (also put in the queue)."""
    rollouts: list[Rollout]
    """This rank's N = B*G rollouts of ``prompts``, request-major (also put in the queue)."""
    wait_s: float
    """Seconds this rank waited for rollouts (steps 1 and 4)."""
    engine_seconds: list[float]
    """Each engine's generation seconds for the step, where known (restored rollouts may not say)."""
    tokens: int
    """Response tokens all engines generated for the step."""
    sync: SyncStats | None
    """The weight sync of step 2, None when the weights were fresh."""
    refill: FillStats | None = None
    """Dynamic sampling's rounds and groups (step 5), None without it."""


class RolloutPipeline:
    """Submit ahead, resolve, gather/scatter per engine group, sync, and the queue's saved state.

    Args:
        engine: this rank's engine when it owns its group's (``comm.is_owner``), else None.
        comm: this rank's engine group and its collectives.
        seed: the run's sampling seed (``rollout.seed``).
        max_staleness: batches generated ahead of the one trained on (0 or 1).
        bucket_bytes: the most bytes of full weights gathered at once in a sync.
    """

    def __init__(self, engine: RolloutEngine | None, comm: GroupComm, *, seed: int, max_staleness: int,
                 bucket_bytes: int) -> None:
        if (engine is not None) != comm.is_owner:
            raise ValueError(
                f"RolloutPipeline: rank {comm.rank} {'owns' if comm.is_owner else 'does not own'} "
                f"{comm.groups.name(comm.group)} but was given {'no' if engine is None else 'an'} engine."
            )
        self.engine = engine
        self.comm = comm
        self.seed = seed
        self.max_staleness = max_staleness
        self.bucket_bytes = bucket_bytes
        self.queue = RolloutQueue()
        self.plan = WeightSyncPlan()  # one per run and engine set, on every rank
        self.weights_stale = True  # the engines start from the checkpoint directory, not the policy

    # ------------------------------------------------------------------ weights

    def sync_weights(self, policy: nn.Module) -> SyncStats | None:
        """If the policy changed since the last sync, stream it into every engine; all ranks call.

        The ranks gather the policy bucket by bucket onto global rank 0 (once, however many engines),
        which relays each full tensor to the other engine owners; every owner pushes each bucket
        into its engine: one transaction per engine (one finalize and cache reset per sync), frozen
        parameters on the first sync only. An owner's transaction has finished when its call
        returns, before it submits anything new, so every engine samples the next batch with the
        new weights. Returns None when nothing was stale.
        """
        if not self.weights_stale:
            return None
        with self.engine.weight_update() if self.engine is not None else nullcontext() as push:
            stats = sync_weights(policy, push, bucket_bytes=self.bucket_bytes, plan=self.plan, relay=self.comm.relay)
        self.weights_stale = False
        return stats

    # ------------------------------------------------------------------ training

    def rollouts_for_step(
        self,
        policy: nn.Module,
        step: int,
        prompts: list[dict],
        *,
        make_requests: Callable[[list[dict]], list[RolloutRequest]],
        sampling: SamplingConfig,
        policy_version: int,
        peek: Callable[[int], list[dict] | None],
        dynamic: DynamicSampling | None = None,
    ) -> StepRollouts:
        """This rank's rollouts of generation step ``step`` (see the module docstring's steps).

        Args:
            policy: the trained model (synced into the engines when stale).
            step: the generation step about to train.
            prompts: this rank's batch of the step (samples with an ``"id"``).
            make_requests: prompts -> one ``RolloutRequest`` each.
            sampling: the training sampling settings (seed, step and offset are set here).
            policy_version: optimizer steps taken, stamped on what is submitted now.
            peek: ``peek(a)`` is this rank's batch ``a`` steps ahead, None past the run's end.
            dynamic: DAPO's dynamic sampling (step 5); None keeps every group.
        """
        # Step 1 - wait: batch k, submitted a step ago, samples with the weights it was sent with.
        start = time.perf_counter()
        for submission in self.queue.submitted.values():
            if submission.handle is not None:
                submission.handle.result()
        wait_s = time.perf_counter() - start
        # Step 2 - sync: the engines get the newest weights before anything new is submitted.
        sync = self.sync_weights(policy)
        # Step 3 - submit: batch k, unless in flight (submitted a step ago, or restored).
        if step not in self.queue.submitted:
            self.submit(step, prompts, make_requests(prompts), sampling, policy_version)
        # Step 4 - resolve: each owner waits for its engine, each rank gets its own share.
        start = time.perf_counter()
        rollouts, engine_seconds, tokens = self._resolve(self.queue.submitted.pop(step), step, prompts)
        wait_s += time.perf_counter() - start
        # Step 5 - refill: drop the groups whose scores are all equal, generate more in extra rounds.
        refill = None
        if dynamic is not None:
            start = time.perf_counter()
            first_request = sum(self.comm.all_gather(len(prompts)))  # round 0's requests, all ranks
            send = partial(self._send, step, sampling=sampling, policy_version=policy_version)
            prompts, rollouts, refill = fill_batch(
                prompts, rollouts, dynamic, self.comm,
                generate=lambda extra, request: self._resolve(send(extra, make_requests(extra), request), step, extra),
                draw_seed=lambda round_: sampling_seed(self.seed, step, round_, 0), first_request=first_request,
            )
            wait_s += time.perf_counter() - start
            if len(refill.engine_seconds) == len(engine_seconds):  # each engine's time over all rounds
                engine_seconds = [a + b for a, b in zip(engine_seconds, refill.engine_seconds)]
            tokens += refill.tokens
        # Step 6 - ahead: batches k+1 .. k+s not already in flight, behind the extra rounds.
        for ahead in range(1, self.max_staleness + 1):
            batch = None if step + ahead in self.queue.submitted else peek(ahead)
            if batch is not None:  # None: in flight, or the run ends before that batch
                self.submit(step + ahead, batch, make_requests(batch), sampling, policy_version)
        self.queue.put_ready(step, prompts, rollouts)
        return StepRollouts(prompts, rollouts, wait_s, engine_seconds, tokens, sync, refill)

    def submit(self, step: int, prompts: list[dict], requests: list[RolloutRequest], sampling: SamplingConfig,
               policy_version: int) -> None:
        """Queue generation step ``step``'s prompts in the engines; returns at once. All ranks call."""
        self.queue.submitted[step] = self._send(step, prompts, requests, sampling=sampling, policy_version=policy_version)

    def _send(self, step: int, prompts: list[dict], requests: list[RolloutRequest], first_request: int = 0, *,
              sampling: SamplingConfig, policy_version: int) -> Submission:
        """Every rank's ``prompts`` to its group's owner, queued in its engine as requests
        ``first_request``, ... of the step (numbered over all ranks); returns at once. All ranks call."""
        prompt_ids = self.comm.all_gather([sample["id"] for sample in prompts])  # every rank's, rank order
        gathered = self.comm.gather_to_owner(requests)
        handle = None
        if self.engine is not None:
            offset = first_request + sum(len(ids) for ids in prompt_ids[: self.comm.owner])  # the ranks before
            call = replace(sampling, seed=self.seed, step=step, request_offset=offset)
            mine = [r for part in gathered for r in part]
            handle = self.engine.submit(mine, call, policy_version=policy_version) if mine else ResolvedHandle([], 0.0)
        return Submission(prompt_ids, handle)

    def _resolve(self, submission: Submission, step: int, prompts: list[dict]) -> tuple[list[Rollout], list[float], int]:
        """(this rank's rollouts of ``submission``, each engine's seconds where known, all engines' tokens)."""
        ids = [sample["id"] for sample in prompts]
        if submission.prompt_ids[self.comm.rank] != ids:
            raise RuntimeError(
                f"rollout pipeline: the rollouts submitted ahead for generation step {step} are for prompts "
                f"{submission.prompt_ids[self.comm.rank][:4]}..., but the batch trained on holds {ids[:4]}...; the "
                "data module's peek_train_batch must return what the training loader yields next (or set "
                "`rollout.max_staleness` 0)."
            )
        parts = None
        if self.engine is not None:
            rollouts = submission.handle.result()  # the engine's seconds are known once resolved
            tokens = sum(len(rollout.token_ids) for rollout in rollouts)
            counts = [len(submission.prompt_ids[rank]) for rank in self.comm.ranks]
            parts = [(part, submission.handle.engine_seconds, tokens) for part in split_by_rank(rollouts, counts)]
        rollouts, seconds, tokens = self.comm.scatter_from_owner(parts)
        per_engine = [(seconds, tokens)]
        if self.comm.groups.num_engines > 1:
            owners = self.comm.all_gather((seconds, tokens) if self.engine is not None else None)
            per_engine = [measured for measured in owners if measured is not None]
        return rollouts, [s for s, _ in per_engine if s], sum(t for _, t in per_engine)

    # ------------------------------------------------------------------ evaluation

    def generate(self, requests: list[RolloutRequest], sampling: SamplingConfig) -> list[Rollout]:
        """This rank's rollouts of ``requests``: each engine generates its group's requests in one
        call (seeded with the run's seed), each rank gets its own back. All ranks call."""
        offset = 0
        if self.comm.groups.num_engines > 1:
            offset = sum(self.comm.all_gather(len(requests))[: self.comm.owner])
        gathered = self.comm.gather_to_owner(requests)
        parts = None
        if self.engine is not None:
            call = replace(sampling, seed=self.seed, request_offset=offset)
            rollouts = self.engine.generate([r for part in gathered for r in part], call)
            parts = split_by_rank(rollouts, [len(part) for part in gathered])
        return self.comm.scatter_from_owner(parts)

    # ------------------------------------------------------------------ saved state

    def state_dict(self) -> dict[str, Any]:
        """The submitted, unused batches with every engine's rollouts, resolved (waits for those
        still generating). Every rank must call it (Lightning dumps a checkpoint on every rank);
        global rank 0's state is the complete one, the one a checkpoint keeps."""
        mine = {
            step: ([asdict(rollout) for rollout in submission.handle.result()], submission.handle.engine_seconds)
            for step, submission in self.queue.submitted.items()
            if submission.handle is not None
        }
        # (The engine seconds are read after result(): known once the rollouts are in.)
        owners = [mine] if self.engine is not None else []  # one engine: global rank 0's
        if self.comm.groups.num_engines > 1:
            gathered = self.comm.gather_to_zero(mine)
            owners = [gathered[rank] for rank in self.comm.groups.owners] if gathered is not None else []
        complete = len(owners) == self.comm.groups.num_engines
        return {
            "submitted": {
                step: {
                    "prompt_ids": submission.prompt_ids,
                    "rollouts": [r for owner in owners for r in owner[step][0]] if complete else None,
                    "engine_seconds": [owner[step][1] for owner in owners] if complete else None,
                }
                for step, submission in sorted(self.queue.submitted.items())
            }
        }

    def load_state_dict(self, state: dict[str, Any]) -> bool:
        """Restore the batches in flight at the checkpoint; False (and nothing restored) when they
        were generated for another number of ranks: the run then generates them again."""
        self.queue.clear()
        groups = self.comm.groups
        for step, saved in state.get("submitted", {}).items():
            counts = [len(ids) for ids in saved["prompt_ids"]]
            if len(counts) != groups.world_size:
                self.queue.clear()
                return False
            handle = None
            if self.engine is not None:
                if saved["rollouts"] is None:
                    raise ValueError(
                        f"the checkpoint's rollout state for generation step {step} holds no rollouts (it was not "
                        "written by global rank 0); resume from a checkpoint written by maye_pl."
                    )
                n = len(saved["rollouts"]) // sum(counts)  # samples per prompt
                start = sum(counts[: self.comm.owner]) * n
                mine = saved["rollouts"][start : start + sum(counts[r] for r in self.comm.ranks) * n]
                seconds = saved.get("engine_seconds")
                seconds = [seconds] if not isinstance(seconds, list) else seconds  # one float before engine groups
                own = seconds[self.comm.group] if len(seconds) == groups.num_engines else None
                handle = ResolvedHandle([Rollout(**rollout) for rollout in mine], engine_seconds=own)
            self.queue.submitted[int(step)] = Submission(saved["prompt_ids"], handle)
        return True


def split_by_rank(rollouts: list[Rollout], prompts_per_rank: list[int]) -> list[list[Rollout]]:
    """Rank-major rollouts (request-major within a rank, the same n per prompt) cut into each rank's share."""
    n, rest = divmod(len(rollouts), max(sum(prompts_per_rank), 1))
    if rest:
        raise RuntimeError(f"{len(rollouts)} rollouts do not divide over {sum(prompts_per_rank)} prompts.")
    ends = list(accumulate(count * n for count in prompts_per_rank))
    return [rollouts[end - count * n : end] for count, end in zip(prompts_per_rank, ends)]
