"""The command line: every shipped YAML parses; the demo runs end to end through vLLM; report reads it.

`test_every_config_parses` keeps configs/ from rotting (LitGPT's test_config_hub idea): each YAML is
parsed against the real constructor signatures, so a renamed or mistyped key fails here.

`test_demo_fit_test_and_report` runs what the README tells a newcomer to run, shortened, in fresh
processes (`test` and `report` in this one): `fit` with pipelined rollouts (`--rollout.max_staleness 1`; validation before training
and after each epoch, rollouts from the real vLLM engine), then `test` from the saved checkpoint,
then `report` over both runs. It checks every metric the paper's evaluation scheme needs is in
metrics.jsonl, per-sample predictions are written, the report writes its table and figures, and no
engine process survives.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from maye_pl.cli import MayeCLI

from cli_runs import engine_processes_started_in, run_maye_pl, run_maye_pl_here

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


class _Parsed(Exception):
    pass


class _ParseOnlyCLI(MayeCLI):
    def before_instantiate_classes(self) -> None:
        raise _Parsed(self.config)


@pytest.mark.parametrize("config", CONFIGS, ids=[c.name for c in CONFIGS])
def test_every_config_parses(config):
    with pytest.raises(_Parsed) as parsed:
        _ParseOnlyCLI(args=["fit", "--config", str(config)])
    fit = parsed.value.args[0].fit
    assert fit.model.class_path.startswith("maye_pl.")
    assert fit.data.processor_path == fit.model.init_args.model_path  # linked, not repeated


def test_cli_overrides_reach_the_model():
    with pytest.raises(_Parsed) as parsed:
        _ParseOnlyCLI(args=["fit", "--config", str(REPO / "configs/demo.yaml"), "--model.lr", "1e-6",
                            "--trainer.max_epochs", "3", "--rollout.engine", "hf",
                            "--model.ppo.batch_size", "16", "--model.loss.clip_high", "0.28"])
    fit = parsed.value.args[0].fit
    assert (fit.model.init_args.lr, fit.trainer.max_epochs, fit.rollout.engine) == (1e-6, 3, "hf")
    # A group field overrides one value; the group's other fields keep the YAML's (demo: no gradient accumulation).
    ppo, loss = fit.model.init_args.ppo, fit.model.init_args.loss
    assert (ppo.batch_size, ppo.gradient_accumulation_steps, loss.clip_high, loss.clip_low) == (16, 1, 0.28, 0.2)


def test_print_config_comments_give_each_group_field_its_help(capsys):
    capsys.readouterr()
    with pytest.raises(SystemExit):
        MayeCLI(args=["fit", "--config", str(REPO / "configs/demo.yaml"), "--print_config=comments"])
    printed = capsys.readouterr().out
    # The docstring under a field of a hyperparameter group (maye_pl/hparams.py, maye_pl/optim.py) is its help.
    for help_line in ("# Passes over each rollout batch.", "# AdamW betas (MAYE: 0.9, 0.95).",
                      "# C: the largest weight (\"truncate\") or the largest ratio kept (\"mask\").",
                      "# One of ``maye_pl.rl.POLICY_LOSSES``"):
        assert help_line in printed


@pytest.mark.parametrize(("config", "max_model_len", "train_max_tokens", "eval_max_tokens"), [
    ("demo.yaml", 1024, 12, 12),  # model.sampling.max_tokens serves training and evaluation
    ("geo3k.yaml", 8192, 2048, 2048),
    ("sft_demo.yaml", 1024, None, 24),  # SFT generates only to evaluate: model.eval_max_tokens
])
def test_prompt_token_budgets_are_linked_from_the_engine_and_the_model(config, max_model_len, train_max_tokens,
                                                                        eval_max_tokens):
    for engine_context in (max_model_len, 4096):  # the YAML's value, then a command-line override
        with pytest.raises(_Parsed) as parsed:
            _ParseOnlyCLI(args=["fit", "--config", str(REPO / "configs" / config),
                                "--rollout.max_model_len", str(engine_context)])
        data = parsed.value.args[0].fit.data
        assert data.max_prompt_tokens == (None if train_max_tokens is None else engine_context - train_max_tokens)
        assert data.max_eval_prompt_tokens == engine_context - eval_max_tokens


EXPECTED_METRICS = [
    *(f"{split}/{name}" for split in ("val", "test") for name in ("pass@8_t1.0", "pass@1_t0.6", "pass@1_t0.01")),
    "reward/total", "reward/accuracy_step", "reward/accuracy_epoch", "reward/language", "reward/penalized_fraction",
    "rollout/response_length_mean", "rollout/length_clip_ratio", "generation_step", "policy/gradient_step",
    "loss/total", "loss/policy", "loss/kl", "policy/kl", "policy/entropy", "policy/clip_fraction",
    "policy/ratio_mean", "policy/approx_kl", "policy/grad_norm", "policy/lr", "policy/engine_logprob_mismatch",
    "perf/generate_s", "perf/generate_tokens_per_s", "perf/update_tokens_per_s", "perf/weight_push_s",
    "reflection/reflection_ratio", "reflection/reflection_ratio_in_correct_answers",
    "reflection/reflection_ratio_in_incorrect_answers", "reflection/correct_ratio_in_reflection_texts",
    "reflection/correct_ratio_in_no_reflection_texts", "reflection/word_count/wait",
]


@pytest.mark.slow
@pytest.mark.vllm
def test_demo_fit_test_and_report(tmp_path, capfd):
    overrides = [  # the demo's relative data paths: demo_assets builds them under tmp_path
        "--config", str(REPO / "configs/demo.yaml"),
        # The tiny random model, also built by demo_assets: this test runs the loop, not the
        # learning (the SFT warm start is tests/test_demo.py's, the rise tests/test_learning.py's).
        "--model.model_path", ".cache/tiny-qwen2.5-vl",
        "--trainer.max_epochs", "2",
        "--model.loss.kl_coef", "0.001",  # the paper's KL loss (the demo runs none): the reference model's path
        "--data.max_eval_samples", "2",
        "--trainer.limit_train_batches", "1",
        # 4 prompts x 4 samples a step, one minibatch: the loop's paths at a fraction of the demo's step
        "--data.batch_size", "4", "--model.sampling.n", "4", "--model.ppo.batch_size", "16",
        "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"),
    ]
    # Pipelined: one batch per epoch, so the batch generated ahead is the next epoch's first, in
    # flight while the epoch's validation runs.
    fit = run_maye_pl("fit", *overrides, "--rollout.max_staleness", "1", "--trainer.logger.init_args.version", "fit",
                      cwd=tmp_path)
    run_dir = tmp_path / "runs" / "demo" / "fit"
    # One Vanilla table with a column per split (not Lightning's per-dataloader duplicate), then the summary.
    assert "DataLoader 1" not in fit.stdout and re.search(r"Validation metric +val +test\n", fit.stdout)
    assert f"python -m maye_pl report {run_dir} --out" in fit.stdout
    assert " INFO " not in fit.stderr  # vLLM at WARNING

    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    logged = set().union(*rows)
    assert not [name for name in EXPECTED_METRICS if name not in logged]
    # The engine's own generation time, known once the rollouts are resolved (it read 0 before
    # the rollouts came back, and tokens/s 1e9 times the truth).
    for row in rows:
        if "perf/generate_s" in row:
            tokens = row["perf/generate_tokens_per_s"] * row["perf/generate_s"]
            assert row["perf/generate_s"] > 0 and tokens >= 1 and abs(tokens - round(tokens)) < 1e-6 * tokens
    # Epoch 2's batch was generated during epoch 1, by the weights before that epoch's update.
    assert [row["policy/staleness"] for row in rows if "policy/staleness" in row] == [0.0, 1.0]
    vanilla = [row for row in rows if "val/pass@8_t1.0" in row]
    assert [row["step"] for row in vanilla] == [0, 1, 2]  # before training, after epochs 1 and 2 (1 update each)
    predictions = sorted(p.name for p in (run_dir / "predictions").iterdir())
    assert "val_pass@8_t1.0_step0.jsonl" in predictions and "test_pass@1_t0.01_step2.jsonl" in predictions
    first = json.loads((run_dir / "predictions" / "val_pass@8_t1.0_step0.jsonl").read_text().splitlines()[0])
    assert set(first) == {"id", "question", "answer", "predictions", "correct"} and len(first["predictions"]) == 8

    checkpoint = next((run_dir / "checkpoints").glob("*.ckpt"))
    # `test` and `report` through the CLI's entry point in this process (a fresh interpreter's
    # imports are the fit's to prove): `test` on the warm engine host this process keeps.
    capfd.readouterr()
    run_maye_pl_here("test", *overrides, "--ckpt_path", str(checkpoint), "--trainer.logger.init_args.version", "test",
                     cwd=tmp_path)
    tested = capfd.readouterr().out
    assert re.search(r"Test metric +test\n", tested) and "DataLoader 0" not in tested
    test_rows = [json.loads(line) for line in (tmp_path / "runs/demo/test/metrics.jsonl").read_text().splitlines()]
    assert "test/pass@1_t0.6" in test_rows[-1]

    run_maye_pl_here("report", str(run_dir), str(tmp_path / "runs/demo/test"), "--out", str(tmp_path / "report"),
                     cwd=tmp_path)
    table = (tmp_path / "report" / "table.md").read_text()
    assert "val/pass@8_t1.0" in table and "test/pass@1_t0.01" in table
    pngs = list((tmp_path / "report").glob("*.png"))
    assert pngs and all(p.stat().st_size > 0 for p in pngs)

    assert engine_processes_started_in(tmp_path) == [], "an engine process outlived its run"
    assert (tmp_path / ".cache/tiny-qwen2.5-vl/config.json").is_file()
    assert (tmp_path / "datasets/demo_geometry/manifest.json").is_file()


@pytest.mark.slow
def test_loggers_are_selected_on_the_command_line(tmp_path):
    """`--trainer.logger` swaps the demo's CSV logger for TensorBoard and W&B together (W&B offline:
    no network); both receive the run and metrics.jsonl still lands in the run directory (the first
    logger's). The HF engine keeps this test fast; the vLLM path is covered above."""
    runs = tmp_path / "runs"
    loggers = [
        {"class_path": "lightning.pytorch.loggers.TensorBoardLogger", "init_args": {"save_dir": str(runs / "tb")}},
        {"class_path": "lightning.pytorch.loggers.WandbLogger",
         "init_args": {"save_dir": str(runs / "wandb"), "offline": True}},
    ]
    run_maye_pl(
        "fit", "--config", str(REPO / "configs/demo.yaml"), "--trainer.logger", json.dumps(loggers),
        "--model.model_path", ".cache/tiny-qwen2.5-vl",  # not the demo's SFT warm start: no SFT run to build it
        "--data.val_path", "null", "--data.test_path", "null",
        "--model.validate_before_fit", "false", "--trainer.max_steps", "2", "--trainer.limit_val_batches", "0",
        "--data.batch_size", "2", "--model.sampling.n", "2", "--model.ppo.batch_size", "4",
        "--rollout.engine", "hf",
        cwd=tmp_path,
    )
    assert list((runs / "tb").rglob("events.out.tfevents.*"))
    assert list((runs / "wandb").rglob("offline-run-*"))
    [metrics] = list(runs.rglob("metrics.jsonl"))
    assert metrics.is_relative_to(runs / "tb")
    assert any("loss/policy" in json.loads(line) for line in metrics.read_text().splitlines())
