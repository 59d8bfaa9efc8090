"""PreemptionCheckpoint and `--ckpt_path last`'s search, in this process (no engine).

- A SIGTERM (or SIGUSR1) arriving mid-step lets that step finish, checkpoints at its end, and ends
  fit with Lightning's SIGTERMException; fitting on from that checkpoint gives exactly the weights
  of the uninterrupted run (a seeded shuffled loader resumed mid-epoch).
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
from torch.utils.data import TensorDataset

from maye_pl.checkpoints import find_checkpoints, is_complete_checkpoint, latest_complete_checkpoint
from maye_pl.console import default_progress_bar
from maye_pl.data.sampler import ResumableDataLoader, ResumableSampler
from maye_pl.preemption import PreemptionCheckpoint


class _Regression(pl.LightningModule):
    """A linear model; sends itself ``signum`` during the training step at global step ``signal_at``."""

    def __init__(self, signal_at: int | None = None, signum: int = signal.SIGTERM) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)
        self.signal_at, self.signum = signal_at, signum

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        if self.global_step == self.signal_at:
            os.kill(os.getpid(), self.signum)  # handled at once: the step still runs to its end
        x, y = batch
        return torch.nn.functional.mse_loss(self.layer(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


class _Points(pl.LightningDataModule):
    """8 points in a shuffled order that resumes mid-epoch (the sampler MayeDataModule uses)."""

    def __init__(self) -> None:
        super().__init__()
        self.data = TensorDataset(torch.arange(16.0).reshape(8, 2), torch.arange(8.0).reshape(8, 1))
        self.sampler = ResumableSampler(self.data, num_replicas=1, rank=0, seed=0)

    def train_dataloader(self) -> ResumableDataLoader:
        return ResumableDataLoader(self.data, self.sampler, batch_size=2)

    def state_dict(self) -> dict:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state)


def _trainer(tmp_path: Path) -> pl.Trainer:
    """With the CLI's default progress bar: a mid-epoch resume skips on_train_epoch_start."""
    return pl.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                      enable_model_summary=False, default_root_dir=tmp_path,
                      callbacks=[default_progress_bar(), PreemptionCheckpoint(dirpath=str(tmp_path / "ckpts"))])


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1], ids=["SIGTERM", "SIGUSR1"])
def test_signal_mid_step_checkpoints_that_step_and_resumes_exactly(tmp_path, signum):
    torch.manual_seed(0)
    full = _Regression()
    _trainer(tmp_path / "full").fit(full, datamodule=_Points())

    torch.manual_seed(0)
    preempted = _Regression(signal_at=1, signum=signum)  # during the 2nd of the epoch's 4 steps
    previous = signal.getsignal(signum)
    with pytest.raises(SIGTERMException):
        _trainer(tmp_path / "run").fit(preempted, datamodule=_Points())
    assert signal.getsignal(signum) == previous  # Lightning put the process's handler back
    checkpoint = tmp_path / "run/ckpts/preempted-epoch=0-step=2.ckpt"  # the 2nd step finished first
    assert sorted(p.name for p in (tmp_path / "run/ckpts").iterdir()) == [checkpoint.name]

    resumed = _Regression()
    _trainer(tmp_path / "run").fit(resumed, datamodule=_Points(), ckpt_path=checkpoint)  # steps 3 and 4 only
    assert all(torch.equal(a, b) for a, b in zip(resumed.parameters(), full.parameters()))
    assert not torch.equal(resumed.layer.weight, preempted.layer.weight)  # steps 3 and 4 did train


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
