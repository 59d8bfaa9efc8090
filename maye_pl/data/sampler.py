"""A training sample order that shards over ranks and resumes mid-epoch, and the loader that counts it.

Epoch e's order is ONE permutation of the dataset, drawn from ``seed + e`` (the same on every rank,
exactly ``torch.utils.data.DistributedSampler``'s), cut to a multiple of the world size R so every
rank gets as many samples; rank r takes positions r, r+R, r+2R, ... The sampler remembers how many
positions of the permutation all ranks together have consumed this epoch; a new iteration starts
there. A checkpoint taken after k batches of b prompts per rank stores ``consumed = k*b*R``, and the
resumed run continues with position k*b*R: no prompt of the epoch is seen twice or skipped, also
when resuming on a different number of ranks.

Only the loader knows what has been consumed: DataLoader workers draw sampler indices ahead of the
training loop, so ``ResumableDataLoader`` counts the batches it has handed out, not the indices
drawn. Its ``__iter__`` is lazy (nothing, not even the workers' index prefetch, runs before the
first batch is requested), so a state loaded after ``iter(loader)`` but before the first batch
still takes effect: Lightning creates the iterator before restoring a checkpoint when
``configure_optimizers`` reads ``trainer.estimated_stepping_batches``.

Under DDP/FSDP Lightning leaves the loader alone: ``Trainer(use_distributed_sampler=True)`` only
replaces samplers that are not already a ``DistributedSampler``, and it calls ``set_epoch`` on
this one every epoch.
"""

from __future__ import annotations

from collections.abc import Iterator, Sized
from typing import Any

import torch
from torch.utils.data import DataLoader, DistributedSampler

STATE_KEYS = ("epoch", "seed", "consumed")


class ResumableSampler(DistributedSampler):
    """Rank ``rank``'s share of epoch ``epoch``'s permutation, from position ``consumed`` on.

    ``len()`` is the FULL epoch's samples per rank (Lightning counts the batches a resumed epoch had
    already done against it); a resumed iteration yields the remaining ones only.
    """

    def __init__(self, dataset: Sized, num_replicas: int, rank: int, seed: int) -> None:
        """
        Args:
            dataset: The training set (only its length is used).
            num_replicas: World size R (1 in a single process).
            rank: This process's global rank.
            seed: Base seed; epoch e shuffles with ``seed + e`` (Lightning passes the
                ``seed_everything`` seed to its own DistributedSampler the same way).
        """
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.consumed = 0
        """Positions of this epoch's permutation consumed by all ranks together."""

    def epoch_order(self, epoch: int | None = None) -> torch.Tensor:
        """Epoch ``epoch``'s (default: this epoch's) permutation of all ranks' samples,
        (num_samples * R,) dataset indices."""
        generator = torch.Generator().manual_seed(self.seed + (self.epoch if epoch is None else epoch))
        return torch.randperm(len(self.dataset), generator=generator)[: self.total_size]

    def batch_indices(self, epoch: int, position: int, batch_size: int) -> list[int]:
        """This rank's dataset indices of the batch that starts at ``position`` of epoch ``epoch``'s
        permutation (what the loader yields there), without moving the sampler: rollouts for a
        batch can then be generated before the loader hands it out."""
        order = self.epoch_order(epoch)
        end = position + batch_size * self.num_replicas
        if end > len(order):
            raise IndexError(
                f"ResumableSampler.batch_indices: a batch of {batch_size} per rank at position {position} "
                f"runs past the {len(order)} samples of epoch {epoch}."
            )
        return order[position + self.rank : end : self.num_replicas].tolist()

    def __iter__(self) -> Iterator[int]:
        order = self.epoch_order()
        # An epoch consumed to its end is iterated again from its start, as DistributedSampler is
        # when nobody calls set_epoch.
        start = self.consumed if self.consumed < len(order) else 0
        # Equal shares even when `consumed` came from a run on another number of ranks.
        per_rank = (len(order) - start) // self.num_replicas
        return iter(order[start + self.rank : start + per_rank * self.num_replicas : self.num_replicas].tolist())

    def set_epoch(self, epoch: int) -> None:
        """Start epoch ``epoch`` from its beginning; the current epoch (a resumed one) keeps its position."""
        if epoch != self.epoch:
            self.consumed = 0
        super().set_epoch(epoch)

    def advance(self, samples_per_rank: int) -> None:
        """Record that every rank consumed ``samples_per_rank`` more samples."""
        self.consumed += samples_per_rank * self.num_replicas

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "seed": self.seed, "consumed": self.consumed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue the saved epoch where it stopped; the saved seed wins, so the epoch's order is the saved one."""
        missing = [key for key in STATE_KEYS if key not in state]
        if missing:
            raise KeyError(
                f"ResumableSampler.load_state_dict: the saved sampler state {state!r} lacks {missing}; "
                f"it needs {list(STATE_KEYS)} — resume from a checkpoint written by this version of maye_pl."
            )
        if not 0 <= state["consumed"] <= len(self.dataset):
            raise ValueError(
                f"ResumableSampler.load_state_dict: saved `consumed`={state['consumed']} is outside "
                f"[0, {len(self.dataset)}] for the {len(self.dataset)} training samples; the checkpoint "
                "was trained on another dataset — point `data.train_path` at the run's training file."
            )
        self.epoch, self.seed, self.consumed = state["epoch"], state["seed"], state["consumed"]


class ResumableDataLoader(DataLoader):
    """A DataLoader over a ``ResumableSampler`` that advances it by each batch it hands out."""

    def __init__(self, dataset: Any, sampler: ResumableSampler, batch_size: int, **kwargs: Any) -> None:
        """``kwargs`` go to ``DataLoader`` (``shuffle``, ``batch_sampler`` and ``drop_last`` are fixed here)."""
        super().__init__(dataset, batch_size=batch_size, sampler=sampler, drop_last=True, **kwargs)

    def __iter__(self) -> Iterator[Any]:
        # A generator: DataLoader's iterator (and its workers' index prefetch) starts at the first next().
        for batch in super().__iter__():
            self.sampler.advance(self.batch_size)
            yield batch
