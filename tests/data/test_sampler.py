"""ResumableSampler / ResumableDataLoader / MayeDataModule's saved state resume an epoch exactly.

Proves, without processes (ranks are simulated by ``num_replicas``/``rank``): a fresh epoch is
exactly torch's DistributedSampler(drop_last=True) order, so ranks hold disjoint equal shares of
one permutation; a loader stopped after k batches and a fresh loader given its state continue with
exactly the batches the uninterrupted loader would have produced (1 and 2 ranks, also on another
number of ranks: no sample of the epoch twice or lost); the count is of batches handed out, not of
indices DataLoader workers drew ahead; a state loaded after ``iter(loader)`` but before the first
batch still applies; the next epoch starts from its beginning; and the data module carries the
state whether Lightning restores it before or after ``train_dataloader()``.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DistributedSampler

from maye_pl.data import MayeDataModule, generate_geometry_dataset
from maye_pl.data.sampler import ResumableDataLoader, ResumableSampler

N, BATCH, SEED = 23, 3, 7  # 23 samples: per rank 11 (2 ranks) or 7 (3 ranks), tails dropped


def _loader(num_replicas: int, rank: int, epoch: int = 0, workers: int = 0) -> ResumableDataLoader:
    dataset = list(range(N))
    sampler = ResumableSampler(dataset, num_replicas=num_replicas, rank=rank, seed=SEED)
    sampler.set_epoch(epoch)
    return ResumableDataLoader(dataset, sampler, BATCH, num_workers=workers, collate_fn=list)


def _run(loader: ResumableDataLoader, batches: int | None = None) -> list[list[int]]:
    out = []
    for batch in loader:
        out.append(batch)
        if batches is not None and len(out) == batches:
            break
    return out


@pytest.mark.parametrize("num_replicas", [1, 2, 3])
def test_fresh_epoch_is_torch_distributed_sampler_order(num_replicas):
    for epoch in (0, 1):
        shares = []
        for rank in range(num_replicas):
            ours = _loader(num_replicas, rank, epoch).sampler
            theirs = DistributedSampler(list(range(N)), num_replicas, rank, shuffle=True, seed=SEED, drop_last=True)
            theirs.set_epoch(epoch)
            assert list(ours) == list(theirs) and len(ours) == len(theirs) == N // num_replicas
            shares.append(list(ours))
        flat = sum(shares, [])
        assert len(set(flat)) == len(flat) == N // num_replicas * num_replicas  # disjoint, equal shares


@pytest.mark.parametrize("num_replicas", [1, 2])
@pytest.mark.parametrize("stop_after", [1, 2])
def test_resume_mid_epoch_continues_the_uninterrupted_batches(num_replicas, stop_after):
    for rank in range(num_replicas):
        uninterrupted = _run(_loader(num_replicas, rank))
        stopped = _loader(num_replicas, rank)
        assert _run(stopped, stop_after) == uninterrupted[:stop_after]
        state = stopped.sampler.state_dict()
        assert state == {"epoch": 0, "seed": SEED, "consumed": stop_after * BATCH * num_replicas}

        resumed = _loader(num_replicas, rank)
        resumed.sampler.load_state_dict(state)
        resumed.sampler.set_epoch(0)  # what Lightning calls at the resumed epoch's start: keeps the position
        assert _run(resumed) == uninterrupted[stop_after:]
        assert len(resumed) == len(uninterrupted)  # the full epoch's length: Lightning counts done batches in it
        resumed.sampler.set_epoch(1)  # the next epoch starts at its beginning
        assert _run(resumed) == _run(_loader(num_replicas, rank, epoch=1))


def test_resume_on_another_number_of_ranks_neither_repeats_nor_skips():
    # 2 ranks ran 1 batch each (6 samples), then the run resumes on 3 ranks.
    seen = [x for rank in range(2) for batch in _run(_loader(2, rank), 1) for x in batch]
    state = _loader(2, 0).sampler.state_dict() | {"consumed": len(seen)}
    rest = []
    for rank in range(3):
        loader = _loader(3, rank)
        loader.sampler.load_state_dict(state)
        rest.append([x for batch in _run(loader) for x in batch])
    assert len({len(r) for r in rest}) == 1  # equal shares: no rank waits for another at a collective
    order = _loader(2, 0).sampler.epoch_order().tolist()  # the epoch's permutation (22 of 23 samples)
    # 3 ranks cut the epoch to 21 positions: 15 remain, 5 per rank, 1 full batch of 3 each.
    assert sorted(seen + sum(rest, [])) == sorted(order[: len(seen) + 3 * BATCH])
    assert not set(seen) & set(sum(rest, []))


def test_counts_batches_handed_out_not_indices_workers_drew():
    loader = _loader(1, 0, workers=1)  # the worker prefetches 2 batches of indices ahead
    iterator = iter(loader)
    first = next(iterator)
    assert loader.sampler.consumed == BATCH
    resumed = _loader(1, 0)
    resumed.sampler.load_state_dict(loader.sampler.state_dict())
    del iterator  # shuts the worker down
    assert _run(resumed) == _run(_loader(1, 0))[1:] and first == _run(_loader(1, 0))[0]


def test_state_loaded_after_iter_but_before_the_first_batch_applies():
    # Lightning calls iter(loader) before restoring when configure_optimizers reads
    # trainer.estimated_stepping_batches (Lightning issue #20550).
    loader = _loader(1, 0)
    iterator = iter(loader)
    loader.sampler.load_state_dict({"epoch": 0, "seed": SEED, "consumed": 2 * BATCH})
    assert list(iterator) == _run(_loader(1, 0))[2:]


def test_bad_states_name_the_problem():
    sampler = _loader(1, 0).sampler
    with pytest.raises(KeyError, match=r"lacks \['consumed'\]"):
        sampler.load_state_dict({"epoch": 0, "seed": 0})
    with pytest.raises(ValueError, match=r"`consumed`=99 is outside \[0, 23\]"):
        sampler.load_state_dict({"epoch": 0, "seed": 0, "consumed": 99})


@pytest.fixture(scope="module")
def geo(tmp_path_factory):
    return generate_geometry_dataset(tmp_path_factory.mktemp("sampler") / "geo", n_train=12, n_val=0, n_test=0)


def _ids(loader) -> list[list[str]]:
    return [[item["id"] for item in batch] for batch in loader]


@pytest.mark.parametrize("restore", ["before_train_dataloader", "after_train_dataloader"])
def test_datamodule_state_round_trip(tiny_model_dir, geo, restore, monkeypatch):
    monkeypatch.setenv("PL_GLOBAL_SEED", "3")  # seed_everything(3)
    dm = MayeDataModule(train_path=geo["train"], processor_path=tiny_model_dir, batch_size=4)
    dm.setup("fit")
    assert dm.state_dict() == {}  # no sampler yet, nothing to save
    loader = dm.train_dataloader()
    uninterrupted = _ids(loader)
    assert len(uninterrupted) == 3
    loader = dm.train_dataloader()
    next(iter(loader))
    state = dm.state_dict()
    assert state == {"train_sampler": {"epoch": 0, "seed": 3, "consumed": 4}}

    monkeypatch.setenv("PL_GLOBAL_SEED", "4")  # a resumed run's seed does not reorder the saved epoch
    resumed = MayeDataModule(train_path=geo["train"], processor_path=tiny_model_dir, batch_size=4)
    resumed.setup("fit")
    if restore == "before_train_dataloader":  # single-device strategies restore before setup
        resumed.load_state_dict(state)
        loader = resumed.train_dataloader()
    else:  # FSDP2 restores after the strategy's setup
        loader = resumed.train_dataloader()
        resumed.load_state_dict(state)
    assert _ids(loader) == uninterrupted[1:]
    with pytest.raises(KeyError, match="not 'train_sampler'"):
        resumed.load_state_dict({"sampler": {}})


@pytest.mark.parametrize("num_replicas", [1, 2])
def test_peek_returns_what_the_loader_hands_out_next_also_across_epochs(tiny_model_dir, geo, num_replicas, monkeypatch):
    """Pipelined rollouts generate batch k+1 before the loader yields it: peek_train_batch(1) at
    every step equals the loader's next batch (per rank), into the next epoch too, and nothing
    when no epoch follows; peeking does not move the loader."""
    monkeypatch.setenv("PL_GLOBAL_SEED", "5")
    for rank in range(num_replicas):
        dm = MayeDataModule(train_path=geo["train"], processor_path=tiny_model_dir, batch_size=3)
        dm.setup("fit")
        dm.trainer = None
        monkeypatch.setattr(dm, "_world", lambda rank=rank: (num_replicas, rank))
        loader = dm.train_dataloader()
        per_epoch = len(loader)  # 12 samples: 4 batches on 1 rank, 2 per rank on 2
        epochs = []
        for epoch in range(2):
            loader.sampler.set_epoch(epoch)
            epochs.append([(batch, dm.peek_train_batch(1, per_epoch - i - 1, next_epoch=epoch == 0))
                           for i, batch in enumerate(loader)])
        flat = [pair for epoch in epochs for pair in epoch]
        for (_, peeked), (actual, _) in zip(flat, flat[1:]):
            assert [s["id"] for s in peeked] == [s["id"] for s in actual]
            assert peeked[0]["prompt"] == actual[0]["prompt"]  # collated like the loader's
        assert flat[-1][1] is None  # the run ends: nothing to generate ahead
        assert epochs[0][0][0] != epochs[1][0][0]  # (each epoch has its own order)
