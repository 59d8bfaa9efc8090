"""The tiny builds of every family: same bytes from a seed, load and generate in transformers, and
turn small images into few vision tokens; a demo path's name picks the family."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from maye_pl.models import tiny
from maye_pl.models.tiny import SPECIAL_TOKENS, build_tiny_model, ensure_tiny_model, tiny_model_type

MODEL_CLASSES = {
    "qwen2_vl": "Qwen2VLForConditionalGeneration",
    "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
    "qwen3_vl": "Qwen3VLForConditionalGeneration",
    "qwen3_5": "Qwen3_5ForConditionalGeneration",
}


def _file_bytes(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def test_same_seed_gives_same_bytes(family: str, family_model_dir: Path, tmp_path: Path) -> None:
    again = build_tiny_model(tmp_path / "again", family, seed=0)
    assert _file_bytes(again) == _file_bytes(family_model_dir)
    other = build_tiny_model(tmp_path / "other", family, seed=1)
    assert (other / "model.safetensors").read_bytes() != (
        family_model_dir / "model.safetensors"
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


def test_processor_turns_64px_image_into_four_vision_tokens(family_processor) -> None:
    tiny_processor = family_processor
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Area?"}]}]
    text = tiny_processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text.count("<|vision_start|><|image_pad|><|vision_end|>") == 1
    assert text.endswith("<|im_start|>assistant\n")
    batch = tiny_processor(
        text=[text], images=[Image.new("RGB", (64, 64), "red")], return_tensors="pt"
    )
    # Patch 14: 64 px -> 56 x 56 -> 4 x 4 patches -> merged 2 x 2 -> 4 tokens (patch 16: no resize).
    assert batch["image_grid_thw"].tolist() == [[1, 4, 4]]
    image_pad = tiny_processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert int((batch["input_ids"] == image_pad).sum()) == 4
    big = tiny_processor(
        text=[text], images=[Image.new("RGB", (300, 200), "red")], return_tensors="pt"
    )
    assert (
        int((big["input_ids"] == image_pad).sum()) <= 16
    )  # max_pixels caps any image at 16 tokens


def test_loads_in_transformers_and_generates(family: str, family_model_dir: Path, family_processor) -> None:
    from transformers import AutoModelForImageTextToText

    tiny_processor = family_processor
    model = AutoModelForImageTextToText.from_pretrained(family_model_dir)
    assert type(model).__name__ == MODEL_CLASSES[family] and model.dtype == torch.float32
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

    def killed_midway(out_dir, model_type, seed=0):
        (Path(out_dir) / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(tiny, "build_tiny_model", killed_midway)
    with pytest.raises(KeyboardInterrupt):
        ensure_tiny_model(tmp_path / "half")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny"]  # no half model, no staging dir


def test_a_demo_path_name_picks_the_family() -> None:
    assert tiny_model_type(".cache/tiny-qwen3-vl") == "qwen3_vl"
    assert tiny_model_type(".cache/tiny-qwen2-vl") == "qwen2_vl"
    assert tiny_model_type(".cache/tiny-qwen2.5-vl") == "qwen2_5_vl"
    assert tiny_model_type(".cache/tiny-qwen3.5") == "qwen3_5"
    assert tiny_model_type("/tmp/tiny") == "qwen2_5_vl"  # no family in the name: the default
