"""The engine host: the process ``vllm.LLM`` runs in, and how the trainer starts and stops it.

Why a separate process: inside a distributed trainer, an in-process ``vllm.LLM`` sees the
trainer's torch.distributed environment and hangs or joins the wrong group; its own process gets
a clean environment (``placement.engine_environment``) and, on a GPU node, exactly its GPUs.

Topology (nothing else is started; vLLM's engine core and worker run inside the host)::

    trainer process (engine owner)           engine host process (spawned)
      VLLMEngine ── EngineRPC ── Pipe ──────► serve(): vllm.LLM (VLLM_ENABLE_V1_MULTIPROCESSING=0,
                                                               uni executor: no further processes)

vLLM's engine core normally runs in yet another process, started with the ``spawn`` method on
CPU; such a fresh interpreter never imports ``maye_pl`` and so never gets the torchvision shim
(``maye_pl/_torchvision_shim.py``) and dies importing the Qwen2-VL processor. In-process it shares
the host's shim, starts in ~3 s instead of ~25 s on CPU, and the host is the only process to clean
up. The one subprocess vLLM still runs (model inspection) is pointed at a command that imports
``maye_pl`` first (``vllm_imports``).

Start: the host imports vLLM first, then waits for the "start" request (a ``StartRequest``: the
engine's arguments, environment and cores). ``python -m maye_pl fit`` (on a machine without GPUs)
starts a host before importing the CLI (``prestart_host``), so vLLM's import overlaps the
trainer's and the first CPU engine adopts that host.

Lifetime: ``HostProcess.stop`` asks the host to exit and then kills whatever is left of its
process tree. If the trainer dies without cleaning up (SIGKILL, SIGTERM), the kernel kills the
host (``PR_SET_PDEATHSIG``). The host ignores SIGINT so that Ctrl-C in a terminal reaches the
trainer only, which then shuts the host down.

Messages: the trainer sends ``(request id, op, payload)`` and the host answers each with
``(request id, "ok" | "error", result or traceback)``, in order. ``serve`` is the loop over one
connection (a Pipe here; any ``multiprocessing.connection.Connection`` works).

An engine server (``engine_server.py``) runs the same host: instead of "start" its first message
is "serve_client" with the client's ``StartRequest`` (completed with the server's environment),
followed by the client's socket (SCM_RIGHTS); the host then starts the engine and serves that
socket until the client leaves, and exits.
"""

from __future__ import annotations

import atexit
import ctypes
import logging
import multiprocessing
import os
import signal
import sys
import traceback
from dataclasses import dataclass, replace
from typing import Any

import torch

from maye_pl.rollout.cores import pin_process
from maye_pl.rollout.placement import engine_environment
from maye_pl.rollout.weight_transport import LOOPBACK

logger = logging.getLogger(__name__)

HOST_PROCESS_NAME = "maye_pl-engine"
"""The engine host's process name (``ps``, ``psutil.Process.name()``; Linux keeps 15 bytes)."""
START_REQUEST_ID = 0
"""The id of the "start" request (the engine's arguments); the host's first reply answers it."""
SHUTDOWN_REQUEST_ID = -1
"""The id of the "shutdown" request, which nobody waits for."""
_PR_SET_PDEATHSIG, _PR_SET_NAME = 1, 15


@dataclass(frozen=True)
class StartRequest:
    """The "start" request's payload: what the engine runs and where.

    A local host gets the engine's environment and CPU cores from its trainer. An engine server's
    machine is its own: a trainer sends it only the log level, and the server fills in its
    environment (``with_env``) before handing the request to its host.
    """

    engine_args: dict[str, Any]
    """``vllm.LLM``'s keyword arguments (``vllm_engine.vllm_engine_args``)."""
    log_level: str
    """vLLM's log level (``rollout.log_level``)."""
    env: dict[str, str] | None = None
    """The engine's environment (``host_environment``); None until the engine's machine sets it."""
    cpu_cores: tuple[int, ...] | None = None
    """Cores to pin the engine to (a CPU engine beside a pipelined trainer); None: every core."""

    def with_env(self, env: dict[str, str]) -> StartRequest:
        return replace(self, env=env)


