"""The SFT baseline: supervised fine-tuning on the golden solutions of the same MAYE jsonl.

Paper: MAYE (arXiv 2504.02587) §5.5 compares RL with SFT on the same training set and the same
evaluation scheme. This module is ReinforcePP's sibling (both are ``PolicyModule``s): the same
data module, model arguments, loading and freezing, optimizer (``model.lr``, ``model.optim``),
evaluation (val + test pass@k through the engine, before training and after every epoch), so one
`maye_pl report` puts RL and SFT runs side by side. Notation: N rows
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

import torch
from torch import Tensor

from maye_pl.models.forward import PolicyInputs, build_policy_inputs, response_logprobs, select_rows
from maye_pl.optim import tokens_per_rank
from maye_pl.policy_module import PolicyModule


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


class SFT(PolicyModule):
    """Cross-entropy on the golden solutions given question + image (the paper's SFT baseline).

    Manual optimization, for one reason: each ``forward_batch_size`` micro-batch is backpropagated
    as soon as its loss exists, so activation memory is bounded by a micro-batch, while the loss
    stays the token mean over the whole (global) batch; automatic optimization can only accumulate
    whole dataloader batches, each normalised on its own.
    """

    def __init__(self, model_path: str, *, eval_max_tokens: int = 2048, lr: float = 1e-5, **base_kwargs: Any) -> None:
        """
        Args:
            model_path: HF model directory (a supported Qwen VL family); also the engine's starting weights.
            eval_max_tokens: Longest evaluation response in tokens (the paper generates 2048).
            lr: AdamW peak learning rate (the paper's SFT uses 1e-5); one optimizer step per batch.
            **base_kwargs: The model, optimizer and evaluation arguments of ``PolicyModule``.
        """
        super().__init__(model_path, lr=lr, **base_kwargs)
        # What RolloutCallback reads (see its docstring): no training rollouts, eval only.
        self.sampling = None
        self.eval_max_tokens = eval_max_tokens

    def config_problems(self) -> list[str]:
        problems = super().config_problems()
        if self.hparams.eval_max_tokens < 1:
            problems.append(f"`model.eval_max_tokens`={self.hparams.eval_max_tokens} must be at least 1.")
        return problems

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
        stop = self.stop_token_ids[0]  # <|im_end|> for Qwen chat
        solutions = [tokenizer.encode(sample["solution"], add_special_tokens=False) + [stop]
                     for sample in batch]
        return build_policy_inputs(
            self.processor, self.requests(batch), solutions, pad_token_id=self.pad_token_id, adapter=self.adapter
        )

    def optimizer_step(self, inputs: PolicyInputs) -> dict[str, float]:
        """Steps 2-3 - loss and update: zero, backward per micro-batch, clip, step, scheduler."""
        self.optimizers().zero_grad()
        # Step 2 - loss: every micro-batch divides by the global batch's tokens per rank, so the
        # backward passes add up to the gradient of the token mean over all ranks' solution tokens.
        normalizer = tokens_per_rank(inputs.response_mask)
        loss = torch.zeros((), device=self.device)
        for mb_rows in torch.arange(inputs.num_rows).split(self.hparams.forward_batch_size):
            mb = select_rows(inputs, mb_rows)
            mb_logprobs = response_logprobs(self.policy, mb, temperature=1.0)  # (n, T)
            mb_loss = solution_nll(mb_logprobs, mb.response_mask, normalizer)
            self.manual_backward(mb_loss)
            loss += mb_loss.detach()
        # Step 3 - update.
        return {"loss/sft": loss, **self.clip_and_step()}
