"""Importing vLLM in the engine host, and quieting what it logs about this project's own choices.

The engine host (``vllm_host``) imports vLLM once, before any engine exists (a prestarted host:
while the trainer still imports the CLI), then sets vLLM's log level when the engine's own
settings arrive.
"""

from __future__ import annotations

import logging
import sys
import threading
import warnings


def import_vllm() -> None:
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
    drop_log_messages("vllm.v1.worker.cpu_worker", "torch.set_num_threads")
    # A weight update sends only what the trainer changes: the frozen ViT/connector go once, and
    # rotary caches are in no checkpoint. vLLM's layerwise reload keeps each such layer's weights,
    # as intended, but warns "Failed to load weights" per layer per update (about 20 lines per
    # step); the worker's finish_update reports what was kept instead (debug log).
    drop_log_messages("vllm.model_executor.model_loader.reload.layerwise", "Failed to load weights")
    # Warnings about settings this engine makes on purpose (see VLLMEngine and vllm_host): the
    # in-process engine core (it shares the host's seed, and the host runs nothing else), chunked
    # prefill off on CPU, eager mode; and a Mamba-only cache setting.
    drop_log_messages("vllm.engine.arg_utils", "The global random seed is set",
                      "does not officially support disabling chunked prefill")
    drop_log_messages("vllm.config.vllm", "Enforce eager set", "Inductor compilation was disabled")
    drop_log_messages("vllm.platforms.cpu", "Reset SSM cache type")
    # vLLM's kernel dispatcher probes every torch.distributed attribute, including the deprecated
    # alias `reduce_op`, which warns twice at each start; vLLM uses no such alias.
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.reduce_op` is deprecated",
                            category=FutureWarning, module=r"vllm\.triton_utils\.dispatcher")
    # tqdm's default write lock is a multiprocessing RLock: a named semaphore registered with the
    # trainer's resource tracker (this process is spawned from the trainer). The host ends with
    # os._exit, which skips the semaphore's unlink, and the tracker then reported "1 leaked
    # semaphore" at exit. Only this process writes its bars, so a thread lock serves.
    tqdm.set_lock(threading.RLock())


def set_vllm_log_level(level: str) -> None:
    """vLLM's log level (``VLLM_LOGGING_LEVEL``): vLLM reads it when imported, a prestarted host
    imported it before the engine's own setting arrived."""
    vllm_logger = logging.getLogger("vllm")
    vllm_logger.setLevel(level)
    for handler in vllm_logger.handlers:
        handler.setLevel(level)


def drop_log_messages(logger_name: str, *fragments: str) -> None:
    """Drop the records of one logger whose message contains any of ``fragments``."""
    logging.getLogger(logger_name).addFilter(
        lambda record: not any(fragment in record.getMessage() for fragment in fragments)
    )
