"""``maye_judge``: the answer judge of MAYE's code (``MathGenerationDataset.judge``), rebuilt from its behaviour.

The paper's accuracy numbers came from this judge, so the paper configs use it (``model.judge: maye``);
``math_judge`` is the project's own, stricter judge. MAYE's decision for a (response, solution) pair:

  1. Both texts are cut to their LAST "boxed" sentence: split at ``.``, ``!``, ``?`` not touching a
     digit on either side (so ``3.5`` stays whole), strip, keep the last piece containing ``boxed``;
     none -> ``""``. The golden side is the sample's full worked ``solution``, not its ``answer``.
  2. MAYE's literal LaTeX clean-ups, in its order (``\\text{degree}`` -> ``\\circ``, ``{sqrt}`` ->
     ``\\sqrt``, ``\\,\\text{cm}`` -> ``cm``, ...).
  3. Correct if ANY of:
     a. math-verify: ``verify(parse(prediction), parse(solution))`` on the two sentences as they are
        (MAYE's argument order: the prediction in the gold slot), in the judge worker, time-bounded;
     b. its rule-based scorer (MM-Math's ``AutoScoringJudge``) on the two sentences. Its symbolic
        branches build ``sympify(TexSoup(...))``, which raises since sympy 1.13 dropped the string
        fallback of ``sympify`` (MAYE pins vLLM 0.7.3 -> torch 2.5.1 -> sympy 1.13.1), and every
        raise counts as "not equal". What remains, and what ``scorer_agrees`` implements: equal
        strings; else CJK runs dropped, ``a < x < b`` read as ``(a, b)``, split at commas outside
        ``()``/``[]``, ``\\pm`` doubled into ``+`` and ``-``; then every piece must pair with one of
        the solution's pieces (in MAYE's visiting order) as an equal non-empty string or as numbers
        within 0.0101 (the prediction's value, /100 or x100, against the solution's);
     c. the boxed-integer rule: both sentences have ``\\boxed{`` followed by digits and then ``^`` or
        the end, and the digits are equal as strings (``\\boxed{5^2}`` == ``\\boxed{5^{\\circ}}``).

Quirks kept on purpose (they are MAYE's decision): a sentence split inside the box (``\\boxed{A. 5}``),
``5^2`` credited against 5 (rule c), a bare-number piece credited at x100 or /100 (``x, 0.5`` against
``x, 50``, rule b), and two texts without any "boxed" sentence are equal (``""`` == ``""``; MAYE's
solutions all carry a box). Checked against MAYE's own code (with TexSoup, sympy 1.14, math-verify
0.9) on the case table of tests/rewards/test_maye_judge.py. Never raises; a pair
math-verify cannot settle within ``timeout`` seconds is decided by b and c alone.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from maye_pl.rewards.judge import judge_pairs

_SENTENCE_END = re.compile(r"(?<!\d)[.!?](?!\d)")
# MAYE's clean-ups; the order matters ("\textcirc" runs before "\textcircles" and eats its prefix).
_MAYE_CLEANUPS = (
    ("\\text{circ}", "\\circ"), ("\\text{degree}", "\\circ"), ("\\{circ}", "\\circ"), ("\\{degree}", "\\circ"),
    ("\\textcirc", "\\circ"), ("\\textdegree", "\\circ"), ("\\text{circles}", "\\circ"), ("\\textcircles", "\\circ"),
    ("\\text{o}", "\\circ"), ("\\texto", "\\circ"), ("\\bigcirc", "\\circ"), ("\\bullet", "\\circ"),
    ("{sqrt}", "\\sqrt"), ("{radical}", "\\sqrt"), ("{°}", "\\circ"), ("\\,\\text{cm}", "cm"),
)
_CJK_RUN = re.compile(r"[\u4e00-\u9fff]+")
_NUMBER_TOLERANCE = 1e-2 * 1.01  # the scorer's default precision, with its 1 % slack
# Digits right after "\boxed{", then "^" or the end of the sentence.
_BOXED_INTEGER = re.compile(r"\\boxed\{(\d*)(?=\^|$)")


def last_boxed_sentence(text: str) -> str:
    """Step 1: the last sentence of ``text`` that contains "boxed", stripped; ``""`` when none."""
    for sentence in reversed(_SENTENCE_END.split(text)):
        if "boxed" in (sentence := sentence.strip()):
            return sentence
    return ""


def maye_preprocess(text: str) -> str:
    """Steps 1-2: the last boxed sentence with MAYE's LaTeX clean-ups applied."""
    sentence = last_boxed_sentence(text)
    for old, new in _MAYE_CLEANUPS:
        sentence = sentence.replace(old, new)
    return sentence


