"""Preemption: on SIGTERM or SIGUSR1, finish the step, checkpoint, shut the engine down, exit 143.

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
- With SLURM auto-requeue, Lightning saves ``hpc_ckpt_N.ckpt`` and requeues the job straight from
  its SIGUSR1 handler, i.e. in the middle of a step.

So this callback replaces those two handlers (for the fit, validate and test runs; Lightning
restores the originals when the run ends) with one that only records the signal and forwards it
to the launcher's ranks, as Lightning's does. At the end of every training batch all ranks agree
with one all-reduce whether any of them was signalled; if so, every rank, at that same step:

1. writes the checkpoint with ``trainer.save_checkpoint`` (a normal Lightning checkpoint: loops
   with the mid-epoch position, data module sampler, optimizer, every callback's state; sharded
   DCP under FSDP2Strategy, published by rename once complete). On SLURM with auto-requeue and
   its requeue signal, that is Lightning's own requeue routine: ``hpc_ckpt_N.ckpt``, then
   ``scontrol requeue`` from rank 0;
2. sets ``trainer.received_sigterm``, so Lightning raises ``SIGTERMException`` after this batch's
   remaining hooks (the metrics row of the step is written) and shuts everything down;
3. ``maye_pl.cli.main`` turns that exception into exit status 143 (128 + SIGTERM).

``fit --ckpt_path <that checkpoint>`` (or ``--ckpt_path last``) resumes exactly where it stopped.
A signal during validation or test without training (``validate``, ``test``, the Vanilla row before
fit) stops at the next evaluation batch without a checkpoint (nothing has trained); during the
validation inside fit, it takes effect at the end of the next training step.
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
from lightning.pytorch.utilities.rank_zero import rank_prefixed_message, rank_zero_info

PREEMPTED_EXIT_CODE = 128 + signal.SIGTERM
"""Exit status of a run stopped by a preemption signal (what a shell reports for SIGTERM)."""

HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class PreemptionCheckpoint(pl.Callback):
    """Checkpoints at the step boundary after SIGTERM/SIGUSR1 on any rank, then stops every rank.

    Hooks: ``on_train_start`` / ``on_validation_start`` / ``on_test_start`` install the signal
    handlers (after Lightning installed its own); ``on_train_batch_end`` agrees across ranks and
    checkpoints; ``on_validation_batch_end`` / ``on_test_batch_end`` stop an evaluation-only run.

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
        """The signal number this process received (None: none yet)."""
        self.checkpoint_path: Path | None = None
        """The checkpoint written on preemption (None: none)."""
        self._trainer: pl.Trainer | None = None

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
        if self.signal_received is None and trainer is not None:
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

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._install(trainer)

    def _agreed_signal(self, trainer: pl.Trainer) -> int:
        """The highest signal number any rank received (0: none); one all-reduce, on every rank."""
        local = torch.tensor(self.signal_received or 0, device=trainer.strategy.root_device)
        return int(trainer.strategy.reduce(local, reduce_op="max"))

    # ------------------------------------------------------------------ stopping

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        signum = self._agreed_signal(trainer)
        if not signum:
            return
        self.checkpoint_path = self._save(trainer, signum)
        rank_zero_info(
            f"Preempted by {signal.Signals(signum).name} at epoch {trainer.current_epoch}, step {trainer.global_step}:"
            f" checkpoint {self.checkpoint_path}; resume with `fit ... --ckpt_path {self.checkpoint_path}`"
            " (or `--ckpt_path last`). Shutting down."
        )
        trainer._signal_connector.received_sigterm = True  # Lightning raises SIGTERMException after this batch

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

    def _stop_evaluation(self, trainer: pl.Trainer) -> None:
        if trainer.state.fn != "fit" and self._agreed_signal(trainer):
            rank_zero_info(rank_prefixed_message("Preempted during evaluation (nothing trained): stopping.",
                                                 trainer.global_rank))
            trainer._signal_connector.received_sigterm = True  # the evaluation loop raises SIGTERMException

    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int,
                                dataloader_idx: int = 0) -> None:
        self._stop_evaluation(trainer)

    def on_test_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int,
                          dataloader_idx: int = 0) -> None:
        self._stop_evaluation(trainer)
