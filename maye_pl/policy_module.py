"""What ReinforcePP and the SFT baseline share: the policy, its optimizer, its evaluation.

``PolicyModule`` owns the arguments both take (the model and what trains of it, LoRA adapters
(``model.lora``), ``model.lr`` and the ``model.optim`` group, evaluation, the judge), builds the
policy and the KL reference (``configure_model``, ``reference``), the
AdamW optimizer and its schedule (``configure_optimizers``), the token ids every step needs (pad,
stop, the vision tokens no engine may sample), and the one clip-and-step helper that ends every
optimizer step. Both subclasses optimize manually: each zeroes the gradients, backpropagates its
micro-batches, then calls ``clip_and_step``.

Validation: every problem of the arguments, the base's and the subclass's (``config_problems``),
is collected and raised once, at construction.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from transformers import GenerationConfig

from maye_pl.errors import ConfigError
from maye_pl.evaluation import PAPER_EVAL_SETTINGS, EvalSetting
from maye_pl.evaluation.scheme import PaperEvaluation
from maye_pl.models.adapters import adapter_for
from maye_pl.models.loading import build_policy_and_reference, load_processor, stop_token_ids
from maye_pl.models.lora import LoraArgs, adapters_disabled
from maye_pl.optim import OptimArgs, build_adamw
from maye_pl.rewards import Judge, judge_problems
from maye_pl.types import Rollout
from maye_pl.strategies import FSDP2Strategy, clip_grad_norm_


class PolicyModule(PaperEvaluation, pl.LightningModule):
    """A vision-language policy trained with manual optimization and evaluated by the paper's scheme."""

    needs_reference = False
    """Whether ``configure_model`` also builds the frozen reference policy (ReinforcePP: a KL term)."""
    optim: OptimArgs
    """The ``optim`` argument, typed (``_typed_groups``); likewise each dataclass argument of a subclass."""
    lora: LoraArgs

    def __init__(
        self,
        model_path: str,
        *,
        dtype: str = "float32",
        attn_implementation: str = "sdpa",
        train_vit: bool = False,
        train_connector: bool = False,
        train_llm: bool = True,
        gradient_checkpointing: bool = False,
        lora: LoraArgs = LoraArgs(),
        forward_batch_size: int = 16,
        lr: float = 5e-6,
        optim: OptimArgs = OptimArgs(),
        eval_settings: list[EvalSetting] | None = None,
        validate_before_fit: bool = True,
        judge: Judge = "math_verify",
        recipe: str | None = None,
    ) -> None:
        """
        Args:
            model_path: HF model directory (a supported Qwen VL family); also the engine's starting weights.
            dtype: Parameter dtype of the policy (and reference): "float32" or "bfloat16".
            attn_implementation: transformers attention backend ("sdpa", "flash_attention_2", "eager").
            train_vit: Train the vision transformer blocks (the paper freezes them).
            train_connector: Train the vision-language connector (the paper freezes it).
            train_llm: Train the language model and lm_head (the paper trains only these).
            gradient_checkpointing: Recompute decoder activations in the backward pass.
            lora: LoRA adapters (``r`` > 0) train instead of the parts in ``lora.parts``; the engine
                gets the merged weights, the KL reference is the policy with its adapters off.
            forward_batch_size: Rows per forward pass (ReinforcePP: the no-grad scoring of old/ref
                log-probs; SFT: each forward + backward micro-batch).
            lr: AdamW peak learning rate (the rest of the optimizer: ``optim``).
            optim: AdamW and its warmup + cosine schedule, gradient-norm clipping.
            eval_settings: Validation/test generation settings; None = the paper's three
                (pass@8 T=1.0, pass@1 T=0.6, pass@1 T=0.01).
            validate_before_fit: Run validation once before training ("Vanilla", epoch 0).
            judge: Judge of accuracy reward and evaluation: "math_verify" (last box vs ``answer``) or
                "maye" (MAYE's judge vs ``solution``); compare runs under the same judge.
            recipe: The recipe overlay the run uses (``configs/recipes/<name>.yaml`` sets its name):
                a label in the run's config for ``maye_pl report`` and the loggers; it changes nothing else.
        """
        super().__init__()
        self.save_hyperparameters()  # the subclass's arguments too (Lightning walks its __init__ frame)
        self._typed_groups()
        self.automatic_optimization = False
        self._validate_args()

        self.eval_settings = eval_settings if eval_settings is not None else PAPER_EVAL_SETTINGS()
        self.eval_rollouts: dict[str, list[Rollout]] | None = None  # set by RolloutCallback
        self.adapter = adapter_for(model_path)  # the model family: an unknown one stops here
        self.processor = load_processor(model_path)
        self.stop_token_ids = stop_token_ids(GenerationConfig.from_pretrained(model_path), self.processor.tokenizer)
        # The engines never sample these (a sampled <|image_pad|> would break the forward).
        self.banned_token_ids = self.adapter.vision_token_ids(self.processor.tokenizer)
        self.policy: torch.nn.Module | None = None
        self.ref_policy: torch.nn.Module | None = None

    def _typed_groups(self) -> None:
        """Each group argument (a dataclass: ``optim``, ReinforcePP's ``sampling``, ``loss``, ...)
        becomes a typed attribute of the module (``self.optim``), whether it came as its dataclass
        (Python) or as a dict (LightningCLI hands ``save_hyperparameters`` the parsed config).
        ``self.hparams`` keeps plain values only (dataclasses as dicts): checkpoints and loggers
        record it, and ``torch.load(weights_only=True)`` refuses unknown classes."""
        classes = type(self).__mro__
        for cls in classes[: classes.index(PolicyModule) + 1]:
            for name, hint in typing.get_type_hints(cls.__init__).items():
                value = self.hparams.get(name)
                if dataclasses.is_dataclass(hint) and value is not None:
                    setattr(self, name, hint(**value) if isinstance(value, Mapping) else value)
        for name, value in self.hparams.items():
            self.hparams[name] = _plain(value)

    def config_problems(self) -> list[str]:
        """Every problem of the arguments in ``self.hparams``; a subclass adds its own to these."""
        hp = self.hparams
        problems = []
        if not (hp.train_vit or hp.train_connector or hp.train_llm):
            problems.append("`model.train_vit`, `train_connector` and `train_llm` are all false; nothing would train.")
        if hp.forward_batch_size < 1:
            problems.append(f"`model.forward_batch_size`={hp.forward_batch_size} must be at least 1.")
        if not hp.lr > 0:
            problems.append(f"`model.lr`={hp.lr} must be positive.")
        problems += self.lora.problems("model.lora", trained={"llm": hp.train_llm, "vit": hp.train_vit})
        return problems + self.optim.problems("model.optim") + judge_problems(hp.judge, hp.get("rewards"))

    def _validate_args(self) -> None:
        problems = self.config_problems()
        if problems:
            raise ConfigError(f"Invalid {type(self).__name__} configuration:\n  " + "\n  ".join(problems))

    # ------------------------------------------------------------------ setup

    def configure_model(self) -> None:
        """Build the policy (and the frozen reference when ``needs_reference``, unless LoRA: then
        the reference is the policy with its adapters off, see ``reference``).

        Under FSDP2Strategy the models are built on the meta device; the strategy shards them and
        loads the checkpoint on rank 0 only, streaming each rank its shards.
        """
        if self.policy is not None:
            return
        hp = self.hparams
        self.policy, self.ref_policy = build_policy_and_reference(
            hp.model_path, dtype=hp.dtype, attn_implementation=hp.attn_implementation,
            train_vit=hp.train_vit, train_connector=hp.train_connector, train_llm=hp.train_llm,
            gradient_checkpointing=hp.gradient_checkpointing, lora=self.lora,
            with_reference=self.needs_reference and not self.lora.enabled,
            on_meta=self._trainer is not None and isinstance(self.trainer.strategy, FSDP2Strategy),
        )

    @contextmanager
    def reference(self) -> Iterator[torch.nn.Module]:
        """The KL reference to score with (no grad): the frozen copy of the initial policy, or with
        LoRA the policy itself with its adapters switched off (the base, without a second copy)."""
        if self.ref_policy is not None:
            yield self.ref_policy
        else:
            with adapters_disabled(self.policy) as base:
                yield base

    def configure_optimizers(self) -> dict[str, Any]:
        """AdamW over the trainable parameters, its schedule stepped by ``clip_and_step``."""
        optimizer, scheduler = build_adamw(self.trainable_parameters(), self.hparams.lr, self.optim,
                                           self.total_gradient_steps())
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def total_gradient_steps(self) -> int:
        """Optimizer steps in the whole run (the schedule's length): one per batch unless overridden."""
        return int(self.trainer.estimated_stepping_batches)

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.policy.parameters() if p.requires_grad]

    # ------------------------------------------------------------------ training

    def clip_and_step(self) -> dict[str, float]:
        """End an optimizer step over the accumulated gradients: clip the total norm (over all
        shards), AdamW step, schedule step. Returns ``policy/grad_norm`` (before clipping) and
        ``policy/lr``."""
        optimizer, scheduler = self.optimizers(), self.lr_schedulers()
        max_norm = self.optim.max_grad_norm
        grad_norm = clip_grad_norm_(self.trainable_parameters(), max_norm if max_norm is not None else float("inf"))
        optimizer.step()
        scheduler.step()
        return {"policy/grad_norm": float(grad_norm), "policy/lr": scheduler.get_last_lr()[0]}

    # ------------------------------------------------------------------ helpers

    @property
    def pad_token_id(self) -> int:
        tokenizer = self.processor.tokenizer
        return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def process_group(self) -> Any:
        """The group for global statistics (None in a single process)."""
        return dist.group.WORLD if dist.is_available() and dist.is_initialized() else None


def _plain(value: Any) -> Any:
    """``value`` with every dataclass in it (nested in lists too) as a dict."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if isinstance(value, list):
        return [_plain(item) for item in value]
    return value
