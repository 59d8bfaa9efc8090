"""What a newcomer meets first: `--help`, the eval table, the run summary, short progress-bar names,
error messages that name real config keys, demo_assets that stays on the demo's own paths, and
`trainer.strategy` as a class path. All in-process and without an engine (a few seconds)."""

from __future__ import annotations

import ast
import re
from pathlib import Path
from types import SimpleNamespace

import pytest

from maye_pl.cli import MayeCLI, _strategy_from_class_path, main
from maye_pl.console import ShortNamesTQDMProgressBar
from maye_pl.demo import DEMO_DATA_DIR
from maye_pl.errors import ConfigError
from maye_pl.evaluation.summary import eval_table, run_summary
from maye_pl.rollout.callback import RolloutCallback
from maye_pl.rollout.vllm_host import host_environment
from maye_pl.strategies import FSDP2Strategy

REPO = Path(__file__).resolve().parents[1]


class _Parsed(Exception):
    pass


class _ParseOnlyCLI(MayeCLI):
    def before_instantiate_classes(self) -> None:
        raise _Parsed(self.config)


class _AssetsOnlyCLI(MayeCLI):
    """Runs demo_assets (before_instantiate_classes), then stops."""

    def before_instantiate_classes(self) -> None:
        super().before_instantiate_classes()
        raise _Parsed(self.config)


def test_help_lists_subcommands_and_groups(capsys, monkeypatch):
    """`python -m maye_pl --help` and `fit --help` exit 0 and show the subcommands and the config
    groups (no traceback on a CPU machine)."""
    monkeypatch.setattr("sys.argv", ["maye_pl"])
    outputs = []
    for argv in (["--help"], ["fit", "--help"]):
        with pytest.raises(SystemExit) as exited:
            main(argv)
        assert exited.value.code == 0
        outputs.append(capsys.readouterr().out)
    top, fit = outputs
    assert all(word in top for word in ("fit", "validate", "test"))
    assert all(flag in fit for flag in ("--model", "--data.train_path", "--rollout.log_level",
                                         "--rollout.startup_timeout_s", "--trainer.strategy", "--demo_assets"))


def test_eval_table_has_a_row_per_metric_and_a_column_per_split():
    """val/test metrics share a row; a name without a split, or with Lightning's dataloader
    suffix, goes to the value column."""
    table = eval_table({"val/pass@8_t1.0": 0.5, "test/pass@8_t1.0": 0.25, "val/pass@1_t0.6": 0.125,
                        "loss/dataloader_idx_1": 2.0})
    assert table.splitlines() == [
        "Validation metric  val     test    value",
        "----------------------------------------",
        "loss                               2.0000",
        "pass@1_t0.6        0.1250",
        "pass@8_t1.0        0.5000  0.2500",
    ]


def test_run_summary_reports_every_epoch_from_vanilla_and_speed():
    """Reward = epoch mean of reward/total ((0.2+0.4)/2 = 0.3 → 0.5); accuracy from
    reward/accuracy_epoch; eval metrics from the step-0 (Vanilla) row through each epoch, with the
    change from Vanilla to the last (0.3 - 0.1 = +0.2); 12 s over 4 steps = 3.00 s/step; tokens/s
    are the per-step means ((100+300)/2 = 200, update 50)."""
    rows = [
        {"step": 0, "epoch": 0, "val/pass@1_t0.6": 0.1},
        {"step": 1, "epoch": 0, "reward/total": 0.2, "perf/generate_tokens_per_s": 100.0},
        {"step": 2, "epoch": 0, "reward/total": 0.4, "perf/generate_tokens_per_s": 300.0,
         "perf/update_tokens_per_s": 50.0},
        {"step": 2, "epoch": 0, "reward/accuracy_epoch": 0.25, "val/pass@1_t0.6": 0.2},
        {"step": 3, "epoch": 1, "reward/total": 0.5},
        {"step": 4, "epoch": 1, "reward/accuracy_epoch": 0.75, "val/pass@1_t0.6": 0.3},
    ]
    assert run_summary(rows, "runs/demo/version_0", steps=4, train_seconds=12.0).splitlines() == [
        "Run directory: runs/demo/version_0",
        "Training (epoch 1 → 2):",
        "  reward    0.3000  → 0.5000",
        "  accuracy  0.2500  → 0.7500",
        "Evaluation (Vanilla → epoch 1 → epoch 2):",
        "  val/pass@1_t0.6  0.1000  → 0.2000  → 0.3000  (+0.2000)",
        "Speed: 3.00 s/step over 4 steps, generation 200 tokens/s, update 50 tokens/s",
        "Tables and plots: python -m maye_pl report runs/demo/version_0 --out runs/demo/version_0/report",
    ]


