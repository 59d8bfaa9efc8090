"""LoRA adapters on the policy (``peft``): which layers get them, the reference as the policy with
its adapters switched off, and the merged weights the engine samples from.

    model.lora: {r: 16, alpha: 32}          adapters on every linear layer of the LLM's decoder layers
    model.lora: {r: 16, parts: [llm, vit]}  ... and of the ViT's blocks (``model.train_vit`` true)

A LoRA layer computes y = W x + s · B (A x) with s = alpha / r, W (out, in) frozen, A (r, in) and
B (out, r) trained (B starts at 0: the first policy is the base model). The engine never sees the
adapters: each weight sync sends W' = W + s · B @ A under the base weight's HF name
(``merge_weight``; ``strategies.weight_sync`` gathers W, A and B once per sync, also from FSDP2
shards), so vLLM runs a plain model, exactly the trained policy, with no LoRA kernels. The KL
reference is the same model with the adapters switched off (``adapters_disabled``): no second
copy. ``maye_pl export`` merges the adapters into a plain ``save_pretrained`` directory
(``merge_adapters``).

Parameter names: peft moves the wrapped layer's parameters under ``<layer>.base_layer.`` and adds
``<layer>.lora_A.default.weight`` / ``<layer>.lora_B.default.weight``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from maye_pl.models.adapters import adapter_for

ADAPTER = "default"
"""peft's name of the one adapter."""
LORA_PARTS = ("llm", "vit")
"""The model parts adapters can go on (``ModelAdapter.parts``); the connector trains fully or not."""


@dataclass(frozen=True)
class LoraArgs:
    """LoRA adapters instead of full fine-tuning for the parts in ``parts`` (``maye_pl.models.lora``)."""

    r: int = 0
    """Rank of each adapter; 0 = no adapters (the trained parts train fully)."""
    alpha: float = 32.0
    """Scale numerator: the adapter's output is multiplied by alpha / r."""
    dropout: float = 0.0
    """Dropout on each adapter's input during the update (never in the no-grad scoring passes)."""
    target_modules: tuple[str, ...] | None = None
    """Leaf names of the linear layers that get adapters, e.g. ``[q_proj, v_proj]``; None = every
    linear layer of the parts' transformer blocks (attention and MLP; never ``lm_head``)."""
    parts: tuple[str, ...] = ("llm",)
    """Parts trained through adapters: "llm" (the decoder layers) and/or "vit" (the vision blocks).
    Each must be trained (``model.train_llm`` / ``model.train_vit``); other trained parts train fully."""

    @property
    def enabled(self) -> bool:
        return self.r > 0

    @property
    def scaling(self) -> float:
        """s = alpha / r, the factor of B @ A (peft's ``scaling`` without rsLoRA)."""
        return self.alpha / self.r

    def problems(self, key: str = "model.lora", trained: Mapping[str, bool] | None = None) -> list[str]:
        """Every problem of these settings, each naming ``<key>.<field>``; ``trained``: which parts
        train (``{"llm": model.train_llm, "vit": model.train_vit}``)."""
        problems = []
        if self.r < 0:
            problems.append(f"`{key}.r`={self.r} must be >= 0 (0: no adapters).")
        if not self.enabled:
            return problems
        if self.alpha <= 0:
            problems.append(f"`{key}.alpha`={self.alpha} must be > 0 (the adapters' scale is alpha / r).")
        if not 0 <= self.dropout < 1:
            problems.append(f"`{key}.dropout`={self.dropout} must lie in [0, 1).")
        unknown = [part for part in self.parts if part not in LORA_PARTS]
        if unknown or not self.parts:
            problems.append(f"`{key}.parts`={list(self.parts)} must be a non-empty subset of {list(LORA_PARTS)}.")
        for part in set(self.parts) & set(LORA_PARTS):
            if trained is not None and not trained[part]:
                problems.append(
                    f"`{key}.parts` includes {part!r} but `model.train_{part}` is false; set it true or drop {part!r}."
                )
        if self.target_modules is not None and not self.target_modules:
            problems.append(f"`{key}.target_modules`=[] selects no layer; list leaf names (e.g. [q_proj, v_proj]) or null.")
        return problems


