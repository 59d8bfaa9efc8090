"""One prompt pass per group: a group's image and prompt run once, its G responses read the result.

Notation: N rows in the set (the no-grad pass's batch, or the update's minibatch), u distinct
prompts among them, n rows in one response micro-batch, P prompt columns (left-padded), t response
columns, V vocabulary.

    A  prompt passes     u rows: [pad | prompt (image tokens expanded)] → a ``PrefixCache`` and the
                         logits of each prompt's last token (they score response token 0); the
                         vision tower runs on u images, not N
    B  response passes   per micro-batch, n rows: response tokens 0 .. t-2 attending to their prompt's
                         cached state (expanded to n rows), at the positions the full row would have
                         had (the prompt's last M-RoPE position + 1, + 2 ...); logits score tokens 1 .. t-1
    C  prompt backward   (with gradients) once, after every micro-batch's backward: the prompts'
                         recorded tensors were handed to the response passes as leaves, which summed
                         their gradients over all rows of the prompt

The padded path runs N rows of P + t columns through every layer and the vision tower N times;
this runs u*P + N*(t-1) tokens (plus padding) and u images, and gives the same log-probs (fp32:
within 1e-5). The prompt passes' activations stay alive until C (u prompts' worth, beside one
response micro-batch).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch
from torch import Tensor, nn

from maye_pl.models.micro_batches import Lengths, token_budget_micro_batches
from maye_pl.models.policy_inputs import PolicyInputs, select_rows
from maye_pl.models.prefix_cache import PrefixCache, keep_cache_under_checkpointing


def prompt_slots(prompt_index: Tensor) -> tuple[Tensor, Tensor]:
    """Rows → distinct prompts: (u,) the first row of each prompt, (N,) each row's prompt in 0..u-1."""
    unique, slot = torch.unique(prompt_index, return_inverse=True)  # (u,), (N,)
    rows = torch.arange(len(prompt_index), device=prompt_index.device)
    first = torch.full_like(unique, len(prompt_index)).scatter_reduce(0, slot, rows, "amin")  # (u,)
    return first, slot


def _prompt_only(prompts: PolicyInputs) -> PolicyInputs:
    """The prompt columns of ``prompts``, without columns that are padding in every row."""
    P = prompts.prompt_length
    used = prompts.attention_mask[:, :P].any(0).nonzero()
    columns = slice(int(used[0]) if len(used) else P - 1, P)
    return replace(
        prompts, input_ids=prompts.input_ids[:, columns], attention_mask=prompts.attention_mask[:, columns],
        mm_token_type_ids=prompts.mm_token_type_ids[:, columns], prompt_length=columns.stop - columns.start,
        response_ids=prompts.response_ids[:, :0], response_mask=prompts.response_mask[:, :0],
    )


def _prompt_passes(prompts: PolicyInputs, max_tokens: int | None, process_group) -> list[Tensor]:
    """Which prompts run together: all at once (no budget), or length-grouped within the budget,
    as many passes as the busiest rank runs (an empty pass where this rank has too few prompts)."""
    u = prompts.num_rows
    if max_tokens is None:
        return [torch.arange(u)]
    lengths = Lengths(prompts.attention_mask.sum(1).cpu(), torch.zeros(u, dtype=torch.long), torch.arange(u))
    return token_budget_micro_batches(lengths, max_tokens, process_group=process_group, ghosts=True)


