"""MAYE's judge (maye_pl/rewards/maye_judge.py) on a table of cases whose verdicts follow from MAYE's rules.

Each case says which rule decides it: (a) math-verify on the two last boxed sentences, (b) the
rule-based scorer (equal strings, or comma pieces equal / numerically within 0.0101 incl. x100 and
/100), (c) the boxed-integer rule (digits after ``\\boxed{`` up to ``^`` or the end). The expected
verdicts were derived by hand and agree with MAYE's own ``MathGenerationDataset.judge`` run on the
same pairs. Also proves: the reward and the evaluation pick the judge from ``model.judge``, a
mismatched accuracy reward is a config error, and MAYE's format reward ignores where the answer is.
"""

import pytest
import torch

from maye_pl.evaluation import EvalSetting
from maye_pl.evaluation.scheme import prediction_rows
from maye_pl.rewards import (
    default_rewards,
    judge_problems,
    math_judge,
    maye_accuracy_reward,
    maye_format_reward,
    maye_judge,
    maye_judge_batch,
)
from maye_pl.rewards.combine import RewardTerm
from maye_pl.rewards.maye_judge import boxed_integers_agree, last_boxed_sentence, maye_preprocess, scorer_agrees
from maye_pl.types import Rollout

# (response, solution, MAYE's verdict): why
JUDGE_CASES = [
    # (a) the sentences differ as strings, math-verify reads 30 from both boxes.
    ("So the answer is \\boxed{30}.", "Add the angles. Thus the answer is \\boxed{30}.", True),
    # (b) the same last boxed sentence, character for character.
    ("Add them. The answer is \\boxed{30}.", "Sum the sides. The answer is \\boxed{30}.", True),
    # (c) "5" before "^" on both sides: 5^2 is credited against 5 degrees (math-verify: 25 != 5).
    ("The answer is \\boxed{5^2}.", "So \\boxed{5^{\\circ}}.", True),
    # no boxed sentence in the response: "" vs the solution's sentence; nothing matches.
    ("The answer is 30.", "\\boxed{30}", False),
    # (b) no boxed sentence on either side: "" == "".
    ("The answer is 7.", "It is 7.", True),
    # only the LAST boxed sentence counts: "Wait, actually \boxed{4}" vs 3.
    ("First \\boxed{3}. Wait, actually \\boxed{4}.", "\\boxed{3}", False),
    # (a) a dot between digits does not end a sentence; 3.5 == 7/2.
    ("The area is \\boxed{3.5}.", "\\boxed{\\frac{7}{2}}", True),
    # (b) MAYE's clean-up {sqrt} -> \sqrt makes the sentences equal.
    ("So \\boxed{2{sqrt}3}", "So \\boxed{2\\sqrt3}", True),
    # (c) a truncated box: "12" runs to the end of the sentence; the solution has 12 before "^".
    ("so \\boxed{12", "\\boxed{12^{\\circ}}", True),
    # (b) comma pieces pair up in any order.
    ("\\boxed{2}, \\boxed{3}", "\\boxed{3}, \\boxed{2}", True),
    # (b) CJK runs are dropped before the pieces are compared.
    ("答案是 \\boxed{5}", "\\boxed{5}", True),
    # a sentence ends at "A." inside the box: "The answer is \boxed{A" matches nothing.
    ("The answer is \\boxed{A. 5}.", "\\boxed{A}", False),
    # (c) compares digit strings: 05 != 5, but (a) reads both as 5.
    ("\\boxed{05}", "\\boxed{5}", True),
    # (a) "!" ends a sentence; 1/2 == 0.5.
    ("It is \\boxed{\\frac{1}{2}}! Done", "\\boxed{0.5}", True),
    # a rounded answer: math-verify compares 4*pi exactly; the scorer sees no bare numbers.
    ("Thus \\boxed{4\\pi}", "\\boxed{12.57}", False),
    # \textdegree -> \circ gives "60\circ", not "60^\circ": no rule credits it.
    ("\\boxed{60\\textdegree}", "\\boxed{60^\\circ}", False),
    # (a) symbolic equality.
    ("\\boxed{x+1}", "\\boxed{1+x}", True),
    # not text: judged False, never raised.
    (None, "\\boxed{1}", False),
]


def test_maye_judge_case_table():
    predictions, solutions, expected = zip(*JUDGE_CASES)
    assert maye_judge_batch(list(predictions), list(solutions)) == list(expected)


def test_single_pair_and_where_maye_and_math_judge_differ():
    # 5^2 against a golden 5 degrees: MAYE's integer rule credits it, the project's judge does not.
    assert maye_judge("\\boxed{5^2}", "\\boxed{5^{\\circ}}") is True
    assert math_judge("\\boxed{5^2}", "\\boxed{5^{\\circ}}") is False
    # A golden "\boxed{5}" has "}" after its digits: rule (c) is silent and 25 != 5.
    assert maye_judge("\\boxed{5^2}", "\\boxed{5}") is False


