"""MayeDataModule with the tiny Qwen processor: batches are lists of dicts with an RGB image and
a prompt holding one vision placeholder; train shuffles and drops the tail, eval keeps order;
every split is validated in setup(), so a bad val split stops fit() before any training step."""

import json

import lightning as L
import pytest
import torch
from PIL import Image

from maye_pl.data import DatasetError, MayeDataModule, generate_geometry_dataset, load_split

VISION = "<|vision_start|><|image_pad|><|vision_end|>"


@pytest.fixture(scope="module")
def geo(tmp_path_factory):
    return generate_geometry_dataset(tmp_path_factory.mktemp("dm") / "geo", n_train=10, n_val=6,
                                     n_test=6)


def _module(tiny_model_dir, geo, **kwargs):
    args = {"train_path": geo["train"], "val_path": geo["val"], "test_path": geo["test"],
            "processor_path": tiny_model_dir, "batch_size": 4, "eval_batch_size": 4, **kwargs}
    return MayeDataModule(**args)


@pytest.mark.parametrize("style", ["cot", "zero_shot"])
def test_batches_hold_image_and_prompt(tiny_model_dir, geo, style):
    dm = _module(tiny_model_dir, geo, prompt_style=style)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert isinstance(batch, list) and len(batch) == 4
    by_id = {s.id: s for s in load_split(geo["train"])}
    for item in batch:
        sample = by_id[item["id"]]
        assert (item["question"], item["answer"], item["solution"], item["source"]) == (
            sample.question, sample.answer, sample.solution, sample.source)
        assert isinstance(item["image"], Image.Image) and item["image"].mode == "RGB"
        assert item["prompt"].count(VISION) == 1


def test_train_shuffles_and_drops_the_tail_eval_keeps_order(tiny_model_dir, geo):
    dm = _module(tiny_model_dir, geo)
    dm.setup("fit")
    torch.manual_seed(0)
    train = [[item["id"] for item in batch] for batch in dm.train_dataloader()]
    assert [len(b) for b in train] == [4, 4]  # 10 samples: the last 2 are dropped
    file_order = [s.id for s in load_split(geo["train"])]
    assert sum(train, []) != file_order[:8]
    val_loader, test_in_validation = dm.val_dataloader()  # the validation loop scores val and test
    val = [item["id"] for batch in val_loader for item in batch]
    assert val == [s.id for s in load_split(geo["val"])]
    assert {item["split"] for batch in val_loader for item in batch} == {"val"}
    assert {item["split"] for batch in test_in_validation for item in batch} == {"test"}
    test_sizes = [len(batch) for batch in dm.test_dataloader()]
    assert test_sizes == [4, 2]


def test_sample_limits_and_absent_splits(tiny_model_dir, geo):
    dm = _module(tiny_model_dir, geo, val_path=None, test_path=None, max_train_samples=4)
    dm.setup("fit")
    assert len(dm.train_dataloader()) == 1
    assert dm.val_dataloader() == [] and dm.test_dataloader() == []


def test_invalid_args_are_all_reported(tiny_model_dir, geo):
    with pytest.raises(ValueError) as info:
        _module(tiny_model_dir, geo, batch_size=0, prompt_style="chat", max_eval_samples=0)
    message = str(info.value)
    for key in ("`data.batch_size`=0", "`data.prompt_style`='chat'", "`data.max_eval_samples`=0"):
        assert key in message


def test_batch_larger_than_the_split_is_explained(tiny_model_dir, geo):
    dm = _module(tiny_model_dir, geo, batch_size=11)
    dm.setup("fit")
    with pytest.raises(ValueError, match=r"`data.batch_size`=11 exceeds the 10 training samples"):
        dm.train_dataloader()


def test_image_broken_after_validation_names_file_and_line(tiny_model_dir, geo, tmp_path):
    lines = geo["val"].read_text().splitlines()
    (tmp_path / "images").mkdir()
    record = json.loads(lines[0])
    Image.new("RGB", (8, 8)).save(tmp_path / record["image"])
    (tmp_path / "val.jsonl").write_text(lines[0] + "\n")
    dm = _module(tiny_model_dir, geo, val_path=tmp_path / "val.jsonl")
    dm.setup("validate")
    (tmp_path / record["image"]).write_bytes(b"not a png any more")
    with pytest.raises(DatasetError, match=rf"{tmp_path / 'val.jsonl'}:1: image: unreadable image"):
        next(iter(dm.val_dataloader()[0]))


class _Policy(L.LightningModule):
    """The smallest module fit() accepts; records whether a training step ever ran."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.steps = 0

    def training_step(self, batch, batch_idx):
        self.steps += 1
        return self.weight.sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.filterwarnings("ignore:You passed in a `val_dataloader` but have no `validation_step`")
def test_bad_splits_stop_fit_before_any_step(tiny_model_dir, geo, tmp_path):
    (tmp_path / "images").symlink_to(geo["val"].parent / "images")
    bad_val = tmp_path / "val.jsonl"
    bad_val.write_text(geo["val"].read_text().replace('"answer": "', '"answer": 1, "x": "', 1))
    bad_test = tmp_path / "test.jsonl"
    bad_test.write_text("\n")
    dm = _module(tiny_model_dir, geo, val_path=bad_val, test_path=bad_test)
    policy = _Policy()
    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(DatasetError) as info:
        trainer.fit(policy, datamodule=dm)
    assert policy.steps == 0
    assert [p.split(": ")[0] for p in info.value.problems] == [f"{bad_val}:1", str(bad_test)]


def test_draw_train_prompts_is_a_seeded_slice_that_skips_what_was_seen(tiny_model_dir, geo):
    """DAPO's extra prompts: a function of (seed, start, count, excluded ids); consecutive slices
    of one draw are disjoint (the ranks' shares); the loader does not move."""
    dm = _module(tiny_model_dir, geo)
    dm.setup("fit")
    loader = dm.train_dataloader()
    ids = lambda prompts: [p["id"] for p in prompts]  # noqa: E731
    first = ids(dm.draw_train_prompts(seed=5, start=0, count=6, exclude=set()))
    assert first == ids(dm.draw_train_prompts(seed=5, start=0, count=6, exclude=set()))
    assert first != ids(dm.draw_train_prompts(seed=6, start=0, count=6, exclude=set()))
    assert len(set(first)) == 6 and all(p["prompt"].count(VISION) == 1 for p in dm.draw_train_prompts(5, 0, 2, set()))
    # Rank 1's slice follows rank 0's; excluded ids are skipped, the rest keeps its order.
    assert ids(dm.draw_train_prompts(5, 0, 2, set())) + ids(dm.draw_train_prompts(5, 2, 4, set())) == first
    assert ids(dm.draw_train_prompts(5, 0, 4, set(first[:2]))) == first[2:]
    assert dm.train_sampler.consumed == 0 and len(next(iter(loader))) == 4
