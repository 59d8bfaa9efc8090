"""The RolloutEngine contract, checked on both engines (HF ``generate`` and vLLM for real) and every
model family: request-major output with seeds, the trainer's prompt ids, the trainer's logprobs
before and after ``update_weights`` (over each weight transport; every parameter perturbed: ViT,
connector incl. Qwen3-VL's DeepStack mergers, LLM), stop tokens, and vision special tokens that are
never sampled.

The vLLM engine of each family is the session's ``family_engine`` (one per family; Qwen3.5 has no
fp32 CPU engine: see ``ENGINE_FAMILIES``)."""

from __future__ import annotations

import pytest
import torch

from maye_pl.models.adapters import ADAPTERS
from maye_pl.models.forward import build_policy_inputs, response_logprobs
from maye_pl.models.loading import load_policy
from maye_pl.rollout.base import RolloutEngine
from maye_pl.rollout.hf_engine import HFEngine
from maye_pl.rollout.vllm_engine import VLLMEngine
from maye_pl.rollout.weight_transport import WEIGHT_TRANSPORTS
from maye_pl.types import SamplingConfig
from conftest import ENGINE_FAMILIES

pytestmark = pytest.mark.parametrize("family", ENGINE_FAMILIES, indirect=True)


@pytest.fixture(scope="module")
def policy(family_model_dir):
    return load_policy(family_model_dir).eval()


@pytest.fixture(scope="module")
def adapter(family):
    return ADAPTERS[family]


@pytest.fixture(
    scope="module",
    params=["hf", pytest.param("vllm", marks=[pytest.mark.vllm, pytest.mark.slow])],
)
def engine(request, family_model_dir, family_processor):
    if request.param == "vllm":
        return request.getfixturevalue("family_engine")
    return HFEngine(load_policy(family_model_dir).eval(), family_processor)


def _score(model, processor, adapter, requests, rollouts, n, temperature):
    """Trainer-side (N, T) logprobs of the engine's responses, the engine's own, and the mask.

    Scored as the trainer does: with the engines' vision-token ban applied to the logits (the
    engines return logprobs of the distribution actually sampled from; the bare random tiny policy
    gives the vision tokens ~0.5% of the mass).
    """
    rows = [request for request in requests for _ in range(n)]
    inputs = build_policy_inputs(
        processor, rows, [r.token_ids for r in rollouts], processor.tokenizer.pad_token_id, adapter=adapter
    )
    with torch.no_grad():
        scored = response_logprobs(
            model, inputs, temperature=temperature, banned_token_ids=adapter.vision_token_ids(processor.tokenizer)
        )
    engine = torch.zeros_like(scored)
    for row, rollout in enumerate(rollouts):
        engine[row, : len(rollout.logprobs)] = torch.tensor(rollout.logprobs)
    return engine, scored, inputs.response_mask


def _steered(policy, up: int, down: int, scale: float = 50.0) -> list[tuple[str, torch.Tensor]]:
    """Final-norm and lm_head weights that make token ``up`` or ``down`` the sure next token.

    The final RMSNorm keeps only hidden unit 0 (weight e0), and the lm_head reads it into two rows:
    logit(up) = +scale * h0, logit(down) = -scale * h0, every other logit 0. Whatever the sign of
    h0, one of the two wins by ~scale nats.
    """
    norm = torch.zeros_like(policy.model.language_model.norm.weight)
    norm[0] = 1.0
    head = torch.zeros_like(policy.lm_head.weight)
    head[up, 0], head[down, 0] = scale, -scale
    return [("model.language_model.norm.weight", norm), ("lm_head.weight", head)]


def test_contract_request_major_and_seeded(engine, family_requests):
    assert isinstance(engine, RolloutEngine)
    sampling = SamplingConfig(temperature=1.0, max_tokens=6, n=3, seed=0)
    rollouts = engine.generate(family_requests, sampling)
    assert len(rollouts) == 9
    for rollout in rollouts:
        assert 1 <= len(rollout.token_ids) <= 6 and len(rollout.logprobs) == len(rollout.token_ids)
        assert rollout.finish_reason in ("stop", "length")
    for i in range(3):  # request i's samples are rows 3i..3i+2
        assert all(
            r.prompt_token_ids == rollouts[3 * i].prompt_token_ids
            for r in rollouts[3 * i : 3 * i + 3]
        )
    assert len({len(r.prompt_token_ids) for r in rollouts[::3]}) == 3
    assert len({tuple(r.token_ids) for r in rollouts[:3]}) > 1  # G samples differ
    again = engine.generate(family_requests, sampling)
    assert [r.token_ids for r in again] == [
        r.token_ids for r in rollouts
    ]  # same seed, same samples
    assert engine.generate([], sampling) == []


