"""Checks that need a CUDA GPU: run them on a GPU node with ``pytest -m gpu -n 0`` (one process: the
GPU is not shared between two workers).

They are deselected on CPU machines (``addopts`` has ``-m "not gpu"``). The first ones need no
vLLM (the engine is the HF one, beside the trainer on the same GPU); the engine-group ones need
vLLM and 3-4 GPUs (skipped with fewer). What they prove:

- the demo config trains through the CLI on CUDA under ``FSDP2Strategy`` in bf16 (with and
  without activation checkpointing): every policy parameter is a DTensor on the GPU in bf16, the
  gradients are reduced in fp32 as the strategy says, the loss and the engine/trainer mismatch are
  finite, the weights move, and the checkpoint holds bf16 tensors;
- the engine placement on a real GPU machine: with every GPU taken by the trainer,
  ``rollout.device: auto`` stops with the clear error (no vLLM needed: the decision comes first);
  the engine process's environment shows it exactly its GPUs (or none for a CPU engine);
- two vLLM engines per node (``rollout.num_engines 2``, 2 trainer ranks + 2 engine GPUs: the 6+2
  layout in miniature) train in bf16, each on the GPU after the trainer's, in sync with the trainer
  every step; an engine spanning 2 GPUs (``rollout.tensor_parallel_size 2``) takes its weight syncs
  over NCCL to both of its workers.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from maye_pl.data import generate_geometry_dataset
from maye_pl.evaluation.metrics_file import read_metrics
from maye_pl.export import read_checkpoint
from maye_pl.models.loading import load_policy
from maye_pl.models.tiny import ensure_tiny_model
from maye_pl.rollout.placement import engine_environment

REPO = Path(__file__).resolve().parents[1]
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


class RecordPlacement(pl.Callback):
    """A user callback (given on the command line): writes where the policy's tensors live."""

    def __init__(self, out: str) -> None:
        self.out = out

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module, optimizer) -> None:
        from torch.distributed.tensor import DTensor

        if Path(self.out).exists():
            return
        params = [p for p in pl_module.policy.parameters() if p.requires_grad]
        grads = [p.grad for p in params if p.grad is not None]
        facts = {
            "trainable": len(params),
            "dtensor": sum(isinstance(p, DTensor) for p in params),
            "devices": sorted({str(p.device) for p in params}),
            "param_dtypes": sorted({str(p.dtype) for p in params}),
            "grad_dtypes": sorted({str(g.dtype) for g in grads}),
            "reduce_dtype": str(trainer.strategy.mp_policy.reduce_dtype),
            "max_memory_allocated_mib": torch.cuda.max_memory_allocated() / 2**20,
        }
        Path(self.out).write_text(json.dumps(facts))


def _fit(tmp_path: Path, name: str, *extra: str, visible_gpus: str | None = None) -> subprocess.CompletedProcess:
    model = ensure_tiny_model(tmp_path / "tiny")
    if not (tmp_path / "geo").exists():
        generate_geometry_dataset(tmp_path / "geo", n_train=16, n_val=0, n_test=0)
    args = [
        sys.executable, "-m", "maye_pl", "fit", "--config", str(REPO / "configs/demo.yaml"),
        "--demo_assets", "false", "--model.model_path", str(model),
        "--data.train_path", str(tmp_path / "geo/train.jsonl"), "--data.val_path", "null",
        "--data.test_path", "null", "--model.validate_before_fit", "false",
        "--trainer.limit_val_batches", "0", "--trainer.enable_progress_bar", "false",
        "--trainer.accelerator", "gpu", "--trainer.devices", "1",
        "--model.rewards", '[{"fn": "test_learning.letter_share_reward", "name": "letter"}]',
        "--model.reward_penalty", "null", "--model.lr", "1e-3", "--model.optim.warmup_steps", "0",
        "--trainer.max_steps", "8",  # 32 rows / ppo.batch_size 8 = 4 optimizer steps per generation step
        "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"),
        "--trainer.logger.init_args.version", name,
        *extra,
    ]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), os.environ.get("PYTHONPATH", "")])}
    if visible_gpus is not None:
        env["CUDA_VISIBLE_DEVICES"] = visible_gpus
    return subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("activation_checkpointing", [False, True], ids=["plain", "activation-ckpt"])
