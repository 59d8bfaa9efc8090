"""Synthetic vision-dominant geometry problems in MAYE jsonl format (the demo's and tests' data).

"Vision-dominant": every number the solver needs is in the figure only; the question text holds
none ("Find the length of the hypotenuse of the right triangle in the figure."), so a policy can
only improve by reading the image. Five figure families, seven question kinds:

    right triangle  hypotenuse from the two labelled legs (Pythagorean triples)   "5"
    rectangle       area / perimeter from the labelled sides                      "24" / "20"
    circle          area / circumference from the labelled radius                 "9\\pi" / "6\\pi"
    triangle        third angle from two labelled angles, in degrees              "40"
    unit grid       area of the shaded cells of a 4x4 grid of unit squares        "6"

The first six (``LABELLED_KINDS``, the default) need a label read and some arithmetic. The grid
(``"shaded_area"``) is the CPU demo's task: its cells are the vision tokens of a tiny Qwen-VL
(28 px, one 2x2 merge of 14 px patches), so a tiny policy learns to count them in minutes.

Each (kind, numbers) problem appears at most once in the whole set, so no split repeats another's
problem. Output (deterministic from the seed, byte for byte)::

    out_dir/train.jsonl, validation.jsonl, test.jsonl, sft.jsonl   (a split with 0 samples: no file)
    out_dir/images/<id>.png                                        112x112 RGB
    out_dir/manifest.json                                          the arguments, for ensure_geometry_dataset
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

SIZE = 112
"""Image side in pixels."""
MARGIN = 18
"""Room left around a figure for its labels, in pixels."""
SPLIT_FILES = {"train": "train.jsonl", "val": "validation.jsonl", "test": "test.jsonl", "sft": "sft.jsonl"}
"""Split name → file name ("sft": the SFT warm start's own problems, kept apart from RL's "train")."""
GENERATOR_VERSION = 2
"""Bump when the output for a given seed changes, so ensure_geometry_dataset regenerates."""


@lru_cache(maxsize=1)
def _font() -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=12)


@dataclass(frozen=True)
class _Kind:
    """One question kind: its parameter pool, texts and figure."""

    question: str
    pool: Callable[[], list[tuple[int, ...]]]
    answer: Callable[..., str]
    solution: Callable[..., str]
    draw: Callable[..., None]


def _label(draw: ImageDraw.ImageDraw, xy: tuple[float, float], text: str) -> None:
    draw.text(xy, text, font=_font(), fill="black", anchor="mm")


def _fit(points: list[tuple[float, float]], margin: int = MARGIN) -> list[tuple[float, float]]:
    """Scale and centre a figure (math coordinates, y up) into the canvas (y down)."""
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    width, height = max(xs) - min(xs), max(ys) - min(ys)
    scale = (SIZE - 2 * margin) / max(width, height)
    dx = (SIZE - width * scale) / 2 - min(xs) * scale
    dy = (SIZE - height * scale) / 2 + max(ys) * scale
    return [(x * scale + dx, dy - y * scale) for x, y in points]


Point = tuple[float, float]


def _offset(point: Point, toward: Point, dist: float) -> Point:
    """``point`` moved ``dist`` pixels toward ``toward`` (negative: away from it)."""
    vx, vy = toward[0] - point[0], toward[1] - point[1]
    norm = math.hypot(vx, vy) or 1.0
    return point[0] + vx / norm * dist, point[1] + vy / norm * dist


# --- right triangle: hypotenuse ---------------------------------------------------------------

def _triples() -> list[tuple[int, ...]]:
    # Primitive triples and their multiples up to a hypotenuse of 50; both leg orders, since
    # swapping which leg is vertical gives a different figure with the same answer.
    primitive = [(3, 4, 5), (5, 12, 13), (8, 15, 17), (7, 24, 25), (20, 21, 29), (12, 35, 37),
                 (9, 40, 41)]
    legs = [(a * k, b * k) for a, b, c in primitive for k in range(1, 50 // c + 1)]
    return legs + [(b, a) for a, b in legs]


def _draw_right_triangle(draw: ImageDraw.ImageDraw, a: int, b: int) -> None:
    # Right angle at the bottom left; ``a`` the vertical leg, ``b`` the horizontal one.
    corner, top, right = _fit([(0, 0), (0, a), (b, 0)])
    draw.polygon([corner, top, right], outline="black", width=2)
    draw.rectangle([corner[0], corner[1] - 6, corner[0] + 6, corner[1]], outline="black")
    centroid = ((corner[0] + top[0] + right[0]) / 3, (corner[1] + top[1] + right[1]) / 3)
    _label(draw, (corner[0] - 9, (corner[1] + top[1]) / 2), str(a))
    _label(draw, ((corner[0] + right[0]) / 2, corner[1] + 9), str(b))
    _label(draw, _offset(((top[0] + right[0]) / 2, (top[1] + right[1]) / 2), centroid, -9), "?")


HYPOTENUSE = _Kind(
    question="<image>Find the length of the hypotenuse of the right triangle in the figure.",
    pool=_triples,
    answer=lambda a, b: str(math.isqrt(a * a + b * b)),
    solution=lambda a, b: (
        f"The legs are {a} and {b}, so by the Pythagorean theorem the hypotenuse is "
        f"$\\sqrt{{{a}^2 + {b}^2}} = \\sqrt{{{a * a + b * b}}} = {math.isqrt(a * a + b * b)}$. "
        f"The answer is $\\boxed{{{math.isqrt(a * a + b * b)}}}$."
    ),
    draw=_draw_right_triangle,
)


# --- rectangle: area, perimeter ---------------------------------------------------------------

def _sides() -> list[tuple[int, ...]]:
    return [(w, h) for w in range(2, 16) for h in range(2, 16)]


def _draw_rectangle(draw: ImageDraw.ImageDraw, w: int, h: int) -> None:
    (x0, y1), (x1, y0) = _fit([(0, 0), (w, h)])
    draw.rectangle([x0, y0, x1, y1], outline="black", width=2)
    _label(draw, ((x0 + x1) / 2, y1 + 9), str(w))
    _label(draw, (x1 + 9, (y0 + y1) / 2), str(h))


RECTANGLE_AREA = _Kind(
    question="<image>Find the area of the rectangle in the figure.",
    pool=_sides,
    answer=lambda w, h: str(w * h),
    solution=lambda w, h: (
        f"The sides are {w} and {h}, so the area is ${w} \\times {h} = {w * h}$. "
        f"The answer is $\\boxed{{{w * h}}}$."
    ),
    draw=_draw_rectangle,
)
RECTANGLE_PERIMETER = _Kind(
    question="<image>Find the perimeter of the rectangle in the figure.",
    pool=_sides,
    answer=lambda w, h: str(2 * (w + h)),
    solution=lambda w, h: (
        f"The sides are {w} and {h}, so the perimeter is $2 \\times ({w} + {h}) = {2 * (w + h)}$. "
        f"The answer is $\\boxed{{{2 * (w + h)}}}$."
    ),
    draw=_draw_rectangle,
)


# --- circle: area, circumference --------------------------------------------------------------

def _radii() -> list[tuple[int, ...]]:
    return [(r,) for r in range(1, 21)]


def _pi_multiple(k: int) -> str:
    return "\\pi" if k == 1 else f"{k}\\pi"


def _draw_circle(draw: ImageDraw.ImageDraw, r: int) -> None:
    # Drawn the same size whatever r is: only the label carries the number.
    c, px = SIZE / 2, SIZE / 2 - MARGIN
    draw.ellipse([c - px, c - px, c + px, c + px], outline="black", width=2)
    draw.ellipse([c - 2, c - 2, c + 2, c + 2], fill="black")
    draw.line([(c, c), (c + px, c)], fill="black", width=2)
    _label(draw, (c + px / 2, c - 8), str(r))


CIRCLE_AREA = _Kind(
    question=("<image>The segment drawn from the center of the circle in the figure is a radius. "
              "Find the area of the circle. Express your answer in terms of $\\pi$."),
    pool=_radii,
    answer=lambda r: _pi_multiple(r * r),
    solution=lambda r: (
        f"The radius is {r}, so the area is "
        f"$\\pi r^2 = \\pi \\times {r}^2 = {_pi_multiple(r * r)}$. "
        f"The answer is $\\boxed{{{_pi_multiple(r * r)}}}$."
    ),
    draw=_draw_circle,
)
CIRCLE_CIRCUMFERENCE = _Kind(
    question=("<image>The segment drawn from the center of the circle in the figure is a radius. "
              "Find the circumference of the circle. Express your answer in terms of $\\pi$."),
    pool=_radii,
    answer=lambda r: _pi_multiple(2 * r),
    solution=lambda r: (
        f"The radius is {r}, so the circumference is $2 \\pi r = 2 \\times {r} \\pi = "
        f"{_pi_multiple(2 * r)}$. The answer is $\\boxed{{{_pi_multiple(2 * r)}}}$."
    ),
    draw=_draw_circle,
)


# --- triangle: third angle --------------------------------------------------------------------

def _angle_pairs() -> list[tuple[int, ...]]:
    # Multiples of 5 with every angle at least 25 degrees, so each is visibly an angle.
    return [(a, b) for a in range(25, 135, 5) for b in range(25, 135, 5) if 180 - a - b >= 25]


def _draw_angle_triangle(draw: ImageDraw.ImageDraw, a: int, b: int) -> None:
    # Base AB on the x axis with the given angles at A and B; C from the law of sines.
    ra, rb = math.radians(a), math.radians(b)
    ac = math.sin(rb) / math.sin(ra + rb)
    pa, pb, pc = _fit([(0, 0), (1, 0), (ac * math.cos(ra), ac * math.sin(ra))], margin=24)
    draw.polygon([pa, pb, pc], outline="black", width=2)
    # Arcs mark the angles; labels sit outside, where flat triangles leave no room inside.
    # PIL's arc angles run clockwise from 3 o'clock, i.e. minus the math angle (y points down).
    draw.arc([pa[0] - 9, pa[1] - 9, pa[0] + 9, pa[1] + 9], 360 - a, 360, fill="black")
    draw.arc([pb[0] - 9, pb[1] - 9, pb[0] + 9, pb[1] + 9], 180, 180 + b, fill="black")
    centroid = ((pa[0] + pb[0] + pc[0]) / 3, (pa[1] + pb[1] + pc[1]) / 3)
    _label(draw, _offset(pa, centroid, -13), f"{a}°")
    _label(draw, _offset(pb, centroid, -13), f"{b}°")
    _label(draw, _offset(pc, centroid, -10), "x")


THIRD_ANGLE = _Kind(
    question="<image>Find the measure of angle $x$ of the triangle in the figure, in degrees.",
    pool=_angle_pairs,
    answer=lambda a, b: str(180 - a - b),
    solution=lambda a, b: (
        f"The angles of a triangle sum to 180 degrees, so $x = 180 - {a} - {b} = {180 - a - b}$. "
        f"The answer is $\\boxed{{{180 - a - b}}}$."
    ),
    draw=_draw_angle_triangle,
)


# --- unit grid: shaded area -------------------------------------------------------------------

GRID = 4
"""Cells per side of the shaded-area grid; a cell is SIZE / GRID = 28 px, one merged vision token."""
SHADED_COUNTS = range(3, 7)
"""How many cells a figure shades: the answers 3 ... 6."""
_SHADINGS_PER_COUNT = 400
"""Distinct shadings per count (of the 560 ways to shade 3 of the 16 cells), so answers are equally frequent."""


def _shadings() -> list[tuple[int, ...]]:
    # _SHADINGS_PER_COUNT distinct sets of shaded cells (row-major indices) per count, drawn by a
    # fixed generator; the dataset seed shuffles them.
    rng = random.Random(GRID)
    pool = []
    for count in SHADED_COUNTS:
        chosen: set[tuple[int, ...]] = set()
        while len(chosen) < _SHADINGS_PER_COUNT:
            chosen.add(tuple(sorted(rng.sample(range(GRID * GRID), count))))
        pool += sorted(chosen)
    return pool


def _draw_shaded_grid(draw: ImageDraw.ImageDraw, *cells: int) -> None:
    # Every cell fills one merged vision token exactly: shading inset 2 px, grid lines on top.
    cell = SIZE // GRID
    for index in cells:
        row, col = divmod(index, GRID)
        draw.rectangle([col * cell + 2, row * cell + 2, (col + 1) * cell - 2, (row + 1) * cell - 2],
                       fill=(90, 90, 90))
    for i in range(GRID + 1):
        edge = min(i * cell, SIZE - 1)
        draw.line([(edge, 0), (edge, SIZE - 1)], fill="black")
        draw.line([(0, edge), (SIZE - 1, edge)], fill="black")


SHADED_AREA = _Kind(
    question="<image>The grid in the figure is made of unit squares. Find the area of the shaded region.",
    pool=_shadings,
    answer=lambda *cells: str(len(cells)),
    solution=lambda *cells: f"The area is \\boxed{{{len(cells)}}}.",
    draw=_draw_shaded_grid,
)

KINDS = {
    "hypotenuse": HYPOTENUSE,
    "rectangle_area": RECTANGLE_AREA,
    "rectangle_perimeter": RECTANGLE_PERIMETER,
    "circle_area": CIRCLE_AREA,
    "circle_circumference": CIRCLE_CIRCUMFERENCE,
    "third_angle": THIRD_ANGLE,
    "shaded_area": SHADED_AREA,
}
"""Question kind → its definition; the jsonl's extra ``kind`` field names it."""
LABELLED_KINDS = tuple(KINDS)[:6]
"""The kinds whose numbers are labels in the figure (the default set)."""


