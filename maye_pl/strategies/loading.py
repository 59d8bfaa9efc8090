"""Build HF models without weights (meta device) and fill them from a checkpoint, rank 0 reading.

With 7 training ranks, every rank calling ``from_pretrained`` would hold 7 full CPU copies of a
7B model at once. Instead each rank builds the model on the meta device (no memory), the strategy
shards it, allocates only the local shards, and rank 0 alone reads the checkpoint and broadcasts
it tensor by tensor into the shards (``set_model_state_dict(..., broadcast_from_rank0=True)``).
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

from maye_pl.models.loading import DTYPES


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
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"init_empty_pretrained: dtype={dtype!r} must be one of {sorted(DTYPES)}.")
        dtype = DTYPES[dtype]
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
    one tensor in flight.

    Args:
        model: built by ``init_empty_pretrained`` (then sharded, or not).
        device: where the parameters live (the rank's GPU, or the CPU).
        path: checkpoint directory; default ``model.name_or_path``.
    """
    path = Path(path if path is not None else model.name_or_path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"load_pretrained_weights: path={str(path)!r} (default: {type(model).__name__}.name_or_path) is not"
            " a local save_pretrained directory; build the model with maye_pl.strategies.init_empty_pretrained(path)."
        )
    dtype = next(model.parameters()).dtype
    model.to_empty(device=device)
    _reinit_non_persistent_buffers(model)
    distributed = dist.is_available() and dist.is_initialized()
    full_state: dict[str, torch.Tensor] = {}
    if not distributed or dist.get_rank() == 0:
        full_state = type(model).from_pretrained(path, dtype=dtype).state_dict()
    if distributed:
        set_model_state_dict(
            model, full_state, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=True)
        )
    else:
        model.load_state_dict(full_state, strict=True)
