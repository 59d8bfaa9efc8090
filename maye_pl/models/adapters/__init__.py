"""One adapter per VLM family, chosen by the checkpoint's ``config.model_type`` (see ``base.py``).

Adding a family: one file here defining ``ADAPTER`` (with its tiny build), listed in ``_FAMILIES``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from maye_pl.models.adapters import qwen2_5_vl, qwen2_vl, qwen3_5, qwen3_vl
from maye_pl.models.adapters.base import QWEN_VISION_TOKENS, ModelAdapter

_FAMILIES = (qwen2_vl, qwen2_5_vl, qwen3_vl, qwen3_5)
ADAPTERS: dict[str, ModelAdapter] = {family.ADAPTER.model_type: family.ADAPTER for family in _FAMILIES}
"""``config.model_type`` → its adapter."""


def adapter_for(source: str | os.PathLike | Any) -> ModelAdapter:
    """The adapter of a checkpoint directory, an HF config, or a model (its ``.config``).

    Raises:
        ValueError: the model type has no adapter, naming the supported ones.
        FileNotFoundError: a directory without ``config.json``.
    """
    if isinstance(source, (str, os.PathLike)):
        config_file = Path(source) / "config.json"
        if not config_file.is_file():
            raise FileNotFoundError(
                f"{config_file} not found: `model.model_path`={str(source)!r} must be a local HF checkpoint "
                "directory (config.json, weights, tokenizer, processor)."
            )
        model_type, where = json.loads(config_file.read_text()).get("model_type"), str(config_file)
    else:
        config = getattr(source, "config", source)
        model_type, where = getattr(config, "model_type", None), type(source).__name__
    if model_type not in ADAPTERS:
        raise ValueError(
            f"{where}: model_type={model_type!r} has no maye_pl model adapter; supported: "
            f"{', '.join(f'{t} ({a.family})' for t, a in ADAPTERS.items())}. Use a checkpoint of one of "
            "these families, or add maye_pl/models/adapters/<family>.py."
        )
    return ADAPTERS[model_type]


__all__ = ["ADAPTERS", "QWEN_VISION_TOKENS", "ModelAdapter", "adapter_for"]
