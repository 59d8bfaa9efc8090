"""The synthetic geometry set: byte-identical for a seed, written atomically, vision-dominant
(no number in any question), balanced, disjoint across splits, valid MAYE jsonl, golden answers
accepted by the project's judge, and the CLI over it; the demo's shaded-area kind: the answer is
the count of shaded cells in the pixels, an sft split apart from the others, a stale set replaced."""

import hashlib
import json
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

import maye_pl.data.geometry as geometry
from maye_pl.data import ensure_geometry_dataset, generate_geometry_dataset, load_split

COUNTS = {"n_train": 18, "n_val": 6, "n_test": 6}


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


@pytest.fixture(scope="module")
def geo(tmp_path_factory) -> dict[str, Path]:
    return generate_geometry_dataset(tmp_path_factory.mktemp("geo") / "set", **COUNTS, seed=0)


def test_same_seed_same_bytes_other_seed_other_bytes(geo, tmp_path):
    again = generate_geometry_dataset(tmp_path / "again", **COUNTS, seed=0)
    other = generate_geometry_dataset(tmp_path / "other", **COUNTS, seed=1)
    reference = _tree(geo["train"].parent)
    assert len(reference) == 18 + 6 + 6 + 3 + 1  # images, three jsonl files, manifest
    assert _tree(again["train"].parent) == reference
    assert _tree(other["train"].parent) != reference


def test_interrupted_run_leaves_nothing(tmp_path, monkeypatch):
    out = tmp_path / "set"
    real_write_split = geometry._write_split

    def write_then_die(root, split, problems):
        real_write_split(root, split, problems)
        assert not out.exists()  # nothing is visible at out_dir while writing
        raise KeyboardInterrupt

    monkeypatch.setattr(geometry, "_write_split", write_then_die)
    with pytest.raises(KeyboardInterrupt):
        generate_geometry_dataset(out, **COUNTS)
    assert list(tmp_path.iterdir()) == []  # no out_dir, no temporary directory


def test_questions_hold_no_numbers(geo):
    for path in geo.values():
        for sample in load_split(path):
            assert not any(ch.isdigit() for ch in sample.question), sample.question
            assert sample.question.count("<image>") == 1


