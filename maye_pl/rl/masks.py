"""Response masks, lengths and the length penalty.

Notation: N rows (N = B*G responses), T response tokens (padded to the longest response).

A response is valid up to and including its first stop token; everything after it is padding.
Boolean masks mean True = keep (a valid response token).
"""

from __future__ import annotations

import torch
from torch import Tensor


def _as_stop_tensor(stop_token_ids: Tensor | list[int], like: Tensor) -> Tensor:
    return torch.as_tensor(stop_token_ids, dtype=like.dtype, device=like.device)


def truncate_at_stop(
    response_ids: Tensor, stop_token_ids: Tensor | list[int], pad_token_id: int
) -> tuple[Tensor, Tensor]:
    """Cut every response after its first stop token.

    Args:
        response_ids: (N, T) long sampled token ids, right-padded. The padding must not be a stop
            id: MAYE pads with the EOS id, which would make a response that ran out of tokens look
            stopped; pad with an id outside ``stop_token_ids`` (or build the mask from lengths).
        stop_token_ids: the ids that end a response (EOS, ``<|im_end|>``, ...).
        pad_token_id: the id written after the first stop token.

    Returns:
        ``(ids, response_mask)``: ids (N, T) with every position after the first stop token set to
        ``pad_token_id`` (a new tensor; the input is not modified), and response_mask (N, T) bool,
        True on valid tokens, the first stop token included.
    """
    is_stop = torch.isin(response_ids, _as_stop_tensor(stop_token_ids, response_ids))  # (N, T)
    # Number of stop tokens strictly before t; a token is valid while none has appeared yet.
    stops_before = torch.cumsum(is_stop, dim=1) - is_stop.long()  # (N, T)
    response_mask = stops_before == 0  # (N, T)
    ids = response_ids.masked_fill(~response_mask, pad_token_id)  # (N, T)
    return ids, response_mask


def response_lengths(response_mask: Tensor) -> Tensor:
    """Number of valid tokens per row, the stop token included: (N, T) bool -> (N,) long."""
    return response_mask.sum(dim=-1, dtype=torch.long)


def needs_length_penalty(
    response_ids: Tensor,
    response_mask: Tensor,
    stop_token_ids: Tensor | list[int],
    min_response_length: int | None,
) -> Tensor:
    """Which responses get the length penalty: no stop token, or too short.

    Length here counts the tokens BEFORE the stop token (the stop token is not counted). That is
    exactly MAYE's rule: MAYE compares ``seq_lens >= min_response_length`` where ``seq_lens`` is
    the 0-indexed position of the last valid token (torchtune's
    ``get_unmasked_sequence_lengths``), i.e. the valid-token count minus one, and for a response
    that stopped the last valid token is the stop token. Responses without a stop token are
    penalised whatever their length, so their length convention does not matter.

    Args:
        response_ids: (N, T) long, as returned by ``truncate_at_stop``.
        response_mask: (N, T) bool, True on valid tokens (first stop token included).
        stop_token_ids: the ids that end a response.
        min_response_length: minimum number of tokens before the stop token; None = no minimum.

    Returns:
        (N,) bool, True where the score must be replaced by the penalty.
    """
    is_stop = torch.isin(response_ids, _as_stop_tensor(stop_token_ids, response_ids))  # (N, T)
    has_stop = (is_stop & response_mask).any(dim=-1)  # (N,)
    penalize = ~has_stop
    if min_response_length is not None:
        content_lengths = response_lengths(response_mask) - has_stop.long()  # (N,)
        penalize = penalize | (content_lengths < min_response_length)
    return penalize


def apply_penalty(scores: Tensor, penalize: Tensor, reward_penalty: float) -> Tensor:
    """Replace (not add to) the score of penalised responses, as MAYE does.

    MAYE, ``recipes/full_ppo_vllm_distributed.py`` (``generate_trajectory_vllm``):
    ``scores[reward_penalty_mask] = self.reward_penalty``.

    Args:
        scores: (N,) float sequence scores.
        penalize: (N,) bool from ``needs_length_penalty``.
        reward_penalty: the score a penalised response gets (MAYE's ``reward_penalty``).

    Returns:
        (N,) new tensor; the input is not modified.
    """
    penalty = torch.as_tensor(reward_penalty, dtype=scores.dtype, device=scores.device)
    return torch.where(penalize, penalty, scores)
