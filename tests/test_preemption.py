"""PreemptionCheckpoint and `--ckpt_path last`'s search, in this process (no engine).

- A SIGTERM, SIGUSR1 or first Ctrl-C arriving mid-step lets that step finish, checkpoints at its
  end, and ends fit with Lightning's SIGTERMException; during a validation inside fit it
  checkpoints at the end of that validation batch and stops; fitting on from that checkpoint runs
  exactly what the uninterrupted run ran after it (a cut or pending validation from its first
  batch), down to the weights (a seeded shuffled loader resumed mid-epoch). A second Ctrl-C stops
  at once without a checkpoint.
- ``is_complete_checkpoint`` accepts a torch.save file and a DCP directory with both metadata
  files, and rejects a file cut mid-write and a DCP directory without Lightning's meta.pt;
  ``latest_complete_checkpoint`` picks the newest complete one, skipping hidden partial writes.
- The end-to-end paths (exit status 143, engine shut down, FSDP2 ranks agreeing, metrics equal
  after resume) run in tests/test_resume.py.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.distributed.checkpoint as dcp
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch.utils.data import DataLoader, TensorDataset

from maye_pl.checkpoints import find_checkpoints, is_complete_checkpoint, latest_complete_checkpoint
from maye_pl.console import default_progress_bar
from maye_pl.data.sampler import ResumableDataLoader, ResumableSampler
from maye_pl.preemption import PreemptionCheckpoint


class _Regression(pl.LightningModule):
    """A linear model that records what it runs in ``events`` and sends itself ``signums`` where
    ``signal_at`` says: ``("train", global step)`` or ``("val", epoch, validation batch)``."""

    def __init__(self, signal_at: tuple = (), signums: tuple[int, ...] = (signal.SIGTERM,)) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layer = torch.nn.Linear(2, 1)  # the same initial weights in every run
        self.signal_at, self.signums = signal_at, signums
        self.events: list[tuple] = []

    def _maybe_signal(self, where: tuple) -> None:
        if where == self.signal_at:
            for signum in self.signums:
                os.kill(os.getpid(), signum)  # handled at once: the step or batch still runs to its end

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        self.events.append(("train", self.global_step))
        self._maybe_signal(("train", self.global_step))
        x, y = batch
        return torch.nn.functional.mse_loss(self.layer(x), y)

    def validation_step(self, batch: list[torch.Tensor], batch_idx: int) -> None:
        self.events.append(("val", self.current_epoch, batch_idx))
        self._maybe_signal(("val", self.current_epoch, batch_idx))
        x, y = batch
        self.log("val_loss", torch.nn.functional.mse_loss(self.layer(x), y))

    def on_validation_epoch_end(self) -> None:
        self.events.append(("val_end", self.current_epoch, self.trainer.callback_metrics["val_loss"].item()))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


class _Points(pl.LightningDataModule):
    """8 points in a shuffled order that resumes mid-epoch (the sampler MayeDataModule uses): 4
    training batches per epoch; the same points in order for validation (4 batches)."""

    def __init__(self) -> None:
        super().__init__()
        self.data = TensorDataset(torch.arange(16.0).reshape(8, 2), torch.arange(8.0).reshape(8, 1))
        self.sampler = ResumableSampler(self.data, num_replicas=1, rank=0, seed=0)

    def train_dataloader(self) -> ResumableDataLoader:
        return ResumableDataLoader(self.data, self.sampler, batch_size=2)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.data, batch_size=2)

    def state_dict(self) -> dict:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state)


def _trainer(tmp_path: Path, val_check_interval: float = 1.0) -> pl.Trainer:
    """With the CLI's default progress bar: a mid-epoch resume skips on_train_epoch_start."""
    return pl.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                      enable_model_summary=False, default_root_dir=tmp_path, num_sanity_val_steps=0,
                      val_check_interval=val_check_interval,
                      callbacks=[default_progress_bar(), PreemptionCheckpoint(dirpath=str(tmp_path / "ckpts"))])


def _fit(tmp_path: Path, model: _Regression, val_check_interval: float = 1.0, **fit_kwargs) -> _Regression:
    _trainer(tmp_path, val_check_interval).fit(model, datamodule=_Points(), **fit_kwargs)
    return model


