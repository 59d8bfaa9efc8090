"""The recipe overlays (configs/recipes/*.yaml) over the RL configs, and the GSPO and CISPO families
learning through the real vLLM engine.

Proves: every recipe parses over the demo and paper configs, changes what it must and keeps the
rest, and the module accepts the result (its label recorded, its minibatches dividing the rows);
each recipe over the demo config runs at least 3 steps through vLLM with the engine in sync with
the trainer (``policy/engine_logprob_mismatch`` <= 1e-4 after every weight sync, fp32 on the CPU);
in the same runs GSPO and CISPO raise a dense reward the tiny model can reach (the letter "e", as
tests/test_learning.py), their learnability check; DAPO raises it with dynamic sampling replacing
the prompts whose groups score alike. lora.yaml stacks over any config and after any recipe (its
run: GRPO with LoRA adapters). The vLLM runs share the session's engine
(``SharedEngineRollout``): an engine start costs more than a run.
"""

from __future__ import annotations

import copy
import functools
import zlib
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from maye_pl.cli import MayeCLI
from maye_pl.data import MayeDataModule, generate_geometry_dataset
from maye_pl.evaluation import MetricsFileCallback, read_metrics
from maye_pl.models.loading import load_policy
from maye_pl.module import ReinforcePP
from maye_pl.rewards import RewardTerm
from maye_pl.rollout.callback import RolloutCallback

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted(path.stem for path in (REPO / "configs/recipes").glob("*.yaml"))
# The CPU demo and both paper configs (demo_qwen2_vl/demo_qwen3_vl are demo.yaml's keys with another
# model: a parse each would prove nothing more and costs ~0.4 s of CPU per recipe).
RL_CONFIGS = ("demo.yaml", "geo3k.yaml", "mmmath.yaml")
# What each recipe must change (a drifted overlay fails here): loss, aggregation, advantages.
EXPECTED = {
    "grpo": ("ppo_clip", "seq_mean_token_mean", "grpo"),
    "dr_grpo": ("ppo_clip", "seq_mean_token_sum_norm", "dr_grpo"),
    "gspo": ("gspo", "seq_mean_token_mean", "grpo"),
    "cispo": ("cispo", "token_mean", "grpo"),
    "dapo": ("ppo_clip", "token_mean", "grpo"),
}
# Overlays that stack after any recipe and change no label (their own test below).
MODIFIERS = ("lora",)


class _Built(Exception):
    pass


class _ParserOnlyCLI(MayeCLI):
    def before_instantiate_classes(self) -> None:
        raise _Built(self.parser)


@functools.cache
def _parser():
    """MayeCLI's parser, built once (~1 s of CPU; a parse with it ~0.4 s)."""
    with pytest.raises(_Built) as built:
        _ParserOnlyCLI(args=["fit", "--config", str(REPO / "configs/demo.yaml")])
    return built.value.args[0]


@functools.cache
def _parsed(*configs: str) -> dict:
    args = ["fit"] + [word for config in configs for word in ("--config", str(REPO / "configs" / config))]
    return _parser().parse_args(args).fit.as_dict()  # what LightningCLI.parse_arguments does


def _resolved(*configs: str) -> dict:
    """The fit config of ``configs`` stacked (later ones overlay earlier ones), as plain dicts."""
    return copy.deepcopy(_parsed(*configs))


def _module(init_args: dict, model_dir: Path, **overrides) -> ReinforcePP:
    """ReinforcePP from a resolved config's ``init_args`` (groups as dicts) on the tiny model."""
    rewards = init_args.pop("rewards")
    rewards = overrides.pop("rewards", None) or (rewards and [RewardTerm(**term) for term in rewards])
    return ReinforcePP(**{**init_args, "model_path": str(model_dir), "rewards": rewards, **overrides})


def test_every_recipe_is_known():
    assert set(RECIPES) == set(EXPECTED) | set(MODIFIERS), f"configs/recipes/ has {RECIPES}"


@pytest.mark.parametrize("config", ["geo3k.yaml", "sft_mmmath.yaml"])
def test_lora_overlay_stacks_on_any_config_and_recipe(config):
    """lora.yaml adds adapters and sets the learning rate, over a paper config, the SFT baseline or
    after a recipe (the recipe's label and every other key stay)."""
    base, stacked = _resolved(config), _resolved(config, "recipes/lora.yaml")
    init = stacked["model"]["init_args"]
    assert (init["lora"]["r"], init["lora"]["parts"], init["lr"]) == (32, ("llm",), 5e-5)
    assert {**init, "lora": None, "lr": None} == {**base["model"]["init_args"], "lora": None, "lr": None}
    if config == "geo3k.yaml":
        dapo, both = _resolved(config, "recipes/dapo.yaml"), _resolved(config, "recipes/dapo.yaml", "recipes/lora.yaml")
        assert both["model"]["init_args"]["recipe"] == "dapo"
        assert {**both["model"]["init_args"], "lora": None, "lr": None} == {**dapo["model"]["init_args"], "lora": None, "lr": None}


