"""The trainer's half of a weight update: moving one bucket of full weights into the engine.

One ``WeightPusher`` per engine, chosen once by ``rollout.weight_transport`` when the engine is
built (``make_pusher``); ``VLLMEngine.weight_update`` calls ``begin`` once per transaction and
``push`` once per bucket. Each pusher converts to the engine's dtype and re-buckets to the
engine's bucket size on the way:

- ``CollectivePusher``: a broadcast over a private 2-process group with the engine's worker (gloo
  on the CPU, NCCL on a GPU; ``weight_transport``) into its preallocated receive buffer; the
  connection carries only names, shapes and dtypes.
- ``SharedMemoryPusher``: an engine on this host's CPU; the bucket is written into memory both
  processes map and the worker loads straight from it.
- ``PipePusher``: safetensors bytes over the engine's connection (the fallback).

Each pusher's worker-side half is ``vllm_worker.WeightSyncExtension``.
"""

from __future__ import annotations

import os
from typing import ClassVar

import torch

from maye_pl.models.loading import resolve_dtype
from maye_pl.rollout.rpc import EngineRPC, VLLMEngineError
from maye_pl.rollout.weight_transport import (
    TRAINER_RANK,
    TensorMeta,
    backend_for,
    broadcast_tensors,
    bucket_nbytes,
    bucket_views,
    bucketed,
    check_transport,
    close_group,
    create_shared_buffer,
    join_group,
    open_store,
)
from maye_pl.types import NamedTensors


class WeightPusher:
    """Moves buckets of full weights (HF names) into one engine's worker.

    Args:
        rpc: the engine's connection.
        device: the engine's device (``"cpu"`` or ``"cuda:N"``).
        dtype: the engine's dtype name; floating-point tensors are converted to it.
        bucket_bytes: the most bytes moved per transfer (a larger single tensor moves alone).
        group_timeout_s: how long one collective operation may take (the collective transport).
        workers: the engine's worker processes (its tensor-parallel size): each receives every bucket.
    """

    transport: ClassVar[str]

    def __init__(self, rpc: EngineRPC, *, device: str, dtype: str, bucket_bytes: int, group_timeout_s: float,
                 workers: int = 1) -> None:
        self.rpc = rpc
        self.workers = workers
        self.device = device
        self.dtype = resolve_dtype(dtype)
        self.bucket_bytes = bucket_bytes
        self.group_timeout_s = group_timeout_s

    def begin(self) -> None:
        """A transaction starts (the engine has finished whatever it was doing)."""

    def push(self, bucket: NamedTensors) -> None:
        """Load ``bucket`` into the engine; returns once the engine has loaded it."""
        raise NotImplementedError

    def close(self) -> None:
        """Release what the transport holds (the engine is shut down)."""

    def engine_tensor(self, tensor: torch.Tensor, device: torch.device | str) -> torch.Tensor:
        """``tensor`` as the engine holds it: engine dtype, contiguous, on ``device`` (no copy
        when it already is)."""
        dtype = self.dtype if tensor.is_floating_point() else tensor.dtype
        return tensor.detach().to(device=device, dtype=dtype).contiguous()

    def metas(self, part: NamedTensors) -> list[TensorMeta]:
        """The control message of one bucket: (name, shape, engine dtype) per tensor."""
        return [
            (name, tuple(tensor.shape), str(self.dtype if tensor.is_floating_point() else tensor.dtype).removeprefix("torch."))
            for name, tensor in part
        ]


class PipePusher(WeightPusher):
    """Safetensors bytes through the engine's connection (the fallback)."""

    transport = "pipe"

    def push(self, bucket: NamedTensors) -> None:
        import safetensors.torch

        for part in bucketed(bucket, self.bucket_bytes):
            tensors = {name: self.engine_tensor(tensor, "cpu") for name, tensor in part}
            self.rpc.call("load_bucket", safetensors.torch.save(tensors))


