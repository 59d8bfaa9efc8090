"""Prompts: a MAYE question → chat messages → the prompt text the engine and the trainer see.

Both instruction strings are MAYE's, verbatim (GAIR-NLP/MAYE, ``maye/datasets``, the
``MathGenerationDataset`` module: ``CHAT_COT_PROMPT`` and ``ZERO_COT_PROMPT``):

- ``"cot"``: one user turn, the image first, then the question followed by the chain-of-thought
  instruction; rendered with the processor's chat template (MAYE ``use_chat_template=True``).
- ``"zero_shot"``: the R1-Zero style completion prompt, question before the figure, rendered as
  raw text WITHOUT a chat template (MAYE ``use_chat_template=False``).

Two deliberate differences from MAYE's code, both fixing what it evidently meant:
- MAYE leaves the literal ``<image>`` tag in the question text; Qwen's tokenizer knows no such
  token, so the model would read the six characters ``<image>``. We remove it (the figure is
  the ``{"type": "image"}`` part).
- MAYE's ``ZERO_COT_PROMPT`` writes ``{{question}}`` and then calls ``.format(question=...)``,
  which yields the literal text ``{question}``, so its zero-shot prompts carried no question.
  We substitute the question.
"""

from __future__ import annotations

from typing import Any

from maye_pl.data.jsonl import IMAGE_PLACEHOLDER

COT_INSTRUCTION = (
    "\nSolve the above mathematics problem, write out the solution process according to the"
    " question, and use the same LaTeX format as the question in the solution process. Please"
    " display the final answer in the format \\boxed{}."
)
"""MAYE's ``CHAT_COT_PROMPT``, appended to the question."""

ZERO_SHOT_PREFIX = (
    "A conversation between User and Assistant. The user asks a question with an image,  and the"
    " Assistant solves it. The assistant first thinks about the reasoning process in the mind and"
    " then provides the solution. The reasoning process is enclosed within '<think>' and"
    " '</think>', followed by the solution. Ensuring that the final answer in solution is enclosed"
    " in \\boxed{}. User: "
)
"""MAYE's ``ZERO_COT_PROMPT`` up to the question (the double space after "image," is MAYE's)."""

ZERO_SHOT_SUFFIX = " Assistant:"
"""MAYE's ``ZERO_COT_PROMPT`` after the figure."""

PROMPT_STYLES = {"cot": True, "zero_shot": False}
"""Prompt style → whether it is rendered through the processor's chat template."""


def strip_image_placeholder(question: str) -> str:
    """The question without its ``<image>`` tag, so the model never reads the literal tag."""
    return question.replace(IMAGE_PLACEHOLDER, "").strip()


def _check_style(prompt_style: str) -> None:
    if prompt_style not in PROMPT_STYLES:
        raise ValueError(
            f"`data.prompt_style`={prompt_style!r} is not a known prompt style; use one of"
            f" {sorted(PROMPT_STYLES)}"
        )


def build_messages(question: str, prompt_style: str) -> list[dict[str, Any]]:
    """Chat messages for one question: a single user turn holding one image part.

    Args:
        question: MAYE question text with its ``<image>`` placeholder.
        prompt_style: ``"cot"`` (image, then question + CoT instruction) or ``"zero_shot"``
            (prefix + question, image, " Assistant:"; MAYE's order).

    Raises:
        ValueError: unknown ``prompt_style``, naming ``data.prompt_style``.
    """
    _check_style(prompt_style)
    text = strip_image_placeholder(question)
    if prompt_style == "cot":
        content = [{"type": "image"}, {"type": "text", "text": text + COT_INSTRUCTION}]
    else:
        content = [
            {"type": "text", "text": ZERO_SHOT_PREFIX + text + " "},
            {"type": "image"},
            {"type": "text", "text": ZERO_SHOT_SUFFIX},
        ]
    return [{"role": "user", "content": content}]


def render_prompt(processor: Any, question: str, prompt_style: str, image_placeholder: str) -> str:
    """The prompt text for one question, with exactly one image placeholder.

    ``"cot"`` goes through ``processor.apply_chat_template(..., add_generation_prompt=True)``;
    ``"zero_shot"`` joins the message parts as raw text, each image part written as
    ``image_placeholder`` (MAYE renders it without a template): the model family's
    (``ModelAdapter.image_placeholder``, e.g. ``<|vision_start|><|image_pad|><|vision_end|>``).
    """
    messages = build_messages(question, prompt_style)
    if PROMPT_STYLES[prompt_style]:
        return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    parts = messages[0]["content"]
    return "".join(image_placeholder if part["type"] == "image" else part["text"] for part in parts)
