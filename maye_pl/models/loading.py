"""Loading a vision-language policy, freezing its parts, and the token ids generation must respect.

Which parameters are the ViT, the connector and the LLM is the family adapter's
(``maye_pl.models.adapters``), e.g. Qwen3-VL::

    Qwen3VLForConditionalGeneration
      model.visual                            ViT: patch_embed, pos_embed, blocks
        model.visual.merger                   connector: 2x2 patch merge + MLP into the LLM
        model.visual.deepstack_merger_list.N  connector: DeepStack mergers into the first LLM layers
      model.language_model, lm_head           LLM
"""

from __future__ import annotations

import os

import torch
from torch import nn

from maye_pl.models.adapters import adapter_for

DTYPES: dict[str, torch.dtype] = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
"""The dtypes a policy, the engine or FSDP2 compute in, by the names configs and command lines use."""


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """``"bfloat16"`` -> ``torch.bfloat16``; a ``torch.dtype`` passes through."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(
            f"model dtype={dtype!r} is not one of {sorted(DTYPES)}; pick one of those."
        )
    return DTYPES[dtype]


def load_policy(
    path: str | os.PathLike,
    *,
    dtype: str | torch.dtype = "float32",
    attn_implementation: str = "sdpa",
) -> nn.Module:
    """Load an HF vision-language model for image-text-to-text (e.g. Qwen2.5-VL) on the CPU.

    Args:
        path: a local checkpoint directory (or hub id, if the machine has the files cached).
        dtype: parameter dtype, ``"float32"``, ``"bfloat16"`` or ``"float16"``.
        attn_implementation: ``"sdpa"``, ``"eager"`` or ``"flash_attention_2"`` (GPU only).

    Returns:
        The model in train mode (the caller moves and wraps it).
    """
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(
        path, dtype=resolve_dtype(dtype), attn_implementation=attn_implementation
    )
    model.train()
    return model


def build_policy_and_reference(
    path: str | os.PathLike,
    *,
    dtype: str | torch.dtype,
    attn_implementation: str,
    train_vit: bool,
    train_connector: bool,
    train_llm: bool,
    gradient_checkpointing: bool,
    with_reference: bool,
    on_meta: bool,
) -> tuple[nn.Module, nn.Module | None]:
    """The trainable policy and, when asked, a frozen copy of it (the KL reference).

    Args:
        path: the checkpoint directory both are built from.
        dtype: parameter dtype, as for ``load_policy``.
        attn_implementation: attention backend, as for ``load_policy``.
        train_vit, train_connector, train_llm: which parts of the policy train (``freeze_modules``).
        gradient_checkpointing: recompute the policy's decoder activations in backward.
        with_reference: also build the frozen reference (eval mode, no gradients).
        on_meta: build on the meta device with no weights (``init_empty_pretrained``), for
            FSDP2Strategy to shard first and then load on rank 0 only; else load on the CPU.

    Returns:
        (policy in train mode, reference or None).
    """
    if on_meta:
        # Imported here: the strategies package pulls in Lightning, which the engine process that
        # imports this module for resolve_dtype does not need.
        from maye_pl.strategies.loading import init_empty_pretrained as build
    else:
        build = load_policy
    policy = build(path, dtype=dtype, attn_implementation=attn_implementation)
    freeze_modules(policy, train_vit=train_vit, train_connector=train_connector, train_llm=train_llm)
    if gradient_checkpointing:
        policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    reference = None
    if with_reference:
        reference = build(path, dtype=dtype, attn_implementation=attn_implementation)
        reference.requires_grad_(False).eval()
    return policy, reference


def load_processor(path: str | os.PathLike):
    """The checkpoint's processor (tokenizer + image processor + chat template)."""
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(path)


def freeze_modules(
    model: nn.Module, *, train_vit: bool, train_connector: bool, train_llm: bool
) -> dict[str, int]:
    """Set ``requires_grad`` per part: ViT, connector, LLM (+ ``lm_head``), as the model's adapter
    splits them (``ModelAdapter.parts``; Qwen3-VL's DeepStack mergers are connector).

    MAYE trains the LLM only (ViT and connector frozen).

    Returns:
        Trainable parameter count per part, e.g. ``{"vit": 0, "connector": 0, "llm": 494032768}``.
    """
    if not (train_vit or train_connector or train_llm):
        raise ValueError(
            "model.train_vit, model.train_connector and model.train_llm are all False: nothing "
            "would train; set at least one to True (MAYE trains the LLM only: train_llm=True)."
        )
    wanted = {"vit": train_vit, "connector": train_connector, "llm": train_llm}
    parts = adapter_for(model).parts(model)
    for name, params in parts.items():
        for param in params:
            param.requires_grad_(wanted[name])
    return {
        name: sum(p.numel() for p in params) if wanted[name] else 0
        for name, params in parts.items()
    }


def stop_token_ids(generation_config, tokenizer) -> list[int]:
    """Token ids that end a response: the generation config's ``eos_token_id`` (int or list) and
    the tokenizer's eos, in that order, without duplicates.

    For Qwen2.5-VL Instruct this is ``[<|im_end|>, <|endoftext|>]``.
    """
    ids: list[int] = []
    configured = (
        getattr(generation_config, "eos_token_id", None) if generation_config is not None else None
    )
    if isinstance(configured, int):
        configured = [configured]
    for token_id in [*(configured or []), tokenizer.eos_token_id]:
        if token_id is not None and token_id not in ids:
            ids.append(int(token_id))
    if not ids:
        raise ValueError(
            "stop_token_ids: neither generation_config.json's eos_token_id nor the tokenizer's "
            "eos_token is set; set eos_token_id in the checkpoint's generation_config.json."
        )
    return ids
