"""MetricsFileCallback writes the same metrics.jsonl rows under CSVLogger and logger=False in a
real (tiny, CPU) Lightning run: a row per train batch with the metrics logged in it, one per
validation/test run, one for the training epoch aggregates, none from the sanity check and no
repeats; read_metrics tolerates a cut-off last line and names file:line for a corrupt one."""

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader, TensorDataset

from maye_pl.evaluation import METRICS_FILENAME, MetricsFileCallback, read_metrics


class LoggingModule(pl.LightningModule):
    """Logs values derived from batch_idx/global_step, so every row is known in advance."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)

    def training_step(self, batch, batch_idx):
        self.log("loss/value", float(batch_idx))
        self.log("reward/accuracy", float(batch_idx), on_step=True, on_epoch=True)
        self.log("policy/constant", 1.0)  # equal every step: still one entry per row
        if batch_idx == 0:
            self.log("rollout/first_batch_only", 7.0)  # must not repeat in later rows
        self.log("perf/not_for_loggers", 3.0, logger=False)
        return self.layer(batch[0]).sum()

    def validation_step(self, batch, batch_idx):
        self.log("val/pass@1_t0.6", float(self.global_step))

    def test_step(self, batch, batch_idx):
        self.log("test/pass@1_t0.6", 0.5)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        return DataLoader(TensorDataset(torch.ones(3, 2)), batch_size=1)

    def val_dataloader(self):
        return DataLoader(TensorDataset(torch.ones(2, 2)), batch_size=1)

    def test_dataloader(self):
        return DataLoader(TensorDataset(torch.ones(2, 2)), batch_size=1)


EXPECTED_ROWS = [
    {"step": 0, "epoch": 0, "val/pass@1_t0.6": 0.0},  # trainer.validate before fit: the Vanilla row
    {
        "step": 1,
        "epoch": 0,
        "loss/value": 0.0,
        "policy/constant": 1.0,
        "reward/accuracy_step": 0.0,
        "rollout/first_batch_only": 7.0,
    },
    {"step": 2, "epoch": 0, "loss/value": 1.0, "policy/constant": 1.0, "reward/accuracy_step": 1.0},
    {"step": 3, "epoch": 0, "loss/value": 2.0, "policy/constant": 1.0, "reward/accuracy_step": 2.0},
    {"step": 3, "epoch": 0, "val/pass@1_t0.6": 3.0},  # validation at the end of epoch 0
    {"step": 3, "epoch": 0, "reward/accuracy_epoch": 1.0},  # mean of 0, 1, 2
    {"step": 3, "epoch": 1, "test/pass@1_t0.6": 0.5},  # trainer.test after 1 completed epoch
]


@pytest.mark.parametrize("use_csv_logger", [True, False], ids=["csv-logger", "no-logger"])
def test_rows_are_logger_independent(tmp_path: Path, use_csv_logger: bool) -> None:
    callback = MetricsFileCallback()
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=1,
        logger=CSVLogger(save_dir=tmp_path) if use_csv_logger else False,
        callbacks=[callback],
        default_root_dir=tmp_path,
        num_sanity_val_steps=2,  # its values must not reach the file
        log_every_n_steps=2,  # the file still gets every batch
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    module = LoggingModule()
    trainer.validate(module, verbose=False)
    trainer.fit(module)
    trainer.test(module, verbose=False)

    run_dir = tmp_path / "lightning_logs" / "version_0" if use_csv_logger else tmp_path
    assert callback.path == str(run_dir / METRICS_FILENAME)
    assert read_metrics(str(run_dir)) == EXPECTED_ROWS


def test_read_metrics_drops_cut_last_line(tmp_path: Path) -> None:
    cut = '{"step": 0, "epoch": 0, "a": 1.0}\n{"step": 1, "epoch": 0, "a"'  # crash mid-row
    (tmp_path / METRICS_FILENAME).write_text(cut)
    assert read_metrics(str(tmp_path)) == [{"step": 0, "epoch": 0, "a": 1.0}]


def test_read_metrics_names_corrupt_line(tmp_path: Path) -> None:
    corrupt = '{"step": 0, "epoch": 0}\n{"step": 1,\n{"step": 2, "epoch": 0}\n'
    (tmp_path / METRICS_FILENAME).write_text(corrupt)
    with pytest.raises(ValueError, match=rf"{METRICS_FILENAME}:2: not valid JSON"):
        read_metrics(str(tmp_path))
    # a complete (newline-terminated) last line that does not parse is corruption too
    (tmp_path / METRICS_FILENAME).write_text('{"step": 0, "epoch": 0}\n{"step": 1,\n')
    with pytest.raises(ValueError, match=rf"{METRICS_FILENAME}:2:"):
        read_metrics(str(tmp_path))


def test_read_metrics_rejects_rows_without_step(tmp_path: Path) -> None:
    (tmp_path / METRICS_FILENAME).write_text('{"step": 0, "epoch": 0}\n[1, 2]\n')
    with pytest.raises(ValueError, match=rf"{METRICS_FILENAME}:2: a row must be a JSON object"):
        read_metrics(str(tmp_path))


def test_read_metrics_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no metrics.jsonl; is .* a maye_pl run directory"):
        read_metrics(str(tmp_path))
