"""Prompt lengths as the engine counts them, checked before the engine starts.

vLLM refuses a prompt that leaves no room for a single response token, and cuts short the response
of a prompt longer than ``rollout.max_model_len`` minus the max new tokens (a response the length
penalty then punishes for the prompt's sake); it finds out only when that prompt's batch comes up,
possibly hours into a run. So the limit is max_model_len minus the max new tokens, and the data
module tokenizes every prompt of every split once, in ``setup()``, exactly as the engine sees it: the prompt text from ``PromptCollator`` (chat template, one image
placeholder) and the processor's own expansion of that placeholder into the image's vision tokens
(``models.policy_inputs.encode_prompt``, the call the trainer makes). Over-long prompts are then either
reported all together, each as ``path:line``, or dropped (``data.drop_overlong``).

Token counts are cached as JSON under ``cache_dir``, one file per (split file contents, image
files' sizes and modification times, processor files, prompt style), so a second run of the same
data reads them instead of re-tokenizing, and any change to one of those re-tokenizes.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from lightning.pytorch.utilities.rank_zero import rank_zero_info

from maye_pl.models.policy_inputs import encode_prompt
from maye_pl.types import RolloutRequest

CACHE_FORMAT = 1
"""Bumped when the counting itself changes, so old cache files are never read."""

PROCESSOR_FILE_SUFFIXES = (".json", ".jinja", ".txt", ".model", ".tiktoken")
"""Files of a model directory that can change how a prompt is tokenized (not the weights)."""


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/maye_pl/prompt_tokens`` (``~/.cache/maye_pl/prompt_tokens`` by default)."""
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "maye_pl" / "prompt_tokens"


def _cache_key(split_path: Path, samples: list[Any], processor_path: Path, prompt_style: str) -> str:
    digest = hashlib.sha256(f"{CACHE_FORMAT}|{prompt_style}|{len(samples)}".encode())
    digest.update(split_path.read_bytes())
    for path in sorted(processor_path.iterdir()):
        if path.suffix in PROCESSOR_FILE_SUFFIXES and path.is_file():
            digest.update(path.name.encode() + path.read_bytes())
    for sample in samples:  # the processor's resize depends on the image's size, so its file counts
        stat = sample.image_path.stat()
        digest.update(f"{sample.image_path}|{stat.st_size}|{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:32]


def prompt_token_counts(dataset: Any, collate: Any) -> list[int]:
    """Tokens of each item's prompt with its image expanded, as the engine receives it.

    Args:
        dataset: A ``MayeDataset`` (item i: the sample with its image loaded).
        collate: The ``PromptCollator`` the split's loader uses (renders the prompt text).
    """
    counts = []
    for index in range(len(dataset)):
        [item] = collate([dataset[index]])
        encoded = encode_prompt(collate.processor, RolloutRequest(item["prompt"], [item["image"]]))
        counts.append(int(encoded["input_ids"].shape[1]))
    return counts


def cached_prompt_token_counts(dataset: Any, collate: Any, split_path: Path, processor_path: Path,
                               cache_dir: Path) -> list[int]:
    """``prompt_token_counts``, read from ``cache_dir`` when this exact data was counted before.

    The cache file is written atomically (rename), so ranks counting the same split at once, or a
    run killed mid-write, never leave a half-written file that a later run would trust.
    """
    key = _cache_key(split_path, dataset.samples, processor_path, collate.prompt_style)
    cache_file = cache_dir / f"{split_path.stem}-{key}.json"
    if cache_file.is_file():
        try:
            counts = json.loads(cache_file.read_text())["counts"]
            if len(counts) == len(dataset):
                return counts
        except (ValueError, KeyError):  # unreadable: count again and overwrite it
            pass
    counts = prompt_token_counts(dataset, collate)
    cache_dir.mkdir(parents=True, exist_ok=True)
    partial = cache_file.with_name(f".{cache_file.name}.{os.getpid()}.partial")
    partial.write_text(json.dumps({"split": str(split_path), "counts": counts}))
    os.replace(partial, cache_file)
    return counts


def overlong_prompts(dataset: Any, counts: list[int], limit: int) -> list[str]:
    """One ``path:line: question: prompt is N tokens, the limit is M — fix`` line per offender."""
    return [
        f"{sample.source}: question: prompt is {count} tokens, the limit is {limit}"
        " (`rollout.max_model_len` minus the max new tokens) — shorten the question or shrink its image,"
        " raise `rollout.max_model_len` or lower the max new tokens, or set `data.drop_overlong: true`"
        " to skip such prompts"
        for sample, count in zip(dataset.samples, counts)
        if count > limit
    ]


def drop_overlong_prompts(dataset: Any, counts: list[int], limit: int) -> None:
    """Remove the prompts over ``limit`` tokens from ``dataset.samples`` and say how many went."""
    kept = [sample for sample, count in zip(dataset.samples, counts) if count <= limit]
    dropped = len(dataset.samples) - len(kept)
    if dropped:
        rank_zero_info(
            f"data.drop_overlong: dropped {dropped} of {len(dataset.samples)} {dataset.split} prompts"
            f" longer than {limit} tokens"
        )
    dataset.samples = kept
