"""The CPU demo's assets, built on first use (``demo_assets: true``): nothing is downloaded.

    .cache/tiny-qwen2.5-vl          tiny random Qwen2.5-VL (and -qwen2-vl, -qwen3-vl for the other
                                    families' demos): ``maye_pl.models.tiny``
    datasets/demo_geometry/         the shaded-area task (``maye_pl.data.geometry``): a 4x4 grid of
                                    unit squares, "find the area of the shaded region"; the answer
                                    is only in the figure. Splits train / val / test for RL and
                                    evaluation, and sft, the warm start's own problems
    .cache/demo-sft-qwen2.5-vl      the warm start: configs/sft_demo.yaml (the project's SFT) run on
                                    the sft split from the tiny random model, without its
                                    evaluation; configs/demo.yaml's Reinforce++ starts here

A random policy never writes a boxed answer, so its reward is always 0 and Reinforce++ has
nothing to learn from; the SFT warm start teaches the answer format (MAYE's Vanilla is an
instruction-tuned model for the same reason), and RL teaches it to read the figure: the warm
start's answers are about at chance. The warm start carries a stamp: a digest of its recipe
file, the base model's files and the sft split. A different digest (a changed recipe, a rebuilt
base model or data set) rebuilds it; an interrupted build leaves no directory behind.

Only these paths are built, and only when a config points at them: a path the user set is theirs.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import yaml
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from maye_pl.data.geometry import ensure_geometry_dataset
from maye_pl.errors import ConfigError
from maye_pl.models.tiny import ensure_tiny_model, tiny_model_type

DEMO_MODEL_PATHS = (Path(".cache/tiny-qwen2.5-vl"), Path(".cache/tiny-qwen2-vl"), Path(".cache/tiny-qwen3-vl"))
"""The demo configs' tiny random models, one per family (configs/demo*.yaml, sft_demo.yaml)."""
DEMO_DATA_DIR = Path("datasets/demo_geometry")
DEMO_DATA = {"n_train": 512, "n_val": 32, "n_test": 128, "n_sft": 64, "kinds": ("shaded_area",), "seed": 0}
"""The demo set's arguments (``ensure_geometry_dataset``): 512 RL prompts, 32 val, 128 test (a pass@1
there is ±0.04), 64 SFT."""
WARM_START_PATH = Path(".cache/demo-sft-qwen2.5-vl")
"""configs/demo.yaml's policy: the SFT warm start of the tiny Qwen2.5-VL."""
WARM_START_RECIPE = Path(__file__).resolve().parent.parent / "configs" / "sft_demo.yaml"
"""The warm start's recipe, in the checkout maye_pl is installed from."""
STAMP_FILE = "maye_pl_warm_start.json"
"""In the warm start's directory: the recipe's path and the digest it was built for."""


TrainSFT = Callable[[Path], Any]
"""Fits an SFT recipe (a config file) and returns the trained policy: ``maye_pl.cli.train_warm_start``."""


def ensure_demo_assets(model_path: str | Path, data_paths: Iterable[str | Path | None], train_sft: TrainSFT) -> None:
    """Build whatever of the demo's assets ``model.model_path`` and the ``data.*_path`` point at.

    The data set first (the warm start trains on it), then the model: a tiny random one, or the
    SFT warm start (which needs both; ``train_sft`` runs its recipe).
    """
    if any(path is not None and _same_path(Path(path).parent, DEMO_DATA_DIR) for path in data_paths):
        ensure_geometry_dataset(DEMO_DATA_DIR, **DEMO_DATA, replace=True)
    tiny = next((path for path in DEMO_MODEL_PATHS if _same_path(model_path, path)), None)
    if tiny is not None:
        ensure_tiny_model(tiny, tiny_model_type(tiny))
    elif _same_path(model_path, WARM_START_PATH):
        ensure_warm_start(WARM_START_PATH, WARM_START_RECIPE, train_sft)


def ensure_warm_start(out_dir: str | Path, recipe: str | Path, train_sft: TrainSFT) -> Path:
    """Return ``out_dir``, first running the SFT ``recipe`` into it if its stamp is missing or stale.

    The recipe is a maye_pl config of ``maye_pl.sft.SFT`` (configs/sft_demo.yaml); the demo assets
    it points at are built first. ``train_sft`` trains it as configured (seed, epochs, batches,
    optimizer) but without the engine: no validation, no logger, no checkpoints.
    """
    out_dir, recipe = Path(out_dir), Path(recipe)
    if not recipe.is_file():
        raise ConfigError(
            f"the demo's warm start {out_dir} is built by the SFT recipe {recipe}, which does not exist; run from "
            "a maye_pl checkout (pip install -e .), or point `model.model_path` at a model of your own."
        )
    paths = yaml.safe_load(recipe.read_text())
    base_model, train_split = Path(paths["model"]["init_args"]["model_path"]), Path(paths["data"]["train_path"])
    ensure_demo_assets(base_model, [train_split], train_sft)
    digest = warm_start_digest(recipe, base_model, train_split)
    if _stamp(out_dir).get("digest") == digest:
        return out_dir
    rank_zero_info(f"Building the demo's SFT warm start {out_dir} from {recipe.name} (once; kept under its stamp)")
    start = time.perf_counter()
    policy = train_sft(recipe)
    _publish(out_dir, policy.state_dict(), base_model, {"recipe": str(recipe), "digest": digest})
    rank_zero_info(f"SFT warm start ready in {time.perf_counter() - start:.0f} s: {out_dir}")
    return out_dir


def warm_start_digest(recipe: Path, base_model: Path, train_split: Path) -> str:
    """sha256 over the recipe file, every file of the base model and the training split."""
    digest = hashlib.sha256()
    for path in [recipe, *sorted(p for p in base_model.iterdir() if p.is_file()), train_split]:
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def _stamp(out_dir: Path) -> dict[str, Any]:
    try:
        return json.loads((out_dir / STAMP_FILE).read_text())
    except (OSError, ValueError):
        return {}


def _publish(out_dir: Path, state_dict: dict, base_model: Path, stamp: dict[str, str]) -> None:
    """Write the policy as a model directory with its stamp, replacing ``out_dir`` in one rename."""
    from maye_pl.export import export_hf

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.building-", dir=out_dir.parent))
    try:
        built = export_hf(state_dict, staging / "model", base_model_dir=base_model, prefix="")
        (built / STAMP_FILE).write_text(json.dumps(stamp, indent=2) + "\n")
        if out_dir.exists():
            out_dir.rename(staging / "stale")
        built.rename(out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _same_path(path: str | Path, other: Path) -> bool:
    return Path(path).resolve() == other.resolve()
