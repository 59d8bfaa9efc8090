"""The metrics of one generation step (MAYE's per-step logging), reduced over ranks in two collectives.

Lightning's ``self.log(..., sync_dist=True)`` runs one all-reduce per metric; a step logs about
forty (rewards, lengths, KL, five reflection ratios, fifteen word counts, ...). Here every mean is
one element of a single SUM all-reduce (divided by the world size: each rank holds as many
responses), the reflection counts ride in the same vector (ratios are taken from the summed
counts), and the longest response is one MAX all-reduce.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.distributed as dist
from lightning.pytorch.loggers import Logger, TensorBoardLogger, WandbLogger

from maye_pl import rl
from maye_pl.evaluation.names import REFLECTION_PREFIX
from maye_pl.evaluation.reflection import ratios_from_counts, reflection_counts
from maye_pl.trajectory import Trajectory
from maye_pl.types import Rollout

REFLECTIVE_SAMPLE_KEY = "samples/reflective_correct"


def rollout_step_metrics(
    rollouts: list[Rollout],
    trajectory: Trajectory,
    reflection_match: Literal["word", "substring"] = "word",
    group: dist.ProcessGroup | None = None,
) -> dict[str, float]:
    """Rewards by component, lengths, KL to the reference, staleness, engine/trainer mismatch and
    MAYE's reflection ratios (``reflection_counts``' ``match``) of one rollout batch, over all
    ranks of ``group`` (None: this process).

    Needs ``trajectory.old_logprobs`` (after Step IV when it filled them in).
    """
    mask = trajectory.response_mask
    tokens = mask.sum().clamp(min=1)
    lengths = rl.response_lengths(mask).float()  # (N,)
    means = {
        "reward/total": trajectory.scores.float().mean(),
        "reward/penalized_fraction": trajectory.penalized.float().mean(),
        "rollout/response_length_mean": lengths.mean(),
        "rollout/length_clip_ratio": torch.tensor(sum(r.finish_reason == "length" for r in rollouts) / len(rollouts)),
        "policy/staleness": trajectory.staleness.float().mean(),
    }
    if trajectory.ref_logprobs is not None:
        means["policy/kl"] = (rl.kl_k1(trajectory.old_logprobs, trajectory.ref_logprobs) * mask).sum() / tokens
    if trajectory.behaviour_logprobs is not None:
        means["policy/engine_logprob_mismatch"] = (
            (trajectory.behaviour_logprobs - trajectory.old_logprobs).abs() * mask
        ).sum() / tokens
    for name, values in trajectory.reward_components.items():
        if name != "accuracy":  # logged by the module, with its epoch mean
            means[f"reward/{name}"] = values.float().mean()
    accuracy = trajectory.reward_components.get("accuracy")
    counts = (
        reflection_counts([r.text for r in rollouts], [bool(a > 0) for a in accuracy], reflection_match)
        if accuracy is not None else {}
    )

    device = mask.device
    summed = torch.stack(
        [value.detach().to(device, torch.float64) for value in means.values()]
        + [torch.tensor(float(count), dtype=torch.float64, device=device) for count in counts.values()]
    )
    longest = lengths.max().to(torch.float64)
    world = 1
    if group is not None:
        dist.all_reduce(summed, group=group)
        dist.all_reduce(longest, op=dist.ReduceOp.MAX, group=group)
        world = dist.get_world_size(group)
    values = summed.tolist()
    metrics = {name: value / world for name, value in zip(means, values)}
    metrics["rollout/response_length_max"] = float(longest)
    if counts:
        summed_counts = dict(zip(counts, values[len(means):]))
        metrics.update({f"{REFLECTION_PREFIX}{name}": value for name, value in ratios_from_counts(summed_counts).items()})
    return metrics


LOSS_STAT_METRICS = {"policy_loss": "loss/policy", "kl_loss": "loss/kl"}
"""The metric of each ``ReinforcePP.micro_batch_loss`` statistic that is not ``policy/<name>``."""


def micro_batch_stats(
    loss: torch.Tensor, loss_stats: dict[str, torch.Tensor], entropy: torch.Tensor, response_mask: torch.Tensor
) -> dict[str, float]:
    """One micro-batch's loss and policy statistics by metric name (entropy: (b, T), token mean);
    ``loss_stats`` as ``ReinforcePP.micro_batch_loss`` returns them (``policy/<name>`` unless
    ``LOSS_STAT_METRICS`` names another metric)."""
    stats = {LOSS_STAT_METRICS.get(name, f"policy/{name}"): float(value) for name, value in loss_stats.items()}
    stats["loss/total"] = float(loss.detach())
    stats["policy/entropy"] = float((entropy.detach() * response_mask).sum() / response_mask.sum().clamp(min=1))
    return stats


def log_reflective_sample(
    loggers: list[Logger],
    texts: list[str],
    accuracy: torch.Tensor,
    reflection_match: Literal["word", "substring"],
    generation_step: int,
    global_step: int,
) -> None:
    """One correct, reflective response of the step as a text sample, for loggers that take text
    (a W&B table row, a TensorBoard text)."""
    sample = next((text for text, correct in zip(texts, accuracy.tolist())
                   if correct > 0 and reflection_counts([text], [True], reflection_match)["n_reflective"]), None)
    if sample is None:
        return
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            logger.log_text(REFLECTIVE_SAMPLE_KEY, columns=["generation_step", "response"], data=[[generation_step, sample]])
        elif isinstance(logger, TensorBoardLogger):
            logger.experiment.add_text(REFLECTIVE_SAMPLE_KEY, sample, global_step)


def average_stats(stats: list[dict[str, float]]) -> dict[str, float]:
    """Each statistic's mean over the list (micro-batches, minibatches); the maximum for ``*_max``."""
    names = {name for row in stats for name in row}
    return {
        name: (max if name.endswith("_max") else _mean)([row[name] for row in stats if name in row])
        for name in sorted(names)
    }


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)
