"""The paper's rewards on hand-made responses: exact (B,) float32 tensors, MAYE's definitions
(CJK share over all characters, one <think> block), and clear errors on unpaired inputs."""

import pytest
import torch

from maye_pl.rewards import accuracy_reward, format_reward, language_reward, soft_overlong_punishment


def _samples(*answers):
    return [{"answer": answer, "solution": f"\\boxed{{{answer}}}"} for answer in answers]


def test_accuracy_reward():
    responses = ["so \\boxed{\\sqrt{12}}", "\\boxed{60^\\circ}", "\\boxed{7}", "no box: 5"]
    reward = accuracy_reward(responses, _samples("2\\sqrt{3}", "60", "8", "5"))
    assert reward.dtype == torch.float32
    assert torch.equal(reward, torch.tensor([1.0, 1.0, 0.0, 0.0]))


def test_accuracy_reward_names_the_missing_key():
    with pytest.raises(KeyError, match=r"samples\[0\] has no 'answer' key"):
        accuracy_reward(["\\boxed{1}"], [{"solution": "\\boxed{1}"}])


def test_language_reward():
    responses = [
        "all English",
        "中文",  # 2 of 2 CJK -> -0.1
        "ab中文",  # 2 of 4 -> -0.05
        "x 中",  # 1 of 3 (the space counts, as in MAYE) -> -0.1/3
        "",  # empty -> 0
        "日本語かな",  # 3 ideographs of 5 characters (kana are outside U+4E00-U+9FFF) -> -0.06
    ]
    reward = language_reward(responses, _samples(*"123456"))
    expected = [0.0, -0.1, -0.05, -0.1 * (1 / 3), 0.0, -0.1 * (3 / 5)]
    assert reward.dtype == torch.float32
    assert torch.equal(reward, torch.tensor(expected, dtype=torch.float32))


def test_format_reward():
    responses = [
        "<think>reason</think> \\boxed{1}",  # one block, answer after it -> 1
        "<think>reason</think> the answer is 1",  # no box: the block alone counts -> 1
        "no think at all \\boxed{1}",  # -> 0
        "<think>a</think><think>b</think> \\boxed{1}",  # two blocks -> 0
        "<think>a <think> b</think> \\boxed{1}",  # a second opener inside is one match (MAYE) -> 1
        "<think>so \\boxed{1}</think>",  # answer inside the reasoning -> 0
        "<think>unclosed \\boxed{1}",  # -> 0
    ]
    reward = format_reward(responses, _samples(*"1234567"))
    assert reward.dtype == torch.float32
    assert torch.equal(reward, torch.tensor([1.0, 1.0, 0.0, 0.0, 1.0, 0.0, 0.0]))


def test_format_reward_is_linear_on_many_unclosed_think_tags():
    # MAYE's lazy DOTALL regex is quadratic here; the str.find scan is not.
    reward = format_reward(["<think>" * 200_000], _samples("1"))
    assert torch.equal(reward, torch.tensor([0.0]))


@pytest.mark.parametrize("reward", [accuracy_reward, language_reward, format_reward])
def test_rewards_reject_unpaired_inputs(reward):
    with pytest.raises(ValueError, match="2 responses and 1 samples"):
        reward(["a", "b"], _samples("1"))


def test_soft_overlong_punishment_ramps_over_the_cache():
    # L_max 10, L_cache 4: no penalty up to 6 tokens, then (6 - L) / 4 down to -1 at 10, -1 beyond.
    samples = [{"response_length": length} for length in (5, 6, 7, 9, 10, 11)]
    scores = soft_overlong_punishment(["x"] * 6, samples, max_length=10, cache_length=4)
    assert scores.dtype == torch.float32
    assert scores.tolist() == [0.0, 0.0, -0.25, -0.75, -1.0, -1.0]
    with pytest.raises(ValueError, match=r"cache_length=12 must lie in \(0, max_length=10\]"):
        soft_overlong_punishment(["x"], samples[:1], max_length=10, cache_length=12)
    with pytest.raises(KeyError, match="no 'response_length'"):
        soft_overlong_punishment(["x"], [{"answer": "1"}], max_length=10, cache_length=4)
