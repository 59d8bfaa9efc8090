"""Session-wide fixtures shared by the whole test suite.

- ``tiny_model_dir``: a tiny random Qwen2.5-VL checkpoint (built once per session, ~2 s).
- ``tiny_processor``: its ``AutoProcessor``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

import maye_pl  # noqa: F401  (applies the torchvision shim before transformers/vLLM import it)
from maye_pl.models.tiny import ensure_tiny_model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Path of a tiny random Qwen2.5-VL (seed 0) that transformers and vLLM both load."""
    return ensure_tiny_model(tmp_path_factory.mktemp("models") / "tiny_qwen2_5_vl", seed=0)


@pytest.fixture(scope="session")
def tiny_processor(tiny_model_dir: Path):
    """The tiny model's ``Qwen2_5_VLProcessor`` (tokenizer + image processor + chat template)."""
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(tiny_model_dir)
