"""The collective weight transport between an engine's owner and the engine's worker(s).

The processes form a private process group: the trainer rank that owns the engine (rank 0, the
sender) and the engine's worker (rank 1, the receiver; with tensor parallelism t, its t workers
are ranks 1..t and each receives every bucket). Gloo when the engine runs on the CPU, NCCL when it runs on
a GPU: one code path, the backend chosen by the engine's device. The group is built straight from
a ``TCPStore`` on a free port and a backend object (``ProcessGroupGloo`` /
``ProcessGroupNCCL``), never through ``torch.distributed.init_process_group``, so the trainer's
default group (FSDP2's) is untouched and the engine process has no global group at all.

Where the group meets (``Rendezvous``): an engine host on this machine uses the loopback address;
a remote engine (``remote.py``) uses the two ends' addresses of its authenticated connection. The
store listens on the trainer's address only, and the group's keys in it carry a random name that
only the engine learns (over that connection): whoever else reaches the port cannot join.

Each bucket travels as one broadcast per tensor, straight from the trainer's tensor into a slice
of a receive buffer the worker allocated once (``BucketReceiver``); the pipe carries only the
control message (names, shapes, dtypes). Every operation has the group's timeout, so a dead or
stuck peer becomes an error, never a hang.

An engine on the trainer host's CPU has a shorter way: ``shared_memory``. The trainer writes each
bucket into a buffer both processes map (an anonymous ``memfd``, its descriptor passed once over
the pipe) and the worker loads straight from it: one memcpy instead of gloo's socket round trip
(about 6 GB/s against 1-2 GB/s on loopback here). Not bound by ``/dev/shm``'s size (a container's
64 MiB default), and nothing to unlink: the memory goes when both processes have closed it.
"""

from __future__ import annotations

import datetime
import math
import mmap
import os
import secrets
import socket
from collections.abc import Iterable, Iterator
from typing import Any, NamedTuple

import torch
from torch._C._distributed_c10d import BroadcastOptions, PrefixStore, TCPStore

from maye_pl.errors import ConfigError
from maye_pl.types import NamedTensors

WEIGHT_TRANSPORTS = ("collective", "shared_memory", "pipe")
"""``rollout.weight_transport`` values: a broadcast over a 2-process group, a buffer shared with an
engine on the trainer host's CPU, or safetensors bytes through the engine's pipe (the fallback)."""

LOOPBACK = "127.0.0.1"  # an engine host on the trainer's machine
TRAINER_RANK, ENGINE_RANK, GROUP_SIZE = 0, 1, 2  # the sender, the first worker, the size with one worker
_ALIGN = 64  # bytes: every tensor's slice of the receive buffer starts on a 64-byte boundary

TensorMeta = tuple[str, tuple[int, ...], str]
"""(HF name, shape, dtype name) of one tensor of a bucket: the control message's entries."""


def check_transport(transport: str, device: str | None = None) -> str:
    """``transport`` if it is one of ``WEIGHT_TRANSPORTS`` (and, given the engine's ``device``,
    one that reaches it), else a ConfigError naming the key."""
    if transport not in WEIGHT_TRANSPORTS:
        raise ConfigError(
            f"rollout.weight_transport={transport!r} must be one of {WEIGHT_TRANSPORTS}: "
            "'collective' broadcasts the weights over a process group (the default), "
            "'shared_memory' writes them into memory shared with a CPU engine, 'pipe' sends them "
            "as bytes through the engine's pipe (the fallback)."
        )
    if transport == "shared_memory" and device not in (None, "cpu"):
        raise ConfigError(
            f"rollout.weight_transport='shared_memory' needs the engine on this host's CPU, "
            f"not on {device}; use 'collective' (NCCL) for a GPU engine."
        )
    return transport


def backend_for(device: torch.device | str) -> str:
    """The collective backend for an engine on ``device`` (``"cuda:N"``, ``"cuda:N,M"``, a
    ``torch.device``): NCCL on GPUs, gloo on the CPU."""
    return "nccl" if str(device).startswith("cuda") else "gloo"


class Rendezvous(NamedTuple):
    """Where one weight group meets; the trainer sends it to the engine with "join_weight_group"."""

    store_host: str
    """The trainer's address: its store listens there and its member binds it."""
    store_port: int
    engine_host: str
    """The engine's address: its workers bind it."""
    name: str
    """The group's key prefix in the store (random)."""


