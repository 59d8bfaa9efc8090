"""Turn a trained policy into a ``save_pretrained`` directory that transformers and vLLM load.

Sources: a Lightning checkpoint (a DCP directory as ``FSDP2Strategy`` writes by default, or a
single .ckpt file) or a plain full state dict. The policy's weights are picked by their
attribute prefix (``policy.``), a LoRA policy's adapters merged into the weights they wrap
(W + alpha/r · B @ A, ``model.lora`` read from the checkpoint's hyperparameters), written by HF's
``save_pretrained`` (config, safetensors in the
on-disk key format, generation config), and the base model's tokenizer / processor / chat
template files are copied next to them. The export is assembled in a temporary sibling directory
and renamed into place, so ``out_dir`` is either complete or absent.

    python -m maye_pl export CKPT OUT_DIR [--base-model DIR] [--prefix policy.] [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from transformers import AutoConfig, GenerationConfig

from maye_pl.models.loading import DTYPES, model_class
from maye_pl.models.lora import LoraArgs, merge_adapters
from maye_pl.strategies.fsdp2 import HF_PATHS_KEY
from maye_pl.strategies.weight_sync import hf_name

# Files save_pretrained writes itself; everything else at the base model's top level is copied.
_WRITTEN_BY_SAVE_PRETRAINED = ("config.json", "generation_config.json", "model.safetensors.index.json")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")
_DCP_METADATA = ".metadata"  # what torch.distributed.checkpoint writes into every checkpoint directory
_LIGHTNING_DCP_META = "meta.pt"  # Lightning's non-tensor checkpoint contents inside a DCP directory


def _select(state: Mapping[str, torch.Tensor], prefix: str, where: str) -> dict[str, torch.Tensor]:
    """The tensors under ``prefix``, keyed by HF name (prefix and wrapper segments removed)."""
    selected = {hf_name(k[len(prefix) :]): v for k, v in state.items() if k.startswith(prefix)}
    if not selected:
        attributes = sorted({k.split(".")[0] for k in state})
        raise KeyError(
            f"export: no tensor under prefix {prefix!r} in {where}; top-level names: {attributes}. Pass --prefix."
        )
    return selected


def read_checkpoint(path: str | os.PathLike, prefix: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Full tensors under ``prefix`` (HF names) and the HF source directories the checkpoint records.

    ``path`` is a Lightning checkpoint: a DCP directory or a single .ckpt file. Returns
    ``(state_dict, {attribute: base model dir})``; the mapping is empty for checkpoints written
    without ``FSDP2Strategy``. A LoRA policy's state comes merged: the plain model's tensors
    (``merge_adapters``). Both formats come from this run's own training, so their pickled parts
    (Lightning's loop state, hyperparameters) are loaded with ``weights_only=False``.
    """
    path = Path(path)
    if (path / _DCP_METADATA).is_file():
        metadata = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
        tensors = {
            key[len("state_dict.") :]: meta
            for key, meta in metadata.items()
            if key.startswith("state_dict.") and isinstance(meta, TensorStorageMetadata)
        }
        _select(tensors, prefix, str(path))  # fail on a wrong prefix before reading anything
        # Read only the policy's tensors: no optimizer state, no reference model.
        state = {
            k: torch.empty(meta.size, dtype=meta.properties.dtype)
            for k, meta in tensors.items()
            if k.startswith(prefix)
        }
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load({"state_dict": state}, checkpoint_id=path, no_dist=True)
        meta_file = path / _LIGHTNING_DCP_META
        extra = torch.load(meta_file, weights_only=False) if meta_file.is_file() else {}
    elif path.is_file():
        extra = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
        if "state_dict" not in extra:
            raise ValueError(f"export: {path} has no 'state_dict' key; pass a Lightning checkpoint (.ckpt or DCP dir).")
        state = extra["state_dict"]
    else:
        raise FileNotFoundError(
            f"export: {path} is neither a checkpoint file nor a DCP directory (no {_DCP_METADATA} inside)."
        )
    state = _merged(_select(state, prefix, str(path)), extra.get("hyper_parameters") or {}, str(path))
    return state, dict(extra.get(HF_PATHS_KEY, {}))


