"""Sampling seeds (maye_pl/rollout/seeds.py): no two (step, request, sample) of a run share a seed.

Proves: over 100 generation steps plus evaluation calls, 64 requests and 8 samples each, every
seed is distinct (the old rule ``seed + step + request*n + sample`` gave step 1's request 0
sample 0 the seed of step 0's request 0 sample 1); sample k is the request's seed + k, which is how vLLM seeds the k-th sample of an n > 1
request (checked on vLLM's own ParentRequest), and the vLLM engine sends exactly that seed;
out-of-range indices are refused; the HF engine's call seed is the call's first stream.
"""

import pytest

from maye_pl.rollout.seeds import sampling_seed
from maye_pl.types import SamplingConfig


def test_no_two_streams_of_a_run_share_a_seed():
    steps, requests, samples = [None, *range(100)], range(64), range(8)
    for run_seed in (0, -5):
        seeds = {sampling_seed(run_seed, step, request, sample)
                 for step in steps for request in requests for sample in samples}
        assert len(seeds) == len(steps) * len(requests) * len(samples)
        assert all(0 <= seed < 2**63 for seed in seeds)


def test_sample_k_is_the_request_seed_plus_k_and_runs_differ():
    base = sampling_seed(42, 7, 3, 0)
    assert [sampling_seed(42, 7, 3, k) for k in range(5)] == [base + k for k in range(5)]
    assert sampling_seed(43, 7, 3, 0) != base  # the run seed matters
    assert sampling_seed(42, None, 3, 0) != sampling_seed(42, 0, 3, 0)  # evaluation has its own streams


@pytest.mark.parametrize("indices", [(2**23 - 1, 0, 0), (-2, 0, 0), (0, 2**24, 0), (0, 0, 2**16)])
def test_out_of_range_indices_are_refused(indices):
    with pytest.raises(ValueError, match="outside"):
        sampling_seed(0, *indices)


@pytest.mark.vllm
def test_vllm_derives_sample_k_as_seed_plus_k_and_the_engine_sends_stream_zero():
    from vllm import SamplingParams
    from vllm.v1.engine.parallel_sampling import ParentRequest

    from maye_pl.rollout.vllm_requests import GenerationRules, sampling_params

    sampling = SamplingConfig(n=4, seed=11, step=5)
    params = sampling_params(sampling, 9, GenerationRules(stop_ids=[0], banned=[]))
    assert params.seed == sampling_seed(11, 5, 9, 0)
    # An engine serving requests 4.. of the step (another engine drew 0-3): its request 5 is request 9.
    offset = SamplingConfig(n=4, seed=11, step=5, request_offset=4)
    assert sampling_params(offset, 5, GenerationRules(stop_ids=[0], banned=[])).seed == params.seed
    parent = ParentRequest.__new__(ParentRequest)  # only its sampling params matter here
    parent.sampling_params, parent.cached_child_sampling_params = params, None
    children = [parent._get_child_sampling_params(k) for k in range(4)]
    assert isinstance(children[0], SamplingParams)
    assert [child.seed for child in children] == [sampling_seed(11, 5, 9, k) for k in range(4)]
