"""The CLI's console: maye_pl's own lines, short progress-bar names, one eval table, a summary.

What a run prints by default: Lightning's set-up lines, maye_pl's INFO lines (e.g. the engine's
start with its seconds), the progress bars, one table per ``validate``/``test`` run and, after
``fit``, the summary of ``maye_pl.evaluation.summary.run_summary``. vLLM logs at WARNING
(``rollout.log_level``). Errors and unknown warnings always show; the few known, harmless
messages dropped here and in the engine process are each named with the reason.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import time
import warnings
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.warnings import PossibleUserWarning

from maye_pl.evaluation.metrics_file import MetricsFileCallback, read_metrics
from maye_pl.evaluation.summary import eval_table, run_summary

PROGRESS_BAR_NAMES = {
    "reward/accuracy_step": "acc",
    "reward/accuracy_epoch": "acc epoch",
    "loss/sft": "loss",
}
"""Logged name → progress-bar name (``reward`` is short already); others keep their name."""

_configured = False


def configure_console() -> None:
    """Show maye_pl's INFO lines and drop Lightning's advertising tips (idempotent)."""
    global _configured
    if _configured:
        return
    _configured = True
    maye_logger = logging.getLogger("maye_pl")
    if not maye_logger.handlers:  # the same plain stderr handler Lightning gives its own logger
        maye_logger.addHandler(logging.StreamHandler())
        maye_logger.setLevel(logging.INFO)
    # Lightning advertises its cloud products ("💡 Tip: ... litlogger / litmodels") at INFO at
    # every start; the other INFO lines (devices, checkpoint paths) stay.
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logging.getLogger(name).addFilter(lambda record: not record.getMessage().startswith("💡 Tip:"))
    # Lightning's own pytree helper still checks `isinstance(spec, LeafSpec)`, which torch >= 2.9
    # deprecates with a FutureWarning at the first training step; nothing of ours uses LeafSpec.
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
                            category=FutureWarning, module=r"lightning\.pytorch\.utilities\._pytree")


class _ShortNames:
    """Progress-bar mixin: metrics under PROGRESS_BAR_NAMES, no ``v_num`` (the summary prints the
    run directory), and ``step s``, the wall time of the last training step in seconds.

    A step's clock starts at the previous step's end, or at the start of training, of the epoch or
    after a validation, whichever came last. ``on_train_start`` matters on a resume: Lightning
    skips ``on_train_epoch_start`` when it resumes mid-epoch.
    """

    _last_step_end: float | None = None
    _step_seconds: float | None = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._last_step_end = time.perf_counter()
        super().on_train_start(trainer, pl_module)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._last_step_end = time.perf_counter()
        super().on_train_epoch_start(trainer, pl_module)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._last_step_end = time.perf_counter()  # validation inside an epoch is not the next step's time
        super().on_validation_end(trainer, pl_module)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        now = time.perf_counter()
        self._step_seconds, self._last_step_end = now - self._last_step_end, now
        super().on_train_batch_end(trainer, pl_module, *args)

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)
        short = {PROGRESS_BAR_NAMES.get(name, name): value for name, value in items.items()}
        if self._step_seconds is not None:
            short["step s"] = round(self._step_seconds, 1)
        return short


class ShortNamesRichProgressBar(_ShortNames, RichProgressBar):
    """Lightning's rich progress bar with short metric names and ``step s``."""


class ShortNamesTQDMProgressBar(_ShortNames, TQDMProgressBar):
    """Lightning's tqdm progress bar with short metric names and ``step s``."""


def default_progress_bar() -> RichProgressBar | TQDMProgressBar:
    """The bar Lightning would pick (rich when installed, else tqdm), with short names."""
    return ShortNamesRichProgressBar() if importlib.util.find_spec("rich") else ShortNamesTQDMProgressBar()


class RunConsoleCallback(pl.Callback):
    """Prints on global rank 0: one table per ``validate``/``test`` run and, after a ``fit`` that
    finished, the run summary (metrics.jsonl of the run's MetricsFileCallback). Register it after
    the progress bar, so the summary follows the bar's last line. Saved state: none.

    The table replaces Lightning's, which lists every metric logged at epoch end under each
    dataloader (val and test are two validation dataloaders, so every value appeared twice): it
    prints when Lightning would (the loop's ``verbose``, i.e. ``trainer.validate(verbose=...)``),
    and then turns that run's ``verbose`` off.
    """

    def __init__(self) -> None:
        self._train_started: float | None = None
        self._validation_started: float | None = None
        self._validation_seconds = 0.0
        self._steps = 0
        self._train_seconds: float | None = None
        self._fit_finished = False

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        reference = getattr(pl_module, "ref_policy", None)
        if reference is None:
            return
        frozen = sum(not m.training for m in reference.modules())
        if frozen and frozen == sum(not m.training for m in pl_module.modules()):
            # The frozen reference policy stays in eval mode by design (no dropout in its log-probs),
            # and Lightning warns about any eval-mode module when training starts. Only a warning
            # naming exactly the reference's modules is dropped: any other eval-mode module warns.
            warnings.filterwarnings("ignore", category=PossibleUserWarning,
                                    message=rf"Found {frozen} module\(s\) in eval mode at the start of training")

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._train_started, self._validation_seconds, self._steps = time.perf_counter(), 0.0, 0

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self._steps += 1

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._train_seconds = time.perf_counter() - self._train_started - self._validation_seconds

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._validation_started = time.perf_counter()

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn == "fit":
            self._validation_seconds += time.perf_counter() - self._validation_started
        elif not trainer.sanity_checking:
            self._print_table(trainer, trainer.validate_loop, "Validation")

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._print_table(trainer, trainer.test_loop, "Test")

    def _print_table(self, trainer: pl.Trainer, loop: Any, title: str) -> None:
        if loop.verbose and trainer.is_global_zero:
            metrics = {name: value.item() for name, value in trainer.callback_metrics.items() if value.numel() == 1}
            if metrics:
                print(eval_table(metrics, title))
        loop.verbose = False

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._fit_finished = True  # reached only when fit ran to its end

    @rank_zero_only
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # After on_fit_end: the progress bar (an earlier callback) has drawn its last line by now.
        if stage != "fit" or not self._fit_finished:
            return
        self._fit_finished = False
        metrics_file = next((c for c in trainer.callbacks if isinstance(c, MetricsFileCallback)), None)
        if metrics_file is None or metrics_file.run_dir is None:
            return
        rows = read_metrics(metrics_file.run_dir) if os.path.isfile(metrics_file.path) else []
        print(run_summary(rows, metrics_file.run_dir, steps=self._steps, train_seconds=self._train_seconds))
