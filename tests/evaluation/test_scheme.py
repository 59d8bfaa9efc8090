"""The evaluation mixin's rank merge: the samples a distributed sampler repeats count once."""

from __future__ import annotations

from maye_pl.evaluation.scheme import merge_rank_predictions


def _row(sample_id: str, correct: list[bool]) -> dict:
    return {"id": sample_id, "question": "q", "answer": "1", "predictions": ["p"] * len(correct), "correct": correct}


def test_repeated_samples_count_once_and_ranks_keep_their_order():
    # 3 samples on 2 ranks: DistributedSampler gives rank 0 [a, c] and rank 1 [b, a] (a repeated).
    rank0 = {("val", "pass@1_t0.6"): [_row("a", [True]), _row("c", [False])]}
    rank1 = {("val", "pass@1_t0.6"): [_row("b", [True]), _row("a", [False])], ("test", "pass@1_t0.6"): [_row("t", [True])]}
    merged = merge_rank_predictions([rank0, rank1])
    assert [row["id"] for row in merged[("val", "pass@1_t0.6")]] == ["a", "c", "b"]
    assert merged[("val", "pass@1_t0.6")][0]["correct"] == [True]  # the first row of an id is kept
    assert [row["id"] for row in merged[("test", "pass@1_t0.6")]] == ["t"]
