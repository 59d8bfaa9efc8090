"""`--ckpt_path last`: the newest complete checkpoint anywhere under a run's directories.

Lightning's own ``ckpt_path="last"`` looks only for ``last*.ckpt`` files of the ModelCheckpoint
callbacks of the current trainer (whose directory is a fresh ``version_N`` for a new run), so a
restarted job would find nothing. Here every ``*.ckpt`` under the given roots counts: the
epoch/step checkpoints of every earlier version, the one written on SIGTERM/SIGUSR1
(``PreemptionCheckpoint``) and Lightning's SLURM ``hpc_ckpt_N.ckpt``.

A checkpoint counts only when complete. ``FSDP2Strategy`` writes beside the final path
(``.<name>.partial``) and publishes by rename, so hidden names are never candidates; a DCP
directory must hold the metadata DCP writes last and Lightning's ``meta.pt``; a single file must be
a whole zip archive (``torch.save``'s format keeps its directory at the very end, so a file cut
mid-write does not open).
"""

from __future__ import annotations

import zipfile
from collections.abc import Iterable
from pathlib import Path

from lightning.fabric.utilities.load import _METADATA_FILENAME

DCP_METADATA = ".metadata"
"""Written by torch.distributed.checkpoint once every shard is on disk."""


def is_complete_checkpoint(path: Path) -> bool:
    """Whether ``path`` is a whole checkpoint: a DCP directory with both metadata files, or a zip
    archive whose central directory (written last) is intact."""
    if path.is_dir():
        return (path / DCP_METADATA).is_file() and (path / _METADATA_FILENAME).is_file()
    try:
        with zipfile.ZipFile(path) as archive:
            return any(name.endswith("/data.pkl") for name in archive.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


def _written_at(path: Path) -> float:
    """When the checkpoint was finished: a file's mtime, a DCP directory's ``meta.pt`` (written last)."""
    return (path / _METADATA_FILENAME if path.is_dir() else path).stat().st_mtime


def find_checkpoints(root: Path) -> set[Path]:
    """Every ``*.ckpt`` (file or directory) under ``root``, except hidden names (unpublished
    ``.partial`` writes, ``.replaced`` leftovers) and anything inside a checkpoint directory."""
    if not root.is_dir():
        return set()
    found = {p for p in root.rglob("*.ckpt") if not any(part.startswith(".") for part in p.relative_to(root).parts)}
    return {p for p in found if not any(parent in found for parent in p.parents)}


def latest_complete_checkpoint(candidates: Iterable[Path]) -> Path | None:
    """The most recently finished of the complete checkpoints among ``candidates`` (None: none)."""
    return max((p for p in set(candidates) if is_complete_checkpoint(p)), key=_written_at, default=None)
