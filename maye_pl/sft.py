"""The SFT baseline: supervised fine-tuning on the golden solutions of the same MAYE jsonl.

Paper: MAYE (arXiv 2504.02587) §5.5 compares RL with SFT on the same training set and the same
evaluation scheme. This module is ReinforcePP's sibling: the same data module, model loading and
freezing, evaluation (PaperEvaluation: val + test pass@k through the engine, before training and
after every epoch), so one `maye_pl report` puts RL and SFT runs side by side. Notation: N rows
(one per prompt of the batch on this rank), P prompt tokens, T solution tokens.

    Step 1  tokens      prompt (chat template + image) → the golden ``solution`` + the stop token
                        as the "response", batched exactly like ReinforcePP's rollouts
    Step 2  loss        negative log-likelihood of the response tokens only (prompt and padding
                        masked), token mean over the GLOBAL batch, micro-batch by micro-batch
    Step 3  update      clip the gradient norm, AdamW step, warmup + cosine schedule

The engine (RolloutCallback) only serves evaluation here: ``sampling`` is None, so it generates
no training rollouts and syncs the weights lazily before each validation.
"""

from __future__ import annotations

import time
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor
from transformers import GenerationConfig

from maye_pl.evaluation import PAPER_EVAL_SETTINGS, EvalSetting
from maye_pl.evaluation.scheme import PaperEvaluation
from maye_pl.models.adapters import adapter_for
from maye_pl.models.forward import PolicyInputs, build_policy_inputs, response_logprobs, select_rows
from maye_pl.models.loading import build_policy_and_reference, load_processor, stop_token_ids
from maye_pl.optim import build_adamw, optimizer_problems, tokens_per_rank
from maye_pl.rewards import Judge, judge_problems
from maye_pl.strategies import FSDP2Strategy, clip_grad_norm_
from maye_pl.types import Rollout


def solution_nll(logprobs: Tensor, mask: Tensor, normalizer: float) -> Tensor:
    """Summed negative log-likelihood of the masked tokens, divided by ``normalizer``.

    Args:
        logprobs: (n, T) log p of each response token under the policy.
        mask: (n, T) bool, True on solution tokens (the stop token included), False on padding.
        normalizer: the token count to divide by; ``tokens_per_rank`` of the whole batch makes the
            micro-batch losses sum to the batch's token-mean NLL.

    Returns:
        0-dim loss.
    """
    return -(logprobs * mask).sum() / normalizer


