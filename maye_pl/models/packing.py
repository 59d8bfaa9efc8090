"""Rows packed into one sequence without padding, for flash-attention's variable-length kernels.

Notation: n rows, L_i = p_i + t_i real tokens of row i, S = sum L_i, V vocabulary.

    padded   (n, max p + max t): every layer computes on the padding too
    packed   (1, S):             [row 0 prompt+response | row 1 prompt+response | ...]

Attention must not cross rows: flash-attention's varlen kernels take the row boundaries as
``cu_seq_lens`` (0, L_0, L_0 + L_1, ..., S); transformers reads them from the kwargs, or infers them
from the text positions restarting at 0. Qwen-VL models take positions as (4, 1, S): the text
positions (restarting per row) that mark the boundaries, then the (time, height, width) M-RoPE
positions each row has on its own (``ModelAdapter.rope_positions``). The lm_head runs only on the
positions that score a response token.

On a CPU (sdpa) transformers turns the same restarting positions into a block-diagonal mask, so
this path is checked here too; it is only faster where attention is varlen (flash-attention on a
GPU). Gated DeltaNet layers (Qwen3.5) would carry their recurrent state across rows without the
fla kernels' cu_seqlens, so such models are not packed.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from maye_pl.models.policy_inputs import PolicyInputs, trim_padding


def packs_rows(model: nn.Module) -> bool:
    """Whether ``model`` runs packed rows: a flash-attention backend and no linear-attention layer."""
    config = model.config
    text_config = getattr(config, "text_config", config)
    linear = "linear_attention" in (getattr(text_config, "layer_types", None) or ())
    return str(config._attn_implementation).startswith("flash_attention") and not linear


def packed_logits(model: nn.Module, chunk: PolicyInputs, *, maye_position_ids: bool) -> tuple[Tensor, Tensor]:
    """The logits that score every response token of ``chunk``, from one packed forward pass.

    Returns:
        logits (1, sum t_i, V): row 0's response tokens in order, then row 1's, ...;
        scored (n, t) bool: where those tokens sit in the (right-padded) response columns
        (``chunk.response_mask`` without its all-padding columns).
    """
    rows = trim_padding(chunk)
    mask = rows.attention_mask.bool()  # (n, L)
    P = rows.prompt_length
    count = mask.long().cumsum(-1) - 1  # (n, L): each row's own text positions 0 .. L_i - 1
    if maye_position_ids:
        positions = count.expand(3, -1, -1)  # (3, n, L): MAYE's 1-D count in every section
    else:
        positions = rows.adapter.rope_positions(model, rows.input_ids, mask, rows.mm_token_type_ids, rows.image_grid_thw)
    position_ids = torch.cat([count[mask][None], positions[:, mask]])[:, None]  # (4, 1, S)
    # The logit at column c scores the token at c + 1: keep those whose next token is a response token.
    scores_next = torch.zeros_like(mask)  # (n, L)
    scores_next[:, P - 1 : mask.shape[1] - 1] = rows.response_mask
    keep = scores_next[mask].nonzero().flatten()  # (sum t_i,) into the packed sequence
    lengths = mask.sum(1)  # (n,) L_i
    boundaries = torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)  # (n + 1,) cu_seq_lens
    varlen = {}
    if packs_rows(model):  # flash-attention: give it the boundaries instead of inferring them per layer
        longest = int(lengths.max())
        varlen = dict(cu_seq_lens_q=boundaries, cu_seq_lens_k=boundaries, max_length_q=longest, max_length_k=longest)
    packed = rows.adapter.forward_kwargs(rows)
    packed["mm_token_type_ids"] = rows.mm_token_type_ids[mask][None]  # (1, S)
    logits = model(
        input_ids=rows.input_ids[mask][None], attention_mask=None, position_ids=position_ids, **packed,
        **varlen, use_cache=False, logits_to_keep=keep,
    ).logits  # (1, sum t_i, V)
    return logits, rows.response_mask
