"""Tiny random VLMs for CPU runs and tests: no hub, no download, same bytes from a seed.

The directory it writes is a real checkpoint of the family in miniature (Qwen2-VL, Qwen2.5-VL,
Qwen3-VL: the family's adapter gives config and processor): ``config.json``, fp32 safetensors
weights, a byte-level BPE tokenizer with Qwen's special tokens and chat template, and an image
processor whose pixel bounds turn a 64-112 px image into 4-16 vision tokens. Both transformers
(``AutoModelForImageTextToText`` + ``AutoProcessor``) and vLLM load it, so the whole pipeline
(engine, trainer forward, weight sync) runs on the real code paths in seconds.

Sizes are chosen for vLLM's CPU backend: its attention kernels accept head sizes that are
multiples of 32 (``CPUAttentionBackend.get_supported_head_sizes``), so text and vision heads are
32 wide.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from maye_pl.models.adapters import ADAPTERS

# The tokens Qwen2-VL's processor, chat template and vLLM's Qwen2.5-VL model look up by name.
SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

# Qwen2-VL's chat template (images and videos as one placeholder each; the processor expands it).
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# What the BPE learns its merges from: the register of the prompts and answers the project trains
# on (geometry questions, step-by-step reasoning, boxed answers), so such text is short in tokens.
_CORPUS = """\
You are a helpful assistant.
system user assistant
Look at the image and answer the question. Put the final answer in \\boxed{}.
Let me think step by step about the problem before I give the final answer.
The triangle ABC has a right angle at C, so the Pythagorean theorem applies.
The angle at the center of the circle is twice the angle at the circumference.
Find the area of the shaded region in the figure. Round the answer to two decimal places.
The radius of the circle is 5, so the area is 25 pi and the circumference is 10 pi.
In the parallelogram, opposite sides are equal and opposite angles are equal.
The sum of the interior angles of a triangle is 180 degrees.
Since the lines are parallel, the alternate angles are equal, therefore x = 40.
The length of the hypotenuse is the square root of the sum of the squares of the legs.
Wait, let me check the calculation again. The previous step was wrong.
Hmm, I made a mistake. Let me verify the result by substituting it back.
So the perimeter of the rectangle is 2 times the length plus 2 times the width.
The answer is \\boxed{12}. The answer is \\boxed{3.5}. The answer is \\boxed{60}.
Solve for x: 3x + 7 = 22, so 3x = 15 and x = 5.
The point D is the midpoint of the segment AB, so AD = DB = 4.
The tangent to a circle is perpendicular to the radius at the point of contact.
The volume of the cylinder equals the base area times the height.
If the slope of the line is 2 and it passes through the origin, then y = 2x.
What is the measure of angle BAC? Choices: A. 30 B. 45 C. 60 D. 90
The similar triangles have proportional sides, so the ratio of the areas is the square of the ratio.
First, compute the value of each term. Then, add them together to get the total.
Therefore, the correct option is C, and the value of the expression is 1/2.
The function f(x) = x^2 - 4x + 3 has roots at x = 1 and x = 3.
The probability of drawing a red ball is the number of red balls divided by the total number.
"""

_BPE_VOCAB_SIZE = 256 + 512  # byte alphabet + at most 512 merges (the corpus yields a few hundred)

def _train_tokenizer():
    """Byte-level BPE over ``_CORPUS`` with Qwen2's pre-tokenizer, wrapped as a Qwen2Tokenizer."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    # The same normalizer / pre-tokenizer Qwen2Tokenizer rebuilds on load, so the learned merges
    # apply to exactly the pieces they were learned on.
    bpe = Tokenizer(models.BPE())
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=_BPE_VOCAB_SIZE,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_CORPUS.splitlines(), trainer)
    learned = json.loads(bpe.to_str())["model"]
    vocab = dict(learned["vocab"])
    for token in SPECIAL_TOKENS:  # after the BPE ids, like Qwen's (151643+)
        vocab[token] = len(vocab)
    merges = [tuple(pair) for pair in learned["merges"]]
    return Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        extra_special_tokens=list(SPECIAL_TOKENS[1:]),
    )


DEFAULT_TINY_MODEL_TYPE = "qwen2_5_vl"
"""The family of the demo and of the test suite's shared engine (MAYE's Qwen2.5-VL)."""


def tiny_model_type(path: str | os.PathLike) -> str:
    """The family a tiny-model directory's name asks for: the model type it ends with, written
    with ``-``, ``.`` or ``_`` (``.cache/tiny-qwen3-vl`` → "qwen3_vl"); else the default family."""
    name = Path(path).name.lower().replace("-", "_").replace(".", "_")
    return next((t for t in ADAPTERS if name.endswith(t)), DEFAULT_TINY_MODEL_TYPE)


def build_tiny_model(out_dir: str | os.PathLike, model_type: str = DEFAULT_TINY_MODEL_TYPE, seed: int = 0) -> Path:
    """Write a tiny random checkpoint of the ``model_type`` family to ``out_dir``; return its path.

    Deterministic: the same seed gives the same bytes (weights, tokenizer, configs) on the same
    library versions. The generation config lists ``eos_token_id = [<|im_end|>, <|endoftext|>]``
    like Qwen's and carries no sampling defaults (Qwen's top_k=1, repetition_penalty=1.05 ...),
    which ``generate()`` and vLLM would otherwise take as defaults.
    """
    from transformers import AutoModelForImageTextToText, GenerationConfig

    if model_type not in ADAPTERS:
        raise ValueError(f"build_tiny_model: model_type={model_type!r} is not one of {sorted(ADAPTERS)}.")
    adapter = ADAPTERS[model_type]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = _train_tokenizer()
    config = adapter.tiny_config(tokenizer)

    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config).to(torch.float32)
    model.generation_config = GenerationConfig(
        bos_token_id=config.text_config.bos_token_id,
        pad_token_id=config.text_config.pad_token_id,
        eos_token_id=[
            tokenizer.convert_tokens_to_ids("<|im_end|>"),
            tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        ],
    )
    model.save_pretrained(out)
    adapter.tiny_processor(tokenizer, CHAT_TEMPLATE).save_pretrained(out)
    # vLLM and AutoTokenizer read the template from the tokenizer files as well.
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(out)
    return out


def ensure_tiny_model(
    path: str | os.PathLike, model_type: str = DEFAULT_TINY_MODEL_TYPE, seed: int = 0
) -> Path:
    """Return ``path``, building the tiny ``model_type`` model there first if it does not exist yet.

    The build goes to a temporary sibling directory that is renamed into place, so a killed
    build never leaves a half-written model, and concurrent callers end with one complete copy.
    """
    target = Path(path)
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.building-", dir=target.parent))
    try:
        build_tiny_model(staging, model_type, seed=seed)
        try:
            staging.rename(target)
        except OSError:
            # Another process finished first (rename onto a non-empty directory fails); keep theirs.
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
