"""The DataModule: validated MAYE splits → batches of prompts (question, image, golden answer).

A batch is a plain ``list[dict]`` (one dict per prompt), not tensors: the rollout engine wants the
prompt text and the PIL image, and the trainer runs the processor itself once responses exist.
Images are loaded and converted to RGB in ``__getitem__`` (so DataLoader workers do the decoding)
at their file size; the processor resizes them to its pixel bounds later, identically for the
engine and the trainer.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from transformers import AutoProcessor

from maye_pl.data.jsonl import DatasetError, Sample, load_splits
from maye_pl.data.lengths import (cached_prompt_token_counts, default_cache_dir, drop_overlong_prompts,
                                  overlong_prompts)
from maye_pl.data.prompts import PROMPT_STYLES, render_prompt
from maye_pl.errors import ConfigError
from maye_pl.data.sampler import ResumableDataLoader, ResumableSampler
from maye_pl.models.adapters import adapter_for


class MayeDataset(Dataset):
    """Validated samples of one split; item i is a dict with the image loaded as PIL RGB."""

    def __init__(self, samples: list[Sample], split: str):
        self.samples = samples
        self.split = split

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = self.samples[index]
        try:
            with Image.open(sample.image_path) as image:
                rgb = image.convert("RGB")
        except Exception as exc:  # validated at setup, so the file changed or decodes badly
            raise DatasetError([
                f"{sample.source}: image: unreadable image ({sample.image_path}:"
                f" {type(exc).__name__}: {exc}) — re-export it as PNG or JPEG"
            ]) from exc
        return {"id": sample.id, "question": sample.question, "answer": sample.answer,
                "solution": sample.solution, "source": sample.source, "split": self.split, "image": rgb}


class PromptCollator:
    """Collate function: adds each item's ``prompt`` text, with exactly one image placeholder.

    A class rather than a closure so DataLoader workers started with ``spawn`` can pickle it.
    """

    def __init__(self, processor: Any, prompt_style: str, image_placeholder: str):
        self.processor = processor
        self.prompt_style = prompt_style
        self.image_placeholder = image_placeholder  # the model family's, for raw-text prompts

    def __call__(self, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        batch = []
        for item in items:
            prompt = render_prompt(self.processor, item["question"], self.prompt_style, self.image_placeholder)
            count = prompt.count(self.processor.image_token)
            if count != 1:
                fix = ("remove that token from the question text" if count > 1 else
                       "use a processor whose chat template renders {'type': 'image'} parts")
                raise DatasetError([
                    f"{item['source']}: question: the {self.prompt_style!r} prompt holds {count}"
                    f" image placeholders ({self.processor.image_token!r}) but the sample has 1"
                    f" image — {fix}"
                ])
            batch.append({**item, "prompt": prompt})
        return batch


class MayeDataModule(L.LightningDataModule):
    """MAYE jsonl splits as Lightning dataloaders of prompt batches.

    Every line of every configured split is validated once, in the first ``setup()`` (before any
    training step and before the engine starts), and so is every prompt's length in tokens as the
    engine counts them (``data/lengths.py``) against the limits the CLI links from
    ``rollout.max_model_len`` and the max new tokens; all problems of all splits are raised
    together as one ``DatasetError`` (or, with ``drop_overlong``, over-long prompts are dropped).
    Training batches are shuffled and the last incomplete batch is dropped (every step sees
    ``batch_size`` prompts per rank). The training order is a ``ResumableSampler``: epoch e is one
    permutation from the ``seed_everything`` seed + e, sharded over the ranks by the sampler itself
    (so ``Trainer(use_distributed_sampler=...)`` changes nothing), and a checkpoint taken mid-epoch
    resumes at the next unseen prompt. Val/test keep file order and every sample.

    Saved state: the training sampler's position (``state_dict``). The data module, not the loader,
    carries it because Lightning restores data modules on every path, while a stateful loader's
    state is silently dropped when ``configure_optimizers`` reads
    ``trainer.estimated_stepping_batches`` (Lightning issue #20550; ReinforcePP does with
    ``max_epochs``).
    """

    def __init__(
        self,
        train_path: str | Path,
        val_path: str | Path | None = None,
        test_path: str | Path | None = None,
        batch_size: int = 8,
        eval_batch_size: int = 8,
        prompt_style: str = "cot",
        processor_path: str | Path | None = None,
        num_workers: int = 0,
        max_train_samples: int | None = None,
        max_eval_samples: int | None = None,
        max_prompt_tokens: int | None = None,
        max_eval_prompt_tokens: int | None = None,
        drop_overlong: bool = False,
        token_count_cache: str | Path | None = None,
    ):
        """
        Args:
            train_path: Training split, a MAYE jsonl file (image paths relative to its directory).
            val_path: Validation split (jsonl); None for no validation set.
            test_path: Test split (jsonl); None for no test set.
            batch_size: Prompts per rank per training step (MAYE: 128 per rank).
            eval_batch_size: Prompts per rank per validation/test batch.
            prompt_style: "cot" (MAYE's chat chain-of-thought prompt) or "zero_shot" (MAYE's
                R1-Zero style raw-text prompt, no chat template).
            processor_path: Directory of the HF processor (the model's directory; the CLI links
                it from the model path).
            num_workers: DataLoader worker processes (image decoding happens there).
            max_train_samples: Use only the first N training samples (None: all); for demos.
            max_eval_samples: Use only the first N samples of each eval split (None: all).
            max_prompt_tokens: Longest training prompt in tokens (image tokens included); the CLI
                links it to ``rollout.max_model_len`` minus ``model.sampling.max_tokens``. None:
                no check (a model that does not generate from training prompts, e.g. SFT).
            max_eval_prompt_tokens: Longest val/test prompt in tokens; the CLI links it to
                ``rollout.max_model_len`` minus the evaluation max new tokens. None: no check.
            drop_overlong: Drop prompts over their limit (logging how many per split) instead of
                stopping with the list of them.
            token_count_cache: Directory of the cached prompt token counts; None:
                ``$XDG_CACHE_HOME/maye_pl/prompt_tokens`` (``~/.cache/...``).
        """
        super().__init__()
        problems = []
        for name, value in (("batch_size", batch_size), ("eval_batch_size", eval_batch_size)):
            if value < 1:
                problems.append(f"`data.{name}`={value} must be at least 1; give a positive size")
        if prompt_style not in PROMPT_STYLES:
            problems.append(f"`data.prompt_style`={prompt_style!r} is not a known prompt style;"
                            f" use one of {sorted(PROMPT_STYLES)}")
        if processor_path is None:
            problems.append("`data.processor_path` is not set; give the model's directory (the CLI"
                            " links it from the model's path)")
        if num_workers < 0:
            problems.append(f"`data.num_workers`={num_workers} must be >= 0; use 0 for no workers")
        for name, value in (("max_train_samples", max_train_samples),
                            ("max_eval_samples", max_eval_samples)):
            if value is not None and value < 1:
                problems.append(
                    f"`data.{name}`={value} must be at least 1; use null for all samples")
        for name, value in (("max_prompt_tokens", max_prompt_tokens),
                            ("max_eval_prompt_tokens", max_eval_prompt_tokens)):
            if value is not None and value < 1:
                problems.append(
                    f"`data.{name}`={value} leaves no room for a prompt: `rollout.max_model_len` must"
                    " exceed the max new tokens (`model.sampling.max_tokens` / eval max tokens); raise it"
                    " or generate fewer tokens")
        if problems:
            raise ValueError("invalid data config:\n  " + "\n  ".join(problems))

        self.paths = {name: Path(path) for name, path in
                      (("train", train_path), ("val", val_path), ("test", test_path)) if path}
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.prompt_style = prompt_style
        self.processor_path = Path(processor_path)
        self.num_workers = num_workers
        self.limits = {"train": max_train_samples, "val": max_eval_samples,
                       "test": max_eval_samples}
        self.prompt_token_limits = {"train": max_prompt_tokens, "val": max_eval_prompt_tokens,
                                    "test": max_eval_prompt_tokens}
        self.drop_overlong = drop_overlong
        self.token_count_cache = Path(token_count_cache) if token_count_cache else default_cache_dir()
        self.datasets: dict[str, MayeDataset] | None = None
        self.processor: Any = None
        self.train_sampler: ResumableSampler | None = None
        # A checkpoint's sampler state that arrived before train_dataloader() built the sampler.
        self._sampler_state_to_load: dict[str, Any] | None = None

    def setup(self, stage: str | None = None) -> None:
        """Validate every configured split (once) and load the processor."""
        if self.datasets is not None:
            return
        if not self.processor_path.is_dir():
            raise ConfigError(
                f"`data.processor_path`={str(self.processor_path)!r} is not a directory; point it"
                " at the model directory holding the processor files"
            )
        splits = load_splits(self.paths)
        self.processor = AutoProcessor.from_pretrained(self.processor_path)
        self.image_placeholder = adapter_for(self.processor_path).image_placeholder
        datasets = {name: MayeDataset(samples[: self.limits[name]], name) for name, samples in splits.items()}
        self._check_prompt_lengths(datasets)
        self.datasets = datasets

    def _check_prompt_lengths(self, datasets: dict[str, MayeDataset]) -> None:
        """Count every prompt's tokens (cached) and stop on, or drop, those over their split's limit.

        Under a multi-rank trainer, global rank 0 counts first and the other ranks then read its
        cache (a barrier between), instead of every rank tokenizing the whole data set.
        """
        limited = {name: d for name, d in datasets.items() if self.prompt_token_limits[name] is not None}
        counted: dict[str, list[int]] = {}

        def count() -> None:
            for name, dataset in limited.items():
                counted[name] = cached_prompt_token_counts(
                    dataset, self._collator(), self.paths[name],
                    self.processor_path, self.token_count_cache)

        trainer = self.trainer
        if trainer is None or trainer.world_size == 1:
            count()
        elif trainer.is_global_zero:
            try:
                count()
            finally:  # the other ranks wait for the cache even when counting failed here
                trainer.strategy.barrier("MayeDataModule: prompt token counts cached")
        else:
            trainer.strategy.barrier("MayeDataModule: prompt token counts cached")
            count()
        problems = []
        for name, dataset in limited.items():
            limit, counts = self.prompt_token_limits[name], counted[name]
            if self.drop_overlong:
                drop_overlong_prompts(dataset, counts, limit)
            else:
                problems += overlong_prompts(dataset, counts, limit)
        if problems:
            raise DatasetError(problems)

    def _check_setup(self) -> None:
        if self.datasets is None:
            raise RuntimeError("MayeDataModule: call setup() before asking for dataloaders")

    def _eval_loader(self, split: str) -> DataLoader | list:
        self._check_setup()
        if split not in self.datasets:
            return []  # Lightning runs no loop for an empty list of dataloaders
        return DataLoader(self.datasets[split], batch_size=self.eval_batch_size, num_workers=self.num_workers,
                          collate_fn=self._collator())

    def train_dataloader(self) -> ResumableDataLoader:
        """Shuffled training batches of ``batch_size`` prompts per rank; the incomplete tail is dropped."""
        self._check_setup()
        dataset = self.datasets["train"]
        world_size, rank = self._world()
        sampler = ResumableSampler(dataset, num_replicas=world_size, rank=rank,
                                   seed=int(os.environ.get("PL_GLOBAL_SEED", 0)))
        if len(sampler) < self.batch_size:
            raise ConfigError(
                f"`data.batch_size`={self.batch_size} exceeds the {len(sampler)} training samples per"
                f" rank ({len(dataset)} in {self.paths['train']} over {world_size} rank(s)), so an"
                " epoch has no full batch; lower the batch size or add samples"
            )
        if self._sampler_state_to_load is not None:
            sampler.load_state_dict(self._sampler_state_to_load)
            self._sampler_state_to_load = None
        self.train_sampler = sampler
        return ResumableDataLoader(dataset, sampler, self.batch_size, num_workers=self.num_workers,
                                   collate_fn=self._collator())

    def peek_train_batch(self, batches_ahead: int, batches_left_in_epoch: int, next_epoch: bool) -> list[dict] | None:
        """The training batch the loader will hand out ``batches_ahead`` batches after the current
        one (1 = the next), read without moving the loader; None when the run ends first.

        Args:
            batches_ahead: How far ahead (>= 1).
            batches_left_in_epoch: Batches the trainer will still take from this epoch after the
                current one (it knows ``limit_train_batches``).
            next_epoch: Whether another epoch follows this one (the peek may reach into it).
        """
        sampler = self.train_sampler
        rows = self.batch_size * sampler.num_replicas  # prompts per batch over all ranks
        batches_left_in_epoch = min(batches_left_in_epoch, (len(sampler.epoch_order()) - sampler.consumed) // rows)
        if batches_ahead <= batches_left_in_epoch:
            epoch, position = sampler.epoch, sampler.consumed + (batches_ahead - 1) * rows
        elif next_epoch and batches_ahead - batches_left_in_epoch <= len(sampler) // self.batch_size:
            epoch, position = sampler.epoch + 1, (batches_ahead - batches_left_in_epoch - 1) * rows
        else:
            return None
        dataset = self.datasets["train"]
        items = [dataset[index] for index in sampler.batch_indices(epoch, position, self.batch_size)]
        return self._collator()(items)

    def draw_train_prompts(self, seed: int, start: int, count: int, exclude: set[str]) -> list[dict]:
        """``count`` training prompts from position ``start`` of the split's permutation by ``seed``,
        skipping the ids in ``exclude`` (past the end it wraps around); the loader does not move.

        DAPO's dynamic sampling draws its extra prompts here (``maye_pl.rollout.dynamic_sampling``):
        a function of (seed, start, exclude) only, so a resumed run draws the same ones.
        """
        dataset = self.datasets["train"]
        order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed)).tolist()
        allowed = [index for index in order if dataset.samples[index].id not in exclude] or order
        items = [dataset[allowed[(start + i) % len(allowed)]] for i in range(count)]
        return self._collator()(items)

    def _collator(self) -> PromptCollator:
        return PromptCollator(self.processor, self.prompt_style, self.image_placeholder)

    def _world(self) -> tuple[int, int]:
        """(world size, global rank): the trainer's, else the process group's, else one process."""
        if self.trainer is not None:
            return self.trainer.world_size, self.trainer.global_rank
        if dist.is_available() and dist.is_initialized():
            return dist.get_world_size(), dist.get_rank()
        return 1, 0

    def state_dict(self) -> dict[str, Any]:
        """The training sampler's position (nothing before ``train_dataloader()`` ran)."""
        return {} if self.train_sampler is None else {"train_sampler": self.train_sampler.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Resume the training order; Lightning calls this before or after ``train_dataloader()``
        depending on the strategy and on whether the trainer read its length early."""
        if "train_sampler" not in state_dict:
            raise KeyError(
                f"MayeDataModule.load_state_dict: the checkpoint's data module state has keys "
                f"{sorted(state_dict)}, not 'train_sampler'; resume from a checkpoint written by maye_pl."
            )
        if self.train_sampler is not None:
            self.train_sampler.load_state_dict(state_dict["train_sampler"])
        else:
            self._sampler_state_to_load = state_dict["train_sampler"]

    def val_dataloader(self) -> list[DataLoader]:
        """The validation loop scores val AND test, in file order: the paper reports both after
        every epoch. Each item's ``split`` says which; a split without a path is left out."""
        return [loader for split in ("val", "test") if (loader := self._eval_loader(split))]

    def test_dataloader(self) -> DataLoader | list:
        """Test batches in file order (an empty list when no ``test_path``)."""
        return self._eval_loader("test")
