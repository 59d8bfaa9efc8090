"""Reinforce++ for a vision-language policy, as a LightningModule that reads like MAYE's recipe.

Paper: "Rethinking RL Scaling for Vision Language Models" (MAYE, arXiv 2504.02587), Fig. 2's four
stages. Notation: B prompts on this rank, G samples per prompt, N = B*G rows, T response tokens.

    Step I    data           a batch of prompts (question, image, answer) from MayeDataModule
    Step II   rollouts       RolloutCallback.on_train_batch_start leaves N responses in self.rollout_queue
    Step III  trajectory     prompt+response tokens, old/ref logprobs, rewards, advantages
    Step IV   policy update  ppo.epochs × minibatches × gradient accumulation of the policy loss
                             (PPO-clip by default; GSPO, CISPO: maye_pl.rl.POLICY_LOSSES) + k3 KL
    (then)    weight sync    RolloutCallback streams the new weights into the engine before it next generates
"""

from __future__ import annotations

import time
from typing import Any, Literal

import torch

from maye_pl import rl
from maye_pl.errors import ConfigError
from maye_pl.evaluation import GENERATION_STEP
from maye_pl.evaluation.step_metrics import (
    average_stats,
    log_reflective_sample,
    micro_batch_stats,
    rollout_step_metrics,
)
from maye_pl.hparams import (
    AdvantageArgs,
    DynamicSamplingArgs,
    LossArgs,
    OffPolicyArgs,
    PPOArgs,
    cross_group_problems,
)
from maye_pl.models.forward import ResponseScorer, build_policy_inputs, response_logprobs
from maye_pl.optim import tokens_per_rank
from maye_pl.policy_module import PolicyModule
from maye_pl.rewards import RewardTerm, default_rewards, resolve_rewards, score_responses
from maye_pl.rollout.queue import RolloutQueue
from maye_pl.trajectory import Trajectory, engine_logprobs
from maye_pl.types import Rollout, SamplingConfig