class HostProcess:
    """A spawned engine host: its process and the trainer's end of its pipe (``conn``)."""

    weight_group_addresses = (LOOPBACK, LOOPBACK)  # the host runs on this machine
    log_location = "its log above"  # the host writes to the trainer's terminal

    def __init__(self, process: multiprocessing.process.BaseProcess, conn: Any) -> None:
        self.process = process
        self.conn = conn

    @property
    def pid(self) -> int:
        return self.process.pid

    def is_alive(self) -> bool:
        return self.process.is_alive()

    def exit_code(self, wait_s: float) -> int | None:
        """The host's exit code, waiting up to ``wait_s`` for it to end (None: still running)."""
        self.process.join(timeout=wait_s)
        return self.process.exitcode

    def lost(self, op: str, wait_s: float) -> str:
        return f"vLLM engine process died during {op} (exit code {self.exit_code(wait_s)})"

    def stop(self, grace_s: float = 5.0) -> None:
        """Ask the host to exit; kill its process tree if it has not within ``grace_s``.

        An idle host exits at once. A busy one (interrupted mid-generation) would answer only
        after finishing; nothing it holds needs a graceful teardown, so it is killed.
        """
        import psutil

        process = self.process
        try:
            leftovers = psutil.Process(process.pid).children(recursive=True) if process.is_alive() else []
        except psutil.NoSuchProcess:
            leftovers = []
        try:
            self.conn.send((SHUTDOWN_REQUEST_ID, "shutdown", None))
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
        self.conn.close()


def host_environment(device: str, log_level: str = "warning") -> dict[str, str]:
    """The engine host's environment: placement's for ``device``, vLLM's engine core in the host
    (see top), and vLLM's log level (``VLLM_LOGGING_LEVEL``, read when the host imports vllm)."""
    env = engine_environment(device)
    env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    env["VLLM_LOGGING_LEVEL"] = log_level.upper()
    return env


def spawn_host(env: dict[str, str], device: str) -> HostProcess:
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
    return HostProcess(process, conn)


# ----------------------------------------------------------------------------------- prestarting

_prestarted: HostProcess | None = None
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
    _prestarted = spawn_host(host_environment("cpu"), "cpu")
    logger.debug("engine host prestarted (pid %d)", _prestarted.pid)
    return True


def discard_prestarted_host() -> None:
    """Stop the prestarted engine host if no engine adopted it (a run without a vLLM engine)."""
    global _prestarted
    if _prestarted is not None:
        _prestarted.stop(grace_s=0.0)  # it holds nothing yet; mid-import it cannot answer
        _prestarted = None


atexit.register(discard_prestarted_host)


def take_prestarted_host(device: str) -> HostProcess | None:
    """The prestarted host for an engine on ``device``, if there is a live one (taken once)."""
    global _prestarted
    if device != "cpu" or _prestarted is None:
        return None
    host, _prestarted = _prestarted, None
    if host.is_alive():
        return host
    host.stop()
    return None


# --------------------------------------------------------------------------- inside the host