# --- the dataset ------------------------------------------------------------------------------

def _problems(total: int, seed: int, kinds: Sequence[str]) -> list[tuple[str, tuple[int, ...]]]:
    """``total`` distinct (kind, params), the kinds interleaved so every split stays balanced."""
    rng = random.Random(seed)
    pools = {}
    for name in kinds:
        pools[name] = KINDS[name].pool()
        rng.shuffle(pools[name])
    capacity = sum(len(p) for p in pools.values())
    if total > capacity:
        raise ValueError(
            f"n_train + n_val + n_test + n_sft = {total} exceeds the {capacity} distinct synthetic"
            f" problems of kinds {list(kinds)}; ask for at most {capacity} samples in all"
        )
    interleaved = []
    for depth in range(max(len(p) for p in pools.values())):
        interleaved += [(name, pool[depth]) for name, pool in pools.items() if depth < len(pool)]
    return interleaved[:total]


def _write_split(root: Path, split: str, problems: list[tuple[str, tuple[int, ...]]]) -> None:
    lines = []
    for index, (name, params) in enumerate(problems):
        kind = KINDS[name]
        sample_id = f"geometry_synth_{split}_{index:05d}"
        image = Image.new("RGB", (SIZE, SIZE), "white")
        kind.draw(ImageDraw.Draw(image), *params)
        image.save(root / "images" / f"{sample_id}.png", format="PNG")
        record = {"question": kind.question, "answer": kind.answer(*params),
                  "solution": kind.solution(*params), "id": sample_id,
                  "image": f"images/{sample_id}.png", "kind": name}
        lines.append(json.dumps(record, ensure_ascii=False))
    (root / SPLIT_FILES[split]).write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")


