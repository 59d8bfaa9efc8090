"""HF-engine specifics: batching with left padding changes nothing, seeding leaves the caller's
RNG alone, and unknown parameter names are refused."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from maye_pl.models.loading import load_policy
from maye_pl.rollout.hf_engine import HFEngine
from maye_pl.types import RolloutRequest, SamplingConfig


@pytest.fixture(scope="module")
def hf_engine(tiny_model_dir, tiny_processor):
    return HFEngine(load_policy(tiny_model_dir), tiny_processor)


def _request(processor, question, size=None):
    content = ([{"type": "image"}] if size else []) + [{"type": "text", "text": question}]
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
    )
    return RolloutRequest(prompt, [Image.new("RGB", size, (90, 160, 20))] if size else [])


def test_batched_generation_equals_one_at_a_time(hf_engine, tiny_processor):
    requests = [
        _request(tiny_processor, "Short?", (64, 64)),
        _request(tiny_processor, "A much longer question about the triangle and its angles?"),
        _request(tiny_processor, "Wide?", (112, 84)),
    ]
    greedy = SamplingConfig(temperature=0.0, max_tokens=10)
    batched = hf_engine.generate(requests, greedy)
    for request, rollout in zip(requests, batched):
        (alone,) = hf_engine.generate([request], greedy)
        assert (
            rollout.token_ids == alone.token_ids
            and rollout.prompt_token_ids == alone.prompt_token_ids
        )
        torch.testing.assert_close(
            torch.tensor(rollout.logprobs), torch.tensor(alone.logprobs), atol=1e-4, rtol=0
        )


def test_seeded_sampling_leaves_the_global_rng_alone(hf_engine, tiny_processor):
    request = _request(tiny_processor, "Area?", (64, 64))
    torch.manual_seed(123)
    state = torch.get_rng_state()
    hf_engine.generate([request], SamplingConfig(temperature=1.0, max_tokens=4, n=2, seed=7))
    assert torch.equal(torch.get_rng_state(), state)
    assert hf_engine.model.training  # generate() restores the caller's mode


def test_update_weights_refuses_unknown_names(hf_engine):
    with pytest.raises(
        KeyError, match="'lm_head.bias' is not a parameter of Qwen2_5_VLForConditionalGeneration"
    ):
        hf_engine.update_weights([("lm_head.bias", torch.zeros(3))])
