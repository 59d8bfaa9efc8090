"""`maye_pl report` on fabricated run directories (two seeds x three epochs of one config, one
seed of another): seeds are grouped by config minus seed/paths, the Table 3 statistics and the
per-epoch rows equal hand-computed values in table.csv and table.md, the figures are real PNGs, missing metrics skip
a figure with a notice, and bad directories fail with a clear message."""

import csv
import json
from pathlib import Path

import pytest
import yaml

from maye_pl.evaluation.report import changing_words, main
from maye_pl.evaluation.runs import comparable_config, group_runs, load_run

VAL8, TEST06 = "val/pass@8_t1.0", "test/pass@1_t0.6"
# seed -> metric -> (Vanilla, [epoch 0, epoch 1, epoch 2])
GROUP_A = {
    1: {VAL8: (0.40, [0.50, 0.60, 0.55]), TEST06: (0.20, [0.30, 0.25, 0.35])},
    2: {VAL8: (0.50, [0.45, 0.70, 0.65]), TEST06: (0.30, [0.30, 0.40, 0.20])},
}
GROUP_B = {7: {VAL8: (0.40, [0.40, 0.40, 0.40])}}
# Hand-computed (seed average of per-seed statistics):
#   A val:  Vanilla (0.40+0.50)/2 = 0.45;
#           Mean ((0.50+0.60+0.55)/3 + (0.45+0.70+0.65)/3)/2 = (0.55+0.60)/2 = 0.575;
#           Max (0.60+0.70)/2 = 0.65; gain (0.65-0.45)/0.45 = 44.44 %
#   A test: Vanilla (0.20+0.30)/2 = 0.25; Mean ((0.30+0.25+0.35)/3 + (0.30+0.40+0.20)/3)/2 = 0.30;
#           Max (0.35+0.40)/2 = 0.375; gain 0.125/0.25 = 50 %
#   B val:  0.40 everywhere, gain 0 %; B has no test metric.
#   Per epoch (seed means): A val (0.50+0.45)/2 = 0.475, (0.60+0.70)/2 = 0.65, (0.55+0.65)/2 = 0.60;
#           A test 0.30, (0.25+0.40)/2 = 0.325, (0.35+0.20)/2 = 0.275; B val 0.40 each epoch.
EXPECTED_CSV = {
    ("model.init_args.lr=5e-06", "vanilla"): [0.45, 0.25],
    ("model.init_args.lr=5e-06", "mean"): [0.575, 0.30],
    ("model.init_args.lr=5e-06", "max"): [0.65, 0.375],
    ("model.init_args.lr=5e-06", "max_gain_pct"): [200 / 4.5, 50.0],
    ("model.init_args.lr=5e-06", "epoch_1"): [0.475, 0.30],
    ("model.init_args.lr=5e-06", "epoch_2"): [0.65, 0.325],
    ("model.init_args.lr=5e-06", "epoch_3"): [0.60, 0.275],
    ("model.init_args.lr=1e-06", "vanilla"): [0.40, None],
    ("model.init_args.lr=1e-06", "mean"): [0.40, None],
    ("model.init_args.lr=1e-06", "max"): [0.40, None],
    ("model.init_args.lr=1e-06", "max_gain_pct"): [0.0, None],
    ("model.init_args.lr=1e-06", "epoch_1"): [0.40, None],
    ("model.init_args.lr=1e-06", "epoch_2"): [0.40, None],
    ("model.init_args.lr=1e-06", "epoch_3"): [0.40, None],
}
# reflection word counts at generation step g = 1..6: "wait" 1 -> 9, "yet" 3 -> 0, "recheck" 0 -> 1,
# "verify" and "rethink" flat: the four most changing are wait, yet, recheck, then rethink (tie with
# verify broken by MAYE's word order).
WORDS = {
    "wait": lambda g: 1 + 8 * (g - 1) / 5,
    "yet": lambda g: 3 - 3 * (g - 1) / 5,
    "recheck": lambda g: float(g == 6),
    "verify": lambda g: 5.0,
    "rethink": lambda g: 2.0,
}


