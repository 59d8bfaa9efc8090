"""The 2-process FSDP2 training case that tests/strategies/test_fsdp2.py checks, plus its inputs.

Run as a script (``python fsdp2_case.py MODEL_DIR OUT_DIR``) it trains the tiny Qwen2.5-VL for
two optimizer steps under ``Trainer(devices=2, accelerator="cpu", strategy=FSDP2Strategy(...))``
(Lightning relaunches this script for rank 1), writes what each rank observed to
``OUT_DIR/rank{r}.pt`` and a distributed checkpoint to ``OUT_DIR/ckpt``, then resumes from that
checkpoint in a second Trainer and writes what it restored to ``OUT_DIR/resume_rank{r}.pt``.
The test runs the same steps unsharded in its own process with ``make_global_batch`` /
``response_nll`` / ``make_optimizer`` from here and compares.

Global batch: 4 samples (one image + prompt + 8 fixed response tokens each, equal lengths so no
padding); rank r trains on samples [2r, 2r+2). The ViT is frozen (as in the paper); the loss is
the mean negative log-prob of the response tokens.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import maye_pl  # noqa: F401  (torchvision shim before lightning / transformers)
import lightning as L
import numpy as np
import torch
from PIL import Image
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor
from torch.profiler import ProfilerActivity, profile

from maye_pl.models.loading import init_empty_pretrained, load_pretrained_weights
from maye_pl.strategies import FSDP2Strategy, WeightSyncPlan, clip_grad_norm_, iter_full_parameters, sync_weights

GLOBAL_BATCH = 4
RESPONSE_LEN = 8
STEPS = 2
MAX_NORM = 0.05  # below the tiny model's gradient norm (~0.3), so clipping really scales
BUCKET_BYTES = 64 * 1024  # a fraction of the model (~2 MB), so streaming takes many buckets


def make_global_batch(model_dir: str | Path) -> dict[str, torch.Tensor]:
    """The 4-sample batch: input_ids (4, L), attention_mask (4, L), pixel_values, image_grid_thw (4, 3)."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(model_dir)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)) for _ in range(GLOBAL_BATCH)]
    prompt = "<|vision_start|><|image_pad|><|vision_end|>Find the area of the triangle."
    enc = processor(text=[prompt] * GLOBAL_BATCH, images=images, return_tensors="pt")
    response = torch.as_tensor(rng.integers(0, 700, (GLOBAL_BATCH, RESPONSE_LEN)))
    return {
        "input_ids": torch.cat([enc["input_ids"], response], dim=1),  # (4, L)
        "attention_mask": torch.ones(GLOBAL_BATCH, enc["input_ids"].shape[1] + RESPONSE_LEN, dtype=torch.long),
        "pixel_values": enc["pixel_values"],  # (4 * patches per image, C * T * P * P)
        "image_grid_thw": enc["image_grid_thw"],  # (4, 3)
    }


def rank_slice(batch: dict[str, torch.Tensor], rank: int, world_size: int) -> dict[str, torch.Tensor]:
    """Rank ``rank``'s contiguous share of the samples (pixel rows follow their images)."""
    per_rank = GLOBAL_BATCH // world_size
    lo, hi = rank * per_rank, (rank + 1) * per_rank
    patches = batch["image_grid_thw"].prod(dim=1)  # (4,) patch rows per image
    start, stop = int(patches[:lo].sum()), int(patches[:hi].sum())
    return {
        "input_ids": batch["input_ids"][lo:hi],
        "attention_mask": batch["attention_mask"][lo:hi],
        "pixel_values": batch["pixel_values"][start:stop],
        "image_grid_thw": batch["image_grid_thw"][lo:hi],
    }