def _host_main(conn, env: dict[str, str], parent_pid: int, device: str) -> None:
    """The host process: import vLLM, start the engine the "start" request describes, then serve
    the trainer's requests until "shutdown" or the pipe closes."""
    os.environ.clear()
    os.environ.update(env)
    _die_with_parent(parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the trainer's to handle
    if device == "cpu":
        _keep_freed_memory_mapped()
    try:
        from maye_pl.rollout.vllm_imports import import_vllm

        import_vllm()
        if device == "cpu":
            _use_torch_gemm_for_linear_layers()
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
    if op == "serve_client":  # an engine server's client: its socket follows; serve it from now on
        from multiprocessing.connection import Connection
        from multiprocessing.reduction import recv_handle

        conn = Connection(recv_handle(conn))
    try:
        if import_error is not None:
            raise RuntimeError(f"importing vLLM failed:\n{import_error}")
        llm, rules = start_engine(payload)
    except BaseException:
        _reply(conn, (request_id, "error", traceback.format_exc()))
        return
    if _reply(conn, (request_id, "ok", None)):
        serve(conn, llm, rules)
    # vLLM's in-process teardown can block on its background threads; nothing is left to flush.
    os._exit(0)


def start_engine(request: StartRequest):
    """``(vllm.LLM, GenerationRules)`` for a "start" request, in the engine's own environment (a
    prestarted host's was provisional), on its cores if it names them."""
    from vllm import LLM

    from maye_pl.rollout.vllm_imports import set_vllm_log_level
    from maye_pl.rollout.vllm_requests import generation_rules

    os.environ.clear()
    os.environ.update(request.env)
    set_vllm_log_level(request.env["VLLM_LOGGING_LEVEL"])
    if request.cpu_cores:
        # Before vLLM's CPU worker exists: it replaces torch.set_num_threads with a no-op stub.
        pin_process(request.cpu_cores)
    llm = LLM(**request.engine_args)
    return llm, generation_rules(llm, request.engine_args["model"])


def serve(conn, llm, rules) -> None:
    """Answer ``(request id, op, payload)`` requests on ``conn`` in order until "shutdown" or the
    connection closes. An operation's error is its reply (the traceback); the host serves on."""
    from multiprocessing.reduction import recv_handle

    from maye_pl.rollout.vllm_requests import generate

    handlers = {
        "generate": lambda payload: generate(llm, *payload, rules),
        "begin_update": lambda _: llm.collective_rpc("maye_begin_weight_update"),
        "load_bucket": lambda payload: llm.collective_rpc("maye_load_weight_bucket", args=(payload,)),
        "finish_update": lambda _: _finish_update(llm),
        "join_weight_group": lambda payload: llm.collective_rpc("maye_join_weight_group", args=payload),
        "receive_bucket": lambda metas: llm.collective_rpc("maye_receive_weight_bucket", args=(metas,)),
        # The descriptor follows its request on the pipe (SCM_RIGHTS); the worker closes it.
        "map_shared_buffer": lambda nbytes: llm.collective_rpc(
            "maye_map_shared_weight_buffer", args=(recv_handle(conn), nbytes)
        ),
        "load_shared_bucket": lambda metas: llm.collective_rpc("maye_load_shared_weight_bucket", args=(metas,)),
        "weight_update_counts": lambda _: llm.collective_rpc("maye_weight_update_counts")[0],
    }
    while True:
        try:
            request_id, op, payload = conn.recv()
        except (EOFError, OSError):
            return  # the trainer is gone (closed, reset, or a remote one's keep-alive timed out)
        if op == "shutdown":
            return
        try:
            reply = (request_id, "ok", handlers[op](payload))
        except BaseException:
            reply = (request_id, "error", traceback.format_exc())
        if not _reply(conn, reply):
            return


def _reply(conn, reply: tuple) -> bool:
    """Send ``reply``; False when the trainer is gone (it left while the engine worked)."""
    try:
        conn.send(reply)
    except OSError:
        return False
    return True


def _finish_update(llm) -> list[str]:
    (not_updated,) = llm.collective_rpc("maye_finish_weight_update")
    # Cached prefixes and encoder outputs were computed with the old weights. The scheduler keeps
    # its own record of cached encoder outputs: resetting only the worker's cache makes the next
    # image request fail with "Encoder cache miss".
    llm.reset_prefix_cache()
    llm.llm_engine.reset_encoder_cache()
    llm.reset_mm_cache()
    return not_updated


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


def _use_torch_gemm_for_linear_layers() -> None:
    """Have vLLM's CPU linear layers multiply with torch's GEMM, not its oneDNN matmul handlers.

    vLLM's CPU backend runs each unquantized linear layer through a oneDNN handler
    (``vllm._custom_ops.create_onednn_mm``) that compiles a matmul kernel for every token count M
    it meets and keeps it in a process-wide cache per weight shape (32 kernels per shape, least
    recently used evicted), while oneDNN's own primitive cache keeps up to 1,024 more. Rollouts
    meet a new M at nearly every step (a batch's prompt tokens, the number of unfinished samples),
    so the host compiled and kept kernels for as long as it ran, and their churn fragmented the
    heap: engine RSS 1,003 -> 1,197 MiB over a 320-step demo fit, still rising. The same prompts
    every step held it flat; ``ONEDNN_PRIMITIVE_CACHE_CAPACITY=0`` stopped the growth of memory in
    use but not of the heap (+17 MiB from generation 30 to 70 of an engine-only loop). torch's
    GEMM (MKL for float32) keeps nothing per shape: over the same loop the heap stayed at
    512.8 MiB, and over a 320-step demo fit the engine's RSS went 1,013 -> 1,014 (step 160) ->
    1,011 MiB (``scripts/soak.py``). On the tiny demo model a generation took as long either way
    (within the loaded machine's noise); a large model on a CPU was not measured.
    vLLM reads the flag when it builds each layer, so this runs before the engine starts.
    """
    import vllm._custom_ops as vllm_ops

    if not hasattr(vllm_ops, "_supports_onednn"):  # another vLLM: its CPU GEMM dispatch changed
        logger.warning("vLLM has no _custom_ops._supports_onednn: its CPU linear layers keep their own kernels, "
                       "whose per-shape caches may grow the engine's memory over a long run")
        return
    vllm_ops._supports_onednn = False
