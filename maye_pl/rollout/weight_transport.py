"""The collective weight transport between the trainer's global rank 0 and the engine's worker.

Two processes form a private 2-member process group: the trainer (rank 0, the sender) and the
engine worker (rank 1, the receiver). Gloo when the engine runs on the CPU, NCCL when it runs on
a GPU: one code path, the backend chosen by the engine's device. The group is built straight from
a ``TCPStore`` on a free loopback port and a backend object (``ProcessGroupGloo`` /
``ProcessGroupNCCL``), never through ``torch.distributed.init_process_group``, so the trainer's
default group (FSDP2's) is untouched and the engine process has no global group at all.

Each bucket travels as one broadcast per tensor, straight from the trainer's tensor into a slice
of a receive buffer the worker allocated once (``BucketReceiver``); the pipe carries only the
control message (names, shapes, dtypes). Every operation has the group's timeout, so a dead or
stuck peer becomes an error, never a hang.
"""

from __future__ import annotations

import datetime
import math
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch._C._distributed_c10d import BroadcastOptions, PrefixStore, TCPStore

WEIGHT_TRANSPORTS = ("collective", "pipe")
"""``rollout.weight_transport`` values: a broadcast over a 2-process group, or safetensors bytes
through the engine's pipe (the fallback)."""

LOOPBACK = "127.0.0.1"  # the engine is a child process of the trainer: always the same host
TRAINER_RANK, ENGINE_RANK, GROUP_SIZE = 0, 1, 2
_ALIGN = 64  # bytes: every tensor's slice of the receive buffer starts on a 64-byte boundary

TensorMeta = tuple[str, tuple[int, ...], str]
"""(HF name, shape, dtype name) of one tensor of a bucket: the control message's entries."""

NamedTensors = list[tuple[str, torch.Tensor]]


def check_transport(transport: str) -> str:
    """``transport`` if it is one of ``WEIGHT_TRANSPORTS``, else a ValueError naming the key."""
    if transport not in WEIGHT_TRANSPORTS:
        raise ValueError(
            f"rollout.weight_transport={transport!r} must be one of {WEIGHT_TRANSPORTS}: "
            "'collective' broadcasts the weights over a process group (the default), 'pipe' "
            "sends them as bytes through the engine's pipe (the fallback)."
        )
    return transport


def backend_for(device: torch.device | str) -> str:
    """The collective backend for an engine on ``device``: NCCL on a GPU, gloo on the CPU."""
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def open_store(timeout_s: float) -> TCPStore:
    """The trainer's rendezvous store on a free loopback port (``store.port``)."""
    return TCPStore(
        LOOPBACK, 0, GROUP_SIZE, True, datetime.timedelta(seconds=timeout_s), wait_for_workers=False
    )


def connect_store(port: int, timeout_s: float) -> TCPStore:
    """The engine's client of the trainer's store."""
    return TCPStore(LOOPBACK, port, GROUP_SIZE, False, datetime.timedelta(seconds=timeout_s))


def join_group(store: TCPStore, rank: int, device: torch.device | str, timeout_s: float) -> Any:
    """This process's member of the private 2-process group (blocks until the peer joins; NCCL
    connects at the first broadcast). Every operation on it fails after ``timeout_s``."""
    timeout = datetime.timedelta(seconds=timeout_s)
    prefixed = PrefixStore("maye_pl/weights", store)
    if backend_for(device) == "nccl":
        from torch._C._distributed_c10d import ProcessGroupNCCL

        options = ProcessGroupNCCL.Options()
        options._timeout = timeout
        return ProcessGroupNCCL(prefixed, rank, GROUP_SIZE, options)
    from torch._C._distributed_c10d import ProcessGroupGloo

    options = ProcessGroupGloo._Options()
    options._timeout = timeout
    options._devices = [ProcessGroupGloo.create_device(hostname=LOOPBACK)]
    return ProcessGroupGloo(prefixed, rank, GROUP_SIZE, options)


def close_group(group: Any) -> None:
    """Abort ``group``: pending operations fail at once, its connections close."""
    try:
        group.abort()
    except RuntimeError:
        pass  # already aborted, or the peer's side is gone: nothing left to release


def broadcast_tensors(group: Any, tensors: Iterable[torch.Tensor]) -> None:
    """Broadcast each tensor from the trainer (rank 0) to the engine (rank 1).

    Each broadcast is posted before the previous one is awaited, so the transfer streams while at
    most two of ``tensors`` (e.g. dtype-converted copies made lazily) are alive at once.
    """
    options = BroadcastOptions()
    options.rootRank = TRAINER_RANK
    pending = None
    for tensor in tensors:
        work = group.broadcast([tensor], options)
        if pending is not None:
            pending.wait()
        pending = work
    if pending is not None:
        pending.wait()


def bucketed(named_tensors: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int) -> Iterator[NamedTensors]:
    """Group ``named_tensors`` into lists of at most ``bucket_bytes`` (a larger tensor goes alone)."""
    bucket: NamedTensors = []
    size = 0
    for name, tensor in named_tensors:
        if bucket and size + tensor.nbytes > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, tensor))
        size += tensor.nbytes
    if bucket:
        yield bucket


class BucketReceiver:
    """The engine's receive buffer: one flat allocation, grown only for a larger bucket.

    Args:
        group: the engine's member of the 2-process group.
        device: where the buffer lives (the engine's device).
        capacity_bytes: initial size, the engine's bucket size.
    """

    def __init__(self, group: Any, device: torch.device, capacity_bytes: int) -> None:
        self.group = group
        self.buffer = torch.empty(capacity_bytes, dtype=torch.uint8, device=device)

    def receive(self, metas: list[TensorMeta]) -> NamedTensors:
        """Receive one bucket; the tensors are views of the buffer, valid until the next bucket."""
        layout, total = [], 0
        for name, shape, dtype_name in metas:
            dtype = getattr(torch, dtype_name)
            nbytes = math.prod(shape) * dtype.itemsize
            layout.append((name, shape, dtype, total, nbytes))
            total += -(-nbytes // _ALIGN) * _ALIGN
        if total > self.buffer.numel():
            self.buffer = torch.empty(total, dtype=torch.uint8, device=self.buffer.device)
        tensors = [
            (name, self.buffer[offset : offset + nbytes].view(dtype).view(shape))
            for name, shape, dtype, offset, nbytes in layout
        ]
        broadcast_tensors(self.group, [tensor for _, tensor in tensors])
        return tensors

    def owns(self, tensor: torch.Tensor) -> bool:
        """Whether ``tensor`` is a view of the receive buffer (overwritten by the next bucket)."""
        return tensor.untyped_storage().data_ptr() == self.buffer.untyped_storage().data_ptr()
