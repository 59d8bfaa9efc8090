"""A vLLM worker extension that loads new policy weights streamed in buckets.

vLLM mixes this class into its worker (``LLM(worker_extension_cls=...)``), so its methods run
next to the model and are called with ``llm.collective_rpc("<method>", args=...)``.

Why not ``model.load_weights`` directly: vLLM repacks weights after loading (the CPU backend
re-lays out every linear weight for its GEMM kernels; quantized GPU layers do the same), so a
plain ``load_weights`` on the live model writes checkpoint-layout tensors into kernel-layout
parameters. vLLM's in-place reload (``vllm/model_executor/model_loader/reload``) handles that
layer by layer: it puts each layer back into checkpoint layout, buffers the incoming tensors
until the layer is complete, then re-runs the layer's post-load processing. ``reload_weights``
wraps that machinery in one call that wants every weight in one iterator; streaming in buckets
needs its three phases as separate calls: begin, load bucket after bucket, finish.

Three transports deliver the buckets: ``maye_receive_weight_bucket`` receives a bucket by
broadcast over a private process group with the trainer (``weight_transport``) into a receive
buffer allocated once; ``maye_load_shared_weight_bucket`` loads a bucket the trainer wrote into
memory both processes map (a CPU engine); ``maye_load_weight_bucket`` takes a safetensors blob
that crossed the pipe (the fallback; tensors passed as ``collective_rpc`` arguments do not survive
the trip into vLLM's engine process, bytes do).
"""

from __future__ import annotations

import os

import safetensors.torch
import torch

from maye_pl.rollout import weight_transport


class WeightSyncExtension:
    """Worker-side half of ``VLLMEngine.weight_update`` (mixed into vLLM's ``Worker``)."""

    def maye_begin_weight_update(self) -> None:
        """Put every layer in checkpoint layout; its loaders buffer until the layer is complete."""
        from vllm.config import set_current_vllm_config
        from vllm.model_executor.model_loader.reload.layerwise import initialize_layerwise_reload

        with set_current_vllm_config(self.vllm_config):
            initialize_layerwise_reload(self.model_runner.get_model())
        self._maye_loaded: set[str] = set()
        self._maye_counts()["begun"] += 1

    def maye_load_weight_bucket(self, payload: bytes) -> int:
        """Load a bucket (``safetensors.torch.save`` bytes, HF names); returns its tensor count."""
        tensors = safetensors.torch.load(payload)
        self._maye_load(list(tensors.items()))
        return len(tensors)

    def maye_join_weight_group(self, rendezvous: weight_transport.Rendezvous, timeout_s: float, capacity_bytes: int,
                               group_size: int) -> None:
        """Join the trainer's group (rank 1 + this worker's tensor-parallel rank) and allocate the
        receive buffer."""
        store = weight_transport.connect_store(rendezvous, timeout_s, group_size)
        rank = weight_transport.ENGINE_RANK + self.rank
        group = weight_transport.join_group(store, rendezvous, rank, self.device, timeout_s, group_size)
        self._maye_receiver = weight_transport.BucketReceiver(group, self.device, capacity_bytes)

    def maye_receive_weight_bucket(self, metas: list[weight_transport.TensorMeta]) -> int:
        """Receive a bucket by broadcast (``metas``: name, shape, dtype each) and load it; returns
        its tensor count."""
        receiver = self._maye_receiver
        return self._maye_load_from_buffer(receiver.receive(metas), receiver.buffer)

    def maye_map_shared_weight_buffer(self, fd: int, nbytes: int) -> None:
        """Map the trainer's shared bucket buffer (``fd``: a descriptor of this process)."""
        try:
            self._maye_shared_buffer = weight_transport.map_shared_buffer(fd, nbytes)
        finally:
            os.close(fd)

    def maye_load_shared_weight_bucket(self, metas: list[weight_transport.TensorMeta]) -> int:
        """Load the bucket the trainer wrote into the shared buffer; returns its tensor count."""
        buffer = self._maye_shared_buffer
        return self._maye_load_from_buffer(weight_transport.bucket_views(buffer, metas), buffer)

    def maye_finish_weight_update(self) -> list[str]:
        """Process the loaded layers into kernel layout; returns the vLLM parameters not updated."""
        from vllm.config import set_current_vllm_config
        from vllm.model_executor.model_loader.reload.layerwise import finalize_layerwise_reload

        model = self.model_runner.get_model()
        with set_current_vllm_config(self.vllm_config):
            finalize_layerwise_reload(model, self.vllm_config.model_config)
        # Stale vision embeddings computed with the old weights must not be reused.
        self.model_runner.reset_encoder_cache()
        self.model_runner.reset_mm_cache()
        self._maye_counts()["finished"] += 1
        return sorted({name for name, _ in model.named_parameters()} - self._maye_loaded)

    def maye_weight_update_counts(self) -> dict[str, int]:
        """Transactions begun and finished, and buckets loaded, since the engine started."""
        return dict(self._maye_counts())

    def _maye_load(self, tensors: list[tuple[str, torch.Tensor]]) -> None:
        from vllm.config import set_current_vllm_config

        with set_current_vllm_config(self.vllm_config):
            # The model's own loader maps HF names (e.g. ``model.language_model.layers.0...``)
            # to its fused parameters (qkv_proj, gate_up_proj).
            self._maye_loaded |= self.model_runner.get_model().load_weights(iter(tensors))
        self._maye_counts()["buckets"] += 1

    def _maye_load_from_buffer(self, tensors: list[tuple[str, torch.Tensor]], buffer: torch.Tensor) -> int:
        """Load ``tensors``, views of a transfer ``buffer`` the next bucket overwrites."""
        self._maye_load(tensors)
        # A layer whose weights straddle two buckets (or that is processed only at the finish)
        # keeps its loaded tensors until then; those tensors get their own copy.
        from vllm.model_executor.model_loader.reload.layerwise import LAYERWISE_INFO

        for layer in self.model_runner.get_model().modules():
            info = LAYERWISE_INFO.get(layer)
            for _, bound in info.loaded_weights if info is not None else ():
                for key, value in bound.arguments.items():
                    if isinstance(value, torch.Tensor) and weight_transport.owns(buffer, value):
                        bound.arguments[key] = value.clone()
        return len(tensors)

    def _maye_counts(self) -> dict[str, int]:
        if not hasattr(self, "_maye_update_counts"):
            self._maye_update_counts = {"begun": 0, "buckets": 0, "finished": 0}
        return self._maye_update_counts
