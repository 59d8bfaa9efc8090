"""maye_pl.export writes save_pretrained directories that transformers loads and generates from.

Sources: a full state dict + base model dir, and a single-file Lightning checkpoint whose base
model the strategy recorded (the DCP-directory source is exported from a real 2-process
checkpoint in tests/strategies/test_fsdp2.py). Also: dtype conversion, refusal to overwrite,
a wrong prefix named with what the checkpoint holds, and no partial directory after a failure.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import maye_pl  # noqa: F401  (torchvision shim)
from maye_pl import export
from maye_pl.strategies import HF_PATHS_KEY


@pytest.fixture(scope="module")
def trained(tiny_model_dir: Path):
    """The tiny model with every weight perturbed, standing in for a trained policy."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_model_dir)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator))
    return model


def _greedy(model, tiny_model_dir: Path) -> torch.Tensor:
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(tiny_model_dir)(["The answer is"], return_tensors="pt").input_ids
    return model.generate(ids, max_new_tokens=10, do_sample=False)


def test_state_dict_export_loads_and_generates_like_the_source(trained, tiny_model_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    out = export.export_hf(trained.state_dict(), tmp_path / "hf", base_model_dir=tiny_model_dir, prefix="")
    loaded = Qwen2_5_VLForConditionalGeneration.from_pretrained(out)
    for name, tensor in trained.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    assert torch.equal(_greedy(loaded, tiny_model_dir), _greedy(trained, tiny_model_dir))
    # Tokenizer, processor and chat template come from the base model; the processor loads.
    for name in ("tokenizer.json", "tokenizer_config.json", "processor_config.json", "chat_template.jinja"):
        assert (out / name).read_bytes() == (tiny_model_dir / name).read_bytes()
    assert AutoProcessor.from_pretrained(out).tokenizer.eos_token == "<|im_end|>"
    assert (out / "generation_config.json").is_file()


def test_ckpt_file_export_uses_the_recorded_base_model_and_dtype(trained, tiny_model_dir: Path, tmp_path: Path) -> None:
    from transformers import Qwen2_5_VLForConditionalGeneration

    ckpt = tmp_path / "last.ckpt"
    state = {f"policy.{k}": v for k, v in trained.state_dict().items()}
    state.update({f"ref_policy.{k}": v for k, v in trained.state_dict().items()})
    torch.save({"state_dict": state, HF_PATHS_KEY: {"policy": str(tiny_model_dir)}}, ckpt)
    export.main([str(ckpt), str(tmp_path / "hf"), "--dtype", "bfloat16"])
    loaded = Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path / "hf", dtype="auto")
    weight = loaded.lm_head.weight
    assert weight.dtype == torch.bfloat16
    assert torch.equal(weight, trained.lm_head.weight.to(torch.bfloat16))


def test_refuses_to_overwrite_and_names_what_a_wrong_prefix_missed(
    trained, tiny_model_dir: Path, tmp_path: Path
) -> None:
    (tmp_path / "exists").mkdir()
    with pytest.raises(FileExistsError, match="pass overwrite=True"):
        export.export_hf(trained.state_dict(), tmp_path / "exists", base_model_dir=tiny_model_dir, prefix="")
    state = {f"ref_policy.{k}": v for k, v in trained.state_dict().items()}
    with pytest.raises(KeyError, match=r"no tensor under prefix 'policy\.'.*\['ref_policy'\]"):
        export.export_hf(state, tmp_path / "hf", base_model_dir=tiny_model_dir)
    with pytest.raises(ValueError, match="pass base_model_dir"):
        export.export_hf({f"policy.{k}": v for k, v in trained.state_dict().items()}, tmp_path / "hf")


def test_a_failed_export_leaves_no_directory(trained, tiny_model_dir: Path, tmp_path: Path, monkeypatch) -> None:
    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(export.shutil, "copy2", fail)  # dies after the weights were written
    with pytest.raises(OSError, match="disk full"):
        export.export_hf(trained.state_dict(), tmp_path / "hf", base_model_dir=tiny_model_dir, prefix="")
    assert list(tmp_path.iterdir()) == []  # neither the target nor the staging directory