def test_run_summary_of_a_long_run_shows_its_first_and_last_epochs():
    """Past MAX_COLUMNS (8) evaluations the middle ones become "…": Vanilla and epochs 1-3, then
    epochs 7-10 of a 10-epoch run; a metric missing in an epoch another one has shows "-"."""
    rows = [{"step": 0, "epoch": 0, "val/pass@1_t0.01": 0.0, "test/pass@1_t0.01": 0.0}]
    rows += [{"step": e + 1, "epoch": e, "val/pass@1_t0.01": (e + 1) / 10} for e in range(10)]
    rows += [{"step": e + 1, "epoch": e, "test/pass@1_t0.01": (e + 1) / 20} for e in range(10) if e != 8]
    lines = run_summary(rows, "run", steps=0, train_seconds=None).splitlines()
    assert lines[1:4] == [
        "Evaluation (Vanilla → epoch 1 → epoch 2 → epoch 3 → … → epoch 7 → epoch 8 → epoch 9 → epoch 10):",
        "  test/pass@1_t0.01  0.0000  → 0.0500  → 0.1000  → 0.1500  → …  → 0.3500  → 0.4000  → -       → 0.5000  (+0.5000)",
        "  val/pass@1_t0.01   0.0000  → 0.1000  → 0.2000  → 0.3000  → …  → 0.7000  → 0.8000  → 0.9000  → 1.0000  (+1.0000)",
    ]


def test_progress_bar_shows_short_names():
    """reward/accuracy_step → acc, the epoch mean → acc epoch, no v_num, the step's seconds."""
    bar = ShortNamesTQDMProgressBar()
    bar._step_seconds = 6.04
    trainer = SimpleNamespace(loggers=[SimpleNamespace(version=0)],
                              progress_bar_metrics={"reward": -0.1, "reward/accuracy_step": 0.25,
                                                    "reward/accuracy_epoch": 0.5})
    assert bar.get_metrics(trainer, None) == {"reward": -0.1, "acc": 0.25, "acc epoch": 0.5, "step s": 6.0}


def _error_message_config_keys() -> set[str]:
    """Backticked `section.key` names in the string parts of every `raise` in the package."""
    sections = ("trainer", "model", "data", "rollout", "metrics_file")
    pattern = re.compile(r"`((?:%s)\.[a-z_][a-z0-9_.]*)`" % "|".join(sections))
    keys = set()
    for path in (REPO / "maye_pl").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Raise) and node.exc is not None:
                for part in ast.walk(node.exc):
                    if isinstance(part, ast.Constant) and isinstance(part.value, str):
                        keys.update(pattern.findall(part.value))
    return keys


def _config_keys(namespace, prefix: str = "") -> set[str]:
    """Dotted keys of a parsed config, with subclass nodes' `init_args` left out of the name."""
    keys = set()
    for name, value in vars(namespace).items():
        if name == "init_args":
            keys |= _config_keys(value, prefix)
            continue
        keys.add(prefix + name)
        if hasattr(value, "__dict__") and not callable(value):
            keys |= _config_keys(value, f"{prefix}{name}.")
    return keys


def test_every_config_key_named_in_an_error_exists(monkeypatch):
    """Each backticked `section.key` in an error message is a key of the parsed demo config
    (ReinforcePP) or the SFT demo config, so the fix an error suggests can be typed as a flag."""
    monkeypatch.setattr("sys.argv", ["maye_pl"])
    known = set()
    for config in ("demo.yaml", "sft_demo.yaml"):
        with pytest.raises(_Parsed) as parsed:
            _ParseOnlyCLI(args=["fit", "--config", str(REPO / "configs" / config)])
        known |= _config_keys(parsed.value.args[0].fit)
    named = _error_message_config_keys()
    assert {"rollout.device", "rollout.startup_timeout_s", "model.sampling.n"} <= named  # the scan works
    assert sorted(named - known) == []


