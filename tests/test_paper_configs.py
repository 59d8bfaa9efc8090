"""The paper configs resolve to MAYE's training values, so a later edit cannot drift silently.

Each paper config is resolved with ``--print_config`` (in process, through MayeCLI) and every value
MAYE's run sets is compared with the table below, copied by hand from MAYE's launcher
(``scripts/train_ppo_vllm_distributed.sh``: its ``NAME=value`` lines), its recipe YAML
(``recipes/configs/full_ppo_vllm_distributed.yaml``, for what the script does not override) and
its recipe (``recipes/full_ppo_vllm_distributed.py``, for behaviour without a knob). The module
then accepts those values together (built on the tiny model instead of the 7B checkpoint).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from maye_pl.cli import MayeCLI
from maye_pl.module import ReinforcePP
from maye_pl.rewards import RewardTerm

REPO = Path(__file__).resolve().parents[1]

# maye_pl key (dotted, in the resolved config) -> (MAYE's value, where MAYE sets it)
MAYE_VALUES = {
    "seed_everything": (0, "script SEED=0"),
    "trainer.devices": (7, "script: torchrun --nproc_per_node=NUM_DEVICES-1 of 8"),
    "data.batch_size": (128, "script BATCH_SIZE=128"),
    "data.prompt_style": ("cot", "script USE_CHAT_TEMPLATE=True (chat template + CHAT_COT_PROMPT)"),
    "model.init_args.optim.max_grad_norm": (1.0, "script CLIP_GRAD_NORM=1.0"),
    "model.init_args.loss.clip_high": (0.2, "script EPSILON_HIGH=0.2"),
    "model.init_args.loss.clip_low": (0.2, "script EPSILON_LOW=0.2"),
    "model.init_args.forward_batch_size": (16, "script FORWARD_BATCH_SIZE=16"),
    "model.init_args.advantages.gamma": (1.0, "script GAMMA=1.0"),
    "model.init_args.ppo.gradient_accumulation_steps": (2, "script GRADIENT_ACCUMULATION_STEPS=2"),
    "model.init_args.loss.kl_coef": (0.001, "script KL_LOSS_COEFF=0.001"),
    "model.init_args.advantages.kl_coef": (0.0, "script KL_REWARD_COEFF=0.000"),
    "model.init_args.lr": (5e-6, "script LR=5e-6"),
    "model.init_args.sampling.max_tokens": (2048, "script MAX_TOKENS=2048"),
    "model.init_args.min_response_length": (1, "script MIN_RESPONSE_LENGTH=1"),
    "model.init_args.ppo.batch_size": (4, "script PPO_BATCH_SIZE=4"),
    "model.init_args.ppo.epochs": (1, "script PPO_EPOCH=1"),
    "model.init_args.reward_penalty": (-0.1, "script PENALISE_NO_EOS=True, REWARD_PENALTY=-0.1"),
    "model.init_args.sampling.temperature": (1.0, "script TEMPERATURE=1.0"),
    "model.init_args.train_connector": (False, "script TRAIN_CONNECTOR=False"),
    "model.init_args.train_llm": (True, "script TRAIN_LLM=True"),
    "model.init_args.train_vit": (False, "script TRAIN_VIT=False"),
    "rollout.gpu_memory_utilization": (0.75, "script VLLM_GPU_MEMORY_UTILIZATION=0.75"),
    "model.init_args.optim.betas": ([0.9, 0.95], "YAML optimizer.betas"),
    "model.init_args.optim.eps": (1e-5, "YAML optimizer.eps"),
    "model.init_args.optim.weight_decay": (0.01, "YAML optimizer.weight_decay"),
    "model.init_args.sampling.top_p": (1.0, "YAML generation_kwargs.top_p"),
    "model.init_args.dtype": ("bfloat16", "YAML dtype"),
    "rollout.dtype": ("bfloat16", "YAML vllm.dtype: ${dtype}"),
    "model.init_args.optim.warmup_ratio": (0.1, "recipe: num_warmup_steps=0.1 * num_training_steps"),
    "model.init_args.optim.warmup_steps": (None, "recipe: the ratio is the only warmup"),
    "model.init_args.optim.min_lr_ratio": (0.0, "recipe: get_cosine_schedule_with_warmup decays to 0"),
    "model.init_args.sampling.n": (1, "recipe: one response per prompt (output.outputs[0])"),
    "model.init_args.advantages.estimator": ("reinforce_pp", "recipe: returns whitened over the batch"),
    "model.init_args.advantages.maye_compat": (True, "recipe: whiten() per rank with shift_mean=True"),
    "model.init_args.judge": ("maye", "recipe: accuracy_reward_fn(..., judge_fn=self.ds.judge) vs solution"),
    "model.init_args.reflection_match": ("substring", "recipe: any(word in text.lower())"),
    "model.init_args.maye_position_ids": (False, "not reproduced on purpose (README differences table)"),
    "model.init_args.rewards": (
        [{"fn": "maye_pl.rewards.maye_accuracy_reward", "weight": 1.0, "name": "accuracy", "kwargs": None},
         {"fn": "maye_pl.rewards.maye_format_reward", "weight": 1.0, "name": "format", "kwargs": None},
         {"fn": "maye_pl.rewards.language_reward", "weight": 1.0, "name": "language", "kwargs": None}],
        "recipe: scores = acc_rewards + format_rewards + language_rewards",
    ),
}
DATA_FILES = {  # script: DATADIR / {TRAIN,VALIDATION,TEST}_DATASET_NAME per DATA
    "geo3k.yaml": ("geometry3k", "geometry3k_rl_v0", "geometry3k_validation_v0", "geometry3k_test_v0"),
    "mmmath.yaml": ("mm_math", "mm_math_rl_v0", "mm_math_validation_v0", "math_verse_test_v0"),
}


def _resolved(config: str, capsys: pytest.CaptureFixture) -> dict:
    capsys.readouterr()
    with pytest.raises(SystemExit) as exited:
        MayeCLI(args=["fit", "--config", str(REPO / "configs" / config), "--print_config"])
    assert exited.value.code in (0, None)
    return yaml.safe_load(capsys.readouterr().out)


def _lookup(config: dict, dotted: str):
    value = config
    for key in dotted.split("."):
        value = value[key]
    return value


@pytest.mark.parametrize("config", sorted(DATA_FILES))
def test_paper_config_resolves_to_maye_values(config, capsys):
    resolved = _resolved(config, capsys)
    drift = {key: (_lookup(resolved, key), maye, where) for key, (maye, where) in MAYE_VALUES.items()
             if _lookup(resolved, key) != maye}
    assert not drift, "paper config differs from MAYE's run (key: (ours, MAYE's, source)):\n" + "\n".join(
        f"  {key}: {value}" for key, value in drift.items())
    folder, train, val, test = DATA_FILES[config]
    data = resolved["data"]
    assert (data["train_path"], data["val_path"], data["test_path"]) == tuple(
        f"datasets/{folder}/{name}.jsonl" for name in (train, val, test))


@pytest.mark.parametrize("config", sorted(DATA_FILES))
def test_paper_model_arguments_pass_validation(config, capsys, tiny_model_dir):
    """The module accepts the paper values together (its validation collects every problem)."""
    init_args = _resolved(config, capsys)["model"]["init_args"]
    # The groups (sampling, loss, ppo, ...) go in as the YAML's dicts, as LightningCLI hands them over.
    module = ReinforcePP(**{
        **init_args, "model_path": str(tiny_model_dir), "rewards": [RewardTerm(**term) for term in init_args["rewards"]],
    })
    assert module.ppo.batch_size == 4 and module.optim.eps == 1e-5  # typed by the module
    assert [name for name, _, _ in module.rewards] == ["accuracy", "format", "language"]
