"""Benchmark the trainer's compute path (Steps III + IV) with and without its two switches, in one run.

    python scripts/bench_trainer.py                 # both shapes, a table
    python scripts/bench_trainer.py --json          # {"results": [{"shape", "baseline_s", ...}]} on stdout
    python scripts/bench_trainer.py --shapes grpo_n8 --repeats 2

What runs: ``ReinforcePP.training_step`` itself, in a Lightning ``Trainer`` on the CPU, on one rollout
batch whose responses are given (a callback hands them to the module instead of an engine): Step III
(tokens, old/ref log-probs, rewards, advantages) and Step IV (PPO minibatches x micro-batches,
forward + backward, optimizer steps), clocked around ``generate_trajectory`` and ``update_policy``:
by default the CPU seconds of this process (all its threads; on an idle machine about the wall
seconds times the threads), which a busy shared machine disturbs far less than wall-clock time;
``--clock wall`` gives elapsed seconds. Two paths, on the same weights and rollouts:

    baseline    today's row micro-batches: ``forward_batch_size`` rows per no-grad pass,
                ``gradient_accumulation_steps`` row chunks per minibatch, every row padded
    optimized   ``model.max_tokens_per_micro_batch`` (length-grouped token budgets) and, where a
                prompt has several samples, ``model.dedup_group_prompts`` (one prompt pass per group)

The model: a random Qwen2.5-VL of ~22M parameters (LLM 6 layers x hidden 512, ViT 2 blocks x 256,
the tiny build's 775-token vocabulary), fp32, large enough that the matrix products dominate. Shapes
(one 448x448 image per prompt = 256 image tokens, plus ~60 text tokens; β_loss 0.001 with a frozen
reference, as the paper):

    grpo_n8   8 prompts x 8 samples, responses uniform over 16-512 tokens; GRPO-style update: one
              minibatch of all 64 rows in 8 micro-batches (its own forward gives π_old: Step III
              scores the reference only)
    maye_n1   64 prompts x 1 sample, responses long-tailed over 16-1024 tokens (median ~70); MAYE's
              update: minibatches of 4 rows in 2 micro-batches (16 optimizer steps), old and ref
              scored in Step III, 16 rows per no-grad pass

Printed per shape: the seconds of each path (the minimum over ``--repeats`` runs, alternating
baseline and optimized so that machine load hits both alike), their ratio, the tokens the forward
passes processed (padding included, counted at the LLM's input), and the largest difference between
the two paths' log-probs (old and reference, every response token; fp32).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import tempfile
import time
from pathlib import Path

import maye_pl  # noqa: F401, I001  (the torchvision shim before lightning and transformers import it)
import lightning.pytorch as pl
import numpy as np
import torch
from PIL import Image

from maye_pl.hparams import LossArgs, PPOArgs
from maye_pl.module import ReinforcePP
from maye_pl.rewards import RewardTerm
from maye_pl.rollout.base import Rollout, SamplingConfig
from maye_pl.rollout.queue import RolloutQueue

IMAGE_SIDE = 448  # 32 x 32 patches of 14 → 16 x 16 = 256 image tokens after the 2x2 merge
QUESTION = (  # with the chat template around it: 62 text tokens (+ 256 image tokens)
    "The triangle ABC has a right angle at C and the radius of the circle is 5. Find the area of the "
    "shaded region in the figure. Round the answer to two decimal places."
)
BUDGET = 8192  # max_tokens_per_micro_batch of the optimized path: a baseline micro-batch's size
SHAPES = {
    # name: prompts, samples, responses (lengths), module settings of both paths
    "grpo_n8": dict(prompts=8, samples=8, ppo_batch_size=64, gradient_accumulation_steps=8),
    "maye_n1": dict(prompts=64, samples=1, ppo_batch_size=4, gradient_accumulation_steps=2),
}


def response_lengths(shape: str, rows: int, rng: np.random.Generator) -> list[int]:
    if shape == "grpo_n8":
        return rng.integers(16, 513, rows).tolist()  # uniform over 16-512
    return np.round(16 * 64 ** (rng.random(rows) ** 1.5)).astype(int).tolist()  # 16-1024, long tail


def build_model(out: Path) -> Path:
    """The benchmark's random Qwen2.5-VL (seed 0) and a processor that keeps 448 px images whole."""
    from transformers import AutoModelForImageTextToText, AutoTokenizer, GenerationConfig, Qwen2_5_VLProcessor
    from transformers import Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    from maye_pl.models.adapters.tiny_parts import tiny_text_config, tiny_vision_config, tiny_vlm_config
    from maye_pl.models.tiny import CHAT_TEMPLATE, ensure_tiny_model

    if (out / "config.json").is_file():
        return out
    tokenizer = AutoTokenizer.from_pretrained(ensure_tiny_model(out.parent / "tiny-qwen2.5-vl"))
    from transformers import Qwen2_5_VLConfig

    text = tiny_text_config(
        tokenizer, hidden_size=512, intermediate_size=1536, num_hidden_layers=6, num_attention_heads=8,
        num_key_value_heads=2, initializer_range=0.02,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [8, 12, 12]},
    )
    vision = tiny_vision_config(hidden_size=256, intermediate_size=1024, num_heads=4, out_hidden_size=512,
                                patch_size=14, window_size=112, fullatt_block_indexes=[1])
    config = tiny_vlm_config(Qwen2_5_VLConfig, tokenizer, text, vision)
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_config(config).to(torch.float32)
    model.generation_config = GenerationConfig(eos_token_id=[tokenizer.convert_tokens_to_ids("<|im_end|>")])
    model.save_pretrained(out)
    pixels = {"min_pixels": 28 * 28 * 4, "max_pixels": IMAGE_SIDE * IMAGE_SIDE, "patch_size": 14}
    Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(**pixels), video_processor=Qwen2VLVideoProcessor(**pixels),
        tokenizer=tokenizer, chat_template=CHAT_TEMPLATE,
    ).save_pretrained(out)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(out)
    return out