def test_demo_assets_builds_only_the_demo_paths(tmp_path, monkeypatch):
    """A model or data path the user set is never written: with user paths nothing is built; the
    demo's default data paths (relative to the cwd) get the synthetic set."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.argv", ["maye_pl"])
    user = ["--model.model_path", str(tmp_path / "my_model"), "--data.train_path", str(tmp_path / "my/train.jsonl")]
    with pytest.raises(_Parsed):
        _AssetsOnlyCLI(args=["fit", "--config", str(REPO / "configs/demo.yaml"), *user,
                             "--data.val_path", "null", "--data.test_path", "null"])
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(_Parsed):
        _AssetsOnlyCLI(args=["fit", "--config", str(REPO / "configs/demo.yaml"), *user])  # default val/test
    assert (tmp_path / DEMO_DATA_DIR / "manifest.json").is_file()
    assert not (tmp_path / "my_model").exists() and not (tmp_path / "my").exists()


def test_strategy_class_path():
    """`--trainer.strategy maye_pl.strategies.FSDP2Strategy` builds the strategy; a wrong path's
    error names the registered `fsdp2` and the class_path form."""
    assert isinstance(_strategy_from_class_path("maye_pl.strategies.FSDP2Strategy"), FSDP2Strategy)
    with pytest.raises(ValueError, match=r"`trainer.strategy`='maye_pl.strategies.FSDP3'.*`fsdp2`"):
        _strategy_from_class_path("maye_pl.strategies.FSDP3")
    with pytest.raises(ValueError, match="is not a lightning Strategy class"):
        _strategy_from_class_path("maye_pl.strategies.WeightSyncPlan")


def test_vllm_logs_at_warning_unless_asked():
    """The engine host runs vLLM at WARNING by default (its INFO config dump and per-step lines
    stay out of the console); `rollout.log_level` sets any level and rejects unknown ones."""
    assert RolloutCallback().vllm_options["log_level"] == "warning"
    assert host_environment("cpu")["VLLM_LOGGING_LEVEL"] == "WARNING"
    assert host_environment("cpu", RolloutCallback(log_level="info").vllm_options["log_level"])[
        "VLLM_LOGGING_LEVEL"] == "INFO"
    with pytest.raises(ValueError, match=r"`rollout.log_level`='loud' must be one of debug, info, warning"):
        RolloutCallback(log_level="loud")


@pytest.mark.parametrize(("flags", "message"), [
    # A model constructor's error, which jsonargparse wraps in a union-type error and a namespace dump.
    (["--model.lr", "-1"], "ConfigError: Invalid ReinforcePP configuration:\n  `model.lr`=-1.0 must be positive.\n"),
    # A forced callback's, raised as it is.
    (["--rollout.max_staleness", "3"], "ConfigError: `rollout.max_staleness`=3 is not supported; use 0"),
    # A FileNotFoundError from a constructor.
    (["--model.model_path", "nowhere"], "ConfigError: nowhere/config.json not found: `model.model_path`='nowhere'"),
])
def test_a_config_error_prints_its_message_only(tiny_model_dir, capsys, monkeypatch, flags, message):
    """A bad config value stops `fit` with its message alone (after Lightning's INFO lines) on
    stderr and exit status 2; with MAYE_PL_DEBUG=1 the ConfigError propagates (Python prints its
    traceback) with the constructor's error as its cause."""
    monkeypatch.setattr("sys.argv", ["maye_pl"])
    monkeypatch.delenv("MAYE_PL_DEBUG", raising=False)
    argv = ["fit", "--config", str(REPO / "configs/demo.yaml"), "--demo_assets", "false",
            "--model.model_path", str(tiny_model_dir), *flags]
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2
    stderr = capsys.readouterr().err
    printed = stderr[stderr.index("ConfigError"):]
    assert printed.startswith(message) and printed.count("\n") == max(message.count("\n"), 1)
    assert "Traceback" not in stderr and "Namespace(" not in stderr

    if flags[0] == "--model.lr":  # once is enough
        monkeypatch.setenv("MAYE_PL_DEBUG", "1")
        with pytest.raises(ConfigError, match=re.escape(message.split(": ", 1)[1].strip())):
            main(argv)
