"""Reinforce++ for a vision-language policy, as a LightningModule that reads like MAYE's recipe.

Paper: "Rethinking RL Scaling for Vision Language Models" (MAYE, arXiv 2504.02587), Fig. 2's four
stages. Notation: B prompts on this rank, G samples per prompt, N = B*G rows, T response tokens.

    Step I    data           a batch of prompts (question, image, answer) from MayeDataModule
    Step II   rollouts       RolloutCallback.on_train_batch_start leaves N responses in self.rollout_queue
    Step III  trajectory     prompt+response tokens, old/ref logprobs, rewards, advantages
    Step IV   policy update  ppo_epochs × minibatches × gradient accumulation of PPO-clip + k3 KL
    (then)    weight sync    RolloutCallback streams the new weights into the engine before it next generates
"""

from __future__ import annotations

import time
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from transformers import GenerationConfig

from maye_pl import rl
from maye_pl.evaluation import (
    GENERATION_STEP,
    PAPER_EVAL_SETTINGS,
    EvalSetting,
)
from maye_pl.evaluation.scheme import PaperEvaluation
from maye_pl.hparams import reinforce_pp_problems
from maye_pl.evaluation.step_metrics import (
    average_stats,
    log_reflective_sample,
    micro_batch_stats,
    rollout_step_metrics,
)
from maye_pl.models.forward import ResponseScorer, build_policy_inputs, response_logprobs
from maye_pl.models.adapters import adapter_for
from maye_pl.models.loading import build_policy_and_reference, load_processor, stop_token_ids
from maye_pl.optim import build_adamw, optimizer_problems, tokens_per_rank
from maye_pl.rewards import Judge, RewardTerm, default_rewards, judge_problems, resolve_rewards, score_responses
from maye_pl.rollout.queue import RolloutQueue
from maye_pl.strategies import FSDP2Strategy, clip_grad_norm_
from maye_pl.trajectory import Trajectory, engine_logprobs
from maye_pl.types import Rollout, SamplingConfig


