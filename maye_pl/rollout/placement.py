"""Where the rollout engines run, and the environment their processes get.

On an 8-GPU node MAYE trains on 7 GPUs and generates on the 8th; ``rollout.num_engines`` K and
``rollout.tensor_parallel_size`` put K engines of that many GPUs each after the trainer's GPUs
(6+2, 4+4 ...). vLLM >= 0.10 removed ``LLM(device=...)``, so an engine's GPUs are chosen the one
way vLLM still honours: the engine process starts with ``CUDA_VISIBLE_DEVICES`` naming them (its
``cuda:0``..).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence

from maye_pl.errors import ConfigError

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

_CUDA = re.compile(r"cuda:(\d+(?:,\d+)*)")


def engine_devices(
    requested: str | Sequence[str],
    *,
    num_engines: int = 1,
    tensor_parallel_size: int = 1,
    trainer_devices: int,
    visible_gpus: int,
    allow_shared: bool = False,
) -> list[str]:
    """Resolve ``rollout.device`` to one device per engine of this node: ``"cpu"``, or
    ``"cuda:N"`` / ``"cuda:N,M,..."`` (an engine's ``tensor_parallel_size`` GPUs; N counts the
    visible GPUs).

    Args:
        requested: ``"auto"``, ``"cpu"``, ``"cuda:N"`` (one engine), or a list of one entry per
            engine, each ``"cpu"``, ``"cuda:N"`` (the engine's first GPU; it spans
            ``tensor_parallel_size`` consecutive ones) or ``"cuda:N,M,..."`` (all of them).
        num_engines: engines on this node (``rollout.num_engines``).
        tensor_parallel_size: GPUs per engine (``rollout.tensor_parallel_size``).
        trainer_devices: GPUs the trainer uses on this node (``trainer.devices``; cuda:0..k-1).
        visible_gpus: GPUs visible to this process (``torch.cuda.device_count()``).
        allow_shared: allow engines on GPUs the trainer also uses (memory permitting).

    ``"auto"`` gives every engine the CPU on a machine without GPUs, and otherwise the GPUs after
    the trainer's, in order: 7 trainer devices on 8 GPUs -> ``["cuda:7"]``; 6 and 2 engines ->
    ``["cuda:6", "cuda:7"]``; 4, 2 engines of 2 GPUs -> ``["cuda:4,5", "cuda:6,7"]``.
    """
    tp = tensor_parallel_size
    if isinstance(requested, str) and requested not in ("auto", "cpu") and num_engines > 1:
        raise ConfigError(
            f"`rollout.device`={requested!r} names one device for `rollout.num_engines`={num_engines} engines; "
            f"give 'auto', 'cpu' or a list of {num_engines} devices, e.g. {[f'cuda:{trainer_devices + i * tp}' for i in range(num_engines)]}."
        )
    if requested == "auto" and visible_gpus:
        first = trainer_devices if trainer_devices + num_engines * tp <= visible_gpus else None
        if first is None and allow_shared and num_engines * tp <= visible_gpus:
            first = 0
        if first is None:
            need = num_engines * tp
            spare = max(visible_gpus - trainer_devices, 0)
            raise ConfigError(
                f"`rollout.device`='auto' needs {need} GPU(s) the trainer does not use (`rollout.num_engines`="
                f"{num_engines} x `rollout.tensor_parallel_size`={tp}), but `trainer.devices`={trainer_devices} "
                f"leaves {spare} of the {visible_gpus} visible GPUs; set `trainer.devices`={max(visible_gpus - need, 0)}, "
                "use fewer engine GPUs, or set `rollout.allow_shared_device`=true to run the engines beside trainer ranks."
            )
        requested = [f"cuda:{','.join(str(first + i * tp + j) for j in range(tp))}" for i in range(num_engines)]
    elif requested in ("auto", "cpu"):
        requested = ["cpu"] * num_engines
    elif isinstance(requested, str):
        requested = [requested]
    if len(requested) != num_engines:
        raise ConfigError(
            f"`rollout.device` lists {len(requested)} device(s) for `rollout.num_engines`={num_engines}; "
            "give one per engine."
        )
    devices = [_one_engine(entry, tp, trainer_devices, visible_gpus, allow_shared) for entry in requested]
    gpus = [gpu for device in devices for gpu in _gpus(device)]
    if len(gpus) != len(set(gpus)):
        raise ConfigError(f"`rollout.device`={list(requested)} places two engines on one GPU; give each its own.")
    return devices


def engines_on_cpu(requested: str | Sequence[str], visible_gpus: int) -> bool:
    """Whether ``rollout.device`` puts every engine on the CPU, as ``engine_devices`` resolves it
    (``"auto"`` does on a machine without GPUs), before that function's checks."""
    entries = [requested] if isinstance(requested, str) else list(requested)
    return all(entry == "cpu" or (entry == "auto" and not visible_gpus) for entry in entries)