class SharedPrompts:
    """The distinct prompts of a set of rows: run once (A), read by response passes (B), backpropagated once (C)."""

    def __init__(
        self,
        model: nn.Module,
        inputs: PolicyInputs,
        *,
        max_tokens: int | None = None,
        banned_token_ids: Sequence[int] | None = None,
        maye_position_ids: bool = False,
        defer_backward: bool = True,
        process_group=None,
    ) -> None:
        """Step A: the prompt passes (at most ``max_tokens`` tokens each; all prompts in one pass if None).

        Args:
            model: the policy or the reference; with grad enabled, A-C are differentiable.
            inputs: the set's rows; rows with equal ``prompt_index`` share a prompt.
            max_tokens: ``max_tokens_per_micro_batch`` for the prompt passes.
            banned_token_ids: logits set to -inf (the tokens the engine never samples).
            maye_position_ids: MAYE's 1-D positions instead of M-RoPE (as ``response_logprobs``).
            defer_backward: hand B leaves and backpropagate the prompts in C (the update's
                micro-batches); False: B's logits stay in one graph with A (one backward over all).
            process_group: the ranks that must run equally many passes (FSDP2).
        """
        self.model, self.maye_position_ids = model, maye_position_ids
        self.banned = torch.as_tensor(banned_token_ids or [], dtype=torch.long, device=inputs.input_ids.device)
        first_rows, slot = prompt_slots(inputs.prompt_index)  # (u,), (N,)
        prompts = _prompt_only(select_rows(inputs, first_rows))  # u rows of P columns
        passes = _prompt_passes(prompts, max_tokens, process_group)
        runs = [self._prompt_pass(_prompt_only(select_rows(prompts, rows if len(rows) else [0]))) for rows in passes]
        # An empty pass (FSDP2: another rank needs more passes) repeats prompt 0 and adds 0 times its
        # logits to the real ones, so that every rank's backward also runs through it.
        ghosts = sum(first.sum() for rows, (_, first, _, _) in zip(passes, runs) if not len(rows))
        runs = [run for rows, run in zip(passes, runs) if len(rows)]
        order = torch.cat([rows for rows in passes if len(rows)]).argsort()  # prompt → its place in the passes
        self.slot = order.to(slot.device)[slot]  # (N,) each row's prompt, in pass order
        P = max(mask.shape[1] for _, _, _, mask in runs)
        recorded = PrefixCache.concatenated([cache for cache, _, _, _ in runs], P)
        first = torch.cat([first for _, first, _, _ in runs]) + 0.0 * ghosts  # (u, 1, V)
        if len(self.banned):
            first = first.index_fill(-1, self.banned, float("-inf"))
        self.start = torch.cat([start for _, _, start, _ in runs])  # (u,) each prompt's last position
        self.mask = torch.cat([torch.nn.functional.pad(mask, (P - mask.shape[1], 0)) for _, _, _, mask in runs])  # (u, P)
        # Hand B leaves, so that C can push their summed gradients through the prompt passes once.
        tensors = [first, *(t for state in recorded for t in state)]
        self._graph = [(t, t.detach().requires_grad_()) for t in tensors if t.requires_grad and defer_backward]
        leaves = {id(t): leaf for t, leaf in self._graph}
        self.first = leaves.get(id(first), first)
        self.prefix = runs[0][0].with_tensors([tuple(leaves.get(id(t), t) for t in state) for state in recorded])

    def _prompt_pass(self, prompts: PolicyInputs) -> tuple[PrefixCache, Tensor, Tensor, Tensor]:
        """One forward pass over prompts: (recorded cache, (u, 1, V) last-token logits, (u,) last positions, (u, P) mask)."""
        mask = prompts.attention_mask  # (u, P)
        if self.maye_position_ids:
            positions = (mask.cumsum(-1) - 1) * mask  # (u, P): MAYE's 1-D count
        else:
            positions = prompts.adapter.rope_positions(
                self.model, prompts.input_ids, mask, prompts.mm_token_type_ids, prompts.image_grid_thw
            )  # (3, u, P)
        recorder = PrefixCache.recorder(self.model.config)
        with keep_cache_under_checkpointing(self.model):
            first = self.model(
                input_ids=prompts.input_ids, attention_mask=mask, position_ids=positions,
                **prompts.adapter.forward_kwargs(prompts), past_key_values=recorder, use_cache=False, logits_to_keep=1,
            ).logits  # (u, 1, V)
        start = positions[..., -1].amax(0) if positions.dim() == 3 else positions[:, -1]  # (u,)
        return recorder, first, start, mask

    def logits(self, chunk: PolicyInputs, rows: Tensor) -> tuple[Tensor, Tensor, int]:
        """Step B for one micro-batch: the logits that score its rows' response tokens.

        Args:
            chunk: the micro-batch (``select_rows(inputs, rows)``).
            rows: (n,) its rows' indices in the set.

        Returns:
            first (n, 1, V): scores response token 0; rest (n, t-1, V): tokens 1 .. t-1; t.
        """
        used = chunk.response_mask.any(0).nonzero()
        t = int(used[-1]) + 1 if len(used) else 0
        slot = self.slot[rows.to(self.slot.device)]  # (n,)
        # Tokens 0 .. t-2 continue their prompt; at least one column, so that every micro-batch
        # runs the same passes (FSDP2 ranks must issue the same collectives).
        t_in = max(t - 1, 1)
        attention = torch.cat([self.mask[slot], chunk.response_mask[:, :t_in].long()], 1)  # (n, P + t_in)
        positions = self.start[slot, None] + torch.arange(1, t_in + 1, device=attention.device)  # (n, t_in)
        if not self.maye_position_ids:
            positions = positions.expand(3, -1, -1)  # (3, n, t_in): text: equal in each M-RoPE section
        with keep_cache_under_checkpointing(self.model):
            rest = self.model(
                input_ids=chunk.response_ids[:, :t_in], attention_mask=attention, position_ids=positions,
                past_key_values=self.prefix.expanded(slot), use_cache=False, logits_to_keep=0,
            ).logits[:, : t - 1]  # (n, t-1, V)
        if len(self.banned):
            # In place: the lm_head's backward does not need its output, and a copy would double it.
            rest.index_fill_(-1, self.banned, float("-inf"))
        return self.first[slot], rest, t

    def backward(self) -> None:
        """Step C: the prompt passes' backward, once, with the gradients B's backward passes left on
        the leaves (no-op without gradients). Call it after the last micro-batch's backward."""
        if not self._graph:
            return
        grads = [leaf.grad if leaf.grad is not None else torch.zeros_like(leaf) for _, leaf in self._graph]
        torch.autograd.backward([t for t, _ in self._graph], grads)
        self._graph = []