class SharedMemoryPusher(WeightPusher):
    """A buffer this process and a CPU engine on this host both map (an anonymous memfd)."""

    transport = "shared_memory"

    def __init__(self, rpc: EngineRPC, **options) -> None:
        super().__init__(rpc, **options)
        self.buffer: torch.Tensor | None = None

    def push(self, bucket: NamedTensors) -> None:
        for part in bucketed(bucket, self.bucket_bytes):
            metas = self.metas(part)
            nbytes = bucket_nbytes(metas)
            if self.buffer is None or nbytes > self.buffer.numel():
                self._map_buffer(max(nbytes, self.bucket_bytes))
            # The worker is idle (the previous bucket's load has returned): overwrite in place,
            # converting to the engine dtype on the way.
            for (_, view), (_, tensor) in zip(bucket_views(self.buffer, metas), part):
                view.copy_(tensor.detach())
            self.rpc.call("load_shared_bucket", metas)

    def _map_buffer(self, nbytes: int) -> None:
        """Create the shared bucket buffer and hand its descriptor to the engine's worker."""
        buffer, fd = create_shared_buffer(nbytes)
        try:
            request_id = self.rpc.send("map_shared_buffer", nbytes)
            self.rpc.send_handle(fd, "map_shared_buffer")  # right behind the request that receives it
        finally:
            os.close(fd)
        self.rpc.wait(request_id, "map_shared_buffer")
        self.buffer = buffer

    def close(self) -> None:
        self.buffer = None  # unmapped once nothing views it; gone with the engine's mapping


class CollectivePusher(WeightPusher):
    """A broadcast over a private process group with the engine's workers (gloo / NCCL): this
    process and one worker (two with tensor parallelism 2, ...)."""

    transport = "collective"

    def __init__(self, rpc: EngineRPC, **options) -> None:
        super().__init__(rpc, **options)
        self.group = None  # this process's member of the group, formed at the first transaction

    def begin(self) -> None:
        if self.group is not None:
            return
        size = 1 + self.workers
        store, rendezvous = open_store(*self.rpc.host.weight_group_addresses, self.group_timeout_s, size)
        request_id = self.rpc.send("join_weight_group", (rendezvous, self.group_timeout_s, self.bucket_bytes, size))
        try:  # the workers join while this process does
            self.group = join_group(store, rendezvous, TRAINER_RANK, self.device, self.group_timeout_s, size)
        except RuntimeError as error:
            raise self._transfer_failed(error) from error
        self.rpc.wait(request_id, "join_weight_group")

    def push(self, bucket: NamedTensors) -> None:
        # NCCL sends from the trainer's current GPU, gloo from host memory.
        cuda = backend_for(self.device) == "nccl"
        device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
        for part in bucketed(bucket, self.bucket_bytes):
            request_id = self.rpc.send("receive_bucket", self.metas(part))  # the worker posts its receives ...
            try:  # ... while this process sends, converting lazily (no copy of the whole bucket)
                broadcast_tensors(self.group, (self.engine_tensor(t, device) for _, t in part))
            except RuntimeError as error:
                raise self._transfer_failed(error) from error
            self.rpc.wait(request_id, "receive_bucket")  # loaded

    def close(self) -> None:
        if self.group is not None:
            close_group(self.group)
            self.group = None

    def _transfer_failed(self, error: RuntimeError) -> VLLMEngineError:
        # A killed engine closes its sockets just before it exits.
        if self.rpc.host.exit_code(wait_s=2) is not None:
            return self.rpc.died("the weight transfer")
        self.rpc.on_fatal()
        return VLLMEngineError(
            f"weight transfer to the vLLM engine failed ({error}; {self.rpc.name}); the engine was shut "
            f"down. One bucket may take weight_group_timeout_s={self.group_timeout_s} s to move; "
            "if the collective transport keeps failing here, set rollout.weight_transport=pipe."
        )


PUSHERS: dict[str, type[WeightPusher]] = {cls.transport: cls for cls in (CollectivePusher, SharedMemoryPusher, PipePusher)}


def make_pusher(transport: str, rpc: EngineRPC, **options) -> WeightPusher:
    """The pusher of ``rollout.weight_transport`` ``transport`` for the engine behind ``rpc``
    (``options``: ``WeightPusher``'s)."""
    return PUSHERS[check_transport(transport, options["device"])](rpc, **options)
