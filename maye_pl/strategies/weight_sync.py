"""Stream full (unsharded) policy weights to the rollout engines, one bounded bucket at a time.

After each optimizer-step batch the engine(s) need the new weights under their HF names. Materializing a full state dict would cost a full model copy on rank 0; instead the ranks
assemble one parameter at a time on rank 0, which keeps it in a bucket of at most
``bucket_bytes`` and hands the bucket to the engine. Frozen parameters (the ViT when only the
LLM trains) never change, so a ``WeightSyncPlan`` sends them on the first sync only.

FSDP2 shards parameters by rows (``Shard(0)`` on a 1-D mesh, ``torch.chunk`` layout), so rank 0
receives every rank's rows straight into its slice of one preallocated tensor (point-to-point):
rank 0 holds exactly one full tensor in flight, other ranks only send their shards.
``DTensor.full_tensor`` (an all-gather) would make every rank allocate the full tensor, and
gloo's all-gather stages it in a second buffer (2x, measured); it remains the path for any other
layout (e.g. tensor parallel).

LoRA (``maye_pl.models.lora``): the engine runs the plain model, so a layer with adapters is sent
as one tensor, W + s · B @ A under W's HF name, merged on the receiving ranks after W, A and B are
gathered; its adapters train, so it is sent on every sync although W itself is frozen.

Several engines (one per engine group, each driven by its group's first rank): the shards are
still gathered once, onto global rank 0, which then broadcasts each full tensor to the other
engine owners over their own process group (``Relay``); every owner pushes the same buckets into
its engine at the same time. A replicated (non-DTensor) parameter is already whole on every owner
and travels nowhere.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, Shard

from maye_pl.models.lora import lora_layers, merge_weight
from maye_pl.types import NamedTensors

# Name segments wrappers insert into ``named_parameters()`` that HF's state_dict does not have:
# activation checkpointing, FSDP1-style wrapping, torch.compile, peft's LoRA layer (its wrapped Linear).
WRAPPER_PREFIXES = ("_checkpoint_wrapped_module.", "_fsdp_wrapped_module.", "_orig_mod.", "base_layer.")


@dataclass(frozen=True)
class Relay:
    """More ranks that receive every full tensor: the gathering rank broadcasts it to them.

    The rollout pipeline's engine owners (``groups.EngineGroups.owners``), so the FSDP shards are
    gathered once per sync however many engines take the weights.
    """

    group: Any
    """A process group of exactly ``ranks`` (``torch.distributed.new_group``)."""
    ranks: tuple[int, ...]
    """The receiving global ranks, the gathering ``dst_rank`` among them."""


def hf_name(name: str) -> str:
    """``name`` from ``named_parameters()`` with wrapper segments removed, i.e. the HF state_dict key."""
    for prefix in WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _gather_full(param: torch.Tensor, dst_rank: int, relay: Relay | None = None) -> torch.Tensor | None:
    """The full value of ``param`` on global rank ``dst_rank`` and the ``relay`` ranks, None on the
    other ranks (all must call)."""
    rank = _rank()
    keep = rank == dst_rank or (relay is not None and rank in relay.ranks)
    if not isinstance(param, DTensor):
        return param.detach() if keep else None
    mesh = param.device_mesh
    if mesh.ndim != 1 or tuple(param.placements) != (Shard(0),):
        full = param.full_tensor()
        return full.detach() if keep else None
    full = _gather_rows(param, dst_rank)
    if keep and relay is not None:
        if full is None:
            full = torch.empty(param.shape, dtype=param.dtype, device=param.to_local().device)
        dist.broadcast(full, src=dst_rank, group=relay.group)
    return full


def _gather_rows(param: DTensor, dst_rank: int) -> torch.Tensor | None:
    """A ``Shard(0)`` parameter's rows, point to point into one tensor on ``dst_rank`` (None elsewhere)."""
    mesh = param.device_mesh
    group = mesh.get_group()
    local = param.to_local().detach()
    dst = dist.get_group_rank(group, dst_rank)
    me = mesh.get_local_rank()
    if me != dst:
        if local.numel():  # trailing ranks of a tensor with fewer rows than ranks hold nothing
            send = dist.P2POp(dist.isend, local.contiguous(), group=group, group_peer=dst)
            for work in dist.batch_isend_irecv([send]):
                work.wait()
        return None
    full = torch.empty(param.shape, dtype=param.dtype, device=local.device)
    # The same torch.chunk layout FSDP2 shards with: rank r holds chunks[r] (or nothing, past the end).
    chunks = full.chunk(mesh.size(), dim=0)
    receives = []
    for rank, chunk in enumerate(chunks):
        if rank == me:
            chunk.copy_(local)
        elif chunk.numel():
            receives.append(dist.P2POp(dist.irecv, chunk, group=group, group_peer=rank))
    for work in dist.batch_isend_irecv(receives) if receives else ():
        work.wait()
    return full


