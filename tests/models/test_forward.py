"""The trainer-side forward, for every model family: padding layout, response logprobs equal an
unpadded per-row forward, chunking and row selection (vision inputs re-sliced through the family's
adapter) change nothing, M-RoPE needs ``mm_token_type_ids``, and the compute switches (token
budgets, one prompt pass per group, packed rows) give the padded path's log-probs and gradients."""

from __future__ import annotations

import copy
import importlib.util
from functools import partial
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from maye_pl.models import forward
from maye_pl.models.adapters import ADAPTERS
from maye_pl.models.forward import ResponseScorer, build_policy_inputs, response_logprobs, select_rows
from maye_pl.models.packing import packs_rows
from maye_pl.models.prefix_cache import PrefixCache
from maye_pl.models.loading import load_policy
from maye_pl.types import RolloutRequest

TEMPERATURE = 0.7


@pytest.fixture(scope="module")
def policy(family_model_dir):
    return load_policy(family_model_dir).eval()


@pytest.fixture(scope="module")
def adapter(family):
    return ADAPTERS[family]


def _chat(processor, question: str, with_image: bool) -> str:
    content = ([{"type": "image"}] if with_image else []) + [{"type": "text", "text": question}]
    return processor.apply_chat_template(
        [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
    )


@pytest.fixture(scope="module")
def rows(family_processor):
    """Five rows: an image prompt x2 samples, a text-only prompt x2, a larger image prompt x1."""
    square = RolloutRequest(
        _chat(family_processor, "What is the area?", True),
        [Image.new("RGB", (64, 64), (200, 10, 10))],
    )
    text = RolloutRequest(_chat(family_processor, "Solve for x: 3x + 7 = 22, then check it.", False))
    wide = RolloutRequest(
        _chat(family_processor, "Angle?", True), [Image.new("RGB", (112, 84), (0, 100, 10))]
    )
    requests = [square, square, text, text, wide]
    responses = [[5, 6, 7], [8, 9], [10, 11, 12, 13], [14], [15, 16, 17, 18, 19, 20]]
    return requests, responses


def _reference_logprobs(model, processor, request, response, *, with_mm_types=True):
    """One row, no padding, full logits: the plain computation the batched path must match."""
    enc = processor(text=[request.prompt], images=request.images or None, return_tensors="pt")
    ids = torch.tensor([response])
    kwargs = dict(enc)
    kwargs["input_ids"] = torch.cat([enc["input_ids"], ids], 1)
    kwargs["attention_mask"] = torch.ones_like(kwargs["input_ids"])
    kwargs["mm_token_type_ids"] = torch.cat([enc["mm_token_type_ids"], torch.zeros_like(ids)], 1)
    if not with_mm_types:
        del kwargs["mm_token_type_ids"]
    logits = model(**kwargs).logits[0, enc["input_ids"].shape[1] - 1 : -1].float() / TEMPERATURE
    return torch.log_softmax(logits, -1).gather(-1, ids.T)[:, 0]


def test_layout_left_pads_prompts_and_right_pads_responses(family_processor, rows, adapter):
    requests, responses = rows
    pad = family_processor.tokenizer.pad_token_id
    inputs = build_policy_inputs(family_processor, requests, responses, pad, adapter=adapter)
    P, T = inputs.prompt_length, 6
    assert inputs.input_ids.shape == (5, P + T) and inputs.response_ids.shape == (5, T)
    assert inputs.images_per_row.tolist() == [1, 1, 0, 0, 1]
    # Patch 14 (Qwen2/2.5-VL): 64x64 -> 56x56 -> 4x4 patches; 112 wide x 84 high -> 6 rows x 8 columns.
    # Patch 16 (Qwen3-VL): 64x64 -> 4x4 patches; 112x84 -> 128x96 (multiples of 32) -> 6 x 8.
    assert inputs.image_grid_thw.tolist() == [[1, 4, 4], [1, 4, 4], [1, 6, 8]]
    assert inputs.pixel_values.shape[0] == 16 + 16 + 48
    for n, response in enumerate(responses):
        assert inputs.input_ids[n, P : P + len(response)].tolist() == response
        assert inputs.response_mask[n].tolist() == [True] * len(response) + [False] * (
            T - len(response)
        )
        assert inputs.attention_mask[n, P:].tolist() == inputs.response_mask[n].long().tolist()
        prompt = family_processor(text=[requests[n].prompt], images=requests[n].images or None)[
            "input_ids"
        ][0]
        assert inputs.input_ids[n, P - len(prompt) : P].tolist() == list(prompt)
        assert inputs.attention_mask[n, : P - len(prompt)].sum() == 0  # left padding
    image_pad = family_processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert torch.equal(inputs.mm_token_type_ids == 1, inputs.input_ids == image_pad)


def test_logprobs_match_unpadded_rows_for_any_chunking(policy, family_processor, rows, adapter):
    requests, responses = rows
    inputs = build_policy_inputs(
        family_processor, requests, responses, family_processor.tokenizer.pad_token_id, adapter=adapter
    )
    with torch.no_grad():
        whole = response_logprobs(policy, inputs, temperature=TEMPERATURE)
        for n, (request, response) in enumerate(zip(requests, responses)):
            reference = _reference_logprobs(policy, family_processor, request, response)
            torch.testing.assert_close(whole[n, : len(response)], reference, atol=1e-5, rtol=0)
            assert whole[n, len(response) :].abs().sum() == 0
        for forward_batch_size in (1, 2, 4):
            chunked = response_logprobs(
                policy, inputs, temperature=TEMPERATURE, forward_batch_size=forward_batch_size
            )
            torch.testing.assert_close(chunked, whole, atol=1e-5, rtol=0)


# Without mm_token_type_ids, transformers 5.19's Qwen2-VL, Qwen3-VL and Qwen3.5 refuse image rows;
# Qwen2.5-VL silently gives image tokens 1-D positions (other logits than the engine's).
REFUSES_IMAGE_ROWS_WITHOUT_TYPES = {"qwen2_vl", "qwen3_vl", "qwen3_5"}


def test_mm_token_type_ids_are_needed_for_image_rows(family, policy, family_processor, rows):
    requests, responses = rows
    with torch.no_grad():
        with_types = _reference_logprobs(policy, family_processor, requests[0], responses[0])
        if family in REFUSES_IMAGE_ROWS_WITHOUT_TYPES:
            with pytest.raises(ValueError, match="`mm_token_type_ids` is missing"):
                _reference_logprobs(policy, family_processor, requests[0], responses[0], with_mm_types=False)
        else:
            without = _reference_logprobs(
                policy, family_processor, requests[0], responses[0], with_mm_types=False
            )
            assert (with_types - without).abs().max() > 1e-2  # 1-D positions for image tokens
        text_with = _reference_logprobs(policy, family_processor, requests[2], responses[2])
        text_without = _reference_logprobs(
            policy, family_processor, requests[2], responses[2], with_mm_types=False
        )
    torch.testing.assert_close(text_with, text_without)  # text-only rows do not care


def test_select_rows_reslices_vision_inputs(policy, family_processor, rows, adapter):
    requests, responses = rows
    pad = family_processor.tokenizer.pad_token_id
    inputs = build_policy_inputs(family_processor, requests, responses, pad, adapter=adapter)
    picked = [4, 2, 0]
    subset = select_rows(inputs, picked)
    direct = build_policy_inputs(
        family_processor, [requests[i] for i in picked], [responses[i] for i in picked], pad, adapter=adapter
    )
    assert torch.equal(subset.pixel_values, direct.pixel_values)
    assert torch.equal(subset.image_grid_thw, direct.image_grid_thw)
    assert subset.images_per_row.tolist() == [1, 0, 1]
    text_only = select_rows(inputs, slice(2, 4))
    assert text_only.pixel_values is None and text_only.image_grid_thw is None
    with torch.no_grad():
        whole = response_logprobs(policy, inputs, temperature=TEMPERATURE)
        torch.testing.assert_close(
            response_logprobs(policy, subset, temperature=TEMPERATURE),
            whole[picked],
            atol=1e-5,
            rtol=0,
        )
        torch.testing.assert_close(
            response_logprobs(policy, text_only, temperature=TEMPERATURE),
            whole[2:4],
            atol=1e-5,
            rtol=0,
        )


def test_gradients_are_finite_and_entropy_is_masked(policy, family_processor, rows, adapter):
    requests, responses = rows
    inputs = build_policy_inputs(
        family_processor, requests, responses, family_processor.tokenizer.pad_token_id, adapter=adapter
    )
    policy.zero_grad()
    logprobs, entropy = response_logprobs(
        policy, inputs, temperature=TEMPERATURE, forward_batch_size=2, return_entropy=True
    )
    assert logprobs.requires_grad
    logprobs.sum().backward()
    grads = [p.grad for p in policy.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert policy.lm_head.weight.grad.abs().sum() > 0
    assert (entropy[inputs.response_mask] > 0).all() and entropy[
        ~inputs.response_mask
    ].abs().sum() == 0
    policy.zero_grad()


def test_rejects_vision_tokens_in_responses_and_mismatched_lengths(family_processor, rows, adapter):
    requests, responses = rows
    pad = family_processor.tokenizer.pad_token_id
    image_pad = family_processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    with pytest.raises(
        ValueError, match=r"response row 1 contains vision placeholder token id\(s\) \[\d+\]"
    ):
        build_policy_inputs(family_processor, requests[:2], [[5], [6, image_pad]], pad, adapter=adapter)
    with pytest.raises(ValueError, match="2 requests but 1 responses"):
        build_policy_inputs(family_processor, requests[:2], [[5]], pad, adapter=adapter)


def _budget(inputs) -> int:
    """A token budget that puts 2-3 of the fixture's rows in a micro-batch (and some alone)."""
    lengths = inputs.lengths()
    return int(2 * (lengths.prompt + lengths.response).max())


def test_compute_switches_give_the_padded_logprobs(family, policy, family_processor, rows, adapter, monkeypatch):
    """Token budgets, one prompt pass per group and packed rows score every token as the padded
    rows do (fp32: within 1e-5)."""
    requests, responses = rows
    inputs = build_policy_inputs(family_processor, requests, responses, family_processor.tokenizer.pad_token_id,
                                 adapter=adapter)
    banned = adapter.vision_token_ids(family_processor.tokenizer)
    score = partial(response_logprobs, policy, inputs, temperature=TEMPERATURE, banned_token_ids=banned)
    budget = _budget(inputs)
    with torch.no_grad():
        padded = score(forward_batch_size=2)
        for switches in (dict(max_tokens_per_micro_batch=budget), dict(dedup_group_prompts=True),
                         dict(dedup_group_prompts=True, max_tokens_per_micro_batch=budget // 2)):
            torch.testing.assert_close(score(**switches), padded, atol=1e-5, rtol=0, msg=str(switches))
        if family != "qwen3_5":  # its Gated DeltaNet layers would carry state across packed rows
            # Packed rows are flash-attention's layout; on the CPU sdpa masks them block-diagonally.
            monkeypatch.setattr(forward, "packs_rows", lambda model: True)
            torch.testing.assert_close(score(max_tokens_per_micro_batch=budget), padded, atol=1e-5, rtol=0)


def test_packing_needs_flash_attention_and_full_attention(family, policy):
    assert not packs_rows(policy)  # sdpa
    flash = copy.deepcopy(policy.config)
    flash._attn_implementation = "flash_attention_2"
    assert packs_rows(SimpleNamespace(config=flash)) == (family != "qwen3_5")


def test_shared_prompt_gradients_equal_padded_under_checkpointing(family, family_model_dir, family_processor, rows, adapter):
    """The update's path: micro-batches backpropagated one by one, then the shared prompts once
    (``ResponseScorer.backward``), under HF gradient checkpointing (each layer replayed with the
    prompt cache); every parameter (ViT included) gets the padded path's gradient."""
    requests, responses = rows
    inputs = build_policy_inputs(family_processor, requests, responses, family_processor.tokenizer.pad_token_id,
                                 adapter=adapter)
    policy = load_policy(family_model_dir)  # train mode, every part trainable
    policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    weights = torch.linspace(-1.0, 1.0, inputs.response_ids.numel()).reshape(inputs.response_ids.shape)

    def gradients(**switches) -> dict[str, torch.Tensor]:
        policy.zero_grad()
        scorer = ResponseScorer(policy, inputs, temperature=TEMPERATURE, count=2, **switches)
        for micro_rows in scorer.micro_batches:
            (scorer.logprobs(micro_rows) * weights[micro_rows]).sum().backward()
        scorer.backward()
        return {name: p.grad.clone() for name, p in policy.named_parameters() if p.grad is not None}

    padded = gradients()
    flat = torch.cat([g.flatten() for g in padded.values()])
    for switches in (dict(dedup_group_prompts=True), dict(dedup_group_prompts=True, max_tokens_per_micro_batch=_budget(inputs))):
        shared = gradients(**switches)
        assert shared.keys() == padded.keys() == {n for n, _ in policy.named_parameters()}
        difference = torch.cat([(shared[k] - padded[k]).flatten() for k in padded]).norm() / flat.norm()
        assert difference < 1e-5, (switches, float(difference))


def test_prefix_cache_refuses_sliding_window_layers(policy):
    config = copy.deepcopy(policy.config.get_text_config())
    config.layer_types = ["sliding_attention"] * config.num_hidden_layers
    with pytest.raises(ValueError, match=r"layer types \['sliding_attention'\] .* set `model.dedup_group_prompts` false"):
        PrefixCache.recorder(config)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or importlib.util.find_spec("flash_attn") is None,
                    reason="needs a CUDA GPU and flash-attn")
def test_flash_attention_packs_rows_like_the_padded_path(family, family_model_dir, family_processor, rows, adapter):
    """On a GPU node (``pytest -m gpu``): flash-attention 2 in bf16 packs the rows (cu_seq_lens, 3-D
    M-RoPE positions per row), and the packed, the shared-prompt and the padded paths are each as close
    to an fp32 sdpa reference as bf16 rounding allows: a wrong position or a row attending across a
    boundary would cost far more (MAYE's 1-D positions: 0.06 nats per image-row token)."""
    requests, responses = rows
    inputs = build_policy_inputs(family_processor, requests, responses, family_processor.tokenizer.pad_token_id,
                                 adapter=adapter).to("cuda")
    banned = adapter.vision_token_ids(family_processor.tokenizer)
    reference_model = load_policy(family_model_dir).cuda().eval()
    flash = load_policy(family_model_dir, dtype="bfloat16", attn_implementation="flash_attention_2").cuda().eval()
    assert packs_rows(flash) == (family != "qwen3_5")
    with torch.no_grad():
        reference = response_logprobs(reference_model, inputs, temperature=TEMPERATURE, banned_token_ids=banned)
        score = partial(response_logprobs, flash, inputs, temperature=TEMPERATURE, banned_token_ids=banned)
        padded = score(forward_batch_size=2)  # rows padded (flash-attention unpads attention only)
        mask = inputs.response_mask
        padded_error = float((padded - reference).abs()[mask].mean())
        for switches in (dict(max_tokens_per_micro_batch=_budget(inputs)), dict(dedup_group_prompts=True)):
            error = float((score(**switches) - reference).abs()[mask].mean())
            assert error <= 2 * padded_error + 1e-3, (switches, error, padded_error)
