"""FSDP2Strategy on 2 CPU processes (gloo) behaves like one unsharded process.

One Lightning run (tests/strategies/fsdp2_case.py: Trainer(devices=2), activation checkpointing
on, policy + frozen reference built on the meta device) is compared with the same two SGD steps
run here without sharding. It proves: the sharding plan (blocks, embeddings, root are FSDP units;
all parameters DTensors), meta init + rank-0 broadcast load == from_pretrained, two optimizer
steps == the unsharded run (<= 1e-5), gradient norms over shards == the unsharded norm (both
through clip_grad_norm_ and Lightning's clip_gradients), weight streaming reproduces the state
dict under HF names within the memory bound, frozen weights are synced once, and the
distributed checkpoint resumes exactly and exports to a directory transformers loads and
generates from identically.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import maye_pl  # noqa: F401  (torchvision shim)
from maye_pl.export import main as export_main

sys.path.insert(0, str(Path(__file__).parent))
import fsdp2_case as case  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """What ranks 0 and 1 recorded, plus the output directory (``ckpt`` inside)."""
    out = tmp_path_factory.mktemp("fsdp2_run")
    # Own session: on a timeout the launcher and the rank it spawned are killed together.
    proc = subprocess.Popen(
        [sys.executable, case.__file__, str(tiny_model_dir), str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        _, stderr = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        _, stderr = proc.communicate()
    assert proc.returncode == 0, stderr[-4000:]
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]
    resumed = torch.load(out / "resume_rank0.pt", weights_only=False)
    return {"rank0": ranks[0], "rank1": ranks[1], "resumed": resumed, "out": out}


@pytest.fixture(scope="module")
def reference(tiny_model_dir: Path) -> dict:
    """The same STEPS steps on the whole global batch in one unsharded process."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_model_dir)
    loaded = {k: v.clone() for k, v in model.state_dict().items()}
    model.model.visual.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = case.make_optimizer(params)
    batch = case.make_global_batch(tiny_model_dir)
    losses, norms = [], []
    for _ in range(case.STEPS):
        optimizer.zero_grad()
        loss = case.response_nll(model, batch)
        loss.backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(params, case.MAX_NORM)))
        losses.append(float(loss.detach()))
        optimizer.step()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    return {"loaded": loaded, "losses": losses, "norms": norms, "trained": model.state_dict(), "trainable": trainable}


def _max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def test_blocks_embeddings_and_root_are_fsdp_units_with_dtensor_params(run: dict) -> None:
    expected = [
        "",  # the root
        "lm_head",
        "model.language_model.embed_tokens",
        "model.language_model.layers.0",
        "model.language_model.layers.1",
        "model.visual.blocks.0",
        "model.visual.blocks.1",
    ]
    for rank in ("rank0", "rank1"):
        assert run[rank]["fsdp_units"] == expected
        assert run[rank]["ref_fsdp_units"] == expected  # shard_reference=True
        assert run[rank]["all_params_dtensor"]


def test_meta_init_broadcast_load_equals_from_pretrained(run: dict, reference: dict) -> None:
    # Exact: the shards hold the very bytes rank 0 read.
    assert _max_abs_diff(run["rank0"]["loaded"], reference["loaded"]) == 0.0
    assert _max_abs_diff(run["rank0"]["ref_loaded"], reference["loaded"]) == 0.0
    # Unsharded meta model loaded under the process group, on both ranks.
    for rank in ("rank0", "rank1"):
        assert _max_abs_diff(run[rank]["plain_loaded"], reference["loaded"]) == 0.0
    # Non-persistent buffers (rotary tables) are not in any state dict; the first loss covers them.
    assert run["rank0"]["loss"][0] == pytest.approx(reference["losses"][0], abs=1e-5)
    assert run["rank0"]["ref_loss"] == pytest.approx([reference["losses"][0]] * case.STEPS, abs=1e-5)


def test_two_sharded_steps_equal_the_unsharded_run(run: dict, reference: dict) -> None:
    assert run["rank0"]["loss"] == pytest.approx(reference["losses"], abs=1e-5)
    assert _max_abs_diff(run["rank0"]["trained"], reference["trained"]) <= 1e-5
    # Not vacuous: training moved the weights far more than the tolerance.
    assert _max_abs_diff(reference["trained"], reference["loaded"]) > 1e-3


