"""MAYE-format datasets: jsonl validation, prompts, the DataModule (with a resumable sampler), the
synthetic geometry set."""

from maye_pl.data.datamodule import MayeDataModule, MayeDataset, PromptCollator
from maye_pl.data.geometry import ensure_geometry_dataset, generate_geometry_dataset
from maye_pl.data.jsonl import DatasetError, Sample, load_split, load_splits
from maye_pl.data.prompts import (
    COT_INSTRUCTION,
    PROMPT_STYLES,
    build_messages,
    render_prompt,
    strip_image_placeholder,
)
from maye_pl.data.sampler import ResumableDataLoader, ResumableSampler

__all__ = [
    "COT_INSTRUCTION",
    "PROMPT_STYLES",
    "DatasetError",
    "MayeDataModule",
    "MayeDataset",
    "PromptCollator",
    "ResumableDataLoader",
    "ResumableSampler",
    "Sample",
    "build_messages",
    "ensure_geometry_dataset",
    "generate_geometry_dataset",
    "load_split",
    "load_splits",
    "render_prompt",
    "strip_image_placeholder",
]
