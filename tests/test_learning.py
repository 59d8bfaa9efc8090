"""Learnability: Reinforce++ through the real vLLM engine raises the reward, synchronous and pipelined.

The demo's own task (synchronous): `make demo` itself (configs/demo.yaml through the CLI, its SFT
warm start built by its recipe, the boxed answer scored by the math judge) on a slice of its
training figures, those with 3 or 6 shaded cells, 8 steps of 8 prompts x 8 samples. The warm start
writes the format and picks among 3..6 about at chance (accuracy ~0.25); if the judge, the
advantages, the update or the weight sync were wrong, accuracy would not rise (seen: 0.27, 0.23,
0.23 ... 0.44, 0.56, 0.66).

A dense reward (pipelined): the share of the letter "e" in the response text, a user reward given by
import path (`test_learning.letter_share_reward`, no change to maye_pl), from the random tiny policy,
which starts near the letter's base rate. With ``rollout.max_staleness`` 1 each batch is sampled one
policy version back and weighted by the off-policy correction; over 9 generation steps (8 updates
reach the engine) the mean reward of the last three must beat the first three by a wide margin.
"""

from __future__ import annotations

import json

import lightning.pytorch as pl
import pytest
import torch

import maye_pl.demo as demo
from cli_runs import REPO, run_maye_pl_here
from maye_pl.cli import train_warm_start
from maye_pl.data import MayeDataModule, generate_geometry_dataset
from maye_pl.evaluation import MetricsFileCallback, read_metrics
from maye_pl.hparams import LossArgs, PPOArgs
from maye_pl.module import ReinforcePP
from maye_pl.rewards import RewardTerm
from maye_pl.rollout.callback import RolloutCallback
from maye_pl.types import SamplingConfig


def letter_share_reward(responses: list[str], samples: list[dict]) -> torch.Tensor:
    """Share of the letter "e" among the response's characters: (B,) in [0, 1]."""
    return torch.tensor([text.count("e") / max(1, len(text)) for text in responses], dtype=torch.float32)


@pytest.mark.slow
@pytest.mark.vllm
def test_reinforce_pp_raises_a_dense_reward_through_vllm_pipelined(tiny_model_dir, tmp_path):
    steps = 9  # batch k is sampled by the policy after k-1 updates: the last three by updates 5-7
    splits = generate_geometry_dataset(tmp_path / "geo", n_train=8 * steps, n_val=0, n_test=0)
    pl.seed_everything(0)
    data = MayeDataModule(splits["train"], batch_size=8, processor_path=tiny_model_dir)
    module = ReinforcePP(
        str(tiny_model_dir),
        sampling=SamplingConfig(n=4, max_tokens=16),
        rewards=[RewardTerm("test_learning.letter_share_reward", 1.0, "letter")],
        validate_before_fit=False,
        ppo=PPOArgs(batch_size=8),
        loss=LossArgs(kl_coef=0.0),
        lr=3e-2,
        reward_penalty=None,  # MAYE's no-EOS penalty would replace the letter reward of most rows
    )
    rollout = RolloutCallback(engine="vllm", device="cpu", kv_cache_gb=0.25, max_model_len=1024, max_staleness=1)
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_epochs=1, logger=pl.loggers.CSVLogger(tmp_path / "runs"),
        callbacks=[rollout, MetricsFileCallback()], enable_checkpointing=False, enable_progress_bar=False,
    )
    trainer.fit(module, data)
    assert rollout.engine is None  # shut down at teardown

    rewards = [row["reward/letter"] for row in read_metrics(trainer.log_dir) if "reward/letter" in row]
    print(f"reward/letter per generation step: {[round(r, 3) for r in rewards]}")
    assert len(rewards) == steps  # 8 prompts per step
    first, last = sum(rewards[:3]) / 3, sum(rewards[-3:]) / 3
    assert last > first + 0.08, f"reward did not rise: first steps {rewards[:3]}, last steps {rewards[-3:]}"


@pytest.mark.slow
@pytest.mark.vllm
def test_the_demo_raises_its_tasks_accuracy_through_vllm(tmp_path):
    # The demo's assets (tiny model, data set, SFT warm start) where `make demo` builds them,
    # relative to the working directory (here: tmp_path).
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(tmp_path)
        demo.ensure_warm_start(demo.WARM_START_PATH, demo.WARM_START_RECIPE, train_warm_start)
    train = tmp_path / demo.DEMO_DATA_DIR / "train.jsonl"
    records = [json.loads(line) for line in train.read_text().splitlines()]
    extremes = [record for record in records if record["answer"] in ("3", "6")][:64]  # 8 steps of 8 prompts
    (train.parent / "extremes.jsonl").write_text("".join(json.dumps(record) + "\n" for record in extremes))

    run_maye_pl_here(
        "fit", "--config", str(REPO / "configs/demo.yaml"), "--data.train_path", str(train.parent / "extremes.jsonl"),
        "--data.max_train_samples", "null", "--data.batch_size", "8", "--model.ppo.batch_size", "64",
        "--model.validate_before_fit", "false", "--trainer.limit_val_batches", "0", "--trainer.max_epochs", "1",
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
        "--trainer.logger.init_args.version", "extremes",
        cwd=tmp_path,
    )
    rows = read_metrics(tmp_path / "runs/demo/extremes")
    accuracy = [row["reward/accuracy_step"] for row in rows if "reward/accuracy_step" in row]
    print(f"accuracy per generation step: {[round(a, 3) for a in accuracy]}")
    assert len(accuracy) == 8
    first, last = sum(accuracy[:3]) / 3, sum(accuracy[-3:]) / 3
    assert last > first + 0.15, f"accuracy did not rise: first steps {accuracy[:3]}, last steps {accuracy[-3:]}"
