"""Loading the policy, picking the family's adapter, freezing ViT / connector / LLM per family,
and the stop and vision token ids."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import GenerationConfig

from maye_pl.models.adapters import ADAPTERS, adapter_for
from maye_pl.models.loading import freeze_modules, load_policy, resolve_dtype, stop_token_ids

# Trainable parameter-name prefixes per part, written out from each family's HF layout.
LLM = ("model.language_model.", "lm_head.")
VIT = {
    "qwen2_vl": ("model.visual.patch_embed.", "model.visual.blocks."),
    "qwen2_5_vl": ("model.visual.patch_embed.", "model.visual.blocks."),
    "qwen3_vl": ("model.visual.patch_embed.", "model.visual.pos_embed.", "model.visual.blocks."),
    "qwen3_5": ("model.visual.patch_embed.", "model.visual.pos_embed.", "model.visual.blocks."),
}
CONNECTOR = {
    "qwen2_vl": ("model.visual.merger.",),
    "qwen2_5_vl": ("model.visual.merger.",),
    # DeepStack mergers feed ViT features into the LLM: they train (or not) with the merger.
    "qwen3_vl": ("model.visual.merger.", "model.visual.deepstack_merger_list."),
    "qwen3_5": ("model.visual.merger.",),
}


@pytest.fixture(scope="module")
def policy(family_model_dir):
    return load_policy(family_model_dir)


def test_load_policy_dtype_and_mode(tiny_model_dir):
    model = load_policy(tiny_model_dir, dtype="bfloat16")
    assert model.dtype == torch.bfloat16 and model.training
    assert type(model).__name__ == "Qwen2_5_VLForConditionalGeneration"
    with pytest.raises(
        ValueError, match=r"dtype='fp8' is not one of \['bfloat16', 'float16', 'float32'\]"
    ):
        resolve_dtype("fp8")


def test_adapter_is_chosen_by_model_type(family, family_model_dir, policy):
    assert adapter_for(family_model_dir) is ADAPTERS[family] is adapter_for(policy)
    assert ADAPTERS[family].model_type == family == policy.config.model_type


def test_an_unknown_model_type_names_the_supported_ones(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llava"}))
    with pytest.raises(
        ValueError,
        match=r"config.json: model_type='llava' has no maye_pl model adapter; supported: qwen2_vl \(Qwen2-VL\), "
        r"qwen2_5_vl \(Qwen2.5-VL\), qwen3_vl \(Qwen3-VL\), qwen3_5 \(Qwen3.5\)",
    ):
        adapter_for(tmp_path)
    with pytest.raises(FileNotFoundError, match="`model.model_path`="):
        adapter_for(tmp_path / "missing")


@pytest.mark.parametrize(
    ("train_vit", "train_connector", "train_llm"),
    [
        (False, False, True),  # MAYE's setting
        (False, True, False),
        (True, False, False),
        (True, True, False),
        (False, True, True),
    ],
)
def test_freeze_modules_selects_the_named_parts(family, policy, train_vit, train_connector, train_llm):
    counts = freeze_modules(
        policy, train_vit=train_vit, train_connector=train_connector, train_llm=train_llm
    )
    prefixes = (VIT[family] if train_vit else ()) + (CONNECTOR[family] if train_connector else ()) + (
        LLM if train_llm else ()
    )
    trainable = {name for name, p in policy.named_parameters() if p.requires_grad}
    expected = {name for name, _ in policy.named_parameters() if name.startswith(prefixes)}
    assert trainable == expected
    assert sum(counts.values()) == sum(p.numel() for p in policy.parameters() if p.requires_grad)
    total = sum(p.numel() for p in policy.parameters())
    everything = freeze_modules(policy, train_vit=True, train_connector=True, train_llm=True)
    assert sum(everything.values()) == total  # the three parts cover every parameter, once
    every_prefix = VIT[family] + CONNECTOR[family] + LLM
    assert all(name.startswith(every_prefix) for name, _ in policy.named_parameters())


def test_qwen3_vl_deepstack_mergers_are_connector(tmp_path):
    adapter = ADAPTERS["qwen3_vl"]
    # Both ViT blocks feed a DeepStack merger (tiny build: deepstack_visual_indexes [0, 1]).
    assert adapter.part_of("model.visual.deepstack_merger_list.1.linear_fc2.weight") == "connector"
    assert adapter.part_of("model.visual.merger.linear_fc1.weight") == "connector"
    assert adapter.part_of("model.visual.blocks.0.attn.qkv.weight") == "vit"
    assert adapter.part_of("model.visual.pos_embed.weight") == "vit"
    assert adapter.part_of("lm_head.weight") == "llm"
    assert adapter.part_of("model.rotary.weight") is None


def test_freeze_modules_refuses_to_freeze_everything(policy):
    with pytest.raises(ValueError, match="nothing would train"):
        freeze_modules(policy, train_vit=False, train_connector=False, train_llm=False)


def test_freeze_modules_names_an_unknown_layout():
    with pytest.raises(ValueError, match="Linear: model_type=None has no maye_pl model adapter"):
        freeze_modules(
            torch.nn.Linear(2, 2), train_vit=False, train_connector=False, train_llm=True
        )
    with pytest.raises(TypeError, match=r"Linear does not have the Qwen2.5-VL layout: parameters no part claims "
                                        r"\['weight', 'bias'\]"):
        ADAPTERS["qwen2_5_vl"].parts(torch.nn.Linear(2, 2))


def test_stop_and_vision_token_ids(family, policy, family_processor):
    tokenizer = family_processor.tokenizer
    im_end, endoftext = tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    assert stop_token_ids(policy.generation_config, tokenizer) == [im_end, endoftext]
    assert stop_token_ids(GenerationConfig(eos_token_id=endoftext), tokenizer) == [
        endoftext,
        im_end,
    ]
    assert stop_token_ids(None, tokenizer) == [im_end]
    vision = ADAPTERS[family].vision_token_ids(tokenizer)  # the tiny tokenizer has no <|vision_pad|>
    assert vision == tokenizer.convert_tokens_to_ids(
        ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
    )
