"""Preemption: on SIGTERM, SIGUSR1 or a first Ctrl-C, checkpoint at the next step boundary, exit 143.

Clusters preempt with SIGTERM (SLURM, Kubernetes, spot instances) or warn with a signal before the
time limit (``#SBATCH --signal=USR1@90``), then kill. What Lightning does by itself, and what this
callback adds on top of it:

- Lightning's ``_SignalConnector`` sets ``trainer.received_sigterm`` on SIGTERM and forwards the
  signal to the ranks its launcher started; its loops then raise ``SIGTERMException`` at the next
  step boundary, and ``_call_and_handle_interrupt`` runs every callback's ``on_exception`` (the
  RolloutCallback shuts the engine down) and tears the trainer down. It writes no checkpoint, the
  exception exits with status 0, and each rank reads its own flag: ranks signalled a moment apart
  can stop at different steps, and a sharded checkpoint needs them all at the same one (its
  handler even broadcasts from inside the signal handler, a collective at an arbitrary point).
  A validation in progress runs to its end first, and then one more training step.
- With SLURM auto-requeue, Lightning saves ``hpc_ckpt_N.ckpt`` and requeues the job straight from
  its SIGUSR1 handler, i.e. in the middle of a step.
- Ctrl-C (SIGINT) raises KeyboardInterrupt wherever the trainer is: Lightning shuts down without
  a checkpoint, and the step in progress is lost.

So this callback replaces those handlers (for the fit, validate and test runs; Lightning restores
the originals when the run ends) with one that only records the signal and forwards SIGTERM and
SIGUSR1 to the launcher's ranks, as Lightning's does (a terminal's Ctrl-C reaches every rank by
itself). A second Ctrl-C raises KeyboardInterrupt at once: Lightning's shutdown, no checkpoint,
exit status 1. All ranks agree with one all-reduce whether any of them was signalled, at the end of
every training batch and every evaluation batch; if so, every rank, at that same point:

1. during training: writes the checkpoint with ``trainer.save_checkpoint`` (a normal Lightning
   checkpoint: loops with the mid-epoch position, data module sampler, optimizer, every callback's
   state; sharded DCP under FSDP2Strategy, published by rename once complete). On SLURM with
   auto-requeue and its requeue signal, that is Lightning's own requeue routine:
   ``hpc_ckpt_N.ckpt``, then ``scontrol requeue`` from rank 0. When the step ends an epoch (or a
   ``val_check_interval``) the validation that would follow is left to the resumed run: the
   checkpoint's loop state says "validation started, no batch done", which Lightning resumes by
   running that validation from its first batch before training on;
2. during the validation inside fit: writes the same checkpoint (the training state of the step
   before the validation) at once, without finishing the validation or waiting for a training step;
   the resumed run runs the whole validation again;
3. stops: ``SIGTERMException`` (raised by this callback during evaluation, by Lightning after the
   training batch's remaining hooks, so the step's metrics row is written), which ``maye_pl.cli.main``
   turns into exit status 143 (128 + SIGTERM).

``fit --ckpt_path <that checkpoint>`` (or ``--ckpt_path last``) resumes exactly where it stopped.
A signal during validation or test without training (``validate``, ``test``, the Vanilla row before
fit) stops at the end of the evaluation batch in progress without a checkpoint (nothing has trained).
"""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path
from types import FrameType
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_prefixed_message, rank_zero_info

PREEMPTED_EXIT_CODE = 128 + signal.SIGTERM
"""Exit status of a run stopped by a preemption signal or a first Ctrl-C (what a shell reports for SIGTERM)."""

HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)

_FIRST_CTRL_C = (b"\nCtrl-C: the run checkpoints at the end of this step (or evaluation batch) and stops; "
                 b"Ctrl-C again stops at once, without a checkpoint.\n")