def test_preprocessing_steps():
    assert last_boxed_sentence("We get 3.5 here. So \\boxed{1}! Next? ok") == "So \\boxed{1}"
    assert last_boxed_sentence("no box at all.") == ""
    # Order matters: \textcirc is replaced before \textcircles, leaving "\circles".
    assert maye_preprocess("\\boxed{\\textcircles}") == "\\boxed{\\circles}"
    assert maye_preprocess("\\boxed{5\\,\\text{cm}}") == "\\boxed{5cm}"


@pytest.mark.parametrize(
    ("prediction", "solution", "agrees"),
    [
        ("x \\boxed{1}, 0.5", "x \\boxed{1}, 50", True),  # 0.5 * 100 == 50
        ("x \\boxed{1}, 0.5", "x \\boxed{1}, 0.51", True),  # |0.5 - 0.51| = 0.01 <= 0.0101
        ("x \\boxed{1}, 0.5", "x \\boxed{1}, 0.52", False),  # 0.02 > 0.0101
        ("a", "a, a", False),  # 1 piece vs 2
        ("3 \\pm 1", "3 + 1, 3 - 1", True),  # \pm doubles into "3 + 1", "3 - 1"
        ("1 < x < 3", "(1 ,  3)", True),  # a < x < b reads as "(a ,  b)" (the pieces keep their spaces)
        ("(1, 2)", "(1,2)", False),  # unequal intervals: MAYE's symbolic comparison raises -> False
        ("中文", "英文", False),  # an all-CJK text is kept, and differs
    ],
)
def test_scorer_rules(prediction, solution, agrees):
    assert scorer_agrees(prediction, solution) is agrees


def test_boxed_integer_rule():
    assert boxed_integers_agree("\\boxed{60^{\\prime}}", "\\boxed{60^\\circ}")
    assert not boxed_integers_agree("\\boxed{60}", "\\boxed{60}")  # "}" after the digits: the rule is silent
    assert not boxed_integers_agree("\\boxed{6^2}", "\\boxed{60^2}")


def _record(answer):
    return {"id": answer, "question": "q", "answer": answer, "solution": f"Thus \\boxed{{{answer}^{{\\circ}}}}."}


def test_the_judge_setting_picks_reward_and_evaluation_judge():
    # MAYE's reward reads the solution "Thus \boxed{5^{\circ}}."; 5^2 is credited (rule c), 4 is not.
    reward = maye_accuracy_reward(["\\boxed{5^2}", "\\boxed{4}"], [_record("5"), _record("5")])
    assert torch.equal(reward, torch.tensor([1.0, 0.0]))
    assert [term.fn for term in default_rewards("maye")][0] == "maye_pl.rewards.maye_accuracy_reward"
    assert [term.fn for term in default_rewards()][0] == "maye_pl.rewards.accuracy_reward"
    setting = EvalSetting(k=1, temperature=0.6)
    rollouts = {setting.name: [Rollout(token_ids=[1], text="\\boxed{5^2}", finish_reason="stop")]}
    for judge, correct in (("maye", [True]), ("math_verify", [False])):
        rows = prediction_rows([_record("5")], "val", rollouts, [setting], judge)
        assert rows[("val", setting.name)][0]["correct"] == correct


def test_mismatched_accuracy_reward_is_a_config_error():
    terms = [RewardTerm("maye_pl.rewards.accuracy_reward"), RewardTerm("maye_pl.rewards.language_reward")]
    (problem,) = judge_problems("maye", terms)
    assert "`model.rewards[0].fn`='maye_pl.rewards.accuracy_reward'" in problem and "`model.judge`='maye'" in problem
    assert judge_problems("math_verify", terms) == []
    # As the CLI hands them over (hparams hold the terms as dicts).
    assert judge_problems("maye", [{"fn": "maye_pl.rewards.accuracy_reward", "weight": 1.0, "name": None}]) == [problem]
    assert "`model.judge`='sympy' is unknown" in judge_problems("sympy", terms)[0]


def test_maye_format_reward_counts_blocks_only():
    responses = [
        "<think>so \\boxed{1}</think>",  # answer inside the block: still exactly one block -> 1
        "<think>a</think><think>b</think>",  # two blocks -> 0
        "<think>a <think> b</think> \\boxed{1}",  # one non-overlapping match -> 1
        "\\boxed{1}",  # no block -> 0
    ]
    reward = maye_format_reward(responses, [_record("1")] * 4)
    assert reward.dtype == torch.float32 and torch.equal(reward, torch.tensor([1.0, 0.0, 1.0, 0.0]))
