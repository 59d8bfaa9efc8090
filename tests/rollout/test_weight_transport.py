"""The weight transports on their own (no vLLM): two members of a private gloo group in one
process, the sender's tensors arriving bit-exact in the receiver's preallocated buffer, the
backend chosen by device; the shared buffer's two mappings of one memory; the config checks."""

from __future__ import annotations

import os
import threading

import psutil
import pytest
import torch
import torch.distributed as dist

from maye_pl.rollout.callback import RolloutCallback
from maye_pl.rollout.weight_transport import (
    ENGINE_RANK,
    LOOPBACK,
    TRAINER_RANK,
    BucketReceiver,
    backend_for,
    broadcast_tensors,
    bucket_nbytes,
    bucket_views,
    bucketed,
    close_group,
    connect_store,
    create_shared_buffer,
    join_group,
    map_shared_buffer,
    open_store,
    owns,
)
from maye_pl.rollout import vllm_engine


def test_backend_follows_the_engine_device() -> None:
    assert backend_for("cpu") == "gloo"
    assert backend_for("cuda:3") == "nccl"


def test_an_unknown_transport_names_the_key_and_the_choices() -> None:
    with pytest.raises(ValueError, match=r"rollout.weight_transport='shm' must be one of \('collective', 'shared_memory', 'pipe'\)"):
        RolloutCallback(weight_transport="shm")


def test_bucketed_follows_the_byte_bound() -> None:
    tensors = [("a", torch.zeros(64)), ("b", torch.zeros(8)), ("c", torch.zeros(8)), ("d", torch.zeros(2))]
    # fp32 bytes 256, 32, 32, 8: "a" exceeds 100 alone; 32 + 32 = 64 <= 100; + 8 = 72 <= 100.
    assert [[name for name, _ in bucket] for bucket in bucketed(tensors, 100)] == [["a"], ["b", "c", "d"]]


def test_buckets_arrive_exactly_in_the_receive_buffer_and_the_default_group_is_untouched() -> None:
    """A sender and a receiver thread form the group; two buckets of mixed dtypes and odd sizes
    arrive bit-exact as views of one buffer (64-byte aligned slices), which grows once for the
    larger second bucket; no default process group is created; the store is reachable only where
    it was opened."""
    store, rendezvous = open_store(LOOPBACK, LOOPBACK, timeout_s=20)
    listening = {c.laddr.ip for c in psutil.net_connections("tcp")
                 if c.laddr.port == rendezvous.store_port and c.status == psutil.CONN_LISTEN}
    assert listening == {LOOPBACK}  # the store listens on the address it was given, not on every interface
    first = [("w", torch.randn(3, 5)), ("ids", torch.arange(7, dtype=torch.int64)), ("h", torch.randn(9).half())]
    second = [("big", torch.randn(40, 40))]  # 6400 B: more than the 1 KiB initial buffer
    received: list[list[tuple[str, torch.Tensor]]] = []
    buffers: list[int] = []

    def engine_side() -> None:
        group = join_group(connect_store(rendezvous, 20), rendezvous, ENGINE_RANK, "cpu", 20)
        receiver = BucketReceiver(group, torch.device("cpu"), capacity_bytes=1024)
        for bucket in (first, second):
            metas = [(name, tuple(t.shape), str(t.dtype).removeprefix("torch.")) for name, t in bucket]
            tensors = receiver.receive(metas)
            assert all(owns(receiver.buffer, tensor) for _, tensor in tensors)
            assert all(tensor.data_ptr() % 64 == 0 for _, tensor in tensors)
            received.append([(name, tensor.clone()) for name, tensor in tensors])
            buffers.append(receiver.buffer.numel())
        close_group(group)

    engine = threading.Thread(target=engine_side)
    engine.start()
    group = join_group(store, rendezvous, TRAINER_RANK, "cpu", 20)
    for bucket in (first, second):
        broadcast_tensors(group, (tensor for _, tensor in bucket))
    engine.join(timeout=30)
    close_group(group)
    assert not dist.is_initialized()
    for sent, got in zip((first, second), received):
        assert [name for name, _ in got] == [name for name, _ in sent]
        for (_, a), (_, b) in zip(sent, got):
            assert a.dtype == b.dtype and torch.equal(a, b)
    # 3x5 fp32 = 60 B -> 64; 7 int64 = 56 B -> 64; 9 fp16 = 18 B -> 64: 192 B fit in 1 KiB.
    assert buffers == [1024, 6400]


def test_a_shared_buffer_maps_one_memory_wherever_its_descriptor_goes() -> None:
    """What the trainer writes through its mapping is what a second mapping of the descriptor
    (the engine's) reads, bit-exact, in the layout both sides derive from the control message."""
    bucket = [("w", torch.randn(3, 5)), ("ids", torch.arange(7, dtype=torch.int64)), ("h", torch.randn(9).half())]
    metas = [(name, tuple(t.shape), str(t.dtype).removeprefix("torch.")) for name, t in bucket]
    assert bucket_nbytes(metas) == 192  # three 64-byte aligned slices
    trainer_side, fd = create_shared_buffer(bucket_nbytes(metas))
    engine_side = map_shared_buffer(fd, bucket_nbytes(metas))
    os.close(fd)  # the mappings keep the memory
    for (_, view), (_, tensor) in zip(bucket_views(trainer_side, metas), bucket):
        view.copy_(tensor)
    for (name, got), (sent_name, sent) in zip(bucket_views(engine_side, metas), bucket):
        assert name == sent_name and got.dtype == sent.dtype and torch.equal(got, sent)
        assert owns(engine_side, got) and not owns(trainer_side, got)


def test_shared_memory_is_refused_for_a_gpu_engine(monkeypatch) -> None:
    monkeypatch.setattr(vllm_engine, "engine_devices", lambda *args, **kwargs: ["cuda:7"])
    with pytest.raises(ValueError, match=r"weight_transport='shared_memory' needs the engine on this host's CPU, not on cuda:7"):
        vllm_engine.VLLMEngine("unused", weight_transport="shared_memory")
