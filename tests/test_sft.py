"""The SFT baseline: the loss is the solution tokens' NLL, it learns, and it runs end to end via the CLI.

Proves: bad hyperparameters are reported together; the training loss equals the token-mean NLL of
the golden solutions (+ stop token) computed independently from plain per-sample forwards, so
prompt and padding are masked and micro-batching does not change it; a few steps overfit 8
samples; `fit --config configs/sft_demo.yaml` (shortened) validates through the real vLLM engine
before and after training, writes loss/sft and the val/test pass@k metrics, `maye_pl report` reads
the run, and no engine process survives.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from maye_pl.data import MayeDataModule, generate_geometry_dataset
from maye_pl.evaluation import MetricsFileCallback, read_metrics
from maye_pl.optim import OptimArgs
from maye_pl.sft import SFT

from cli_runs import engine_processes_started_in, run_maye_pl_here

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def train_path(tmp_path_factory) -> Path:
    return generate_geometry_dataset(tmp_path_factory.mktemp("geo") / "geo", n_train=8, n_val=0, n_test=0)["train"]


def _trainer(**kwargs) -> pl.Trainer:
    return pl.Trainer(accelerator="cpu", devices=1, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, **kwargs)


def test_invalid_hyperparameters_are_reported_together(tiny_model_dir):
    with pytest.raises(ValueError) as info:
        SFT(str(tiny_model_dir), train_llm=False, forward_batch_size=0, optim=OptimArgs(min_lr_ratio=2.0, max_grad_norm=0.0))
    message = str(info.value)
    for expected in ("nothing would train", "`model.forward_batch_size`=0", "`model.optim.min_lr_ratio`=2.0",
                     "`model.optim.max_grad_norm`=0.0"):
        assert expected in message


def _reference_nll(module: SFT, batch: list[dict]) -> tuple[float, list[int]]:
    """Token-mean NLL of solution + stop token over the batch, one unpadded forward per sample."""
    tokenizer = module.processor.tokenizer
    total, lengths = 0.0, []
    for sample in batch:
        prompt = module.processor(text=[sample["prompt"]], images=[sample["image"]], return_tensors="pt",
                                  return_mm_token_type_ids=True)
        target = torch.tensor(tokenizer.encode(sample["solution"], add_special_tokens=False) + [module.stop_token_ids[0]])
        P, T = prompt["input_ids"].shape[1], len(target)
        with torch.no_grad():
            logits = module.policy(
                input_ids=torch.cat([prompt["input_ids"][0], target])[None],
                mm_token_type_ids=torch.cat([prompt["mm_token_type_ids"][0], torch.zeros(T, dtype=torch.long)])[None],
                pixel_values=prompt["pixel_values"], image_grid_thw=prompt["image_grid_thw"],
            ).logits[0]  # (P+T, V)
        # Logits at P-1 .. P+T-2 predict the solution tokens at P .. P+T-1.
        logprobs = logits[P - 1 : P + T - 1].float().log_softmax(-1).gather(-1, target[:, None])  # (T, 1)
        total -= logprobs.sum().item()
        lengths.append(T)
    return total / sum(lengths), lengths


def test_loss_is_the_token_mean_nll_of_the_solutions(tiny_model_dir, train_path):
    data = MayeDataModule(train_path, batch_size=3, max_train_samples=3, processor_path=tiny_model_dir)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    # forward_batch_size=2 splits the 3 rows into micro-batches of 2 and 1.
    module = SFT(str(tiny_model_dir), forward_batch_size=2, lr=1e-6)
    module.configure_model()
    expected, lengths = _reference_nll(module, batch)
    inputs = module.solution_inputs(batch)
    assert inputs.response_mask.sum(1).tolist() == lengths
    assert len(set(lengths)) > 1, "the solutions should differ in length so that padding is exercised"
    assert not inputs.attention_mask[:, : inputs.prompt_length].all(), "the prompts should be left-padded"

    trainer = _trainer(max_steps=1, logger=False)
    trainer.fit(module, train_dataloaders=data.train_dataloader())
    assert trainer.callback_metrics["loss/sft"].item() == pytest.approx(expected, rel=1e-4)


def test_a_few_steps_overfit_eight_samples(tiny_model_dir, train_path, tmp_path):
    pl.seed_everything(0)
    data = MayeDataModule(train_path, batch_size=8, processor_path=tiny_model_dir)
    # A constant LR (min_lr_ratio=1): this is about learning, not the schedule.
    module = SFT(str(tiny_model_dir), lr=5e-3, optim=OptimArgs(min_lr_ratio=1.0), forward_batch_size=8)
    trainer = _trainer(max_steps=6, log_every_n_steps=1, logger=pl.loggers.CSVLogger(tmp_path),
                       callbacks=[MetricsFileCallback()])
    trainer.fit(module, data)
    losses = [row["loss/sft"] for row in read_metrics(trainer.log_dir) if "loss/sft" in row]
    assert len(losses) == 6
    # Seen: 6.90 -> 3.35 nats per token; the random model starts at about log(vocab size 733) = 6.6.
    assert losses[-1] < 0.65 * losses[0], f"the SFT loss did not fall: {losses}"


@pytest.mark.slow
@pytest.mark.vllm
def test_sft_demo_fit_through_vllm_and_report(tmp_path):
    # Through the CLI's entry point in this process (fresh `fit` processes: tests/test_cli.py).
    run_maye_pl_here(
        "fit", "--config", str(REPO / "configs/sft_demo.yaml"),
        "--model.eval_max_tokens", "16",
        "--data.max_eval_samples", "2",
        "--trainer.max_epochs", "1",
        "--trainer.check_val_every_n_epoch", "1",  # the demo validates every 5th of its 10 epochs
        "--trainer.limit_train_batches", "2",
        "--trainer.enable_progress_bar", "false",
        "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"),
        "--trainer.logger.init_args.version", "seed0",
        cwd=tmp_path,
    )
    run_dir = tmp_path / "runs" / "sft_demo" / "seed0"
    rows = read_metrics(str(run_dir))
    evals = [row for row in rows if "val/pass@8_t1.0" in row]
    assert [row["step"] for row in evals] == [0, 2]  # Vanilla, then after the epoch's 2 steps
    names = ("pass@8_t1.0", "pass@1_t0.6", "pass@1_t0.01")
    assert all(f"{split}/{name}" in row for row in evals for split in ("val", "test") for name in names)
    losses = [row["loss/sft"] for row in rows if "loss/sft" in row]
    vocab = json.loads((tmp_path / ".cache/tiny-qwen2.5-vl/config.json").read_text())["text_config"]["vocab_size"]
    # A per-token mean NLL: the random model starts near log(vocab), not at a sum over tokens.
    assert len(losses) == 2 and abs(losses[0] - math.log(vocab)) < 1.0
    assert "val_pass@8_t1.0_step2.jsonl" in {p.name for p in (run_dir / "predictions").iterdir()}

    run_maye_pl_here("report", str(run_dir), "--out", str(tmp_path / "report"), cwd=tmp_path)
    table = (tmp_path / "report" / "table.md").read_text()
    assert "val/pass@8_t1.0" in table and "test/pass@1_t0.01" in table
    assert engine_processes_started_in(tmp_path) == [], "an engine process outlived its run"
    # demo_assets built the tiny model and the synthetic set at the config's paths, relative to the cwd.
    assert (tmp_path / ".cache/tiny-qwen2.5-vl/config.json").is_file()
    assert (tmp_path / "datasets/demo_geometry/manifest.json").is_file()
