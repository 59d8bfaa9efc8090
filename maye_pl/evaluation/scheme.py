"""The paper's evaluation scheme as a LightningModule mixin, shared by ReinforcePP and the SFT baseline.

Every validation run scores val and test (MayeDataModule's validation loop covers both) under each
``EvalSetting``: RolloutCallback samples k responses per prompt from the freshly synced engine and
leaves them in ``module.eval_rollouts``; this mixin judges them, logs pass@k as
``<split>/pass@<k>_t<temperature>`` and writes the per-sample predictions of the run to
``<run_dir>/predictions/<split>_<setting>_step<global_step>.jsonl`` (step 0 = the Vanilla model).
"""

from __future__ import annotations

import json
import os
from collections import defaultdict

import lightning.pytorch as pl
import torch.distributed as dist

from maye_pl.evaluation.passk import EvalSetting, metric_name, pass_at_k
from maye_pl.rewards import math_judge_batch
from maye_pl.rollout.base import Rollout, RolloutRequest


def score_eval_batch(
    batch: list[dict], split: str, eval_rollouts: dict[str, list[Rollout]], settings: list[EvalSetting]
) -> tuple[dict[str, float], dict[tuple[str, str], list[dict]]]:
    """pass@k of each setting over one batch, and the prediction rows to keep.

    Args:
        batch: B samples (each with "id", "question", "answer").
        split: "val" or "test".
        eval_rollouts: setting name → B*k rollouts, request-major.
        settings: the eval settings.

    Returns:
        (metric name → mean pass@k over the B prompts, (split, setting name) → B prediction rows).
    """
    metrics, rows = {}, {}
    for setting in settings:
        k = setting.k
        texts = [rollout.text for rollout in eval_rollouts[setting.name]]  # (B*k,)
        correct = math_judge_batch(texts, [sample["answer"] for sample in batch for _ in range(k)])
        per_prompt = [correct[i * k : (i + 1) * k] for i in range(len(batch))]
        metrics[metric_name(split, setting)] = sum(pass_at_k(k, sum(c), k) for c in per_prompt) / len(batch)
        rows[(split, setting.name)] = [
            {"id": sample["id"], "question": sample["question"], "answer": sample["answer"],
             "predictions": texts[i * k : (i + 1) * k], "correct": per_prompt[i]}
            for i, sample in enumerate(batch)
        ]
    return metrics, rows


class PaperEvaluation:
    """Mixin for a LightningModule with ``eval_settings``: validation/test steps of the paper's scheme.

    Reads ``eval_rollouts`` (written by RolloutCallback before each eval batch, from the prompts
    that ``requests`` builds).
    """

    eval_settings: list[EvalSetting]
    eval_rollouts: dict[str, list[Rollout]] | None

    def requests(self, batch: list[dict]) -> list[RolloutRequest]:
        """Engine requests for a batch: chat-template prompt text with one placeholder per image."""
        return [RolloutRequest(prompt=sample["prompt"], images=[sample["image"]]) for sample in batch]

    def validation_step(self: pl.LightningModule, batch: list[dict], batch_idx: int, dataloader_idx: int = 0) -> None:
        self.evaluate(batch, batch[0]["split"])

    def test_step(self: pl.LightningModule, batch: list[dict], batch_idx: int) -> None:
        self.evaluate(batch, "test")

    def evaluate(self: pl.LightningModule, batch: list[dict], split: str) -> None:
        eval_rollouts, self.eval_rollouts = self.eval_rollouts, None
        if eval_rollouts is None:
            raise RuntimeError(
                f"{type(self).__name__} evaluation needs RolloutCallback to generate the eval rollouts first; the "
                "CLI adds it — when building a Trainer by hand, add maye_pl.rollout.callback.RolloutCallback."
            )
        metrics, rows = score_eval_batch(batch, split, eval_rollouts, self.eval_settings)
        if not hasattr(self, "_eval_predictions"):
            self._eval_predictions = defaultdict(list)
        for key, new_rows in rows.items():
            self._eval_predictions[key].extend(new_rows)
        self.log_dict(metrics, on_step=False, on_epoch=True, sync_dist=True, batch_size=len(batch),
                      add_dataloader_idx=False)

    def on_validation_epoch_end(self: pl.LightningModule) -> None:
        self.write_predictions()

    def on_test_epoch_end(self: pl.LightningModule) -> None:
        self.write_predictions()

    def write_predictions(self: pl.LightningModule) -> None:
        """All ranks' predictions of this eval run → one jsonl per (split, setting), on global rank 0."""
        predictions = dict(getattr(self, "_eval_predictions", {}))
        self._eval_predictions = defaultdict(list)
        if self.trainer.sanity_checking:
            return
        gathered = [predictions]
        if dist.is_available() and dist.is_initialized():
            gathered = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, predictions)
        run_dir = self.trainer.log_dir  # a broadcast from rank 0: every rank must ask
        if not self.trainer.is_global_zero:
            return
        out_dir = os.path.join(run_dir or self.trainer.default_root_dir, "predictions")
        os.makedirs(out_dir, exist_ok=True)
        for split, setting in sorted({key for rank_predictions in gathered for key in rank_predictions}):
            path = os.path.join(out_dir, f"{split}_{setting}_step{self.trainer.global_step}.jsonl")
            with open(path, "w", encoding="utf-8") as f:
                for rank_predictions in gathered:
                    for row in rank_predictions.get((split, setting), []):
                        f.write(json.dumps(row) + "\n")
