"""The trainer's forward passes: log-probabilities of the response tokens, micro-batch by micro-batch.

Notation: N rows (``PolicyInputs``: left-padded prompt, right-padded response), T response
columns, V vocabulary; n rows in one micro-batch.

Steps III (old/ref log-probs, no grad) and IV (the update, with grad) both run the model here.
Which rows share a forward pass (``micro_batches``), and how one pass runs:

    padded          n rows of (P + T) columns, all-padding columns dropped    (default)
    packed          n rows as one sequence without padding (``packing``)      (flash-attention models)
    shared prompt   one pass per distinct prompt, one for the responses       (``dedup_group_prompts``)
                    (``shared_prompt``)

All three give each row's log-probs as the model computes them on that row alone (fp32: within
1e-5 of one another); only the work differs.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from maye_pl.models.micro_batches import token_budget_micro_batches
from maye_pl.models.packing import packed_logits, packs_rows
from maye_pl.models.policy_inputs import PolicyInputs, build_policy_inputs, select_rows, trim_padding
from maye_pl.models.shared_prompt import SharedPrompts
from maye_pl.rl.logprobs import token_entropy, token_logprobs

__all__ = ["PolicyInputs", "ResponseScorer", "build_policy_inputs", "micro_batches", "response_logprobs", "select_rows"]


def micro_batches(
    inputs: PolicyInputs,
    model: nn.Module,
    *,
    count: int = 1,
    max_tokens: int | None = None,
    dedup_group_prompts: bool = False,
    process_group=None,
) -> list[Tensor]:
    """Row indices of each forward pass over ``inputs``.

    Args:
        inputs: the rows.
        model: the model that will run them (flash-attention models pack rows: no padding cost).
        count: without a budget, ``count`` consecutive row chunks (the update's gradient
            accumulation; 1 for the no-grad passes); with one, the fewest micro-batches.
        max_tokens: ``max_tokens_per_micro_batch``: length-grouped micro-batches of at most this many
            tokens, padding included (``micro_batches.token_budget_micro_batches``); None: row chunks.
        dedup_group_prompts: the prompts run before (``SharedPrompts``): a micro-batch costs its
            response tokens only.
        process_group: with a budget, the ranks that must run equally many passes (FSDP2).
    """
    if max_tokens is None:
        return list(torch.arange(inputs.num_rows).chunk(count))
    layout = "responses" if dedup_group_prompts else "packed" if packs_rows(model) else "padded"
    return token_budget_micro_batches(
        inputs.lengths(), max_tokens, layout=layout, min_count=count, process_group=process_group
    )


def _padded_logits(model: nn.Module, chunk: PolicyInputs, maye_position_ids: bool) -> tuple[Tensor, int]:
    """(n, t, V) logits scoring response columns 0 .. t-1 from one padded forward pass, and t."""
    trimmed = trim_padding(chunk)
    t = trimmed.response_ids.shape[1]
    # MAYE's trainer positions (switch): a 1-D count over the mask, given to every M-RoPE section.
    attention = trimmed.attention_mask
    position_ids = (attention.cumsum(-1) - 1) * attention if maye_position_ids else None  # (n, P+t); None: M-RoPE
    out = model(
        position_ids=position_ids,
        input_ids=trimmed.input_ids,
        attention_mask=attention,
        **trimmed.adapter.forward_kwargs(trimmed),
        use_cache=False,
        logits_to_keep=t + 1,  # the lm_head runs on the response positions only
    )
    return out.logits[:, :-1], t  # column P-1+j scores response token j


class ResponseScorer:
    """Log-probabilities of a set of rows' response tokens, one micro-batch at a time.

    Step III (no grad) scores all rows through ``response_logprobs``; Step IV builds one per
    minibatch, backpropagates each micro-batch's loss, then calls ``backward`` (the shared prompts'
    backward with ``dedup_group_prompts``; nothing otherwise)::

        scorer = ResponseScorer(policy, mb_inputs, count=gradient_accumulation_steps, ...)
        for rows in scorer.micro_batches:
            logprobs, entropy = scorer.logprobs(rows, return_entropy=True)
            loss(logprobs, ...).backward()
        scorer.backward()
    """

    def __init__(
        self,
        model: nn.Module,
        inputs: PolicyInputs,
        *,
        temperature: float,
        forward_batch_size: int | None = None,
        count: int = 1,
        max_tokens_per_micro_batch: int | None = None,
        dedup_group_prompts: bool = False,
        defer_prompt_backward: bool = True,
        process_group=None,
        banned_token_ids: Sequence[int] | None = None,
        logits_chunk_size: int | None = 256,
        maye_position_ids: bool = False,
    ) -> None:
        """Plans the micro-batches (``micro_batches``) and, with ``dedup_group_prompts``, runs the
        prompt passes (``SharedPrompts``). ``defer_prompt_backward`` False keeps the prompts in each
        micro-batch's graph instead (one backward over everything, as ``response_logprobs`` returns it).
        The other arguments are ``response_logprobs``'s."""
        if forward_batch_size is not None and forward_batch_size < 1:
            raise ValueError(
                f"response_logprobs: forward_batch_size={forward_batch_size} must be a positive int, "
                "or None for all rows in one forward pass."
            )
        self.model, self.inputs, self.temperature = model, inputs, temperature
        self.forward_batch_size, self.budget = forward_batch_size, max_tokens_per_micro_batch
        self.banned_token_ids, self.logits_chunk_size = banned_token_ids, logits_chunk_size
        self.maye_position_ids = maye_position_ids
        self.micro_batches = micro_batches(
            inputs, model, count=count, max_tokens=max_tokens_per_micro_batch,
            dedup_group_prompts=dedup_group_prompts, process_group=process_group,
        )
        self.prompts = None
        if dedup_group_prompts:
            self.prompts = SharedPrompts(
                model, inputs, max_tokens=max_tokens_per_micro_batch, banned_token_ids=banned_token_ids,
                maye_position_ids=maye_position_ids, defer_backward=defer_prompt_backward, process_group=process_group,
            )

    def _pieces(self, chunk: PolicyInputs, rows: Tensor) -> list[tuple[Tensor, tuple | Tensor]]:
        """Logits (a, b, V) and where in the (n, T) response columns the tokens they score sit."""
        if self.prompts is not None:
            first, rest, t = self.prompts.logits(chunk, rows)  # (n, 1, V), (n, t-1, V)
            return [(first, (slice(None), slice(0, 1))), (rest, (slice(None), slice(1, t)))]
        if packs_rows(self.model):
            logits, scored = packed_logits(self.model, chunk, maye_position_ids=self.maye_position_ids)
            where = torch.zeros_like(chunk.response_mask)
            where[:, : scored.shape[1]] = scored  # (n, T): the tokens, row by row
        else:
            logits, t = _padded_logits(self.model, chunk, self.maye_position_ids)  # (n, t, V)
            where = (slice(None), slice(0, t))
        if self.banned_token_ids:
            # The engine samples with these tokens banned: score the same distribution it sampled.
            # In place: the lm_head's backward does not need its output, and a copy would double it.
            logits.index_fill_(-1, torch.as_tensor(self.banned_token_ids, device=logits.device), float("-inf"))
        return [(logits, where)]

    def logprobs(self, rows: Tensor, *, return_entropy: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """(n, T) fp32 logprobs of the micro-batch ``rows`` (indices into the set), 0 on padding; with
        ``return_entropy`` also the (n, T) entropies (no gradient: logged, not optimised).

        Without a token budget the rows run ``forward_batch_size`` at a time (as before the budget
        existed); with one, in one pass (the plan already fits them into the budget)."""
        step = self.forward_batch_size if self.budget is None and self.forward_batch_size else max(len(rows), 1)
        parts = [self._pass(part, return_entropy) for part in rows.split(step)] or [self._pass(rows, return_entropy)]
        logprobs = torch.cat([lp for lp, _ in parts])  # (n, T)
        return (logprobs, torch.cat([ent for _, ent in parts])) if return_entropy else logprobs

    def _pass(self, rows: Tensor, return_entropy: bool) -> tuple[Tensor, Tensor | None]:
        """One forward pass: (n, T) logprobs and entropies (None unless asked), 0 on padding."""
        chunk = select_rows(self.inputs, rows)
        n, T = chunk.response_ids.shape
        logprobs = torch.zeros((n, T), dtype=torch.float32, device=chunk.input_ids.device)
        entropy = torch.zeros_like(logprobs) if return_entropy else None
        if not chunk.response_mask.any():
            return logprobs, entropy
        for logits, where in self._pieces(chunk, rows):
            if logits.shape[1] == 0:
                continue
            ids = chunk.response_ids[where].reshape(logits.shape[:2])  # (a, b)
            padding = ~chunk.response_mask[where].reshape(ids.shape)
            values = token_logprobs(logits, ids, self.temperature, self.logits_chunk_size).masked_fill(padding, 0.0)
            logprobs[where] = values.reshape(logprobs[where].shape)
            if entropy is not None:
                with torch.no_grad():  # a statistic to log: no autograd graph over (n, t, V) tensors
                    values = token_entropy(logits, self.temperature, self.logits_chunk_size).masked_fill(padding, 0.0)
                    entropy[where] = values.reshape(entropy[where].shape)
        return logprobs, entropy

    def backward(self) -> None:
        """After the last micro-batch's backward: the shared prompts' backward (``SharedPrompts.backward``)."""
        if self.prompts is not None:
            self.prompts.backward()


def response_logprobs(
    model: nn.Module,
    inputs: PolicyInputs,
    *,
    temperature: float,
    forward_batch_size: int | None = None,
    max_tokens_per_micro_batch: int | None = None,
    dedup_group_prompts: bool = False,
    process_group=None,
    return_entropy: bool = False,
    banned_token_ids: Sequence[int] | None = None,
    logits_chunk_size: int | None = 256,
    maye_position_ids: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Log-probabilities of the response tokens under ``softmax(logits / temperature)``.

    Runs the model on ``forward_batch_size`` rows at a time (None = all N at once), or on
    length-grouped micro-batches of at most ``max_tokens_per_micro_batch`` tokens; each pass drops
    its all-padding columns first. Differentiable when called with grad enabled (one backward over
    the result reaches every pass, the shared prompt passes included).

    Args:
        model: an HF vision-language causal LM (e.g. ``Qwen2_5_VLForConditionalGeneration``).
        inputs: from ``build_policy_inputs``, on the model's device.
        temperature: the sampling temperature the responses were drawn at.
        forward_batch_size: rows per forward pass, to bound activation memory.
        max_tokens_per_micro_batch: tokens per forward pass instead (rows grouped by length,
            padding counted; ``forward_batch_size`` is then unused); None: row chunks.
        dedup_group_prompts: run each distinct prompt (and its images) once for all its rows.
        process_group: the ranks that must run equally many passes (FSDP2).
        return_entropy: also return the entropy of the full tempered distribution per token
            (no gradient: it is logged, not optimised).
        banned_token_ids: tokens the sampler never emits (the vision special tokens): their
            logits are set to -inf, so the scores are those of the distribution that was sampled.
        logits_chunk_size: response positions per fp32 log-softmax chunk (``token_logprobs``):
            bounds the temporaries to rows * chunk * V fp32 values (None = all positions).
        maye_position_ids: MAYE's 1-D positions instead of the model's M-RoPE ones (image tokens
            then sit at consecutive positions, unlike in the engine); for reproducing MAYE only.

    Returns:
        (N, T) fp32 logprobs, 0 on padding; with ``return_entropy`` a tuple (logprobs, entropy),
        both (N, T).
    """
    scorer = ResponseScorer(
        model, inputs, temperature=temperature, forward_batch_size=forward_batch_size,
        max_tokens_per_micro_batch=max_tokens_per_micro_batch, dedup_group_prompts=dedup_group_prompts,
        defer_prompt_backward=False, process_group=process_group, banned_token_ids=banned_token_ids,
        logits_chunk_size=logits_chunk_size, maye_position_ids=maye_position_ids,
    )
    results = [scorer.logprobs(rows, return_entropy=return_entropy) for rows in scorer.micro_batches if len(rows)]
    if not results:
        logprobs = torch.zeros_like(inputs.response_ids, dtype=torch.float32)  # (0, T)
        return (logprobs, logprobs.clone()) if return_entropy else logprobs
    order = torch.cat(scorer.micro_batches).argsort().to(inputs.input_ids.device)  # micro-batch order → rows
    if not return_entropy:
        return torch.cat(results)[order]  # (N, T)
    return tuple(torch.cat(parts)[order] for parts in zip(*results))  # (N, T), (N, T)