def _manifest(counts: dict[str, int], seed: int, kinds: Sequence[str]) -> dict:
    # Keys for the non-default kinds and the sft split only when used, so sets generated before
    # they existed keep their manifests.
    manifest = {"generator": "maye_pl.data.geometry", "version": GENERATOR_VERSION, "seed": seed,
                **{f"n_{split}": n for split, n in counts.items() if split != "sft" or n}}
    return manifest if tuple(kinds) == LABELLED_KINDS else {**manifest, "kinds": list(kinds)}


def _split_paths(out_dir: Path, counts: dict[str, int]) -> dict[str, Path]:
    return {split: out_dir / SPLIT_FILES[split] for split, n in counts.items() if n > 0}


def _check_arguments(counts: dict[str, int], kinds: Sequence[str]) -> None:
    bad = [f"n_{split}={n}" for split, n in counts.items() if n < 0 or (split == "train" and n < 1)]
    if bad:
        raise ValueError(
            f"sample counts {', '.join(bad)} are invalid; n_train must be at least 1 and n_val,"
            " n_test, n_sft at least 0"
        )
    unknown = [kind for kind in kinds if kind not in KINDS]
    if unknown or not kinds or len(set(kinds)) != len(kinds):
        raise ValueError(f"kinds={list(kinds)} must name distinct kinds among {list(KINDS)}")


