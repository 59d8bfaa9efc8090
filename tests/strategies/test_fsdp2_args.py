"""FSDP2Strategy's constructor is YAML/CLI-ready and its setup checks name every problem at once.

No processes are launched: the checks run before any sharding (the 2-process run is test_fsdp2.py).
"""

from __future__ import annotations

import pytest
import torch
from jsonargparse import ArgumentParser

import maye_pl  # noqa: F401  (torchvision shim before lightning)
from lightning.pytorch import LightningModule, Trainer
from maye_pl.strategies import FSDP2Strategy


def _parser() -> ArgumentParser:
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(FSDP2Strategy, "strategy")
    return parser


def test_typed_documented_arguments_build_the_mixed_precision_policy() -> None:
    parser = _parser()
    cfg = parser.parse_args(["--strategy.param_dtype=bfloat16", "--strategy.reduce_dtype=float32"])
    strategy = FSDP2Strategy(**cfg.strategy)
    assert strategy.mp_policy.param_dtype == torch.bfloat16
    assert strategy.mp_policy.reduce_dtype == torch.float32
    assert strategy.shard_reference and not strategy.activation_checkpointing  # defaults
    assert "dtype the gathered parameters compute in" in parser.format_help()


def test_unknown_dtype_is_rejected() -> None:
    with pytest.raises(Exception, match="param_dtype"):
        _parser().parse_args(["--strategy.param_dtype=bf16"])


def test_setup_checks_report_all_problems_together() -> None:
    class NoConfigureModel(LightningModule):
        pass

    trainer = Trainer(accelerator="cpu", devices=1, strategy=FSDP2Strategy(), precision="bf16-mixed", logger=False)
    with pytest.raises(ValueError) as err:
        trainer.strategy._check_module(NoConfigureModel(), trainer)  # noqa: SLF001
    message = str(err.value)
    assert "NoConfigureModel.configure_model() is not overridden" in message
    assert "Trainer(precision='bf16-mixed') must be '32-true'" in message
