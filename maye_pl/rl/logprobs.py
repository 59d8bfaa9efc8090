"""Per-token log-probabilities and entropies from logits, in bounded memory.

Notation: N rows (N = B*G responses, or a micro-batch of them), T response tokens, V vocabulary.

A (N, T, V) logits tensor for a 7B model with a 150k vocabulary is tens of GiB in fp32, so these
functions never build a second full log-softmax tensor: they gather the token's logit and subtract
a logsumexp, optionally a chunk of T positions at a time (peak extra memory N * chunk * V floats).
"""

from __future__ import annotations

import torch
from torch import Tensor


_FLOOR = torch.finfo(torch.float32).min


def _check_chunk_size(chunk_size: int | None, T: int) -> int:
    """Resolve ``chunk_size`` (None = all of T at once) and reject non-positive values."""
    if chunk_size is None:
        return max(T, 1)
    if chunk_size < 1:
        raise ValueError(
            f"maye_pl/rl/logprobs.py: chunk_size={chunk_size} must be a positive int or None; "
            "pass None to process all T positions at once."
        )
    return chunk_size


def _check_temperature(temperature: float) -> None:
    if temperature <= 0:
        raise ValueError(
            f"maye_pl/rl/logprobs.py: temperature={temperature} must be > 0; score with the "
            "sampling temperature of the rollout (SamplingConfig.temperature)."
        )


class _TokenLogprobs(torch.autograd.Function):
    """``z_token / τ - logsumexp(z / τ)`` whose backward keeps only the logits and the (N, T)
    logsumexp, and rebuilds the softmax one chunk of positions at a time.

    Autograd through ``logsumexp`` would keep every chunk's fp32 copy of the logits for backward
    (N * T * V fp32 on top of the logits); here the extra memory is the logits' gradient, which
    the backward pass needs anyway, plus one chunk's fp32 temporaries.
    """

    @staticmethod
    def forward(ctx, logits: Tensor, token_ids: Tensor, temperature: float, step: int) -> Tensor:
        N, T, _ = logits.shape
        logprobs = torch.empty((N, T), dtype=torch.float32, device=logits.device)  # (N, T)
        lse = torch.empty_like(logprobs)  # (N, T)
        for start in range(0, T, step):
            span = slice(start, start + step)
            chunk = logits[:, span].float() / temperature  # (N, t, V)
            lse[:, span] = torch.logsumexp(chunk, dim=-1)
            logprobs[:, span] = chunk.gather(-1, token_ids[:, span].unsqueeze(-1)).squeeze(-1) - lse[:, span]
        ctx.save_for_backward(logits, token_ids, lse)
        ctx.temperature, ctx.step = temperature, step
        return logprobs

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_logprobs: Tensor) -> tuple[Tensor, None, None, None]:
        # d logp(y) / d z_v = (1[v = y] - p_v) / τ
        logits, token_ids, lse = ctx.saved_tensors
        grad_logits = torch.empty_like(logits)  # (N, T, V), the logits' dtype
        for start in range(0, logits.shape[1], ctx.step):
            span = slice(start, start + ctx.step)
            upstream = grad_logprobs[:, span].unsqueeze(-1).float()  # (N, t, 1)
            # One fp32 temporary per chunk: copy, then scale, shift and exponentiate in place.
            probs = logits[:, span].to(torch.float32, copy=True).div_(ctx.temperature)  # (N, t, V)
            probs.sub_(lse[:, span].unsqueeze(-1)).exp_()
            chunk_grad = probs.mul_(-upstream).scatter_add_(-1, token_ids[:, span].unsqueeze(-1), upstream)
            grad_logits[:, span] = chunk_grad.div_(ctx.temperature)
        return grad_logits, None, None, None


def token_logprobs(
    logits: Tensor, token_ids: Tensor, temperature: float = 1.0, chunk_size: int | None = None
) -> Tensor:
    """Log-probability of each given token under ``softmax(logits / temperature)``.

    Args:
        logits: (N, T, V) float of any dtype; position t scores ``token_ids[:, t]`` (the caller
            has already shifted logits by one against the input ids).
        token_ids: (N, T) long.
        temperature: the sampling temperature; the policy being optimised is the tempered one.
        chunk_size: process this many positions of T at a time (None = all at once). Each chunk
            is upcast to fp32 on its own, so the extra memory is a few N * chunk_size * V fp32
            temporaries, forward and backward; with grad, the backward pass also allocates the
            logits' gradient (N * T * V in the logits' dtype). Nothing of size N * T * V is kept
            between forward and backward beyond the logits themselves.

    Returns:
        (N, T) fp32 log p(token_ids[n, t]); differentiable w.r.t. ``logits`` (once).
    """
    if logits.dim() != 3 or token_ids.shape != logits.shape[:2]:
        raise ValueError(
            f"maye_pl/rl/logprobs.py token_logprobs: logits shape {tuple(logits.shape)} must be "
            f"(N, T, V) and token_ids shape {tuple(token_ids.shape)} must be its (N, T)."
        )
    _check_temperature(temperature)
    step = _check_chunk_size(chunk_size, logits.shape[1])
    return _TokenLogprobs.apply(logits, token_ids, temperature, step)  # (N, T)


def token_entropy(
    logits: Tensor, temperature: float = 1.0, chunk_size: int | None = None
) -> Tensor:
    """True entropy ``H = -sum_v p_v log p_v`` of the full tempered distribution at each position.

    MAYE logs ``-p log p`` of the sampled token only and calls it entropy; that is one term of the
    sum and depends on which token was sampled. This is the entropy of the whole distribution.

    Args:
        logits: (N, T, V) float of any dtype.
        temperature: softmax temperature.
        chunk_size: positions of T per chunk (None = all at once); peak extra memory is three
            N * chunk_size * V fp32 tensors.

    Returns:
        (N, T) fp32 entropy in nats.
    """
    if logits.dim() != 3:
        raise ValueError(
            f"maye_pl/rl/logprobs.py token_entropy: logits shape {tuple(logits.shape)} must be "
            "(N, T, V)."
        )
    _check_temperature(temperature)
    step = _check_chunk_size(chunk_size, logits.shape[1])
    out = []
    for start in range(0, logits.shape[1], step):
        # A finite floor keeps masked (-inf) logits from turning p * log p into 0 * -inf = nan.
        chunk = logits[:, start : start + step].float() / temperature  # (N, t, V)
        chunk = chunk.clamp(min=_FLOOR)
        # log p directly (not lse - sum p*z, which cancels when the entropy is near 0).
        log_p = chunk - torch.logsumexp(chunk, dim=-1, keepdim=True)  # (N, t, V)
        out.append(-(log_p.exp() * log_p).sum(-1))  # (N, t)
    if not out:
        return logits.new_zeros(logits.shape[:2], dtype=torch.float32)
    return torch.cat(out, dim=1)  # (N, T)
