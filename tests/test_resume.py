"""Resuming from a checkpoint continues the run exactly, and a crash mid-save never costs the last one.

`test_resume_mid_epoch_matches_the_uninterrupted_run` (slow, real vLLM engine) runs the CLI three
times, with the default console (progress bar, summary), in two layouts (2 nodes: fresh processes;
one process: the preempted run fresh, the others in the test's process), both
pipelined (`rollout.max_staleness 1`: the rollouts of the batch in flight at the checkpoint are
saved with it): one process (a single .ckpt file), validating every 2 generation steps, with LoRA
adapters and DAPO's dynamic sampling; and 2 simulated nodes (two `fit` processes on localhost,
NODE_RANK 0 and 1, one FSDP2 rank and one vLLM engine each, gloo between them: a sharded DCP
checkpoint, each rank's sampler position restored, each engine generating its own node's prompts,
the batch in flight gathered from both engines into the checkpoint). Each run has a fresh module, trainer, data module and engine: an uninterrupted
`fit` of 4 generation steps (one epoch of 4 batches, two optimizer steps each, so the minibatch
shuffle matters); the same `fit` stopped in step 2 (Ctrl-C to node 0's process group in the
two-node layout), which must finish that step and checkpoint it
(PreemptionCheckpoint: trainer.save_checkpoint at the step boundary, like ModelCheckpoint), or
sent SIGTERM during the validation after step 2 (one-process layout), which must checkpoint at
once, leaving the validation to the resumed run (while it runs: the CLI gave the engine and the
trainer disjoint CPU cores); either way it must say where the checkpoint is,
exit 143 within 15 s of saying so, and leave no engine process; and a `fit --ckpt_path last`, which
must pick that checkpoint over a newer one cut short by a crash. Steps 1-2 of the preempted run and
3-4 of the resumed one (and the resumed run's validations, the cut one run again) must log the
same metrics (loss, rewards, KL, grad norm, engine mismatch, pass@k, ...; max abs
difference <= 1e-6, observed 0 on CPU fp32) and train on the same prompts: the data order resumes
mid-epoch, generation_step (sampling seeds) and the optimizer/scheduler state come back, and the
engine generates step 4 (step 3's batch is the saved one) from the restored weights, not from the
model directory it started with
(the learning rate is high enough that stale engine weights would show; see `_fit`'s docstring).

The checkpoint-write tests call FSDP2Strategy.save_checkpoint in this process (no process group:
Lightning's collectives are then no-ops and DCP writes one rank) and make the write fail after
part of the checkpoint exists, for a distributed (DCP) directory and a single file, overwriting
the previous checkpoint's own path (save_last) and writing a new one (per-step names): the
previous checkpoint still loads with its weights, nothing partial sits at the final path, and the
next save succeeds and clears the partial leftovers.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import psutil
import pytest
import torch

from maye_pl.data import generate_geometry_dataset
from maye_pl.export import read_checkpoint
from maye_pl.models.loading import load_policy
from maye_pl.models.tiny import ensure_tiny_model
from maye_pl.preemption import PREEMPTED_EXIT_CODE
from maye_pl.rollout.vllm_host import HOST_PROCESS_NAME
from maye_pl.strategies import FSDP2Strategy
from maye_pl.strategies.fsdp2 import publish_checkpoint

from cli_runs import RunningFit, fit_command, run_maye_pl_here


# ---------------------------------------------------------------------------------------------- e2e

STEPS, RESUME_AFTER = 4, 2
OPTIMIZER_STEPS_PER_GENERATION = 2  # 2 prompts x 2 samples = 4 rows, minibatches of 2


def _fit_command(tmp_path: Path, name: str, *extra: str) -> tuple[list[str], dict[str, str], Path]:
    """The tiny `fit` of cli_runs (an epoch = the 4 training prompt pairs, the LR schedule from its
    length) with a ModelCheckpoint every RESUME_AFTER generation steps.

    lr 1e-3 (the demo's is 1e-5) moves the weights far enough in 2 steps that an engine still
    holding the initial weights is plainly visible at step 3 (measured with the callback's setup
    patched not to mark its weights stale: engine mismatch 0.37 instead of 5e-7, policy/kl off by
    0.24, 10 of the 42 step metrics off by more than 1e-6), so equal step-3 metrics prove the
    restored weights reached the engine before its first rollout.
    """
    args, env, out = fit_command(tmp_path, name)
    args += [
        "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
        "--trainer.callbacks.dirpath", str(out / "checkpoints"),
        "--trainer.callbacks.every_n_train_steps", str(RESUME_AFTER * OPTIMIZER_STEPS_PER_GENERATION),
        "--trainer.callbacks.save_top_k", "-1",
        *extra,
    ]
    return args, env, out


def _nodes(extra: tuple[str, ...]) -> int:
    return int(extra[extra.index("--trainer.num_nodes") + 1]) if "--trainer.num_nodes" in extra else 1


def _fit(tmp_path: Path, name: str, *extra: str) -> Path:
    """One `fit` to its end; returns its output directory. On 2 nodes, fresh processes (one per
    node); in one process, this test's, through the CLI's entry point (the preempted run is the
    fresh process there: a fresh interpreter adds only its imports to the others)."""
    if _nodes(extra) == 1:
        args, _, out = _fit_command(tmp_path, name, *extra)
        run_maye_pl_here(*args, cwd=tmp_path)
        return out
    run = RunningFit(_fit_command(tmp_path, name, *extra), cwd=tmp_path, nodes=_nodes(extra))
    try:
        code, _ = run.wait(timeout_s=600)
    finally:
        run.kill()
    assert code == 0, f"{name} failed ({code}):\n{run.output[-6000:]}"
    return run.out


def _preempt(tmp_path: Path, name: str, how: str, *extra: str) -> tuple[Path, str]:
    """A `fit` stopped mid-step RESUME_AFTER (``how`` = "SIGTERM", or "Ctrl-C" to its process group
    as a terminal sends it) or during the validation after it ("SIGTERM in validation"). It must
    print where its checkpoint is, then exit with status 143 within 15 s of that line, leaving no
    engine process (with ``--trainer.num_nodes`` 2: a process per node, stopped on node 0, both
    exiting so). Returns its output directory and what it printed."""
    run = RunningFit(_fit_command(tmp_path, name, *extra), cwd=tmp_path, nodes=_nodes(extra))
    try:
        if how == "SIGTERM in validation":
            run.wait_for_validation_batch(1)
        else:
            run.wait_for_step(RESUME_AFTER)
        engines = run.engines()
        assert sum(process.name() == HOST_PROCESS_NAME for process in engines) == _nodes(extra)  # one per node
        if _nodes(extra) == 1:  # (two `fit` processes on this machine each divide all its cores)
            _check_cores(run.ranks(), engines[0], pipelined="--rollout.max_staleness" in extra)
        run.interrupt() if how == "Ctrl-C" else run.process.send_signal(signal.SIGTERM)
        run.wait_for_output("Preempted by ")  # the step (or validation batch) ended, the checkpoint is written
        code, exit_s = run.wait(timeout_s=60)
    finally:
        run.kill()
    assert code == PREEMPTED_EXIT_CODE, f"{name} exited {code}:\n{run.output[-6000:]}"
    assert exit_s <= 15, f"{name} took {exit_s:.1f} s to stop after its checkpoint"
    assert engines and psutil.wait_procs(engines, timeout=1)[1] == [], "an engine process outlived the preempted run"
    return run.out, run.output


def _check_cores(ranks: list[psutil.Process], engine: psutil.Process, pipelined: bool) -> None:
    """The CLI divides the CPU between the trainer and the engine when they compute at once
    (pipelined: disjoint cores, rollout.engine_cores auto = half), and not when they take turns."""
    available = set(os.sched_getaffinity(0))
    engine_cores = set(engine.cpu_affinity())
    for rank in ranks:
        trainer_cores = set(rank.cpu_affinity())
        if pipelined and len(available) > 1:
            assert engine_cores and trainer_cores and not engine_cores & trainer_cores, (engine_cores, trainer_cores)
            assert len(engine_cores) == len(available) // 2 and engine_cores | trainer_cores <= available
        else:
            assert engine_cores == trainer_cores == available


def _rows(tmp_path: Path, name: str, key: str, index: str) -> dict[int, dict[str, float]]:
    """Rows of metrics.jsonl holding ``key``, by their ``index`` value, without the wall-clock
    perf/ metrics."""
    rows = [json.loads(line) for line in (tmp_path / "runs/demo" / name / "metrics.jsonl").read_text().splitlines()]
    return {int(row[index]): {k: v for k, v in row.items() if not k.startswith("perf/")} for row in rows if key in row}


def _step_rows(tmp_path: Path, name: str) -> dict[int, dict[str, float]]:
    """Training-step rows of metrics.jsonl by generation step."""
    return _rows(tmp_path, name, "loss/total", "generation_step")


def _val_rows(tmp_path: Path, name: str) -> dict[int, dict[str, float]]:
    """Validation rows of metrics.jsonl by (optimizer) step."""
    return _rows(tmp_path, name, "val/pass@1_t0.01", "step")


def _assert_same_rows(rows: dict[int, dict[str, float]], reference: dict[int, dict[str, float]]) -> None:
    for step, row in rows.items():
        assert row.keys() == reference[step].keys()
        diff = {k: abs(v - reference[step][k]) for k, v in row.items()}
        assert max(diff.values()) <= 1e-6, (step, {k: d for k, d in diff.items() if d > 1e-6})


def _ids(out: Path) -> dict[int, list[str]]:
    """Every rank's prompt ids by generation step (0-based), rank 0's first."""
    ids: dict[int, list[str]] = {}
    for path in sorted(out.glob("ids_rank*.jsonl")):
        for line in path.read_text().splitlines():
            row = json.loads(line)
            ids.setdefault(row["generation_step"], []).extend(row["ids"])
    return ids


# One layout validates every RESUME_AFTER generation steps (2 prompts, one per batch: the SIGTERM
# lands in the first batch's generation) and is stopped during the validation after step 2.
VALIDATING = ["--data.val_path", "geo/validation.jsonl", "--trainer.limit_val_batches", "1.0",
              "--trainer.val_check_interval", str(RESUME_AFTER), "--data.eval_batch_size", "1"]


LORA = ["--model.lora.r", "4", "--model.lora.alpha", "32"]
# A reward where about half of the 2-sample groups score alike (contains "e" or not, no penalty):
# dynamic sampling drops those and trains on groups of its extra round.
DYNAMIC_SAMPLING = ["--model.dynamic_sampling.enabled", "true", "--model.dynamic_sampling.max_extra_rounds", "1",
                    "--model.reward_penalty", "null", "--model.rewards", "[{fn: cli_runs.has_letter_e, name: e}]"]


@pytest.mark.slow
@pytest.mark.vllm
@pytest.mark.parametrize(
    ("layout", "how"),
    [
        # One process, pipelined (batch k+1 is in flight at the checkpoint, sampled by weights it
        # does not hold: saved in the single checkpoint file here, in the sharded directory below),
        # validating, with LoRA adapters (r 4, s = alpha / r = 8: the checkpoint holds base + adapters
        # and the adapters' optimizer state; the resumed engine gets the merged weights W + s·B@A) and
        # DAPO's dynamic sampling (the extra rounds of the resumed steps draw the same prompts and
        # seeds); stopped during the validation after step 2.
        (["--rollout.max_staleness", "1", *VALIDATING, *LORA, *DYNAMIC_SAMPLING], "SIGTERM in validation"),
        # 2 nodes x 1 rank, an engine per node; 1 prompt per rank: the same 2 prompts (4 rows) per
        # generation step, 2 minibatches of 1 prompt; stopped by Ctrl-C on node 0 (node 1 stops with
        # it). (Synchronous layouts and 2 ranks on one node with one engine pass too; left out for the
        # suite's time: test_preemption covers the signal paths in-process.)
        (["--rollout.max_staleness", "1", "--trainer.num_nodes", "2", "--trainer.strategy", "fsdp2",
          "--data.batch_size", "1", "--model.ppo.batch_size", "1"], "Ctrl-C"),
    ],
    ids=["one-process-pipelined-validating", "two-nodes-pipelined"],
)
def test_resume_mid_epoch_matches_the_uninterrupted_run(tmp_path, layout, how):
    ensure_tiny_model(tmp_path / "tiny")
    generate_geometry_dataset(tmp_path / "geo", n_train=2 * STEPS, n_val=2, n_test=0)
    full = _fit(tmp_path, "full", *layout)
    step = RESUME_AFTER * OPTIMIZER_STEPS_PER_GENERATION
    assert (full / "checkpoints" / f"epoch=0-step={step}.ckpt").is_dir() == ("fsdp2" in layout)  # sharded DCP

    # Stopped mid-step RESUME_AFTER: that step finishes; or during the validation after it: that
    # validation is cut. Either way the checkpoint holds step RESUME_AFTER (every rank at the same
    # step), the step's row is logged, the engine is shut down, the run exits 143 saying where.
    preempt_dir = tmp_path / "preempted_checkpoints"
    preempted, output = _preempt(tmp_path, "preempted", how, *layout, "--preemption.dirpath", str(preempt_dir))
    checkpoint = preempt_dir / f"preempted-epoch=0-step={step}.ckpt"
    assert checkpoint.is_dir() == ("fsdp2" in layout)
    signal_name, during = ("SIGINT", "") if how == "Ctrl-C" else ("SIGTERM", ", during its validation" * (how == "SIGTERM in validation"))
    assert f"Preempted by {signal_name} at epoch 0, step {step}{during}: checkpoint {checkpoint}" in output
    assert _step_rows(tmp_path, "preempted").keys() == set(range(1, RESUME_AFTER + 1))  # its rows are on disk

    # A newer checkpoint cut short by a crash mid-save must not be picked by `--ckpt_path last`.
    cut = preempt_dir / "zz-cut-by-a-crash.ckpt"
    if checkpoint.is_dir():
        shutil.copytree(checkpoint, cut)
        (cut / "meta.pt").unlink()  # Lightning writes it last
    else:
        cut.write_bytes(checkpoint.read_bytes()[: checkpoint.stat().st_size // 2])
    resumed = _fit(tmp_path, "resumed", *layout, "--preemption.dirpath", str(preempt_dir), "--ckpt_path", "last")

    full_rows, resumed_rows = _step_rows(tmp_path, "full"), _step_rows(tmp_path, "resumed")
    assert sorted(full_rows) == list(range(1, STEPS + 1))
    assert sorted(resumed_rows) == list(range(RESUME_AFTER + 1, STEPS + 1))  # it trained only the rest
    _assert_same_rows(resumed_rows, full_rows)
    _assert_same_rows(_step_rows(tmp_path, "preempted"), full_rows)
    if how == "SIGTERM in validation":
        # The cut validation ran again in full on resume, from the restored weights: the same rows.
        full_val, resumed_val = _val_rows(tmp_path, "full"), _val_rows(tmp_path, "resumed")
        assert sorted(full_val) == sorted(resumed_val) == [step, STEPS * OPTIMIZER_STEPS_PER_GENERATION]
        assert _val_rows(tmp_path, "preempted") == {}
        _assert_same_rows(resumed_val, full_val)
    first = resumed_rows[RESUME_AFTER + 1]
    assert first["step"] == (RESUME_AFTER + 1) * OPTIMIZER_STEPS_PER_GENERATION
    # The resumed run trains first on the rollouts the checkpoint saved (sampled one version back),
    # then on what the engine sampled from the restored weights; equal metrics for every resumed step
    # (above) prove both, and the rollouts are one version stale.
    assert all(row["policy/staleness"] == OPTIMIZER_STEPS_PER_GENERATION for row in resumed_rows.values())
    # Step 1 was sampled by the weights it trains (the engines started in sync; 5e-7).
    assert full_rows[1]["policy/engine_logprob_mismatch"] < 1e-4

    if DYNAMIC_SAMPLING[0] in layout:  # groups were dropped and kept, extra rounds ran (the same on resume)
        dynamic = [(row["rollout/dynamic_rounds"], row["rollout/kept_group_ratio"]) for row in full_rows.values()]
        assert any(rounds == 2 for rounds, _ in dynamic) and any(0 < kept < 1 for _, kept in dynamic), dynamic

    full_ids, resumed_ids = _ids(full), _ids(resumed)
    assert resumed_ids == {step: full_ids[step] for step in range(RESUME_AFTER, STEPS)}  # 0-based here
    epoch = [i for step in range(RESUME_AFTER) for i in full_ids[step]] + sum(resumed_ids.values(), [])
    assert len(epoch) == len(set(epoch)) == 2 * STEPS  # every prompt of the epoch once


# ------------------------------------------------------------------------------ atomic checkpoints


class _Holder(pl.LightningModule):
    def __init__(self, policy: torch.nn.Module) -> None:
        super().__init__()
        self.policy = policy


class _CrashedWrite(RuntimeError):
    pass


def _strategy(policy: torch.nn.Module, distributed: bool) -> FSDP2Strategy:
    strategy = FSDP2Strategy(save_distributed_checkpoint=distributed)
    strategy.connect(_Holder(policy))
    return strategy


def _checkpoint(policy: torch.nn.Module) -> dict[str, Any]:
    return {"state_dict": {f"policy.{k}": v.clone() for k, v in policy.state_dict().items()},
            "optimizer_states": [], "global_step": 0}


def _policy_weights(path: Path) -> dict[str, torch.Tensor]:
    weights, _ = read_checkpoint(path, "policy.")
    return weights


def _crash_midway(monkeypatch: pytest.MonkeyPatch, distributed: bool) -> None:
    """The next checkpoint write dies after writing part of the checkpoint."""
    if distributed:
        import lightning.pytorch.strategies.model_parallel as model_parallel

        real_save = model_parallel._distributed_checkpoint_save

        def save_then_die(state: dict, path: Path) -> None:
            real_save(state, path)  # the shards exist; Lightning's meta.pt is never written
            raise _CrashedWrite(path)

        monkeypatch.setattr(model_parallel, "_distributed_checkpoint_save", save_then_die)
    else:
        from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

        def half_then_die(self: TorchCheckpointIO, checkpoint: dict, path: Path, storage_options: Any = None) -> None:
            Path(path).write_bytes(b"PK\x03\x04 half a zip")
            raise _CrashedWrite(path)

        monkeypatch.setattr(TorchCheckpointIO, "save_checkpoint", half_then_die)


@pytest.mark.parametrize("distributed", [True, False], ids=["dcp_dir", "single_file"])
@pytest.mark.parametrize("target", ["same_path", "new_path"])
def test_crash_during_save_keeps_the_previous_checkpoint(tiny_model_dir, tmp_path, monkeypatch, distributed, target):
    policy = load_policy(tiny_model_dir)
    strategy = _strategy(policy, distributed)
    previous = tmp_path / "last.ckpt"
    strategy.save_checkpoint(_checkpoint(policy), previous)
    assert previous.is_dir() == distributed and not list(tmp_path.glob(".*"))
    saved = {k: v.clone() for k, v in policy.state_dict().items()}

    with torch.no_grad():
        for p in policy.parameters():
            p.add_(1.0)
    final = previous if target == "same_path" else tmp_path / "epoch=0-step=8.ckpt"
    with monkeypatch.context() as patch:
        _crash_midway(patch, distributed)
        with pytest.raises(_CrashedWrite):
            strategy.save_checkpoint(_checkpoint(policy), final)
    restored = _policy_weights(previous)
    assert all(torch.equal(restored[k], saved[k]) for k in saved)  # the previous checkpoint loads, unchanged
    assert final == previous or not final.exists()  # nothing partial sits at the final path ...
    partial = final.with_name(f".{final.name}.partial")
    assert partial.exists()  # ... though the crash happened mid-write

    strategy.save_checkpoint(_checkpoint(policy), final)  # the next save succeeds and clears the leftovers
    assert not partial.exists() and not final.with_name(f".{final.name}.replaced").exists()
    trained = _policy_weights(final)
    assert all(torch.equal(trained[k], v) for k, v in policy.state_dict().items())


@pytest.mark.parametrize(("old", "new"), [("dir", "dir"), ("dir", "file"), ("file", "dir"), ("file", "file"), (None, "dir")])
def test_publish_replaces_whatever_checkpoint_format_was_there(tmp_path, old, new):
    def make(path: Path, kind: str | None, text: str) -> None:
        if kind == "dir":
            path.mkdir()
            (path / "shard").write_text(text)
        elif kind == "file":
            path.write_text(text)

    final, written = tmp_path / "last.ckpt", tmp_path / ".last.ckpt.partial"
    make(final, old, "old")
    make(written, new, "new")
    publish_checkpoint(written, final)
    assert (final / "shard" if new == "dir" else final).read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


def test_refuses_to_replace_a_directory_that_is_not_a_checkpoint(tiny_model_dir, tmp_path):
    (tmp_path / "notes").mkdir()
    policy = load_policy(tiny_model_dir)
    with pytest.raises(IsADirectoryError, match="is a directory but not a distributed checkpoint"):
        _strategy(policy, distributed=False).save_checkpoint(_checkpoint(policy), tmp_path / "notes")