class SFT(PaperEvaluation, pl.LightningModule):
    """Cross-entropy on the golden solutions given question + image (the paper's SFT baseline).

    Manual optimization, for one reason: each ``forward_batch_size`` micro-batch is backpropagated
    as soon as its loss exists, so activation memory is bounded by a micro-batch, while the loss
    stays the token mean over the whole (global) batch; automatic optimization can only accumulate
    whole dataloader batches, each normalised on its own.
    """

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
        eval_settings: list[EvalSetting] | None = None,
        eval_max_tokens: int = 2048,
        validate_before_fit: bool = True,
        lr: float = 1e-5,
        weight_decay: float = 0.0,
        adam_betas: tuple[float, float] = (0.9, 0.999),
        adam_eps: float = 1e-8,
        warmup_steps: int | None = None,
        warmup_ratio: float | None = None,
        min_lr_ratio: float = 0.0,
        max_grad_norm: float | None = 1.0,
        forward_batch_size: int = 16,
        judge: Judge = "math_verify",
    ) -> None:
        """
        Args:
            model_path: HF model directory (Qwen2-VL / Qwen2.5-VL); also the engine's starting weights.
            dtype: Parameter dtype of the policy ("float32", "bfloat16").
            attn_implementation: transformers attention backend ("sdpa", "flash_attention_2", "eager").
            train_vit: Train the vision transformer blocks (the paper freezes them).
            train_connector: Train the vision-language connector (the paper freezes it).
            train_llm: Train the language model and lm_head (the paper trains only these).
            gradient_checkpointing: Recompute decoder activations in the backward pass.
            eval_settings: Validation/test generation settings; None = the paper's three
                (pass@8 T=1.0, pass@1 T=0.6, pass@1 T=0.01).
            eval_max_tokens: Longest evaluation response in tokens (the paper generates 2048).
            validate_before_fit: Run validation once before training ("Vanilla", epoch 0).
            lr: AdamW peak learning rate (the paper's SFT uses 1e-5).
            weight_decay: AdamW weight decay.
            adam_betas: AdamW betas.
            adam_eps: AdamW epsilon.
            warmup_steps: Linear warmup in optimizer steps (one per batch), then cosine decay; None = none.
            warmup_ratio: Warmup as a fraction of all optimizer steps; excludes ``warmup_steps``.
            min_lr_ratio: Cosine floor as a fraction of ``lr``.
            max_grad_norm: Clip the total gradient norm (over all shards); None = no clipping.
            forward_batch_size: Rows per forward + backward pass; a batch is split into
                micro-batches of this size to bound activation memory (the loss is unchanged).
            judge: Evaluation's answer judge: "math_verify" (last box vs ``answer``) or "maye" (MAYE's
                judge vs ``solution``); compare SFT and RL runs under the same judge.
        """
        super().__init__()
        self.save_hyperparameters()
        self.automatic_optimization = False
        self._validate_args()

        # What RolloutCallback reads (see its docstring): no training rollouts, eval only.
        self.sampling = None
        self.eval_settings = eval_settings if eval_settings is not None else PAPER_EVAL_SETTINGS()
        self.eval_max_tokens = eval_max_tokens
        self.eval_rollouts: dict[str, list[Rollout]] | None = None
        self.adapter = adapter_for(model_path)  # the model family: an unknown one stops here
        self.processor = load_processor(model_path)
        tokenizer = self.processor.tokenizer
        # The response ends where the engine would stop: the first stop id (<|im_end|> for Qwen chat).
        self.stop_token_id = stop_token_ids(GenerationConfig.from_pretrained(model_path), tokenizer)[0]
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.policy: torch.nn.Module | None = None

    def _validate_args(self) -> None:
        hp = self.hparams
        problems = []
        if not (hp.train_vit or hp.train_connector or hp.train_llm):
            problems.append("`model.train_vit`, `train_connector` and `train_llm` are all false; nothing would train.")
        for name in ("forward_batch_size", "eval_max_tokens"):
            if hp[name] < 1:
                problems.append(f"`model.{name}`={hp[name]} must be at least 1.")
        problems += optimizer_problems(hp) + judge_problems(hp.judge, None)
        if hp.max_grad_norm is not None and hp.max_grad_norm <= 0:
            problems.append(f"`model.max_grad_norm`={hp.max_grad_norm} must be positive; use null for no clipping.")
        if problems:
            raise ValueError("Invalid SFT configuration:\n  " + "\n  ".join(problems))

    # ------------------------------------------------------------------ setup

    def configure_model(self) -> None:
        """Build the policy; under FSDP2Strategy on the meta device (the strategy shards and loads)."""
        if self.policy is not None:
            return
        hp = self.hparams
        self.policy, _ = build_policy_and_reference(
            hp.model_path, dtype=hp.dtype, attn_implementation=hp.attn_implementation,
            train_vit=hp.train_vit, train_connector=hp.train_connector, train_llm=hp.train_llm,
            gradient_checkpointing=hp.gradient_checkpointing, with_reference=False,
            on_meta=self._trainer is not None and isinstance(self.trainer.strategy, FSDP2Strategy),
        )

    def configure_optimizers(self) -> dict[str, Any]:
        trainable = [p for p in self.policy.parameters() if p.requires_grad]
        # One optimizer step per batch, so the trainer's estimate (max_steps included) is the run length.
        optimizer, scheduler = build_adamw(trainable, self.hparams, int(self.trainer.estimated_stepping_batches))
        # Returned for Lightning to checkpoint; optimizer_step steps it once per optimizer step.
        return {"optimizer": optimizer, "lr_scheduler": scheduler}

    # ------------------------------------------------------------------ training

    def training_step(self, batch: list[dict], batch_idx: int) -> None:
        """Steps 1-3 for one batch of prompts with their golden solutions."""
        t0 = time.perf_counter()
        inputs = self.solution_inputs(batch).to(self.device)
        t1 = time.perf_counter()
        stats = self.optimizer_step(inputs)
        t2 = time.perf_counter()
        self.log("loss/sft", stats.pop("loss/sft"), prog_bar=True, sync_dist=True, batch_size=len(batch))
        self.log_dict(
            {
                **stats,
                "perf/tokenize_s": t1 - t0,
                "perf/update_s": t2 - t1,
                "perf/update_tokens_per_s": inputs.attention_mask.sum().item() / (t2 - t1),
            },
            batch_size=len(batch),
        )

    def solution_inputs(self, batch: list[dict]) -> PolicyInputs:
        """Step 1 - tokens: each prompt with its golden solution as the response, N = B rows.

        The solution is tokenized on its own (the prompt already ends with the assistant header)
        and closed with the stop token, so the model learns to stop where the engine will.
        """
        tokenizer = self.processor.tokenizer
        solutions = [tokenizer.encode(sample["solution"], add_special_tokens=False) + [self.stop_token_id]
                     for sample in batch]
        return build_policy_inputs(
            self.processor, self.requests(batch), solutions, pad_token_id=self.pad_token_id, adapter=self.adapter
        )

    def optimizer_step(self, inputs: PolicyInputs) -> dict[str, float]:
        """Steps 2-3 - loss and update: zero, backward per micro-batch, clip, step, scheduler."""
        hp = self.hparams
        optimizer, scheduler = self.optimizers(), self.lr_schedulers()
        optimizer.zero_grad()
        # Step 2 - loss: every micro-batch divides by the global batch's tokens per rank, so the
        # backward passes add up to the gradient of the token mean over all ranks' solution tokens.
        normalizer = tokens_per_rank(inputs.response_mask)
        loss = torch.zeros((), device=self.device)
        for mb_rows in torch.arange(inputs.num_rows).split(hp.forward_batch_size):
            mb = select_rows(inputs, mb_rows)
            mb_logprobs = response_logprobs(self.policy, mb, temperature=1.0)  # (n, T)
            mb_loss = solution_nll(mb_logprobs, mb.response_mask, normalizer)
            self.manual_backward(mb_loss)
            loss += mb_loss.detach()
        # Step 3 - update.
        max_norm = hp.max_grad_norm if hp.max_grad_norm is not None else float("inf")
        grad_norm = clip_grad_norm_([p for p in self.policy.parameters() if p.requires_grad], max_norm)
        optimizer.step()
        scheduler.step()
        return {"loss/sft": loss, "policy/grad_norm": float(grad_norm), "policy/lr": scheduler.get_last_lr()[0]}