def test_splits_are_valid_balanced_and_disjoint(geo):
    splits = {name: load_split(path) for name, path in geo.items()}
    assert {name: len(s) for name, s in splits.items()} == {"train": 18, "val": 6, "test": 6}
    for samples in splits.values():
        assert Counter(s.extra["kind"] for s in samples) == Counter(
            {kind: len(samples) // 6 for kind in geometry.LABELLED_KINDS})
        for s in samples:
            assert s.solution.endswith(f"$\\boxed{{{s.answer}}}$.")
    # each problem is used once in the whole set: no (question, figure) pair repeats (area and
    # perimeter questions may share a figure)
    digests = [(s.question, hashlib.sha256(s.image_path.read_bytes()).hexdigest())
               for samples in splits.values() for s in samples]
    assert len(set(digests)) == len(digests)


def test_answers_match_the_drawn_numbers():
    # hand-checked: legs 3, 4 -> 5; sides 4, 6 -> area 24, perimeter 20; radius 3 -> 9pi, 6pi;
    # angles 60, 80 -> 40; radius 1 -> area is written \pi, not 1\pi
    kinds = geometry.KINDS
    assert kinds["hypotenuse"].answer(3, 4) == "5"
    assert kinds["rectangle_area"].answer(4, 6) == "24"
    assert kinds["rectangle_perimeter"].answer(4, 6) == "20"
    assert kinds["circle_area"].answer(3) == "9\\pi"
    assert kinds["circle_circumference"].answer(3) == "6\\pi"
    assert kinds["third_angle"].answer(60, 80) == "40"
    assert kinds["circle_area"].answer(1) == "\\pi"
    assert all(a * a + b * b == int(kinds["hypotenuse"].answer(a, b)) ** 2
               for a, b in kinds["hypotenuse"].pool())


def test_every_golden_answer_and_solution_passes_the_judge(geo):
    from maye_pl.rewards import math_judge

    answers = {kind.answer(*params) for kind in geometry.KINDS.values() for params in kind.pool()}
    assert [a for a in sorted(answers) if not math_judge(f"\\boxed{{{a}}}", a)] == []
    samples = [s for path in geo.values() for s in load_split(path)]
    assert [s.id for s in samples if not math_judge(s.solution, s.answer)] == []


def test_ensure_reuses_a_matching_set_and_refuses_another(geo, tmp_path):
    root = geo["train"].parent
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*")}
    assert ensure_geometry_dataset(root, **COUNTS, seed=0) == geo
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*")} == before
    with pytest.raises(ValueError, match=r"seed: found 0, wanted 3"):
        ensure_geometry_dataset(root, **COUNTS, seed=3)
    fresh = ensure_geometry_dataset(tmp_path / "fresh", n_train=6, n_val=0, n_test=0)
    assert list(fresh) == ["train"]  # a split with no samples gets no file


def test_refuses_to_overwrite_and_to_exceed_the_problem_pool(geo, tmp_path):
    with pytest.raises(FileExistsError, match="already exists"):
        generate_geometry_dataset(geo["train"].parent, **COUNTS)
    capacity = sum(len(geometry.KINDS[kind].pool()) for kind in geometry.LABELLED_KINDS)
    with pytest.raises(ValueError, match=f"exceeds the {capacity} distinct"):
        generate_geometry_dataset(tmp_path / "big", n_train=capacity, n_val=1, n_test=0)


def test_cli(tmp_path, capsys):
    import importlib.util

    script = Path(__file__).resolve().parents[2] / "scripts" / "make_synthetic_geometry.py"
    spec = importlib.util.spec_from_file_location("make_synthetic_geometry", script)
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    out = tmp_path / "cli"
    args = ["--out", str(out), "--n-train", "6", "--n-val", "6", "--n-test", "0"]
    paths = cli.main(args)
    assert capsys.readouterr().out.splitlines() == [f"train: {out / 'train.jsonl'}",
                                                     f"val: {out / 'validation.jsonl'}"]
    assert json.loads((out / "manifest.json").read_text())["n_val"] == 6
    assert cli.main([*args, "--reuse"]) == paths
    with pytest.raises(SystemExit):
        cli.main(args)  # exists, no --reuse


def test_shaded_area_answers_are_in_the_pixels_and_the_sft_split_stands_apart(tmp_path):
    """Each answer equals the number of grid cells whose centre pixel is shaded (read back from the
    PNG, cells 28 px apart); the answers 3..6 are about equally frequent; the four splits share no
    figure; the manifest records the kinds and the sft split."""
    paths = generate_geometry_dataset(tmp_path / "grid", n_train=90, n_val=9, n_test=9, n_sft=18,
                                      kinds=("shaded_area",), seed=0)
    assert sorted(paths) == ["sft", "test", "train", "val"]
    splits = {name: load_split(path) for name, path in paths.items()}
    figures = []
    for samples in splits.values():
        for s in samples:
            with Image.open(s.image_path) as image:
                pixels = image.convert("RGB")
                figures.append(pixels.tobytes())
                shaded = sum(pixels.getpixel((col * 28 + 14, row * 28 + 14)) == (90, 90, 90)
                             for row in range(4) for col in range(4))
            assert s.answer == str(shaded) and s.solution == f"The area is \\boxed{{{shaded}}}."
            assert not any(ch.isdigit() for ch in s.question)
    assert len(set(figures)) == len(figures) == 126
    answers = Counter(s.answer for s in splits["train"])
    assert set(answers) == {str(k) for k in range(3, 7)} and max(answers.values()) <= 3 * min(answers.values())
    manifest = json.loads((tmp_path / "grid" / "manifest.json").read_text())
    assert manifest["kinds"] == ["shaded_area"] and manifest["n_sft"] == 18


def test_ensure_replaces_a_stale_set_only_when_asked(geo, tmp_path):
    """replace=True regenerates a set made with other arguments (the demo's own directory);
    without it the mismatch is an error naming the differing keys, sft and kinds included."""
    root = tmp_path / "set"
    generate_geometry_dataset(root, **COUNTS)
    wanted = {**COUNTS, "n_sft": 6, "kinds": ("shaded_area",)}
    with pytest.raises(ValueError, match=r"kinds: found None, wanted \['shaded_area'\]; n_sft: found None, wanted 6"):
        ensure_geometry_dataset(root, **wanted)
    paths = ensure_geometry_dataset(root, **wanted, replace=True)
    assert load_split(paths["sft"])[0].extra["kind"] == "shaded_area"
    assert [p.name for p in tmp_path.iterdir()] == ["set"]  # the stale set is gone, no leftovers
    with pytest.raises(ValueError, match="kinds=\\['circle'\\] must name distinct kinds"):
        generate_geometry_dataset(tmp_path / "bad", n_train=1, n_val=0, n_test=0, kinds=("circle",))
