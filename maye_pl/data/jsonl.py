"""MAYE-format jsonl splits: one JSON object per line, validated line by line.

The format (GAIR-NLP/MAYE ``README.md``, "Each sample follows the format")::

    {"question": "<image>In the figure, ... What is $B C ?$",
     "answer": "20",                       # short golden answer
     "solution": "\\boxed{20}",            # worked solution ending in \\boxed{...}
     "id": "geometry3k_2948",
     "image": "geometry3k_images/geometry3k_2948.png"}   # relative to the jsonl's directory

MAYE's files hold exactly one image per sample as a single path string (its dataset opens
``dataset_path.parent / sample["image"]``), so a list of images is rejected with a fix rather than
half-supported. Blank (whitespace-only) lines are skipped, so a trailing newline or a spacer line
never counts as a sample; their line numbers still count, so every ``path:line`` points into the
file as an editor shows it. Keys beyond the five are kept in ``Sample.extra`` so nothing is lost.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from maye_pl.errors import UserError

IMAGE_PLACEHOLDER = "<image>"
"""Marks where the figure goes in a MAYE question; removed from the text the model sees."""

REQUIRED_FIELDS = ("id", "question", "answer", "solution", "image")
"""Keys every line must carry, each a non-empty string."""


class DatasetError(UserError, ValueError):
    """Every problem found in one or more splits, one ``path:line: field: problem — fix`` each."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        count = len(self.problems)
        header = f"{count} problem{'s' if count != 1 else ''} in the dataset files:"
        super().__init__("\n".join([header, *(f"  {p}" for p in self.problems)]))


@dataclass(frozen=True)
class Sample:
    """One validated line of a MAYE jsonl split."""

    id: str
    """Unique within its split."""
    question: str
    """Question text, still holding its single ``<image>`` placeholder (prompts remove it)."""
    answer: str
    """Short golden answer, e.g. ``"20"`` or ``"9\\pi"``."""
    solution: str
    """Worked solution ending in ``\\boxed{answer}``."""
    image_path: Path
    """Absolute path of the figure (the file stores it relative to the jsonl's directory)."""
    source: str
    """``"<jsonl path>:<line>"``, for errors raised long after loading."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Keys beyond the five MAYE fields, kept verbatim."""

    def to_record(self, jsonl_dir: str | Path) -> dict[str, Any]:
        """The jsonl object this sample came from, ``image`` relative to ``jsonl_dir`` again."""
        image = self.image_path.relative_to(Path(jsonl_dir).resolve()).as_posix()
        core = {"question": self.question, "answer": self.answer, "solution": self.solution,
                "id": self.id, "image": image}
        return {**core, **self.extra}


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _check_image(path: Path) -> str | None:
    """None when Pillow can open and verify the file, else the reason it cannot."""
    try:
        with Image.open(path) as image:
            # verify() walks the file's chunks and checksums without decoding pixels: cheap enough
            # to run on every line of a split, and it catches truncated and corrupt files.
            image.verify()
    except Exception as exc:  # Pillow raises many unrelated types for bad files
        return f"{type(exc).__name__}: {exc}"
    return None


def _check_fields(record: dict[str, Any], where: str) -> list[str]:
    """Problems of the five fields' presence and types."""
    problems = []
    for name in REQUIRED_FIELDS:
        if name not in record:
            problems.append(f"{where}: {name}: missing field — add a non-empty string `{name}`")
            continue
        value = record[name]
        if name == "image" and isinstance(value, list):
            problems.append(
                f"{where}: image: a list of images is not supported ({_short(value)}) — MAYE files"
                " hold one relative path string per sample; keep one figure per line"
            )
        elif not isinstance(value, str):
            problems.append(
                f"{where}: {name}: must be a string, got {type(value).__name__} ({_short(value)})"
                f" — quote it, e.g. \"{name}\": \"{value}\""
            )
        elif not value.strip():
            problems.append(f"{where}: {name}: empty string ({_short(value)}) — give it a value")
    return problems


def _check_image_field(image: str, where: str, base_dir: Path) -> list[str]:
    image_path = base_dir / image
    if Path(image).is_absolute():
        return [
            f"{where}: image: absolute path ({_short(image)}) — MAYE image paths are relative to"
            f" the jsonl's directory {base_dir}; make it relative"
        ]
    if not image_path.is_file():
        return [
            f"{where}: image: file not found ({_short(image)}, looked at {image_path}) — place the"
            " image there or fix the path (relative to the jsonl's directory)"
        ]
    if (reason := _check_image(image_path)) is not None:
        return [
            f"{where}: image: unreadable image ({_short(image)}: {reason}) — re-export it as"
            " PNG or JPEG"
        ]
    return []


