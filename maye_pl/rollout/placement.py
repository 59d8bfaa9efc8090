"""Where the rollout engine runs, and the environment its process gets.

On an 8-GPU node MAYE trains on 7 GPUs and generates on the 8th. vLLM >= 0.10 removed
``LLM(device=...)``, so the engine's GPU is chosen the one way vLLM still honours: the engine
process starts with ``CUDA_VISIBLE_DEVICES`` naming that single GPU (its ``cuda:0``).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

# torch.distributed / torchelastic / Lightning variables that would make vLLM (which builds its own
# single-process group) join or mimic the trainer's process group.
DISTRIBUTED_ENV_VARS = (
    "RANK",
    "LOCAL_RANK",
    "WORLD_SIZE",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "GROUP_WORLD_SIZE",
    "ROLE_RANK",
    "ROLE_NAME",
    "ROLE_WORLD_SIZE",
    "NODE_RANK",
    "MASTER_ADDR",
    "MASTER_PORT",
)
DISTRIBUTED_ENV_PREFIXES = ("TORCHELASTIC_", "PL_")

_CUDA = re.compile(r"cuda:(\d+)")


def choose_engine_device(
    requested: str, *, trainer_devices: int, visible_gpus: int, allow_shared: bool = False
) -> str:
    """Resolve ``rollout.device`` to ``"cpu"`` or ``"cuda:N"`` (N counts the visible GPUs).

    Args:
        requested: ``"auto"``, ``"cpu"`` or ``"cuda:N"``.
        trainer_devices: GPUs the trainer uses (``trainer.devices``; they are cuda:0..k-1).
        visible_gpus: GPUs visible to this process (``torch.cuda.device_count()``).
        allow_shared: allow the engine on a GPU the trainer also uses (memory permitting).

    ``"auto"`` picks ``"cpu"`` on a machine without GPUs and otherwise the first GPU the trainer
    does not use: 7 trainer devices on 8 GPUs -> ``"cuda:7"``.
    """
    if requested == "cpu":
        return "cpu"
    if requested == "auto":
        if visible_gpus == 0:
            return "cpu"
        if trainer_devices < visible_gpus:
            return f"cuda:{trainer_devices}"
        if allow_shared:
            return "cuda:0"
        raise ValueError(
            f"`rollout.device`='auto' needs a GPU the trainer does not use, but `trainer.devices`="
            f"{trainer_devices} uses all {visible_gpus} visible GPUs; set `trainer.devices`="
            f"{visible_gpus - 1} to leave cuda:{visible_gpus - 1} to the engine, or set "
            "`rollout.allow_shared_device`=true to run the engine beside a trainer rank."
        )
    match = _CUDA.fullmatch(requested)
    if match is None:
        raise ValueError(f"`rollout.device`={requested!r} must be 'auto', 'cpu' or 'cuda:N'.")
    index = int(match.group(1))
    if index >= visible_gpus:
        fix = (
            f"pick cuda:0..cuda:{visible_gpus - 1} or 'auto'"
            if visible_gpus
            else "use 'cpu' or 'auto'"
        )
        raise ValueError(
            f"`rollout.device`={requested!r} but {visible_gpus} GPU(s) are visible; {fix}."
        )
    if index < trainer_devices and not allow_shared:
        raise ValueError(
            f"`rollout.device`={requested!r} is one of the trainer's GPUs (`trainer.devices`="
            f"{trainer_devices} uses cuda:0..cuda:{trainer_devices - 1}); pick "
            f"cuda:{trainer_devices} or higher, lower `trainer.devices`, or set "
            "`rollout.allow_shared_device`=true."
        )
    return requested


def engine_environment(device: str, parent_env: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of the engine process: the parent's, minus the distributed variables,
    with ``CUDA_VISIBLE_DEVICES`` naming the engine's one GPU.

    ``cuda:N`` counts in the parent's visible numbering, so under a parent
    ``CUDA_VISIBLE_DEVICES="2,3,5"`` the engine on ``cuda:2`` gets ``CUDA_VISIBLE_DEVICES="5"``.
    A CPU engine gets ``CUDA_VISIBLE_DEVICES=""`` so it cannot touch the trainer's GPUs.
    """
    env = dict(os.environ if parent_env is None else parent_env)
    for key in list(env):
        if key in DISTRIBUTED_ENV_VARS or key.startswith(DISTRIBUTED_ENV_PREFIXES):
            del env[key]
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
        return env
    index = int(_CUDA.fullmatch(device).group(1))
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if visible:
        physical = [d.strip() for d in visible.split(",") if d.strip()]
        if index >= len(physical):
            raise ValueError(
                f"engine device {device!r} is outside the parent's "
                f"CUDA_VISIBLE_DEVICES={visible!r}; pick cuda:0..cuda:{len(physical) - 1}."
            )
        env["CUDA_VISIBLE_DEVICES"] = physical[index]
    else:
        env["CUDA_VISIBLE_DEVICES"] = str(index)
    return env