def response_nll(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean negative log-prob of the last RESPONSE_LEN tokens of each sample (a 0-dim tensor)."""
    logits = model(**batch).logits[:, -RESPONSE_LEN - 1 : -1].float()  # (b, RESPONSE_LEN, V)
    targets = batch["input_ids"][:, -RESPONSE_LEN:]  # (b, RESPONSE_LEN)
    return -logits.log_softmax(-1).gather(-1, targets.unsqueeze(-1)).mean()


def make_optimizer(params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """Plain SGD: its update is linear in the gradient, so sharded and unsharded runs agree to rounding."""
    return torch.optim.SGD(params, lr=0.5)


def peak_cpu_bytes_during(fn) -> int:
    """Peak of CPU bytes allocated (and not freed) while ``fn()`` runs, from the profiler's allocator events.

    The profiler records every CPU allocation and free with the running total since it started,
    independent of what the code under test believes it holds.
    """
    from torch._C._profiler import _EventType

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()

    def walk(events):
        for event in events:
            yield event
            yield from walk(event.children)

    events = prof.profiler.kineto_results.experimental_event_tree()
    allocations = sorted(
        (e for e in walk(events) if e.tag == _EventType.Allocation and str(e.extra_fields.device) == "cpu"),
        key=lambda e: e.start_time_ns,
    )
    live = peak = 0
    for event in allocations:
        live += event.extra_fields.alloc_size
        peak = max(peak, live)
    return peak


class ProbeModule(L.LightningModule):
    """Builds policy + frozen reference on meta, trains STEPS manual steps, records what the test checks."""

    def __init__(self, model_dir: str, out_dir: str) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.model_dir, self.out_dir = model_dir, Path(out_dir)
        self.policy = None
        self.ref_policy = None
        self.record: dict = {"loss": [], "ref_loss": [], "grad_norm": [], "grad_norm_by_hand": []}

    # --- the recipe the lead's module follows -------------------------------------------------
    def configure_model(self) -> None:
        if self.policy is not None:
            return
        self.policy = init_empty_pretrained(self.model_dir)
        self.policy.model.visual.requires_grad_(False)  # only the LLM trains
        self.ref_policy = init_empty_pretrained(self.model_dir).requires_grad_(False).eval()

    def configure_optimizers(self):
        return make_optimizer([p for p in self.policy.parameters() if p.requires_grad])

    def train_dataloader(self):
        batch = make_global_batch(self.model_dir)
        mine = rank_slice(batch, self.global_rank, self.trainer.world_size)
        return torch.utils.data.DataLoader([mine] * STEPS, batch_size=None)

    # --- what the test inspects -----------------------------------------------------------------
    def on_fit_start(self) -> None:
        self.record["fsdp_units"] = sorted(n for n, m in self.policy.named_modules() if isinstance(m, FSDPModule))
        self.record["ref_fsdp_units"] = sorted(
            n for n, m in self.ref_policy.named_modules() if isinstance(m, FSDPModule)
        )
        self.record["all_params_dtensor"] = all(
            isinstance(p, DTensor) for m in (self.policy, self.ref_policy) for p in m.parameters()
        )
        self.record["loaded"] = {n: t.clone() for b in self._full_params(self.policy) for n, t in b}
        self.record["ref_loaded"] = {n: t.clone() for b in self._full_params(self.ref_policy) for n, t in b}
        # Unsharded meta model under a live process group: the broadcast path without DTensors.
        plain = init_empty_pretrained(self.model_dir)
        load_pretrained_weights(plain, torch.device("cpu"))
        self.record["plain_loaded"] = dict(plain.state_dict())

    def _full_params(self, model):
        return iter_full_parameters(model, bucket_bytes=BUCKET_BYTES)

    def training_step(self, batch, batch_idx):
        optimizer = self.optimizers()
        params = [p for p in self.policy.parameters() if p.requires_grad]
        optimizer.zero_grad()
        loss = response_nll(self.policy, batch)
        with torch.no_grad():
            ref_loss = response_nll(self.ref_policy, batch)
        self.manual_backward(loss)
        grads = [p.grad.full_tensor() for p in params]
        self.record["grad_norm_by_hand"].append(math.sqrt(sum(float(g.double().pow(2).sum()) for g in grads)))
        if batch_idx == 0:
            # Lightning's own path clips; measure the norm first without clipping (max_norm=inf).
            norm = clip_grad_norm_(params, float("inf"))
            self.clip_gradients(optimizer, gradient_clip_val=MAX_NORM, gradient_clip_algorithm="norm")
        else:
            norm = clip_grad_norm_(params, MAX_NORM)
        optimizer.step()
        self.record["grad_norm"].append(float(norm))
        self.record["loss"].append(float(self.all_gather(loss.detach()).mean()))
        self.record["ref_loss"].append(float(self.all_gather(ref_loss).mean()))

    def on_train_end(self) -> None:
        rank = self.global_rank
        # Memory: stream with a consumer that keeps nothing, under the allocator profiler (rank 0).
        sizes: list[list[int]] = []

        def stream() -> None:
            for bucket in self._full_params(self.policy):
                sizes.append([t.numel() * t.element_size() for _, t in bucket])

        if rank == 0:
            self.record["peak_stream_bytes"] = peak_cpu_bytes_during(stream)
        else:
            stream()  # the same gathers; the profiler only watches the receiving rank
        self.record["bucket_sizes"] = sizes
        self.record["trained"] = {n: t.clone() for b in self._full_params(self.policy) for n, t in b}
        # Frozen-once: the second sync with the same plan sends only trainable tensors.
        plan, pushed = WeightSyncPlan(), []
        push = (lambda bucket: pushed.append([n for n, _ in bucket])) if rank == 0 else None
        self.record["sync_stats"] = [
            sync_weights(self.policy, push, bucket_bytes=BUCKET_BYTES, plan=plan) for _ in range(2)
        ]
        self.record["synced_names"] = pushed
        self.trainer.save_checkpoint(self.out_dir / "ckpt")
        torch.save(self.record, self.out_dir / f"rank{rank}.pt")


class ResumeProbe(ProbeModule):
    """Resumes from the run's distributed checkpoint; records the weights and step it restored."""

    def on_fit_start(self) -> None:
        """Nothing: loading was checked by the first run (and the checkpoint is restored after this hook)."""

    def on_train_start(self) -> None:
        self.record["restored_step"] = self.trainer.global_step
        self.record["restored"] = {n: t.clone() for b in self._full_params(self.policy) for n, t in b}

    def on_train_end(self) -> None:
        torch.save(self.record, self.out_dir / f"resume_rank{self.global_rank}.pt")


def _trainer(max_steps: int) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=FSDP2Strategy(activation_checkpointing=True),
        max_steps=max_steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
    )


def main(model_dir: str, out_dir: str) -> None:
    _trainer(STEPS).fit(ProbeModule(model_dir, out_dir))
    # Same processes (rank 0 set LOCAL_RANK, so nothing is relaunched): resume for one more step.
    _trainer(STEPS + 1).fit(ResumeProbe(model_dir, out_dir), ckpt_path=Path(out_dir) / "ckpt")


if __name__ == "__main__":
    main(*sys.argv[1:3])
