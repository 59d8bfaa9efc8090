"""FSDP2 for HF vision-language models under Lightning: the sharding plan lives here, not in the module.

The LightningModule only builds its HF models (``policy``, optionally a frozen ``ref_policy``) in
``configure_model``, preferably on the meta device with ``init_empty_pretrained``. In ``setup``
this strategy finds every HF ``PreTrainedModel`` attribute of the module and, per model:

1. wraps each transformer block in activation checkpointing (if enabled);
2. ``fully_shard``s each block (the model family's adapter names them: vision blocks and decoder
   layers), the input and output embeddings (if untied), then the model root;
3. allocates the local shards of a meta-device model and loads the checkpoint from
   ``model.name_or_path``, rank 0 reading and broadcasting (``load_pretrained_weights``).

Then ``ModelParallelStrategy.setup`` runs as usual (optimizers see the sharded DTensor
parameters). Checkpoints are distributed (DCP directories) by default, with each model's source
directory recorded so ``maye_pl.export`` can rebuild a ``save_pretrained`` directory; both formats
are written beside the target and moved into place once complete (``publish_checkpoint``).
"""

from __future__ import annotations

import os
import shutil
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.fabric.strategies.model_parallel import _is_sharded_checkpoint
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointImpl, checkpoint_wrapper
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, OffloadPolicy, fully_shard
from transformers import PreTrainedModel
from typing_extensions import override

from maye_pl.models.adapters import adapter_for
from maye_pl.models.loading import DTYPES, has_meta_tensors, load_pretrained_weights

DtypeName = Literal["bfloat16", "float16", "float32"]

HF_PATHS_KEY = "hf_pretrained_paths"
"""Checkpoint key: ``{attribute name: model.name_or_path}`` of every HF model of the module."""


def hf_models(module: nn.Module) -> list[tuple[str, PreTrainedModel]]:
    """The HF models that are direct attributes of ``module`` (e.g. ``policy``, ``ref_policy``)."""
    return [(name, child) for name, child in module.named_children() if isinstance(child, PreTrainedModel)]


def shard_hf_model(
    model: PreTrainedModel,
    mesh: DeviceMesh,
    *,
    mp_policy: MixedPrecisionPolicy | None = None,
    offload_policy: OffloadPolicy | None = None,
    reshard_after_forward: bool = True,
    activation_checkpointing: bool = False,
    shard_embeddings: bool = True,
) -> list[str]:
    """Apply FSDP2 to ``model`` in place: blocks, embeddings, root. Returns the sharded units' names.

    Works on meta-device models (nothing is allocated) and on loaded ones (each rank keeps its shard).
    """
    kwargs: dict[str, Any] = {
        "mesh": mesh,
        "reshard_after_forward": reshard_after_forward,
        "mp_policy": mp_policy or MixedPrecisionPolicy(),
        "offload_policy": offload_policy or OffloadPolicy(),
    }
    blocks = adapter_for(model).shard_units(model)  # the ViT blocks and decoder layers
    units = []
    for name, block in reversed(blocks):
        if activation_checkpointing:
            # Wrap before sharding, so FSDP's all-gather hooks sit outside the recomputed region.
            parent_name, _, child_name = name.rpartition(".")
            block = checkpoint_wrapper(block, checkpoint_impl=CheckpointImpl.NO_REENTRANT)
            model.get_submodule(parent_name).register_module(child_name, block)
        fully_shard(block, **kwargs)
        units.append(name)
    if shard_embeddings:
        # Large vocabularies make these the biggest tensors; alone, they are gathered only while used.
        # Tied ones share one parameter and stay in the root unit.
        embeddings = [model.get_input_embeddings(), model.get_output_embeddings()]
        if embeddings[1] is not None and embeddings[1].weight is not embeddings[0].weight:
            for embedding in embeddings:
                fully_shard(embedding, **kwargs)
                units.append(next(n for n, m in model.named_modules() if m is embedding))
    fully_shard(model, **kwargs)
    units.append("")
    return units


