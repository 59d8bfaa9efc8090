"""Weight streaming without a process group: bucket bounds, HF names, no copies, frozen-once plan.

The sharded (2-process) behaviour is checked in test_fsdp2.py; here the bucketing rule itself is
checked on hand-sized tensors, plus the unsharded path the HF engine or a 1-device run uses.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

from maye_pl.strategies import WeightSyncPlan, hf_name, iter_full_parameters, sync_weights


def _model() -> nn.Sequential:
    # fp32 sizes: 0.weight 8*8*4 = 256 B, 0.bias 32 B, 1.weight 2*8*4 = 64 B, 1.bias 8 B.
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 2))


def _names(buckets) -> list[list[str]]:
    return [[name for name, _ in bucket] for bucket in buckets]


def test_hf_name_strips_wrapper_segments() -> None:
    assert hf_name("model.layers.0._checkpoint_wrapped_module.mlp.weight") == "model.layers.0.mlp.weight"
    assert hf_name("_orig_mod.lm_head.weight") == "lm_head.weight"
    assert hf_name("layers.1._fsdp_wrapped_module.bias") == "layers.1.bias"


@pytest.mark.parametrize(
    ("bucket_bytes", "expected"),
    [
        # 256 + 32 = 288 <= 300; + 64 = 352 > 300 -> new bucket; 64 + 8 = 72.
        (300, [["0.weight", "0.bias"], ["1.weight", "1.bias"]]),
        # 256 > 100 travels alone; 32 + 64 = 96 <= 100; + 8 = 104 > 100 -> new bucket.
        (100, [["0.weight"], ["0.bias", "1.weight"], ["1.bias"]]),
    ],
)
def test_buckets_follow_the_byte_bound(bucket_bytes: int, expected: list[list[str]]) -> None:
    collected = []
    for bucket in iter_full_parameters(_model(), bucket_bytes=bucket_bytes):
        collected.append(list(bucket))
    assert _names(collected) == expected


def test_unsharded_tensors_are_views_named_like_the_state_dict() -> None:
    model = _model()
    model[0] = checkpoint_wrapper(model[0])  # adds "_checkpoint_wrapped_module." to named_parameters
    tensors = {name: t for bucket in iter_full_parameters(model, bucket_bytes=1 << 20) for name, t in bucket}
    assert list(tensors) == list(model.state_dict())  # ["0.weight", "0.bias", "1.weight", "1.bias"]
    for name, param in model.state_dict().items():
        assert tensors[name].data_ptr() == param.data_ptr()  # no copy without sharding
        assert not tensors[name].requires_grad


def test_a_bucket_is_emptied_when_the_iterator_resumes() -> None:
    buckets = iter_full_parameters(_model(), bucket_bytes=300)
    first = next(buckets)
    assert len(first) == 2
    next(buckets)
    assert first == []  # its tensors are no longer held by the iterator's list


def test_bucket_bytes_must_be_positive() -> None:
    with pytest.raises(ValueError, match="bucket_bytes=0 must be > 0"):
        next(iter_full_parameters(_model(), bucket_bytes=0))


def test_sync_weights_sends_frozen_parameters_once() -> None:
    model = _model()
    model[0].requires_grad_(False)
    plan, pushed = WeightSyncPlan(), []

    def push(bucket: list[tuple[str, torch.Tensor]]) -> None:
        pushed.append([name for name, _ in bucket])  # the bucket is emptied after push returns

    stats = [sync_weights(model, push, bucket_bytes=300, plan=plan) for _ in range(2)]
    assert pushed == [["0.weight", "0.bias"], ["1.weight", "1.bias"], ["1.weight", "1.bias"]]
    assert [(s.num_tensors, s.num_bytes, s.num_buckets) for s in stats] == [(4, 360, 2), (2, 72, 1)]
    assert stats[0].max_bucket_bytes == 288
    assert plan.sent_frozen == {"0.weight", "0.bias"}


def test_sync_weights_needs_push_on_the_destination_rank() -> None:
    with pytest.raises(ValueError, match=r"push is None on rank 0, one of the receiving ranks \[0\]"):
        sync_weights(_model(), None, bucket_bytes=300)