@pytest.mark.parametrize("recipe", sorted(EXPECTED))
@pytest.mark.parametrize("config", RL_CONFIGS)
def test_recipe_overlays_any_rl_config(config, recipe, tiny_model_dir):
    base, stacked = _resolved(config), _resolved(config, f"recipes/{recipe}.yaml")
    init = stacked["model"]["init_args"]
    assert init["recipe"] == recipe
    assert (init["loss"]["policy_loss"], init["loss"]["agg"], init["advantages"]["estimator"]) == EXPECTED[recipe]
    # The overlay changes its keys only: the base's other values stay (e.g. geo3k's MAYE optimizer).
    assert init["optim"] == base["model"]["init_args"]["optim"] and stacked["data"] == base["data"]
    rows = stacked["data"]["batch_size"] * init["sampling"]["n"]
    assert rows % init["ppo"]["batch_size"] == 0, "the base's minibatch must divide the recipe's rows"
    if config == "geo3k.yaml":  # the module's validation accepts it (demo.yaml's: the vLLM runs below)
        module = _module(init, tiny_model_dir)
        assert module.hparams.recipe == recipe and module.needs_reference == (init["loss"]["kl_coef"] != 0)


class SharedEngineRollout(RolloutCallback):
    """RolloutCallback on the session's vLLM engine instead of one of its own. Each run's first
    weight sync pushes every weight (frozen ones included), so a run starts from its own policy."""

    def __init__(self, engine, **kwargs) -> None:
        super().__init__(engine="vllm", device="cpu", **kwargs)
        self._shared_engine = engine

    def _start_engine(self, trainer: pl.Trainer, pl_module: pl.LightningModule, comm, cpu_cores):
        return self._shared_engine

    def shutdown(self) -> None:  # the session's engine outlives the run
        self.engine = None
        super().shutdown()


@pytest.fixture(scope="module")
def shared_engine(vllm_engine, tiny_model_dir):
    """The session's engine; the tiny model's weights go back into it after this module's runs."""
    yield vllm_engine
    vllm_engine.update_weights(load_policy(tiny_model_dir).named_parameters())


def _fit(module: ReinforcePP, engine, train_path: Path, run_dir: Path, batch_size: int) -> list[dict]:
    """``module`` over ``train_path`` for one epoch through ``engine``; the step rows of metrics.jsonl."""
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_epochs=1, logger=pl.loggers.CSVLogger(run_dir), enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
        callbacks=[SharedEngineRollout(engine, kv_cache_gb=0.25, max_model_len=1024), MetricsFileCallback()],
    )
    trainer.fit(module, MayeDataModule(train_path, batch_size=batch_size, processor_path=module.hparams.model_path))
    return [row for row in read_metrics(trainer.log_dir) if "generation_step" in row]


def letter_share_reward(responses: list[str], samples: list[dict]) -> torch.Tensor:
    """Share of the letter "e" among the response's characters: (B,) in [0, 1]."""
    return torch.tensor([text.count("e") / max(1, len(text)) for text in responses], dtype=torch.float32)


def letter_share_on_half_the_prompts(responses: list[str], samples: list[dict]) -> torch.Tensor:
    """The letter reward on the prompts whose id hashes even, 0 on the others (too hard): their
    groups always score alike, so DAPO's dynamic sampling must drop them and generate more. (B,)"""
    earnable = torch.tensor([zlib.crc32(sample["id"].encode()) % 2 == 0 for sample in samples])
    return letter_share_reward(responses, samples) * earnable


