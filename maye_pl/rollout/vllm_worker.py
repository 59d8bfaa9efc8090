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

Why bytes: tensors passed as ``collective_rpc`` arguments do not survive the trip into vLLM's
engine process; a safetensors blob does, and it is also what crosses the pipe from the trainer.
"""

from __future__ import annotations

import safetensors.torch


class WeightSyncExtension:
    """Worker-side half of ``VLLMEngine.update_weights`` (mixed into vLLM's ``Worker``)."""

    def maye_begin_weight_update(self) -> None:
        """Put every layer in checkpoint layout; its loaders buffer until the layer is complete."""
        from vllm.config import set_current_vllm_config
        from vllm.model_executor.model_loader.reload.layerwise import initialize_layerwise_reload

        with set_current_vllm_config(self.vllm_config):
            initialize_layerwise_reload(self.model_runner.get_model())
        self._maye_loaded: set[str] = set()

    def maye_load_weight_bucket(self, payload: bytes) -> int:
        """Load a bucket (``safetensors.torch.save`` bytes, HF names); returns its tensor count."""
        from vllm.config import set_current_vllm_config

        tensors = safetensors.torch.load(payload)
        with set_current_vllm_config(self.vllm_config):
            # The model's own loader maps HF names (e.g. ``model.language_model.layers.0...``)
            # to its fused parameters (qkv_proj, gate_up_proj).
            self._maye_loaded |= self.model_runner.get_model().load_weights(iter(tensors.items()))
        return len(tensors)

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
        return sorted({name for name, _ in model.named_parameters()} - self._maye_loaded)
