"""Prompt lengths are counted as the engine counts them and checked in setup(), before any engine.

- The count is the rendered prompt's tokens with the one image placeholder expanded into the
  image's vision tokens (hand-derived below from the tiny processor's 14 px patches merged 2x2).
- Over-long prompts of every split are listed together as path:line with N and the limit; with
  ``drop_overlong`` they are dropped instead and the rest trains.
- Counts are cached: a second setup reads them (no tokenization), and editing the split counts again.
- vLLM itself measures the same prompt length (its refusal message quotes it). vLLM only refuses
  prompts of max_model_len tokens or more; the stricter limit (minus the max new tokens) keeps
  every response's full budget instead of letting the context cut it short.
"""

import json

import pytest
from PIL import Image

from maye_pl.data import DatasetError, MayeDataModule
from maye_pl.data.datamodule import MayeDataset, PromptCollator
from maye_pl.data.jsonl import load_split
import maye_pl.data.lengths as lengths
from maye_pl.models.adapters import ADAPTERS
from maye_pl.types import RolloutRequest, SamplingConfig

QWEN2_5_VL = ADAPTERS["qwen2_5_vl"]  # the tiny model's family


def _split(tmp_path, questions: list[str], sizes: list[tuple[int, int]], name: str = "train") -> str:
    (tmp_path / "images").mkdir(exist_ok=True)
    lines = []
    for i, (question, size) in enumerate(zip(questions, sizes)):
        Image.new("RGB", size, "white").save(tmp_path / "images" / f"{name}{i}.png")
        lines.append(json.dumps({"id": f"{name}{i}", "question": "<image>" + question, "answer": "1",
                                 "solution": "\\boxed{1}", "image": f"images/{name}{i}.png"}))
    path = tmp_path / f"{name}.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def _text_tokens(processor, question: str) -> int:
    """Tokens of the rendered prompt text, its single <|image_pad|> counted once."""
    collate = PromptCollator(processor, "cot", QWEN2_5_VL.image_placeholder)
    [item] = collate([{"question": "<image>" + question, "source": "x"}])
    return len(processor.tokenizer(item["prompt"])["input_ids"])


def test_count_is_the_prompt_with_its_image_expanded(tiny_processor, tiny_model_dir, tmp_path):
    # 56x56 px = 4x4 patches of 14 px, merged 2x2 -> 4 vision tokens; 112x56 -> 8x4 / 4 = 8.
    path = _split(tmp_path, ["Find x.", "What is the area of the triangle?"], [(56, 56), (112, 56)])
    dataset = MayeDataset(load_split(path), "train")
    counts = lengths.prompt_token_counts(dataset, PromptCollator(tiny_processor, "cot", QWEN2_5_VL.image_placeholder))
    assert counts == [_text_tokens(tiny_processor, "Find x.") - 1 + 4,
                      _text_tokens(tiny_processor, "What is the area of the triangle?") - 1 + 8]


def _module(tiny_model_dir, tmp_path, train, val, **kwargs):
    return MayeDataModule(train_path=train, val_path=val, processor_path=tiny_model_dir, batch_size=1,
                          token_count_cache=tmp_path / "cache", **kwargs)


def test_overlong_prompts_of_all_splits_are_listed_or_dropped(tiny_processor, tiny_model_dir, tmp_path, caplog):
    short, long = "Find x.", "Find x. " + "The figure shows a triangle. " * 20
    limit = _text_tokens(tiny_processor, short) - 1 + 4  # exactly the short prompt: it fits
    train = _split(tmp_path, [short, long, short], [(56, 56)] * 3)
    val = _split(tmp_path, [long, short], [(56, 56)] * 2, name="val")
    n_long = _text_tokens(tiny_processor, long) - 1 + 4
    with pytest.raises(DatasetError) as info:
        _module(tiny_model_dir, tmp_path, train, val, max_prompt_tokens=limit, max_eval_prompt_tokens=limit).setup()
    assert [p.split(" (")[0] for p in info.value.problems] == [
        f"{train}:2: question: prompt is {n_long} tokens, the limit is {limit}",
        f"{val}:1: question: prompt is {n_long} tokens, the limit is {limit}",
    ]
    assert "set `data.drop_overlong: true`" in info.value.problems[0]

    dm = _module(tiny_model_dir, tmp_path, train, val, max_prompt_tokens=limit, max_eval_prompt_tokens=limit,
                 drop_overlong=True)
    with caplog.at_level("INFO"):
        dm.setup()
    assert [s.id for s in dm.datasets["train"].samples] == ["train0", "train2"]
    assert [s.id for s in dm.datasets["val"].samples] == ["val1"]
    assert f"dropped 1 of 3 train prompts longer than {limit} tokens" in caplog.text
    assert f"dropped 1 of 2 val prompts longer than {limit} tokens" in caplog.text


def test_counts_are_cached_until_the_split_changes(tiny_model_dir, tmp_path, monkeypatch):
    train = _split(tmp_path, ["Find x.", "Find y."], [(56, 56)] * 2)
    _module(tiny_model_dir, tmp_path, train, None, max_prompt_tokens=1000).setup()
    assert len(list((tmp_path / "cache").glob("train-*.json"))) == 1

    def no_tokenizing(*args):
        raise AssertionError("tokenized again although the counts are cached")

    monkeypatch.setattr(lengths, "prompt_token_counts", no_tokenizing)
    _module(tiny_model_dir, tmp_path, train, None, max_prompt_tokens=1000).setup()  # reads the cache
    with open(train, "a") as file:  # one more sample: new file contents, new key
        file.write(json.dumps({"id": "t9", "question": "<image>Find z.", "answer": "1", "solution": "\\boxed{1}",
                               "image": "images/train0.png"}) + "\n")
    with pytest.raises(AssertionError, match="tokenized again"):
        _module(tiny_model_dir, tmp_path, train, None, max_prompt_tokens=1000).setup()


@pytest.mark.vllm
def test_vllm_measures_the_same_length(vllm_engine, tiny_processor, tmp_path):
    """A prompt we count as exactly 1024 tokens (112x56 image: 8 vision tokens) is one token too
    long for the shared engine (max_model_len 1024 leaves no room for a response), and vLLM's
    refusal quotes the same length: it expands the image placeholder as we do."""
    from maye_pl.rollout.vllm_engine import VLLMEngineError

    collate = PromptCollator(tiny_processor, "cot", QWEN2_5_VL.image_placeholder)

    def counted(words: int) -> tuple[MayeDataset, int]:
        path = _split(tmp_path, ["Find x." + " a" * words], [(112, 56)])
        dataset = MayeDataset(load_split(path), "train")
        return dataset, lengths.prompt_token_counts(dataset, collate)[0]

    _, base = counted(0)
    dataset, count = counted(1024 - base)  # " a" is one token each
    assert count == 1024
    [item] = collate([dataset[0]])
    with pytest.raises(VLLMEngineError, match=r"The decoder prompt \(length 1024\) plus"):
        vllm_engine.generate([RolloutRequest(item["prompt"], [item["image"]])], SamplingConfig(max_tokens=2))