def _one_engine(requested: str, tp: int, trainer_devices: int, visible_gpus: int, allow_shared: bool) -> str:
    """One engine's device, checked: ``"cpu"`` or ``"cuda:N,..."`` with exactly ``tp`` GPUs."""
    if requested == "cpu":
        if tp > 1:
            raise ConfigError(
                f"`rollout.tensor_parallel_size`={tp} splits an engine over GPUs; a CPU engine runs in one "
                "process: set it to 1, or place the engines on GPUs."
            )
        return "cpu"
    match = _CUDA.fullmatch(requested)
    if match is None:
        raise ConfigError(f"`rollout.device`={requested!r} must be 'auto', 'cpu' or 'cuda:N' (or a list of them).")
    gpus = [int(index) for index in match.group(1).split(",")]
    if len(gpus) == 1:
        gpus = list(range(gpus[0], gpus[0] + tp))  # the first GPU of tp consecutive ones
    elif len(gpus) != tp:
        raise ConfigError(
            f"`rollout.device`={requested!r} lists {len(gpus)} GPUs for an engine of "
            f"`rollout.tensor_parallel_size`={tp}; list {tp}, or only its first."
        )
    if max(gpus) >= visible_gpus:
        fix = f"pick cuda:0..cuda:{visible_gpus - 1} or 'auto'" if visible_gpus else "use 'cpu' or 'auto'"
        raise ConfigError(f"`rollout.device`={requested!r} but {visible_gpus} GPU(s) are visible; {fix}.")
    if min(gpus) < trainer_devices and not allow_shared:
        raise ConfigError(
            f"`rollout.device`={requested!r} is one of the trainer's GPUs (`trainer.devices`="
            f"{trainer_devices} uses cuda:0..cuda:{trainer_devices - 1}); pick "
            f"cuda:{trainer_devices} or higher, lower `trainer.devices`, or set "
            "`rollout.allow_shared_device`=true."
        )
    return f"cuda:{','.join(map(str, gpus))}"


def _gpus(device: str) -> list[int]:
    """The GPU indices of a resolved engine device (none for ``"cpu"``)."""
    match = _CUDA.fullmatch(device)
    return [int(index) for index in match.group(1).split(",")] if match else []


def engine_environment(device: str, parent_env: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of an engine process: the parent's, minus the distributed variables,
    with ``CUDA_VISIBLE_DEVICES`` naming the engine's GPUs.

    ``cuda:N`` counts in the parent's visible numbering, so under a parent
    ``CUDA_VISIBLE_DEVICES="2,3,5"`` the engine on ``cuda:2`` gets ``CUDA_VISIBLE_DEVICES="5"``
    (and one on ``cuda:0,1`` gets ``"2,3"``). A CPU engine gets ``CUDA_VISIBLE_DEVICES=""`` so it
    cannot touch the trainer's GPUs.
    """
    env = dict(os.environ if parent_env is None else parent_env)
    for key in list(env):
        if key in DISTRIBUTED_ENV_VARS or key.startswith(DISTRIBUTED_ENV_PREFIXES):
            del env[key]
    gpus = _gpus(device)
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if visible:
        physical = [d.strip() for d in visible.split(",") if d.strip()]
        if gpus and max(gpus) >= len(physical):
            raise ConfigError(
                f"engine device {device!r} is outside the parent's "
                f"CUDA_VISIBLE_DEVICES={visible!r}; pick cuda:0..cuda:{len(physical) - 1}."
            )
        env["CUDA_VISIBLE_DEVICES"] = ",".join(physical[gpu] for gpu in gpus)
    else:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, gpus))
    return env
