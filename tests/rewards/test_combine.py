"""Rewards by import path: the default set is the paper's, a reward defined here works by its
path, totals are weighted sums of named components, and every mistake (bad path, not callable,
duplicate name, wrong shape or dtype) is reported with the term and the fix."""

import importlib
import re

import pytest
import torch

from maye_pl.rewards import (
    RewardTerm,
    accuracy_reward,
    default_rewards,
    language_reward,
    resolve_rewards,
    score_responses,
)


def length_bonus(responses: list[str], samples: list[dict]) -> torch.Tensor:
    """A user-defined reward, referenced below by its import path."""
    return torch.tensor([len(text) / 10 for text in responses], dtype=torch.float32)


def wrong_shape(responses, samples):
    return torch.zeros(len(responses), 1)


def wrong_dtype(responses, samples):
    return torch.zeros(len(responses), dtype=torch.float64)


def not_a_tensor(responses, samples):
    return [0.0] * len(responses)


NOT_CALLABLE = 3


def test_default_rewards_are_the_papers_and_fresh_each_time():
    first, second = default_rewards(), default_rewards()
    assert first == second and first is not second
    resolved = resolve_rewards(first)
    assert resolved == [("accuracy", 1.0, accuracy_reward), ("language", 1.0, language_reward)]
    first.append(RewardTerm("maye_pl.rewards.format_reward"))
    assert len(default_rewards()) == 2  # format is off by default; no shared list


def test_score_responses_weights_and_names_components():
    terms = [
        RewardTerm("maye_pl.rewards.accuracy_reward"),  # name defaults to the function's
        RewardTerm(f"{__name__}.length_bonus", weight=0.5, name="length"),
    ]
    rewards = resolve_rewards(terms)
    responses = ["\\boxed{5}", "\\boxed{4} and more"]  # 9 and 18 characters
    samples = [{"answer": "5", "solution": "5"}, {"answer": "5", "solution": "5"}]
    total, components = score_responses(rewards, responses, samples)
    assert list(components) == ["accuracy_reward", "length"]
    assert torch.equal(components["accuracy_reward"], torch.tensor([1.0, 0.0]))
    assert torch.equal(components["length"], torch.tensor([0.9, 1.8]))  # unweighted
    # total = 1 * accuracy + 0.5 * length = [1 + 0.45, 0 + 0.9]
    assert torch.allclose(total, torch.tensor([1.45, 0.9]))
    assert total.dtype == torch.float32 and total.shape == (2,)


def test_resolve_rewards_imports_each_path_once(monkeypatch):
    imported = []
    real_import = importlib.import_module
    def recording_import(name):
        imported.append(name)
        return real_import(name)

    monkeypatch.setattr(importlib, "import_module", recording_import)
    path = f"{__name__}.length_bonus"
    resolve_rewards([RewardTerm(path, name="a"), RewardTerm(path, name="b")])
    assert imported.count(__name__) == 1


def test_resolve_rewards_reports_every_bad_term_at_once():
    terms = [
        RewardTerm("maye_pl.rewards.acuracy_reward"),  # typo in the attribute
        RewardTerm("maye_pl.no_such_module.reward"),
        RewardTerm(f"{__name__}.NOT_CALLABLE"),
        RewardTerm("maye_pl.rewards.language_reward", name="accuracy_reward"),
        RewardTerm("maye_pl.rewards.accuracy_reward"),  # name clash with the term above
    ]
    with pytest.raises(ValueError) as error:
        resolve_rewards(terms)
    message = str(error.value)
    assert "rewards[0] (fn='maye_pl.rewards.acuracy_reward')" in message
    assert "has no attribute 'acuracy_reward'" in message
    assert "rewards[1] (fn='maye_pl.no_such_module.reward')" in message
    assert "rewards[2]" in message and "int, not callable" in message
    assert "rewards[4]" in message and "'accuracy_reward' is already used by rewards[3]" in message
    assert "fix: set `fn` to the dotted import path" in message


def test_resolve_rewards_reports_a_broken_import_inside_the_module(tmp_path, monkeypatch):
    (tmp_path / "broken_rewards.py").write_text("import not_installed_dependency\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ValueError, match="importing module 'broken_rewards' failed"):
        resolve_rewards([RewardTerm("broken_rewards.reward")])


@pytest.mark.parametrize(
    ("kwargs", "problem"),
    [
        ({"fn": ""}, "`fn`=''"),
        ({"fn": "a.b", "weight": float("inf")}, "`weight`=inf must be a finite number"),
        ({"fn": "a.b", "name": " "}, "`name`=' '"),
    ],
)
def test_reward_term_validates_its_fields(kwargs, problem):
    with pytest.raises(ValueError, match=re.escape(problem)):
        RewardTerm(**kwargs)


@pytest.mark.parametrize(
    ("fn", "got"),
    [
        (wrong_shape, "shape (2, 1)"),
        (wrong_dtype, "dtype torch.float64"),
        (not_a_tensor, "returned list"),
    ],
)
def test_score_responses_names_a_reward_with_the_wrong_output(fn, got):
    rewards = resolve_rewards([RewardTerm(f"{__name__}.{fn.__name__}", name="bad")])
    expected = f"reward 'bad'.*{re.escape(got)}.*must return a Tensor of shape \\(2,\\)"
    with pytest.raises(TypeError, match=expected):
        score_responses(rewards, ["a", "b"], [{}, {}])


def test_a_term_passes_its_kwargs_and_a_misfit_is_named():
    term = RewardTerm("maye_pl.rewards.soft_overlong_punishment", kwargs={"max_length": 8, "cache_length": 4})
    [(name, weight, fn)] = resolve_rewards([term])
    assert name == "soft_overlong_punishment"
    total, _ = score_responses([(name, weight, fn)], ["a", "b"], [{"response_length": 3}, {"response_length": 6}])
    assert total.tolist() == [0.0, -0.5]  # (4 - 6) / 4
    with pytest.raises(ValueError, match=r"rewards\[0\].*`kwargs`=\{'max_len': 8\} do not fit its signature"):
        resolve_rewards([RewardTerm("maye_pl.rewards.soft_overlong_punishment", kwargs={"max_len": 8})])
    with pytest.raises(ValueError, match="`kwargs`=3 must be a mapping"):
        RewardTerm("a.b", kwargs=3)