@dataclass(frozen=True)
class EngineTensor:
    """One tensor the engine loads: a parameter, or a LoRA layer's merged weight."""

    name: str
    """Its HF name."""
    sources: tuple[torch.Tensor, ...]
    """The parameters it is computed from (plain tensors or DTensor shards): W, or W, A, B."""
    merge: Callable[..., torch.Tensor] | None = None
    """Full ``sources`` -> the tensor; None: the one source as it is."""

    @property
    def trainable(self) -> bool:
        """Whether it changes during training (a frozen tensor needs sending once)."""
        return any(source.requires_grad for source in self.sources)


def engine_tensors(model: nn.Module) -> Iterator[EngineTensor]:
    """What the engine loads of ``model``, in ``named_parameters()`` order: every parameter under its
    HF name, except that a LoRA layer's W, A and B are one tensor W + s · B @ A under W's name."""
    merged: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = {}
    for name, layer in lora_layers(model):
        (adapter,) = layer.active_adapters
        lora_a, lora_b = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
        merged[f"{name}.base_layer.weight"] = (lora_a, lora_b, layer.scaling[adapter])
    adapters = {id(tensor) for lora_a, lora_b, _ in merged.values() for tensor in (lora_a, lora_b)}
    for raw_name, param in model.named_parameters():
        if id(param) in adapters:
            continue
        if raw_name in merged:
            lora_a, lora_b, scaling = merged[raw_name]
            yield EngineTensor(hf_name(raw_name), (param, lora_a, lora_b), partial(merge_weight, scaling=scaling))
        else:
            yield EngineTensor(hf_name(raw_name), (param,))


def iter_full_parameters(
    model: nn.Module,
    *,
    bucket_bytes: int,
    names_filter: Callable[[str, bool], bool] | None = None,
    dst_rank: int = 0,
    relay: Relay | None = None,
) -> Iterator[NamedTensors]:
    """Yield the full parameters of ``model`` on ``dst_rank`` (and the ``relay`` ranks) in buckets
    of at most ``bucket_bytes``.

    Every rank of the model's mesh must exhaust this iterator (each sharded parameter is gathered
    from all ranks). On ``dst_rank`` it yields lists of ``(hf_name, full_tensor)``; on other
    ranks it yields nothing, but sends its shards. Parameters are visited in
    ``named_parameters()`` order (tied parameters once, under their first name); a LoRA layer's
    W, A and B come as one merged tensor (``engine_tensors``).

    Memory: a bucket holds at most ``bucket_bytes`` (a single larger parameter travels alone),
    and each yielded list is emptied when the iterator resumes, so the caller need not drop its
    reference: the extra memory on ``dst_rank`` is at most ``bucket_bytes`` plus the largest
    parameter (FSDP2 row shards), not the model; other ranks allocate nothing. Consume (or copy)
    a bucket before asking for the next one.

    Unsharded models (plain tensors, no process group) work too: tensors are yielded as
    detached views of the parameters, without a copy.

    Args:
        model: an FSDP2-sharded or plain module (e.g. the HF policy).
        bucket_bytes: the most bytes of full tensors held at once (> 0).
        names_filter: ``(hf_name, trainable) -> bool``; only tensors it accepts are gathered. It
            must answer the same on every rank (decide on names and trainability, never on
            shard contents).
        dst_rank: the global rank that gathers the tensors.
        relay: more ranks that receive each tensor from ``dst_rank`` (the same buckets).
    """
    if bucket_bytes <= 0:
        raise ValueError(f"iter_full_parameters: bucket_bytes={bucket_bytes} must be > 0; pass e.g. 256 * 2**20.")
    bucket: NamedTensors = []
    held = 0
    for tensor in engine_tensors(model):
        if names_filter is not None and not names_filter(tensor.name, tensor.trainable):
            continue
        base = tensor.sources[0]
        nbytes = base.numel() * base.element_size()  # the FULL size: a DTensor's numel is global
        if bucket and held + nbytes > bucket_bytes:
            yield bucket
            bucket.clear()  # frees the tensors even while the caller still holds the list
            bucket, held = [], 0
        full = [_gather_full(source, dst_rank, relay) for source in tensor.sources]
        if full[0] is not None:
            bucket.append((tensor.name, tensor.merge(*full) if tensor.merge is not None else full[0]))
            held += nbytes
    if bucket:
        yield bucket
        bucket.clear()


