"""What one vision-language family looks like to maye_pl: ``ModelAdapter``.

Everything else (data, rewards, ``rl/``, the module, the engines, the strategy) is family-agnostic
and asks the adapter of the checkpoint's ``config.model_type`` (``adapter_for``) for:

- the parts ``train_vit`` / ``train_connector`` / ``train_llm`` switch, as parameter-name prefixes;
- the vision special tokens no engine may sample (the trainer scores with the same ban);
- the forward's extra inputs and how many ``pixel_values`` rows each image owns (per-row slicing);
- the raw-text image placeholder of prompts rendered without a chat template;
- the FSDP2 sharding units;
- the tiny random checkpoint of the family (``maye_pl.models.tiny``), for CPU runs and tests.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from torch import Tensor, nn

if TYPE_CHECKING:
    from maye_pl.models.policy_inputs import PolicyInputs

QWEN_VISION_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>")
"""Qwen-VL tokens only the processor may place: a sampled one makes the trainer's forward fail
("Image features and image tokens do not match") or re-reads an image that is not there."""

PARTS = ("vit", "connector", "llm")


@dataclass(frozen=True)
class ModelAdapter:
    """One VLM family. Prefixes are parameter-name prefixes of the HF model (``named_parameters``);
    the defaults are the layout transformers 5 gives every Qwen-VL family."""

    family: str
    """Human name, e.g. "Qwen2.5-VL"."""
    model_type: str
    """HF ``config.model_type`` that selects this adapter, e.g. "qwen2_5_vl"."""
    tiny_config: Callable[[Any], Any]
    """tokenizer → the HF config of the family's tiny random build (``maye_pl.models.tiny``)."""
    tiny_processor: Callable[[Any, str], Any]
    """(tokenizer, chat template) → the processor of the tiny build."""
    vit: tuple[str, ...] = ("model.visual.",)
    """The vision encoder (every prefix match not claimed by ``connector``)."""
    connector: tuple[str, ...] = ("model.visual.merger.",)
    """Vision → LLM projections (merger; Qwen3-VL's DeepStack mergers too). Checked before ``vit``."""
    llm: tuple[str, ...] = ("model.language_model.", "lm_head.")
    """The language model and its output head."""
    shard_containers: tuple[str, ...] = ("model.visual.blocks", "model.language_model.layers")
    """Module lists whose every child is one FSDP2 unit (the ViT blocks, the decoder layers)."""
    vision_tokens: tuple[str, ...] = QWEN_VISION_TOKENS
    image_placeholder: str = "<|vision_start|><|image_pad|><|vision_end|>"
    """How one image is written in raw text (MAYE's zero-shot prompt has no chat template)."""

    def part_of(self, name: str) -> str | None:
        """"vit", "connector" or "llm" for a parameter name; None if no prefix claims it."""
        for part in ("connector", "vit", "llm"):  # the connector sits inside the ViT's prefix
            if name.startswith(getattr(self, part)):
                return part
        return None

    def parts(self, model: nn.Module) -> dict[str, list[nn.Parameter]]:
        """Every parameter of ``model`` in exactly one part; a parameter no part claims is an error."""
        parts: dict[str, list[nn.Parameter]] = {part: [] for part in PARTS}
        unclaimed = []
        for name, param in model.named_parameters():
            part = self.part_of(name)
            if part is None:
                unclaimed.append(name)
            else:
                parts[part].append(param)
        if unclaimed or not all(parts.values()):
            empty = [part for part in PARTS if not parts[part]]
            raise TypeError(
                f"{type(model).__name__} does not have the {self.family} layout: parameters no part claims "
                f"{unclaimed[:3]}, parts with no parameter {empty} (vit {self.vit}, connector {self.connector}, "
                f"llm {self.llm}); load a {self.family} checkpoint or fix the prefixes in its adapter file."
            )
        return parts

    def vision_token_ids(self, tokenizer) -> list[int]:
        """Ids of the vision special tokens this tokenizer has, in ``vision_tokens`` order."""
        vocab = tokenizer.get_vocab()
        return [vocab[token] for token in self.vision_tokens if token in vocab]

    def forward_kwargs(self, inputs: PolicyInputs) -> dict[str, Tensor | None]:
        """The model inputs besides ``input_ids`` / ``attention_mask``.

        ``mm_token_type_ids`` (0 text, 1 image) is required: without it transformers 5's Qwen-VL
        models give image tokens 1-D positions and the logits silently differ from the engine's.
        """
        return {
            "mm_token_type_ids": inputs.mm_token_type_ids,
            "pixel_values": inputs.pixel_values,
            "image_grid_thw": inputs.image_grid_thw,
        }

    def rope_positions(self, model: nn.Module, input_ids: Tensor, attention_mask: Tensor,
                       mm_token_type_ids: Tensor, image_grid_thw: Tensor | None) -> Tensor:
        """(3, n, L) long: the M-RoPE positions (time, height, width) the model gives these rows, 0 on
        padding; from the family's ``get_rope_index`` (image tokens by their patch grid, text by count).

        The trainer passes them explicitly where the model cannot infer them: a response pass that
        continues a cached prompt, rows packed into one sequence.
        """
        positions, _ = model.model.get_rope_index(
            input_ids, mm_token_type_ids=mm_token_type_ids, image_grid_thw=image_grid_thw, attention_mask=attention_mask
        )
        return positions

    def patches_per_image(self, image_grid_thw: Tensor) -> Tensor:
        """(I,) rows of ``pixel_values`` per image: its t*h*w patch grid, from (I, 3) ``image_grid_thw``."""
        return image_grid_thw.prod(-1)

    def shard_units(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        """The FSDP2 units below the root: (qualified name, module), every child of ``shard_containers``."""
        units = [
            (f"{container}.{index}", block)
            for container in self.shard_containers
            for index, block in enumerate(model.get_submodule(container))
        ]
        if not units:
            raise ValueError(f"{type(model).__name__}: no block under {self.shard_containers} to shard.")
        return units