def make_batch(shape: str, model_dir: Path, seed: int = 0) -> tuple[list[dict], list[Rollout]]:
    """The prompts (a training batch as MayeDataModule gives it) and their given responses."""
    from transformers import AutoProcessor

    settings, rng = SHAPES[shape], np.random.default_rng(seed)
    processor = AutoProcessor.from_pretrained(model_dir)
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}],
        add_generation_prompt=True, tokenize=False,
    )
    batch = [
        {"id": f"{shape}-{i}", "prompt": prompt, "answer": "12", "solution": "12",
         "image": Image.fromarray(rng.integers(0, 256, (IMAGE_SIDE, IMAGE_SIDE, 3), dtype=np.uint8))}
        for i in range(settings["prompts"])
    ]
    rows = settings["prompts"] * settings["samples"]
    text_ids = np.arange(256, len(processor.tokenizer) - 8)  # BPE merges: no special token
    rollouts = []
    for length in response_lengths(shape, rows, rng):
        ids = rng.choice(text_ids, int(length)).tolist()
        rollouts.append(Rollout(ids, processor.tokenizer.decode(ids), "length"))
    return batch, rollouts


class TimedReinforcePP(ReinforcePP):
    """ReinforcePP that clocks Steps III and IV and keeps the last trajectory (to compare log-probs)."""

    seconds = {"wall": 0.0, "cpu": 0.0}

    @contextlib.contextmanager
    def clock(self):
        wall, cpu = time.perf_counter(), time.process_time()
        yield
        self.seconds = {"wall": self.seconds["wall"] + time.perf_counter() - wall,
                        "cpu": self.seconds["cpu"] + time.process_time() - cpu}

    def generate_trajectory(self, batch, rollouts):
        with self.clock():
            self.last_trajectory = super().generate_trajectory(batch, rollouts)
        return self.last_trajectory

    def update_policy(self, trajectory):
        with self.clock():
            return super().update_policy(trajectory)


class GivenRollouts(pl.Callback):
    """Stands in for RolloutCallback: puts the given rollouts in the module's queue before each step."""

    def __init__(self, rollouts: list[Rollout]) -> None:
        self.rollouts = rollouts

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        pl_module.rollout_queue.put_ready(pl_module.generation_step, batch, self.rollouts)