def test_clip_grad_norm_over_shards_equals_the_unsharded_norm(run: dict, reference: dict) -> None:
    record = run["rank0"]
    # Step 0 measured with max_norm=inf and clipped by Lightning's clip_gradients; step 1 clipped by
    # clip_grad_norm_. Both steps' weights match the reference (previous test), so both clip right.
    assert record["grad_norm"] == pytest.approx(reference["norms"], rel=1e-5)
    assert record["grad_norm"] == pytest.approx(record["grad_norm_by_hand"], rel=1e-5)
    assert run["rank1"]["grad_norm"] == record["grad_norm"]  # every rank scales by the same coefficient
    assert min(record["grad_norm"]) > case.MAX_NORM  # clipping was active


def test_iter_full_parameters_reproduces_state_dict_within_the_bucket_bound(run: dict, reference: dict) -> None:
    record = run["rank0"]
    # Names match HF's state_dict although activation checkpointing wrapped every block.
    assert record["loaded"].keys() == reference["loaded"].keys()
    assert not any("_checkpoint_wrapped_module" in name for name in record["loaded"])
    for bucket in record["bucket_sizes"]:
        assert sum(bucket) <= case.BUCKET_BYTES or len(bucket) == 1
    largest = max(t.numel() * t.element_size() for t in reference["loaded"].values())
    model_bytes = sum(t.numel() * t.element_size() for t in reference["loaded"].values())
    peak = record["peak_stream_bytes"]
    assert 0 < peak <= case.BUCKET_BYTES + largest
    assert peak < model_bytes / 4  # bounded by the bucket, not the model (2 MB here)
    assert sum(len(bucket) for bucket in record["bucket_sizes"]) == len(reference["loaded"])
    assert run["rank1"]["bucket_sizes"] == []  # other ranks receive nothing


def test_weight_sync_plan_sends_frozen_weights_once(run: dict, reference: dict) -> None:
    first, second = run["rank0"]["sync_stats"]
    names = run["rank0"]["synced_names"]
    first_names = [n for bucket in names[: first.num_buckets] for n in bucket]
    second_names = [n for bucket in names[first.num_buckets :] for n in bucket]
    assert sorted(first_names) == sorted(reference["loaded"])
    assert sorted(second_names) == sorted(reference["trainable"])  # the ViT is not sent again
    assert first.num_tensors == len(reference["loaded"]) and second.num_tensors == len(reference["trainable"])
    assert first.num_bytes == sum(t.numel() * t.element_size() for t in reference["loaded"].values())
    assert first.max_bucket_bytes <= max(case.BUCKET_BYTES, max(t.nbytes for t in reference["loaded"].values()))
    assert first.gather_s > 0 and first.push_s >= 0
    assert [s.num_tensors for s in run["rank1"]["sync_stats"]] == [0, 0]


def test_resuming_from_the_distributed_checkpoint_restores_the_trained_weights(run: dict) -> None:
    assert run["resumed"]["restored_step"] == case.STEPS
    assert _max_abs_diff(run["resumed"]["restored"], run["rank0"]["trained"]) == 0.0


def test_distributed_checkpoint_exports_a_model_that_generates_like_the_trained_one(
    run: dict, reference: dict, tiny_model_dir: Path
) -> None:
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    out = run["out"] / "exported"
    export_main([str(run["out"] / "ckpt"), str(out)])  # base model: recorded in the checkpoint
    exported = Qwen2_5_VLForConditionalGeneration.from_pretrained(out)
    assert _max_abs_diff(exported.state_dict(), run["rank0"]["trained"]) == 0.0

    trained = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_model_dir)
    trained.load_state_dict(run["rank0"]["trained"])
    processor = AutoProcessor.from_pretrained(out)
    ids = processor.tokenizer(["The triangle ABC has"], return_tensors="pt").input_ids
    expected = trained.generate(ids, max_new_tokens=12, do_sample=False)
    assert torch.equal(exported.generate(ids, max_new_tokens=12, do_sample=False), expected)
