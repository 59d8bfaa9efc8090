"""The paper's evaluation scheme as a LightningModule mixin, shared by ReinforcePP and the SFT baseline.

Every validation run scores val and test (MayeDataModule's validation loop covers both) under each
``EvalSetting``: RolloutCallback samples k responses per prompt from the freshly synced engine and
leaves them in ``module.eval_rollouts``; this mixin judges them and, at the end of the eval run,
logs pass@k over each split's unique prompts (all ranks) as ``<split>/pass@<k>_t<temperature>``
and writes the per-sample predictions to
``<run_dir>/predictions/<split>_<setting>_step<global_step>.jsonl`` (step 0 = the Vanilla model).
"""

from __future__ import annotations

import json
import os
from collections import defaultdict

import lightning.pytorch as pl
import torch.distributed as dist

from maye_pl.evaluation.passk import EvalSetting, metric_name, pass_at_k
from maye_pl.rewards import Judge, judge_responses
from maye_pl.types import Rollout, RolloutRequest


def prediction_rows(
    batch: list[dict], split: str, eval_rollouts: dict[str, list[Rollout]], settings: list[EvalSetting],
    judge: Judge = "math_verify",
) -> dict[tuple[str, str], list[dict]]:
    """Judge one eval batch: B prediction rows per (split, setting name).

    Args:
        batch: B samples (each with "id", "question", "answer", and "solution" for the "maye" judge).
        split: "val" or "test".
        eval_rollouts: setting name → B*k rollouts, request-major.
        settings: the eval settings.
        judge: the answer judge (``maye_pl.rewards.Judge``).

    Returns:
        (split, setting name) → B rows {"id", "question", "answer", "predictions": k texts,
        "correct": k bools}.
    """
    rows = {}
    for setting in settings:
        k = setting.k
        texts = [rollout.text for rollout in eval_rollouts[setting.name]]  # (B*k,)
        correct = judge_responses(judge, texts, [sample for sample in batch for _ in range(k)])
        rows[(split, setting.name)] = [
            {"id": sample["id"], "question": sample["question"], "answer": sample["answer"],
             "predictions": texts[i * k : (i + 1) * k], "correct": correct[i * k : (i + 1) * k]}
            for i, sample in enumerate(batch)
        ]
    return rows


def merge_rank_predictions(gathered: list[dict[tuple[str, str], list[dict]]]) -> dict[tuple[str, str], list[dict]]:
    """Every rank's rows as one list per (split, setting), each sample id once.

    A distributed sampler repeats samples so that every rank gets as many batches; the repeats
    would count twice in pass@k and in the predictions files. Ids are unique within a split (the
    data validation enforces it), so the first row of each id is the sample's.
    """
    merged: dict[tuple[str, str], dict[str, dict]] = defaultdict(dict)
    for rank_predictions in gathered:
        for key, rows in rank_predictions.items():
            for row in rows:
                merged[key].setdefault(row["id"], row)
    return {key: list(rows.values()) for key, rows in merged.items()}


class PaperEvaluation:
    """Mixin for a LightningModule with ``eval_settings``: validation/test steps of the paper's scheme.

    Reads ``eval_rollouts`` (written by RolloutCallback before each eval batch, from the prompts
    that ``requests`` builds), and the ``judge`` hyperparameter when the module has one.
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
        if not hasattr(self, "_eval_predictions"):
            self._eval_predictions = defaultdict(list)
        judge = self.hparams.get("judge", "math_verify")
        for key, rows in prediction_rows(batch, split, eval_rollouts, self.eval_settings, judge).items():
            self._eval_predictions[key].extend(rows)

    def on_validation_epoch_end(self: pl.LightningModule) -> None:
        self.finish_evaluation()

    def on_test_epoch_end(self: pl.LightningModule) -> None:
        self.finish_evaluation()

    def finish_evaluation(self: pl.LightningModule) -> None:
        """Gather all ranks' predictions of this eval run; log pass@k over the unique prompts of
        each split and setting; on global rank 0 write one jsonl per (split, setting)."""
        predictions = dict(getattr(self, "_eval_predictions", {}))
        self._eval_predictions = defaultdict(list)
        if self.trainer.sanity_checking:
            return
        gathered = [predictions]
        if dist.is_available() and dist.is_initialized():
            gathered = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, predictions)
        merged = merge_rank_predictions(gathered)
        settings = {setting.name: setting for setting in self.eval_settings}
        for (split, name), rows in sorted(merged.items()):
            k = settings[name].k
            # Every rank holds the same merged rows, so the value needs no further sync.
            self.log(metric_name(split, settings[name]),
                     sum(pass_at_k(k, sum(row["correct"]), k) for row in rows) / len(rows))
        run_dir = self.trainer.log_dir  # a broadcast from rank 0: every rank must ask
        if not self.trainer.is_global_zero:
            return
        out_dir = os.path.join(run_dir or self.trainer.default_root_dir, "predictions")
        os.makedirs(out_dir, exist_ok=True)
        for (split, name), rows in sorted(merged.items()):
            path = os.path.join(out_dir, f"{split}_{name}_step{self.trainer.global_step}.jsonl")
            with open(path, "w", encoding="utf-8") as f:
                f.writelines(json.dumps(row) + "\n" for row in rows)