@pytest.mark.parametrize(("signal_at", "signums", "checkpoint", "val_check_interval"), [
    (("train", 1), (signal.SIGTERM,), "epoch=0-step=2", 1.0),  # mid-epoch
    (("train", 3), (signal.SIGUSR1,), "epoch=0-step=4", 1.0),  # the epoch's last step: its validation is pending
    (("val", 0, 1), (signal.SIGTERM,), "epoch=0-step=4", 1.0),  # during the epoch-end validation
    (("val", 1, 3), (signal.SIGINT,), "epoch=1-step=8", 1.0),  # a first Ctrl-C in the last batch of the last validation
    (("val", 0, 2), (signal.SIGTERM,), "epoch=0-step=2", 0.5),  # during a validation in mid-epoch
], ids=["SIGTERM-mid-epoch", "SIGUSR1-before-validation", "SIGTERM-in-validation", "Ctrl-C-in-last-validation",
        "SIGTERM-in-mid-epoch-validation"])
def test_signal_checkpoints_at_once_and_resumes_exactly(tmp_path, signal_at, signums, checkpoint, val_check_interval):
    """The step in progress finishes (a validation in progress does not: it runs again on resume),
    the checkpoint is written, fit ends with SIGTERMException, and resuming runs exactly what the
    uninterrupted run ran after that point: the same steps and validations, the same val_loss, the
    same final weights."""
    full = _fit(tmp_path / "full", _Regression(), val_check_interval)

    previous = {signum: signal.getsignal(signum) for signum in signums}
    with pytest.raises(SIGTERMException):
        preempted = _Regression(signal_at, signums)
        _fit(tmp_path / "run", preempted, val_check_interval)
    assert {signum: signal.getsignal(signum) for signum in signums} == previous  # the process's handlers are back
    checkpoint = tmp_path / f"run/ckpts/preempted-{checkpoint}.ckpt"
    assert sorted(p.name for p in (tmp_path / "run/ckpts").iterdir()) == [checkpoint.name]
    # It stopped at once: no training step after the signal's, and a validation was cut where the signal came.
    last_train = max(i for i, event in enumerate(preempted.events) if event[0] == "train")
    assert preempted.events[-1] == signal_at or preempted.events[last_train] == signal_at

    resumed = _fit(tmp_path / "run", _Regression(), val_check_interval, ckpt_path=checkpoint)
    assert preempted.events[: last_train + 1] + resumed.events == full.events  # the cut validation runs again
    assert all(torch.equal(a, b) for a, b in zip(resumed.parameters(), full.parameters()))


def test_a_second_ctrl_c_stops_at_once_without_a_checkpoint(tmp_path):
    """Ctrl-C twice in one step: Lightning's KeyboardInterrupt shutdown (exit status 1), no checkpoint."""
    previous = signal.getsignal(signal.SIGINT)
    with pytest.raises(SystemExit) as exited:
        _fit(tmp_path, _Regression(("train", 1), (signal.SIGINT, signal.SIGINT)))
    assert exited.value.code == 1
    assert not (tmp_path / "ckpts").exists()
    assert signal.getsignal(signal.SIGINT) == previous


def _torch_file(path: Path) -> Path:
    torch.save({"state_dict": {"w": torch.ones(64)}}, path)
    return path


def _dcp_dir(path: Path, meta: bool = True) -> Path:
    dcp.save({"w": torch.ones(64)}, checkpoint_id=path)  # no process group: one rank writes
    if meta:
        torch.save({"global_step": 1}, path / "meta.pt")
    return path


def test_only_complete_checkpoints_count_and_the_newest_wins(tmp_path):
    run = tmp_path / "runs/demo"
    (run / "version_0/checkpoints").mkdir(parents=True)
    (run / "version_1/checkpoints").mkdir(parents=True)
    old_file = _torch_file(run / "version_0/checkpoints/epoch=0-step=4.ckpt")
    time.sleep(0.02)
    sharded = _dcp_dir(run / "version_1/checkpoints/preempted-epoch=0-step=6.ckpt")
    assert is_complete_checkpoint(old_file) and is_complete_checkpoint(sharded)
    assert latest_complete_checkpoint(find_checkpoints(run)) == sharded  # across versions, newest

    time.sleep(0.02)
    cut = run / "version_1/checkpoints/epoch=0-step=8.ckpt"
    cut.write_bytes(old_file.read_bytes()[: old_file.stat().st_size // 2])  # a crash mid-write
    no_meta = _dcp_dir(run / "version_1/checkpoints/epoch=0-step=9.ckpt", meta=False)
    hidden = _torch_file(run / "version_1/checkpoints/.last.ckpt.partial")  # FSDP2Strategy's unpublished write
    assert not is_complete_checkpoint(cut) and not is_complete_checkpoint(no_meta)
    assert hidden not in find_checkpoints(run)
    assert latest_complete_checkpoint(find_checkpoints(run)) == sharded
    assert latest_complete_checkpoint(find_checkpoints(tmp_path / "nowhere")) is None
