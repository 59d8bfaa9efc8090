"""Reinforce++ math as pure tensor functions: logprobs, masks, KL, advantages, loss.

No Lightning here; torch.distributed is used only through an optional ``group`` argument where a
statistic must span the global batch.
"""

from maye_pl.rl.logprobs import token_entropy, token_logprobs

__all__ = ["token_entropy", "token_logprobs"]
