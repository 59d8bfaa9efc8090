"""`python -m maye_pl fit|validate|test --config configs/….yaml`, plus `report` and `export`.

A LightningCLI: every constructor argument of the model, the data module, the trainer and the
forced callbacks is a flag (`--model.lr 1e-6`, `--trainer.max_epochs 3`, `--rollout.engine hf`)
and a YAML key. `report RUN_DIR… --out DIR` and `export CKPT OUT_DIR` are plain argparse commands.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import Any

import torch
from jsonargparse import Namespace, set_parsing_settings
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint, ProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.strategies import Strategy
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from maye_pl.checkpoints import find_checkpoints, latest_complete_checkpoint

from maye_pl.console import RunConsoleCallback, configure_console, default_progress_bar
from maye_pl.data import MayeDataModule
from maye_pl.demo import DEMO_DATA_DIR, DEMO_MODEL_PATHS, WARM_START_PATH, ensure_demo_assets
from maye_pl.errors import USER_ERROR_EXIT_CODE, ConfigError, UserError, debug_enabled, find_user_error
from maye_pl.evaluation.metrics_file import MetricsFileCallback
from maye_pl.preemption import PREEMPTED_EXIT_CODE, PreemptionCheckpoint
from maye_pl.rollout.callback import RolloutCallback
from maye_pl.sft import SFT

# The docstring under each field of a hyperparameter group (``maye_pl/hparams.py``) is its help:
# `--help` and `--print_config=comments` show it.
set_parsing_settings(docstring_parse_attribute_docstrings=True)


def train_prompt_budget(max_model_len: int, model: Namespace) -> int | None:
    """Longest training prompt the engine takes: its context minus ``model.sampling.max_tokens``.

    None for a model that does not generate from its training prompts (``sampling`` absent or
    null, e.g. the SFT baseline).
    """
    sampling = model.init_args.get("sampling")
    return None if sampling is None else max_model_len - sampling.max_tokens


def eval_prompt_budget(max_model_len: int, model: Namespace) -> int:
    """Longest val/test prompt: the engine's context minus the evaluation max new tokens
    (``model.eval_max_tokens`` where the model has one, else ``model.sampling.max_tokens``)."""
    init = model.init_args
    eval_max_tokens = init.get("eval_max_tokens") or init.sampling.max_tokens
    return max_model_len - eval_max_tokens


class MayeCLI(LightningCLI):
    """LightningCLI with the rollout engine and the metrics file as forced callbacks.

    The model is chosen in the YAML by ``class_path`` (ReinforcePP, or the SFT baseline); the data
    module is always MayeDataModule.
    """

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("datamodule_class", MayeDataModule)
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        super().__init__(**kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(RolloutCallback, "rollout")
        parser.add_lightning_class_args(MetricsFileCallback, "metrics_file")
        parser.add_lightning_class_args(PreemptionCheckpoint, "preemption")
        parser.link_arguments("model.init_args.model_path", "data.processor_path")
        parser.link_arguments("model.init_args.model_path", "rollout.model_path")
        # The data module checks every prompt's length against the engine's budget before it starts.
        parser.link_arguments(("rollout.max_model_len", "model"), "data.max_prompt_tokens",
                              compute_fn=train_prompt_budget)
        parser.link_arguments(("rollout.max_model_len", "model"), "data.max_eval_prompt_tokens",
                              compute_fn=eval_prompt_budget)
        parser.add_argument(
            "--demo_assets",
            type=bool,
            default=False,
            help=f"Build the CPU demo's assets where model.model_path / a data path points at them and they are "
            f"missing or stale: a tiny random VLM ({', '.join(str(p) for p in DEMO_MODEL_PATHS)}: the family its "
            f"name ends with), the SFT warm start {WARM_START_PATH} (configs/sft_demo.yaml), the synthetic set "
            f"in {DEMO_DATA_DIR}/ (maye_pl/demo.py). Never downloads anything; other paths are left as they are.",
        )

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        if not config.get("demo_assets"):
            return
        # Only the demo's own paths: a path the user set is theirs, and a missing one gets the
        # data module's or the model loader's error.
        ensure_demo_assets(config.model.init_args.model_path,
                           (config.data.train_path, config.data.val_path, config.data.test_path), train_warm_start)

    def instantiate_classes(self) -> None:
        """Build the config's objects; a constructor's ValueError or FileNotFoundError is a ConfigError.

        Every constructor validates its arguments (STYLE.md rule 6), so such an error here is a
        bad config value or a path that is not there. jsonargparse wraps a model constructor's
        error in its own (a union-type error listing every subtype and the whole namespace): the
        ConfigError keeps the constructor's message only.
        """
        try:
            super().instantiate_classes()
        except (ValueError, FileNotFoundError) as error:
            if isinstance(error, UserError):
                raise
            cause = error
            while isinstance(cause.__cause__, (ValueError, FileNotFoundError)):
                cause = cause.__cause__
            raise ConfigError(str(cause)) from error

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        """The trainer, with the console callbacks and ``trainer.strategy`` given as a class path."""
        trainer_config = self._get(self.config_init, "trainer", default={})
        strategy = trainer_config.get("strategy")
        if isinstance(strategy, str) and "." in strategy:
            kwargs.setdefault("strategy", _strategy_from_class_path(strategy))
        configured = trainer_config.get("callbacks") or []
        configured = configured if isinstance(configured, list) else [configured]
        wants_bar = trainer_config.get("enable_progress_bar") is not False
        bar: list[Callback] = [default_progress_bar()] if wants_bar and not any(
            isinstance(c, ProgressBar) for c in configured) else []
        self.trainer_defaults["callbacks"] = [*bar, RunConsoleCallback()]  # the summary prints after the bar
        return super().instantiate_trainer(**kwargs)

    def _resolve_last_checkpoint(self) -> None:
        """``--ckpt_path last``: the newest complete checkpoint of the run (see maye_pl/checkpoints.py).

        Searched: the loggers' run directories (every version), every ModelCheckpoint and
        PreemptionCheckpoint directory, ``<default_root_dir>/checkpoints`` and Lightning's SLURM
        ``<default_root_dir>/hpc_ckpt_N.ckpt``. None found: the run starts fresh (so a requeued job
        script can always pass ``last``).
        """
        config = self.config_init[self.subcommand]
        if config.get("ckpt_path") != "last":
            return
        trainer = self.trainer
        root = Path(trainer.default_root_dir)
        roots = [root / "checkpoints"]
        roots += [Path(getattr(logger, "root_dir", None) or logger.save_dir) for logger in trainer.loggers
                  if getattr(logger, "root_dir", None) or logger.save_dir]
        roots += [Path(c.dirpath) for c in trainer.callbacks
                  if isinstance(c, (ModelCheckpoint, PreemptionCheckpoint)) and c.dirpath]
        candidates = set(root.glob("hpc_ckpt_*.ckpt")).union(*map(find_checkpoints, roots))
        found = latest_complete_checkpoint(candidates)
        if found is None:
            rank_zero_info(f"--ckpt_path last: no complete checkpoint under {', '.join(map(str, roots))}; starting fresh")
        else:
            rank_zero_info(f"--ckpt_path last: resuming from {found}")
        config["ckpt_path"] = str(found) if found else None
        self.config[self.subcommand]["ckpt_path"] = config["ckpt_path"]

    def before_validate(self) -> None:
        self._resolve_last_checkpoint()

    def before_test(self) -> None:
        self._resolve_last_checkpoint()

    def before_fit(self) -> None:
        """Validate once before training: the paper's "Vanilla" column (epoch 0).

        Not when resuming (``--ckpt_path``): the run already has its Vanilla row, and the model
        holds the initial weights until fit restores the checkpoint.
        """
        self._resolve_last_checkpoint()
        if not getattr(self.model.hparams, "validate_before_fit", False) or self._get(self.config, "ckpt_path"):
            return
        rollout = next(c for c in self.trainer.callbacks if isinstance(c, RolloutCallback))
        rollout.keep_engine_after_validate = True  # the same engine serves the fit that follows
        try:
            self.trainer.validate(self.model, datamodule=self.datamodule)
        finally:
            rollout.keep_engine_after_validate = False


def train_warm_start(recipe: Path) -> torch.nn.Module:
    """Fit an SFT recipe's model on its training split and return the trained policy: the demo's
    warm start (``maye_pl.demo.ensure_warm_start``).

    MayeCLI parses the recipe (types, links, seed) and builds its model and data module; a bare
    trainer with the recipe's precision and length fits them, so no engine starts.
    """
    cli = MayeCLI(args=["--config", str(recipe)], run=False)
    if not isinstance(cli.model, SFT):
        raise ConfigError(f"{recipe}: `model.class_path` is {type(cli.model).__name__}; the warm start recipe must train maye_pl.sft.SFT.")
    trainer_config = cli.config.trainer
    trainer = Trainer(
        accelerator="cpu", devices=1, precision=trainer_config.precision, max_epochs=trainer_config.max_epochs,
        max_steps=trainer_config.max_steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
    )
    trainer.fit(cli.model, cli.datamodule)
    return cli.model.policy


def _strategy_from_class_path(class_path: str) -> Strategy:
    """``trainer.strategy`` as a class path (``maye_pl.strategies.FSDP2Strategy``), built with its
    defaults; Lightning itself takes only registered names (``fsdp2``) or ``class_path:`` nodes."""
    module_name, _, class_name = class_path.rpartition(".")
    try:
        strategy_class = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as error:
        raise ValueError(
            f"`trainer.strategy`={class_path!r}: cannot import {class_name!r} from {module_name!r} "
            f"({error}). Give a registered name (`fsdp2` is maye_pl's FSDP2Strategy, or ddp, "
            "fsdp, auto) or a Strategy class path such as maye_pl.strategies.FSDP2Strategy; "
            "set its arguments with --trainer.strategy.class_path and "
            "--trainer.strategy.init_args.<name>."
        ) from error
    if not (isinstance(strategy_class, type) and issubclass(strategy_class, Strategy)):
        raise ValueError(
            f"`trainer.strategy`={class_path!r} is not a lightning Strategy class; give one "
            "(maye_pl.strategies.FSDP2Strategy) or a registered name such as `fsdp2`."
        )
    return strategy_class()


def main(argv: list[str] | None = None) -> None:
    """Entry point; ``argv`` defaults to the command line."""
    words = sys.argv[1:] if argv is None else argv
    if words and words[0] == "report":
        from maye_pl.evaluation.report import main as report_main

        report_main(words[1:])
        return
    if words and words[0] == "export":
        from maye_pl.export import main as export_main

        export_main(words[1:])
        return
    configure_console()
    try:
        MayeCLI(args=argv)
    except SIGTERMException:  # PreemptionCheckpoint wrote its checkpoint; Lightning shut everything down
        sys.exit(PREEMPTED_EXIT_CODE)
    except Exception as error:
        # A problem the user fixes (maye_pl/errors.py): its message only, no traceback, status 2.
        # Lightning has run every callback's on_exception (the engine is down) by now.
        user_error = find_user_error(error)
        if user_error is None or debug_enabled():
            raise
        print(f"{type(user_error).__name__}: {user_error}", file=sys.stderr)
        sys.exit(USER_ERROR_EXIT_CODE)
