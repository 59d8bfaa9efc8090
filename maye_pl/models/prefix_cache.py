"""A shared prompt's attention state, computed once and read by each of its G responses.

``dedup_group_prompts`` runs a group's prompt (and its images) in one forward pass that records
what every decoder layer needs to continue the sequence, then runs the G responses in a second
pass that reads that state, expanded to G rows:

- full-attention layers: the prompt's keys and values (after RoPE), (B, kv_heads, P, head_dim);
- Gated DeltaNet layers (Qwen3.5's linear attention): the last ``kernel`` inputs of the causal
  convolution, (B, conv_dim, kernel), and the recurrent state, (B, v_heads, k_dim, v_dim).

It is a transformers ``Cache`` (the decoder layers call ``update`` / ``update_conv_state`` /
``update_recurrent_state`` on it), with one difference that makes it safe to differentiate through
and to recompute: no call appends. Recording overwrites, and the response pass gets
``cat(prefix, new)`` without storing it. A checkpointed layer replayed in the backward pass (HF
gradient checkpointing or FSDP2's activation checkpointing) therefore sees exactly what its first
run saw, and the recorded tensors keep their autograd history, so the responses' gradients flow
into the prompt's forward pass once, summed over the G rows by ``index_select``'s backward.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers.cache_utils import Cache, CacheLayerMixin, LinearAttentionCacheLayerMixin

SUPPORTED_LAYER_TYPES = ("full_attention", "linear_attention")


class _PrefixAttentionLayer(CacheLayerMixin):
    """One full-attention layer: records (B, H_kv, P, D) keys/values, then serves them as a prefix."""

    is_sliding = False

    def __init__(self, keys: Tensor | None = None, values: Tensor | None = None) -> None:
        super().__init__()
        self.keys, self.values = keys, values
        self.is_initialized = keys is not None
        self.extends = keys is not None  # False: the prompt pass records; True: responses read

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        """Nothing to allocate: recording keeps the tensors the layer computed."""

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        if self.extends:
            return torch.cat([self.keys, key_states], -2), torch.cat([self.values, value_states], -2)
        self.keys, self.values, self.is_initialized = key_states, value_states, True
        return key_states, value_states

    def get_seq_length(self) -> int:
        return self.keys.shape[-2] if self.extends else 0

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return -1

    @property
    def tensors(self) -> tuple[Tensor, Tensor]:
        return self.keys, self.values

    @staticmethod
    def padded(tensors: tuple[Tensor, ...], prompt_length: int) -> tuple[Tensor, ...]:
        """Left-pad (B, H, P, D) keys/values with zeros to ``prompt_length`` (masked, like prompt padding)."""
        return tuple(F.pad(x, (0, 0, prompt_length - x.shape[-2], 0)) for x in tensors)


class _PrefixLinearLayer(LinearAttentionCacheLayerMixin):
    """One Gated DeltaNet layer: records the conv window and recurrent state, then serves them."""

    def __init__(self, conv: Tensor | None = None, recurrent: Tensor | None = None) -> None:
        super().__init__(number_of_states=1)
        # True keeps the layer off its single-token path, which updates the conv state in place.
        self.record_past = True
        self.conv_states[0], self.recurrent_states[0] = conv, recurrent
        self.has_previous_state[0] = conv is not None

    def lazy_initialization(self, conv_states=None, recurrent_states=None, state_idx: int = 0) -> None:
        """Nothing to allocate: recording keeps the tensors the layer computed."""

    def update_conv_state(self, conv_states: Tensor, state_idx: int = 0, conv_kernel_size: int | None = None,
                          **kwargs) -> Tensor:
        """(B, C, L) conv inputs → what the causal conv runs over: the prompt's window, then these."""
        if self.has_previous_state[state_idx]:
            return torch.cat([self.conv_states[state_idx], conv_states], -1)  # (B, C, kernel + L)
        kernel = conv_kernel_size or conv_states.shape[-1]
        self.conv_states[state_idx] = F.pad(conv_states, (max(kernel - conv_states.shape[-1], 0), 0))[..., -kernel:]
        return conv_states

    def update_recurrent_state(self, recurrent_states: Tensor, state_idx: int = 0, **kwargs) -> Tensor:
        if not self.has_previous_state[state_idx]:
            self.recurrent_states[state_idx] = recurrent_states
        return recurrent_states

    @property
    def tensors(self) -> tuple[Tensor, Tensor]:
        return self.conv_states[0], self.recurrent_states[0]

    @staticmethod
    def padded(tensors: tuple[Tensor, ...], prompt_length: int) -> tuple[Tensor, ...]:
        """No sequence dimension: the state after a left-padded prompt is the prompt's own."""
        return tensors