def _check_question(question: str, where: str) -> list[str]:
    placeholders = question.count(IMAGE_PLACEHOLDER)
    if placeholders == 0:
        return [
            f"{where}: question: no {IMAGE_PLACEHOLDER} placeholder ({_short(question)})"
            f" — mark the figure's place with {IMAGE_PLACEHOLDER}, e.g. at the start"
        ]
    if placeholders > 1:
        return [
            f"{where}: question: {placeholders} {IMAGE_PLACEHOLDER} placeholders but 1 image"
            f" ({_short(question)}) — keep exactly one {IMAGE_PLACEHOLDER}"
        ]
    return []


def _check_record(record: dict[str, Any], where: str, base_dir: Path) -> list[str]:
    """Problems of one parsed line (empty when the line is a valid sample)."""
    problems = _check_fields(record, where)

    def usable(name: str) -> bool:  # present, a string and non-empty: its content can be checked
        return isinstance(record.get(name), str) and bool(record[name].strip())

    if usable("image"):
        problems += _check_image_field(record["image"], where, base_dir)
    if usable("question"):
        problems += _check_question(record["question"], where)
    return problems


def _collect_split(path: str | Path) -> tuple[list[Sample], list[str]]:
    """Parse and check every line of one split; returns the valid samples and all problems."""
    path = Path(path)
    if not path.is_file():
        what = "is a directory" if path.is_dir() else "file not found"
        return [], [f"{path}: (file): {what} — point the split at an existing .jsonl file"]

    base_dir = path.resolve().parent
    samples: list[Sample] = []
    problems: list[str] = []
    first_seen: dict[str, str] = {}
    non_blank = 0
    with path.open("rb") as handle:  # bytes: an undecodable line is one problem, not a traceback
        for line_no, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue
            non_blank += 1
            where = f"{path}:{line_no}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                problems.append(
                    f"{where}: (encoding): not UTF-8 (byte {raw[exc.start]:#04x} at"
                    f" byte {exc.start + 1} of the line) — save the file as UTF-8"
                    " (e.g. `iconv -f latin1 -t utf-8`)"
                )
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                problems.append(
                    f"{where}: (json): malformed JSON ({exc.msg} at column {exc.colno})"
                    " — write one complete JSON object per line"
                )
                continue
            if not isinstance(record, dict):
                problems.append(
                    f"{where}: (line): not a JSON object (got {type(record).__name__}:"
                    f" {_short(record)}) — write one {{...}} object per line"
                )
                continue

            record_problems = _check_record(record, where, base_dir)
            sample_id = record.get("id")
            if isinstance(sample_id, str) and sample_id.strip():
                if sample_id in first_seen:
                    record_problems.append(
                        f"{where}: id: duplicate id ({_short(sample_id)}, first at"
                        f" {first_seen[sample_id]}) — ids must be unique within a split; rename one"
                    )
                else:
                    first_seen[sample_id] = where
            if record_problems:
                problems.extend(record_problems)
                continue

            extra = {k: v for k, v in record.items() if k not in REQUIRED_FIELDS}
            samples.append(
                Sample(id=record["id"], question=record["question"], answer=record["answer"],
                       solution=record["solution"], image_path=base_dir / record["image"],
                       source=where, extra=extra)
            )
    if non_blank == 0:
        problems.append(f"{path}: (file): empty split, no samples — add samples or drop the split")
    return samples, problems


def load_split(path: str | Path) -> list[Sample]:
    """Load one MAYE jsonl split, validating every line.

    Raises:
        DatasetError: listing every problem of the file (not just the first), each as
            ``path:line: field: problem (value) — fix``.
    """
    return load_splits({"split": path})["split"]


def load_splits(paths: Mapping[str, str | Path]) -> dict[str, list[Sample]]:
    """Load several splits (name → path), collecting the problems of ALL of them into one error.

    Raises:
        DatasetError: every problem of every split, so one run shows everything to fix.
    """
    loaded: dict[str, list[Sample]] = {}
    problems: list[str] = []
    for name, path in paths.items():
        loaded[name], split_problems = _collect_split(path)
        problems.extend(split_problems)
    if problems:
        raise DatasetError(problems)
    return loaded