def config(seed: int, lr: float, run_dir: Path) -> dict:
    return {
        "seed_everything": seed,
        "trainer": {
            "default_root_dir": str(run_dir),
            "max_epochs": 3,
            "logger": {
                "class_path": "lightning.pytorch.loggers.CSVLogger",
                "init_args": {"save_dir": str(run_dir), "name": f"s{seed}"},
            },
        },
        "model": {"class_path": "maye_pl.module.ReinforcePP", "init_args": {"lr": lr}},
    }


def write_run(run_dir: Path, seed: int, lr: float | None, evals: dict, train_rows: bool) -> None:
    run_dir.mkdir(parents=True)
    rows = [{"step": 0, "epoch": 0, **{m: v[0] for m, v in evals.items()}}]
    for epoch in range(3):
        if train_rows:
            for g in (2 * epoch + 1, 2 * epoch + 2):
                rows.append(
                    {
                        "step": 4 * g,
                        "epoch": epoch,
                        "generation_step": g,
                        "rollout/response_length_mean": 100.0 + 10 * g + seed,
                        "reflection/reflection_ratio": 0.1 * g,
                        **{f"reflection/word_count/{w}": f(g) for w, f in WORDS.items()},
                    }
                )
        end = {"step": 8 * (epoch + 1), "epoch": epoch}
        rows.append({**end, **{m: v[1][epoch] for m, v in evals.items()}})
        if train_rows:
            rows.append({**end, "reward/accuracy_epoch": 0.3 + 0.1 * epoch})
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if lr is not None:
        (run_dir / "config.yaml").write_text(yaml.safe_dump(config(seed, lr, run_dir)))


@pytest.fixture()
def runs_root(tmp_path: Path) -> Path:
    for seed, evals in GROUP_A.items():
        write_run(tmp_path / "runs" / "a" / f"seed{seed}", seed, 5e-6, evals, train_rows=True)
    for seed, evals in GROUP_B.items():
        write_run(tmp_path / "runs" / "b" / f"seed{seed}", seed, 1e-6, evals, train_rows=False)
    return tmp_path / "runs"