class PrefixCache(Cache):
    """Record a prompt pass (``recorder``), then continue it for response rows (``expanded``)."""

    def __init__(self, layers: list[CacheLayerMixin | LinearAttentionCacheLayerMixin]) -> None:
        super().__init__(layers=layers)

    @classmethod
    def recorder(cls, config) -> PrefixCache:
        """An empty recorder for a model's text config (its ``layer_types``; all full attention if absent).

        Raises:
            ValueError: a layer type this cache cannot continue (e.g. sliding-window attention).
        """
        text_config = getattr(config, "text_config", config)
        layer_types = getattr(text_config, "layer_types", None) or ["full_attention"] * text_config.num_hidden_layers
        if unsupported := sorted(set(layer_types) - set(SUPPORTED_LAYER_TYPES)):
            raise ValueError(
                f"`model.dedup_group_prompts`: layer types {unsupported} of {type(config).__name__} cannot share a "
                f"prompt pass (supported: {', '.join(SUPPORTED_LAYER_TYPES)}); set `model.dedup_group_prompts` false."
            )
        return cls([_PrefixLinearLayer() if kind == "linear_attention" else _PrefixAttentionLayer() for kind in layer_types])

    def tensors(self) -> list[tuple[Tensor, Tensor]]:
        """What each layer recorded: (keys, values) or (conv window, recurrent state), prompts first."""
        if any(t is None for layer in self.layers for t in layer.tensors):
            raise RuntimeError(
                "PrefixCache: a layer recorded nothing. Run the prompt pass with this cache as `past_key_values` "
                "(under HF gradient checkpointing, inside `keep_cache_under_checkpointing`)."
            )
        return [layer.tensors for layer in self.layers]

    def with_tensors(self, tensors: list[tuple[Tensor, Tensor]]) -> PrefixCache:
        """A cache of the same layer kinds serving ``tensors`` (e.g. leaves that collect gradients)."""
        return PrefixCache([type(layer)(*state) for layer, state in zip(self.layers, tensors)])

    @staticmethod
    def concatenated(caches: list[PrefixCache], prompt_length: int) -> list[tuple[Tensor, Tensor]]:
        """The recorded tensors of several prompt passes as one batch: prompts left-padded to ``prompt_length``."""
        per_cache = [cache.tensors() for cache in caches]
        return [
            tuple(torch.cat(parts) for parts in zip(*(type(layer).padded(states[i], prompt_length) for states in per_cache)))
            for i, layer in enumerate(caches[0].layers)
        ]

    def expanded(self, rows: Tensor) -> PrefixCache:
        """The prefix of prompt ``rows[i]`` for response row i: (R,) prompt indices → a cache of R rows."""
        return self.with_tensors([tuple(t.index_select(0, rows) for t in state) for state in self.tensors()])


@contextlib.contextmanager
def keep_cache_under_checkpointing(model: nn.Module) -> Iterator[None]:
    """Let HF-checkpointed decoder layers receive a ``PrefixCache``.

    transformers drops ``past_key_values`` in a layer that recomputes its activations (a growing
    cache would be appended to twice), unless the layer declares ``_can_checkpoint_with_cache``.
    ``PrefixCache`` never appends, so the declaration holds for the duration of a pass. The replay
    in the backward pass reuses the arguments of the first call, so the flag is not needed then.
    """
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer) and m.gradient_checkpointing]
    for layer in layers:
        layer._can_checkpoint_with_cache = True
    try:
        yield
    finally:
        for layer in layers:
            del layer._can_checkpoint_with_cache  # back to the class's False
