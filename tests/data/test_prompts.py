"""Prompts: MAYE's CoT chat turn (image first, then question + instruction) and its raw-text
zero-shot prompt (question, then the figure), the <image> tag removed, unknown styles rejected;
rendered with the tiny Qwen processor, each holds exactly one vision placeholder."""

import pytest

from maye_pl.data import COT_INSTRUCTION, build_messages, render_prompt

QUESTION = "<image>Find the area of the rectangle in the figure."
VISION = "<|vision_start|><|image_pad|><|vision_end|>"


def test_cot_messages_put_the_image_first_then_question_and_instruction():
    assert build_messages(QUESTION, "cot") == [{"role": "user", "content": [
        {"type": "image"},
        {"type": "text", "text": "Find the area of the rectangle in the figure." + COT_INSTRUCTION},
    ]}]
    assert COT_INSTRUCTION.startswith("\nSolve the above mathematics problem")
    assert COT_INSTRUCTION.endswith("Please display the final answer in the format \\boxed{}.")


def test_zero_shot_messages_put_the_question_before_the_image():
    (turn,) = build_messages(QUESTION, "zero_shot")
    kinds = [part["type"] for part in turn["content"]]
    assert kinds == ["text", "image", "text"]
    before, _, after = turn["content"]
    assert before["text"].startswith("A conversation between User and Assistant.")
    assert before["text"].endswith("User: Find the area of the rectangle in the figure. ")
    assert after["text"] == " Assistant:"


def test_unknown_style_names_the_config_key():
    with pytest.raises(ValueError, match=r"`data.prompt_style`='chat' is not a known prompt style"):
        build_messages(QUESTION, "chat")


def test_rendered_prompts_hold_one_vision_placeholder(tiny_processor):
    cot = render_prompt(tiny_processor, QUESTION, "cot", VISION)
    assert cot.endswith("<|im_start|>assistant\n")
    assert f"user\n{VISION}Find the area" in cot
    zero = render_prompt(tiny_processor, QUESTION, "zero_shot", VISION)
    assert zero.endswith(f"in the figure. {VISION} Assistant:")
    assert "<|im_start|>" not in zero  # MAYE renders it without the chat template
    for prompt in (cot, zero):
        assert prompt.count(VISION) == 1 and "<image>" not in prompt
