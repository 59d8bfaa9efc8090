"""The rollout pipeline without Lightning and without vLLM: ``FakeEngine`` is a real
``RolloutEngine`` in a few lines (each sample drawn from its own seed stream, as vLLM seeds them;
weights a dict that a transaction replaces), so every rule of the pipeline is checked exactly.

One process: the step order (sync before submit, pipelined batches sampled by the older weights),
each rank's rollouts and seeds, the saved state round trip, and the errors. Two gloo processes
(one spawn, FSDP2-sharded policy): one engine (rank 0 gathers every prompt) against one engine
per rank (each rank its own): the same rollouts, both engines loaded with the full weights
gathered once (relayed by rank 0), the checkpoint state complete on rank 0 and restorable under
the other layout.
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from dataclasses import asdict, replace

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from maye_pl.rollout.base import RolloutEngine
from maye_pl.rollout.dynamic_sampling import DynamicSampling
from maye_pl.rollout.group_comm import GroupComm
from maye_pl.rollout.groups import EngineGroups
from maye_pl.rollout.pipeline import RolloutPipeline, split_by_rank
from maye_pl.rollout.seeds import sampling_seed
from maye_pl.types import ResolvedHandle, Rollout, RolloutRequest, SamplingConfig

SAMPLING = SamplingConfig(temperature=1.0, max_tokens=3, n=2)


class FakeEngine:
    """A ``RolloutEngine``: sample k of request i draws 3 tokens from ``sampling_seed(seed, step,
    request_offset + i, k)`` (vLLM's rule); the text is the prompt. Logs what it was asked."""

    def __init__(self) -> None:
        self.weights: dict[str, torch.Tensor] = {}
        self.version = 0  # transactions finished
        self.log: list[tuple] = []

    def submit(self, requests, sampling, *, policy_version=0):
        self.log.append(("submit", sampling.step, [r.prompt for r in requests], sampling.request_offset, self.version))
        return ResolvedHandle(self.generate(requests, sampling, policy_version=policy_version), engine_seconds=0.5)

    def generate(self, requests, sampling, *, policy_version=0):
        rollouts = []
        for i, request in enumerate(requests):
            for k in range(sampling.n):
                stream = torch.Generator().manual_seed(sampling_seed(sampling.seed, sampling.step, sampling.request_offset + i, k))
                tokens = torch.randint(1000, (3,), generator=stream).tolist()
                rollouts.append(Rollout(tokens, request.prompt, "length", [-1.0] * 3, policy_version=policy_version))
        return rollouts

    @contextmanager
    def weight_update(self):
        loaded: dict[str, torch.Tensor] = {}
        yield lambda bucket: loaded.update({name: tensor.clone() for name, tensor in bucket})
        self.weights |= loaded
        self.version += 1
        self.log.append(("sync", self.version))

    def update_weights(self, named_tensors):
        with self.weight_update() as push:
            push(list(named_tensors))

    def shutdown(self) -> None:
        pass


def _prompts(rank: int, step: int, per_rank: int = 2) -> list[dict]:
    return [{"id": f"s{step}-r{rank}-{i}"} for i in range(per_rank)]


def _requests(prompts: list[dict]) -> list[RolloutRequest]:
    return [RolloutRequest(sample["id"]) for sample in prompts]


def _step(pipeline, policy, step, rank=0, last_step=2):
    """Generation step ``step`` of a run of ``last_step + 1`` steps; the optimizer step after it."""
    result = pipeline.rollouts_for_step(
        policy, step, _prompts(rank, step), make_requests=_requests, sampling=SAMPLING, policy_version=step,
        peek=lambda ahead: _prompts(rank, step + ahead) if step + ahead <= last_step else None,
    )
    assert pipeline.queue.take(step, expected=4) == (result.prompts, result.rollouts)
    with torch.no_grad():
        for param in policy.parameters():
            param.add_(1.0)
    pipeline.weights_stale = True
    return result


def _pipeline(engine, max_staleness=0, groups=None):
    return RolloutPipeline(engine, GroupComm(groups or EngineGroups(1)), seed=7, max_staleness=max_staleness,
                           bucket_bytes=64)


def test_the_fake_engine_keeps_the_contract():
    assert isinstance(FakeEngine(), RolloutEngine)


def test_synchronous_steps_sync_then_generate_this_ranks_prompts():
    torch.manual_seed(0)
    engine, policy = FakeEngine(), nn.Linear(4, 3)
    pipeline = _pipeline(engine)
    for step in range(3):
        weights = {name: param.detach().clone() for name, param in policy.named_parameters()}
        result = _step(pipeline, policy, step)
        # Request-major: each prompt's 2 samples in a row; this step's seeds.
        assert [r.text for r in result.rollouts] == [f"s{step}-r0-{i}" for i in (0, 0, 1, 1)]
        expected = FakeEngine().generate(_requests(_prompts(0, step)), SamplingConfig(**{**asdict(SAMPLING), "seed": 7, "step": step}))
        assert [r.token_ids for r in result.rollouts] == [r.token_ids for r in expected]
        assert all(torch.equal(engine.weights[name], weights[name]) for name in weights)  # synced first
        assert result.sync.num_tensors == 2 and result.engine_seconds == [0.5] and result.tokens == 12
    assert [entry[0] for entry in engine.log] == ["sync", "submit"] * 3


def test_pipelined_batches_are_sampled_by_the_weights_before_the_update():
    """max_staleness 1: step 0 submits batches 0 and 1 after the first sync; step 1 syncs (the update
    of step 0) and submits only batch 2; batch 1 was sampled by version 1 of the weights."""
    engine = FakeEngine()
    pipeline, policy = _pipeline(engine, max_staleness=1), nn.Linear(4, 3)
    for step in range(3):
        _step(pipeline, policy, step)
    assert [(e[0], e[1]) if e[0] == "sync" else (e[0], e[1], e[4]) for e in engine.log] == [
        ("sync", 1), ("submit", 0, 1), ("submit", 1, 1), ("sync", 2), ("submit", 2, 2), ("sync", 3)
    ]


def test_saved_state_restores_the_batch_in_flight_exactly():
    policy = nn.Linear(4, 3)
    first = _pipeline(FakeEngine(), max_staleness=1)
    _step(first, policy, 0)
    state = first.state_dict()
    assert list(state["submitted"]) == [1] and len(state["submitted"][1]["rollouts"]) == 4
    assert state["submitted"][1]["engine_seconds"] == [0.5]
    expected = _step(first, policy, 1).rollouts

    engine = FakeEngine()
    resumed = _pipeline(engine, max_staleness=1)
    assert resumed.load_state_dict(json.loads(json.dumps(state)))  # a checkpoint's keys may come back as str
    got = _step(resumed, policy, 1)
    assert got.rollouts == expected and got.engine_seconds == [0.5]
    assert [e[1] for e in engine.log if e[0] == "submit"] == [2]  # batch 1 was not generated again

    # Written before engine groups (one float of seconds): still restores.
    state["submitted"][1]["engine_seconds"] = 0.5
    assert _pipeline(FakeEngine(), max_staleness=1).load_state_dict(state)
    # Written for 2 ranks: nothing is restored, the caller is told.
    state["submitted"][1]["prompt_ids"].append(["s1-r1-0", "s1-r1-1"])
    other = _pipeline(FakeEngine(), max_staleness=1)
    assert not other.load_state_dict(state) and other.queue.submitted == {}


def test_a_batch_peeked_wrongly_is_an_error_naming_the_prompts():
    pipeline, policy = _pipeline(FakeEngine(), max_staleness=1), nn.Linear(4, 3)
    pipeline.rollouts_for_step(policy, 0, _prompts(0, 0), make_requests=_requests, sampling=SAMPLING,
                               policy_version=0, peek=lambda ahead: _prompts(0, 9))
    with pytest.raises(RuntimeError, match=r"generation step 1 are for prompts \['s9-r0-0'.*holds \['s1-r0-0'"):
        _step(pipeline, policy, 1)


# ------------------------------------------------------------------------------ dynamic sampling

# A prompt's group scores differ when its id says "mixed"; "flat" groups score alike (dropped).
DATASET = [f"d{i}-{'mixed' if i % 2 == 0 else 'flat'}" for i in range(12)]


def _scores(prompts, rollouts):
    assert len(rollouts) == SAMPLING.n * len(prompts) and all(r.text == p["id"] for p, r in zip(prompts, rollouts[::2]))
    return torch.tensor([float(k) if "mixed" in p["id"] else 1.0 for p in prompts for k in range(SAMPLING.n)])


def _draw(seed, start, count, exclude):
    order = torch.randperm(len(DATASET), generator=torch.Generator().manual_seed(seed)).tolist()
    allowed = [DATASET[i] for i in order if DATASET[i] not in exclude]
    return [{"id": allowed[(start + i) % len(allowed)]} for i in range(count)]


def _dynamic(max_extra_rounds=3):
    return DynamicSampling(group_size=SAMPLING.n, max_extra_rounds=max_extra_rounds, scores=_scores, draw=_draw)


def _dynamic_step(pipeline, policy, step, rank=0, *, last_step=2, dynamic=None, prompts=None):
    """``_step`` with dynamic sampling; this rank's batch: one "mixed" and one "flat" prompt."""
    batch = lambda s: prompts(rank, s) if prompts else [{"id": f"s{s}-r{rank}-mixed"}, {"id": f"s{s}-r{rank}-flat"}]  # noqa: E731
    result = pipeline.rollouts_for_step(
        policy, step, batch(step), make_requests=_requests, sampling=SAMPLING, policy_version=step,
        peek=lambda ahead: batch(step + ahead) if step + ahead <= last_step else None, dynamic=dynamic or _dynamic(),
    )
    assert pipeline.queue.take(step, expected=4) == (result.prompts, result.rollouts)
    pipeline.weights_stale = True
    return result


def test_dynamic_sampling_replaces_flat_groups_with_extra_rounds():
    engine = FakeEngine()
    pipeline, policy = _pipeline(engine), nn.Linear(4, 3)
    result = _dynamic_step(pipeline, policy, 0)
    # Round 0 kept 1 of 2 groups (rate 1/2): the missing group over that rate = 2 extra prompts,
    # drawn from the (seed, step 0, round 1) permutation; the first "mixed" one fills the batch.
    extra = _draw(sampling_seed(7, 0, 1, 0), 0, 2, {"s0-r0-mixed", "s0-r0-flat"})
    kept = [p["id"] for p in extra if "mixed" in p["id"]]
    assert [p["id"] for p in result.prompts] == ["s0-r0-mixed", kept[0]]
    assert [r.text for r in result.rollouts] == ["s0-r0-mixed"] * 2 + [kept[0]] * 2
    stats = result.refill
    assert (stats.rounds, stats.generated_groups, stats.kept_groups, stats.filled_groups) == (2, 4, 1 + len(kept), 0)
    # The extra round's requests are numbered after round 0's (offset 2): new seed streams.
    assert [(e[1], e[2], e[3]) for e in engine.log if e[0] == "submit"] == [(0, ["s0-r0-mixed", "s0-r0-flat"], 0),
                                                                             (0, [p["id"] for p in extra], 2)]
    assert result.rollouts[2].token_ids == FakeEngine().generate(
        _requests(extra), replace(SAMPLING, seed=7, step=0, request_offset=2))[2 * extra.index({"id": kept[0]})].token_ids
    assert result.tokens == 2 * 2 * 3 + 2 * 2 * 3 and result.engine_seconds == [1.0]  # both rounds


def test_dynamic_sampling_at_the_cap_fills_with_dropped_groups():
    pipeline, policy = _pipeline(FakeEngine()), nn.Linear(4, 3)
    flat = lambda rank, s: [{"id": f"s{s}-r{rank}-flat{i}"} for i in range(2)]  # noqa: E731
    result = _dynamic_step(pipeline, policy, 0, dynamic=_dynamic(max_extra_rounds=0), prompts=flat)
    assert [p["id"] for p in result.prompts] == ["s0-r0-flat0", "s0-r0-flat1"]  # kept none: the batch as it was
    assert (result.refill.rounds, result.refill.kept_groups, result.refill.filled_groups) == (1, 0, 2)
    # No group differs anywhere: a full batch (2 prompts) per round, up to the cap, then fillers.
    global DATASET
    saved, DATASET = DATASET, [f"d{i}-flat" for i in range(12)]
    try:
        result = _dynamic_step(pipeline, policy, 1, dynamic=_dynamic(max_extra_rounds=2), prompts=flat)
    finally:
        DATASET = saved
    assert (result.refill.rounds, result.refill.generated_groups, result.refill.filled_groups) == (3, 6, 2)
    assert [p["id"] for p in result.prompts] == ["s1-r0-flat0", "s1-r0-flat1"]  # dropped groups, generation order


def test_dynamic_sampling_pipelined_runs_extra_rounds_before_the_batch_ahead_and_resumes_exactly():
    engine = FakeEngine()
    pipeline, policy = _pipeline(engine, max_staleness=1), nn.Linear(4, 3)
    _dynamic_step(pipeline, policy, 0)
    # Step 0: sync, batch 0, its extra round (the newest weights), then batch 1 ahead.
    assert [(e[0], e[1]) for e in engine.log] == [("sync", 1), ("submit", 0), ("submit", 0), ("submit", 1)]
    state = pipeline.state_dict()
    expected = _dynamic_step(pipeline, policy, 1)

    resumed = _pipeline(FakeEngine(), max_staleness=1)
    assert resumed.load_state_dict(json.loads(json.dumps(state)))
    got = _dynamic_step(resumed, policy, 1)
    assert (got.prompts, got.rollouts) == (expected.prompts, expected.rollouts) and got.refill == expected.refill


def test_an_engine_on_a_rank_that_does_not_own_one_is_refused():
    with pytest.raises(ValueError, match="rank 0 owns engine 0 of 1 .* but was given no engine"):
        _pipeline(None)


def test_split_by_rank_cuts_rank_major_rollouts():
    rollouts = [Rollout([i], str(i), "stop") for i in range(10)]  # 5 prompts x 2 samples
    assert [[r.text for r in part] for part in split_by_rank(rollouts, [2, 0, 3])] == [
        ["0", "1", "2", "3"], [], ["4", "5", "6", "7", "8", "9"]
    ]


@pytest.mark.parametrize(
    ("layout", "groups", "owners"),
    [
        ((12, 2, 2), [(0, 1, 2), (3, 4, 5), (6, 7, 8), (9, 10, 11)], (0, 3, 6, 9)),  # 2 nodes x (6+2)
        ((7, 1, 2), [(0, 1, 2, 3), (4, 5, 6)], (0, 4)),  # uneven: the first group one rank larger
        ((4, 1, 4), [(0,), (1,), (2,), (3,)], (0, 1, 2, 3)),  # 4+4
        ((7, 1, 1), [tuple(range(7))], (0,)),  # 7+1 (MAYE)
    ],
)
def test_engine_groups_are_contiguous_per_node(layout, groups, owners):
    layout = EngineGroups(*layout)
    assert list(layout.groups) == groups and layout.owners == owners
    assert [layout.group_of(rank) for rank in owners] == list(range(len(owners)))


def test_engine_groups_name_the_impossible_layouts():
    with pytest.raises(ValueError, match=r"`rollout.num_engines`=3 needs a trainer rank per engine .* each node runs 2"):
        EngineGroups(2, 1, 3)
    with pytest.raises(ValueError, match=r"3 ranks do not split evenly over `trainer.num_nodes`=2"):
        EngineGroups(3, 2, 1)
    assert EngineGroups(12, 2, 2).name(3) == "engine 3 of 4 (node 1, ranks 9-11)"


# ------------------------------------------------------------------------------ two processes


def _two_rank_worker(rank: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    results = {}
    saved = None
    for engines in (1, 2):
        torch.manual_seed(0)
        policy = nn.Sequential(nn.Linear(4, 6), nn.Linear(6, 3))
        fully_shard(policy, mesh=init_device_mesh("cpu", (2,)))  # Shard(0) DTensors: rows split over ranks
        comm = GroupComm(EngineGroups(2, 1, engines))
        engine = FakeEngine() if comm.is_owner else None
        pipeline = RolloutPipeline(engine, comm, seed=7, max_staleness=1, bucket_bytes=64)
        steps, in_sync = [], []
        for step in range(3):
            full = {name: param.full_tensor() for name, param in policy.named_parameters()}
            result = _step(pipeline, policy, step, rank)
            steps.append([[r.text, r.token_ids] for r in result.rollouts])
            in_sync.append(engine is None or all(torch.equal(engine.weights[n], t) for n, t in full.items()))
            if step == 0:
                state = pipeline.state_dict()  # every rank calls it; rank 0's is complete
                if engines == 1:
                    saved = state
        evaluated = pipeline.generate(_requests(_prompts(rank, 9)), SamplingConfig(n=2))
        restored = None
        if engines == 2:  # the one-engine checkpoint (after step 0), as every rank reads it, restores step 1
            checkpoint = [saved]
            dist.broadcast_object_list(checkpoint, src=0)
            again = RolloutPipeline(FakeEngine() if comm.is_owner else None, comm, seed=7, max_staleness=1, bucket_bytes=64)
            assert again.load_state_dict(checkpoint[0])
            restored = [[r.text, r.token_ids] for r in _step(again, policy, 1, rank).rollouts]
        log = list(engine.log) if engine else None
        # Dynamic sampling: rank 0 keeps 1 group of its batch, rank 1 none; the ranks agree on rounds.
        flat_on_1 = lambda r, s: [{"id": f"s{s}-r{r}-{'mixed' if r == 0 else 'flat'}"}, {"id": f"s{s}-r{r}-flat"}]  # noqa: E731
        dynamic = [_dynamic_step(pipeline, policy, step, rank, prompts=flat_on_1) for step in (3, 4)]
        results[engines] = {
            "steps": steps, "in_sync": in_sync, "eval": [r.token_ids for r in evaluated], "restored": restored,
            "log": log, "state": state if rank == 0 else None,
            "engine_seconds": result.engine_seconds, "tokens": result.tokens,
            "dynamic": [[[p["id"] for p in d.prompts], [r.token_ids for r in d.rollouts], asdict(d.refill)] for d in dynamic],
        }
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as file:
        json.dump(results, file)
    dist.destroy_process_group()


@pytest.mark.slow
def test_one_engine_per_rank_equals_one_engine_for_all(tmp_path):
    mp.start_processes(_two_rank_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, start_method="spawn")
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    for rank, result in enumerate(ranks):
        one, two = result["1"], result["2"]
        for step in range(3):  # each rank gets its own prompts' rollouts, 2 samples each
            assert [text for text, _ in one["steps"][step]] == [f"s{step}-r{rank}-{i}" for i in (0, 0, 1, 1)]
        # Seeds follow the global request index, not the engine: both layouts draw the same tokens.
        assert one["steps"] == two["steps"] and one["eval"] == two["eval"]
        # Every engine holds the gathered full weights before it generates (rank 1's: relayed by rank 0).
        assert all(two["in_sync"]) and all(one["in_sync"])
        # The one-engine checkpoint restores step 1 exactly under one engine per rank.
        assert two["restored"] == one["steps"][1]
        # Step 2: both engines' 0.5 s, and 4 prompts x 2 samples x 3 tokens from both.
        assert two["engine_seconds"] == [0.5, 0.5] and two["tokens"] == one["tokens"] == 24
    # Dynamic sampling: both layouts draw, generate and keep the same; every rank reports the same
    # global rounds and counts; the ranks' extra prompts are disjoint.
    for step in range(2):
        stats = [ranks[rank][layout]["dynamic"][step][2] for rank in range(2) for layout in ("1", "2")]
        assert all({**s, "engine_seconds": None} == {**stats[0], "engine_seconds": None} for s in stats)
        assert stats[0]["rounds"] >= 2 and stats[0]["kept_groups"] >= 1
        for rank in range(2):
            assert ranks[rank]["1"]["dynamic"][step][:2] == ranks[rank]["2"]["dynamic"][step][:2]
        prompts = [ranks[rank]["1"]["dynamic"][step][0] for rank in range(2)]
        extra = [p for ids in prompts for p in ids if p.startswith("d")]
        assert len(extra) == len(set(extra)) and all(len(ids) == 2 for ids in prompts)
    # One engine: rank 0's engine saw every rank's prompts, offset 0; two: each its own, rank 1 at offset 2.
    submits = [entry for entry in ranks[0]["1"]["log"] if entry[0] == "submit"]
    assert submits[0][2:4] == [["s0-r0-0", "s0-r0-1", "s0-r1-0", "s0-r1-1"], 0]
    assert ranks[1]["1"]["log"] is None
    assert [entry[2:4] for entry in ranks[1]["2"]["log"] if entry[0] == "submit"][0] == [["s0-r1-0", "s0-r1-1"], 2]
    assert [entry[0] for entry in ranks[1]["2"]["log"]].count("sync") == 3  # one transaction per sync
    # Rank 0's saved state holds both ranks' rollouts of batch 1 in rank order, in either layout.
    one_state, two_state = ranks[0]["1"]["state"]["submitted"]["1"], ranks[0]["2"]["state"]["submitted"]["1"]
    assert [r["text"] for r in two_state["rollouts"]] == [f"s1-r{r}-{i}" for r in (0, 1) for i in (0, 0, 1, 1)]
    assert one_state["rollouts"] == two_state["rollouts"] and two_state["engine_seconds"] == [0.5, 0.5]


def test_rollout_settings_collect_every_problem():
    from maye_pl.errors import ConfigError
    from maye_pl.rollout.callback import RolloutCallback

    with pytest.raises(ConfigError) as error:
        RolloutCallback(num_engines=0, tensor_parallel_size=0, device=["cuda:6", "cuda:7"], max_staleness=2,
                        weight_transport="shm")
    lines = str(error.value).splitlines()
    assert lines[0] == "Invalid rollout configuration:" and len(lines) == 6
    assert "`rollout.num_engines`=0 must be at least 1" in lines[1]
    assert "`rollout.device` lists 2 device(s) for `rollout.num_engines`=0" in lines[3]