def generate_geometry_dataset(
    out_dir: str | Path, *, n_train: int, n_val: int, n_test: int, n_sft: int = 0,
    kinds: Sequence[str] = LABELLED_KINDS, seed: int = 0,
) -> dict[str, Path]:
    """Render a fresh synthetic geometry set into ``out_dir`` (which must not exist yet).

    Everything is written into a temporary sibling directory that is renamed to ``out_dir`` at
    the end, so an interrupted run never leaves a half-written ``out_dir``. The splits take
    consecutive problems in the order train, val, test, sft, so adding an sft split leaves the
    others' bytes as they were.

    Args:
        n_train, n_val, n_test, n_sft: samples per split (0: no file).
        kinds: question kinds (``KINDS`` keys), interleaved in this order.
        seed: shuffles each kind's problems.

    Returns:
        split name ("train", "val", "test", "sft"; only those with samples) → jsonl path.

    Raises:
        FileExistsError: ``out_dir`` exists.
        ValueError: a negative count, no training samples, an unknown kind, or more samples
            than distinct problems.
    """
    out_dir = Path(out_dir)
    counts = {"train": n_train, "val": n_val, "test": n_test, "sft": n_sft}
    _check_arguments(counts, kinds)
    if out_dir.exists():
        raise FileExistsError(
            f"{out_dir} already exists; delete it to regenerate, or call ensure_geometry_dataset"
            " to reuse it"
        )
    problems = _problems(sum(counts.values()), seed, kinds)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        (tmp / "images").mkdir()
        start = 0
        for split, n in counts.items():
            if n > 0:
                _write_split(tmp, split, problems[start:start + n])
            start += n
        (tmp / "manifest.json").write_text(json.dumps(_manifest(counts, seed, kinds), indent=2) + "\n")
        tmp.chmod(0o755)  # mkdtemp makes it owner-only
        os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return _split_paths(out_dir, counts)


