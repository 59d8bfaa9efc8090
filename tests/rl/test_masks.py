"""truncate_at_stop cuts after the first stop token (keeping it), lengths count valid tokens,
the length penalty matches MAYE's rule, and the penalty replaces the score."""

import torch

from maye_pl.rl.masks import apply_penalty, needs_length_penalty, response_lengths, truncate_at_stop

STOP = [2, 9]
PAD = 0


def test_truncate_at_stop_keeps_first_stop_and_pads_after():
    ids = torch.tensor(
        [
            [5, 2, 7, 9],  # stop at t=1; 7 and the second stop 9 are cut
            [5, 6, 7, 8],  # no stop: all valid
            [9, 2, 2, 3],  # stop at t=0
            [4, 6, 9, 0],  # stop at t=2, then padding
        ]
    )
    before = ids.clone()
    out, mask = truncate_at_stop(ids, STOP, PAD)
    assert out.tolist() == [[5, 2, 0, 0], [5, 6, 7, 8], [9, 0, 0, 0], [4, 6, 9, 0]]
    assert mask.tolist() == [
        [True, True, False, False],
        [True, True, True, True],
        [True, False, False, False],
        [True, True, True, False],
    ]
    assert mask.dtype == torch.bool
    assert torch.equal(ids, before)
    assert response_lengths(mask).tolist() == [2, 4, 1, 3]
    assert response_lengths(mask).dtype == torch.long


def test_stop_ids_as_tensor_work_the_same():
    ids = torch.tensor([[5, 9, 7]])
    out, mask = truncate_at_stop(ids, torch.tensor(STOP), PAD)
    assert out.tolist() == [[5, 9, 0]] and mask.tolist() == [[True, True, False]]


def test_needs_length_penalty_no_stop_and_too_short():
    ids, mask = truncate_at_stop(
        torch.tensor(
            [
                [5, 6, 2, 0],  # 2 tokens before the stop
                [5, 2, 0, 0],  # 1 token before the stop
                [5, 6, 7, 8],  # ran out of tokens
                [2, 0, 0, 0],  # empty answer: 0 tokens before the stop
            ]
        ),
        STOP,
        PAD,
    )
    # min 2: rows 1 (1 < 2) and 3 (0 < 2) too short, row 2 has no stop.
    assert needs_length_penalty(ids, mask, STOP, 2).tolist() == [False, True, True, True]
    # No minimum: only the row without a stop token.
    assert needs_length_penalty(ids, mask, STOP, None).tolist() == [False, False, True, False]
    # MAYE's rule: penalise if seq_lens < min, seq_lens = 0-indexed last valid position
    # = valid count - 1 = [3, 2, 4, 1] - 1 = [2, 1, 3, 0]; with min 2 -> [F, T, T(no stop), T].
    maye_seq_lens = response_lengths(mask) - 1
    maye_penalty = ~torch.isin(ids, torch.tensor(STOP)).any(-1) | (maye_seq_lens < 2)
    assert needs_length_penalty(ids, mask, STOP, 2).tolist() == maye_penalty.tolist()


def test_apply_penalty_replaces_not_adds():
    scores = torch.tensor([1.0, 0.5, 0.0])
    penalize = torch.tensor([False, True, True])
    # Replacement: 0.5 -> -1 and 0 -> -1 (adding would give -0.5 and -1).
    assert apply_penalty(scores, penalize, -1.0).tolist() == [1.0, -1.0, -1.0]
    assert scores.tolist() == [1.0, 0.5, 0.0]
