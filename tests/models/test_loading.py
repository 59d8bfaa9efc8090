"""Loading the policy, freezing ViT / connector / LLM, and the stop and vision token ids."""

from __future__ import annotations

import pytest
import torch
from transformers import GenerationConfig

from maye_pl.models.loading import (
    freeze_modules,
    load_policy,
    resolve_dtype,
    stop_token_ids,
    vision_token_ids,
)


@pytest.fixture(scope="module")
def policy(tiny_model_dir):
    return load_policy(tiny_model_dir)


def test_load_policy_dtype_and_mode(tiny_model_dir):
    model = load_policy(tiny_model_dir, dtype="bfloat16")
    assert model.dtype == torch.bfloat16 and model.training
    assert type(model).__name__ == "Qwen2_5_VLForConditionalGeneration"
    with pytest.raises(
        ValueError, match=r"dtype='fp8' is not one of \['bfloat16', 'float16', 'float32'\]"
    ):
        resolve_dtype("fp8")


@pytest.mark.parametrize(
    ("train_vit", "train_connector", "train_llm", "trainable_prefixes"),
    [
        (False, False, True, ("model.language_model.", "lm_head.")),  # MAYE's setting
        (False, True, False, ("model.visual.merger.",)),
        (True, False, False, ("model.visual.patch_embed.", "model.visual.blocks.")),
    ],
)
def test_freeze_modules_selects_the_named_parts(
    policy, train_vit, train_connector, train_llm, trainable_prefixes
):
    counts = freeze_modules(
        policy, train_vit=train_vit, train_connector=train_connector, train_llm=train_llm
    )
    trainable = {name for name, p in policy.named_parameters() if p.requires_grad}
    expected = {
        name for name, _ in policy.named_parameters() if name.startswith(trainable_prefixes)
    }
    assert trainable == expected
    assert sum(counts.values()) == sum(p.numel() for p in policy.parameters() if p.requires_grad)
    total = sum(p.numel() for p in policy.parameters())
    everything = freeze_modules(policy, train_vit=True, train_connector=True, train_llm=True)
    assert sum(everything.values()) == total  # the three parts cover every parameter, once


def test_freeze_modules_refuses_to_freeze_everything(policy):
    with pytest.raises(ValueError, match="nothing would train"):
        freeze_modules(policy, train_vit=False, train_connector=False, train_llm=False)


def test_freeze_modules_names_an_unknown_layout():
    with pytest.raises(TypeError, match="Linear lacks the Qwen-VL layout"):
        freeze_modules(
            torch.nn.Linear(2, 2), train_vit=False, train_connector=False, train_llm=True
        )


def test_stop_and_vision_token_ids(policy, tiny_processor):
    tokenizer = tiny_processor.tokenizer
    im_end, endoftext = tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    assert stop_token_ids(policy.generation_config, tokenizer) == [im_end, endoftext]
    assert stop_token_ids(GenerationConfig(eos_token_id=endoftext), tokenizer) == [
        endoftext,
        im_end,
    ]
    assert stop_token_ids(None, tokenizer) == [im_end]
    vision = vision_token_ids(tokenizer)  # the tiny tokenizer has no <|vision_pad|>
    assert vision == tokenizer.convert_tokens_to_ids(
        ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
    )