def lora_targets(model: nn.Module, args: LoraArgs) -> list[str]:
    """Qualified names of the linear layers that get adapters: in the transformer blocks
    (``ModelAdapter.shard_units``) of ``args.parts``, with a leaf name in ``args.target_modules``."""
    adapter = adapter_for(model)
    found: dict[str, list[str]] = {part: [] for part in args.parts}
    leaves: dict[str, set[str]] = {part: set() for part in args.parts}
    for block_name, block in adapter.shard_units(model):
        part = adapter.part_of(f"{block_name}.")
        if part not in found:
            continue
        for name, module in block.named_modules():
            if isinstance(module, nn.Linear):
                leaf = name.rpartition(".")[2]
                leaves[part].add(leaf)
                if args.target_modules is None or leaf in args.target_modules:
                    found[part].append(f"{block_name}.{name}")
    empty = [part for part, names in found.items() if not names]
    if empty:
        raise ValueError(
            f"`model.lora.target_modules`={args.target_modules} matches no linear layer of {empty}; "
            f"their layers are named {sorted(set().union(*(leaves[part] for part in empty)))}."
        )
    return [name for names in found.values() for name in names]


def apply_lora(model: nn.Module, args: LoraArgs) -> list[str]:
    """Put adapters on ``model`` in place (also on the meta device) and train them instead of the
    layers they wrap; returns the wrapped layers' names.

    Parameters that trained before (``freeze_modules``) and lie outside ``args.parts`` keep
    training (e.g. the connector with ``model.train_connector``); everything in ``args.parts``
    freezes except the adapters. A is drawn from ``torch.initial_seed()`` (``seed_everything``'s
    seed), so every process and every build draws the same adapters; B starts at 0.
    """
    from peft import LoraConfig, inject_adapter_in_model

    adapter = adapter_for(model)
    trained_fully = {
        id(param) for name, param in model.named_parameters()
        if param.requires_grad and adapter.part_of(name) not in args.parts
    }
    targets = lora_targets(model, args)
    config = LoraConfig(r=args.r, lora_alpha=args.alpha, lora_dropout=args.dropout, target_modules=targets, bias="none")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(torch.initial_seed())
        inject_adapter_in_model(config, model, adapter_name=ADAPTER)  # trains only the adapters
    for param in model.parameters():
        if id(param) in trained_fully:
            param.requires_grad_(True)
    return targets


def reapply_lora(source: nn.Module, model: nn.Module) -> None:
    """Put ``source``'s adapters (its peft config, same layers) on ``model``, an unadapted build of
    the same checkpoint: rank 0's full copy when ``load_pretrained_weights`` fills a sharded model."""
    from peft import inject_adapter_in_model

    config = source.peft_config[ADAPTER]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(torch.initial_seed())
        inject_adapter_in_model(config, model, adapter_name=ADAPTER)


def has_lora(model: nn.Module) -> bool:
    """Whether ``model`` carries peft adapters."""
    return bool(getattr(model, "peft_config", None))


def lora_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(qualified name, layer) of every peft LoRA layer of ``model``, in module order."""
    from peft.tuners.lora import LoraLayer

    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            yield name, module


@contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` computing as its base (every adapter off), e.g. for the KL reference's log-probs.

    peft's own switch (``enable_adapters``); switching back restores the adapters'
    ``requires_grad``, so call it outside the update's autograd graph (the reference pass is no-grad).
    """
    layers = [layer for _, layer in lora_layers(model)]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield model
    finally:
        for layer in layers:
            layer.enable_adapters(True)


def merge_weight(base: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float) -> torch.Tensor:
    """W' = W + s · B @ A: (out, in) from W (out, in), A (r, in), B (out, r); a new tensor (W may
    be the live parameter)."""
    return torch.addmm(base, lora_b, lora_a, alpha=scaling)  # (out, in)


def merge_adapters(state: Mapping[str, torch.Tensor], scaling: float) -> dict[str, torch.Tensor]:
    """A full state dict in HF names with peft's adapter keys (``<layer>.lora_A.default.weight``,
    ``<layer>.lora_B.default.weight`` beside ``<layer>.weight``, ``base_layer`` already stripped)
    -> the plain model's state dict, each wrapped weight merged (``merge_weight``)."""
    suffix_a, suffix_b = f".lora_A.{ADAPTER}.weight", f".lora_B.{ADAPTER}.weight"
    merged = {key: value for key, value in state.items() if ".lora_" not in key}
    for key in state:
        if key.endswith(suffix_a):
            layer = key[: -len(suffix_a)]
            if f"{layer}.weight" not in merged or f"{layer}{suffix_b}" not in state:
                raise KeyError(f"merge_adapters: {key} has no base weight {layer}.weight or no {layer}{suffix_b}.")
            merged[f"{layer}.weight"] = merge_weight(merged[f"{layer}.weight"], state[key], state[f"{layer}{suffix_b}"], scaling)
    return merged