def ensure_geometry_dataset(
    out_dir: str | Path, *, n_train: int, n_val: int, n_test: int, n_sft: int = 0,
    kinds: Sequence[str] = LABELLED_KINDS, seed: int = 0, replace: bool = False,
) -> dict[str, Path]:
    """Like :func:`generate_geometry_dataset`, but reuse ``out_dir`` when it holds this very set.

    Args:
        replace: a set generated with other arguments is deleted and generated anew (for a
            directory only the caller writes, such as the demo's); False raises instead.

    Raises:
        ValueError: ``out_dir`` exists but was generated with other arguments (and ``replace``
            is False), or is not a generated set (no manifest.json).
    """
    out_dir = Path(out_dir)
    arguments = {"n_train": n_train, "n_val": n_val, "n_test": n_test, "n_sft": n_sft, "kinds": kinds, "seed": seed}
    if not out_dir.exists():
        try:
            return generate_geometry_dataset(out_dir, **arguments)
        except OSError:
            # Another process (e.g. another DDP rank) published the set first: reuse it below.
            if not out_dir.exists():
                raise
    manifest_path = out_dir / "manifest.json"
    if not manifest_path.is_file():
        raise ValueError(
            f"{out_dir} exists but has no manifest.json, so it is not a generated geometry set;"
            " point out_dir elsewhere or delete it"
        )
    found = json.loads(manifest_path.read_text())
    counts = {"train": n_train, "val": n_val, "test": n_test, "sft": n_sft}
    wanted = _manifest(counts, seed, kinds)
    differ = [f"{key}: found {found.get(key)!r}, wanted {wanted.get(key)!r}"
              for key in sorted(wanted.keys() | found.keys()) if found.get(key) != wanted.get(key)]
    if differ and replace:
        # Out of the way in one rename, so no reader ever sees a half-deleted set.
        stale = Path(tempfile.mkdtemp(prefix=f"{out_dir.name}.stale-", dir=out_dir.parent))
        os.rename(out_dir, stale / out_dir.name)
        shutil.rmtree(stale, ignore_errors=True)
        return ensure_geometry_dataset(out_dir, **arguments)
    if differ:
        raise ValueError(
            f"{manifest_path}: the set there was generated with other arguments"
            f" ({'; '.join(differ)}); delete {out_dir} to regenerate it, or pick another out_dir"
        )
    return _split_paths(out_dir, counts)
