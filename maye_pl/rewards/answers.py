"""Answer extraction and LaTeX normalisation for the math judge: pure string functions.

The judge (``maye_pl/rewards/judge.py``) compares the LAST boxed expression of a response with
the golden answer. Everything here is cheap and runs in the calling process; only the symbolic
comparison (math-verify, sympy) runs in the judge worker.

Every function here is linear (or, for the regex normalisations, applied only to answers of at
most ``MAX_ANSWER_CHARS`` characters): a response of a megabyte of ``{`` or ten thousand nested
``\\boxed{`` returns at once. No regex sees unbounded text, nothing recurses.
"""

from __future__ import annotations

import re

# Answers longer than this are compared as strings only (never parsed): a real answer is a
# number or a short expression, and sympy on kilobytes of LaTeX only burns the time limit.
MAX_ANSWER_CHARS = 1000

_BOX_COMMANDS = ("\\boxed", "\\fbox")


def extract_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` / ``\\fbox{...}`` in ``text``, braces balanced.

    The last box is the one whose command starts last (as in MAYE and the MATH reference code),
    so ``\\boxed{\\boxed{2}}`` gives ``"2"``. Escaped braces (``\\{``, ``\\}``) do not count
    towards nesting. The brace-less form ``\\boxed 5`` takes the text up to the next whitespace
    or ``$``. A command followed by a letter (``\\boxedtext``) is another command and is skipped.

    Returns None when there is no box, or when the last box is unclosed (a response cut off
    inside its answer) or brace-less with nothing after it: an earlier box is NOT used then,
    since the model's final answer is the one that is broken. ``\\boxed{}`` gives ``""``.

    Linear in ``len(text)``: each search backwards covers new text, and one forward scan reads
    the box.
    """
    # Cached last position of each command before `end`; only the consumed one is searched
    # again, and only left of where it was found, so the backwards searches never overlap.
    end = len(text)
    positions = [text.rfind(command, 0, end) for command in _BOX_COMMANDS]
    while True:
        which = 0 if positions[0] >= positions[1] else 1
        start = positions[which]
        if start < 0:
            return None
        after = start + len(_BOX_COMMANDS[which])
        if after < len(text) and text[after].isalpha():
            positions[which] = text.rfind(_BOX_COMMANDS[which], 0, start)
            continue
        return _box_argument(text, after)


def _box_argument(text: str, after: int) -> str | None:
    """The argument of a box command whose name ends at ``after``: a braced group or a token."""
    i = after
    while i < len(text) and text[i].isspace():
        i += 1
    if i == len(text):
        return None
    if text[i] == "{":
        return _braced_group(text, i)
    end = i
    while end < len(text) and not text[end].isspace() and text[end] != "$":
        end += 1
    return text[i:end] if end > i else None


def _braced_group(text: str, open_index: int) -> str | None:
    """Content between ``text[open_index] == "{"`` and its matching ``}``; None if unclosed."""
    depth = 0
    i = open_index
    while i < len(text):
        char = text[i]
        if char == "\\":
            i += 2  # \{ and \} are literal braces; \\ (line break) escapes nothing after it
            continue
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return text[open_index + 1 : i]
        i += 1
    return None


def golden_answer(solution: str) -> str:
    """The answer inside a golden solution: its last box when it has one, else the whole text.

    Datasets give the golden answer plain (``"3\\sqrt{2}"``) or as a boxed solution; a golden
    solution with a broken box is used whole rather than dropped.
    """
    boxed = extract_boxed(solution)
    return solution if boxed is None else boxed


def compact(text: str) -> str:
    """``text`` without any whitespace: the key for exact-match comparison."""
    return "".join(text.split())


# --- MAYE's LaTeX normalisations ------------------------------------------------------------
# Ported from MAYE's dataset judge (`MathGenerationDataset.preprocess`: degree spellings,
# radicals, "\,\text{cm}") and the MM-Math AutoScoringJudge it ORs in (`special_signal_map`,
# `sepcial_symbol_replace`: \left/\right, ^\circ, thin spaces, $ and full-width punctuation,
# cm/m/米 units, \mathrm{}/\mathbf{} unwrapping). The rest of that scorer (sympy parse_latex,
# 1e-8 tolerance, "x, x/100 and x*100 are all equal to x") is not ported: math-verify does the
# symbolic part, and the percentage rule would reward 0.5 for a golden 50.

# Every spelling of a degree mark MAYE knows becomes \circ; then "^{\circ}", "^\circ" and a
# lone "\circ" are dropped, so 60^\circ, 60°, 60^{\text{o}} and "60 degrees" all become 60.
_DEGREE_SPELLINGS = (
    "\\text{circ}", "\\text{degree}", "\\{circ}", "\\{degree}", "\\textcirc", "\\textdegree",
    "\\text{circles}", "\\textcircles", "\\text{o}", "\\texto", "\\bigcirc", "\\bullet", "°",
)
_LITERAL_REPLACEMENTS = (
    *((spelling, "\\circ") for spelling in _DEGREE_SPELLINGS),
    ("{sqrt}", "\\sqrt"), ("{radical}", "\\sqrt"),
    ("\\dfrac", "\\frac"), ("\\tfrac", "\\frac"),
    ("\\displaystyle", ""), ("$", ""),
    ("，", ","), ("（", "("), ("）", ")"), ("＋", "+"), ("。", "."),
)
_DEGREE_MARK = re.compile(r"\^\s*\{\s*\\circ\s*\}|\^\s*\\circ|\\circ|\\degree|\s*\bdegrees?\b")
_LEFT_RIGHT = re.compile(r"\\(?:left|right)(?![a-zA-Z])")  # not \rightarrow
_TEX_SPACE = re.compile(r"\\[,;:! ]|\\q?quad(?![a-zA-Z])|~")
_UNIT = (
    r"(?:cm|mm|km|dm|m|units?|square\s+units?|sq\.?\s*units?|inch(?:es)?|ft|feet|yards?"
    r"|厘米|分米|米)"
)
_SUPERSCRIPT_2_3 = r"(?:\^\s*\{?\s*[23]\s*\}?)?"
# A unit in \text{} / \mathrm{} / \mbox{}, anywhere (MAYE drops "\text{cm}" wherever it is).
_WRAPPED_UNIT = re.compile(r"\\(?:text|mathrm|mbox)\s*\{\s*" + _UNIT + r"\s*\}" + _SUPERSCRIPT_2_3)
# A bare unit word only at the end and after a number, brace, parenthesis, space or \pi
# ("5 cm", "12cm^2", "4\pi m"), so that names like "AM" or "m\angle" survive.
_TRAILING_UNIT = re.compile(
    r"(?:(?<=[\d})\s])|(?<=\\pi))\s*" + _UNIT + _SUPERSCRIPT_2_3 + r"\s*$"
)
_EMPTY_TEXT = re.compile(r"\\(?:text|mathrm|mbox)\s*\{\s*\}")
_MATH_FONT = re.compile(r"\\(?:mathrm|mathbf)\{~?([^{}]*)\}")
# "x = 5", "AB = 5", "m\angle ABC = 60", "\angle 1 = 60", "y_1 = 2": one name before the only "=".
_NAME_PREFIX = re.compile(
    r"^\s*(?:m\s*)?(?:\\angle\s*\w+|\\overline\{[A-Za-z]+\}|[A-Za-z][A-Za-z']*(?:_\{?\w+\}?)?)"
    r"\s*=(?=.*\S)",
    re.DOTALL,
)


def normalize_answer(answer: str) -> str:
    """``answer`` with MAYE's LaTeX normalisations applied (see the module comments).

    Degree marks, units, ``\\left``/``\\right``, TeX spaces, ``$`` and a leading ``name =`` are
    dropped; ``\\dfrac``/``\\tfrac`` become ``\\frac``; full-width punctuation becomes ASCII.
    Meant for an extracted answer of at most ``MAX_ANSWER_CHARS`` characters.

    >>> normalize_answer("x = 60^{\\\\circ}")
    '60'
    """
    text = answer
    for old, new in _LITERAL_REPLACEMENTS:
        text = text.replace(old, new)
    text = _DEGREE_MARK.sub("", text)
    text = _LEFT_RIGHT.sub("", text)
    text = _TEX_SPACE.sub(" ", text)
    text = _WRAPPED_UNIT.sub("", text)
    text = _TRAILING_UNIT.sub("", text)
    text = _EMPTY_TEXT.sub("", text)
    text = _MATH_FONT.sub(r"\1", text)
    if text.count("=") == 1:
        text = _NAME_PREFIX.sub("", text)
    return text.strip().rstrip(".,;:").rstrip()  # "60." ends a sentence; ".5" keeps its dot


# MAYE's boxed-integer fallback (`\\boxed\{(\d*?)(?:\^|$)`: the integer before a "^") credits
# "60^{\prime}" or "60^o" against 60. Ported with one fix: the superscript must be a mark
# (\prime, \text{..}, \mathrm{..}, o), so that 5^2 or 5^{\frac{1}{2}} is not judged equal to 5
# (MAYE's regex says they are).
_INTEGER_WITH_MARK = re.compile(
    r"^\s*(\d+)\s*\^\s*\{?\s*(?:\\(?:prime|text|mathrm|mbox|rm)(?![a-zA-Z])|o\b)"
)
_INTEGER = re.compile(r"^\s*(\d+)\s*$")


def integer_fallback(prediction_answer: str, golden: str) -> bool:
    """Whether the prediction is an integer with a superscript mark and the golden that integer.

    Both arguments are extracted, normalised answers. The golden may carry a mark too.
    """
    predicted = _INTEGER_WITH_MARK.match(prediction_answer)
    if predicted is None:
        return False
    expected = _INTEGER.match(golden) or _INTEGER_WITH_MARK.match(golden)
    return expected is not None and int(predicted.group(1)) == int(expected.group(1))