def test_table_matches_hand_computation(runs_root: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "report"
    main([str(runs_root), "--out", str(out)])  # a parent directory: both groups are found below it

    with open(out / "table.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["group", "n_runs", "statistic", VAL8, TEST06]
    got = {(r[0], r[2]): [None if v == "" else float(v) for v in r[3:]] for r in rows[1:]}
    assert got.keys() == EXPECTED_CSV.keys()
    for key, expected in EXPECTED_CSV.items():
        assert got[key] == [pytest.approx(v) if v is not None else None for v in expected], key
    n_runs = {r[0]: r[1] for r in rows[1:]}
    assert n_runs == {"model.init_args.lr=5e-06": "2", "model.init_args.lr=1e-06": "1"}

    md = (out / "table.md").read_text()
    assert f"| | {VAL8} | {TEST06} |" in md
    assert "| Vanilla | 45.00 | 25.00 |" in md
    assert "| Mean | 57.50 | 30.00 |" in md
    assert "| Max | 65.00 | 37.50 |" in md
    assert "| Max gain over Vanilla (%) | +44.44 | +50.00 |" in md
    assert "| Mean | 40.00 | – |" in md
    # Per epoch: Vanilla, then after each epoch (the rise epoch by epoch).
    assert "| Vanilla | 45.00 | 25.00 |\n| Epoch 1 | 47.50 | 30.00 |\n| Epoch 2 | 65.00 | 32.50 |\n| Epoch 3 | 60.00 | 27.50 |" in md
    assert "(seed 1)" in md and "(seed 2)" in md and "(seed 7)" in md

    figures = ("train_accuracy", "response_length", "reflection_ratios", "reflection_words")
    for name in (*figures, "eval_accuracy"):
        png = (out / f"{name}.png").read_bytes()
        assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 5000, name
    assert "skipping" not in capsys.readouterr().out


def test_grouping_ignores_seed_and_run_paths(runs_root: Path) -> None:
    runs = [load_run(str(d)) for d in sorted(runs_root.glob("*/seed*"))]
    # seeds 1 and 2 of group a
    assert comparable_config(runs[0].config) == comparable_config(runs[1].config)
    assert comparable_config(runs[0].config)["trainer"]["logger"]["init_args"] == {}
    groups = group_runs(runs)
    assert [(g.label, [r.seed for r in g.runs]) for g in groups] == [
        ("model.init_args.lr=5e-06", [1, 2]),
        ("model.init_args.lr=1e-06", [7]),
    ]
    assert changing_words(groups) == ["wait", "yet", "recheck", "rethink"]


def test_runs_of_different_recipes_are_labelled_by_recipe(tmp_path: Path) -> None:
    runs = []
    for name, recipe, lr in (("base", None, 5e-6), ("gspo", "gspo", 5e-6), ("gspo_lr", "gspo", 1e-6), ("cispo", "cispo", 5e-6)):
        write_run(tmp_path / name, 1, lr, GROUP_A[1], train_rows=False)
        config_path = tmp_path / name / "config.yaml"
        config_yaml = yaml.safe_load(config_path.read_text())
        if recipe is not None:  # what the overlay sets, beside the keys it changes (here: the loss)
            config_yaml["model"]["init_args"].update(recipe=recipe, loss={"policy_loss": recipe})
        config_path.write_text(yaml.safe_dump(config_yaml))
        runs.append(load_run(str(tmp_path / name)))
    # The recipe names the group; only what differs among one recipe's runs (the lr of the two
    # gspo runs) follows it, not every key the recipes change.
    assert [g.label for g in group_runs(runs)] == [
        "recipe=none", "recipe=gspo, model.init_args.lr=5e-06", "recipe=gspo, model.init_args.lr=1e-06",
        "recipe=cispo",
    ]


def test_missing_metrics_skip_figures_with_notice(runs_root: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "report_b"
    main([str(runs_root / "b"), "--out", str(out)])  # group b has only validation rows
    printed = capsys.readouterr().out
    assert "skipping train_accuracy.png: no run has reward/accuracy_epoch" in printed
    assert "skipping response_length.png: no run has rollout/response_length_mean" in printed
    assert "skipping reflection_words.png" in printed
    assert sorted(p.name for p in out.iterdir()) == ["eval_accuracy.png", "table.csv", "table.md"]


def test_run_without_config_is_its_own_group(tmp_path: Path, capsys) -> None:
    evals = {VAL8: (0.5, [0.5, 0.6, 0.7])}
    write_run(tmp_path / "lonely", seed=0, lr=None, evals=evals, train_rows=False)
    main([str(tmp_path / "lonely"), "--out", str(tmp_path / "out")])
    assert "has no config.yaml; it forms a group of its own" in capsys.readouterr().out
    assert "## lonely" in (tmp_path / "out" / "table.md").read_text()


def test_no_eval_metric_skips_table(tmp_path: Path, capsys) -> None:
    write_run(tmp_path / "train_only", seed=0, lr=5e-6, evals={}, train_rows=True)
    main([str(tmp_path / "train_only"), "--out", str(tmp_path / "out")])
    assert "skipping table.md/table.csv" in capsys.readouterr().out
    assert not (tmp_path / "out" / "table.md").exists()
    assert (tmp_path / "out" / "response_length.png").exists()


# directory contents (None: the path does not exist) -> what the error must say
BAD_DIRS = {
    "empty": ({}, "empty directory"),
    "foreign": ({"notes.txt": "x"}, "no metrics.jsonl in it or below"),
    "missing": (None, "not a directory"),
    "corrupt-metrics": (
        {"metrics.jsonl": '{"step": 0, "epoch": 0}\nxx\n'},
        "metrics.jsonl:2: not valid JSON",
    ),
    "bad-config": (
        {"metrics.jsonl": "", "config.yaml": "- a list\n"},
        "config.yaml: top level must be a mapping",
    ),
}


@pytest.mark.parametrize("case", BAD_DIRS)
def test_bad_directories_fail_clearly(tmp_path: Path, capsys, case: str) -> None:
    files, message = BAD_DIRS[case]
    run_dir = tmp_path / "run"
    if files is not None:
        run_dir.mkdir()
        for name, text in files.items():
            (run_dir / name).write_text(text)
    with pytest.raises(SystemExit) as exit_info:
        main([str(run_dir), "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("maye_pl report: error: ") and message in err