# recipe -> (generation steps, prompts per step, samples per prompt, rows per minibatch, learns the letter)
RUNS = {
    # the demo's reward; 2 minibatches a step, the second off-policy (a separate π_old forward)
    "grpo": (3, 2, 4, 4, False),
    "dr_grpo": (3, 2, 4, 4, False),
    # the learnability check of the family: the letter reward, one minibatch a step (ratio 1: this is
    # about the loss's gradient; its clipping is tests/rl/test_policy_loss.py's)
    "gspo": (5, 4, 4, 16, True),
    "cispo": (5, 4, 4, 16, True),
    # DAPO: dynamic sampling replaces the prompts no sample can earn (``letter_share_on_half_the_prompts``)
    "dapo": (6, 8, 4, 32, True),
    # LoRA adapters after GRPO (its KL reference: the policy with the adapters off)
    "lora": (3, 2, 4, 4, False),
}
# The runs that also check the KL loss's reference pass (LoRA's: the policy with its adapters off)
WITH_KL_LOSS = ("grpo", "dr_grpo", "lora")
# recipe -> the overlays of its run (default: its own)
STACKS = {"lora": ("recipes/grpo.yaml", "recipes/lora.yaml")}
# The adapters start at B = 0: lora.yaml's 5e-5 would barely move the merged weights in 3 steps,
# so an engine that missed a sync could still agree with the trainer; 1e-2 moves them.
LEARNING_RATES = {"lora": 1e-2}


@pytest.mark.slow
@pytest.mark.vllm
@pytest.mark.parametrize("recipe", sorted(RUNS))
def test_recipe_runs_demo_steps_through_vllm(recipe, shared_engine, tiny_model_dir, tmp_path):
    """The recipe over configs/demo.yaml, shortened: the engine stays in sync with the trainer after
    every weight sync (fp32 CPU), and GSPO and CISPO raise the letter reward within 5 steps."""
    steps, prompts, samples, minibatch, learns = RUNS[recipe]
    init = _resolved("demo.yaml", *STACKS.get(recipe, (f"recipes/{recipe}.yaml",)))["model"]["init_args"]
    init["sampling"].update(n=samples, max_tokens=16 if learns else 12, temperature=0.7)
    # demo.yaml's T=1.0, warmup and prompt dedup are tuned for its task: these runs keep the values they were measured with.
    init.update(dedup_group_prompts=False)
    init["optim"].update(warmup_steps=None)
    init["ppo"].update(batch_size=minibatch, gradient_accumulation_steps=1 if learns else 2)
    if recipe in WITH_KL_LOSS:  # the demo runs no KL loss; these runs take the paper's, through the reference
        init["loss"]["kl_coef"] = 0.001
    overrides = {"lr": LEARNING_RATES[recipe]} if recipe in LEARNING_RATES else {}
    if learns:
        reward = "letter_share_on_half_the_prompts" if init["dynamic_sampling"]["enabled"] else "letter_share_reward"
        overrides = dict(lr=6e-2, reward_penalty=None, rewards=[RewardTerm(f"{__name__}.{reward}", 1.0, "letter")])
    module = _module(init, tiny_model_dir, validate_before_fit=False, **overrides)
    train = generate_geometry_dataset(tmp_path / "geo", n_train=prompts * steps, n_val=0, n_test=0)["train"]
    pl.seed_everything(0)
    rows = _fit(module, shared_engine, train, tmp_path / "runs", batch_size=prompts)

    updates = prompts * samples // minibatch
    assert [(row["generation_step"], row["policy/gradient_step"]) for row in rows] == [
        (float(step), float(step * updates)) for step in range(1, steps + 1)]
    mismatch = [row["policy/engine_logprob_mismatch"] for row in rows]
    assert max(mismatch) <= 1e-4, f"engine and trainer disagree after a weight sync: {mismatch}"
    assert ("loss/kl" in rows[0]) == (recipe in WITH_KL_LOSS)
    if learns:
        rewards = [row["reward/letter"] for row in rows]
        print(f"{recipe} reward/letter per generation step: {[round(r, 3) for r in rewards]}")
        # The least-squares line through every step's reward (not two noisy ends) rises by > 0.06
        # over the run (measured: GSPO 0.106, CISPO 0.117, DAPO 0.106).
        step = torch.arange(steps, dtype=torch.float64)
        reward = torch.tensor(rewards, dtype=torch.float64)
        slope = ((step - step.mean()) * (reward - reward.mean())).sum() / (step - step.mean()).pow(2).sum()
        assert slope * (steps - 1) > 0.06, f"{recipe}: the reward did not rise: {rewards}"
    if init["dynamic_sampling"]["enabled"]:  # every step dropped the unearnable groups and drew more
        dynamic = [(row["rollout/dynamic_rounds"], row["rollout/kept_group_ratio"], row["rollout/filled_groups"]) for row in rows]
        print(f"{recipe} (rounds, kept ratio, filled groups) per generation step: {dynamic}")
        assert all(rounds >= 2 and kept < 0.8 for rounds, kept, _ in dynamic), dynamic