def test_prompt_ids_equal_the_trainers(engine, family_processor, adapter, family_requests):
    rollouts = engine.generate(
        family_requests, SamplingConfig(temperature=1.0, max_tokens=2, seed=0)
    )
    pad = family_processor.tokenizer.pad_token_id
    inputs = build_policy_inputs(
        family_processor, family_requests, [r.token_ids for r in rollouts], pad, adapter=adapter
    )
    P = inputs.prompt_length
    for n, rollout in enumerate(rollouts):
        assert (
            rollout.prompt_token_ids
            == inputs.input_ids[n, :P][inputs.attention_mask[n, :P].bool()].tolist()
        )
    # Each placeholder expanded exactly once: 4 tokens for the 64 px image, 12 for the 112x84 one.
    image_pad = family_processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert [r.prompt_token_ids.count(image_pad) for r in rollouts] == [4, 0, 12]


def test_logprobs_equal_the_trainers_before_and_after_update(
    engine, family_model_dir, family_processor, adapter, policy, family_requests
):
    """After a weight update the engine samples with the new weights exactly (<= 1e-4 in fp32),
    over every weight transport the engine has (vLLM: collective broadcast and pipe)."""
    sampling = SamplingConfig(temperature=0.7, max_tokens=12, n=2, seed=3)
    before = engine.generate(family_requests, sampling)
    engine_lp, scored, _ = _score(policy, family_processor, adapter, family_requests, before, 2, 0.7)
    torch.testing.assert_close(engine_lp, scored, atol=1e-4, rtol=0)

    perturbed = load_policy(family_model_dir).eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in perturbed.parameters():  # every parameter: ViT, connector and LLM
            param.add_(0.05 * torch.randn(param.shape, generator=generator))
    transports = WEIGHT_TRANSPORTS if isinstance(engine, VLLMEngine) else (None,)
    for transport in transports:
        if transport is not None:
            engine.set_weight_transport(transport)
        try:
            engine.update_weights(perturbed.named_parameters())
            after = engine.generate(family_requests, sampling)
            engine_lp, scored, mask = _score(perturbed, family_processor, adapter, family_requests, after, 2, 0.7)
            torch.testing.assert_close(engine_lp, scored, atol=1e-4, rtol=0)
            _, scored_by_old, _ = _score(policy, family_processor, adapter, family_requests, after, 2, 0.7)
            assert (engine_lp - scored_by_old)[mask].abs().max() > 1e-2  # the update landed
        finally:
            engine.update_weights(policy.named_parameters())  # engines are shared: restore
    if transports != (None,):
        engine.set_weight_transport("collective")
    assert [r.token_ids for r in engine.generate(family_requests, sampling)] == [
        r.token_ids for r in before
    ]


def test_stop_tokens_end_responses(engine, family_processor, policy, family_requests):
    im_end, endoftext = family_processor.tokenizer.convert_tokens_to_ids(
        ["<|im_end|>", "<|endoftext|>"]
    )
    try:
        engine.update_weights(_steered(policy, im_end, endoftext))  # only 2 of the tensors
        for temperature in (0.0, 1.0):
            for rollout in engine.generate(
                family_requests, SamplingConfig(temperature=temperature, max_tokens=8, seed=0)
            ):
                assert (
                    rollout.token_ids in ([im_end], [endoftext]) and rollout.finish_reason == "stop"
                )
                assert rollout.text == ""
    finally:
        engine.update_weights(policy.named_parameters())
    long = engine.generate(family_requests[:1], SamplingConfig(temperature=0.0, max_tokens=8))[0]
    assert len(long.token_ids) == 8 and long.finish_reason == "length"


def test_vision_tokens_are_never_sampled(engine, family_processor, adapter, policy, family_requests):
    image_pad, video_pad = family_processor.tokenizer.convert_tokens_to_ids(
        ["<|image_pad|>", "<|video_pad|>"]
    )
    banned = set(adapter.vision_token_ids(family_processor.tokenizer))
    try:
        engine.update_weights(
            _steered(policy, image_pad, video_pad)
        )  # a vision token is every argmax
        for sampling in (
            SamplingConfig(temperature=0.0, max_tokens=16),
            SamplingConfig(temperature=1.5, max_tokens=16, n=8, seed=0),
        ):
            sampled = {
                token
                for rollout in engine.generate(family_requests, sampling)
                for token in rollout.token_ids
            }
            assert sampled and not banned & sampled
    finally:
        engine.update_weights(policy.named_parameters())
