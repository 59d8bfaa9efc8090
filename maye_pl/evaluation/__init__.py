"""Evaluation: pass@k, reflection metrics, the metrics.jsonl file and `maye_pl report`.

Metric names: the contract between the trainer (writes them with self.log) and the report
(`maye_pl.evaluation.report.main`, reads metrics.jsonl). Every row of metrics.jsonl also has
"step" (trainer.global_step) and "epoch"; see MetricsFileCallback.

================================================ ==================================================
metric                                           definition
================================================ ==================================================
val/pass@8_t1.0, test/pass@8_t1.0                mean over the split's prompts of pass_at_k(n, c,
                                                 k=8), samples at temperature 1.0, top_p 1.0;
                                                 one row per evaluation run
val/pass@1_t0.6, test/pass@1_t0.6                same, k=1, temperature 0.6, top_p 1.0
val/pass@1_t0.01, test/pass@1_t0.01              same, k=1, temperature 0.01, top_p 0.001
                                                 (names: metric_name(split, s) for s in
                                                 PAPER_EVAL_SETTINGS(); a run's first row with
                                                 step 0 holding one is its Vanilla)
reward/accuracy_epoch                            share of the epoch's training responses judged
                                                 correct; self.log("reward/accuracy", ...,
                                                 on_step=True, on_epoch=True) names it so
rollout/response_length_mean                     mean response length (tokens) of a rollout batch
generation_step                                  rollout batches generated so far (1 = first),
                                                 in the same row as rollout/ and reflection/
reflection/reflection_ratio                      reflective texts / texts
reflection/reflection_ratio_in_correct_answers   reflective correct texts / correct texts
reflection/reflection_ratio_in_incorrect_answers reflective incorrect texts / incorrect texts
reflection/correct_ratio_in_reflection_texts     correct reflective texts / reflective texts
reflection/correct_ratio_in_no_reflection_texts  correct plain texts / plain (non-reflective) texts
reflection/word_count/<word>                     occurrences of <word> (each of REFLECTION_WORDS)
                                                 in the rollout batch's responses
================================================ ==================================================

A text is reflective when it holds at least one of REFLECTION_WORDS (whole words, any case).
All reflection/ metrics cover one rollout batch on all ranks: sum `reflection_counts` over ranks,
then `ratios_from_counts` (0.0 for an empty denominator). Accuracies are fractions in [0, 1].
The report reads val/ and test/ per epoch from the rows' "epoch": log both from the same
per-epoch evaluation (e.g. test as a second validation dataloader, logged with
add_dataloader_idx=False so the names stay as above); a trainer.test() after fit gives test/ one
row only, with epoch = completed epochs.
"""

from maye_pl.evaluation.metrics_file import METRICS_FILENAME, MetricsFileCallback, read_metrics
from maye_pl.evaluation.names import (
    GENERATION_STEP,
    REFLECTION_PREFIX,
    RESPONSE_LENGTH_MEAN,
    TRAIN_ACCURACY_EPOCH,
)
from maye_pl.evaluation.passk import PAPER_EVAL_SETTINGS, EvalSetting, metric_name, pass_at_k
from maye_pl.evaluation.reflection import (
    RATIO_KEYS,
    REFLECTION_WORDS,
    ratios_from_counts,
    reflection_counts,
    reflection_metrics,
)

__all__ = [
    "GENERATION_STEP",
    "METRICS_FILENAME",
    "PAPER_EVAL_SETTINGS",
    "RATIO_KEYS",
    "REFLECTION_PREFIX",
    "REFLECTION_WORDS",
    "RESPONSE_LENGTH_MEAN",
    "TRAIN_ACCURACY_EPOCH",
    "EvalSetting",
    "MetricsFileCallback",
    "metric_name",
    "pass_at_k",
    "ratios_from_counts",
    "read_metrics",
    "reflection_counts",
    "reflection_metrics",
]
