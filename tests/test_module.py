"""ReinforcePP's own logic, without an engine: argument validation and Step III on given responses.

Proves: bad hyperparameters are all reported at once with key, value and fix; the trajectory masks
stop at the sampled stop token even when the pad id is itself a stop id; a response that never
stopped gets `reward_penalty` instead of its reward; a correct boxed answer earns accuracy 1; the
advantages are zero on padding and zero-mean over valid tokens (global whitening default); a
micro-batch's loss is the configured policy loss, weights and aggregation plus the KL term.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from maye_pl import rl
from maye_pl.data import MayeDataModule, generate_geometry_dataset
from maye_pl.evaluation.step_metrics import log_reflective_sample
from maye_pl.hparams import AdvantageArgs, LossArgs, OffPolicyArgs, PPOArgs
from maye_pl.module import ReinforcePP
from maye_pl.optim import OptimArgs
from maye_pl.rewards import RewardTerm
from maye_pl.types import Rollout, SamplingConfig


def test_invalid_hyperparameters_are_reported_together(tiny_model_dir):
    with pytest.raises(ValueError) as info:
        ReinforcePP(
            str(tiny_model_dir), ppo=PPOArgs(epochs=0, batch_size=6, gradient_accumulation_steps=4),
            advantages=AdvantageArgs(estimator="grpo"), sampling=SamplingConfig(n=1, logprobs=False),
            loss=LossArgs(policy_loss="ppo", agg="sum", clip_low=1.5),
            off_policy=OffPolicyArgs(correction=True, mode="clip", high=0.0),
            optim=OptimArgs(eps=0.0, warmup_steps=5, warmup_ratio=0.1), judge="maye", lr=0.0,
            rewards=[RewardTerm("maye_pl.rewards.accuracy_reward")], max_tokens_per_micro_batch=0,
        )
    message = str(info.value)
    for expected in (
        "`model.ppo.gradient_accumulation_steps`=4 must divide `model.ppo.batch_size`=6",
        "`model.advantages.estimator`='grpo' compares samples of the same prompt, but `model.sampling.n`=1",
        "`model.ppo.epochs`=0 must be at least 1",
        "`model.loss.agg`='sum' is unknown",
        "`model.loss.policy_loss`='ppo' is unknown; choose one of ['cispo', 'gspo', 'ppo_clip']",
        "`model.loss.clip_low`=1.5 must lie in [0, 1]",
        "`model.off_policy.mode`='clip' is unknown",
        "`model.off_policy.high`=0.0 must be > 0",
        "`model.off_policy.correction` needs the engine's log-probs",
        "`model.optim.eps`=0.0 must be positive",
        "`model.optim.warmup_steps`=5 and `model.optim.warmup_ratio`=0.1 are both set",
        "`model.lr`=0.0 must be positive",
        "`model.rewards[0].fn`='maye_pl.rewards.accuracy_reward' judges with another judge than `model.judge`='maye'",
        "`model.max_tokens_per_micro_batch`=0 must be a positive token count",
    ):
        assert expected in message


def test_reference_model_only_when_a_kl_coefficient_is_set(tiny_model_dir):
    without = ReinforcePP(str(tiny_model_dir), loss=LossArgs(kl_coef=0.0), advantages=AdvantageArgs(kl_coef=0.0))
    without.configure_model()
    assert without.ref_policy is None
    with_ref = ReinforcePP(str(tiny_model_dir), loss=LossArgs(kl_coef=0.001))
    with_ref.configure_model()
    assert with_ref.ref_policy is not None
    assert not any(p.requires_grad for p in with_ref.ref_policy.parameters())


@pytest.fixture(scope="module")
def prompt_batch(tiny_model_dir, tmp_path_factory):
    splits = generate_geometry_dataset(tmp_path_factory.mktemp("geo") / "geo", n_train=4, n_val=0, n_test=0)
    dm = MayeDataModule(splits["train"], batch_size=2, processor_path=tiny_model_dir)
    dm.setup("fit")
    return next(iter(dm.train_dataloader()))


def test_trajectory_masks_penalties_rewards_and_advantages(tiny_model_dir, prompt_batch):
    module = ReinforcePP(str(tiny_model_dir), sampling=SamplingConfig(n=2, max_tokens=8), ppo=PPOArgs(batch_size=2))
    module.configure_model()
    tokenizer = module.processor.tokenizer
    stop = module.stop_token_ids[0]
    answer = prompt_batch[0]["answer"]
    correct = tokenizer.encode(f"so \\boxed{{{answer}}}") + [stop]
    responses = [
        correct,                                   # prompt 0, sample 0: right answer, stopped
        tokenizer.encode("no idea") + [stop],      # prompt 0, sample 1: stopped, wrong
        tokenizer.encode("abcdefgh")[:8],          # prompt 1, sample 0: ran out of tokens
        tokenizer.encode("ab") + [stop],           # prompt 1, sample 1: short, stopped
    ]
    rollouts = [
        Rollout(ids, tokenizer.decode(ids, skip_special_tokens=True), "stop" if ids[-1] == stop else "length")
        for ids in responses
    ]
    trajectory = module.generate_trajectory(prompt_batch, rollouts)

    lengths = [len(ids) for ids in responses]
    assert trajectory.response_mask.sum(dim=1).tolist() == lengths
    assert trajectory.reward_components["accuracy"].tolist() == [1.0, 0.0, 0.0, 0.0]
    # The third response never produced a stop token: its score is replaced by the penalty.
    assert trajectory.penalized.tolist() == [False, False, True, False]
    assert trajectory.scores.tolist() == pytest.approx([1.0, 0.0, -0.1, 0.0])
    padding = ~trajectory.response_mask
    assert torch.all(trajectory.advantages[padding] == 0)
    assert torch.all(trajectory.old_logprobs[padding] == 0)
    assert torch.all(trajectory.old_logprobs[trajectory.response_mask] < 0)
    valid = trajectory.advantages[trajectory.response_mask]
    assert valid.mean().abs() < 1e-5  # whitened to zero mean over the (here single-rank) global batch


def test_a_correct_reflective_response_is_logged_as_text(tmp_path):
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = TensorBoardLogger(tmp_path, name="tb")
    texts = ["wait, no box", "Wait, let me verify: \\boxed{5}", "plain \\boxed{5}"]
    log_reflective_sample([logger], texts, torch.tensor([0.0, 1.0, 1.0]), "word", generation_step=1, global_step=4)  # only the 2nd is both
    logger.experiment.flush()

    events = EventAccumulator(logger.log_dir, size_guidance={"tensors": 0})
    events.Reload()
    [tag] = events.Tags()["tensors"]
    assert tag.startswith("samples/reflective_correct")
    [logged] = events.Tensors(tag)
    assert b"let me verify" in logged.tensor_proto.string_val[0]


def test_micro_batch_loss_is_the_configured_loss_weighted_plus_the_kl_term(tiny_model_dir):
    """The YAML's choices reach Step IV: the policy loss, its clip range and aggregation (L_max from
    `sampling.max_tokens`), masked sequence-level importance weights, β_loss times the k3 term."""
    module = ReinforcePP(
        str(tiny_model_dir), sampling=SamplingConfig(n=2, max_tokens=4),
        loss=LossArgs(policy_loss="cispo", clip_low=1.0, clip_high=4.0, agg="seq_mean_token_sum_norm", kl_coef=0.1),
        off_policy=OffPolicyArgs(mode="mask", level="sequence", low=0.5, high=2.0),
    )
    mask = torch.tensor([[True, True, False], [True, True, True]])
    old = torch.tensor([[-1.0, -2.0, 0.0], [-0.5, -1.5, -1.0]])
    lp = (old + torch.tensor([[0.2, -0.1, 0.0], [0.3, 0.1, -0.2]])).requires_grad_()
    # π_old/π_behav per response: row 0 exp(0.4) = 1.49 (kept), row 1 exp(1.2) = 3.32 > 2 (masked)
    behaviour = old - torch.tensor([[0.1, 0.3, 0.0], [0.4, 0.4, 0.4]])
    micro = SimpleNamespace(response_mask=mask, behaviour_logprobs=behaviour, advantages=torch.ones(2, 3),
                            ref_logprobs=old - 0.3)
    loss, stats = module.micro_batch_loss(micro, lp, old, True, normalizer=2.0)

    weights = torch.tensor([[math.exp(0.4)] * 3, [0.0] * 3]) * mask
    aggregation = dict(agg="seq_mean_token_sum_norm", normalizer=2.0, max_tokens=4)
    policy, _ = rl.cispo(lp, old, micro.advantages, mask, clip_low=1.0, clip_high=4.0, weights=weights, **aggregation)
    kl, _ = rl.kl_loss(lp, micro.ref_logprobs, mask, **aggregation)
    torch.testing.assert_close(loss, policy + 0.1 * kl)
    assert stats["behaviour_clip_fraction"].item() == pytest.approx(3 / 5)  # row 1's 3 tokens masked
    assert {"policy_loss", "clip_fraction", "ratio_mean", "approx_kl", "kl_loss"} <= set(stats)