def open_store(
    host: str, engine_host: str, timeout_s: float, group_size: int = GROUP_SIZE
) -> tuple[TCPStore, Rendezvous]:
    """The trainer's store, listening on ``host`` only (a free port), and the rendezvous of a group
    of ``group_size`` whose engine members bind ``engine_host``."""
    listener = socket.create_server((host, 0), family=socket.AF_INET6 if ":" in host else socket.AF_INET)
    port = listener.getsockname()[1]
    # The store takes over the bound socket (and closes it): it listens on ``host`` alone.
    store = TCPStore(host, port, group_size, True, datetime.timedelta(seconds=timeout_s),
                     wait_for_workers=False, master_listen_fd=listener.detach())
    return store, Rendezvous(host, port, engine_host, f"maye_pl/weights/{secrets.token_hex(16)}")


def connect_store(rendezvous: Rendezvous, timeout_s: float, group_size: int = GROUP_SIZE) -> TCPStore:
    """An engine worker's client of the trainer's store."""
    return TCPStore(rendezvous.store_host, rendezvous.store_port, group_size, False,
                    datetime.timedelta(seconds=timeout_s))


def join_group(
    store: TCPStore, rendezvous: Rendezvous, rank: int, device: torch.device | str, timeout_s: float,
    group_size: int = GROUP_SIZE,
) -> Any:
    """This process's member of the private group of ``group_size`` (blocks until every member has
    joined; NCCL connects at the first broadcast). Every operation on it fails after ``timeout_s``."""
    timeout = datetime.timedelta(seconds=timeout_s)
    prefixed = PrefixStore(rendezvous.name, store)
    if backend_for(device) == "nccl":
        from torch._C._distributed_c10d import ProcessGroupNCCL

        options = ProcessGroupNCCL.Options()
        options._timeout = timeout
        return ProcessGroupNCCL(prefixed, rank, group_size, options)
    from torch._C._distributed_c10d import ProcessGroupGloo

    options = ProcessGroupGloo._Options()
    options._timeout = timeout
    address = rendezvous.store_host if rank == TRAINER_RANK else rendezvous.engine_host
    options._devices = [ProcessGroupGloo.create_device(hostname=address)]
    return ProcessGroupGloo(prefixed, rank, group_size, options)


def close_group(group: Any) -> None:
    """Abort ``group``: pending operations fail at once, its connections close."""
    try:
        group.abort()
    except RuntimeError:
        pass  # already aborted, or the peer's side is gone: nothing left to release


def broadcast_tensors(group: Any, tensors: Iterable[torch.Tensor]) -> None:
    """Broadcast each tensor from the trainer (rank 0) to the engine's worker(s).

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


def bucket_nbytes(metas: list[TensorMeta]) -> int:
    """Bytes a bucket occupies in a transfer buffer (each tensor's slice 64-byte aligned)."""
    return sum(_aligned(_nbytes(shape, dtype_name)) for _, shape, dtype_name in metas)


def bucket_views(buffer: torch.Tensor, metas: list[TensorMeta]) -> NamedTensors:
    """The bucket's tensors as views of ``buffer`` (uint8, at least ``bucket_nbytes`` long), laid
    out in ``metas`` order: the layout both ends of a transport agree on."""
    tensors, offset = [], 0
    for name, shape, dtype_name in metas:
        nbytes = _nbytes(shape, dtype_name)
        tensors.append((name, buffer[offset : offset + nbytes].view(getattr(torch, dtype_name)).view(shape)))
        offset += _aligned(nbytes)
    return tensors


def _nbytes(shape: tuple[int, ...], dtype_name: str) -> int:
    return math.prod(shape) * getattr(torch, dtype_name).itemsize


def _aligned(nbytes: int) -> int:
    return -(-nbytes // _ALIGN) * _ALIGN


def owns(buffer: torch.Tensor, tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is a view of ``buffer`` (and so is overwritten by the next bucket)."""
    return tensor.untyped_storage().data_ptr() == buffer.untyped_storage().data_ptr()


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
        total = bucket_nbytes(metas)
        if total > self.buffer.numel():
            self.buffer = torch.empty(total, dtype=torch.uint8, device=self.buffer.device)
        tensors = bucket_views(self.buffer, metas)
        broadcast_tensors(self.group, [tensor for _, tensor in tensors])
        return tensors


def create_shared_buffer(nbytes: int) -> tuple[torch.Tensor, int]:
    """A ``nbytes`` uint8 buffer in anonymous shared memory, and the descriptor that maps it in
    another process (``map_shared_buffer``); the caller closes the descriptor once it is sent."""
    fd = os.memfd_create("maye_pl-weights", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, nbytes)
        return map_shared_buffer(fd, nbytes), fd
    except BaseException:
        os.close(fd)
        raise


def map_shared_buffer(fd: int, nbytes: int) -> torch.Tensor:
    """The ``nbytes`` of shared memory behind ``fd`` as a writable uint8 tensor (it keeps the
    mapping alive; ``fd`` may be closed afterwards)."""
    return torch.frombuffer(mmap.mmap(fd, nbytes), dtype=torch.uint8)