@dataclass
class WeightSyncPlan:
    """Which parameters a sync sends: trainable ones every time, frozen ones until sent once.

    Keep one plan per (model, engine) pair for the whole run, on every rank: the filter it
    provides must answer the same everywhere, and ``sync_weights`` updates it on every rank.
    A new engine (restart) needs a new plan.
    """

    sent_frozen: set[str] = field(default_factory=set)
    """HF names of frozen parameters already sent."""

    def wants(self, name: str, trainable: bool) -> bool:
        """The ``names_filter`` for ``iter_full_parameters``."""
        return trainable or name not in self.sent_frozen


@dataclass(frozen=True)
class SyncStats:
    """What one weight sync moved and where its time went (for ``perf/`` metrics)."""

    num_tensors: int
    """Parameters sent (0 on ranks that receive nothing)."""
    num_bytes: int
    """Bytes of full tensors sent (0 on ranks that receive nothing)."""
    num_buckets: int
    """Buckets handed to ``push``."""
    max_bucket_bytes: int
    """Largest bucket, in bytes."""
    gather_s: float
    """Seconds spent gathering (inside the iterator), on this rank."""
    push_s: float
    """Seconds spent in ``push`` (the engine's weight update), on this rank."""


def sync_weights(
    model: nn.Module,
    push: Callable[[NamedTensors], None] | None,
    *,
    bucket_bytes: int,
    plan: WeightSyncPlan | None = None,
    dst_rank: int = 0,
    relay: Relay | None = None,
) -> SyncStats:
    """Gather ``model``'s full weights bucket by bucket and ``push`` each bucket on ``dst_rank``
    (and on the ``relay`` ranks: one engine owner each).

    Call on every rank at the same point (e.g. ``on_train_batch_end``); ``push`` is only called
    on the receiving ranks (pass the ``push`` of ``engine.weight_update()`` there, None
    elsewhere), so the whole sync is one transaction per engine. ``push`` must be done with the bucket when it
    returns: the list is emptied right after (memory bound). With a ``plan``, frozen parameters
    are sent on the first call only.

    Timings are host wall-clock: on a GPU the gather time includes waiting for the all-gathers,
    the push time whatever the engine synchronizes.
    """
    receivers = {dst_rank, *(relay.ranks if relay is not None else ())}
    if _rank() in receivers and push is None:
        raise ValueError(
            f"sync_weights: push is None on rank {_rank()}, one of the receiving ranks {sorted(receivers)}; "
            "pass the push of engine.weight_update()."
        )
    frozen_selected: list[str] = []

    def select(name: str, trainable: bool) -> bool:
        wanted = plan is None or plan.wants(name, trainable)
        if wanted and not trainable:
            frozen_selected.append(name)
        return wanted

    num_tensors = num_bytes = num_buckets = max_bucket = 0
    gather_s = push_s = 0.0
    buckets = iter_full_parameters(model, bucket_bytes=bucket_bytes, names_filter=select, dst_rank=dst_rank,
                                   relay=relay)
    while True:
        start = time.perf_counter()
        bucket = next(buckets, None)
        gather_s += time.perf_counter() - start
        if bucket is None:
            break
        bucket_nbytes = sum(t.numel() * t.element_size() for _, t in bucket)
        num_tensors, num_bytes, num_buckets = num_tensors + len(bucket), num_bytes + bucket_nbytes, num_buckets + 1
        max_bucket = max(max_bucket, bucket_nbytes)
        start = time.perf_counter()
        push(bucket)  # type: ignore[misc]  # not None on the receivers (checked above), the only ranks with buckets
        push_s += time.perf_counter() - start
    if plan is not None:
        plan.sent_frozen.update(frozen_selected)
    return SyncStats(num_tensors, num_bytes, num_buckets, max_bucket, gather_s, push_s)
