"""The tiny Qwen2.5-VL builder: same bytes from a seed, loads and generates in transformers, and
turns small images into few vision tokens."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from maye_pl.models import tiny
from maye_pl.models.tiny import SPECIAL_TOKENS, build_tiny_qwen2_5_vl, ensure_tiny_model


def _file_bytes(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def test_same_seed_gives_same_bytes(tiny_model_dir: Path, tmp_path: Path) -> None:
    again = build_tiny_qwen2_5_vl(tmp_path / "again", seed=0)
    assert _file_bytes(again) == _file_bytes(tiny_model_dir)
    other = build_tiny_qwen2_5_vl(tmp_path / "other", seed=1)
    assert (other / "model.safetensors").read_bytes() != (
        tiny_model_dir / "model.safetensors"
    ).read_bytes()


def test_tokenizer_has_qwen_special_tokens_and_short_text(tiny_processor) -> None:
    tokenizer = tiny_processor.tokenizer
    unk = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    ids = [tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS]
    assert len(set(ids)) == len(SPECIAL_TOKENS) and all(i >= 256 for i in ids)
    assert ids.count(unk) == 1  # only <|endoftext|> itself maps to the unk id
    assert tokenizer.eos_token == "<|im_end|>"
    # A trained BPE: the sentence is far shorter in tokens than in bytes.
    sentence = "Let me think step by step. The answer is \\boxed{12}."
    assert len(tokenizer(sentence).input_ids) < len(sentence) / 2.5
    assert tokenizer.decode(tokenizer(sentence).input_ids) == sentence


def test_processor_turns_64px_image_into_four_vision_tokens(tiny_processor) -> None:
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Area?"}]}]
    text = tiny_processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text.count("<|vision_start|><|image_pad|><|vision_end|>") == 1
    assert text.endswith("<|im_start|>assistant\n")
    batch = tiny_processor(
        text=[text], images=[Image.new("RGB", (64, 64), "red")], return_tensors="pt"
    )
    # 64 px -> 56 x 56 -> 4 x 4 patches of 14 px -> merged 2 x 2 -> 4 tokens.
    assert batch["image_grid_thw"].tolist() == [[1, 4, 4]]
    image_pad = tiny_processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert int((batch["input_ids"] == image_pad).sum()) == 4
    big = tiny_processor(
        text=[text], images=[Image.new("RGB", (300, 200), "red")], return_tensors="pt"
    )
    assert (
        int((big["input_ids"] == image_pad).sum()) <= 16
    )  # max_pixels caps any image at 16 tokens


def test_loads_in_transformers_and_generates(tiny_model_dir: Path, tiny_processor) -> None:
    from transformers import Qwen2_5_VLForConditionalGeneration

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_model_dir)
    assert model.dtype == torch.float32
    assert sum(p.numel() for p in model.parameters()) < 1_000_000
    assert model.generation_config.eos_token_id == [
        tiny_processor.tokenizer.convert_tokens_to_ids("<|im_end|>"),
        tiny_processor.tokenizer.convert_tokens_to_ids("<|endoftext|>"),
    ]
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Area?"}]}]
    text = tiny_processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    batch = tiny_processor(
        text=[text], images=[Image.new("RGB", (64, 64), "blue")], return_tensors="pt"
    )
    out = model.generate(**batch, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    assert out.shape == (1, batch["input_ids"].shape[1] + 5)


def test_ensure_builds_once_and_a_failed_build_leaves_nothing(tmp_path: Path, monkeypatch) -> None:
    target = ensure_tiny_model(tmp_path / "tiny", seed=0)
    stamp = (target / "model.safetensors").stat().st_mtime_ns
    assert ensure_tiny_model(target) == target
    assert (target / "model.safetensors").stat().st_mtime_ns == stamp  # not rebuilt

    def killed_midway(out_dir, seed=0):
        (Path(out_dir) / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(tiny, "build_tiny_qwen2_5_vl", killed_midway)
    with pytest.raises(KeyboardInterrupt):
        ensure_tiny_model(tmp_path / "half")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny"]  # no half model, no staging dir