def _merged(state: dict[str, torch.Tensor], hparams: Mapping, where: str) -> dict[str, torch.Tensor]:
    """``state`` with its LoRA adapters (if any) merged, scaled by the run's ``model.lora``."""
    if not any(".lora_A." in key for key in state):
        return state
    lora = hparams.get("lora") or {}
    if not lora.get("r"):
        raise ValueError(
            f"export: {where} holds LoRA adapters but its hyperparameters record no `lora` with r > 0 "
            f"(got {lora!r}); merge them yourself with maye_pl.models.lora.merge_adapters(state, alpha / r)."
        )
    return merge_adapters(state, LoraArgs(**lora).scaling)


def export_hf(
    source: str | os.PathLike | Mapping[str, torch.Tensor],
    out_dir: str | os.PathLike,
    *,
    base_model_dir: str | os.PathLike | None = None,
    prefix: str = "policy.",
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``source``'s policy as a ``save_pretrained`` directory at ``out_dir``; return ``out_dir``.

    Args:
        source: a Lightning checkpoint path (DCP directory or .ckpt file), or a full state dict.
        out_dir: where the export goes (created atomically).
        base_model_dir: the model the policy was trained from (config, tokenizer, processor files);
            default: the directory ``FSDP2Strategy`` recorded in the checkpoint for the attribute
            named by ``prefix``. Required for a state dict source.
        prefix: key prefix of the policy's tensors (the LightningModule attribute plus a dot);
            "" for a state dict already in HF names.
        dtype: dtype of the saved weights; default: the base model config's dtype.
        overwrite: replace an existing ``out_dir``.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"export: {out_dir} exists; pass overwrite=True (--overwrite) or another directory.")
    if isinstance(source, Mapping):
        state, recorded = _merged(_select(source, prefix, "the given state dict"), {}, "the given state dict"), {}
    else:
        state, recorded = read_checkpoint(source, prefix)
    attribute = prefix.rstrip(".")
    base = Path(base_model_dir) if base_model_dir is not None else recorded.get(attribute)
    if base is None:
        raise ValueError(
            f"export: no base model directory for {attribute!r} (the checkpoint records {sorted(recorded)});"
            " pass base_model_dir (--base-model)."
        )
    base = Path(base)
    config = AutoConfig.from_pretrained(base)
    dtype = dtype or config.dtype or torch.float32
    with torch.device("meta"):
        model = model_class(config)._from_config(config, dtype=dtype)  # noqa: SLF001
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=True, assign=True)
    model.tie_weights()
    if (base / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(base)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.exporting-", dir=out_dir.parent))
    try:
        model.save_pretrained(staging)
        for file in sorted(base.iterdir()):
            written = file.name in _WRITTEN_BY_SAVE_PRETRAINED or file.name.endswith(_WEIGHT_SUFFIXES)
            if file.is_file() and not written:
                shutil.copy2(file, staging / file.name)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        staging.rename(out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m maye_pl export CKPT OUT_DIR``: a Lightning checkpoint to a HF model directory."""
    parser = argparse.ArgumentParser(
        prog="python -m maye_pl export",
        description="Export the trained policy of a Lightning checkpoint as a transformers save_pretrained directory.",
    )
    parser.add_argument("checkpoint", help="Lightning checkpoint: a DCP directory (FSDP2Strategy) or a .ckpt file")
    parser.add_argument("out_dir", help="output directory (must not exist unless --overwrite)")
    parser.add_argument(
        "--base-model",
        default=None,
        help="the model trained from (config, tokenizer, processor); default: recorded in the checkpoint",
    )
    parser.add_argument("--prefix", default="policy.", help="checkpoint key prefix of the policy (default: policy.)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="weight dtype (default: base config's)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing out_dir")
    args = parser.parse_args(argv)
    out = export_hf(
        args.checkpoint,
        args.out_dir,
        base_model_dir=args.base_model,
        prefix=args.prefix,
        dtype=DTYPES[args.dtype] if args.dtype else None,
        overwrite=args.overwrite,
    )
    print(f"exported {args.checkpoint} -> {out}")
