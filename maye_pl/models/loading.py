"""Loading a vision-language policy, freezing its parts, and the token ids generation must respect.

Which parameters are the ViT, the connector and the LLM is the family adapter's
(``maye_pl.models.adapters``), e.g. Qwen3-VL::

    Qwen3VLForConditionalGeneration
      model.visual                            ViT: patch_embed, pos_embed, blocks
        model.visual.merger                   connector: 2x2 patch merge + MLP into the LLM
        model.visual.deepstack_merger_list.N  connector: DeepStack mergers into the first LLM layers
      model.language_model, lm_head           LLM

Two ways to build: ``load_policy`` reads the checkpoint on the CPU (one process); for FSDP2,
``init_empty_pretrained`` builds the model on the meta device (no memory), the strategy shards it,
allocates only the local shards, and rank 0 alone reads the checkpoint and broadcasts it tensor by
tensor into the shards (``load_pretrained_weights``): with 7 training ranks, every rank calling
``from_pretrained`` would hold 7 full CPU copies of a 7B model at once.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist
import transformers
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from transformers import AutoConfig, AutoModelForImageTextToText, GenerationConfig, PretrainedConfig, PreTrainedModel

from maye_pl.models.adapters import adapter_for
from maye_pl.models.lora import LoraArgs, apply_lora, has_lora, reapply_lora

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
    lora: LoraArgs | None = None,
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
        lora: adapters instead of full training for its parts (``maye_pl.models.lora``); the
            reference is then the policy with its adapters off, so ask for none.

    Returns:
        (policy in train mode, reference or None).
    """
    build = init_empty_pretrained if on_meta else load_policy
    policy = build(path, dtype=dtype, attn_implementation=attn_implementation)
    freeze_modules(policy, train_vit=train_vit, train_connector=train_connector, train_llm=train_llm)
    if lora is not None and lora.enabled:
        apply_lora(policy, lora)
    if gradient_checkpointing:
        policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    reference = None
    if with_reference:
        reference = build(path, dtype=dtype, attn_implementation=attn_implementation)
        reference.requires_grad_(False).eval()
    return policy, reference


def model_class(config: PretrainedConfig) -> type[PreTrainedModel]:
    """The HF class a checkpoint was saved from (``config.architectures``), else the image-text-to-text auto class."""
    for name in config.architectures or ():
        if isinstance(cls := getattr(transformers, name, None), type) and issubclass(cls, PreTrainedModel):
            return cls
    return AutoModelForImageTextToText._model_mapping[type(config)]  # noqa: SLF001  # what from_config resolves


def init_empty_pretrained(
    path: str | os.PathLike,
    *,
    dtype: torch.dtype | str = torch.float32,
    model_cls: type[PreTrainedModel] | None = None,
    attn_implementation: str | None = None,
) -> PreTrainedModel:
    """The HF model saved at ``path``, built on the meta device: right structure, no weights yet.

    ``FSDP2Strategy`` shards it and loads the weights from ``model.name_or_path`` (= ``path``);
    outside that strategy call ``load_pretrained_weights(model, device)`` yourself.

    Args:
        path: a local ``save_pretrained`` directory (config.json, safetensors, generation config).
        dtype: the dtype the parameters will have (fp32 master weights, or bf16 to train in bf16);
            a ``torch.dtype`` or a name from ``DTYPES``.
        model_cls: the HF class; default: the one in the config's ``architectures``.
        attn_implementation: e.g. "sdpa", "flash_attention_2"; None = transformers' default.
    """
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"init_empty_pretrained: {path}/config.json not found; pass a local save_pretrained directory."
        )
    dtype = resolve_dtype(dtype)
    config = AutoConfig.from_pretrained(path)
    cls = model_cls or model_class(config)
    with torch.device("meta"):
        # _from_config is HF's from_config for concrete classes (public on the auto classes only).
        model = cls._from_config(config, dtype=dtype, attn_implementation=attn_implementation)  # noqa: SLF001
    if (path / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(path)
    return model


def has_meta_tensors(module: nn.Module) -> bool:
    """True if any parameter or buffer of ``module`` is on the meta device (still to be loaded)."""
    return any(t.is_meta for t in (*module.parameters(), *module.buffers()))


def _reinit_non_persistent_buffers(model: PreTrainedModel) -> None:
    """Recompute buffers no checkpoint stores (rotary ``inv_freq``): ``to_empty`` left garbage there.

    transformers' own loading recreates them the same way: each module's nearest PreTrainedModel
    ancestor's ``_init_weights`` (the rotary branch of it recomputes the frequencies). Parameters
    it touches on the same module are overwritten by the checkpoint afterwards.
    """

    def visit(module: nn.Module, owner: PreTrainedModel) -> None:
        owner = module if isinstance(module, PreTrainedModel) else owner
        if module._non_persistent_buffers_set:  # noqa: SLF001  # nn.Module keeps no public view of it
            owner._init_weights(module)  # noqa: SLF001
        for child in module.children():
            visit(child, owner)

    visit(model, model)


def load_pretrained_weights(
    model: PreTrainedModel,
    device: torch.device,
    path: str | os.PathLike | None = None,
) -> None:
    """Allocate a meta-device (optionally FSDP2-sharded) model on ``device`` and load its weights.

    Collective when a process group exists: every rank calls it. Rank 0 reads the checkpoint with
    ``from_pretrained`` on the CPU (so HF's key renaming between the on-disk and in-memory names
    applies) and broadcasts each tensor; the other ranks never hold more than their shards plus
    one tensor in flight. A model with LoRA adapters gets its adapters' first values the same way:
    rank 0 puts the same adapters on its copy (``reapply_lora``: the same draw as in one process).

    Args:
        model: built by ``init_empty_pretrained`` (then sharded, or not).
        device: where the parameters live (the rank's GPU, or the CPU).
        path: checkpoint directory; default ``model.name_or_path``.
    """
    path = Path(path if path is not None else model.name_or_path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"load_pretrained_weights: path={str(path)!r} (default: {type(model).__name__}.name_or_path) is not"
            " a local save_pretrained directory; build the model with maye_pl.models.init_empty_pretrained(path)."
        )
    dtype = next(model.parameters()).dtype
    model.to_empty(device=device)
    _reinit_non_persistent_buffers(model)
    distributed = dist.is_available() and dist.is_initialized()
    full_state: dict[str, torch.Tensor] = {}
    if not distributed or dist.get_rank() == 0:
        full = type(model).from_pretrained(path, dtype=dtype)
        if has_lora(model):
            reapply_lora(model, full)
        full_state = full.state_dict()
    if distributed:
        set_model_state_dict(
            model, full_state, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=True)
        )
    else:
        model.load_state_dict(full_state, strict=True)


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
