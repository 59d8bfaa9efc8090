"""load_split / load_splits: every bad line is reported as path:line: field: problem, all at once,
blank lines are skipped, and a clean file round-trips every field (extras included)."""

import json
from pathlib import Path

import pytest
from PIL import Image

from maye_pl.data import DatasetError, load_split, load_splits


def _good(i: int = 0, **changes) -> dict:
    record = {"question": "<image>Find the area of the rectangle in the figure.", "answer": "24",
              "solution": "The area is $4 \\times 6 = 24$. $\\boxed{24}$", "id": f"s{i}",
              "image": "images/a.png"}
    record.update(changes)
    return record


def _write(tmp_path: Path, lines: list, name: str = "split.jsonl") -> Path:
    (tmp_path / "images").mkdir(exist_ok=True)
    Image.new("RGB", (16, 16), "white").save(tmp_path / "images" / "a.png")
    path = tmp_path / name
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


def _problems(path: Path) -> list[str]:
    with pytest.raises(DatasetError) as info:
        load_split(path)
    assert str(info.value).count("\n") == len(info.value.problems)  # header + one line each
    return info.value.problems


def test_round_trip_keeps_every_field(tmp_path):
    records = [_good(0), _good(1, kind="rectangle_area", difficulty=3)]
    path = _write(tmp_path, records)
    samples = load_split(path)
    assert [s.to_record(tmp_path) for s in samples] == records
    assert samples[1].extra == {"kind": "rectangle_area", "difficulty": 3}
    assert samples[0].image_path == (tmp_path / "images" / "a.png").resolve()
    assert samples[1].source == f"{path}:2"


def test_blank_lines_are_skipped_and_line_numbers_stay_true(tmp_path):
    path = _write(tmp_path, ["", _good(0), "   ", _good(1, answer=7)])
    assert _problems(path) == [
        f'{path}:4: answer: must be a string, got int (7) — quote it, e.g. "answer": "7"'
    ]
    path = _write(tmp_path, ["", _good(0), "   ", _good(1)])
    assert [s.source for s in load_split(path)] == [f"{path}:2", f"{path}:4"]


BAD_LINES = {
    # case: (line as written, field, words the problem must contain)
    "malformed_json": ('{"id": "s0", "question": ', "(json)", "malformed JSON"),
    "not_an_object": ('["a", "list"]', "(line)", "not a JSON object (got list"),
    "missing_field": ({k: v for k, v in _good(1).items() if k != "solution"}, "solution",
                      "missing field"),
    "empty_field": (_good(1, answer="  "), "answer", "empty string"),
    "non_string_field": (_good(1, id=17), "id", "must be a string, got int (17)"),
    "image_list": (_good(1, image=["images/a.png"]), "image", "a list of images is not supported"),
    "missing_image": (_good(1, image="images/nope.png"), "image",
                      "file not found ('images/nope.png'"),
    "absolute_image": (_good(1, image="/abs/a.png"), "image", "absolute path ('/abs/a.png')"),
    "no_placeholder": (_good(1, question="Find the area."), "question", "no <image> placeholder"),
    "two_placeholders": (_good(1, question="<image><image>Find it."), "question",
                         "2 <image> placeholders but 1 image"),
}


@pytest.mark.parametrize("case", sorted(BAD_LINES))
def test_bad_line_is_reported_with_file_line_field(tmp_path, case):
    line, field, words = BAD_LINES[case]
    path = _write(tmp_path, [_good(0), line])
    (problem,) = _problems(path)
    assert problem.startswith(f"{path}:2: {field}: ")
    assert words in problem
    assert " — " in problem  # every problem carries its fix


def test_corrupt_image(tmp_path):
    path = _write(tmp_path, [_good(0, image="images/bad.png")])
    png = (tmp_path / "images" / "a.png").read_bytes()
    (tmp_path / "images" / "bad.png").write_bytes(png[: len(png) // 2])  # truncated
    (problem,) = _problems(path)
    assert problem.startswith(f"{path}:1: image: unreadable image ('images/bad.png': ")


def test_duplicate_id_names_the_first_occurrence(tmp_path):
    path = _write(tmp_path, [_good(0), _good(1), _good(0)])
    assert _problems(path) == [
        f"{path}:3: id: duplicate id ('s0', first at {path}:1) — ids must be unique within a"
        " split; rename one"
    ]


def test_empty_split(tmp_path):
    path = _write(tmp_path, ["", "  "])
    assert _problems(path) == [
        f"{path}: (file): empty split, no samples — add samples or drop the split"
    ]


def test_missing_file(tmp_path):
    assert _problems(tmp_path / "nope.jsonl") == [
        f"{tmp_path / 'nope.jsonl'}: (file): file not found — point the split at an existing"
        " .jsonl file"
    ]


def test_every_bad_line_of_a_file_is_listed(tmp_path):
    lines = [_good(0), "{oops", _good(2, answer=""), _good(3, image="images/gone.png"),
             _good(4, question="no tag", id="s0"), _good(5)]
    path = _write(tmp_path, lines)
    located = [p.split(": ")[0] + ": " + p.split(": ")[1] for p in _problems(path)]
    assert located == [f"{path}:2: (json)", f"{path}:3: answer", f"{path}:4: image",
                       f"{path}:5: question", f"{path}:5: id"]


def test_load_splits_collects_problems_of_all_splits(tmp_path):
    train = _write(tmp_path, [_good(0), _good(1, answer=1)], "train.jsonl")
    val = _write(tmp_path, ["[]"], "val.jsonl")
    with pytest.raises(DatasetError) as info:
        load_splits({"train": train, "val": val, "test": tmp_path / "missing.jsonl"})
    assert [p.split(": ")[0] for p in info.value.problems] == [
        f"{train}:2", f"{val}:1", str(tmp_path / "missing.jsonl")
    ]


def test_a_non_utf8_line_is_one_located_problem_and_the_rest_still_load(tmp_path):
    """A Latin-1 byte (0xe9, 'é') in line 2 is reported as path:2 with the byte and its offset
    (the '{"question": "<image>Caf' prefix is 24 bytes, so the byte is the 25th); lines 1 and 3
    are still checked, so a bad line 3 shows in the same error."""
    path = _write(tmp_path, [_good(0), "", _good(2, answer="")])
    lines = path.read_bytes().split(b"\n")
    lines[1] = b'{"question": "<image>Caf\xe9", "answer": "1"}'
    path.write_bytes(b"\n".join(lines))
    assert _problems(path) == [
        f"{path}:2: (encoding): not UTF-8 (byte 0xe9 at byte 25 of the line) — save the file as"
        " UTF-8 (e.g. `iconv -f latin1 -t utf-8`)",
        f"{path}:3: answer: empty string ('') — give it a value",
    ]