def count_tokens(module: ReinforcePP) -> list[int]:
    """A running count of the tokens every forward pass of policy and reference feeds the LLM."""
    counter = [0]

    def hook(_, args, kwargs):
        embeds = kwargs.get("inputs_embeds")
        counter[0] += embeds.shape[0] * embeds.shape[1]

    for model in (module.policy, module.ref_policy):
        model.model.language_model.register_forward_pre_hook(hook, with_kwargs=True)
    return counter


def run(shape: str, model_dir: Path, optimized: bool, clock: str) -> dict:
    """One rollout batch through Steps III + IV; returns seconds, tokens and the trajectory."""
    settings = SHAPES[shape]
    batch, rollouts = make_batch(shape, model_dir)
    module = TimedReinforcePP(
        str(model_dir), sampling=SamplingConfig(n=settings["samples"], max_tokens=1024),
        rewards=[RewardTerm("maye_pl.rewards.language_reward", name="language")], reward_penalty=None,
        validate_before_fit=False, loss=LossArgs(kl_coef=0.001), forward_batch_size=16,
        ppo=PPOArgs(epochs=1, batch_size=settings["ppo_batch_size"],
                    gradient_accumulation_steps=settings["gradient_accumulation_steps"]),
        max_tokens_per_micro_batch=BUDGET if optimized else None,
        dedup_group_prompts=optimized and settings["samples"] > 1, lr=1e-6,
    )
    module.configure_model()
    module.rollout_queue = RolloutQueue()
    tokens = count_tokens(module)
    steps = settings["prompts"] * settings["samples"] // settings["ppo_batch_size"]
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
        callbacks=[GivenRollouts(rollouts)],
    )
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader([batch], batch_size=None, collate_fn=lambda b: b))
    trajectory = module.last_trajectory
    return {"seconds": module.seconds[clock], "tokens": tokens[0], "mask": trajectory.response_mask,
            "logprobs": [trajectory.old_logprobs, trajectory.ref_logprobs]}


def bench(shape: str, model_dir: Path, repeats: int, clock: str) -> dict:
    runs = {False: [], True: []}
    for _ in range(repeats):
        for optimized in (False, True):
            runs[optimized].append(run(shape, model_dir, optimized, clock))
    base, opt = runs[False][0], runs[True][0]
    diff = max(float(((a - b).abs() * base["mask"]).max()) for a, b in zip(base["logprobs"], opt["logprobs"]))
    return {
        "shape": shape,
        "baseline_s": round(min(r["seconds"] for r in runs[False]), 3),
        "optimized_s": round(min(r["seconds"] for r in runs[True]), 3),
        "max_abs_logprob_diff": diff,
        "baseline_tokens": base["tokens"],
        "optimized_tokens": opt["tokens"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=list(SHAPES))
    parser.add_argument("--repeats", type=int, default=1, help="runs of each path per shape (the minimum counts)")
    parser.add_argument("--clock", choices=("cpu", "wall"), default="cpu",
                        help="cpu: this process's CPU seconds (robust on a shared machine); wall: elapsed seconds")
    parser.add_argument("--json", action="store_true", help="print only the JSON results on stdout")
    parser.add_argument("--model-dir", type=Path, default=None, help="where to build/keep the model (default: a temp dir)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_model((args.model_dir or Path(tmp)) / "bench-qwen2.5-vl")
        results = [bench(shape, model_dir, args.repeats, args.clock) for shape in args.shapes]
    if args.json:
        print(json.dumps({"results": results}))
        return
    print(f"{'shape':10} {'baseline s':>11} {'optimized s':>12} {'ratio':>6} {'tokens base → opt':>22} {'max |Δ logprob|':>16}")
    for r in results:
        print(f"{r['shape']:10} {r['baseline_s']:11.2f} {r['optimized_s']:12.2f} {r['optimized_s'] / r['baseline_s']:6.2f} "
              f"{r['baseline_tokens']:>10} → {r['optimized_tokens']:<9} {r['max_abs_logprob_diff']:16.2e}")


if __name__ == "__main__":
    main()