class ReinforcePP(PaperEvaluation, pl.LightningModule):
    """Reinforce++ (paper Eq. 1) with PPO-clip updates and a k3 KL loss against a frozen reference."""

    def __init__(
        self,
        model_path: str,
        *,
        dtype: str = "float32",
        attn_implementation: str = "sdpa",
        train_vit: bool = False,
        train_connector: bool = False,
        train_llm: bool = True,
        gradient_checkpointing: bool = False,
        sampling: SamplingConfig = SamplingConfig(),
        eval_settings: list[EvalSetting] | None = None,
        validate_before_fit: bool = True,
        rewards: list[RewardTerm] | None = None,
        reward_penalty: float | None = -0.1,
        min_response_length: int | None = None,
        advantage_estimator: str = "reinforce_pp",
        maye_compat: bool = False,
        gamma: float = 1.0,
        kl_reward_coef: float = 0.0,
        kl_loss_coef: float = 0.001,
        clip_eps_low: float = 0.2,
        clip_eps_high: float = 0.2,
        loss_agg: str = "token_mean",
        off_policy_correction: bool | None = None,
        behaviour_weight_cap: float = 2.0,
        ppo_epochs: int = 1,
        ppo_batch_size: int = 4,
        gradient_accumulation_steps: int = 1,
        forward_batch_size: int = 16,
        max_tokens_per_micro_batch: int | None = None,
        dedup_group_prompts: bool = False,
        lr: float = 5e-6,
        weight_decay: float = 0.0,
        adam_betas: tuple[float, float] = (0.9, 0.999),
        adam_eps: float = 1e-8,
        warmup_steps: int | None = None,
        warmup_ratio: float | None = None,
        min_lr_ratio: float = 0.0,
        max_grad_norm: float | None = 1.0,
        judge: Judge = "math_verify",
        reflection_match: Literal["word", "substring"] = "word",
        maye_position_ids: bool = False,
    ) -> None:
        """
        Args:
            model_path: HF model directory (Qwen2-VL / Qwen2.5-VL); also the engine's starting weights.
            dtype: Parameter dtype of policy and reference ("float32", "bfloat16").
            attn_implementation: transformers attention backend ("sdpa", "flash_attention_2", "eager").
            train_vit: Train the vision transformer blocks (the paper freezes them).
            train_connector: Train the vision-language connector (the paper freezes it).
            train_llm: Train the language model and lm_head (the paper trains only these).
            gradient_checkpointing: Recompute decoder activations in the backward pass.
            sampling: How rollouts are sampled for training; G = ``sampling.n``. The trainer scores
                responses at ``sampling.temperature`` so old log-probs match the sampler's.
            eval_settings: Validation/test generation settings; None = the paper's three
                (pass@8 T=1.0, pass@1 T=0.6, pass@1 T=0.01).
            validate_before_fit: Run validation once before training ("Vanilla", epoch 0).
            rewards: Reward terms by import path and weight; None = accuracy + language (the paper).
            reward_penalty: Score given to a response with no stop token or shorter than
                ``min_response_length`` (it replaces the reward, as in MAYE); None = no penalty.
            min_response_length: Shortest unpenalised response in tokens; None = no minimum.
            advantage_estimator: "reinforce_pp" (paper), "reinforce_pp_baseline" or "grpo".
            maye_compat: Whiten advantages per rank and add the mean back, exactly as MAYE's code
                does; the default whitens over the global batch to zero mean.
            gamma: Discount of the per-token returns (the paper uses 1).
            kl_reward_coef: β_rew, the KL penalty folded into the token rewards (the paper uses 0).
            kl_loss_coef: β_loss, the k3 KL(π‖π_ref) term of the loss (the paper uses 0.001).
            clip_eps_low: PPO ratio clip below 1.
            clip_eps_high: PPO ratio clip above 1.
            loss_agg: "token_mean" over the minibatch's valid tokens, or "seq_mean".
            off_policy_correction: Weight each token's policy-gradient term by min(π_old/π_behaviour,
                ``behaviour_weight_cap``) with the engine's log-probs (decoupled PPO, truncated
                importance sampling; ``maye_pl.rl.off_policy``). None: on for rollouts sampled by an
                older policy (``rollout.max_staleness`` 1), off otherwise (MAYE); True also corrects
                the engine/trainer numerics mismatch of on-policy rollouts (bf16 on GPUs).
            behaviour_weight_cap: C, the largest importance weight.
            ppo_epochs: Passes over each rollout batch.
            ppo_batch_size: Rows per minibatch; each minibatch is one optimizer step.
            gradient_accumulation_steps: Micro-batches per minibatch (must divide ppo_batch_size).
            forward_batch_size: Rows per no-grad forward when scoring old/ref log-probs.
            max_tokens_per_micro_batch: Token budget of each forward pass, padding included: rows are
                grouped by length into micro-batches of at most this many tokens (no-grad passes and
                the update; at least ``gradient_accumulation_steps`` per minibatch); None = row
                micro-batches (``forward_batch_size`` / ``gradient_accumulation_steps``).
            dedup_group_prompts: Run each prompt and its image once for its G samples (they read
                its attention state), in the no-grad passes and the update; the same log-probs.
            lr: AdamW peak learning rate.
            weight_decay: AdamW weight decay.
            adam_betas: AdamW betas.
            adam_eps: AdamW epsilon (MAYE: 1e-5, as large as a 7B model's clipped per-weight gradients).
            warmup_steps: Linear warmup in optimizer steps, then cosine decay; None = no warmup.
            warmup_ratio: Warmup as a fraction of all optimizer steps (MAYE: 0.1); excludes ``warmup_steps``.
            min_lr_ratio: Cosine floor as a fraction of ``lr``.
            max_grad_norm: Clip the total gradient norm (over all shards); None = no clipping.
            judge: Judge of accuracy reward and evaluation: "math_verify" (last box vs ``answer``) or "maye".
            reflection_match: Reflection words as whole "word"s or MAYE's lower-cased "substring"s.
            maye_position_ids: Score with MAYE's 1-D positions (image tokens lose M-RoPE, unlike in vLLM).
        """
        super().__init__()
        self.save_hyperparameters()
        self.automatic_optimization = False
        self._validate_args()

        self.sampling = sampling
        self.eval_max_tokens = sampling.max_tokens
        self.eval_settings = eval_settings if eval_settings is not None else PAPER_EVAL_SETTINGS()
        self.rewards = resolve_rewards(rewards if rewards is not None else default_rewards(judge))
        self.adapter = adapter_for(model_path)  # the model family: an unknown one stops here
        self.processor = load_processor(model_path)
        self.stop_token_ids = stop_token_ids(GenerationConfig.from_pretrained(model_path), self.processor.tokenizer)
        # The engines never sample these (a sampled <|image_pad|> would break the forward).
        self.banned_token_ids = self.adapter.vision_token_ids(self.processor.tokenizer)
        self.policy: torch.nn.Module | None = None
        self.ref_policy: torch.nn.Module | None = None
        self.needs_reference = kl_reward_coef != 0.0 or kl_loss_coef != 0.0
        # Set by RolloutCallback (see its docstring): rollouts by generation step, and the eval ones.
        self.rollout_queue: RolloutQueue | None = None
        self.eval_rollouts: dict[str, list[Rollout]] | None = None
        self.generation_step = 0

    def _validate_args(self) -> None:
        problems = reinforce_pp_problems(self.hparams) + optimizer_problems(self.hparams)
        problems += judge_problems(self.hparams.judge, self.hparams.rewards)
        if problems:
            raise ValueError("Invalid ReinforcePP configuration:\n  " + "\n  ".join(problems))

    # ------------------------------------------------------------------ setup

    def configure_model(self) -> None:
        """Build the policy (and the frozen reference when a KL coefficient is non-zero).

        Under FSDP2Strategy the models are built on the meta device; the strategy shards them and
        loads the checkpoint on rank 0 only, streaming each rank its shards.
        """
        if self.policy is not None:
            return
        hp = self.hparams
        self.policy, self.ref_policy = build_policy_and_reference(
            hp.model_path, dtype=hp.dtype, attn_implementation=hp.attn_implementation,
            train_vit=hp.train_vit, train_connector=hp.train_connector, train_llm=hp.train_llm,
            gradient_checkpointing=hp.gradient_checkpointing, with_reference=self.needs_reference,
            on_meta=self._trainer is not None and isinstance(self.trainer.strategy, FSDP2Strategy),
        )

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        if stage == "fit" and datamodule is not None:
            rows = datamodule.batch_size * self.sampling.n
            if rows % self.hparams.ppo_batch_size:
                raise ValueError(
                    f"`model.ppo_batch_size`={self.hparams.ppo_batch_size} must divide the rows per rank "
                    f"`data.batch_size` × `model.sampling.n` = {rows}; pick a divisor."
                )

    def configure_optimizers(self) -> dict[str, Any]:
        trainable = [p for p in self.policy.parameters() if p.requires_grad]
        optimizer, scheduler = build_adamw(trainable, self.hparams, self.total_gradient_steps())
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def total_gradient_steps(self) -> int:
        """Optimizer steps in the whole run: rollout batches × PPO epochs × minibatches per batch."""
        if self.trainer.max_steps != -1:  # under manual optimization max_steps counts optimizer steps
            return self.trainer.max_steps
        rows = self.trainer.datamodule.batch_size * self.sampling.n
        updates_per_batch = self.hparams.ppo_epochs * (rows // self.hparams.ppo_batch_size)
        return int(self.trainer.estimated_stepping_batches) * updates_per_batch

    # ------------------------------------------------------------------ training

    def training_step(self, batch: list[dict], batch_idx: int) -> None:
        """Steps I-IV for one rollout batch (Step I is the batch itself, Step II the callback's rollouts)."""
        rollouts = self.rollout_queue.take(self.generation_step, expected=len(batch) * self.sampling.n)
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
                "perf/update_tokens_per_s": self.hparams.ppo_epochs * trajectory.inputs.attention_mask.sum().item() / (t2 - t1),
                GENERATION_STEP: float(self.generation_step),
                "policy/gradient_step": float(self.trainer.global_step),
            },
            batch_size=len(batch),
        )

    @torch.no_grad()
    def generate_trajectory(self, batch: list[dict], rollouts: list[Rollout]) -> Trajectory:
        """Step III - trajectory: tokens, old/ref logprobs, rewards and advantages for N = B*G rows."""
        G = self.sampling.n
        samples = [sample for sample in batch for _ in range(G)]  # request-major, like the rollouts
        requests = [request for request in self.requests(batch) for _ in range(G)]

        # Step III.1 - tokens: the trainer re-tokenizes prompt+response itself, cut at the first stop
        # token, so that every later step sees exactly the tokens the engine sampled.
        inputs = build_policy_inputs(
            self.processor, requests, [r.token_ids for r in rollouts], pad_token_id=self.pad_token_id, adapter=self.adapter
        ).to(self.device)
        # The pad id may itself be a stop id (Qwen's <|endoftext|>): keep the length mask too.
        response_ids, stop_mask = rl.truncate_at_stop(inputs.response_ids, self.stop_token_ids, self.pad_token_id)
        response_mask = stop_mask & inputs.response_mask  # (N, T)
        behaviour_logprobs = engine_logprobs(rollouts, response_mask)  # (N, T) or None

        # Step III.2 - old logprobs: the proximal policy, in training numerics. With one PPO epoch of
        # one minibatch and no KL reward, the update's own forward (before its only optimizer step)
        # IS this policy, so the separate forward is skipped and the update fills them in.
        old_logprobs = None if self.update_scores_old_policy(response_mask) else self.score(self.policy, inputs) * response_mask
        # Step III.3 - ref logprobs: KL is taken against the frozen initial policy.
        ref_logprobs = self.score(self.ref_policy, inputs) * response_mask if self.ref_policy is not None else None

        # Step III.4 - rewards: rule rewards on the decoded text; a response that never stopped (or
        # is too short) gets `reward_penalty` instead, as in MAYE.
        texts = [r.text for r in rollouts]
        scores, reward_components = score_responses(self.rewards, texts, samples)
        scores = scores.to(self.device)
        penalized = rl.needs_length_penalty(response_ids, response_mask, self.stop_token_ids, self.hparams.min_response_length)
        if self.hparams.reward_penalty is not None:
            scores = rl.apply_penalty(scores, penalized, self.hparams.reward_penalty)  # (N,)
        else:
            penalized = torch.zeros_like(penalized)

        # Step III.5 - advantages: Reinforce++ whitens returns over the GLOBAL batch (all ranks).
        hp = self.hparams
        kl_logprobs = old_logprobs if old_logprobs is not None else torch.zeros_like(response_mask, dtype=torch.float32)
        advantages, returns = rl.estimate_advantages(
            hp.advantage_estimator, scores, kl_logprobs, ref_logprobs if ref_logprobs is not None else kl_logprobs,
            response_mask, kl_coef=hp.kl_reward_coef, gamma=hp.gamma, group_size=G, maye_compat=hp.maye_compat,
            group=self.process_group(),
        )  # (N, T) each
        staleness = torch.tensor([self.global_step - r.policy_version for r in rollouts], dtype=torch.float32)
        return Trajectory(
            inputs, response_mask, old_logprobs, ref_logprobs, behaviour_logprobs, staleness.to(self.device),
            scores, advantages, returns, reward_components, penalized,
        )

    def update_scores_old_policy(self, response_mask: torch.Tensor) -> bool:
        """Whether Step IV's single forward before its single optimizer step can stand in for Step III.2."""
        hp = self.hparams
        return hp.ppo_epochs == 1 and hp.ppo_batch_size == response_mask.shape[0] and hp.kl_reward_coef == 0.0

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
        wanted = self.hparams.off_policy_correction
        if wanted is None:
            wanted = bool((trajectory.staleness > 0).any())
        if wanted and trajectory.behaviour_logprobs is None:
            raise ValueError(
                "`model.off_policy_correction` needs the engine's log-probs of the sampled tokens, but the "
                "rollouts carry none; set `model.sampling.logprobs` true."
            )
        return wanted

    def update_policy(self, trajectory: Trajectory) -> dict[str, float]:
        """Step IV - policy update: ppo_epochs × shuffled minibatches, one optimizer step each."""
        hp = self.hparams
        self.policy.train()
        generator = torch.Generator().manual_seed(hash((self.trainer.global_step, self.global_rank)) % 2**31)
        correct = self.corrects_off_policy(trajectory)
        scored_old = torch.zeros_like(trajectory.response_mask, dtype=torch.float32)  # (N, T), filled when Step III.2 was skipped
        stats: list[dict[str, float]] = []
        for _ in range(hp.ppo_epochs):
            order = torch.randperm(trajectory.num_rows, generator=generator)
            for mb_rows in order.split(hp.ppo_batch_size):
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
        hp = self.hparams
        optimizer, scheduler = self.optimizers(), self.lr_schedulers()
        optimizer.zero_grad()
        normalizer = self.loss_normalizer(mb)
        micro_stats, old_parts = [], []
        # Micro-batches: gradient_accumulation_steps row chunks, or token budgets (length-grouped);
        # with dedup_group_prompts the minibatch's prompts run once, here.
        scorer = ResponseScorer(self.policy, mb.inputs, count=hp.gradient_accumulation_steps, **self.scoring_kwargs())
        for micro_rows in scorer.micro_batches:
            micro = mb.select(micro_rows)
            logprobs, entropy = scorer.logprobs(micro_rows, return_entropy=True)  # (b, T) each
            old = micro.old_logprobs if micro.old_logprobs is not None else logprobs.detach() * micro.response_mask
            weights = behaviour_stats = None
            if micro.behaviour_logprobs is not None:  # the stats are logged also when not applied
                weights, behaviour_stats = rl.truncated_importance_weights(
                    old, micro.behaviour_logprobs, micro.response_mask, hp.behaviour_weight_cap
                )  # (b, T)
            loss, loss_stats = rl.ppo_clip_loss(
                logprobs, old, micro.ref_logprobs if micro.ref_logprobs is not None else old, micro.advantages,
                micro.response_mask, clip_eps_low=hp.clip_eps_low, clip_eps_high=hp.clip_eps_high,
                kl_loss_coef=hp.kl_loss_coef, loss_agg=hp.loss_agg, normalizer=normalizer,
                importance_weights=weights if correct_off_policy else None,
            )
            self.manual_backward(loss)
            micro_stats.append(micro_batch_stats(loss, loss_stats, entropy, micro.response_mask, behaviour_stats))
            old_parts.append(old)
        scorer.backward()  # the shared prompts' backward, once, after every micro-batch's
        max_norm = hp.max_grad_norm if hp.max_grad_norm is not None else float("inf")
        grad_norm = clip_grad_norm_([p for p in self.policy.parameters() if p.requires_grad], max_norm)
        optimizer.step()
        scheduler.step()
        stats = average_stats(micro_stats)
        stats["loss/total"] *= len(micro_stats)  # micro-batch losses add up to the minibatch's
        stats.update({"policy/grad_norm": float(grad_norm), "policy/lr": scheduler.get_last_lr()[0]})
        return stats, torch.cat(old_parts)[torch.cat(scorer.micro_batches).argsort()]  # rows back in mb order

    def loss_normalizer(self, mb: Trajectory) -> float:
        """The loss denominator: the global minibatch's tokens per rank ("token_mean"), so that the
        ranks' averaged gradients equal one big minibatch's; "seq_mean": the rows (equal on every rank)."""
        if self.hparams.loss_agg != "token_mean":
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

    # ------------------------------------------------------------------ helpers

    @property
    def pad_token_id(self) -> int:
        tokenizer = self.processor.tokenizer
        return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def process_group(self) -> Any:
        """The group for global statistics (None in a single process)."""
        return dist.group.WORLD if dist.is_available() and dist.is_initialized() else None

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["generation_step"] = self.generation_step

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.generation_step = checkpoint.get("generation_step", 0)