def test_fsdp2_bf16_training_on_cuda(tmp_path, activation_checkpointing):
    placement = tmp_path / "placement.json"
    result = _fit(
        tmp_path, "gpu",
        "--trainer.strategy", json.dumps({"class_path": "maye_pl.strategies.FSDP2Strategy", "init_args": {
            "reduce_dtype": "float32", "activation_checkpointing": activation_checkpointing}}),
        "--model.dtype", "bfloat16", "--rollout.engine", "hf", "--rollout.dtype", "bfloat16",
        "--trainer.callbacks+", json.dumps({"class_path": "test_gpu.RecordPlacement", "init_args": {"out": str(placement)}}),
    )
    assert result.returncode == 0, result.stderr[-6000:]

    facts = json.loads(placement.read_text())
    print(f"placement: {facts}")
    assert facts["dtensor"] == facts["trainable"] > 0
    assert facts["devices"] == ["cuda:0"]
    assert facts["param_dtypes"] == ["torch.bfloat16"] and facts["reduce_dtype"] == "torch.float32"

    rows = read_metrics(str(tmp_path / "runs/demo/gpu"))
    steps = [row for row in rows if "loss/policy" in row]
    assert len(steps) == 2  # generation steps
    for row in steps:
        print({key: row[key] for key in ("loss/total", "policy/engine_logprob_mismatch", "reward/letter",
                                          "perf/generate_tokens_per_s", "perf/update_tokens_per_s")})
        assert all(math.isfinite(row[key]) for key in ("loss/total", "policy/grad_norm", "policy/entropy"))
        # bf16 HF engine vs bf16 FSDP2 trainer on the same weights: rounding-level, not a wrong prompt.
        assert row["policy/engine_logprob_mismatch"] < 0.1

    checkpoint = next((tmp_path / "runs/demo/gpu/checkpoints").glob("*.ckpt"))
    trained, _ = read_checkpoint(checkpoint, "policy.")
    initial = load_policy(tmp_path / "tiny", dtype="float32").state_dict()
    name = "model.language_model.layers.0.mlp.down_proj.weight"
    assert trained[name].dtype == torch.bfloat16
    assert not torch.equal(trained[name].float(), initial[name].float())


def test_engine_auto_placement_refuses_the_trainers_only_gpu(tmp_path):
    result = _fit(tmp_path, "placement", "--rollout.engine", "vllm", "--rollout.device", "auto",
                  "--model.dtype", "bfloat16", "--rollout.dtype", "bfloat16", visible_gpus="0")
    assert result.returncode != 0
    expected = ("`rollout.device`='auto' needs 1 GPU(s) the trainer does not use (`rollout.num_engines`=1 x "
                "`rollout.tensor_parallel_size`=1), but `trainer.devices`=1 leaves 0 of the 1 visible GPUs")
    assert expected in result.stderr, result.stderr[-3000:]


@pytest.mark.parametrize("device", ["cuda:0", "cuda:0,1", "cpu"])
def test_engine_process_sees_only_its_devices(device):
    """A stand-in engine process started with ``engine_environment`` sees its GPUs (or none)."""
    gpus = device.removeprefix("cuda:").split(",") if device != "cpu" else []
    if len(gpus) > torch.cuda.device_count():
        pytest.skip(f"needs {len(gpus)} GPUs")
    probe = "import torch; print(torch.cuda.device_count(), torch.cuda.get_device_name(0) if torch.cuda.device_count() else '-')"
    env = engine_environment(device, {**os.environ, "RANK": "0", "WORLD_SIZE": "7", "MASTER_PORT": "1"})
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True).stdout
    count, gpu_name = out.strip().split(" ", 1)
    assert int(count) == len(gpus)
    if gpus:
        assert gpu_name == torch.cuda.get_device_name(0)


def _engine_steps(tmp_path: Path, name: str, result: subprocess.CompletedProcess) -> list[dict]:
    assert result.returncode == 0, result.stderr[-6000:]
    steps = [row for row in read_metrics(str(tmp_path / f"runs/demo/{name}")) if "loss/policy" in row]
    assert steps
    for row in steps:
        # bf16 vLLM engines vs the bf16 FSDP2 trainer on the same weights: rounding-level (a stale or
        # half-updated engine is off by far more).
        assert math.isfinite(row["loss/total"]) and row["policy/engine_logprob_mismatch"] < 0.1
    return steps


@pytest.mark.vllm
@pytest.mark.skipif(torch.cuda.device_count() < 4, reason="needs 4 GPUs: 2 trainer ranks + 2 engines")
def test_two_engines_per_node_train_in_sync(tmp_path):
    """6+2 in miniature: `trainer.devices 2` + `rollout.num_engines 2`: the engines take cuda:2 and
    cuda:3 (`rollout.device auto`), each rank's prompts go to its own engine, every sync reaches both."""
    result = _fit(tmp_path, "two_engines", "--trainer.devices", "2", "--trainer.strategy", "fsdp2",
                  "--rollout.engine", "vllm", "--rollout.num_engines", "2", "--rollout.device", "auto",
                  "--rollout.gpu_memory_utilization", "0.3", "--rollout.kv_cache_gb", "null",
                  "--model.dtype", "bfloat16", "--rollout.dtype", "bfloat16", "--data.batch_size", "4",
                  "--model.ppo.batch_size", "8")
    steps = _engine_steps(tmp_path, "two_engines", result)
    output = result.stdout + result.stderr
    assert "vLLM engine on cuda:2 ready" in output and "vLLM engine on cuda:3 ready" in output
    assert all("perf/generate_imbalance" in row for row in steps)


@pytest.mark.vllm
@pytest.mark.skipif(torch.cuda.device_count() < 3, reason="needs 3 GPUs: 1 trainer + an engine on 2")
def test_a_tensor_parallel_engine_takes_its_syncs_on_both_gpus(tmp_path):
    result = _fit(tmp_path, "tp2", "--rollout.engine", "vllm", "--rollout.tensor_parallel_size", "2",
                  "--rollout.device", "auto", "--rollout.gpu_memory_utilization", "0.3", "--rollout.kv_cache_gb", "null",
                  "--model.dtype", "bfloat16", "--rollout.dtype", "bfloat16")
    _engine_steps(tmp_path, "tp2", result)
    assert "vLLM engine on cuda:1,2 ready" in result.stdout + result.stderr