class PreemptionCheckpoint(pl.Callback):
    """Checkpoints at the step boundary after SIGTERM/SIGUSR1/Ctrl-C on any rank, then stops every rank.

    Hooks: ``on_train_start`` / ``on_validation_start`` / ``on_test_start`` install the signal
    handlers (after Lightning installed its own); ``on_train_batch_end`` agrees across ranks and
    checkpoints; ``on_validation_batch_end`` / ``on_test_batch_end`` agree, checkpoint inside fit,
    and stop; ``on_save_checkpoint`` marks a checkpoint written before a validation ran as one
    whose resume runs that validation.

    Saved state: none (the checkpoint it writes is the trainer's).
    """

    def __init__(self, dirpath: str | None = None) -> None:
        """
        Args:
            dirpath: Where the checkpoint goes; None: the ModelCheckpoint's directory (the run's
                ``checkpoints/``), or ``<log_dir>/checkpoints`` without one.
        """
        self.dirpath = dirpath
        self.signal_received: int | None = None
        """The signal number this process received last (None: none yet)."""
        self.checkpoint_path: Path | None = None
        """The checkpoint written on preemption (None: none)."""
        self._trainer: pl.Trainer | None = None
        self._ctrl_c_count = 0
        self._validation_pending = False  # the checkpoint being written precedes a validation

    # ------------------------------------------------------------------ signals

    def _install(self, trainer: pl.Trainer) -> None:
        self._trainer = trainer
        if threading.current_thread() is not threading.main_thread():
            return  # Python only lets the main thread set handlers; Lightning's stay in place
        for signum in HANDLED_SIGNALS:
            signal.signal(signum, self._on_signal)
        if trainer.received_sigterm:  # arrived between Lightning's registration and now
            self.signal_received = signal.SIGTERM

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        trainer = self._trainer
        if signum == signal.SIGINT:
            self._ctrl_c_count += 1
            if self._ctrl_c_count > 1:
                raise KeyboardInterrupt  # Lightning's graceful shutdown: engine down, exit 1
            if trainer is None or trainer.is_global_zero:
                os.write(2, _FIRST_CTRL_C)  # not print(): the handler may interrupt a print
        elif self.signal_received is None and trainer is not None:
            # Like Lightning's handler: the ranks this process launched get the signal too.
            launcher = trainer.strategy.launcher
            if launcher is not None:
                launcher.kill(signum)
        self.signal_received = signum

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._install(trainer)
        if self.dirpath is None:  # resolved here, on every rank: log_dir broadcasts
            callback = trainer.checkpoint_callback
            if isinstance(callback, ModelCheckpoint) and callback.dirpath:
                self.dirpath = callback.dirpath
            else:
                self.dirpath = os.path.join(trainer.log_dir or trainer.default_root_dir, "checkpoints")

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._install(trainer)
        if self.checkpoint_path is not None and trainer.state.fn == "fit":
            raise SIGTERMException  # checkpointed at the step before: the resumed run validates

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._install(trainer)

    def _agreed_signal(self, trainer: pl.Trainer) -> int:
        """The highest signal number any rank received (0: none); one all-reduce, on every rank."""
        local = torch.tensor(self.signal_received or 0, device=trainer.strategy.root_device)
        return int(trainer.strategy.reduce(local, reduce_op="max"))

    # ------------------------------------------------------------------ stopping

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        signum = self._agreed_signal(trainer)
        if signum:
            self._checkpoint(trainer, signum, validation_pending=_validation_follows(trainer))
            # Lightning raises SIGTERMException after this batch's remaining hooks, or
            # on_validation_start does when a validation would follow.
            trainer._signal_connector.received_sigterm = True

    def _stop_evaluation(self, trainer: pl.Trainer) -> None:
        signum = self._agreed_signal(trainer)
        if not signum:
            return
        if trainer.state.fn == "fit" and not trainer.sanity_checking:
            self._checkpoint(trainer, signum, validation_pending=True)
        else:
            rank_zero_info(rank_prefixed_message("Preempted during evaluation (nothing trained): stopping.",
                                                 trainer.global_rank))
        trainer._signal_connector.received_sigterm = True
        raise SIGTERMException  # now, not after the evaluation's remaining batches

    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int,
                                dataloader_idx: int = 0) -> None:
        self._stop_evaluation(trainer)

    def on_test_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int,
                          dataloader_idx: int = 0) -> None:
        self._stop_evaluation(trainer)

    def _checkpoint(self, trainer: pl.Trainer, signum: int, validation_pending: bool) -> None:
        self._validation_pending = validation_pending
        try:
            self.checkpoint_path = self._save(trainer, signum)
        finally:
            self._validation_pending = False
        during = ", during its validation" if trainer.validating else ", before its validation" if validation_pending else ""
        rank_zero_info(
            f"Preempted by {signal.Signals(signum).name} at epoch {trainer.current_epoch}, step {trainer.global_step}{during}:"
            f" checkpoint {self.checkpoint_path}; resume with `fit ... --ckpt_path {self.checkpoint_path}`"
            " (or `--ckpt_path last`). Shutting down."
        )

    def _save(self, trainer: pl.Trainer, signum: int) -> Path:
        environment = trainer._accelerator_connector.cluster_environment
        if isinstance(environment, SLURMEnvironment) and environment.auto_requeue and signum == environment.requeue_signal:
            # Lightning's requeue routine, now at a step boundary: hpc_ckpt_N.ckpt, then scontrol requeue.
            path = trainer._checkpoint_connector.hpc_save_path(trainer.default_root_dir)
            trainer._signal_connector._slurm_sigusr_handler_fn(signum, None)
            return Path(path)
        path = Path(self.dirpath) / f"preempted-epoch={trainer.current_epoch}-step={trainer.global_step}.ckpt"
        trainer.save_checkpoint(path)
        return path

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        if self._validation_pending:
            restart_into_validation(checkpoint["loops"]["fit_loop"], validating=trainer.validating)


def _validation_follows(trainer: pl.Trainer) -> bool:
    """Whether Lightning validates right after the training batch now ending (asked in
    on_train_batch_end, as its epoch loop asks next)."""
    epoch_loop = trainer.fit_loop.epoch_loop
    return not epoch_loop._skip_next_val and epoch_loop._should_check_val_fx(trainer.fit_loop._data_fetcher)


def restart_into_validation(fit_loop: dict[str, Any], validating: bool) -> None:
    """Rewrite a fit loop's saved progress so that resuming runs the pending validation, then trains on.

    Lightning resumes "mid-evaluation" from a checkpoint whose validation loop started a batch
    without processing it: it skips the training batch that triggered the validation (done), runs
    the validation from its first batch (the dataloader restarts; nothing of the cut validation is
    kept), and continues with the next training batch. This writes that state: the training batch
    counted as completed (in on_train_batch_end Lightning has not counted it yet) and one
    validation batch started, none processed, on top of the validations that already ran this
    epoch (``val_check_interval`` < 1).

    Args:
        fit_loop: ``checkpoint["loops"]["fit_loop"]``, changed in place.
        validating: Whether the checkpoint is written during that validation (its batches so far
            are then in the counts).
    """
    train = fit_loop["epoch_loop.batch_progress"]
    for counts in (train["total"], train["current"]):
        counts["completed"] = counts["processed"]
    val = fit_loop["epoch_loop.val_loop.batch_progress"]
    earlier = val["total"]["ready"] - (val["current"]["ready"] if validating else 0)  # earlier validations' batches
    val["total"].update(ready=earlier + 1, started=earlier + 1, processed=earlier, completed=earlier)
    val["current"].update(ready=1, started=1, processed=0, completed=0)
    val["is_last_batch"] = False