class ReinforcePP(PolicyModule):
    """Reinforce++ (paper Eq. 1) with PPO-clip updates and a k3 KL loss against a frozen reference.

    The same loop runs the family a recipe (``configs/recipes/``) picks: GRPO / Dr.GRPO advantages
    (``model.advantages``), GSPO / CISPO losses and their aggregation (``model.loss``), truncated or
    masked importance sampling of the engine's rollouts (``model.off_policy``).
    """

    # The group arguments, typed (PolicyModule._typed_groups): read them here, not in self.hparams.
    sampling: SamplingConfig
    advantages: AdvantageArgs
    loss: LossArgs
    ppo: PPOArgs
    off_policy: OffPolicyArgs
    dynamic_sampling: DynamicSamplingArgs

    def __init__(
        self,
        model_path: str,
        *,
        sampling: SamplingConfig = SamplingConfig(),
        rewards: list[RewardTerm] | None = None,
        reward_penalty: float | None = -0.1,
        min_response_length: int | None = None,
        advantages: AdvantageArgs = AdvantageArgs(),
        loss: LossArgs = LossArgs(),
        ppo: PPOArgs = PPOArgs(),
        off_policy: OffPolicyArgs = OffPolicyArgs(),
        dynamic_sampling: DynamicSamplingArgs = DynamicSamplingArgs(),
        max_tokens_per_micro_batch: int | None = None,
        dedup_group_prompts: bool = False,
        lr: float = 5e-6,
        reflection_match: Literal["word", "substring"] = "word",
        maye_position_ids: bool = False,
        **base_kwargs: Any,
    ) -> None:
        """
        Args:
            model_path: HF model directory (a supported Qwen VL family); also the engine's starting weights.
            sampling: How rollouts are sampled for training; G = ``sampling.n``. The trainer scores
                responses at ``sampling.temperature`` so old log-probs match the sampler's.
            rewards: Reward terms by import path and weight; None = accuracy + language (the paper).
            reward_penalty: Score given to a response with no stop token or shorter than
                ``min_response_length`` (it replaces the reward, as in MAYE); None = no penalty.
            min_response_length: Shortest unpenalised response in tokens; None = no minimum.
            advantages: Step III.5, scores to per-token advantages (estimator, γ, β_rew, whitening).
            loss: Step IV's loss (policy loss and its clip range ε, β_loss of the k3 KL, aggregation).
            ppo: Step IV's schedule (epochs, minibatch rows, gradient accumulation).
            off_policy: Importance weights of the sampled tokens from the engine's log-probs.
            dynamic_sampling: DAPO's dynamic sampling: train only on groups whose scores differ,
                generating more prompts in capped extra rounds (done by RolloutCallback).
            max_tokens_per_micro_batch: Token budget of each forward pass, padding included: rows are
                grouped by length into micro-batches of at most this many tokens (no-grad passes and
                the update; at least ``ppo.gradient_accumulation_steps`` per minibatch); None = row
                micro-batches (``forward_batch_size`` / ``ppo.gradient_accumulation_steps``).
            dedup_group_prompts: Run each prompt and its image once for its G samples (they read
                its attention state), in the no-grad passes and the update; the same log-probs.
            lr: AdamW peak learning rate (the rest of the optimizer: ``optim``).
            reflection_match: Reflection words as whole "word"s or MAYE's lower-cased "substring"s.
            maye_position_ids: Score with MAYE's 1-D positions (image tokens lose M-RoPE, unlike in vLLM).
            **base_kwargs: The model, optimizer and evaluation arguments of ``PolicyModule``.
        """
        super().__init__(model_path, lr=lr, **base_kwargs)
        self.eval_max_tokens = self.sampling.max_tokens  # self.sampling, .loss, ...: typed by PolicyModule
        self.rewards = resolve_rewards(rewards if rewards is not None else default_rewards(self.hparams.judge))
        # Set by RolloutCallback (see its docstring): rollouts by generation step.
        self.rollout_queue: RolloutQueue | None = None
        self.generation_step = 0

    @property
    def needs_reference(self) -> bool:
        """A KL coefficient is set: the frozen initial policy is built beside the trained one."""
        return self.advantages.kl_coef != 0.0 or self.loss.kl_coef != 0.0

    def config_problems(self) -> list[str]:
        groups = {"advantages": self.advantages, "loss": self.loss, "ppo": self.ppo, "off_policy": self.off_policy,
                  "dynamic_sampling": self.dynamic_sampling}
        problems = [problem for name, group in groups.items() for problem in group.problems(f"model.{name}")]
        budget = self.hparams.max_tokens_per_micro_batch
        if budget is not None and budget < 1:
            problems.append(
                f"`model.max_tokens_per_micro_batch`={budget} must be a positive token count (e.g. 16384), "
                "or null for row micro-batches."
            )
        return super().config_problems() + problems + cross_group_problems(
            self.advantages, self.off_policy, self.sampling, self.dynamic_sampling)

    # ------------------------------------------------------------------ setup

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        if stage == "fit" and datamodule is not None:
            rows = datamodule.batch_size * self.sampling.n
            if rows % self.ppo.batch_size:
                raise ConfigError(
                    f"`model.ppo.batch_size`={self.ppo.batch_size} must divide the rows per rank "
                    f"`data.batch_size` × `model.sampling.n` = {rows}; pick a divisor."
                )

    def total_gradient_steps(self) -> int:
        """Optimizer steps in the whole run: rollout batches × PPO epochs × minibatches per batch."""
        if self.trainer.max_steps != -1:  # under manual optimization max_steps counts optimizer steps
            return self.trainer.max_steps
        rows = self.trainer.datamodule.batch_size * self.sampling.n
        updates_per_batch = self.ppo.epochs * (rows // self.ppo.batch_size)
        return int(self.trainer.estimated_stepping_batches) * updates_per_batch

    # ------------------------------------------------------------------ training

    def training_step(self, batch: list[dict], batch_idx: int) -> None:
        """Steps I-IV for one rollout batch (Step I is the batch itself, Step II the callback's rollouts;
        with dynamic sampling the callback hands back the prompts it kept and drew instead of the batch)."""
        batch, rollouts = self.rollout_queue.take(self.generation_step, expected=len(batch) * self.sampling.n)
        t0 = time.perf_counter()
        trajectory = self.generate_trajectory(batch, rollouts)
        t1 = time.perf_counter()
        update_stats = self.update_policy(trajectory)
        t2 = time.perf_counter()
        self.generation_step += 1
        self.log_rollout_metrics(rollouts, trajectory)
        self.log_dict(
            {
                **update_stats,
                "perf/trajectory_s": t1 - t0,
                "perf/update_s": t2 - t1,
                "perf/update_tokens_per_s": self.ppo.epochs * trajectory.inputs.attention_mask.sum().item() / (t2 - t1),
                GENERATION_STEP: float(self.generation_step),
                "policy/gradient_step": float(self.trainer.global_step),
            },
            batch_size=len(batch),
        )

    @torch.no_grad()
    def generate_trajectory(self, batch: list[dict], rollouts: list[Rollout]) -> Trajectory:
        """Step III - trajectory: tokens, old/ref logprobs, rewards and advantages for N = B*G rows."""
        G = self.sampling.n
        self.policy.eval()  # no dropout (LoRA's) in the scoring passes; update_policy switches back
        requests = [request for request in self.requests(batch) for _ in range(G)]  # request-major, like the rollouts

        # Step III.1 - tokens: the trainer re-tokenizes prompt+response itself, cut at the first stop
        # token, so that every later step sees exactly the tokens the engine sampled.
        inputs = build_policy_inputs(
            self.processor, requests, [r.token_ids for r in rollouts], pad_token_id=self.pad_token_id, adapter=self.adapter
        ).to(self.device)
        response_mask = self.response_tokens(rollouts)[1].to(self.device)  # (N, T)
        behaviour_logprobs = engine_logprobs(rollouts, response_mask)  # (N, T) or None

        # Step III.2 - old logprobs: the proximal policy, in training numerics. With one PPO epoch of
        # one minibatch and no KL reward, the update's own forward (before its only optimizer step)
        # IS this policy, so the separate forward is skipped and the update fills them in.
        old_logprobs = None if self.update_scores_old_policy(response_mask) else self.score(self.policy, inputs) * response_mask
        # Step III.3 - ref logprobs: KL is taken against the frozen initial policy (with LoRA: the
        # policy with its adapters off).
        ref_logprobs = None
        if self.needs_reference:
            with self.reference() as reference:
                ref_logprobs = self.score(reference, inputs) * response_mask

        # Step III.4 - rewards (``score_rollouts``; dynamic sampling filtered the groups by them).
        scores, reward_components, penalized = self.score_rollouts(batch, rollouts)

        # Step III.5 - advantages: Reinforce++ whitens returns over the GLOBAL batch (all ranks).
        adv = self.advantages
        kl_logprobs = old_logprobs if old_logprobs is not None else torch.zeros_like(response_mask, dtype=torch.float32)
        advantages, returns = rl.estimate_advantages(
            adv.estimator, scores, kl_logprobs, ref_logprobs if ref_logprobs is not None else kl_logprobs,
            response_mask, kl_coef=adv.kl_coef, gamma=adv.gamma, group_size=G, maye_compat=adv.maye_compat,
            group=self.process_group(),
        )  # (N, T) each
        staleness = torch.tensor([self.global_step - r.policy_version for r in rollouts], dtype=torch.float32)
        return Trajectory(
            inputs, response_mask, old_logprobs, ref_logprobs, behaviour_logprobs, staleness.to(self.device),
            scores, advantages, returns, reward_components, penalized,
        )

    def response_tokens(self, rollouts: list[Rollout]) -> tuple[torch.Tensor, torch.Tensor]:
        """The rollouts' response ids (N, T), cut after the first stop token, and the mask (N, T) of
        their valid tokens (the stop token included), on the CPU."""
        lengths = torch.tensor([len(r.token_ids) for r in rollouts])  # (N,)
        ids = torch.full((len(rollouts), max(map(len, (r.token_ids for r in rollouts)), default=0)), self.pad_token_id,
                         dtype=torch.long)  # (N, T)
        for row, rollout in enumerate(rollouts):
            ids[row, : len(rollout.token_ids)] = torch.tensor(rollout.token_ids, dtype=torch.long)
        ids, stop_mask = rl.truncate_at_stop(ids, self.stop_token_ids, self.pad_token_id)
        # The pad id may itself be a stop id (Qwen's <|endoftext|>): keep the length mask too.
        return ids, stop_mask & (torch.arange(ids.shape[1]) < lengths[:, None])  # (N, T) each

    def score_rollouts(self, batch: list[dict], rollouts: list[Rollout]) -> tuple[torch.Tensor, dict, torch.Tensor]:
        """Step III.4 - rewards: rule rewards on the decoded text (and its length in tokens, for
        length-aware rewards: ``samples[i]["response_length"]``); a response that never stopped (or
        is too short) gets ``reward_penalty`` instead, as in MAYE.

        Returns the (N,) scores on the module's device, the reward components by name, and the (N,)
        bool mask of penalised responses. DAPO's dynamic sampling (``model.dynamic_sampling``)
        keeps the groups whose scores differ (RolloutCallback calls this before Step III).
        """
        response_ids, response_mask = self.response_tokens(rollouts)  # (N, T) each
        lengths = rl.response_lengths(response_mask).tolist()  # (N,)
        records = [sample for sample in batch for _ in range(self.sampling.n)]  # request-major, like the rollouts
        samples = [{**record, "response_length": length} for record, length in zip(records, lengths)]
        scores, components = score_responses(self.rewards, [r.text for r in rollouts], samples)
        penalized = rl.needs_length_penalty(response_ids, response_mask, self.stop_token_ids, self.hparams.min_response_length)
        if self.hparams.reward_penalty is not None:
            scores = rl.apply_penalty(scores, penalized, self.hparams.reward_penalty)  # (N,)
        else:
            penalized = torch.zeros_like(penalized)
        return scores.to(self.device), components, penalized.to(self.device)

    def update_scores_old_policy(self, response_mask: torch.Tensor) -> bool:
        """Whether Step IV's single forward before its single optimizer step can stand in for Step III.2."""
        return self.ppo.epochs == 1 and self.ppo.batch_size == response_mask.shape[0] and self.advantages.kl_coef == 0.0

    def score(self, model: torch.nn.Module, inputs: Any, *, return_entropy: bool = False) -> Any:
        """Response-token logprobs (N, T) of ``model`` at the sampling temperature."""
        return response_logprobs(model, inputs, return_entropy=return_entropy, **self.scoring_kwargs())

    def scoring_kwargs(self) -> dict[str, Any]:
        """How the model scores rows: temperature, micro-batching, the compute switches."""
        hp = self.hparams
        return dict(
            temperature=self.sampling.temperature, forward_batch_size=hp.forward_batch_size,
            max_tokens_per_micro_batch=hp.max_tokens_per_micro_batch, dedup_group_prompts=hp.dedup_group_prompts,
            process_group=self.process_group(), banned_token_ids=self.banned_token_ids,
            maye_position_ids=hp.maye_position_ids,
        )

    def corrects_off_policy(self, trajectory: Trajectory) -> bool:
        """Weight tokens by min(π_old/π_behaviour, C): on when asked, or (None) when the rollouts are stale."""
        wanted = self.off_policy.correction
        if wanted is None:
            wanted = bool((trajectory.staleness > 0).any())
        if wanted and trajectory.behaviour_logprobs is None:
            raise ConfigError(
                "`model.off_policy.correction` needs the engine's log-probs of the sampled tokens, but the "
                "rollouts carry none; set `model.sampling.logprobs` true."
            )
        return wanted

    def update_policy(self, trajectory: Trajectory) -> dict[str, float]:
        """Step IV - policy update: ppo.epochs × shuffled minibatches, one optimizer step each."""
        self.policy.train()
        generator = torch.Generator().manual_seed(hash((self.trainer.global_step, self.global_rank)) % 2**31)
        correct = self.corrects_off_policy(trajectory)
        scored_old = torch.zeros_like(trajectory.response_mask, dtype=torch.float32)  # (N, T), filled when Step III.2 was skipped
        stats: list[dict[str, float]] = []
        for _ in range(self.ppo.epochs):
            order = torch.randperm(trajectory.num_rows, generator=generator)
            for mb_rows in order.split(self.ppo.batch_size):
                mb_stats, mb_old = self.optimizer_step(trajectory.select(mb_rows), correct)
                stats.append(mb_stats)
                scored_old[mb_rows.to(scored_old.device)] = mb_old
        if trajectory.old_logprobs is None:
            trajectory.old_logprobs = scored_old
        return average_stats(stats)

    def optimizer_step(self, mb: Trajectory, correct_off_policy: bool) -> tuple[dict[str, float], torch.Tensor]:
        """One minibatch: zero, backward over micro-batches, clip, step, scheduler.

        Returns the step's statistics and the minibatch's (b, T) old log-probs.
        """
        self.optimizers().zero_grad()
        normalizer = self.loss_normalizer(mb)
        micro_stats, old_parts = [], []
        # Micro-batches: gradient_accumulation_steps row chunks, or token budgets (length-grouped);
        # with dedup_group_prompts the minibatch's prompts run once, here.
        scorer = ResponseScorer(self.policy, mb.inputs, count=self.ppo.gradient_accumulation_steps,
                                **self.scoring_kwargs())
        for micro_rows in scorer.micro_batches:
            micro = mb.select(micro_rows)
            logprobs, entropy = scorer.logprobs(micro_rows, return_entropy=True)  # (b, T) each
            old = micro.old_logprobs if micro.old_logprobs is not None else logprobs.detach() * micro.response_mask
            loss, loss_stats = self.micro_batch_loss(micro, logprobs, old, correct_off_policy, normalizer)
            self.manual_backward(loss)
            micro_stats.append(micro_batch_stats(loss, loss_stats, entropy, micro.response_mask))
            old_parts.append(old)
        scorer.backward()  # the shared prompts' backward, once, after every micro-batch's
        step_stats = self.clip_and_step()
        stats = average_stats(micro_stats)
        stats["loss/total"] *= len(micro_stats)  # micro-batch losses add up to the minibatch's
        return {**stats, **step_stats}, torch.cat(old_parts)[torch.cat(scorer.micro_batches).argsort()]  # mb order

    def micro_batch_loss(
        self, micro: Trajectory, logprobs: torch.Tensor, old: torch.Tensor, correct_off_policy: bool, normalizer: float
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One micro-batch's share of the minibatch loss: the policy loss (``model.loss.policy_loss``,
        each token weighted by its off-policy weight when correcting) + β_loss · k3 KL to the reference.

        Args:
            micro: the micro-batch's rows of the trajectory.
            logprobs: (b, T) log π_θ with grad; ``old``: (b, T) log π_old.
            correct_off_policy: apply the behaviour weights (their statistics are logged either way).
            normalizer: the whole minibatch's count for the aggregation (``loss_normalizer``).
        """
        mask, op = micro.response_mask, self.off_policy
        aggregation = {"agg": self.loss.agg, "normalizer": normalizer, "max_tokens": self.sampling.max_tokens}
        weights, stats = None, {}
        if micro.behaviour_logprobs is not None:
            weights, behaviour = rl.behaviour_weights(old, micro.behaviour_logprobs, mask, mode=op.mode,
                                                      level=op.level, low=op.low, high=op.high)  # (b, T)
            stats.update({f"behaviour_{name}": value for name, value in behaviour.items()})
        loss, policy_stats = rl.POLICY_LOSSES[self.loss.policy_loss](
            logprobs, old, micro.advantages, mask, clip_low=self.loss.clip_low, clip_high=self.loss.clip_high,
            weights=weights if correct_off_policy else None, **aggregation,
        )
        stats.update(policy_stats)
        if micro.ref_logprobs is not None:
            kl, stats["kl_loss"] = rl.kl_loss(logprobs, micro.ref_logprobs, mask, **aggregation)
            loss = loss + self.loss.kl_coef * kl
        return loss, stats

    def loss_normalizer(self, mb: Trajectory) -> float:
        """The aggregation's denominator: the global minibatch's tokens per rank ("token_mean"), so
        that the ranks' averaged gradients equal one big minibatch's; the sequence means: its rows
        (equal on every rank)."""
        if self.loss.agg != "token_mean":
            return float(mb.num_rows)
        return tokens_per_rank(mb.response_mask, self.process_group())

    def log_rollout_metrics(self, rollouts: list[Rollout], trajectory: Trajectory) -> None:
        """What MAYE logs per generation step (rewards by component, KL, lengths, reflection, engine
        mismatch), reduced over all ranks in two collectives, plus the progress-bar values."""
        accuracy = trajectory.reward_components.get("accuracy")
        metrics = rollout_step_metrics(rollouts, trajectory, self.hparams.reflection_match, self.process_group())
        self.log_dict(metrics, batch_size=trajectory.num_rows)
        if accuracy is not None:
            self.log("reward/accuracy", accuracy.float().mean().to(self.device), on_step=True, on_epoch=True,
                     sync_dist=True, prog_bar=True, batch_size=trajectory.num_rows)
            log_reflective_sample(self.loggers, [r.text for r in rollouts], accuracy, self.hparams.reflection_match,
                                  self.generation_step, self.global_step)
        self.log("reward", trajectory.scores.mean(), prog_bar=True, logger=False, batch_size=trajectory.num_rows)

    # ------------------------------------------------------------------ checkpoints

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["generation_step"] = self.generation_step

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.generation_step = checkpoint.get("generation_step", 0)