class FSDP2Strategy(ModelParallelStrategy):
    """Fully sharded data parallel (FSDP2) over all devices, with the sharding plan for HF VLMs built in.

    Every HF ``PreTrainedModel`` attribute of the LightningModule is sharded (the frozen reference
    only if ``shard_reference``); meta-device models are then loaded from their ``name_or_path``.
    The module builds its models in ``configure_model`` and carries no sharding code. Keep the
    Trainer's ``precision`` at "32-true": mixed precision is ``param_dtype``/``reduce_dtype`` here,
    pure bf16 is ``init_empty_pretrained(..., dtype=torch.bfloat16)``.
    """

    def __init__(
        self,
        param_dtype: DtypeName | None = None,
        reduce_dtype: DtypeName | None = None,
        reshard_after_forward: bool = True,
        cpu_offload: bool = False,
        activation_checkpointing: bool = False,
        shard_reference: bool = True,
        shard_embeddings: bool = True,
        save_distributed_checkpoint: bool = True,
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
    ) -> None:
        """
        Args:
            param_dtype: dtype the gathered parameters compute in (e.g. "bfloat16" over fp32
                master weights); None = the parameters' own dtype.
            reduce_dtype: dtype gradients are reduce-scattered in (e.g. "float32" with bf16
                compute); None = ``param_dtype``.
            reshard_after_forward: free gathered parameters after each block's forward and
                gather again for backward (less memory, more communication).
            cpu_offload: keep sharded parameters, gradients and optimizer state in CPU memory.
            activation_checkpointing: recompute each transformer block's activations in backward.
            shard_reference: shard frozen models (the reference policy) too; False keeps a full
                copy per rank (no all-gathers in its forward, more memory).
            shard_embeddings: make the input and output embeddings their own FSDP units (untied
                models), so the large vocabulary matrices are not held with the root's parameters.
            save_distributed_checkpoint: checkpoints as DCP directories (each rank writes its
                shards); False gathers a single .ckpt file on rank 0.
            process_group_backend: torch.distributed backend; None = nccl on GPUs, gloo on CPUs.
            timeout: timeout of collective operations.
        """
        super().__init__(
            data_parallel_size="auto",
            tensor_parallel_size=1,
            save_distributed_checkpoint=save_distributed_checkpoint,
            process_group_backend=process_group_backend,
            timeout=timeout,
        )
        self.mp_policy = MixedPrecisionPolicy(
            param_dtype=DTYPES[param_dtype] if param_dtype else None,
            reduce_dtype=DTYPES[reduce_dtype] if reduce_dtype else None,
        )
        self.cpu_offload = cpu_offload
        self.reshard_after_forward = reshard_after_forward
        self.activation_checkpointing = activation_checkpointing
        self.shard_reference = shard_reference
        self.shard_embeddings = shard_embeddings

    @override
    def setup_environment(self) -> None:
        # Pure data parallel: one mesh dimension over every rank (the parent's "auto" is the node count).
        self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()

    @override
    def setup(self, trainer: Trainer) -> None:
        module = self.lightning_module
        assert module is not None
        self._check_module(module, trainer)
        self._shard_and_load(module)
        super().setup(trainer)

    def _check_module(self, module: LightningModule, trainer: Trainer) -> None:
        problems = []
        if not is_overridden("configure_model", module):
            problems.append(
                f"{type(module).__name__}.configure_model() is not overridden; build the HF models there,"
                " e.g. self.policy = maye_pl.models.init_empty_pretrained(path)"
            )
        elif not hf_models(module):
            problems.append(
                f"{type(module).__name__} has no HF PreTrainedModel attribute after configure_model();"
                " assign the models to attributes (self.policy = ...)"
            )
        if trainer.precision != "32-true":
            problems.append(
                f"Trainer(precision={trainer.precision!r}) must be '32-true'; set mixed precision with"
                " FSDP2Strategy(param_dtype='bfloat16', reduce_dtype='float32'), or build the models in bf16"
                " with init_empty_pretrained(path, dtype=torch.bfloat16)"
            )
        if problems:
            raise ValueError("FSDP2Strategy: " + "; ".join(problems) + ".")

    def _shard_and_load(self, module: LightningModule) -> None:
        mesh = self.device_mesh["data_parallel"]
        offload = CPUOffloadPolicy(pin_memory=self.root_device.type == "cuda") if self.cpu_offload else None
        for _, model in hf_models(module):
            if isinstance(model, FSDPModule):  # sharded by an earlier fit/validate/test on this module
                continue
            frozen = not any(p.requires_grad for p in model.parameters())
            if self.shard_reference or not frozen:
                shard_hf_model(
                    model,
                    mesh,
                    mp_policy=self.mp_policy,
                    offload_policy=offload,
                    reshard_after_forward=self.reshard_after_forward,
                    activation_checkpointing=self.activation_checkpointing,
                    shard_embeddings=self.shard_embeddings,
                )
            if has_meta_tensors(model):
                load_pretrained_weights(model, torch.device("cpu") if offload else self.root_device)
                if offload:
                    _move_buffers(model, self.root_device)

    @override
    def model_to_device(self) -> None:
        assert self.model is not None
        if self.cpu_offload:
            # Parameters stay where FSDP's CPU offload keeps them; buffers (rotary tables) compute on the device.
            _move_buffers(self.model, self.root_device)
        else:
            super().model_to_device()

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: _PATH, storage_options: Any | None = None) -> None:
        """Write the checkpoint beside ``filepath`` and move it there only once every rank has finished.

        A crash mid-save leaves ``filepath`` as it was (the previous checkpoint, or nothing) and a
        ``.<name>.partial`` sibling that the next save to the same path removes.
        """
        # Where each model came from, so the export can copy config, tokenizer and processor files.
        assert self.lightning_module is not None
        checkpoint[HF_PATHS_KEY] = {name: str(Path(m.name_or_path)) for name, m in hf_models(self.lightning_module)}
        path = Path(self.broadcast(filepath))
        if path.is_dir() and not _is_sharded_checkpoint(path):
            raise IsADirectoryError(
                f"FSDP2Strategy.save_checkpoint: {path} is a directory but not a distributed checkpoint;"
                " saving would replace it — choose another checkpoint path."
            )
        partial = path.with_name(f".{path.name}.partial")
        if self.is_global_zero:
            _remove_path(partial)  # left by a save that crashed
        self.barrier("FSDP2Strategy.save_checkpoint: partial path clean")
        super().save_checkpoint(checkpoint, partial, storage_options)
        self.barrier("FSDP2Strategy.save_checkpoint: all ranks written")
        if self.is_global_zero:
            publish_checkpoint(partial, path)


def publish_checkpoint(written: Path, final: Path) -> None:
    """Move a completely written checkpoint (file or DCP directory) to ``final``, replacing what is there.

    A file over a file is one atomic ``os.replace``. A directory cannot atomically replace another
    one, so the old checkpoint is first renamed to ``.<name>.replaced`` and deleted only after the
    new one is in place: a crash between the two renames leaves no checkpoint at ``final`` but a
    complete one at each of the two sibling paths. Both paths must be on one file system.
    """
    if not (written.is_dir() or final.is_dir()):
        os.replace(written, final)
        return
    replaced = final.with_name(f".{final.name}.replaced")
    _remove_path(replaced)
    if final.exists():
        os.replace(final, replaced)
    os.replace(written, final)
    _remove_path(replaced)


def _remove_path(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _move_buffers(module: nn.Module, device: torch.device) -> None:
    for sub in module.modules():
        for name, buffer in sub.named_buffers(recurse=False):
            setattr(sub, name, buffer.to(device))