def scorer_agrees(prediction: str, solution: str) -> bool:
    """Step 3b: MAYE's rule-based scorer on two preprocessed sentences (what runs of it; module doc)."""
    if prediction == solution:
        return True
    predicted, golden = _scorer_pieces(prediction), _scorer_pieces(solution)
    if len(predicted) != len(golden):
        return False
    index = -1
    while predicted:
        # MAYE's visiting order: the index advances by one over a list that shrinks as pieces pair up.
        index = (index + 1) % len(predicted)
        piece = predicted[index]
        partner = next((other for other in golden if _pieces_equal(piece, other)), None)
        if partner is None:
            return False
        predicted.remove(piece)
        golden.remove(partner)
    return True


def _scorer_pieces(text: str) -> list[str]:
    if not _CJK_RUN.fullmatch(text):
        text = _CJK_RUN.sub("", text)
    if text.count("<") == 2:  # a < x < b -> (a, b)
        parts = text.split("<")
        text = f"({parts[0]}, {parts[-1]})"
    pieces, depth, start = [], 0, 0
    for position, char in enumerate(text):
        if char in "([":
            depth += 1
        elif char in ")]":
            depth -= 1
        elif char == "," and depth == 0:
            pieces.append(text[start:position].strip())
            start = position + 1
    if start < len(text):
        pieces.append(text[start:].strip())
    expanded = []
    for piece in pieces:
        expanded += [piece.replace("\\pm", "+"), piece.replace("\\pm", "-")] if "\\pm" in piece else [piece]
    return expanded


def _pieces_equal(predicted: str, golden: str) -> bool:
    if predicted == golden and predicted:
        return True
    try:
        value, target = float(predicted), float(golden)
    except ValueError:
        return False
    return any(abs(candidate - target) <= _NUMBER_TOLERANCE for candidate in (value / 100, value, value * 100))


def boxed_integers_agree(prediction: str, solution: str) -> bool:
    """Step 3c: MAYE's boxed-integer rule on two preprocessed sentences."""
    predicted, golden = _BOXED_INTEGER.search(prediction), _BOXED_INTEGER.search(solution)
    return predicted is not None and golden is not None and predicted.group(1) == golden.group(1)


def maye_judge(prediction: str, solution: str, timeout: float = 5.0) -> bool:
    """Whether MAYE's judge calls ``prediction`` (a response) correct against ``solution`` (the
    sample's full worked solution). Never raises; math-verify gets ``timeout`` seconds."""
    return maye_judge_batch([prediction], [solution], timeout)[0]


def maye_judge_batch(predictions: Sequence[str], solutions: Sequence[str], timeout: float = 5.0) -> list[bool]:
    """``maye_judge`` over pairs; the pairs that steps b and c leave open go to the judge worker at once.

    Raises:
        ValueError: when ``predictions`` and ``solutions`` differ in length.
    """
    return judge_pairs("maye_judge_batch", predictions, solutions, _judge_without_math_verify, timeout)


def _judge_without_math_verify(prediction: str, solution: str) -> bool | tuple[str, str, str]:
    """True when rule b or c credits the pair; else the worker's request for math-verify (or False
    when a side has no boxed sentence: math-verify parses nothing from an empty text)."""
    if not isinstance(prediction, str) or not isinstance(solution, str):
        return False
    predicted, golden = maye_preprocess(prediction), maye_preprocess(solution)
    if scorer_agrees(predicted, golden) or boxed_integers_agree(predicted, golden):
        return True
    if not predicted or not golden:
        return False
    return predicted, golden, "sentences"
