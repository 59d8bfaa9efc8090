"""The demo's SFT warm start (maye_pl/demo.py): built once by its recipe's real SFT training, kept
under its stamp, rebuilt when the recipe changes, and never left half-written.

The recipe is configs/sft_demo.yaml cut to one optimizer step (`trainer.max_steps: 1`), so the real
path runs (the CLI parses the recipe, SFT trains without an engine, the policy is exported) in a few
seconds; the full recipe runs in tests/test_cli.py's demo test.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import maye_pl.demo as demo
from maye_pl.cli import train_warm_start

REPO = Path(__file__).resolve().parents[1]


def _recipe(path: Path, **model_overrides) -> Path:
    recipe = yaml.safe_load((REPO / "configs/sft_demo.yaml").read_text())
    recipe["trainer"]["max_steps"] = 1
    recipe["model"]["init_args"].update(model_overrides)
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.mark.slow
def test_warm_start_is_trained_once_and_rebuilt_when_its_recipe_changes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the recipe's relative demo paths: assets are built here
    recipe = _recipe(tmp_path / "sft.yaml")
    out = demo.ensure_warm_start(".cache/warm", recipe, train_warm_start)

    # Trained: the LLM moved one AdamW step from the base model, the frozen ViT did not.
    stamp = json.loads((out / demo.STAMP_FILE).read_text())
    base_dir = tmp_path / ".cache/tiny-qwen2.5-vl"
    assert stamp == {"recipe": str(recipe),
                     "digest": demo.warm_start_digest(recipe, base_dir, tmp_path / "datasets/demo_geometry/sft.jsonl")}
    base, tuned = load_file(base_dir / "model.safetensors"), load_file(out / "model.safetensors")
    assert base.keys() == tuned.keys()
    changed = {name for name in base if not torch.equal(base[name], tuned[name])}
    assert "model.layers.0.mlp.up_proj.weight" in changed  # checkpoint names on disk
    assert not [name for name in changed if name.startswith("visual.")]
    assert (out / "tokenizer.json").is_file() and (out / "processor_config.json").is_file()

    # Reused under its stamp: no training at all.
    def no_training(recipe):
        raise AssertionError("the stamped warm start was trained again")

    before = (out / "model.safetensors").stat().st_mtime_ns
    assert demo.ensure_warm_start(".cache/warm", recipe, no_training) == out
    assert (out / "model.safetensors").stat().st_mtime_ns == before

    # A changed recipe: trained again, published whole (no staging directory left behind).
    trained = []
    demo.ensure_warm_start(".cache/warm", _recipe(recipe, lr=2.0e-3),
                           lambda recipe: trained.append(recipe) or _base_policy(base_dir))
    assert trained == [recipe]
    assert json.loads((out / demo.STAMP_FILE).read_text())["digest"] != stamp["digest"]
    assert sorted(p.name for p in (tmp_path / ".cache").iterdir()) == ["tiny-qwen2.5-vl", "warm"]


def test_a_missing_recipe_names_the_fix(tmp_path):
    with pytest.raises(demo.ConfigError, match="does not exist; run from a maye_pl checkout"):
        demo.ensure_warm_start(tmp_path / "warm", tmp_path / "no_such_recipe.yaml", train_warm_start)


def _base_policy(model_dir: Path):
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(model_dir)
