"""A logger-independent metrics file: `<run_dir>/metrics.jsonl`, one JSON object per row.

Every row is {"step": trainer.global_step, "epoch": <epoch>, "<metric>": <float>, ...} holding the
scalar metrics logged (self.log with logger=True, the default) since the previous row. It is
written whatever logger the run uses (CSV, W&B, TensorBoard or logger=False), so `maye_pl report`
reads one format. run_dir is `trainer.log_dir`: the logger's log_dir (CSV/TensorBoard) or save_dir
(others), and `trainer.default_root_dir` without a logger; LightningCLI saves config.yaml there too.
"""

from __future__ import annotations

import json
import os
from typing import Any

import lightning.pytorch as pl
from torch import Tensor

METRICS_FILENAME = "metrics.jsonl"

# Row keys owned by the file; a metric logged under one of these names is not copied into the row.
_ROW_KEYS = ("step", "epoch")


def _storage(value: Tensor) -> int:
    return value.untyped_storage().data_ptr()


class MetricsFileCallback(pl.Callback):
    """Appends the newly logged scalar metrics to `<run_dir>/metrics.jsonl` on global rank 0.

    Hooks, and the row each writes (nothing is written when no metric is new):
      setup                  resolves run_dir = trainer.log_dir on every rank (it broadcasts).
      on_train_batch_end     the step metrics logged in this batch (training_step, and module or
                             callback hooks that ran before this callback's on_train_batch_end);
                             "epoch" = trainer.current_epoch, "step" = global_step after the batch.
                             Lightning calls the LightningModule's own on_train_batch_end after
                             every callback's, so metrics logged there land in the next row.
      on_validation_end      the validation epoch metrics (incl. those logged in the module's
      on_test_end            on_{validation,test}_epoch_end, which Lightning calls after the
                             callbacks' on_*_epoch_end; hence the *_end hook). Skipped during the
                             sanity check, whose values Lightning discards too.
      on_train_epoch_start   the training epoch metrics of the epoch that just ended (on_epoch=True
      on_train_end           aggregates, on_train_epoch_end logs); "epoch" = that epoch. These exist
                             only after every on_train_epoch_end hook, so the next hook writes them.
    Every batch gets a row regardless of Trainer(log_every_n_steps).

    "Logged since the previous row": Lightning keeps a step metric's last value until it is logged
    again; a value counts as new when its tensor storage differs from the one last written (each
    self.log stores a fresh clone, each epoch aggregate a fresh result). So a metric logged
    conditionally is not repeated, and a re-logged equal value is not dropped.

    Each row is appended and flushed (file reopened in append mode), so a crash loses at most the
    row being written; `read_metrics` ignores a half-written last line. A resumed run appending to
    an existing metrics.jsonl continues it. NaN/inf are written as NaN/Infinity (Python's json).
    """

    def __init__(self) -> None:
        self.run_dir: str | None = None
        """Directory holding metrics.jsonl; resolved in setup."""
        self._last_written: dict[str, Tensor] = {}
        # Keeping the written tensors alive also keeps their storage addresses from being reused.
        self._ended_train_epoch: int | None = None

    @property
    def path(self) -> str | None:
        """Full path of metrics.jsonl (None before setup)."""
        return None if self.run_dir is None else os.path.join(self.run_dir, METRICS_FILENAME)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        run_dir = trainer.log_dir  # a collective: every rank must read it
        if run_dir is None:
            raise ValueError(
                f"MetricsFileCallback: trainer.log_dir is None (logger "
                f"{type(trainer.loggers[0]).__name__} has no save_dir); give the logger a save_dir "
                "so metrics.jsonl has a run directory."
            )
        self.run_dir = str(run_dir)
        if trainer.is_global_zero:
            os.makedirs(self.run_dir, exist_ok=True)

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        self._write_new(trainer, epoch=trainer.current_epoch)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._ended_train_epoch = trainer.current_epoch

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._write_ended_train_epoch(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._write_ended_train_epoch(trainer)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._write_new(trainer, epoch=trainer.current_epoch)

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._write_new(trainer, epoch=trainer.current_epoch)

    def _write_ended_train_epoch(self, trainer: pl.Trainer) -> None:
        if self._ended_train_epoch is not None:
            self._write_new(trainer, epoch=self._ended_train_epoch)
            self._ended_train_epoch = None

    def _new_metrics(self, trainer: pl.Trainer) -> dict[str, float]:
        new = {}
        for name, value in trainer.logged_metrics.items():
            if name in _ROW_KEYS or not isinstance(value, Tensor) or value.numel() != 1:
                continue
            last = self._last_written.get(name)
            # Lightning hands out a fresh .detach() view per read: compare storage, not objects.
            if last is not None and _storage(last) == _storage(value):
                continue
            self._last_written[name] = value
            new[name] = value.item()
        return new

    def _write_new(self, trainer: pl.Trainer, epoch: int) -> None:
        if not trainer.is_global_zero:
            return
        if self.path is None:
            raise RuntimeError(
                "MetricsFileCallback: a hook ran before setup; register the callback on the "
                "Trainer."
            )
        metrics = self._new_metrics(trainer)
        if not metrics:
            return
        row = {"step": int(trainer.global_step), "epoch": int(epoch)}
        row.update(sorted(metrics.items()))
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()


def read_metrics(run_dir: str) -> list[dict[str, Any]]:
    """The rows of `<run_dir>/metrics.jsonl`, in file order.

    A last line without its newline that does not parse is a row cut off by a crash and is
    dropped; any other bad line raises ValueError naming file:line.
    """
    path = os.path.join(run_dir, METRICS_FILENAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{path}: no {METRICS_FILENAME}; is {run_dir!r} a maye_pl run directory "
            "(MetricsFileCallback's run_dir)?"
        )
    with open(path, encoding="utf-8") as f:
        text = f.read()
    lines = text.split("\n")
    # Without a final newline the last element is an unterminated line ("" for an empty file).
    cut_last = not text.endswith("\n")
    rows = []
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        is_cut = cut_last and lineno == len(lines)
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            if is_cut:
                break
            raise ValueError(
                f"{path}:{lineno}: not valid JSON ({err.msg}); the file is corrupt, fix or drop "
                "the line."
            ) from err
        is_row = isinstance(row, dict) and all(isinstance(row.get(k), int) for k in _ROW_KEYS)
        if not is_row:
            raise ValueError(
                f"{path}:{lineno}: a row must be a JSON object with integer 'step' and 'epoch', "
                f"got {line[:80]!r}."
            )
        rows.append(row)
    return rows

